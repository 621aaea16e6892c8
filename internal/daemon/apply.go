package daemon

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"

	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/nat"
	"github.com/mhbpf/mhbpf/internal/routing"
)

// apply makes a plan true through small interfaces, one per part of the
// system it changes. The real ones (os.go) are the netlink and bpf(2) code
// of the other packages; the tests' fakes record what they are told.

// Datapath is the BPF maps the plan writes (*maps.Maps).
type Datapath interface {
	SetUplink(id int, u maps.Uplink) error
	// ForgetFlowsOfUplink retires an uplink's flows at once (O(1)).
	ForgetFlowsOfUplink(id int) (uint32, error)
	// DeleteRemotesOfUplink walks the remote endpoints: after routing.
	DeleteRemotesOfUplink(id int) (int, error)
	DeleteIface(ifindex int) error
	SetBypass(prefixes []netip.Prefix) error
}

// Attacher attaches the programs.
type Attacher interface {
	AttachTC(ifname string, role maps.Role, uplink int) (loader.Mode, error)
	// ReattachCgroup attaches the socket hooks again where they were,
	// and says where.
	ReattachCgroup() (string, error)
}

// Router changes mhbpf's rules and routes.
type Router interface {
	Apply(d routing.Diff) ([]string, error)
	// Holder names what holds a route's slot now, other than mhbpf ("" none).
	Holder(r netlink.Route) string
}

// NAT writes mhbpf's nftables table whole.
type NAT interface {
	Apply(t nat.Table) error
}

// Sysctls sets the sysctls (recording the values found first).
type Sysctls interface {
	Apply(want routing.Sysctls) error
}

// Conntrack forgets the connections bound to addresses.
type Conntrack interface {
	Forget(addrs []netip.Addr) (int, error)
}

// StatusSink receives the status of every pass (the status file, metrics).
type StatusSink interface {
	Status(s Status) error
}

// System is everything apply changes.
type System struct {
	Datapath  Datapath
	Attacher  Attacher
	Router    Router
	NAT       NAT
	Sysctls   Sysctls
	Conntrack Conntrack
	Status    StatusSink
}

// applier applies plans and remembers what it made: the observer reads
// that back (what was attached where, the table last written) to find what
// others took away.
type applier struct {
	sys      System
	log      *slog.Logger
	attached map[string]int // interface -> the ifindex it was attached at
	natTable nat.Table
	natSet   bool
	bypass   string // the bypass prefixes last written
	tcMode   loader.Mode
	passes   uint64
	// failing: what failed in the last pass, by key, with its error: a
	// failure is logged as an ERROR when it starts or changes, not every
	// pass it repeats.
	failing map[string]string
	seen    map[string]bool // the failures of this pass
	// unretired: uplinks that went down whose flows are not retired yet
	// (ForgetFlowsOfUplink failed), by slot.
	unretired map[int]UplinkRef
}

func newApplier(sys System, log *slog.Logger) *applier {
	return &applier{sys: sys, log: log, attached: map[string]int{}, failing: map[string]string{}, unretired: map[int]UplinkRef{}}
}

// fail logs err under key once, until it changes or stops.
func (a *applier) fail(key string, err error, msg string, args ...any) {
	a.seen[key] = true
	text := err.Error()
	if a.failing[key] == text {
		a.log.Debug(msg+" (still failing)", append(args, "error", err)...)
		return
	}
	a.failing[key] = text
	a.log.Error(msg, append(args, "error", err)...)
}

// endPass logs the failures that stopped.
func (a *applier) endPass() {
	for key := range a.failing {
		if !a.seen[key] {
			delete(a.failing, key)
			a.log.Info("works again", "what", key)
		}
	}
}

func (a *applier) apply(p Plan, s Snapshot) {
	a.seen = map[string]bool{}
	defer a.endPass()
	a.passes++
	for _, e := range s.Errors {
		a.fail(e.What, e.Err, e.What)
	}
	if p.FallbackChanged {
		if p.Memory.Fallback {
			a.log.Warn(reasonFallback)
		} else {
			a.log.Info("probe fallback over: the probes decide again")
		}
	}
	for _, at := range p.Attach {
		a.attach(at)
	}
	for _, u := range p.Uplinks {
		if err := a.sys.Datapath.SetUplink(u.Ref.Slot, u.Entry); err != nil {
			a.fail("uplinks map "+u.Ref.Name, err, "uplinks map", "uplink", u.Ref)
		}
	}
	for _, u := range p.Up {
		a.log.Info("uplink up", "uplink", u)
	}
	// One map write per uplink however many flows it had: the routing
	// change below must not wait for the flow count.
	// One that failed is tried again each pass until it takes: the records
	// would keep steering (an inbound one does not ask whether its uplink
	// is up).
	for _, w := range p.Down {
		a.unretired[w.Ref.Slot] = w.Ref
	}
	gens := map[int]uint32{}
	slots := make([]int, 0, len(a.unretired))
	for slot := range a.unretired {
		slots = append(slots, slot)
	}
	slices.Sort(slots) // the order the logs and the golden tests see
	for _, slot := range slots {
		ref := a.unretired[slot]
		g, err := a.sys.Datapath.ForgetFlowsOfUplink(slot)
		if err != nil {
			a.fail("flows of "+ref.Name, err, "retiring the flows of an uplink that went down", "uplink", ref)
			continue
		}
		gens[slot] = g
		delete(a.unretired, slot)
	}
	if len(p.ReattachCgroup) > 0 {
		if cg, err := a.sys.Attacher.ReattachCgroup(); err != nil {
			a.fail("socket hooks", err, "reattaching the socket hooks", "cgroup", cg)
		} else {
			a.log.Warn(fmt.Sprintf("socket hook links were gone (%s); reattached", strings.Join(p.ReattachCgroup, ", ")), "cgroup", cg)
		}
	}
	a.applyBypass(p.Bypass)
	a.applyRouting(p)
	if err := a.sys.Sysctls.Apply(p.Sysctls); err != nil {
		a.fail("sysctls", err, "sysctls")
	}
	a.applyNAT(p)
	// Conntrack and the remote endpoints after routing: they are walked
	// whole, and the routes must not wait for them.
	for _, w := range p.Down {
		n, err := a.sys.Conntrack.Forget(w.Addrs)
		if err != nil {
			a.fail("conntrack "+w.Ref.Name, err, "conntrack", "uplink", w.Ref, "addresses", fmt.Sprint(w.Addrs))
		}
		if _, err := a.sys.Datapath.DeleteRemotesOfUplink(w.Ref.Slot); err != nil {
			a.fail("remotes of "+w.Ref.Name, err, "deleting the remote endpoints of an uplink that went down", "uplink", w.Ref)
		}
		attrs := []any{"uplink", w.Ref, "reason", w.Reason, "conntrack_forgotten", n}
		if g, ok := gens[w.Ref.Slot]; ok {
			attrs = append(attrs, "flow_generation", g)
		}
		a.log.Warn("uplink down", attrs...)
	}
	a.status(p)
}

// status writes the plan's status (also alone: a status pass).
func (a *applier) status(p Plan) {
	st := p.Status
	st.TCMode = string(a.tcMode) // after this pass's attachments
	st.Passes = a.passes
	if err := a.sys.Status.Status(st); err != nil {
		a.fail("status", err, "status")
	}
}

// errInterfaceGone: an attach failed because its interface no longer
// exists (an Attacher wraps it).
var errInterfaceGone = errors.New("interface gone")

func (a *applier) attach(at Attach) {
	if at.Stale != 0 {
		_ = a.sys.Datapath.DeleteIface(at.Stale) // the device that had this name is gone
	}
	mode, err := a.sys.Attacher.AttachTC(at.Interface, at.Role, at.Uplink)
	key := "attach " + at.Interface
	if errors.Is(err, errInterfaceGone) {
		// Nothing to repair: the pass that sees it absent takes it out.
		a.log.Debug("tc programs gone with their interface", "interface", at.Interface, "gone", at.Gone)
		return
	}
	if err != nil {
		if at.Gone != "" {
			a.fail(key, err, "reattaching the tc programs", "interface", at.Interface, "gone", at.Gone)
		} else {
			a.fail(key, err, "attach", "interface", at.Interface)
		}
		return
	}
	a.attached[at.Interface] = at.Ifindex
	a.tcMode = mode
	switch {
	case at.Gone != "":
		a.log.Warn(fmt.Sprintf("tc programs on %s were gone (%s); reattached", at.Interface, at.Gone), "interface", at.Interface, "mode", mode)
	case at.Role == maps.RoleLAN:
		a.log.Info("attached", "interface", at.Interface, "role", "lan")
	default:
		a.log.Info("attached", "interface", at.Interface, "uplink", at.Ref, "mode", mode)
	}
}

// applyBypass writes the bypass prefixes when they changed.
func (a *applier) applyBypass(prefixes []netip.Prefix) {
	key := fmt.Sprint(prefixes)
	if key == a.bypass {
		return
	}
	if err := a.sys.Datapath.SetBypass(prefixes); err != nil {
		a.fail("bypass", err, "bypass prefixes")
		return
	}
	a.bypass = key
	a.log.Info("destinations not steered", "prefixes", key)
}

func (a *applier) applyRouting(p Plan) {
	for _, c := range p.Conflicts {
		if last, failing := a.failing["routing"]; failing {
			// Not undone by someone: mhbpf's own change keeps failing.
			a.log.Warn("routing: a change keeps failing; backing off", "what", c.What, "error", last,
				"tries", c.Count, "next_try_in", c.Backoff)
			continue
		}
		holder := ""
		if c.Route != nil {
			holder = a.sys.Router.Holder(*c.Route)
		}
		if holder == "" {
			holder = "another program (the kernel does not say which)"
		}
		a.log.Warn("conflict: a repair keeps being undone; backing off", "what", c.What, "fighting", holder,
			"repairs", c.Count, "next_try_in", c.Backoff)
	}
	for _, r := range p.Resolved {
		a.log.Info("conflict over", "what", r)
	}
	if len(p.Held) > 0 {
		a.log.Debug("repairs held back (conflict)", "what", strings.Join(p.Held, "; "))
	}
	if !p.RoutingSet || p.RoutingDiff.Empty() {
		return
	}
	changes, err := a.sys.Router.Apply(p.RoutingDiff)
	if err != nil {
		a.fail("routing", err, "routing")
	}
	for _, c := range changes {
		a.log.Debug("routing", "change", c)
	}
	if len(changes) > 0 {
		a.log.Info("routing converged", "changes", len(changes))
	}
}

// applyNAT writes mhbpf's nftables table when the plan says why.
func (a *applier) applyNAT(p Plan) {
	if p.NATWrite == "" {
		return
	}
	if err := a.sys.NAT.Apply(p.NAT); err != nil {
		a.fail("nat", err, "nat")
		return
	}
	drift := p.NATWrite
	a.natTable, a.natSet = p.NAT, true
	switch drift {
	case "new", "changed":
	case "gone":
		a.log.Warn(fmt.Sprintf("nft table inet %s was gone (someone flushed the ruleset?); restored", p.NATName))
	default:
		a.log.Warn(fmt.Sprintf("nft table inet %s had been changed (%s); rewritten", p.NATName, drift))
	}
}
