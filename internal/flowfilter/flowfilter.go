// Package flowfilter selects flow records by what a user asks about them:
// the uplink, source and destination (an address or a prefix), the origin
// of the choice and the protocol. It parses the CLI's words; it reads no
// map itself.
package flowfilter

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/mhbpf/mhbpf/internal/maps"
)

// Filter holds the conditions; a zero field matches everything.
type Filter struct {
	Uplink   int // slot; -1: any
	Src, Dst netip.Prefix
	Origin   maps.Origin // 0: any
	Policy   int         // the [[policy]] rule's id (maps.Flow.Policy); 0: any
	Proto    uint8       // 0: any
}

// Any is the filter that keeps every flow.
func Any() Filter { return Filter{Uplink: -1} }

// Match says whether f passes every condition.
func (x Filter) Match(f maps.Flow) bool {
	switch {
	case x.Uplink >= 0 && f.Uplink != x.Uplink:
		return false
	case x.Src.IsValid() && !x.Src.Contains(f.Key.Src.Addr().Unmap()):
		return false
	case x.Dst.IsValid() && !x.Dst.Contains(f.Key.Dst.Addr().Unmap()):
		return false
	case x.Origin != 0 && f.Origin != x.Origin:
		return false
	case x.Policy != 0 && f.Policy != x.Policy:
		return false
	case x.Proto != 0 && f.Key.Proto != x.Proto:
		return false
	}
	return true
}

// ParsePrefix reads "ADDR" (one host) or "ADDR/BITS".
func ParsePrefix(flag, s string) (netip.Prefix, error) {
	if s == "" {
		return netip.Prefix{}, nil
	}
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("--%s %q: not an address or prefix", flag, s)
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("--%s %q: not an address or prefix", flag, s)
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// ParseProto reads tcp, udp, icmp, icmpv6 or a protocol number.
func ParseProto(s string) (uint8, error) {
	switch strings.ToLower(s) {
	case "":
		return 0, nil
	case "tcp":
		return 6, nil
	case "udp":
		return 17, nil
	case "icmp":
		return 1, nil
	case "icmpv6", "ipv6-icmp":
		return 58, nil
	}
	n, err := strconv.ParseUint(s, 10, 8)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("--proto %q: want tcp, udp, icmp, icmpv6 or a protocol number 1-255", s)
	}
	return uint8(n), nil
}

// ParsePolicy reads --policy into x: balanced (the default policy's
// weighted choice), policy (any [[policy]] rule), inbound (a remote peer
// started it on that uplink), or the name of one [[policy]] rule, of those
// the daemon runs (names, in config order: rule i has id i+1). The three
// words come first, so that they mean what they meant before flows knew
// their rule.
func (x *Filter) ParsePolicy(s string, names []string) error {
	switch strings.ToLower(s) {
	case "":
		return nil
	case "balanced", "default":
		x.Origin = maps.OriginBalanced
		return nil
	case "policy":
		x.Origin = maps.OriginPolicy
		return nil
	case "inbound":
		x.Origin = maps.OriginInbound
		return nil
	}
	for i, n := range names {
		if n == s {
			x.Origin, x.Policy = maps.OriginPolicy, i+1
			return nil
		}
	}
	if len(names) == 0 {
		return fmt.Errorf("--policy %q: want balanced, policy, inbound or a [[policy]] name (the daemon's status names none)", s)
	}
	return fmt.Errorf("--policy %q: want balanced, policy, inbound or a [[policy]] name (policies: %s)", s, strings.Join(names, ", "))
}

// PolicyName is the name of the [[policy]] rule with id (maps.Flow.Policy)
// among names (the daemon's, in config order); "" for the default balance,
// an inbound flow or a record that does not know its rule, and "policy N"
// for a rule the names do not cover.
func PolicyName(id int, names []string) string {
	switch {
	case id <= 0:
		return ""
	case id <= len(names):
		return names[id-1]
	}
	return fmt.Sprintf("policy %d", id)
}
