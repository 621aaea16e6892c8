package maps

import (
	"encoding/binary"
	"fmt"
	"sync"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/mhbpf/mhbpf/bpf"
)

// Layout is the shape of a map as the kernel knows it: what decides whether
// a pinned map can serve a newly loaded object as it is.
type Layout struct {
	Type       ebpf.MapType
	KeySize    uint32
	ValueSize  uint32
	MaxEntries uint32
	Flags      uint32
}

// LayoutOf is the layout of a map the kernel holds.
func LayoutOf(m *ebpf.Map) Layout {
	return Layout{Type: m.Type(), KeySize: m.KeySize(), ValueSize: m.ValueSize(), MaxEntries: m.MaxEntries(), Flags: m.Flags()}
}

// LayoutOfSpec is the layout a map spec asks for.
func LayoutOfSpec(s *ebpf.MapSpec) Layout {
	return Layout{Type: s.Type, KeySize: s.KeySize, ValueSize: s.ValueSize, MaxEntries: s.MaxEntries, Flags: s.Flags}
}

func (l Layout) String() string {
	return fmt.Sprintf("%s key %d value %d entries %d flags %#x", l.Type, l.KeySize, l.ValueSize, l.MaxEntries, l.Flags)
}

// SameShape: the same entries fit both (only the capacity may differ), so
// they can be copied byte for byte.
func (l Layout) SameShape(o Layout) bool {
	l.MaxEntries, o.MaxEntries = 0, 0
	return l == o
}

// A Converter rewrites the entries of one map from an older layout to a
// newer one, so that an upgrade whose map layout changed keeps what the
// entries mean (for the flows: each flow's uplink, so that no live
// connection moves). From and To are compared without MaxEntries.
//
// Convert gets one entry's key and value in the old layout (for a per-CPU
// map: called once per CPU's value, with the same key) and returns them in
// the new one; keep false drops the entry.
type Converter struct {
	Map      string
	From, To Layout
	Convert  func(key, value []byte) (newKey, newValue []byte, keep bool, err error)
}

var (
	convertersMu sync.Mutex
	converters   []Converter
)

// RegisterConverter makes c available to the loader. The code that
// changes a map's layout registers the converter from the layout it
// replaces (in an init function next to the change).
func RegisterConverter(c Converter) {
	convertersMu.Lock()
	defer convertersMu.Unlock()
	converters = append(converters, c)
}

// ConverterFor finds the converter of map name from layout from to layout
// to, if one is registered.
func ConverterFor(name string, from, to Layout) (Converter, bool) {
	convertersMu.Lock()
	defer convertersMu.Unlock()
	for i := len(converters) - 1; i >= 0; i-- { // the latest registration wins
		c := converters[i]
		if c.Map == name && c.From.SameShape(from) && c.To.SameShape(to) {
			return c, true
		}
	}
	return Converter{}, false
}

// EncodeFlow is a flow record in the current layout of the flow maps of
// its family (flows4/inbound4 or flows6/inbound6): what a converter from an
// older flow layout returns.
func EncodeFlow(f Flow) (key, value []byte) {
	_, k := flowTable{}.mapAndKey(f.Key)
	v := encodeFlow(f)
	switch k := k.(type) {
	case *bpf.UplinkFlow4Key:
		return structBytes(k), structBytes(v)
	case *bpf.UplinkFlow6Key:
		return structBytes(k), structBytes(v)
	}
	panic("unreachable")
}

// DecodeFlowKey reads a flow key in the current layout of either family
// (told apart by the key's size).
func DecodeFlowKey(b []byte) (FlowKey, error) {
	var k4 bpf.UplinkFlow4Key
	var k6 bpf.UplinkFlow6Key
	switch len(b) {
	case int(unsafe.Sizeof(k4)):
		copy(unsafe.Slice((*byte)(unsafe.Pointer(&k4)), unsafe.Sizeof(k4)), b)
		return key4(&k4), nil
	case int(unsafe.Sizeof(k6)):
		copy(unsafe.Slice((*byte)(unsafe.Pointer(&k6)), unsafe.Sizeof(k6)), b)
		return key6(&k6), nil
	}
	return FlowKey{}, fmt.Errorf("flow key of %d bytes, want %d (IPv4) or %d (IPv6)", len(b), unsafe.Sizeof(k4), unsafe.Sizeof(k6))
}

// structBytes copies a generated map type (explicitly padded, no pointers)
// into its bytes as the kernel sees them.
func structBytes[T any](v *T) []byte {
	return append([]byte(nil), unsafe.Slice((*byte)(unsafe.Pointer(v)), unsafe.Sizeof(*v))...)
}

// Recency says how recently an entry of map name was used, from its value
// in the current layout (nil: the map keeps no such time). Copying into a
// smaller LRU map oldest first keeps the most recent entries.
func Recency(name string) func(value []byte) uint64 {
	switch name {
	case "flows4", "flows6", "inbound4", "inbound6":
		off := unsafe.Offsetof(bpf.UplinkFlow{}.LastSeen)
		return func(v []byte) uint64 { return uint64At(v, off) }
	case "sticky":
		off := unsafe.Offsetof(bpf.UplinkStickyEntry{}.LastUsed)
		return func(v []byte) uint64 { return uint64At(v, off) }
	}
	return nil
}

func uint64At(b []byte, off uintptr) uint64 {
	if len(b) < int(off)+8 {
		return 0
	}
	return binary.NativeEndian.Uint64(b[off:])
}
