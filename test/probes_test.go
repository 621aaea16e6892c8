package test

import (
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"

	"github.com/mhbpf/mhbpf/internal/daemon"
	"github.com/mhbpf/mhbpf/internal/testutil"
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

// deafTarget makes namespace ns drop the echo requests to target (the
// probe target stops answering; everything else still works), or lifts
// that again.
func (e *daemonEnv) deafTarget(ns, target string, on bool) {
	e.t.Helper()
	if on {
		e.nft(ns, fmt.Sprintf("table inet mhbpftest-deaf {\n chain in {\n  type filter hook input priority 0; policy accept;\n  ip daddr %s icmp type echo-request drop\n }\n}\n", target))
	} else {
		e.nft(ns, "delete table inet mhbpftest-deaf\n")
	}
}

// uplinkStatus is what the daemon last wrote about uplink name.
func (e *daemonEnv) uplinkStatus(name string) daemon.UplinkStatus {
	e.t.Helper()
	st, err := daemon.LoadStatus(e.stateDir)
	if err != nil {
		e.t.Fatalf("status: %v", err)
	}
	for _, u := range st.Uplinks {
		if u.Name == name {
			return u
		}
	}
	e.t.Fatalf("no uplink %s in the status: %+v", name, st)
	return daemon.UplinkStatus{}
}

// probeISP2 adds an [uplink.health] table to isp2 in the configuration.
func (e *daemonEnv) probeISP2(health string) {
	e.t.Helper()
	cfg, err := os.ReadFile(e.cfgPath)
	if err != nil {
		e.t.Fatal(err)
	}
	if !strings.Contains(string(cfg), "weight = 2\n") {
		e.t.Fatalf("no isp2 in the configuration:\n%s", cfg)
	}
	e.writeConfig(strings.Replace(string(cfg), "weight = 2\n", "weight = 2\n"+health+"\n", 1))
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
	// The probes start once the first pass made the uplink's table: none
	// is lost to a route that does not exist yet.
	time.Sleep(3 * interval)
	if u := e.uplinkStatus("isp1"); u.Loss != 0 {
		t.Fatalf("isp1 lost %.0f%% of its first probe rounds on a working uplink: %+v", 100*u.Loss, u)
	}
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

// An uplink whose probe target never answers is never used, from the first
// pass on: first "waiting for the first probe verdict", then "probes
// failing". The unprobed isp2 carries everything meanwhile.
func TestProbeFirstVerdictGating(t *testing.T) {
	const interval, timeout, failures = 500 * time.Millisecond, 400 * time.Millisecond, 3
	e := newDaemonEnv(t, probeConfig([]string{"192.0.2.99"}, interval, timeout, failures, 2), "") // nobody has it
	e.start()
	// The first pass ran before any probe could time out: the first
	// verdict is failures rounds away (about 1.4 s).
	if u := e.uplinkStatus("isp1"); u.Usable || !strings.Contains(u.Reason, "waiting for the first probe verdict") {
		t.Fatalf("isp1 at the first pass: usable %v, reason %q; want unused, waiting for the first probe verdict", u.Usable, u.Reason)
	}
	out, _ := e.mhbpf("status")
	if !strings.Contains(out, "waiting for the first probe verdict") {
		t.Fatalf("mhbpf status does not say why isp1 is unused:\n%s", out)
	}
	t.Logf("before the verdict:\n%s", out)
	sawISP2 := false
	neverPPP0 := func() {
		r := e.defaultRoute()
		if strings.Contains(r, "ppp0") {
			t.Fatalf("main's route uses isp1, whose probes never answered: %q\nlog:\n%s", r, e.log.String())
		}
		sawISP2 = sawISP2 || e.mainVia("ppp1")
	}
	e.waitFor("the verdict: probes failing", 5*time.Second, func() bool {
		neverPPP0()
		return strings.Contains(e.uplinkStatus("isp1").Reason, "probes failing")
	})
	for end := time.Now().Add(time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		neverPPP0()
	}
	if !sawISP2 {
		t.Fatalf("main never routed by isp2 alone: %q", e.defaultRoute())
	}
	if u := e.uplinkStatus("isp1"); u.Usable {
		t.Fatalf("isp1 usable after its probes failed: %+v", u)
	}
}

// Both uplinks probe the same target, which stops answering: the probes
// would take the LAN offline, so link state decides; when isp2's probes
// answer again, isp1 (still failing) is taken out.
func TestProbeAllFailingFallsBackToLinkState(t *testing.T) {
	const interval, timeout = 200 * time.Millisecond, 150 * time.Millisecond
	target := topology.Internet.String() // in both ISPs: "one shared target"
	e := newDaemonEnv(t, probeConfig([]string{target}, interval, timeout, 3, 2), "")
	e.probeISP2(probeConfig([]string{target}, interval, timeout, 3, 2))
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })

	e.deafTarget(e.topo.ISP1, target, true)
	e.deafTarget(e.topo.ISP2, target, true)
	const fallback = "all probed uplinks failing at once: using link state"
	e.waitFor("both uplinks by link state", 5*time.Second, func() bool {
		if e.mainVia() {
			t.Fatalf("main lost its default route: the probes took the LAN offline\nlog:\n%s", e.log.String())
		}
		return e.mainVia("ppp0", "ppp1") && strings.Contains(e.uplinkStatus("isp1").Reason, fallback) &&
			strings.Contains(e.uplinkStatus("isp2").Reason, fallback)
	})
	// It stays so: the probes keep failing, main keeps both.
	for end := time.Now().Add(time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if !e.mainVia("ppp0", "ppp1") {
			t.Fatalf("main left link state while every probe fails: %q", e.defaultRoute())
		}
	}
	out, _ := e.mhbpf("status")
	if strings.Count(out, fallback) < 3 { // the headline and both uplinks
		t.Fatalf("mhbpf status does not say so:\n%s", out)
	}
	t.Logf("while all fail:\n%s", out)

	e.deafTarget(e.topo.ISP2, target, false)
	// The status file is written at the end of the pass that changed the
	// route: wait for both.
	e.waitFor("isp1 out again once isp2 answers", 3*time.Second, func() bool {
		return e.mainVia("ppp1") && !e.uplinkStatus("isp1").Usable && e.uplinkStatus("isp2").Reason == ""
	})
	if u := e.uplinkStatus("isp1"); u.Usable || !strings.Contains(u.Reason, "probes failing") {
		t.Fatalf("isp1 after isp2 recovered: %+v", u)
	}
	if u := e.uplinkStatus("isp2"); !u.Usable || u.Reason != "" {
		t.Fatalf("isp2 after it recovered: %+v", u)
	}
	if !strings.Contains(e.log.String(), fallback) {
		t.Fatalf("the fallback is not in the log:\n%s", e.log.String())
	}
}

// A probe target that does not answer, and something in the provider's
// network that sees every echo request to it and answers each with forged
// replies: the request's identifier and sequence with another payload,
// and the request's payload and sequence with another identifier. Neither
// is an answer: the uplink goes down as if nothing came back.
func TestProbeSpoofedRepliesDoNotKeepUplinkUp(t *testing.T) {
	const interval, timeout, failures = 200 * time.Millisecond, 150 * time.Millisecond, 3
	limit := interval*failures + timeout + 300*time.Millisecond // as TestProbeDetectionTime
	target := topology.Internet.String()
	e := newDaemonEnv(t, probeConfig([]string{target}, interval, timeout, failures, 2), "")
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })

	// The socket is made inside isp1's namespace and stays there.
	var conn *icmp.PacketConn
	var err error
	testutil.InNetNS(t, e.topo.ISP1, func() { conn, err = icmp.ListenPacket("ip4:icmp", target) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	var forged atomic.Int64
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := conn.ReadFrom(buf)
			if err != nil {
				return // closed
			}
			m, err := icmp.ParseMessage(1, buf[:n])
			if err != nil || m.Type != ipv4.ICMPTypeEcho {
				continue
			}
			req, ok := m.Body.(*icmp.Echo)
			if !ok {
				continue
			}
			other := append([]byte{}, req.Data...)
			if len(other) == 0 {
				other = []byte{0}
			}
			other[len(other)-1] ^= 0xff
			for _, body := range []*icmp.Echo{
				{ID: req.ID, Seq: req.Seq, Data: other},
				{ID: req.ID ^ 0x5a5a, Seq: req.Seq, Data: req.Data},
			} {
				b, err := (&icmp.Message{Type: ipv4.ICMPTypeEchoReply, Body: body}).Marshal(nil)
				if err == nil {
					if _, err := conn.WriteTo(b, from); err == nil {
						forged.Add(1)
					}
				}
			}
		}
	}()
	// The target itself stops answering (the forger still sees the requests).
	if out, err := e.topo.Exec(e.topo.ISP1, "sysctl", "-qw", "net.ipv4.icmp_echo_ignore_all=1").CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	start := time.Now()
	e.waitFor("isp1 out while only forged replies come back", limit, func() bool {
		return e.mainVia("ppp1") && !e.uplinkStatus("isp1").Usable // the status follows the route in the same pass
	})
	t.Logf("isp1 out after %v, %d forged replies sent", time.Since(start).Round(time.Millisecond), forged.Load())
	if forged.Load() < 2*failures {
		t.Fatalf("only %d forged replies were sent: the test proves nothing", forged.Load())
	}
	if u := e.uplinkStatus("isp1"); u.Usable || !strings.Contains(u.Reason, "probes failing") {
		t.Fatalf("isp1: %+v", u)
	}
}

// startAgain starts the daemon when an earlier one left its status: it
// returns once the new one has written its first.
func (e *daemonEnv) startAgain() {
	e.t.Helper()
	e.start()
	e.waitFor("the new daemon's first pass", 10*time.Second, func() bool {
		st, err := daemon.LoadStatus(e.stateDir)
		return err == nil && st.PID == e.cmd.Process.Pid
	})
}

// A restart keeps what the datapath was doing until the first verdict: an
// uplink in use stays in use, one that was out stays out.
func TestProbeRestartKeepsStateUntilFirstVerdict(t *testing.T) {
	const interval, timeout = 500 * time.Millisecond, 400 * time.Millisecond // a verdict of failures takes ~1.4 s
	target := topology.Internet.String()
	e := newDaemonEnv(t, probeConfig([]string{target}, interval, timeout, 3, 2), "")
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	failing := func() bool { return strings.Contains(e.uplinkStatus("isp1").Reason, "probes failing") }

	e.stop()
	e.deafTarget(e.topo.ISP1, target, true) // the next verdict takes 3 rounds
	e.startAgain()
	if u := e.uplinkStatus("isp1"); !u.Usable || !strings.Contains(u.Reason, "in use before the restart; waiting for the first probe verdict") {
		t.Fatalf("isp1 right after the restart: usable %v, reason %q; want kept in use until the first verdict", u.Usable, u.Reason)
	}
	took := e.waitFor("the first verdict after the restart", 5*time.Second, func() bool {
		if failing() {
			return true
		}
		if !e.mainVia("ppp0", "ppp1") {
			time.Sleep(50 * time.Millisecond) // the route changes just before the status is written
			if !failing() {
				t.Fatalf("isp1 left main before its first verdict: %q\nlog:\n%s", e.defaultRoute(), e.log.String())
			}
		}
		return false
	})
	t.Logf("isp1 kept in use for %v after the restart, until its probes had failed 3 times", took)
	e.waitFor("isp1 out", time.Second, func() bool { return e.mainVia("ppp1") })

	// Restarted while isp1 is out: it stays out until it answers.
	e.stop()
	e.startAgain()
	if u := e.uplinkStatus("isp1"); u.Usable || !strings.Contains(u.Reason, "waiting for the first probe verdict") || strings.Contains(u.Reason, "restart") {
		t.Fatalf("isp1 right after a restart while it was out: usable %v, reason %q", u.Usable, u.Reason)
	}
	e.waitFor("the first verdict", 5*time.Second, func() bool {
		if strings.Contains(e.defaultRoute(), "ppp0") {
			t.Fatalf("isp1, out before the restart, used before any verdict: %q", e.defaultRoute())
		}
		return failing()
	})
	e.deafTarget(e.topo.ISP1, target, false)
	e.waitFor("isp1 back once it answers", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
}

// reloadWith rewrites the configuration with isp1Extra in isp1's table and
// has the daemon reload it.
func (e *daemonEnv) reloadWith(isp1Extra string) {
	e.t.Helper()
	n := strings.Count(e.log.String(), "configuration reloaded")
	e.writeConfig(fmt.Sprintf(daemonConfig, e.pinDir, e.stateDir, e.cgroup, isp1Extra, ""))
	if err := e.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		e.t.Fatal(err)
	}
	e.waitFor("the reload", 3*time.Second, func() bool { return strings.Count(e.log.String(), "configuration reloaded") > n })
}

// A reload that changes an uplink's health check waits for the new
// check's first verdict; one that leaves it as it was keeps its verdict.
func TestProbeReloadKeepsOrRestartsVerdicts(t *testing.T) {
	live := probeConfig([]string{topology.Internet.String()}, 200*time.Millisecond, 150*time.Millisecond, 3, 2)
	dead := probeConfig([]string{"192.0.2.99"}, 500*time.Millisecond, 400*time.Millisecond, 3, 2) // nobody has it
	e := newDaemonEnv(t, live, "")
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })

	// A new check: isp1 is out at once, waiting (not after 3 failures).
	e.reloadWith(dead)
	took := e.waitFor("isp1 out, waiting for the new check's verdict", 300*time.Millisecond, func() bool {
		return e.mainVia("ppp1") && strings.Contains(e.uplinkStatus("isp1").Reason, "waiting for the first probe verdict")
	})
	t.Logf("isp1 out %v after the reload that changed its check", took)
	e.waitFor("the verdict", 5*time.Second, func() bool { return strings.Contains(e.uplinkStatus("isp1").Reason, "probes failing") })

	// The same check again (the file is rewritten, nothing changes): the
	// verdict stands, isp1 stays out.
	e.reloadWith(dead)
	for end := time.Now().Add(time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if u := e.uplinkStatus("isp1"); u.Usable || !strings.Contains(u.Reason, "probes failing") || strings.Contains(e.defaultRoute(), "ppp0") {
			t.Fatalf("after a reload that kept isp1's check: %+v, main %q", u, e.defaultRoute())
		}
	}

	// Back to a target that answers: in use after its first answer.
	reloaded := time.Now()
	e.reloadWith(live)
	e.waitFrom(reloaded, "isp1 back", time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
}

// A probe result that changes no verdict changes nothing in the kernel: it
// updates the status (RTT, loss) without a pass, so a box with many probed
// uplinks does not read its whole routing state at every probe. Passes
// come from events, verdicts, resync_every (2 s in these tests) and, while
// probes run, at most one a second (what no event announces is put back
// as soon as before); the status stays as fresh as the probes.
func TestSteadyProbesUpdateOnlyTheStatus(t *testing.T) {
	const interval = 200 * time.Millisecond
	e := newDaemonEnv(t, probeConfig([]string{topology.Internet.String()}, interval, interval, 3, 1), "")
	e.probeISP2(probeConfig([]string{topology.Internet.String()}, interval, interval, 3, 1))
	e.start()
	e.waitFor("both uplinks judged healthy", 3*time.Second, func() bool {
		return e.uplinkStatus("isp1").Usable && e.uplinkStatus("isp2").Usable
	})
	time.Sleep(500 * time.Millisecond) // the passes of the verdicts are done
	status := func() daemon.Status {
		st, err := daemon.LoadStatus(e.stateDir)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	before := status()
	const window = 4 * time.Second
	var stalest time.Duration
	for end := time.Now().Add(window); time.Now().Before(end); time.Sleep(90 * time.Millisecond) {
		stalest = max(stalest, time.Since(status().Updated))
	}
	after := status()
	results := int(2 * window / interval)
	passes := after.Passes - before.Passes
	t.Logf("%d probe results in %v: %d passes; the status at most %v old", results, window, passes, stalest.Round(time.Millisecond))
	// One a second and two or three resyncs; a pass per result would be
	// about 40.
	if passes > 7 {
		t.Fatalf("%d passes in %v of steady probes (about %d results), want one a second and the resyncs (at most 7)\n%s",
			passes, window, results, e.log.String())
	}
	// Without status updates between passes it would be up to 2 s old.
	if stalest > 3*interval {
		t.Fatalf("the status was %v old at worst, want at most %v (it follows each probe result)", stalest, 3*interval)
	}
	if u := e.uplinkStatus("isp1"); u.RTTms <= 0 || !u.Probed {
		t.Fatalf("isp1's status has no probe figures: %+v", u)
	}
}
