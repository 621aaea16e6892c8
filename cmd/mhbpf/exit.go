package main

import "fmt"

// Exit codes of 'mhbpf status' (documented in docs/cli.md). 1 stays what
// it is for every command: an error (bad flag, unreadable file).
const (
	exitHealthy    = 0 // daemon running, every uplink usable
	exitError      = 1
	exitDegraded   = 3 // running, but an uplink is out (or the first pass is not done, or probes are ignored)
	exitAllDown    = 4 // running, and no uplink is usable
	exitNotRunning = 5 // no status, or its daemon is gone
)

// exitCode is an error that ends the program with a chosen code. An empty
// message prints nothing: the command has already said what it found.
type exitCode struct {
	code int
	msg  string
}

func (e *exitCode) Error() string { return e.msg }

func exitWith(code int, format string, args ...any) error {
	return &exitCode{code: code, msg: fmt.Sprintf(format, args...)}
}
