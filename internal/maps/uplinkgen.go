package maps

import (
	"fmt"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/mhbpf/mhbpf/bpf"
)

// uplinkWithoutGen is the uplinks map's value before struct uplink had its
// flow generation: the same fields, 4 bytes shorter.
const uplinkWithoutGen = uint32(unsafe.Offsetof(bpf.UplinkUplink{}.Gen))

// An upgrade from a version without flow generations keeps every uplink's
// entry (its mark, state and addresses) instead of rebuilding the map
// empty, which would leave the new programs seeing every uplink down until
// the daemon's first pass. Generation 0 is what every flow record of that
// version carries in the padding that became its gen.
func init() {
	newLayout := Layout{Type: ebpf.Array, KeySize: 4, ValueSize: uint32(unsafe.Sizeof(bpf.UplinkUplink{}))}
	old := newLayout
	old.ValueSize = uplinkWithoutGen
	RegisterConverter(Converter{Map: "uplinks", From: old, To: newLayout, Convert: convertUplinkWithoutGen})
}

func convertUplinkWithoutGen(key, value []byte) ([]byte, []byte, bool, error) {
	if len(value) != int(uplinkWithoutGen) {
		return nil, nil, false, fmt.Errorf("uplink value of %d bytes, want %d", len(value), uplinkWithoutGen)
	}
	v := make([]byte, unsafe.Sizeof(bpf.UplinkUplink{}))
	copy(v, value)
	return key, v, true, nil
}
