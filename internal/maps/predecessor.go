package maps

import (
	"encoding/binary"
	"fmt"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/mhbpf/mhbpf/bpf"
)

// A Split fills maps of the current layout from a map an older version
// pinned under another name: the maps that replaced it (flows became
// flows4 and flows6), or that took some of its entries over (the ifaces
// below IfaceSlots went to iface_slots). The loader finds the old pin,
// makes the new maps from it before the new programs load, copies what the
// old programs recorded meanwhile once the attachments are swapped, and
// then removes the old pin (or, when the old map is still a current one,
// Keep, deletes the entries it moved).
type Split struct {
	From   string
	Layout Layout // From's layout (compared without MaxEntries)
	To     []string
	Keep   bool
	// Convert says which map of To an entry goes to, and the entry in its
	// layout; keep false leaves the entry where it is (Keep) or drops it.
	Convert func(key, value []byte) (to string, newKey, newValue []byte, keep bool, err error)
}

var splits []Split

// RegisterSplit makes s available to the loader (from an init function
// next to the layout change).
func RegisterSplit(s Split) {
	convertersMu.Lock()
	defer convertersMu.Unlock()
	splits = append(splits, s)
}

// Splits are the registered splits.
func Splits() []Split {
	convertersMu.Lock()
	defer convertersMu.Unlock()
	return append([]Split(nil), splits...)
}

// The flow maps of mhbpf up to 5486cce: one LRU hash for both families,
// `flows` and `inbound`, with the family in the key and per-flow counters
// in the value (bpf/include/maps.h of that version).
type oldFlowKey struct {
	Family uint8 // 4 or 6 (struct packet's family, not AF_INET)
	Proto  uint8
	Pad    uint16
	Sport  [2]byte // network order, kept as bytes
	Dport  [2]byte
	Saddr  [16]byte // IPv4 in the first 4 bytes
	Daddr  [16]byte
}

type oldFlowValue struct {
	Mark      uint32
	Uplink    uint8
	Origin    uint8
	Pad       uint16
	FirstSeen uint64
	LastSeen  uint64
	Packets   uint64
	Bytes     uint64
}

// OldFlowLayout is the layout of `flows` and `inbound` before the split
// (max entries aside).
var OldFlowLayout = Layout{Type: ebpf.LRUHash, KeySize: 40, ValueSize: 40}

// splitFlow moves one old flow record into the map of its family, as
// prefix4 or prefix6: packets and bytes are gone (counted per uplink now),
// seen_jiffies 0 makes the first packet refresh last_seen.
func splitFlow(prefix string) func(key, value []byte) (string, []byte, []byte, bool, error) {
	return func(key, value []byte) (string, []byte, []byte, bool, error) {
		var k oldFlowKey
		var v oldFlowValue
		if _, err := binary.Decode(key, binary.NativeEndian, &k); err != nil {
			return "", nil, nil, false, fmt.Errorf("old flow key: %w", err)
		}
		if _, err := binary.Decode(value, binary.NativeEndian, &v); err != nil {
			return "", nil, nil, false, fmt.Errorf("old flow value: %w", err)
		}
		nv := bpf.UplinkFlow{Mark: v.Mark, Uplink: v.Uplink, Origin: v.Origin, FirstSeen: v.FirstSeen, LastSeen: v.LastSeen}
		switch k.Family {
		case 4:
			nk := bpf.UplinkFlow4Key{Saddr: binary.NativeEndian.Uint32(k.Saddr[:4]), Daddr: binary.NativeEndian.Uint32(k.Daddr[:4]),
				Sport: binary.NativeEndian.Uint16(k.Sport[:]), Dport: binary.NativeEndian.Uint16(k.Dport[:]), Proto: k.Proto}
			return prefix + "4", structBytes(&nk), structBytes(&nv), true, nil
		case 6:
			nk := bpf.UplinkFlow6Key{Sport: binary.NativeEndian.Uint16(k.Sport[:]), Dport: binary.NativeEndian.Uint16(k.Dport[:]), Proto: k.Proto}
			for i := range 4 {
				nk.Saddr[i] = binary.NativeEndian.Uint32(k.Saddr[4*i:])
				nk.Daddr[i] = binary.NativeEndian.Uint32(k.Daddr[4*i:])
			}
			return prefix + "6", structBytes(&nk), structBytes(&nv), true, nil
		}
		return "", nil, nil, false, nil // no family the old programs wrote
	}
}

// ifaceSlot moves an interface entry of the ifaces hash whose ifindex now
// has a slot in iface_slots (the key is a native u32 in both).
func ifaceSlot(key, value []byte) (string, []byte, []byte, bool, error) {
	if len(key) != 4 {
		return "", nil, nil, false, fmt.Errorf("ifaces key of %d bytes, want 4", len(key))
	}
	if int(binary.NativeEndian.Uint32(key)) >= IfaceSlots {
		return "", nil, nil, false, nil
	}
	return "iface_slots", key, value, true, nil
}

func init() {
	RegisterSplit(Split{From: "flows", Layout: OldFlowLayout, To: []string{"flows4", "flows6"}, Convert: splitFlow("flows")})
	RegisterSplit(Split{From: "inbound", Layout: OldFlowLayout, To: []string{"inbound4", "inbound6"}, Convert: splitFlow("inbound")})
	ifaceSize := uint32(unsafe.Sizeof(bpf.UplinkIface{}))
	RegisterSplit(Split{From: "ifaces", Layout: Layout{Type: ebpf.Hash, KeySize: 4, ValueSize: ifaceSize},
		To: []string{"iface_slots"}, Keep: true, Convert: ifaceSlot})

	// The policy's prefixes up to 3b49b68: LPM tries in policy_dst4,
	// policy_src4, policy_dst6 and policy_src6, their generation in
	// policy_gen. Range tables took their place under new names, and the
	// generation moved to policy_generation, so that the old programs,
	// which run until the new ones take their place, keep reading their
	// own generation and tries: the new policy is installed before the
	// swap, and switches policy_generation only. The tries themselves do
	// not move (the new tables are built from the configuration).
	RegisterSplit(Split{From: "policy_gen", Layout: Layout{Type: ebpf.Array, KeySize: 4, ValueSize: 4},
		To: []string{"policy_generation"}, Convert: writtenGeneration})
	for _, d := range []string{"dst4", "src4", "dst6", "src6"} {
		RegisterSplit(Split{From: "policy_" + d, Layout: Layout{Type: ebpf.ArrayOfMaps, KeySize: 4, ValueSize: 4},
			To: []string{"policy_ranges_" + d}, Convert: dropEntry})
	}
}

// writtenGeneration moves policy_gen's generation into
// policy_generation, with the bit InstallPolicy sets (a generation 0 would
// be all zero, which a second run of an interrupted upgrade takes for an
// entry not written yet, and would overwrite).
func writtenGeneration(key, value []byte) (string, []byte, []byte, bool, error) {
	if len(value) != 4 {
		return "", nil, nil, false, fmt.Errorf("policy_gen value of %d bytes, want 4", len(value))
	}
	v := append([]byte(nil), value...)
	binary.NativeEndian.PutUint32(v, binary.NativeEndian.Uint32(v)&1|2)
	return "policy_generation", key, v, true, nil
}

// dropEntry moves nothing.
func dropEntry(key, value []byte) (string, []byte, []byte, bool, error) {
	return "", nil, nil, false, nil
}
