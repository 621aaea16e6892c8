package maps

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"

	"github.com/mhbpf/mhbpf/bpf"
)

// Origin says why a flow has its uplink.
type Origin uint8

const (
	OriginBalanced Origin = 1
	OriginPolicy   Origin = 2
	OriginInbound  Origin = 3
)

func (o Origin) String() string {
	switch o {
	case OriginBalanced:
		return "balanced"
	case OriginPolicy:
		return "policy"
	case OriginInbound:
		return "inbound"
	}
	return fmt.Sprintf("origin(%d)", uint8(o))
}

// FlowKey is a flow as seen where it started: Src is the LAN host (outbound)
// or the remote peer (inbound). For ICMP echo, SrcPort is the identifier.
type FlowKey struct {
	Proto uint8
	Src   netip.AddrPort
	Dst   netip.AddrPort
}

func (k FlowKey) String() string {
	return fmt.Sprintf("%s %s -> %s", ProtoName(k.Proto), k.Src, k.Dst)
}

// Flow is one flow record.
type Flow struct {
	Key       FlowKey
	Uplink    int
	Origin    Origin
	Mark      uint32
	FirstSeen time.Duration // CLOCK_MONOTONIC
	LastSeen  time.Duration
	Packets   uint64
	Bytes     uint64
}

func (k FlowKey) encode() bpf.UplinkFlowKey {
	return bpf.UplinkFlowKey{
		Family: family(k.Src.Addr()),
		Proto:  k.Proto,
		Sport:  netPort(k.Src.Port()),
		Dport:  netPort(k.Dst.Port()),
		Saddr:  addrWords(k.Src.Addr()),
		Daddr:  addrWords(k.Dst.Addr()),
	}
}

func decodeFlow(k *bpf.UplinkFlowKey, v *bpf.UplinkFlow) Flow {
	return Flow{
		Key: FlowKey{
			Proto: k.Proto,
			Src:   netip.AddrPortFrom(addrFrom(k.Family, k.Saddr), netPort(k.Sport)),
			Dst:   netip.AddrPortFrom(addrFrom(k.Family, k.Daddr), netPort(k.Dport)),
		},
		Uplink:    int(v.Uplink),
		Origin:    Origin(v.Origin),
		Mark:      v.Mark,
		FirstSeen: time.Duration(v.FirstSeen),
		LastSeen:  time.Duration(v.LastSeen),
		Packets:   v.Packets,
		Bytes:     v.Bytes,
	}
}

// flowMaps are the maps that hold flows: the LAN's (and the answers of
// port forwards) and the inbound records of the uplinks.
func (m *Maps) flowMaps() []*ebpf.Map { return []*ebpf.Map{m.Flows, m.Inbound} }

// LookupFlow finds one flow; ok is false if there is none.
func (m *Maps) LookupFlow(k FlowKey) (f Flow, ok bool, err error) {
	bk := k.encode()
	var v bpf.UplinkFlow
	for _, fm := range m.flowMaps() {
		err := fm.Lookup(&bk, &v)
		if err == nil {
			return decodeFlow(&bk, &v), true, nil
		}
		if !errors.Is(err, ebpf.ErrKeyNotExist) {
			return Flow{}, false, err
		}
	}
	return Flow{}, false, nil
}

// PutFlow records a flow (tests and state restores use it; the programs
// record flows themselves).
func (m *Maps) PutFlow(f Flow) error {
	bk := f.Key.encode()
	v := bpf.UplinkFlow{Mark: f.Mark, Uplink: uint8(f.Uplink), Origin: uint8(f.Origin),
		FirstSeen: uint64(f.FirstSeen), LastSeen: uint64(f.LastSeen), Packets: f.Packets, Bytes: f.Bytes}
	return m.Flows.Put(&bk, &v)
}

// DeleteFlow forgets one flow; deleting a missing flow is not an error.
func (m *Maps) DeleteFlow(k FlowKey) error {
	bk := k.encode()
	var errs []error
	for _, fm := range m.flowMaps() {
		errs = append(errs, ignoreNotExist(fm.Delete(&bk)))
	}
	return errors.Join(errs...)
}

// WalkFlows calls fn for every flow until fn returns false. The map changes
// while it is walked: a flow may be missed or seen twice, never invented.
func (m *Maps) WalkFlows(fn func(Flow) bool) error {
	var k bpf.UplinkFlowKey
	var v bpf.UplinkFlow
	for _, fm := range m.flowMaps() {
		it := fm.Iterate()
		for it.Next(&k, &v) {
			if !fn(decodeFlow(&k, &v)) {
				return nil
			}
		}
		if err := it.Err(); err != nil {
			return err
		}
	}
	return nil
}

// DeleteFlowsOfUplink forgets every flow on uplink id, and the remote
// endpoints that point to it, so their next packet chooses again. It returns
// how many flows it deleted.
func (m *Maps) DeleteFlowsOfUplink(id int) (int, error) {
	n := 0
	for _, fm := range m.flowMaps() {
		var keys []bpf.UplinkFlowKey
		var k bpf.UplinkFlowKey
		var v bpf.UplinkFlow
		it := fm.Iterate()
		for it.Next(&k, &v) {
			if int(v.Uplink) == id {
				keys = append(keys, k)
			}
		}
		if err := it.Err(); err != nil {
			return n, err
		}
		for i := range keys {
			if err := fm.Delete(&keys[i]); err == nil {
				n++
			} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
				return n, err
			}
		}
	}

	var rk bpf.UplinkRemoteKey
	var rv bpf.UplinkRemote
	var rkeys []bpf.UplinkRemoteKey
	rit := m.Remotes.Iterate()
	for rit.Next(&rk, &rv) {
		if int(rv.Uplink) == id {
			rkeys = append(rkeys, rk)
		}
	}
	for i := range rkeys {
		_ = m.Remotes.Delete(&rkeys[i])
	}
	return n, rit.Err()
}

// ProtoName is the usual name of an IP protocol number.
func ProtoName(p uint8) string {
	switch p {
	case 1:
		return "icmp"
	case 6:
		return "tcp"
	case 17:
		return "udp"
	case 58:
		return "icmpv6"
	}
	return fmt.Sprintf("proto%d", p)
}
