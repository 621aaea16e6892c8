package maps

import (
	"errors"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"

	"github.com/mhbpf/mhbpf/bpf"
)

// StickyChoice is a remembered choice of a policy for a destination (or a
// source and destination pair).
type StickyChoice struct {
	Uplink   int
	LastUsed time.Duration // CLOCK_MONOTONIC
}

// LookupSticky finds the remembered choice of policy id (0: the default)
// for dst, or for src and dst with StickyPair; ok is false if there is
// none. StickyFlow remembers nothing beyond the flow.
func (m *Maps) LookupSticky(policy uint32, mode Sticky, src, dst netip.Addr) (c StickyChoice, ok bool, err error) {
	k := bpf.UplinkStickyKey{Policy: policy, Family: family(dst), Mode: uint8(mode), Daddr: addrWords(dst)}
	if mode == StickyPair {
		k.Saddr = addrWords(src)
	}
	var v bpf.UplinkStickyEntry
	if err := m.Sticky.Lookup(&k, &v); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return c, false, nil
		}
		return c, false, err
	}
	return StickyChoice{Uplink: int(v.Uplink), LastUsed: time.Duration(v.LastUsed)}, true, nil
}
