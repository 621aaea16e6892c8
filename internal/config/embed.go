package config

import _ "embed"

// Scenario is the example configuration of the reference scenario.
//
//go:embed scenario.toml
var Scenario []byte
