package daemontest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/mhbpf/mhbpf/internal/daemon"
)

// InNetns is a command that runs in the named network namespace without a
// new mount namespace (ip netns exec would hide the host's bpffs).
func InNetns(netns string, args ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"--net=/run/netns/" + netns}, args...)...)
}

// Daemon is where one daemon runs: its binary, the network namespace it
// runs in (the router's), and the state and pin directories its CLI
// commands name.
type Daemon struct {
	Bin      string
	Netns    string
	StateDir string
	PinDir   string
}

// CLI runs 'mhbpf --state-dir --pin-dir args' in the daemon's namespace
// and returns its output (stdout and stderr).
func (d Daemon) CLI(args ...string) (string, error) {
	args = append([]string{d.Bin, "--state-dir", d.StateDir, "--pin-dir", d.PinDir}, args...)
	out, err := InNetns(d.Netns, args...).CombinedOutput()
	return string(out), err
}

// Down is how every daemon test ends, after the daemon stopped: 'mhbpf
// down' removes whatever the test left (a failure there is a bug), then
// the pin directory goes.
func (d Daemon) Down(tb testing.TB) {
	tb.Helper()
	if out, err := d.CLI("down"); err != nil {
		tb.Errorf("mhbpf down: %v\n%s", err, out)
	}
	_ = os.RemoveAll(d.PinDir)
}

// Running is the daemon's status and whether it says that process pid
// runs (its first pass is done).
func (d Daemon) Running(pid int) (daemon.Status, bool) {
	st, err := daemon.LoadStatus(d.StateDir)
	return st, err == nil && st.State == daemon.StateRunning && st.PID == pid
}

// ErrEnded: the daemon ended while Until waited for it.
var ErrEnded = errors.New("the daemon ended")

// Until polls ok every interval until it holds and returns the time from
// start (the moment of the event whose effect is awaited, so that the
// time the command causing it took counts). It gives up when limit has
// passed since start, or with ErrEnded when ended (if not nil) is closed.
func Until(start time.Time, limit, interval time.Duration, ended <-chan struct{}, ok func() bool) (time.Duration, error) {
	for time.Since(start) < limit {
		if ok() {
			return time.Since(start), nil
		}
		select {
		case <-ended:
			return 0, ErrEnded
		default:
		}
		time.Sleep(interval)
	}
	return 0, fmt.Errorf("not within %v", limit)
}
