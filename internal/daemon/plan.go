package daemon

import (
	"fmt"
	"maps"
	"net/netip"
	"time"

	"github.com/mhbpf/mhbpf/internal/config"
	"github.com/mhbpf/mhbpf/internal/health"
	bpfmaps "github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/nat"
	"github.com/mhbpf/mhbpf/internal/routing"
)

// plan is the heart of a pass: from the configuration, the snapshot of the
// world and what earlier passes remember, everything the box should be,
// and the memory for the next pass. It is pure: it reads nothing but its
// arguments and changes none of them, so each state of the box is a unit
// test (plan_test.go) without root.

// UplinkMemory is what the passes remember of one uplink, by its slot.
type UplinkMemory struct {
	Usable bool // in use after the last pass
	// UpSince: its link has been usable (up, with an address) since then;
	// zero while it is not. For up_delay.
	UpSince time.Time
	// EverUsable: in use at least once in this daemon's life. Only a link
	// that went away and came back is held for up_delay; a freshly started
	// daemon uses a link that is up at once.
	EverUsable bool
	// LastAddrs: its addresses when last seen with any. A link that just
	// died may show none, but its connections are still bound to them.
	LastAddrs []netip.Addr
	// Kept: in use before a restart (the pinned uplinks map said so): used
	// until its first probe verdict.
	Kept bool
	// StateChanges: times it went in or out of use since the daemon
	// started (the first verdict is not a change).
	StateChanges uint64
}

// Memory is what plan carries from one pass to the next.
type Memory struct {
	Uplinks  map[int]UplinkMemory // by slot
	Fallback bool                 // every probed uplink failing: using link state
	// Repairs: the changes of recent passes that put back what someone
	// took away (conflict.go).
	Repairs map[string]Repair
	// Wanted: the keys of the routing state the last pass wanted.
	Wanted map[string]bool
}

func (m Memory) clone() Memory {
	c := Memory{Uplinks: maps.Clone(m.Uplinks), Fallback: m.Fallback, Repairs: maps.Clone(m.Repairs), Wanted: m.Wanted}
	if c.Uplinks == nil {
		c.Uplinks = map[int]UplinkMemory{}
	}
	if c.Repairs == nil {
		c.Repairs = map[string]Repair{}
	}
	return c
}

// Plan is everything one pass does.
type Plan struct {
	Memory  Memory       // for the next pass
	Uplinks []UplinkPlan // in preference order
	// Attach: tc programs to attach (new, moved, or taken away).
	Attach         []Attach
	ReattachCgroup []string // the socket hook links that went
	// Bypass: destinations never steered (the configured ones and the LAN's
	// subnets).
	Bypass      []netip.Prefix
	Routing     routing.State // the whole state wanted
	RoutingSet  bool          // the kernel's was read: RoutingDiff is valid
	RoutingDiff routing.Diff  // what applying it changes (less what is held)
	Held        []string      // repairs held back (conflict backoff)
	Conflicts   []Conflict    // conflicts seen for the first time
	Resolved    []string      // conflicts over
	Sysctls     routing.Sysctls
	NAT         nat.Table
	NATName     string // the table's name (family inet)
	NATWrite    string // why the table is written; "" not
	Down        []DownUplink
	Up          []UplinkRef
	// FallbackChanged: the probe fallback started or ended in this pass.
	FallbackChanged bool
	Status          Status
	// Wake: the next pass is due this long after the snapshot at the
	// latest (a hold-down or a backoff ends); 0: none is due.
	Wake time.Duration
}

// touchesKernel tells whether applying p to the world of s would write
// anything but the status: what a status pass must leave to a full one.
func (p Plan) touchesKernel(s Snapshot) bool {
	return len(s.Errors) > 0 || len(p.Up) > 0 || len(p.Down) > 0 || len(p.Attach) > 0 ||
		len(p.ReattachCgroup) > 0 || p.FallbackChanged || p.NATWrite != "" ||
		!p.RoutingSet || !p.RoutingDiff.Empty() || len(p.Conflicts) > 0 || len(p.Resolved) > 0
}

// UplinkPlan is one uplink's state.
type UplinkPlan struct {
	Ref    UplinkRef
	Usable bool
	Reason string         // why not usable (or why usable against the probes)
	Entry  bpfmaps.Uplink // its entry in the uplinks map
	// WentDown: usable after the last pass, not now: its flows go.
	WentDown bool
}

// Attach is a tc attachment to make.
type Attach struct {
	Interface string
	Role      bpfmaps.Role
	Uplink    int       // slot (uplinks)
	Ref       UplinkRef // (uplinks)
	Ifindex   int
	// Stale: the ifindex a device of that name had when attached, whose
	// interfaces map entry goes (0 none).
	Stale int
	// Gone: a repair: what of the attachment was taken away.
	Gone string
}

// DownUplink is an uplink that stopped being usable in this pass.
type DownUplink struct {
	Ref    UplinkRef
	Reason string
	Addrs  []netip.Addr // the addresses its connections are bound to
}

func linkReason(ifname string, l Link) string {
	switch {
	case !l.Exists:
		return "interface " + ifname + " absent"
	case !l.Up:
		return "link down"
	case len(l.Addrs) == 0:
		return "no address"
	}
	return ""
}

func routingSettingsOf(g *config.Global) routing.Settings {
	return routing.Settings{RulePriority: g.RulePriority, RouteProtocol: g.RouteProtocol, StrictMark: g.StrictMark, ReplyMark: g.ReplyMark}
}

func plan(cfg *config.Config, s Snapshot, mem Memory) Plan {
	g := &cfg.Global
	now := s.Now
	p := Plan{Memory: mem.clone()}
	m := &p.Memory
	p.Status = Status{Updated: now, State: StateRunning, Policies: policyNames(cfg)}
	wake := func(d time.Duration) {
		if d > 0 && (p.Wake == 0 || d < p.Wake) {
			p.Wake = d
		}
	}

	reasons := make([]string, len(cfg.Uplinks))
	for pos, u := range cfg.Uplinks {
		reasons[pos] = linkReason(u.Interface, s.Links[u.Interface])
	}
	fallback := probeFallback(cfg, reasons, s.Probes)
	p.FallbackChanged = fallback != m.Fallback
	m.Fallback = fallback
	p.Status.ProbeFallback = fallback

	var routed []routing.Uplink
	for pos, u := range cfg.Uplinks {
		id := u.ID // its slot; pos is its place in the preference order
		ref := UplinkRef{u.Name, id}
		l := s.Links[u.Interface]
		um := m.Uplinks[id]
		hr, probed := s.Probes[id]
		if probed && hr.Verdict {
			um.Kept = false
		}
		if len(l.Addrs) > 0 {
			um.LastAddrs = l.Addrs
		}
		linkOK := reasons[pos] == ""
		if !linkOK {
			um.UpSince = time.Time{}
		} else if um.UpSince.IsZero() {
			um.UpSince = now
		}
		usable, reason := linkOK, reasons[pos]
		// Hysteresis: a link that came (back) must stay up for up_delay,
		// unless it was already in use (a daemon restart does not hold
		// back a link that was fine).
		if usable && !um.Usable && um.EverUsable {
			if w := g.UpDelay - now.Sub(um.UpSince); w > 0 {
				usable, reason = false, fmt.Sprintf("up for %v, held until %v", now.Sub(um.UpSince).Round(time.Millisecond), g.UpDelay)
				wake(w)
			}
		}
		if !linkOK {
			um.Kept = false // it was out: its next use waits for a verdict
		}
		usable, reason = judgeProbes(u, usable, reason, fallback, hr, um.Kept)

		up := UplinkPlan{Ref: ref, Usable: usable, Reason: reason,
			Entry: bpfmaps.Uplink{Mark: u.Mark, Ifindex: uint32(l.Ifindex), Weight: u.Weight, Tier: u.Tier, Up: usable}}
		for _, a := range l.Addrs {
			if a.Is4() && !up.Entry.Addr4.IsValid() {
				up.Entry.Addr4 = a
			} else if a.Is6() && !up.Entry.Addr6.IsValid() {
				up.Entry.Addr6 = a
			}
		}
		if um.Usable != usable {
			if um.EverUsable {
				um.StateChanges++
			}
			if usable {
				p.Up = append(p.Up, ref)
				um.EverUsable = true
			} else {
				up.WentDown = true
				p.Down = append(p.Down, DownUplink{Ref: ref, Reason: reason, Addrs: um.LastAddrs})
			}
			um.Usable = usable
		}
		m.Uplinks[id] = um
		p.Uplinks = append(p.Uplinks, up)

		tc := s.TC[u.Interface]
		if l.Ifindex != 0 && tc.At != l.Ifindex {
			p.Attach = append(p.Attach, Attach{Interface: u.Interface, Role: bpfmaps.RoleUplink, Uplink: id, Ref: ref, Ifindex: l.Ifindex, Stale: tc.At})
		} else if tc.At != 0 && tc.Drift != "" {
			p.Attach = append(p.Attach, Attach{Interface: u.Interface, Role: bpfmaps.RoleUplink, Uplink: id, Ref: ref, Ifindex: tc.At, Gone: tc.Drift})
		}

		routed = append(routed, routing.Uplink{Pos: pos, Interface: u.Interface, Table: u.Table, Mark: u.Mark,
			Weight: u.Weight, Balance: u.Balance, Tier: u.Tier, Gateway: u.Gateway, Gateway6: u.Gateway6,
			Ifindex: l.Ifindex, LinkUp: linkOK, Usable: usable, Addrs: l.Addrs})
		if u.Masquerade {
			p.NAT.Masquerade = append(p.NAT.Masquerade, u.Interface)
		}
		if u.ClampMSS {
			p.NAT.ClampMSS = append(p.NAT.ClampMSS, u.Interface)
		}
		st := UplinkStatus{Name: u.Name, Interface: u.Interface, ID: id, Usable: usable, Reason: reason,
			Weight: u.Weight, Mark: u.Mark, Table: u.Table, Probed: probed, StateChanges: um.StateChanges}
		for _, a := range l.Addrs {
			st.Addresses = append(st.Addresses, a.String())
		}
		if probed {
			st.RTTms = float64(hr.RTT.Microseconds()) / 1000
			st.Loss = hr.Loss
		}
		p.Status.Uplinks = append(p.Status.Uplinks, st)
	}

	var lan []netip.Prefix
	for _, ifname := range cfg.LAN.Interfaces {
		l := s.Links[ifname]
		lan = append(lan, l.Subnets...)
		if !l.Exists {
			continue
		}
		tc := s.TC[ifname]
		if tc.At != l.Ifindex {
			p.Attach = append(p.Attach, Attach{Interface: ifname, Role: bpfmaps.RoleLAN, Ifindex: l.Ifindex})
		} else if tc.Drift != "" {
			p.Attach = append(p.Attach, Attach{Interface: ifname, Role: bpfmaps.RoleLAN, Ifindex: l.Ifindex, Gone: tc.Drift})
		}
	}
	p.ReattachCgroup = s.CgroupGone
	p.Bypass = append(append([]netip.Prefix(nil), cfg.LAN.Bypass...), lan...)

	p.Routing = routing.Desired(routingSettingsOf(g), routed, lan)
	if !s.failed("routing") {
		p.RoutingSet = true
		p.RoutingDiff = routing.Changes(s.Routing, p.Routing)
		planRepairs(&p, now, wake)
	}

	var ifaces []string
	ipv6 := false
	for _, u := range routed {
		ifaces = append(ifaces, u.Interface)
		for _, a := range u.Addrs {
			ipv6 = ipv6 || a.Is6()
		}
	}
	p.Sysctls = routing.DesiredSysctls(ifaces, ipv6)

	p.NATName = g.NFTable
	switch {
	case !s.NAT.Written:
		p.NATWrite = "new"
	case !p.NAT.Equal(s.NAT.Table):
		p.NATWrite = "changed"
	case s.NAT.Drift != "":
		p.NATWrite = s.NAT.Drift
	}
	return p
}

func (s Snapshot) failed(what string) bool {
	for _, e := range s.Errors {
		if e.What == what {
			return true
		}
	}
	return false
}

// probeFallback tells whether the probes are ignored in this pass: every
// uplink of the default balance whose link is up is probed and judged
// failing. reasons are the uplinks' link reasons, in configuration order.
func probeFallback(cfg *config.Config, reasons []string, probes map[int]health.Result) bool {
	some := false
	for pos, u := range cfg.Uplinks {
		if !u.Balance || u.Weight == 0 || reasons[pos] != "" {
			continue
		}
		some = true
		hr, ok := probes[u.ID]
		if u.Health == nil || !ok || !hr.Verdict || hr.Healthy {
			return false
		}
	}
	return some
}

// judgeProbes is what the probes make of an uplink that is otherwise
// usable (its link up and not held back).
func judgeProbes(u config.Uplink, usable bool, reason string, fallback bool, hr health.Result, kept bool) (bool, string) {
	if u.Health == nil || !usable {
		return usable, reason
	}
	switch {
	case !hr.Verdict && kept:
		return true, reasonKept
	case !hr.Verdict:
		if hr.Reason != "" {
			return false, reasonWaiting + " (" + hr.Reason + ")"
		}
		return false, reasonWaiting
	case !hr.Healthy && fallback:
		return true, reasonFallback + " (" + hr.Reason + ")"
	case !hr.Healthy:
		return false, "probes failing: " + hr.Reason
	}
	return true, ""
}
