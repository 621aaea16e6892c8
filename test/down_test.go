package test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// addForeignDefaults gives the router the default routes another program
// had before mhbpf (pppd, a DHCP client, the administrator): main's slots
// that mhbpf's weighted routes replace.
func (e *daemonEnv) addForeignDefaults(dev4 string) {
	e.t.Helper()
	gw4 := "100.64.0.1"
	if dev4 != "ppp0" {
		gw4 = "192.0.2.1"
	}
	for _, args := range [][]string{
		{"route", "add", "default", "via", gw4, "dev", dev4, "proto", "static"},
		{"-6", "route", "add", "default", "via", "2001:db8:0:1::1", "dev", "ppp0", "proto", "static"},
	} {
		if out, err := e.inRouter(append([]string{"ip"}, args...)...).CombinedOutput(); err != nil {
			e.t.Fatalf("ip %s: %v %s", strings.Join(args, " "), err, out)
		}
	}
}

func (e *daemonEnv) defaults() (string, string) {
	return e.ip("route", "show", "default"), e.ip("-6", "route", "show", "default")
}

// waitReplaced waits until mhbpf's routes hold main's default slots.
func (e *daemonEnv) waitReplaced() {
	e.t.Helper()
	e.waitFor("mhbpf's default routes in main", 3*time.Second, func() bool {
		v4, v6 := e.defaults()
		return e.mainVia("ppp0", "ppp1") && strings.Contains(v4, "proto 77") && strings.Contains(v6, "proto 77") &&
			!strings.Contains(v4, "proto static") && !strings.Contains(v6, "proto static")
	})
}

func (e *daemonEnv) checkDefaultsRestored(v4, v6, downOut string) {
	e.t.Helper()
	if g4, g6 := e.defaults(); g4 != v4 || g6 != v6 {
		e.t.Fatalf("default routes after down:\n%q\n%q\nwant (before mhbpf):\n%q\n%q\ndown said:\n%s", g4, g6, v4, v6, downOut)
	}
}

// The default routes mhbpf replaced come back with 'mhbpf down', exactly,
// also when a restarted daemon found its own in their place.
func TestDownRestoresReplacedDefaultRoutes(t *testing.T) {
	e := newDaemonEnv(t, "", "")
	e.addForeignDefaults("ppp0")
	v4, v6 := e.defaults()
	if !strings.Contains(v4, "proto static") || !strings.Contains(v6, "proto static") {
		t.Fatalf("no foreign defaults to start from: %q %q", v4, v6)
	}
	before := e.snapshot()
	e.start()
	e.waitReplaced()
	if n := strings.Count(e.log.String(), "replacing a route of another program"); n != 2 {
		t.Fatalf("the daemon recorded %d replaced routes, want 2 (IPv4, IPv6):\n%s", n, e.log.String())
	}
	// A restart finds mhbpf's own routes in the slots and records nothing.
	e.stop()
	e.start()
	e.waitReplaced()
	time.Sleep(300 * time.Millisecond)
	if strings.Contains(e.log.String(), "replacing a route of another program") {
		t.Fatalf("the restarted daemon recorded its own route:\n%s", e.log.String())
	}
	e.stop()
	out, err := e.mhbpf("down")
	if err != nil {
		t.Fatalf("down: %v\n%s", err, out)
	}
	e.checkDefaultsRestored(v4, v6, out)
	if after := e.snapshot(); after != before {
		t.Fatalf("after down:\n%s\n--- want ---\n%s", after, before)
	}
	if !strings.Contains(out, "restored the route mhbpf replaced") {
		t.Errorf("down does not say what it restored:\n%s", out)
	}
	t.Logf("down:\n%s", out)
}

// kill -9, then 'mhbpf down': the replaced default routes come back.
func TestDownAfterCrashRestoresReplacedRoutes(t *testing.T) {
	e := newDaemonEnv(t, "", "")
	e.addForeignDefaults("ppp0")
	v4, v6 := e.defaults()
	before := e.snapshot()
	e.start()
	e.waitReplaced()
	e.kill9()
	for i := 0; i < 2; i++ { // idempotent
		out, err := e.mhbpf("down")
		if err != nil {
			t.Fatalf("down %d: %v\n%s", i+1, err, out)
		}
		e.checkDefaultsRestored(v4, v6, out)
		if after := e.snapshot(); after != before {
			t.Fatalf("after down %d:\n%s\n--- want ---\n%s", i+1, after, before)
		}
	}
}

// The device of a replaced route is gone by the time of 'mhbpf down': it
// says so, restores the rest, and succeeds.
func TestDownReportsReplacedRouteOfVanishedDevice(t *testing.T) {
	e := newDaemonEnv(t, "", "")
	for _, args := range [][]string{
		{"ip", "link", "add", "wan9", "type", "veth", "peer", "name", "wan9p"},
		{"ip", "addr", "add", "192.0.2.2/24", "dev", "wan9"},
		{"ip", "link", "set", "wan9", "up"}, {"ip", "link", "set", "wan9p", "up"},
	} {
		if out, err := e.inRouter(args...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v %s", strings.Join(args, " "), err, out)
		}
	}
	e.addForeignDefaults("wan9")
	_, v6 := e.defaults()
	e.start()
	e.waitReplaced()
	e.kill9()
	if out, err := e.inRouter("ip", "link", "del", "wan9").CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	out, err := e.mhbpf("down")
	if err != nil {
		t.Fatalf("down: %v\n%s", err, out)
	}
	if !strings.Contains(out, "no longer exists") || !strings.Contains(out, "device=wan9") || !strings.Contains(out, "192.0.2.1") {
		t.Fatalf("down does not say which route it could not restore:\n%s", out)
	}
	e.checkDefaultsRestored("", v6, out)
	t.Logf("down:\n%s", out)
}

// 'mhbpf down' while the daemon runs refuses, names the daemon, and
// changes nothing; 'mhbpf down --stop' stops it and removes everything.
func TestDownRefusedWhileDaemonRuns(t *testing.T) {
	e := newDaemonEnv(t, "masquerade = true", "")
	pristine := e.snapshot()
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	before := e.snapshot()
	out, err := e.mhbpf("down")
	want := fmt.Sprintf("a daemon (pid %d) is running with state directory %s; stop it first or use --stop", e.cmd.Process.Pid, e.stateDir)
	if err == nil || !strings.Contains(out, want) {
		t.Fatalf("down with a running daemon: %v\n%s\nwant %q", err, out, want)
	}
	if after := e.snapshot(); after != before {
		t.Fatalf("a refused down changed the state:\n%s\n--- before ---\n%s", after, before)
	}
	for _, f := range []string{"settings.json", "sysctls.json", "status.json"} {
		if _, err := os.Stat(filepath.Join(e.stateDir, f)); err != nil {
			t.Errorf("a refused down removed %s: %v", f, err)
		}
	}

	// A daemon that does not exit in time: down --stop gives up, says so,
	// and changes nothing.
	if err := e.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	out, err = e.mhbpf("down", "--stop", "--stop-timeout", "500ms")
	_ = e.cmd.Process.Signal(syscall.SIGCONT) // the pending SIGTERM ends it now
	if err == nil || !strings.Contains(out, fmt.Sprintf("the daemon (pid %d) did not stop within 500ms", e.cmd.Process.Pid)) {
		t.Fatalf("down --stop with a stuck daemon: %v\n%s", err, out)
	}
	if after := e.snapshot(); after != before {
		t.Fatalf("a down --stop that timed out changed the state:\n%s\n--- before ---\n%s", after, before)
	}

	out, err = e.mhbpf("down", "--stop")
	if err != nil {
		t.Fatalf("down --stop: %v\n%s", err, out)
	}
	done := make(chan error, 1)
	go func() { done <- e.cmd.Wait() }()
	select {
	case err := <-done:
		t.Logf("daemon exited: %v", err)
	case <-time.After(2 * time.Second):
		t.Fatal("the daemon still runs after down --stop")
	}
	e.cmd = nil
	if !strings.Contains(e.log.String(), "exiting") {
		t.Errorf("the daemon did not exit by SIGTERM:\n%s", e.log.String())
	}
	e.checkNothingOfMhbpf()
	if after := e.snapshot(); after != pristine {
		t.Fatalf("after down --stop:\n%s\n--- want ---\n%s", after, pristine)
	}
}

// checkNothingOfMhbpf: no rule or route of protocol 77, no nftables table,
// no pins, no tc program.
func (e *daemonEnv) checkNothingOfMhbpf() {
	e.t.Helper()
	for _, args := range [][]string{{"rule"}, {"-6", "rule"}, {"route", "show", "table", "all"}, {"-6", "route", "show", "table", "all"}} {
		if out := e.ip(args...); strings.Contains(out, "proto 77") {
			e.t.Errorf("ip %s: mhbpf's left:\n%s", strings.Join(args, " "), out)
		}
	}
	if out, err := e.inRouter("nft", "list", "table", "inet", "mhbpf").CombinedOutput(); err == nil {
		e.t.Errorf("nftables table inet mhbpf left:\n%s", out)
	}
	for _, dev := range []string{"ppp0", "ppp1", "eth2"} {
		if out, _ := e.inRouter("tc", "filter", "show", "dev", dev, "ingress").CombinedOutput(); strings.TrimSpace(string(out)) != "" {
			e.t.Errorf("tc filter on %s left: %s", dev, out)
		}
	}
	if _, err := os.Stat(e.pinDir); err == nil {
		e.t.Errorf("pin directory %s left", e.pinDir)
	}
}

// withoutSysctls: a snapshot without the sysctls (their saved values go
// with the state directory).
func withoutSysctls(s string) string {
	i, j := strings.Index(s, "$ sysctl"), strings.Index(s, "pins:")
	if i < 0 || j < i {
		return s
	}
	return s[:i] + s[j:]
}

// kill -9, the state directory deleted, an install with another
// rule_priority than the default: 'mhbpf down' still finds and removes
// every rule, route, the nftables table and the pins.
func TestDownWithoutStateDirAfterCrash(t *testing.T) {
	e := newDaemonEnv(t, "masquerade = true", "")
	cfg, _ := os.ReadFile(e.cfgPath)
	e.writeConfig(strings.Replace(string(cfg), "[global]\n", "[global]\nrule_priority = 20000\n", 1))
	before := e.snapshot()
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	if rules := e.ip("rule"); !strings.Contains(rules, "20060:\tfrom all fwmark 0x10000/0x10000 lookup 100 proto 77") {
		t.Fatalf("no rules at rule_priority 20000:\n%s", rules)
	}
	if out, _ := e.inRouter("nft", "list", "table", "inet", "mhbpf").CombinedOutput(); !strings.Contains(string(out), "masquerade") {
		t.Fatalf("no masquerade table: %s", out)
	}
	e.kill9()
	if err := os.RemoveAll(e.stateDir); err != nil {
		t.Fatal(err)
	}
	out, err := e.mhbpf("down")
	if err != nil {
		t.Fatalf("down without a state directory: %v\n%s", err, out)
	}
	e.checkNothingOfMhbpf()
	if after := e.snapshot(); withoutSysctls(after) != withoutSysctls(before) {
		t.Fatalf("after down:\n%s\n--- want ---\n%s", after, before)
	}
	if _, err := os.Stat(e.stateDir); err == nil {
		t.Errorf("down created the state directory")
	}
}
