package test

import (
	"strings"
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
