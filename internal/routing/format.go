package routing

import (
	"fmt"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// String renders a state the way `ip rule` and `ip route` print it (one
// line each, rules by priority first), for logs and golden tests.
func (st State) String() string {
	var b strings.Builder
	for _, r := range st.Rules {
		b.WriteString(FormatRule(&r))
		b.WriteByte('\n')
	}
	for _, r := range st.Routes {
		b.WriteString(FormatRoute(&r))
		b.WriteByte('\n')
	}
	return b.String()
}

// FormatRule renders one rule as `ip [-6] rule` does.
func FormatRule(r *netlink.Rule) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s%d: from ", famPrefix(r.Family), r.Priority)
	if r.Src != nil {
		b.WriteString(r.Src.String())
	} else {
		b.WriteString("all")
	}
	if r.Dst != nil {
		fmt.Fprintf(&b, " to %s", r.Dst)
	}
	if r.IifName != "" {
		fmt.Fprintf(&b, " iif %s", r.IifName)
	}
	if r.Mask != nil {
		fmt.Fprintf(&b, " fwmark %#x/%#x", r.Mark, *r.Mask)
	}
	switch {
	case r.Type == unix.RTN_UNREACHABLE:
		b.WriteString(" unreachable")
	case r.Table == unix.RT_TABLE_MAIN:
		b.WriteString(" lookup main")
	default:
		fmt.Fprintf(&b, " lookup %d", r.Table)
	}
	if r.SuppressPrefixlen >= 0 && r.SuppressPrefixlen < 129 {
		fmt.Fprintf(&b, " suppress_prefixlength %d", r.SuppressPrefixlen)
	}
	return b.String()
}

// FormatRoute renders one route as `ip [-6] route show table all` does,
// with device indexes for names.
func FormatRoute(r *netlink.Route) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s%s table %d", famPrefix(r.Family), strings.TrimPrefix(RouteSlot(r), fmt.Sprintf("f%d t%d ", r.Family, r.Table)), r.Table)
	hop := func(idx int, gw fmt.Stringer, isNil bool) {
		if !isNil {
			fmt.Fprintf(&b, " via %s", gw)
		}
		fmt.Fprintf(&b, " dev #%d", idx)
	}
	if len(r.MultiPath) == 0 {
		hop(r.LinkIndex, r.Gw, r.Gw == nil)
	}
	for _, h := range r.MultiPath {
		b.WriteString(" nexthop")
		hop(h.LinkIndex, h.Gw, h.Gw == nil)
		fmt.Fprintf(&b, " weight %d", h.Hops+1)
	}
	return b.String()
}

func famPrefix(fam int) string {
	if fam == netlink.FAMILY_V6 {
		return "-6 "
	}
	return ""
}
