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

// ParseOrigin reads why a flow has its uplink: balanced (the default
// policy's weighted choice), policy (a [[policy]] rule matched) or inbound
// (a remote peer started it on that uplink).
func ParseOrigin(s string) (maps.Origin, error) {
	switch strings.ToLower(s) {
	case "":
		return 0, nil
	case "balanced", "default":
		return maps.OriginBalanced, nil
	case "policy":
		return maps.OriginPolicy, nil
	case "inbound":
		return maps.OriginInbound, nil
	}
	return 0, fmt.Errorf("--policy %q: want balanced, policy or inbound (a flow records why it has its uplink, not which rule chose it)", s)
}
