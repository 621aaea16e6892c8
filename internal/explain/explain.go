// Package explain answers "which uplink would a new connection to DST take
// right now, and why": the datapath's own program decides (sandbox.go says
// how, without writing to the live maps), the maps and the daemon's status
// say why, and the kernel's route lookup with the resulting mark says which
// table and route the packet then takes.
package explain

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sort"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/bpf"
	"github.com/mhbpf/mhbpf/internal/daemon"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/packet"
)

// Query is the connection asked about: its first packet, as a LAN host
// would send it.
type Query struct {
	Dst     netip.Addr
	Src     netip.Addr // a LAN host; invalid: none given
	Proto   uint8      // 6, 17, 1 or 58
	DstPort uint16
	SrcPort uint16 // 0: the default (only per-flow stickiness depends on it)
}

// DefaultSrcPort is the source port of the synthetic first packet when
// none is asked for.
const DefaultSrcPort = 40000

// Entry is one uplink of the matched policy.
type Entry struct {
	Uplink   string  `json:"uplink"`
	ID       int     `json:"id"`
	Tier     int     `json:"tier"`
	Weight   int     `json:"weight"`
	Up       bool    `json:"up"`               // the datapath may use it (uplinks map)
	Reason   string  `json:"reason,omitempty"` // why not, from the daemon's status
	Eligible bool    `json:"eligible"`         // up and in the best tier with an uplink up
	Share    float64 `json:"share"`            // of new choices, 0..1, among the eligible
}

// StickyEntry is the remembered choice for this destination (or pair).
type StickyEntry struct {
	Uplink  string  `json:"uplink"`
	AgeSecs float64 `json:"age_seconds"` // since last used
	Expired bool    `json:"expired"`     // older than sticky_timeout
	Kept    bool    `json:"kept"`        // it decided this choice
}

// Route is what the kernel does with the packet and its mark.
type Route struct {
	Mark    uint32 `json:"mark"` // the whole fwmark the lookup used
	Rule    string `json:"rule,omitempty"`
	Table   int    `json:"table"`
	Device  string `json:"device,omitempty"`
	Gateway string `json:"gateway,omitempty"`
	Source  string `json:"source,omitempty"`
	Error   string `json:"error,omitempty"` // e.g. unreachable (fail closed)
}

// Result is the whole answer.
type Result struct {
	Proto    string `json:"proto"`
	Src      string `json:"src"`
	SrcPort  uint16 `json:"src_port"`
	Dst      string `json:"dst"`
	DstPort  uint16 `json:"dst_port"`
	Bypassed bool   `json:"bypassed"` // never steered: routed by main
	// Policy: the [[policy]] that matched ("" with PolicyID 0: the default
	// balance).
	PolicyID int     `json:"policy_id"`
	Policy   string  `json:"policy"`
	Sticky   string  `json:"sticky"` // destination, pair, flow
	Fallback string  `json:"fallback"`
	Entries  []Entry `json:"entries"`
	// StickyEntry: nil when there is none (or the policy is per flow).
	StickyEntry *StickyEntry `json:"sticky_entry"`
	Uplink      string       `json:"uplink"` // chosen; "" when none is
	UplinkID    int          `json:"uplink_id"`
	Origin      string       `json:"origin,omitempty"`
	MhbpfMark   uint32       `json:"mhbpf_mark"` // the bits the datapath sets
	// MarkBits names them: uplinks in fib rule order (the chosen one, then
	// its fallbacks), "strict" for fail closed.
	MarkBits []string `json:"mark_bits"`
	Route    Route    `json:"route"`
}

// Explain answers q against the datapath pinned in live, naming uplinks
// and policies after st.
func Explain(live *maps.Maps, st daemon.Status, q Query) (*Result, error) {
	if !q.Dst.IsValid() {
		return nil, errors.New("no destination")
	}
	q.Dst = q.Dst.Unmap()
	if !q.Src.IsValid() {
		q.Src = netip.IPv4Unspecified()
		if q.Dst.Is6() {
			q.Src = netip.IPv6Unspecified()
		}
	}
	q.Src = q.Src.Unmap()
	if q.Src.Is4() != q.Dst.Is4() {
		return nil, fmt.Errorf("source %s and destination %s are not of one address family", q.Src, q.Dst)
	}
	if q.SrcPort == 0 {
		q.SrcPort = DefaultSrcPort
	}
	pkt := firstPacket(q)

	decide, err := newSandbox(live)
	if err != nil {
		return nil, err
	}
	defer decide.Close()
	ident, err := newIdentifier(live)
	if err != nil {
		return nil, err
	}
	defer ident.Close()

	mark, err := decide.run(pkt)
	if err != nil {
		return nil, err
	}
	if _, err := ident.run(pkt); err != nil {
		return nil, err
	}
	names := namesOf(st)
	r := &Result{Proto: maps.ProtoName(q.Proto), Src: q.Src.String(), SrcPort: q.SrcPort, Dst: q.Dst.String(),
		DstPort: q.DstPort, UplinkID: -1, MhbpfMark: mark, Entries: []Entry{}}

	// Which policy: the identifier's one sticky entry names it.
	idEntries, err := ident.stickyEntries()
	if err != nil {
		return nil, err
	}
	if len(idEntries) == 0 {
		r.Bypassed = true // the lookup never ran: a bypassed (LAN, link-local, multicast, listed) destination
	}
	var key bpf.UplinkStickyKey
	for k := range idEntries {
		key = k
	}
	f, recorded, err := decide.flow(pkt)
	if err != nil {
		return nil, err
	}
	if recorded {
		r.Uplink, r.UplinkID, r.Origin = names.uplink(f.Uplink), f.Uplink, f.Origin.String()
	}
	if !r.Bypassed {
		if err := r.describePolicy(live, st, names, int(key.Policy)); err != nil {
			return nil, err
		}
		if err := r.describeSticky(decide, live, names, q, int(key.Policy)); err != nil {
			return nil, err
		}
	}
	var strict uint32
	if err := decide.variable("mark_strict", &strict); err != nil {
		return nil, err
	}
	r.MarkBits = []string{}
	for _, u := range st.Uplinks {
		if u.Mark != 0 && mark&u.Mark == u.Mark {
			r.MarkBits = append(r.MarkBits, u.Name)
		}
	}
	if mark&strict != 0 {
		r.MarkBits = append(r.MarkBits, "strict")
	}
	r.Route = routeOf(q, mark)
	return r, nil
}

func firstPacket(q Query) packet.Packet {
	p := packet.Packet{Src: netip.AddrPortFrom(q.Src, q.SrcPort), Dst: netip.AddrPortFrom(q.Dst, q.DstPort), Proto: q.Proto}
	switch q.Proto {
	case packet.ProtoTCP:
		p.TCPFlags = packet.TCPSyn
	case packet.ProtoICMP:
		p.ICMPType = 8 // echo request; the port is the identifier
		p.Dst = netip.AddrPortFrom(q.Dst, 0)
	case packet.ProtoICMPv6:
		p.ICMPType = 128
		p.Dst = netip.AddrPortFrom(q.Dst, 0)
	}
	return p
}

type names struct {
	uplinks  map[int]daemon.UplinkStatus
	policies []string
}

func namesOf(st daemon.Status) names {
	n := names{uplinks: map[int]daemon.UplinkStatus{}, policies: st.Policies}
	for _, u := range st.Uplinks {
		n.uplinks[u.ID] = u
	}
	return n
}

func (n names) uplink(id int) string {
	if u, ok := n.uplinks[id]; ok {
		return u.Name
	}
	return fmt.Sprintf("slot %d", id)
}

// describePolicy reads policy id back from the live maps: its entries
// (tier, weight), which of them are up and why not, and the share each
// eligible one gets of new choices.
func (r *Result) describePolicy(live *maps.Maps, st daemon.Status, n names, id int) error {
	var gen uint32
	if err := live.PolicyGeneration.Lookup(uint32(0), &gen); err != nil {
		return fmt.Errorf("policy generation: %w", err)
	}
	gen &= 1
	var p bpf.UplinkPolicy
	if id == 0 {
		var set bpf.UplinkPolicySet
		if err := live.PolicyMeta.Lookup(gen, &set); err != nil {
			return err
		}
		p = set.Dflt
		r.Policy = "default balance"
	} else {
		var rule bpf.UplinkPolicyRule
		if err := live.PolicyRules.Lookup(gen*uint32(maps.MaxRules)+uint32(id-1), &rule); err != nil {
			return err
		}
		p = rule.Policy
		r.Policy = fmt.Sprintf("policy %d", id)
		if id-1 < len(n.policies) {
			r.Policy = n.policies[id-1]
		}
	}
	r.PolicyID = id
	r.Sticky = map[uint8]string{0: "destination", 1: "flow", 2: "pair"}[p.Sticky]
	r.Fallback = "main's routes"
	if p.Fallback == uint8(maps.FallbackUnreachable) {
		r.Fallback = "unreachable (fail closed)"
	}
	best := 256
	for i := 0; i < int(p.Nentries) && i < len(p.Entries); i++ {
		e := p.Entries[i]
		u, err := live.LookupUplink(int(e.Uplink))
		if err != nil {
			return err
		}
		ent := Entry{Uplink: n.uplink(int(e.Uplink)), ID: int(e.Uplink), Tier: int(e.Tier), Weight: int(e.Weight),
			Up: u.Up && u.Mark != 0}
		if !ent.Up {
			ent.Reason = "not in use"
			if s, ok := n.uplinks[ent.ID]; ok && s.Reason != "" {
				ent.Reason = s.Reason
			}
		}
		if ent.Up && ent.Weight > 0 && ent.Tier < best {
			best = ent.Tier
		}
		r.Entries = append(r.Entries, ent)
	}
	total := 0
	for i := range r.Entries {
		e := &r.Entries[i]
		e.Eligible = e.Up && e.Weight > 0 && e.Tier == best
		if e.Eligible {
			total += e.Weight
		}
	}
	for i := range r.Entries {
		if r.Entries[i].Eligible {
			r.Entries[i].Share = float64(r.Entries[i].Weight) / float64(total)
		}
	}
	return nil
}

// describeSticky finds the remembered choice for this destination (or
// source and destination) in the live sticky map, and says whether it
// decided: the program keeps it while it is younger than sticky_timeout and
// its uplink eligible, else it chooses by weight and remembers that.
func (r *Result) describeSticky(s *sandbox, live *maps.Maps, n names, q Query, policy int) error {
	if r.Sticky == "flow" {
		return nil // nothing remembered beyond the flow itself
	}
	mode := maps.StickyDestination
	if r.Sticky == "pair" {
		mode = maps.StickyPair
	}
	v, ok, err := live.LookupSticky(uint32(policy), mode, q.Src, q.Dst)
	if err != nil || !ok {
		return err
	}
	var timeout uint64
	if err := s.variable("sticky_ns", &timeout); err != nil {
		return err
	}
	age := time.Duration(monotonicNow()) - v.LastUsed
	e := &StickyEntry{Uplink: n.uplink(int(v.Uplink)), AgeSecs: age.Seconds(), Expired: uint64(age) >= timeout}
	eligible := false
	for _, en := range r.Entries {
		eligible = eligible || en.ID == int(v.Uplink) && en.Eligible
	}
	e.Kept = !e.Expired && eligible && r.UplinkID == int(v.Uplink)
	r.StickyEntry = e
	return nil
}

// routeOf asks the kernel where the packet goes with its mark: as a
// forwarded packet from the LAN host (input route lookup on the LAN
// interface) when a source is given, else as the router's own.
func routeOf(q Query, mhbpfBits uint32) Route {
	rt := Route{Mark: mhbpfBits}
	opts := &netlink.RouteGetOptions{Mark: mhbpfBits}
	if !q.Src.IsUnspecified() {
		opts.SrcAddr = net.IP(q.Src.AsSlice())
		if lan := lanInterfaceFor(q.Src); lan != "" {
			opts.Iif = lan
		}
	}
	routes, err := netlink.RouteGetWithOptions(net.IP(q.Dst.AsSlice()), opts)
	if err != nil {
		switch {
		case errors.Is(err, unix.EHOSTUNREACH) || errors.Is(err, unix.ENETUNREACH):
			rt.Error = "unreachable"
		case errors.Is(err, unix.EACCES):
			rt.Error = "prohibit"
		case errors.Is(err, unix.EINVAL):
			rt.Error = "blackhole"
		default:
			rt.Error = err.Error()
		}
		rt.Rule = ruleFor(q, mhbpfBits, -1)
		return rt
	}
	if len(routes) == 0 {
		rt.Error = "no route"
		return rt
	}
	x := routes[0]
	rt.Table = x.Table
	if l, err := netlink.LinkByIndex(x.LinkIndex); err == nil {
		rt.Device = l.Attrs().Name
	}
	if x.Gw != nil {
		rt.Gateway = x.Gw.String()
	}
	if x.Src != nil {
		rt.Source = x.Src.String()
	}
	rt.Rule = ruleFor(q, mhbpfBits, x.Table)
	return rt
}

// lanInterfaceFor is the interface whose connected route holds addr: where
// a packet from that LAN host arrives.
func lanInterfaceFor(addr netip.Addr) string {
	routes, err := netlink.RouteGet(net.IP(addr.AsSlice()))
	if err != nil || len(routes) == 0 || routes[0].Gw != nil {
		return ""
	}
	l, err := netlink.LinkByIndex(routes[0].LinkIndex)
	if err != nil {
		return ""
	}
	return l.Attrs().Name
}

// ruleFor names the fib rule that sent the lookup to table (-1: to an
// unreachable verdict): the first, by priority, whose selectors hold for
// this packet and that leads there. The kernel chose the table; this only
// names the rule, for the reader.
func ruleFor(q Query, mark uint32, table int) string {
	family := netlink.FAMILY_V4
	if q.Dst.Is6() {
		family = netlink.FAMILY_V6
	}
	rules, err := netlink.RuleList(family)
	if err != nil {
		return ""
	}
	sort.SliceStable(rules, func(i, j int) bool { return rules[i].Priority < rules[j].Priority })
	for _, ru := range rules {
		if ru.Mark != 0 || ru.Mask != nil {
			mask := uint32(0xffffffff)
			if ru.Mask != nil {
				mask = *ru.Mask
			}
			if mark&mask != ru.Mark {
				continue
			}
		}
		if ru.Src != nil && !prefixContains(ru.Src, q.Src) || ru.Dst != nil && !prefixContains(ru.Dst, q.Dst) {
			continue
		}
		if ru.IifName != "" && (q.Src.IsUnspecified() || ru.IifName != lanInterfaceFor(q.Src)) {
			continue
		}
		if ru.Invert {
			continue
		}
		// A rule with an action of its own (unreachable, blackhole,
		// prohibit) has no table; the netlink library does not say which
		// action, the lookup's error does.
		unreachable := ru.Table == 0 && ru.Goto < 0
		if table < 0 && unreachable {
			return fmt.Sprintf("%d: %s", ru.Priority, describeRule(ru))
		}
		if table >= 0 && !unreachable && ru.Table == table {
			return fmt.Sprintf("%d: %s", ru.Priority, describeRule(ru))
		}
	}
	return ""
}

func describeRule(ru netlink.Rule) string {
	s := ""
	if ru.Src != nil {
		s += "from " + ru.Src.String() + " "
	}
	if ru.Dst != nil {
		s += "to " + ru.Dst.String() + " "
	}
	if ru.IifName != "" {
		s += "iif " + ru.IifName + " "
	}
	if ru.Mark != 0 || ru.Mask != nil {
		s += fmt.Sprintf("fwmark %#x", ru.Mark)
		if ru.Mask != nil {
			s += fmt.Sprintf("/%#x", *ru.Mask)
		}
		s += " "
	}
	if ru.Table == 0 && ru.Goto < 0 {
		return strings.TrimSpace(s)
	}
	s += fmt.Sprintf("lookup %s", tableName(ru.Table))
	if ru.SuppressPrefixlen >= 0 {
		s += fmt.Sprintf(" suppress_prefixlength %d", ru.SuppressPrefixlen)
	}
	return s
}

func tableName(t int) string {
	switch t {
	case unix.RT_TABLE_MAIN:
		return "main"
	case unix.RT_TABLE_LOCAL:
		return "local"
	case unix.RT_TABLE_DEFAULT:
		return "default"
	}
	return fmt.Sprint(t)
}

func prefixContains(n *net.IPNet, a netip.Addr) bool {
	if a.IsUnspecified() {
		return false
	}
	return n.Contains(net.IP(a.AsSlice()))
}

func monotonicNow() uint64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return uint64(ts.Nano())
}
