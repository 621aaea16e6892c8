// Package statefile reads and writes the small JSON files mhbpf keeps
// across crashes (in /run/mhbpf). Writes are atomic: a crash mid-write
// leaves the old file, never half a new one.
package statefile

import (
	"encoding/json"
	"os"
	"path/filepath"
)

// Write stores v as JSON at path, creating its directory.
func Write(path string, v any) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// Read loads the JSON at path into v.
func Read(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}
