// Package daemontest is test-support code: the harness of the tests that
// run the real mhbpf binary as a daemon in the lab's namespaces (test/ and
// bench/daemon/). It builds or locates the binary, runs its commands in
// the router's namespace, keeps the daemon's log, fails a test on an ERROR
// line in it, waits for the daemon's status and ends with 'mhbpf down'.
// Only _test files import it; the daemon itself never does.
package daemontest
