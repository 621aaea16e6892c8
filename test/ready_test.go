package test

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mhbpf/mhbpf/internal/daemon"
	"github.com/mhbpf/mhbpf/internal/daemontest"
)

// notifyMsg is one sd_notify datagram and what was in place when it came.
type notifyMsg struct {
	text   string
	state  string // the status file's state ("" if none)
	route  string // main's default route
	at     time.Duration
	status string // mhbpf status, taken right then
}

// Readiness (issue 8): the daemon sends READY=1 to $NOTIFY_SOCKET only
// once its first full pass is done: the status file says running and main's
// multipath route is in place when the message arrives. Until then the
// status says converging. STOPPING=1 comes at SIGTERM.
func TestDaemonNotifiesReadyAfterFirstPass(t *testing.T) {
	e := newDaemonEnv(t, "", "")
	sock := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	e.env = []string{"NOTIFY_SOCKET=" + sock}

	begin := time.Now()
	msgs := make(chan notifyMsg, 8)
	go func() {
		defer close(msgs)
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				return
			}
			m := notifyMsg{text: string(buf[:n]), at: time.Since(begin)}
			if st, err := daemon.LoadStatus(e.stateDir); err == nil {
				m.state = st.State
			}
			m.route = e.defaultRoute()
			m.status, _ = e.mhbpf("status")
			msgs <- m
		}
	}()
	// Every state the status file goes through, as fast as it can be read.
	var mu sync.Mutex
	var states []string
	var stateAt []time.Duration
	stop := make(chan struct{})
	polled := make(chan struct{})
	go func() {
		defer close(polled)
		last := ""
		for {
			select {
			case <-stop:
				return
			default:
			}
			if st, err := daemon.LoadStatus(e.stateDir); err == nil && st.State != last {
				last = st.State
				mu.Lock()
				states = append(states, st.State)
				stateAt = append(stateAt, time.Since(begin))
				mu.Unlock()
			}
			time.Sleep(200 * time.Microsecond)
		}
	}()

	e.start()
	var ready notifyMsg
	select {
	case ready = <-msgs:
	case <-time.After(5 * time.Second):
		t.Fatalf("no READY=1 within 5s\nlog:\n%s", e.log.String())
	}
	close(stop)
	<-polled
	if ready.text != "READY=1" {
		t.Fatalf("first notification %q, want READY=1", ready.text)
	}
	if ready.state != daemon.StateRunning || !strings.Contains(ready.route, "dev ppp0") || !strings.Contains(ready.route, "dev ppp1") {
		t.Fatalf("READY=1 came at %v with the status %q and main's route %q: before the first pass was done", ready.at, ready.state, ready.route)
	}
	if !strings.Contains(ready.status, fmt.Sprintf("daemon pid %d running,", e.cmd.Process.Pid)) {
		t.Fatalf("mhbpf status when READY=1 came:\n%s", ready.status)
	}
	logText := e.log.String()
	if i, j := strings.Index(logText, "routing converged"), strings.Index(logText, "ready: first pass done"); i < 0 || j < i {
		t.Fatalf("the log does not have the first pass before readiness:\n%s", logText)
	}
	mu.Lock()
	seen := strings.Join(states, " -> ")
	at := fmt.Sprint(stateAt)
	mu.Unlock()
	if seen != daemon.StateConverging+" -> "+daemon.StateRunning {
		t.Fatalf("the status file went %q, want converging, then running", seen)
	}
	t.Logf("READY=1 after %v; status went %s (at %s)", ready.at, seen, at)

	e.stop()
	select {
	case m, ok := <-msgs:
		if !ok || m.text != "STOPPING=1" {
			t.Fatalf("at SIGTERM: %q (%v), want STOPPING=1", m.text, ok)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no STOPPING=1 at SIGTERM")
	}
}

// 'mhbpf status' of a daemon that has not finished its first pass says so,
// and names each uplink's slot and mark.
func TestStatusSaysConverging(t *testing.T) {
	bin, dir := daemontest.Binary(t), t.TempDir()
	// A status as the daemon writes it before its first pass, of a live
	// process (this test).
	status := fmt.Sprintf(`{"updated": %q, "pid": %d, "state": "converging", "uplinks": [{"name": "isp1", "interface": "ppp0",
	  "id": 3, "mark": 65536, "table": 100, "weight": 8, "reason": "not observed yet (first pass)"}]}`, time.Now().Format(time.RFC3339Nano), os.Getpid())
	if err := os.WriteFile(filepath.Join(dir, "status.json"), []byte(status), 0o600); err != nil {
		t.Fatal(err)
	}
	b, err := exec.Command(bin, "--state-dir", dir, "--pin-dir", filepath.Join(dir, "no-pins"), "status").CombinedOutput()
	out := string(b)
	// Converging is not healthy yet: exit code 3 (degraded), for monitoring.
	if exitCode(err) != 3 || !strings.Contains(out, fmt.Sprintf("daemon pid %d converging (first pass not done yet)", os.Getpid())) || strings.Contains(out, "running") {
		t.Fatalf("status: %v\n%s", err, out)
	}
	if f := strings.Fields(daemontest.Lines(out, "isp1")); len(f) < 5 || f[1] != "ppp0" || f[2] != "3" || f[3] != "0x10000" || f[4] != "down" {
		t.Fatalf("status does not show isp1's slot and mark: %q\n%s", f, out)
	}
}
