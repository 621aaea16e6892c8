// Package routing computes and applies mhbpf's kernel routing state: one
// table per uplink with its default route, the fib rules of the mark scheme,
// main's weighted multipath default route. Everything it installs carries
// mhbpf's route protocol number and lies in its rule priority block, so it
// changes nothing else and finds exactly its own after a crash.
package routing

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sort"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Settings are the parts of the configuration routing needs.
type Settings struct {
	RulePriority  int // first priority of mhbpf's block
	RouteProtocol int
	StrictMark    uint32
	ReplyMark     uint32
}

// Rule priorities inside the block, in the order the kernel tries them.
//
// Answers to remote peers must leave by the interface their flow came in
// on, whatever main says about the peer (requirement 6), so they go first.
// Everything else lets main's routes more specific than the default win
// before any uplink table is consulted: the LAN, a VPN's routes, a container
// bridge, an admin's static route. That is what keeps the router's own ICMP
// errors (fragmentation needed, time exceeded, port unreachable) and its
// answers to LAN hosts that reach it on an uplink address on the LAN: both
// carry the mark of the LAN packet they answer (fwmark_reflect,
// tcp_fwmark_accept), which is an uplink choice. Only then do the uplink
// tables decide, by source address and by mark.
const (
	prioIif      = 0  // + uplink position: what arrives on an uplink routes by main
	prioLAN      = 16 // to a LAN subnet: main, even for answers (their ICMP errors)
	prioReply    = 20 // + position: answer bit + uplink bit: the arrival uplink's table
	prioSuppress = 36 // main without its default routes: more specific routes win
	prioFrom     = 40 // + position: the uplink's own addresses leave by it
	prioMark     = 60 // + position: the mark bits, in preference order
	prioStrict   = 80 // the "no fallback" bit: unreachable
	// BlockSize is how many priorities mhbpf owns from RulePriority on.
	BlockSize = 100
)

// Uplink is one uplink as routing sees it: configuration plus what the
// reconciler observed.
type Uplink struct {
	// Pos is the uplink's place in the preference order (the order of the
	// configuration, 0 first, below 16): its rules' priorities are the
	// block's offsets plus Pos, so the kernel tries the uplinks in that
	// order. Not its slot in the datapath's maps, which stays with its name.
	Pos       int
	Interface string
	Table     int
	Mark      uint32
	Weight    uint16
	Balance   bool
	Tier      uint8
	Gateway   netip.Addr // Ethernet uplinks; point-to-point ones use a device route
	Gateway6  netip.Addr

	Ifindex int // 0: the interface does not exist
	// LinkUp: the interface is up and has an address. Its table keeps its
	// default route then, even while probes fail: the probes themselves
	// leave through that table (bound to the device), and must see the
	// provider come back. New traffic avoids an unhealthy uplink anyway:
	// the datapath no longer chooses it and main no longer lists it.
	LinkUp bool
	Usable bool         // LinkUp, held long enough, probes healthy: in main
	Addrs  []netip.Addr // its global addresses
}

// State is a complete routing state.
type State struct {
	Rules  []netlink.Rule
	Routes []netlink.Route
}

// Desired computes the whole routing state from scratch. lan are the
// subnets of the LAN interfaces.
func Desired(s Settings, uplinks []Uplink, lan []netip.Prefix) State {
	var st State
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		for _, p := range lan {
			if family(p.Addr()) != fam {
				continue
			}
			st.Rules = append(st.Rules, rule(s, fam, prioLAN, func(r *netlink.Rule) {
				r.Dst = prefixNet(p)
				r.Table = unix.RT_TABLE_MAIN
			}))
		}
		st.Rules = append(st.Rules, rule(s, fam, prioSuppress, func(r *netlink.Rule) {
			r.Table = unix.RT_TABLE_MAIN
			// Also /1: 0.0.0.0/1 + 128.0.0.0/1 (OpenVPN's def1,
			// wg-quick) stand in for a default route, which mhbpf owns.
			r.SuppressPrefixlen = 1
		}))
		for _, u := range uplinks {
			st.Rules = append(st.Rules,
				rule(s, fam, prioIif+u.Pos, func(r *netlink.Rule) { r.IifName = u.Interface; r.Table = unix.RT_TABLE_MAIN }),
				rule(s, fam, prioReply+u.Pos, func(r *netlink.Rule) {
					m := u.Mark | s.ReplyMark
					r.Mark, r.Mask, r.Table = m, &m, u.Table
				}),
				rule(s, fam, prioMark+u.Pos, func(r *netlink.Rule) {
					m := u.Mark
					r.Mark, r.Mask, r.Table = u.Mark, &m, u.Table
				}),
			)
			for _, a := range u.Addrs {
				if family(a) != fam {
					continue
				}
				st.Rules = append(st.Rules, rule(s, fam, prioFrom+u.Pos, func(r *netlink.Rule) {
					r.Src = hostNet(a)
					r.Table = u.Table
				}))
			}
		}
		st.Rules = append(st.Rules, rule(s, fam, prioStrict, func(r *netlink.Rule) {
			m := s.StrictMark
			r.Mark, r.Mask = s.StrictMark, &m
			r.Table = unix.RT_TABLE_UNSPEC
			r.Type = unix.RTN_UNREACHABLE
		}))

		// Each live uplink's table: its default route.
		var balanced []Uplink
		for _, u := range uplinks {
			if !(u.LinkUp || u.Usable) || u.Ifindex == 0 || !hasFamily(u, fam) {
				continue
			}
			st.Routes = append(st.Routes, defaultRoute(s, fam, u.Table, []Uplink{u}))
			if u.Usable && u.Balance && u.Weight > 0 {
				balanced = append(balanced, u)
			}
		}
		// main: the usable balanced uplinks of the best tier, by weight.
		if len(balanced) > 0 {
			best := balanced[0].Tier
			for _, u := range balanced {
				best = min(best, u.Tier)
			}
			var tier []Uplink
			for _, u := range balanced {
				if u.Tier == best {
					tier = append(tier, u)
				}
			}
			st.Routes = append(st.Routes, defaultRoute(s, fam, unix.RT_TABLE_MAIN, tier))
		}
	}
	return st
}

// An uplink takes part in a family when it has an address of it. A
// point-to-point IPv4 uplink with no address yet (pppd negotiating) takes
// part in nothing.
func hasFamily(u Uplink, fam int) bool {
	for _, a := range u.Addrs {
		if family(a) == fam {
			return true
		}
	}
	return false
}

func rule(s Settings, fam, offset int, set func(*netlink.Rule)) netlink.Rule {
	r := netlink.NewRule()
	r.Family = fam
	r.Priority = s.RulePriority + offset
	r.Protocol = uint8(s.RouteProtocol)
	set(r)
	return *r
}

func defaultRoute(s Settings, fam, table int, via []Uplink) netlink.Route {
	r := netlink.Route{
		Family:   fam,
		Table:    table,
		Protocol: netlink.RouteProtocol(s.RouteProtocol),
		Dst:      defaultDst(fam),
	}
	hop := func(u Uplink) (int, net.IP, int) {
		gw := u.Gateway
		if fam == netlink.FAMILY_V6 {
			gw = u.Gateway6
		}
		if gw.IsValid() {
			return u.Ifindex, net.IP(gw.AsSlice()), int(netlink.FLAG_ONLINK)
		}
		return u.Ifindex, nil, 0
	}
	if len(via) == 1 {
		idx, gw, flags := hop(via[0])
		r.LinkIndex, r.Gw, r.Flags = idx, gw, flags
		if gw == nil {
			r.Scope = netlink.SCOPE_LINK
		}
		return r
	}
	for _, u := range via {
		idx, gw, flags := hop(u)
		r.MultiPath = append(r.MultiPath, &netlink.NexthopInfo{LinkIndex: idx, Hops: int(u.Weight) - 1, Gw: gw, Flags: flags})
	}
	return r
}

func defaultDst(fam int) *net.IPNet {
	if fam == netlink.FAMILY_V6 {
		return &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	}
	return &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func hostNet(a netip.Addr) *net.IPNet {
	return &net.IPNet{IP: net.IP(a.AsSlice()), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}
}

func family(a netip.Addr) int {
	if a.Is4() || a.Is4In6() {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
}

// RuleKey identifies a rule by everything mhbpf sets on one.
func RuleKey(r *netlink.Rule) string {
	mask := ""
	if r.Mask != nil {
		mask = fmt.Sprintf("%#x", *r.Mask)
	}
	src, dst := "", ""
	if r.Src != nil {
		src = r.Src.String()
	}
	if r.Dst != nil {
		dst = r.Dst.String()
	}
	// The library reads an absent suppress_prefixlength back as -1 (as
	// NewRule sets it) or 0xffffffff, depending on the kernel's answer.
	suppress := ""
	if r.SuppressPrefixlen >= 0 && r.SuppressPrefixlen < 129 {
		suppress = fmt.Sprint(r.SuppressPrefixlen)
	}
	mark := uint32(0)
	if r.Mark != 0 && r.Mark != 0xffffffff {
		mark = r.Mark
	}
	// The action type is not in the key: the netlink library does not read
	// it back. The unreachable rule is the only one of mhbpf's without a
	// table, which tells it apart.
	table := max(r.Table, 0)
	return fmt.Sprintf("f%d p%d t%d m%#x/%s s%s d%s i%s sp%s", r.Family, r.Priority, table, mark, mask, src, dst, r.IifName, suppress)
}

// RouteKey identifies a route by what the kernel keys it by plus its
// next hops, so a changed next hop set is a different route.
func RouteKey(r *netlink.Route) string {
	var hops []string
	if len(r.MultiPath) > 0 {
		for _, h := range r.MultiPath {
			hops = append(hops, fmt.Sprintf("%d/%v/%d", h.LinkIndex, gwString(h.Gw), h.Hops))
		}
		sort.Strings(hops)
	} else {
		hops = append(hops, fmt.Sprintf("%d/%v/0", r.LinkIndex, gwString(r.Gw)))
	}
	return RouteSlot(r) + " " + strings.Join(hops, ",")
}

func gwString(ip net.IP) string {
	if ip == nil {
		return "-"
	}
	return ip.String()
}

// RouteSlot is what the kernel replaces on RouteReplace: one route per
// table, destination and family.
func RouteSlot(r *netlink.Route) string {
	// The kernel reports a default route with or without a 0/0 Dst.
	dst := "default"
	if r.Dst != nil {
		if ones, _ := r.Dst.Mask.Size(); ones != 0 || !r.Dst.IP.IsUnspecified() {
			dst = r.Dst.String()
		}
	}
	return fmt.Sprintf("f%d t%d %s", r.Family, r.Table, dst)
}

// Current reads mhbpf's rules and routes from the kernel.
func Current(h *netlink.Handle, s Settings) (State, error) {
	var st State
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rules, err := retryDump(func() ([]netlink.Rule, error) { return h.RuleList(fam) })
		if err != nil {
			return st, fmt.Errorf("list rules: %w", err)
		}
		for _, r := range rules {
			if ours(s, &r) {
				r.Family = fam
				st.Rules = append(st.Rules, r)
			}
		}
		routes, err := retryDump(func() ([]netlink.Route, error) {
			return h.RouteListFiltered(fam, &netlink.Route{Table: unix.RT_TABLE_UNSPEC, Protocol: netlink.RouteProtocol(s.RouteProtocol)},
				netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
		})
		if err != nil {
			return st, fmt.Errorf("list routes: %w", err)
		}
		for i := range routes {
			routes[i].Family = fam
		}
		st.Routes = append(st.Routes, routes...)
	}
	return st, nil
}

// ours: in mhbpf's priority block. The protocol is checked too where the
// kernel reports it, so a foreign rule someone put in the block is left
// alone.
func ours(s Settings, r *netlink.Rule) bool {
	if r.Priority < s.RulePriority || r.Priority >= s.RulePriority+BlockSize {
		return false
	}
	return r.Protocol == uint8(s.RouteProtocol)
}

func retryDump[T any](f func() ([]T, error)) ([]T, error) {
	var err error
	for range 5 {
		var out []T
		out, err = f()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return out, err
		}
	}
	return nil, err
}

// Apply makes the kernel's state of mhbpf equal to want: stale rules and
// routes go, missing ones come, changed routes are replaced in place (a
// route is never deleted before its replacement is in). It reports what it
// changed.
func Apply(h *netlink.Handle, s Settings, want State) ([]string, error) {
	return ApplyRecording(h, s, want, nil)
}

// ApplyRecording is Apply that first hands the routes it is about to put in
// (each replaces whatever holds its slot) to record, when there are any:
// the place to save what mhbpf replaces, in the passes that replace
// something and no other.
func ApplyRecording(h *netlink.Handle, s Settings, want State, record func(toPut State)) ([]string, error) {
	have, err := Current(h, s)
	if err != nil {
		return nil, err
	}
	return ApplyDiff(h, Changes(have, want), record)
}

// Diff is what turns one state of mhbpf's into another: rules to add and
// delete, routes to put in (each replaces what holds its slot: a route is
// never deleted before its replacement is in) and routes whose slot is no
// longer wanted.
type Diff struct {
	AddRules  []netlink.Rule
	DelRules  []netlink.Rule
	PutRoutes []netlink.Route
	DelRoutes []netlink.Route
}

// Empty: nothing to change.
func (d Diff) Empty() bool {
	return len(d.AddRules)+len(d.DelRules)+len(d.PutRoutes)+len(d.DelRoutes) == 0
}

// Changes is the diff from have to want (both mhbpf's own), pure: the
// planner computes it from an observed state, the fakes of the tests apply
// it to theirs. Its order is stable (want's order, then have's).
func Changes(have, want State) Diff {
	var d Diff
	haveRules := map[string]bool{}
	for _, r := range have.Rules {
		haveRules[RuleKey(&r)] = true
	}
	wantRules := map[string]bool{}
	for _, r := range want.Rules {
		k := RuleKey(&r)
		if !wantRules[k] && !haveRules[k] {
			d.AddRules = append(d.AddRules, r)
		}
		wantRules[k] = true
	}
	for _, r := range have.Rules {
		if k := RuleKey(&r); !wantRules[k] {
			d.DelRules = append(d.DelRules, r)
			wantRules[k] = true // a duplicate goes once
		}
	}
	haveRoutes := map[string]bool{}
	for _, r := range have.Routes {
		haveRoutes[RouteKey(&r)] = true
	}
	wantSlots := map[string]bool{}
	for _, r := range want.Routes {
		wantSlots[RouteSlot(&r)] = true
		if !haveRoutes[RouteKey(&r)] {
			d.PutRoutes = append(d.PutRoutes, r)
		}
	}
	for _, r := range have.Routes {
		if slot := RouteSlot(&r); !wantSlots[slot] {
			d.DelRoutes = append(d.DelRoutes, r)
			wantSlots[slot] = true
		}
	}
	return d
}

// String lists the changes one a line, '+' put in, '-' taken out, in the
// form of State.String.
func (d Diff) String() string {
	var b strings.Builder
	for _, r := range d.AddRules {
		b.WriteString("+ " + FormatRule(&r) + "\n")
	}
	for _, r := range d.DelRules {
		b.WriteString("- " + FormatRule(&r) + "\n")
	}
	for _, r := range d.PutRoutes {
		b.WriteString("+ " + FormatRoute(&r) + "\n")
	}
	for _, r := range d.DelRoutes {
		b.WriteString("- " + FormatRoute(&r) + "\n")
	}
	return b.String()
}

// ApplyDiff makes the changes of d, first handing the routes it puts in to
// record (when there are any). It reports what it changed, by key.
func ApplyDiff(h *netlink.Handle, d Diff, record func(toPut State)) ([]string, error) {
	var changes []string
	var errs []error
	for _, r := range d.AddRules {
		k := RuleKey(&r)
		if err := h.RuleAdd(&r); err != nil && !errors.Is(err, unix.EEXIST) {
			errs = append(errs, fmt.Errorf("add rule %s: %w", k, err))
			continue
		}
		changes = append(changes, "add rule "+k)
	}
	for _, r := range d.DelRules {
		k := RuleKey(&r)
		if err := h.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete rule %s: %w", k, err))
			continue
		}
		changes = append(changes, "delete rule "+k)
	}
	if record != nil && len(d.PutRoutes) > 0 {
		record(State{Routes: d.PutRoutes})
	}
	for _, r := range d.PutRoutes {
		k := RouteKey(&r)
		if err := h.RouteReplace(&r); err != nil {
			errs = append(errs, fmt.Errorf("replace route %s: %w", k, err))
			continue
		}
		changes = append(changes, "route "+k)
	}
	for _, r := range d.DelRoutes {
		slot := RouteSlot(&r)
		if err := h.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete route %s: %w", slot, err))
			continue
		}
		changes = append(changes, "delete route "+slot)
	}
	return changes, errors.Join(errs...)
}

// Remove deletes every rule and route of mhbpf.
func Remove(h *netlink.Handle, s Settings) error {
	_, err := Apply(h, s, State{})
	return err
}
