package test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/mhbpf/mhbpf/internal/topology"
)

// probeConfig is an [uplink.health] table probing targets by ICMP.
func probeConfig(targets []string, interval, timeout time.Duration, failures, successes int) string {
	quoted := make([]string, len(targets))
	for i, t := range targets {
		quoted[i] = fmt.Sprintf("%q", t)
	}
	return fmt.Sprintf(`
  [uplink.health]
  targets = [%s]
  interval = %q
  timeout = %q
  failures = %d
  successes = %d`, strings.Join(quoted, ", "), interval, timeout, failures, successes)
}

// nft runs an nftables script in namespace ns (the test's own tables,
// gone with the namespace).
func (e *daemonEnv) nft(ns, script string) {
	e.t.Helper()
	cmd := e.topo.Exec(ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		e.t.Fatalf("nft in %s: %v\n%s\n%s", ns, err, script, out)
	}
}

// silence makes namespace ns drop everything that arrives on its link to
// the router (the provider stops forwarding; the link stays up), or lifts
// that again.
func (e *daemonEnv) silence(ns string, on bool) {
	e.t.Helper()
	if on {
		e.nft(ns, "table inet mhbpftest-silent {\n chain pre {\n  type filter hook prerouting priority -300; policy accept;\n  iifname \"wan\" drop\n }\n}\n")
	} else {
		e.nft(ns, "delete table inet mhbpftest-silent\n")
	}
}

// The requirement: a silently dead uplink is out of main's route within
// interval × failures + timeout of the moment it went silent. That is the
// probes' own worst case: the first request the provider drops leaves up
// to one interval after the event, the failures-th one (failures-1)
// intervals later, and it fails after timeout. The margin (300 ms) is for
// what is not the probes' doing and is not proportional to their
// settings: scheduling of the prober and the daemon's goroutine, the pass
// that replaces main's route (a few ms), and this test's polling (10 ms
// plus an exec of ip) — on a busy machine, a few tens of ms each.
// Measured from the moment the drop rule is in place, five times at
// different phases of the probe schedule.
func TestProbeDetectionTime(t *testing.T) {
	const interval, timeout, failures = 200 * time.Millisecond, 200 * time.Millisecond, 3
	const margin = 300 * time.Millisecond
	limit := interval*failures + timeout + margin
	// Two targets, as a real configuration has: both go silent together.
	second := "198.51.100.53"
	e := newDaemonEnv(t, probeConfig([]string{topology.Internet.String(), second}, interval, timeout, failures, 2), "")
	if err := e.topo.IP(e.topo.ISP1, "addr", "add", second+"/32", "dev", "lo"); err != nil {
		t.Fatal(err)
	}
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	var worst time.Duration
	for i := 0; i < 5; i++ {
		// Let the probes settle into their rhythm, at a different phase
		// each time.
		time.Sleep(time.Second + time.Duration(i)*37*time.Millisecond)
		e.silence(e.topo.ISP1, true)
		start := time.Now()
		took := e.waitFor("isp1 out of main after it went silent", 5*time.Second, func() bool { return e.mainVia("ppp1") })
		took = time.Since(start) // from the event, not from the first poll
		t.Logf("round %d: silent failure detected after %v (limit %v)", i+1, took.Round(time.Millisecond), limit)
		worst = max(worst, took)
		e.silence(e.topo.ISP1, false)
		e.waitFor("isp1 back", 5*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	}
	if worst > limit {
		t.Fatalf("silent failure detected after %v at worst, want at most %v (interval %v × failures %d + timeout %v + margin %v)",
			worst, limit, interval, failures, timeout, margin)
	}
}
