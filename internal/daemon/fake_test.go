package daemon

import (
	"bytes"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/mhbpf/mhbpf/internal/config"
	"github.com/mhbpf/mhbpf/internal/health"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/nat"
	"github.com/mhbpf/mhbpf/internal/routing"
)

// The fake OS of the plan tests (after Tailscale's wgengine/router tests):
// it holds the state apply gives it, records each change as a line, and is
// what the next pass observes. No root, no kernel.

var update = flag.Bool("update", false, "rewrite testdata/*.golden from the tests' output")

type fakeOS struct {
	links      map[string]Link
	probes     map[int]health.Result
	rules      map[string]netlink.Rule  // by routing.RuleKey
	routes     map[string]netlink.Route // by routing.RouteSlot
	uplinks    map[int]maps.Uplink
	gens       map[int]uint32 // flow generations ForgetFlowsOfUplink moved on
	failRetire error          // what ForgetFlowsOfUplink fails with
	sysctls    routing.Sysctls
	nat        *nat.Table // nil: no table
	tcGone     map[string]string
	cgGone     []string
	holder     string // what Holder reports
	attachErr  error  // what AttachTC fails with
	failRoutes error  // what putting a route fails with
	status     Status
	ops        []string
}

func newFakeOS() *fakeOS {
	return &fakeOS{links: map[string]Link{}, probes: map[int]health.Result{}, rules: map[string]netlink.Rule{},
		routes: map[string]netlink.Route{}, uplinks: map[int]maps.Uplink{}, sysctls: routing.Sysctls{}, tcGone: map[string]string{}}
}

func (f *fakeOS) op(format string, args ...any) { f.ops = append(f.ops, fmt.Sprintf(format, args...)) }

func (f *fakeOS) SetUplink(id int, u maps.Uplink) error {
	if f.uplinks[id] != u {
		f.op("uplinks[%d] = mark %#x ifindex %d addr4 %s addr6 %s weight %d up %v", id, u.Mark, u.Ifindex, addrText(u.Addr4), addrText(u.Addr6), u.Weight, u.Up)
		f.uplinks[id] = u
	}
	return nil
}

func addrText(a netip.Addr) string {
	if !a.IsValid() {
		return "-"
	}
	return a.String()
}

func (f *fakeOS) ForgetFlowsOfUplink(id int) (uint32, error) {
	if f.failRetire != nil {
		return 0, f.failRetire
	}
	if f.gens == nil {
		f.gens = map[int]uint32{}
	}
	f.gens[id]++
	f.op("flows of slot %d retired (generation %d)", id, f.gens[id])
	return f.gens[id], nil
}

func (f *fakeOS) DeleteRemotesOfUplink(id int) (int, error) {
	f.op("remotes of slot %d deleted", id)
	return 0, nil
}

func (f *fakeOS) DeleteIface(ifindex int) error {
	f.op("ifaces[%d] deleted", ifindex)
	return nil
}

func (f *fakeOS) SetBypass(prefixes []netip.Prefix) error {
	f.op("bypass = %v", prefixes)
	return nil
}

func (f *fakeOS) AttachTC(ifname string, role maps.Role, uplink int) (loader.Mode, error) {
	if f.attachErr != nil {
		return "", f.attachErr
	}
	delete(f.tcGone, ifname)
	if role == maps.RoleLAN {
		f.op("attach %s lan", ifname)
	} else {
		f.op("attach %s uplink slot %d", ifname, uplink)
	}
	return loader.ModeTCX, nil
}

func (f *fakeOS) ReattachCgroup() (string, error) {
	f.cgGone = nil
	f.op("socket hooks reattached")
	return "/sys/fs/cgroup", nil
}

func (f *fakeOS) Apply(d routing.Diff) ([]string, error) {
	var changes []string
	for _, r := range d.AddRules {
		f.rules[routing.RuleKey(&r)] = r
		changes = append(changes, "+ "+routing.FormatRule(&r))
	}
	for _, r := range d.DelRules {
		delete(f.rules, routing.RuleKey(&r))
		changes = append(changes, "- "+routing.FormatRule(&r))
	}
	var err error
	for _, r := range d.PutRoutes {
		if f.failRoutes != nil {
			err = f.failRoutes
			continue
		}
		f.routes[routing.RouteSlot(&r)] = r
		changes = append(changes, "+ "+routing.FormatRoute(&r))
	}
	for _, r := range d.DelRoutes {
		delete(f.routes, routing.RouteSlot(&r))
		changes = append(changes, "- "+routing.FormatRoute(&r))
	}
	f.ops = append(f.ops, changes...)
	return changes, err
}

func (f *fakeOS) Holder(r netlink.Route) string { return f.holder }

// natOS is the fake's nftables (its own type: Apply is taken by routing).
type natOS struct{ f *fakeOS }

func (n natOS) Apply(t nat.Table) error {
	n.f.nat = &t
	n.f.op("nft table: masquerade %v clamp_mss %v", t.Masquerade, t.ClampMSS)
	return nil
}

type sysctlOS struct{ f *fakeOS }

func (s sysctlOS) Apply(want routing.Sysctls) error {
	names := make([]string, 0, len(want))
	for n := range want {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if s.f.sysctls[n] != want[n] {
			s.f.sysctls[n] = want[n]
			s.f.op("sysctl %s = %s", n, want[n])
		}
	}
	return nil
}

func (f *fakeOS) Forget(addrs []netip.Addr) (int, error) {
	f.op("conntrack: forget %v", addrs)
	return 0, nil
}

func (f *fakeOS) Status(s Status) error {
	f.status = s
	return nil
}

// state is the fake's routing state, in the order ip prints it.
func (f *fakeOS) state() routing.State {
	var st routing.State
	for _, r := range f.rules {
		st.Rules = append(st.Rules, r)
	}
	sort.Slice(st.Rules, func(i, j int) bool {
		a, b := st.Rules[i], st.Rules[j]
		if a.Family != b.Family {
			return a.Family < b.Family
		}
		if a.Priority != b.Priority {
			return a.Priority < b.Priority
		}
		return routing.RuleKey(&a) < routing.RuleKey(&b)
	})
	for _, r := range f.routes {
		st.Routes = append(st.Routes, r)
	}
	sort.Slice(st.Routes, func(i, j int) bool {
		a, b := st.Routes[i], st.Routes[j]
		if a.Family != b.Family {
			return a.Family < b.Family
		}
		return routing.RouteSlot(&a) < routing.RouteSlot(&b)
	})
	return st
}

// harness runs passes of the real plan and apply on the fake, and writes
// what each step did as golden text.
type harness struct {
	t    *testing.T
	cfg  *config.Config
	os   *fakeOS
	ap   *applier
	mem  Memory
	now  time.Time
	logs *bytes.Buffer
	out  strings.Builder
	last Plan
	ops  []string // the changes of the last pass
}

func parseConfig(t *testing.T, text string) *config.Config {
	t.Helper()
	cfg, err := config.Parse("test.toml", []byte(text))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cfg.AssignIdentities(nil); err != nil {
		t.Fatal(err)
	}
	return cfg
}

func newHarness(t *testing.T, cfgText string) *harness {
	h := &harness{t: t, cfg: parseConfig(t, cfgText), os: newFakeOS(), mem: Memory{}.clone(),
		now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), logs: &bytes.Buffer{}}
	log := slog.New(slog.NewTextHandler(h.logs, &slog.HandlerOptions{ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
		if a.Key == slog.TimeKey {
			return slog.Attr{}
		}
		return a
	}}))
	h.ap = newApplier(System{Datapath: h.os, Attacher: h.os, Router: h.os, NAT: natOS{h.os}, Sysctls: sysctlOS{h.os},
		Conntrack: h.os, Status: h.os}, log)
	return h
}

// link sets an interface of the fake world: up with addrs, or down.
func (h *harness) link(ifname string, ifindex int, up bool, addrs ...string) {
	l := Link{Exists: true, Ifindex: ifindex, Up: up}
	for _, a := range addrs {
		p := netip.MustParsePrefix(a)
		if up {
			l.Addrs = append(l.Addrs, p.Addr())
		}
		l.Subnets = append(l.Subnets, p.Masked())
	}
	h.os.links[ifname] = l
}

func (h *harness) snapshot() Snapshot {
	s := Snapshot{Now: h.now, Links: map[string]Link{}, Probes: map[int]health.Result{}, TC: map[string]TCState{},
		Routing: h.os.state(), CgroupGone: h.os.cgGone}
	for k, v := range h.os.links {
		s.Links[k] = v
	}
	for k, v := range h.os.probes {
		s.Probes[k] = v
	}
	for ifname, at := range h.ap.attached {
		s.TC[ifname] = TCState{At: at, Drift: h.os.tcGone[ifname]}
	}
	s.NAT = NATState{Written: h.ap.natSet, Table: h.ap.natTable}
	if h.ap.natSet {
		switch {
		case h.os.nat == nil:
			s.NAT.Drift = "gone"
		case !h.os.nat.Equal(h.ap.natTable):
			s.NAT.Drift = "content"
		}
	}
	return s
}

// pass runs one pass at the harness's clock and records it under title.
func (h *harness) pass(title string) Plan {
	h.t.Helper()
	s := h.snapshot()
	p := plan(h.cfg, s, h.mem)
	h.mem = p.Memory
	h.ap.apply(p, s)
	h.last = p
	fmt.Fprintf(&h.out, "== %s\n", title)
	for _, u := range p.Uplinks {
		state := "up"
		if !u.Usable {
			state = "down"
		}
		if u.Reason != "" {
			state += ": " + u.Reason
		}
		fmt.Fprintf(&h.out, "uplink %v %s\n", u.Ref, state)
	}
	for _, op := range h.os.ops {
		fmt.Fprintf(&h.out, "  > %s\n", op)
	}
	for _, l := range strings.Split(strings.TrimSpace(h.logs.String()), "\n") {
		if l != "" && !strings.HasPrefix(l, "level=DEBUG") {
			fmt.Fprintf(&h.out, "  log %s\n", l)
		}
	}
	if p.Wake > 0 {
		fmt.Fprintf(&h.out, "  wake in %v\n", p.Wake)
	}
	h.ops = h.os.ops
	h.os.ops = nil
	h.logs.Reset()
	return p
}

// routes records the fake's whole routing state, as ip prints it.
func (h *harness) routes() {
	for _, l := range strings.Split(strings.TrimSuffix(h.os.state().String(), "\n"), "\n") {
		fmt.Fprintf(&h.out, "  | %s\n", l)
	}
}

func (h *harness) advance(d time.Duration) { h.now = h.now.Add(d) }

// golden compares the record with testdata/NAME.golden (-update writes it).
func (h *harness) golden(name string) {
	h.t.Helper()
	path := filepath.Join("testdata", name+".golden")
	got := h.out.String()
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			h.t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		h.t.Fatalf("%v (run go test ./internal/daemon -update to write it)", err)
	}
	if got != string(want) {
		h.t.Errorf("%s differs from the passes' record; got:\n%s\n(run go test ./internal/daemon -run %s -update, and review the diff)", path, got, h.t.Name())
	}
}
