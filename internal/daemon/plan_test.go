package daemon

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/mhbpf/mhbpf/internal/health"
	"github.com/mhbpf/mhbpf/internal/routing"
)

// Golden tests of the plan: each step changes the fake world, runs a real
// pass (plan + apply on the fake OS) and records the uplinks' states, each
// change apply made and the log; "|" lines are the fake's whole routing
// state as `ip rule` / `ip route` print it. A change of behaviour shows as
// a diff of testdata/*.golden (rewrite with -update and review it).

const twoUplinks = `
[global]
up_delay = "300ms"

[[uplink]]
name = "isp1"
interface = "ppp0"
gateway = "100.64.0.1"
weight = 8
masquerade = true
%s

[[uplink]]
name = "isp2"
interface = "ppp1"
gateway = "100.64.1.1"
weight = 2
masquerade = true
%s

[lan]
interfaces = ["eth2"]
bypass = ["198.51.100.0/24"]
`

const probed = `
  [uplink.health]
  method = "icmp"
  targets = ["203.0.113.53"]
  interval = "200ms"
  timeout = "200ms"
  failures = 3
  successes = 2
`

func cfgText(isp1, isp2 string) string {
	return strings.Replace(strings.Replace(twoUplinks, "%s", isp1, 1), "%s", isp2, 1)
}

// both up, as the next tests start.
func startBoth(t *testing.T, isp1, isp2 string) *harness {
	h := newHarness(t, cfgText(isp1, isp2))
	h.link("ppp0", 2, true, "100.64.0.2/24")
	h.link("ppp1", 3, true, "100.64.1.2/24")
	h.link("eth2", 4, true, "100.64.2.1/24")
	return h
}

func TestPlanUplinkDownAndBack(t *testing.T) {
	h := startBoth(t, "", "")
	h.pass("start: both links up")
	h.routes()
	h.advance(time.Second)
	h.link("ppp0", 2, false)
	p := h.pass("isp1's link goes down: out of main, its flows and connections forgotten")
	if len(p.Down) != 1 || p.Down[0].Ref.Name != "isp1" || len(p.Down[0].Addrs) != 1 {
		t.Fatalf("down: %+v; want isp1 with its last address", p.Down)
	}
	h.routes()
	h.advance(100 * time.Millisecond)
	h.link("ppp0", 2, true, "100.64.0.2/24")
	if p := h.pass("isp1's link is back: held for up_delay"); p.Wake != 300*time.Millisecond {
		t.Fatalf("wake in %v, want up_delay (300ms)", p.Wake)
	}
	h.advance(300 * time.Millisecond)
	h.pass("up_delay over: isp1 back in main")
	h.routes()
	h.advance(time.Second)
	h.pass("nothing changed: nothing done")
	if len(h.ops) != 0 {
		t.Fatalf("a pass over an unchanged world changed %q", h.ops)
	}
	h.golden("down_and_back")
}

func TestPlanAddressChange(t *testing.T) {
	h := startBoth(t, "", "")
	h.pass("start")
	h.advance(time.Second)
	h.link("ppp0", 2, true, "100.64.0.9/24")
	h.pass("isp1's address changes: its from rule and map entry follow, nothing goes down")
	h.routes()
	h.advance(time.Second)
	h.link("ppp0", 2, true)
	h.pass("isp1 loses its address: out, like a link down")
	h.routes()
	h.golden("address_change")
}

func TestPlanFlapping(t *testing.T) {
	h := startBoth(t, "", "")
	h.pass("start")
	for i, step := range []struct {
		up    bool
		after time.Duration
		title string
	}{
		{false, time.Second, "isp1 down"},
		{true, 100 * time.Millisecond, "isp1 up: held"},
		{false, 100 * time.Millisecond, "isp1 down again within the hold: nothing to forget, it was not used"},
		{true, 100 * time.Millisecond, "isp1 up: held from now"},
		{true, 200 * time.Millisecond, "still held (200ms of 300ms)"},
		{true, 100 * time.Millisecond, "held out: in use"},
	} {
		h.advance(step.after)
		if step.up {
			h.link("ppp0", 2, true, "100.64.0.2/24")
		} else {
			h.link("ppp0", 2, false)
		}
		p := h.pass(step.title)
		if i == 2 && len(p.Down) != 0 {
			t.Fatalf("an uplink held back went down again: its flows forgotten again: %+v", p.Down)
		}
	}
	h.routes()
	h.golden("flapping")
}

func TestPlanProbes(t *testing.T) {
	h := startBoth(t, probed, probed)
	h.pass("start: links up, no verdict yet: not used")
	h.routes()
	ok := health.Result{Verdict: true, Healthy: true, RTT: 12 * time.Millisecond}
	failing := health.Result{Verdict: true, Fails: 3, Reason: "3 rounds without an answer", Loss: 0.15}
	h.os.probes[0] = ok
	h.pass("isp1's first answer: in use (no successes wait at start)")
	h.os.probes[1] = ok
	h.pass("isp2 answers too")
	h.routes()
	h.advance(time.Second)
	h.os.probes[0] = failing
	h.pass("isp1's probes fail: out of main, its table kept (the probes leave by it)")
	h.routes()
	h.os.probes[1] = failing
	if p := h.pass("isp2's fail too: every probed uplink failing at once: link state decides"); !p.Status.ProbeFallback {
		t.Fatal("no probe fallback with every probed uplink failing")
	}
	h.routes()
	h.os.probes[1] = ok
	h.pass("isp2 answers again: the probes decide again, isp1 stays out")
	h.routes()
	h.golden("probes")
}

func TestPlanAllDown(t *testing.T) {
	h := startBoth(t, "", "")
	h.pass("start")
	h.advance(time.Second)
	h.link("ppp0", 2, false)
	h.link("ppp1", 3, false)
	h.pass("both links down: main has no default route of mhbpf's, the rules stay")
	h.routes()
	h.advance(time.Second)
	h.link("ppp1", 3, true, "100.64.1.2/24")
	h.pass("isp2 back: held")
	h.advance(300 * time.Millisecond)
	h.pass("isp2 in use alone")
	h.routes()
	h.golden("all_down")
}

// reload as Daemon.reload does it, less the BPF maps: identities by name,
// the memory of removed slots forgotten, attachments of removed
// interfaces dropped.
func (h *harness) reload(text string) {
	h.t.Helper()
	prev := h.cfg
	cfg := parseConfig(h.t, text)
	if _, err := cfg.AssignIdentities(prev.Identities()); err != nil {
		h.t.Fatal(err)
	}
	keep := map[int]bool{}
	for _, u := range cfg.Uplinks {
		keep[u.ID] = true
	}
	for _, u := range prev.Uplinks {
		if !keep[u.ID] {
			delete(h.mem.Uplinks, u.ID)
			h.os.op("uplinks[%d] cleared (applyStatic)", u.ID)
		}
	}
	h.cfg = cfg
	forgetRemoved(h.ap.attached, prev, cfg, func(ifname string) { h.os.op("detach %s", ifname) })
}

const threeUplinks = `
[global]
up_delay = "300ms"
%s
[lan]
interfaces = ["eth2"]
`

func uplinkText(name, ifname, gw string, weight int) string {
	s := "\n[[uplink]]\nname = \"" + name + "\"\ninterface = \"" + ifname + "\"\n"
	if gw != "" {
		s += "gateway = \"" + gw + "\"\n"
	}
	return s + "weight = " + string(rune('0'+weight)) + "\n"
}

func TestPlanReload(t *testing.T) {
	isp1 := uplinkText("isp1", "ppp0", "100.64.0.1", 8)
	isp2 := uplinkText("isp2", "ppp1", "100.64.1.1", 2)
	vpn := uplinkText("vpn", "tun0", "", 1)
	h := newHarness(t, strings.Replace(threeUplinks, "%s", isp1+isp2, 1))
	h.link("ppp0", 2, true, "100.64.0.2/24")
	h.link("ppp1", 3, true, "100.64.1.2/24")
	h.link("tun0", 5, true, "100.100.0.2/30")
	h.link("eth2", 4, true, "100.64.2.1/24")
	h.pass("start: isp1, isp2")
	h.routes()
	h.advance(time.Second)
	h.reload(strings.Replace(threeUplinks, "%s", vpn+isp1+isp2, 1))
	h.pass("reload adds vpn first: a new slot (2), rules at position 0; isp1 and isp2 keep slots, move down one")
	h.routes()
	h.advance(time.Second)
	h.reload(strings.Replace(threeUplinks, "%s", vpn+isp2, 1))
	h.pass("reload removes isp1: its rules and table go, no other slot moves")
	h.routes()
	h.advance(time.Second)
	h.reload(strings.Replace(threeUplinks, "%s", isp2+vpn, 1))
	h.pass("reload reorders: only rule priorities move")
	h.routes()
	if got := h.cfg.Uplinks[0]; got.Name != "isp2" || got.ID != 1 {
		t.Fatalf("after the reorder the first uplink is %s in slot %d, want isp2 in slot 1", got.Name, got.ID)
	}
	h.golden("reload")
}

// Another program deletes main's default route after every pass: three
// repairs, then a conflict logged once and the repair held back, with a
// doubling backoff. A failover meanwhile (a different route) is not held.
func TestPlanConflict(t *testing.T) {
	h := startBoth(t, "", "")
	h.os.holder = "route of proto bird dev ppp1"
	h.pass("start")
	mainSlot := "f2 t254 default"
	conflicts := 0
	for i := range 5 {
		h.advance(50 * time.Millisecond)
		delete(h.os.routes, mainSlot)
		p := h.pass("someone deletes main's default route")
		conflicts += len(p.Conflicts)
		_, back := h.os.routes[mainSlot]
		if i < 2 && !back || i >= 3 && back {
			t.Fatalf("repair %d: main's route back: %v", i+1, back)
		}
	}
	if conflicts != 1 || strings.Count(h.out.String(), "conflict: a repair keeps being undone") != 1 {
		t.Fatalf("%d conflicts reported, want 1:\n%s", conflicts, h.out.String())
	}
	h.link("ppp0", 2, false)
	h.pass("isp1 fails during the backoff: main via isp2 at once (not a repair)")
	if r, ok := h.os.routes[mainSlot]; !ok || r.LinkIndex != 3 {
		t.Fatalf("main's route after the failover during a conflict: %v, %v", r, ok)
	}
	h.routes()
	h.golden("conflict")
}

func TestPlanRepairsDrift(t *testing.T) {
	h := startBoth(t, "", "")
	h.pass("start")
	h.advance(time.Second)
	h.os.nat = nil
	h.os.tcGone["ppp1"] = "tcx ingress"
	h.os.cgGone = []string{"connect4"}
	h.pass("nft flush ruleset, a detached tcx link and socket hook: all put back")
	h.advance(time.Second)
	h.pass("all in place: nothing done")
	if len(h.ops) != 0 {
		t.Fatalf("after the repairs: %q", h.ops)
	}
	h.golden("drift")
}

// plan changes nothing it is given: the same inputs give the same plan.
func TestPlanIsPure(t *testing.T) {
	h := startBoth(t, probed, "")
	h.pass("start")
	h.link("ppp1", 3, false)
	s := h.snapshot()
	before := h.mem.clone()
	a, b := plan(h.cfg, s, h.mem), plan(h.cfg, s, h.mem)
	if !reflect.DeepEqual(a, b) {
		t.Fatal("two plans of the same inputs differ")
	}
	if !reflect.DeepEqual(before, h.mem) {
		t.Fatalf("plan changed the memory it was given:\n%+v\n%+v", before, h.mem)
	}
	if a.Memory.Uplinks[1].Usable || !h.mem.Uplinks[1].Usable {
		t.Fatal("the new memory is not apart from the old")
	}
}

func TestIDStrings(t *testing.T) {
	for got, want := range map[string]string{
		TableRef{"isp1", 101}.String():                                "table isp1 (101)",
		MarkRef{"isp1", 0x10000}.String():                             "mark isp1 (0x10000)",
		UplinkRef{"isp2", 1}.String():                                 "isp2 (slot 1)",
		routing.FormatRoute(&netlink.Route{Table: 254, LinkIndex: 3}): "default table 254 dev #3",
	} {
		if got != want {
			t.Errorf("%q, want %q", got, want)
		}
	}
}

// A repair that fails the same way every pass is one ERROR line, not one
// a pass; its end is logged too. The attachment is tried again each pass.
func TestRepeatedFailureLoggedOnce(t *testing.T) {
	h := startBoth(t, "", "")
	h.os.attachErr = errors.New("operation not permitted")
	errorsLogged := 0
	for range 4 {
		h.pass("attaching fails")
		errorsLogged += strings.Count(h.out.String(), "level=ERROR")
		h.out.Reset()
		h.advance(time.Second)
	}
	// 3 interfaces, each failing in each of 4 passes
	if errorsLogged != 3 {
		t.Fatalf("%d ERROR lines for 3 interfaces failing in 4 passes, want 3", errorsLogged)
	}
	h.os.attachErr = nil
	h.pass("attaching works again")
	if n := strings.Count(h.out.String(), `msg="works again"`); n != 3 {
		t.Fatalf("%d 'works again' lines, want 3:\n%s", n, h.out.String())
	}
	if st := h.os.status; st.TCMode != "tcx" || st.Passes != 5 {
		t.Fatalf("status after the attachments: tc_mode %q, passes %d; want tcx, 5", st.TCMode, st.Passes)
	}
}

// A routing state that could not be read is left alone: no diff, no
// repair counted; the rest of the plan stands.
func TestPlanWithoutRoutingState(t *testing.T) {
	h := startBoth(t, "", "")
	h.pass("start")
	s := h.snapshot()
	s.Errors = append(s.Errors, ObserveError{"routing", errors.New("list rules: interrupted")})
	p := plan(h.cfg, s, h.mem)
	if p.RoutingSet || !p.RoutingDiff.Empty() || len(p.Routing.Rules) == 0 {
		t.Fatalf("routing planned from an unread state: set %v, diff %q", p.RoutingSet, p.RoutingDiff)
	}
	if len(p.Uplinks) != 2 || !p.Uplinks[0].Usable {
		t.Fatalf("uplinks: %+v", p.Uplinks)
	}
}

// A change of mhbpf's own that fails the same way pass after pass is
// backed off like a conflict, and said to be failing, not fought over.
func TestFailingRoutingBacksOff(t *testing.T) {
	h := startBoth(t, "", "")
	h.os.failRoutes = errors.New("network unreachable")
	for range 4 {
		h.pass("main's route is refused")
		h.advance(50 * time.Millisecond)
	}
	out := h.out.String()
	// the three routes of the state, each once
	if strings.Count(out, "a change keeps failing; backing off") != 3 || strings.Contains(out, "conflict:") {
		t.Fatalf("want a 'keeps failing' line per route (3) and no conflict:\n%s", out)
	}
	if n := strings.Count(out, "level=ERROR"); n != 1 {
		t.Fatalf("%d ERROR lines for the same failure, want 1:\n%s", n, out)
	}
}

// A retirement of a failed uplink's flows that fails is tried again each
// pass until it takes: the plan says "down" once, the records would keep
// steering otherwise.
func TestFailedRetirementIsRetried(t *testing.T) {
	h := startBoth(t, "", "")
	h.pass("start")
	h.advance(time.Second)
	h.os.failRetire = errors.New("bad file descriptor")
	h.link("ppp0", 2, false)
	h.pass("isp1 down: retiring its flows fails")
	if h.os.gens[0] != 0 || !strings.Contains(h.out.String(), "level=ERROR") || strings.Contains(h.out.String(), "flow_generation") {
		t.Fatalf("generation %d after a failed retirement; log:\n%s", h.os.gens[0], h.out.String())
	}
	h.os.failRetire = nil
	h.advance(time.Second)
	h.out.Reset()
	h.pass("nothing changed: the retirement again")
	if h.os.gens[0] != 1 {
		t.Fatalf("generation %d after the retry, want 1; log:\n%s", h.os.gens[0], h.out.String())
	}
	h.advance(time.Second)
	h.pass("nothing changed: nothing done")
	if h.os.gens[0] != 1 {
		t.Fatalf("retired again once done: generation %d", h.os.gens[0])
	}
}

// What a status pass relies on: the plan of a world a pass has applied
// touches nothing in the kernel however the probes' figures move (the
// status gets them); a changed verdict, a changed world and an ended
// hold-down each need a full pass.
func TestPlanTouchesKernel(t *testing.T) {
	h := startBoth(t, probed, "")
	ok := health.Result{Verdict: true, Healthy: true, RTT: 12 * time.Millisecond}
	h.os.probes[0] = ok
	h.pass("start")
	h.pass("settled")
	replan := func() (Plan, Snapshot) {
		s := h.snapshot()
		return plan(h.cfg, s, h.mem), s
	}
	if p, s := replan(); p.touchesKernel(s) {
		t.Fatalf("the plan of an applied world touches the kernel: %+v", p)
	}
	h.os.probes[0] = health.Result{Verdict: true, Healthy: true, RTT: 31 * time.Millisecond, Loss: 0.05, Fails: 1, Reason: "1 round without an answer"}
	p, s := replan()
	if p.touchesKernel(s) {
		t.Fatalf("new RTT and loss, the same verdict: the plan touches the kernel: %+v", p)
	}
	if u := p.Status.Uplinks[0]; u.RTTms != 31 || u.Loss != 0.05 {
		t.Fatalf("the status has RTT %v ms, loss %v; want the new result's 31, 0.05", u.RTTms, u.Loss)
	}
	h.os.probes[0] = health.Result{Verdict: true, Fails: 3, Reason: "3 rounds without an answer"}
	if p, s := replan(); !p.touchesKernel(s) {
		t.Fatal("a verdict turned unhealthy: the plan touches nothing")
	}
	h.os.probes[0] = ok
	for k := range h.os.rules {
		delete(h.os.rules, k) // somebody flushed a rule
		break
	}
	if p, s := replan(); !p.touchesKernel(s) {
		t.Fatal("a rule of mhbpf's gone: the plan touches nothing")
	}
	h.pass("the rule back")
	// A hold-down ending: isp2's link went and came back; up_delay later
	// it is usable again, which only a full pass can make so.
	h.link("ppp1", 3, false)
	h.pass("isp2's link down")
	h.link("ppp1", 3, true, "100.64.1.2/24")
	h.pass("isp2's link back: held for up_delay")
	if p, s := replan(); p.touchesKernel(s) {
		t.Fatalf("while isp2 is held: the plan touches the kernel: %+v", p)
	}
	h.advance(time.Second)
	if p, s := replan(); !p.touchesKernel(s) || len(p.Up) != 1 {
		t.Fatalf("up_delay over: the plan touches nothing (up: %v)", p.Up)
	}
}
