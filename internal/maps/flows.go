package maps

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/bpf"
)

// Origin says why a flow has its uplink.
type Origin uint8

const (
	OriginBalanced = Origin(bpf.UplinkOriginORIGIN_BALANCED)
	OriginPolicy   = Origin(bpf.UplinkOriginORIGIN_POLICY)
	OriginInbound  = Origin(bpf.UplinkOriginORIGIN_INBOUND)
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

// Flow is one flow record. The times are CLOCK_MONOTONIC, from the
// kernel's coarse clock (a tick); LastSeen is refreshed by the programs at
// most once a second (LastSeenStep).
type Flow struct {
	Key    FlowKey
	Uplink int
	Origin Origin
	// Policy is the [[policy]] rule that chose the uplink: rule i (in
	// config order, daemon.Status.Policies) is i+1. 0: the default
	// balance, an inbound flow, or not known (a record from before the
	// datapath stored it).
	Policy int
	Mark   uint32
	// Gen is the uplink's generation the flow was recorded under: once the
	// uplink's has moved on (it went down), the record is retired
	// (FlowGenerations.Current).
	Gen       uint32
	FirstSeen time.Duration
	LastSeen  time.Duration
}

// LastSeenStep is how often at most a packet of a known flow refreshes its
// record (LAST_SEEN_STEP_NS): a flow's LastSeen is up to this old.
const LastSeenStep = time.Second

// flowTable is one kind of flow (the LAN's, or the inbound records) in its
// two maps: IPv4 flows have a compact key of their own.
type flowTable struct{ v4, v6 *ebpf.Map }

func (m *Maps) lanFlows() flowTable     { return flowTable{m.Flows4, m.Flows6} }
func (m *Maps) inboundFlows() flowTable { return flowTable{m.Inbound4, m.Inbound6} }

// flowTables are the tables that hold flows: the LAN's (and the answers of
// port forwards) and the inbound records of the uplinks.
func (m *Maps) flowTables() []flowTable { return []flowTable{m.lanFlows(), m.inboundFlows()} }

// mapAndKey is the map of k's family and k in its layout.
func (t flowTable) mapAndKey(k FlowKey) (*ebpf.Map, any) {
	if k.Src.Addr().Is4() {
		return t.v4, &bpf.UplinkFlow4Key{Saddr: addr4(k.Src.Addr()), Daddr: addr4(k.Dst.Addr()),
			Sport: netPort(k.Src.Port()), Dport: netPort(k.Dst.Port()), Proto: k.Proto}
	}
	return t.v6, &bpf.UplinkFlow6Key{Saddr: addr16(k.Src.Addr()), Daddr: addr16(k.Dst.Addr()),
		Sport: netPort(k.Src.Port()), Dport: netPort(k.Dst.Port()), Proto: k.Proto}
}

func (t flowTable) lookup(k FlowKey) (Flow, bool, error) {
	mp, bk := t.mapAndKey(k)
	var v bpf.UplinkFlow
	err := mp.Lookup(bk, &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return Flow{}, false, nil
	}
	if err != nil {
		return Flow{}, false, err
	}
	return decodeFlow(k, &v), true, nil
}

func (t flowTable) put(f Flow) error {
	mp, bk := t.mapAndKey(f.Key)
	return mp.Put(bk, encodeFlow(f))
}

func (t flowTable) delete(k FlowKey) error {
	mp, bk := t.mapAndKey(k)
	return mp.Delete(bk)
}

// walk calls fn for every flow, IPv4 first, until fn returns false (then
// walk returns false).
func (t flowTable) walk(fn func(Flow) bool) (bool, error) {
	if more, err := walkMap(t.v4, key4, fn); err != nil || !more {
		return false, err
	}
	return walkMap(t.v6, key6, fn)
}

// WalkBatch is how many flows one batch lookup reads: one syscall per
// WalkBatch flows instead of two per flow (about 0.3 MB of buffers for
// IPv6).
const WalkBatch = 4096

// batchLookups is false only in tests of the key-by-key walk.
var batchLookups = true

// walkMap calls fn for every flow of one map (K is its key layout, key
// its decoder) until fn returns false. It reads WalkBatch entries a
// syscall (BPF_MAP_LOOKUP_BATCH: hash and LRU maps since 5.6), and key by
// key where the kernel refuses batch lookups. A batch walk goes bucket by
// bucket, so flows added or removed meanwhile are missed or seen, the
// others seen once; a key-by-key walk starts over when the key it stands
// on is deleted (an LRU eviction), so it may see flows twice.
func walkMap[K any](mp *ebpf.Map, key func(*K) FlowKey, fn func(Flow) bool) (bool, error) {
	if batchLookups {
		if more, batched, err := walkBatched(mp, key, fn); batched {
			return more, err
		}
	}
	var k K
	var v bpf.UplinkFlow
	it := mp.Iterate()
	for it.Next(&k, &v) {
		if !fn(decodeFlow(key(&k), &v)) {
			return false, nil
		}
	}
	return true, it.Err()
}

// walkBatched is walkMap with batch lookups; batched is false when the
// kernel refused the first one (nothing was passed to fn then).
func walkBatched[K any](mp *ebpf.Map, key func(*K) FlowKey, fn func(Flow) bool) (more, batched bool, err error) {
	keys := make([]K, WalkBatch)
	vals := make([]bpf.UplinkFlow, WalkBatch)
	var cursor ebpf.MapBatchCursor
	for first := true; ; first = false {
		n, err := mp.BatchLookup(&cursor, keys, vals, nil)
		end := errors.Is(err, ebpf.ErrKeyNotExist) // the last batch, maybe empty
		if err != nil && !end {
			if first && batchRefused(err) {
				return false, false, nil
			}
			return false, true, fmt.Errorf("batch lookup in %s: %w", mapName(mp), err)
		}
		for i := range n {
			if !fn(decodeFlow(key(&keys[i]), &vals[i])) {
				return false, true, nil
			}
		}
		if end {
			return true, true, nil
		}
	}
}

// batchRefused: the kernel has no batch lookups for this map (ENOTSUPP:
// before 5.6, or a map type without them; EINVAL: a kernel that does not
// know the command's attributes).
func batchRefused(err error) bool {
	return errors.Is(err, ebpf.ErrNotSupported) || errors.Is(err, unix.EINVAL)
}

func mapName(mp *ebpf.Map) string {
	if info, err := mp.Info(); err == nil && info.Name != "" {
		return info.Name
	}
	return mp.String()
}

func key4(k *bpf.UplinkFlow4Key) FlowKey {
	return FlowKey{Proto: k.Proto,
		Src: netip.AddrPortFrom(addrFrom(4, [4]uint32{k.Saddr}), netPort(k.Sport)),
		Dst: netip.AddrPortFrom(addrFrom(4, [4]uint32{k.Daddr}), netPort(k.Dport))}
}

func key6(k *bpf.UplinkFlow6Key) FlowKey {
	return FlowKey{Proto: k.Proto,
		Src: netip.AddrPortFrom(addrFrom(6, k.Saddr), netPort(k.Sport)),
		Dst: netip.AddrPortFrom(addrFrom(6, k.Daddr), netPort(k.Dport))}
}

func decodeFlow(k FlowKey, v *bpf.UplinkFlow) Flow {
	return Flow{
		Key:       k,
		Uplink:    int(v.Uplink),
		Origin:    Origin(v.Origin),
		Policy:    int(v.Policy),
		Mark:      v.Mark,
		Gen:       v.Gen,
		FirstSeen: time.Duration(v.FirstSeen),
		LastSeen:  time.Duration(v.LastSeen),
	}
}

func encodeFlow(f Flow) *bpf.UplinkFlow {
	return &bpf.UplinkFlow{Mark: f.Mark, Uplink: uint8(f.Uplink), Origin: uint8(f.Origin), Policy: uint16(f.Policy), Gen: f.Gen,
		FirstSeen: uint64(f.FirstSeen), LastSeen: uint64(f.LastSeen)}
}

// LookupFlow finds one flow; ok is false if there is none.
func (m *Maps) LookupFlow(k FlowKey) (f Flow, ok bool, err error) {
	for _, t := range m.flowTables() {
		if f, ok, err := t.lookup(k); ok || err != nil {
			return f, ok, err
		}
	}
	return Flow{}, false, nil
}

// PutFlow records a flow of the LAN (tests and state restores use it; the
// programs record flows themselves).
func (m *Maps) PutFlow(f Flow) error { return m.lanFlows().put(f) }

// DeleteFlow forgets one flow; deleting a missing flow is not an error.
func (m *Maps) DeleteFlow(k FlowKey) error {
	var errs []error
	for _, t := range m.flowTables() {
		errs = append(errs, ignoreNotExist(t.delete(k)))
	}
	return errors.Join(errs...)
}

// WalkFlows calls fn for every flow until fn returns false. The map changes
// while it is walked: a flow may be missed or seen twice, never invented.
func (m *Maps) WalkFlows(fn func(Flow) bool) error {
	for _, t := range m.flowTables() {
		if more, err := t.walk(fn); err != nil || !more {
			return err
		}
	}
	return nil
}

// WalkLiveFlows is WalkFlows without the records an uplink's failure
// retired (FlowGenerations.Current): what a user asks about when asking
// which flows there are. The generations are read once, before the walk.
func (m *Maps) WalkLiveFlows(fn func(Flow) bool) error {
	gens, err := m.FlowGenerations()
	if err != nil {
		return err
	}
	return m.WalkFlows(func(f Flow) bool { return !gens.Current(f) || fn(f) })
}

// WalkLANFlows is WalkFlows over the LAN's flows only (not the inbound
// records).
func (m *Maps) WalkLANFlows(fn func(Flow) bool) error {
	_, err := m.lanFlows().walk(fn)
	return err
}

// DeleteFlowsOfUplink forgets every flow on uplink id, and the remote
// endpoints that point to it, so their next packet chooses again. It returns
// how many flows it deleted.
func (m *Maps) DeleteFlowsOfUplink(id int) (int, error) {
	return m.DeleteFlowsOf(func(u int) bool { return u == id })
}

// DeleteFlowsOf is DeleteFlowsOfUplink for every uplink of that says so,
// in one walk of each map (flushing all uplinks walks once, not once per
// slot).
func (m *Maps) DeleteFlowsOf(of func(uplink int) bool) (int, error) {
	n := 0
	for _, t := range m.flowTables() {
		var keys []FlowKey
		if _, err := t.walk(func(f Flow) bool {
			if of(f.Uplink) {
				keys = append(keys, f.Key)
			}
			return true
		}); err != nil {
			return n, err
		}
		for _, k := range keys {
			if err := t.delete(k); err == nil {
				n++
			} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
				return n, err
			}
		}
	}
	_, err := m.deleteRemotesOf(of)
	return n, err
}

// DeleteRemotesOfUplink forgets the remote endpoints the LAN reached by
// uplink id (what tells a UDP answer from an opener on the uplinks), and
// says how many. A walk of the remotes map: the daemon does it after the
// routing change of a failure, never before.
func (m *Maps) DeleteRemotesOfUplink(id int) (int, error) {
	return m.deleteRemotesOf(func(u int) bool { return u == id })
}

func (m *Maps) deleteRemotesOf(of func(uplink int) bool) (int, error) {
	var rk bpf.UplinkRemoteKey
	var rv bpf.UplinkRemote
	var rkeys []bpf.UplinkRemoteKey
	rit := m.Remotes.Iterate()
	for rit.Next(&rk, &rv) {
		if of(int(rv.Uplink)) {
			rkeys = append(rkeys, rk)
		}
	}
	n := 0
	for i := range rkeys {
		if m.Remotes.Delete(&rkeys[i]) == nil {
			n++
		}
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
