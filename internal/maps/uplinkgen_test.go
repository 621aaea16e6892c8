package maps

import (
	"testing"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/mhbpf/mhbpf/bpf"
)

func TestUplinkEntryGainsGeneration(t *testing.T) {
	want := bpf.UplinkUplink{Mark: 0x20000, Ifindex: 7, Weight: 8, Tier: 1, Up: 1, Addr4: 0x01020304, Addr6: [4]uint32{1, 2, 3, 4}}
	full := structBytes(&want)
	old := full[:uplinkWithoutGen]
	newL := Layout{Type: ebpf.Array, KeySize: 4, ValueSize: uint32(len(full))}
	oldL := newL
	oldL.ValueSize = uint32(len(old))
	c, ok := ConverterFor("uplinks", oldL, newL)
	if !ok {
		t.Fatalf("no converter for the uplinks map from %v to %v", oldL, newL)
	}
	k, v, keep, err := c.Convert([]byte{1, 0, 0, 0}, old)
	if err != nil || !keep {
		t.Fatalf("convert: keep %v, %v", keep, err)
	}
	var got bpf.UplinkUplink
	copy(unsafe.Slice((*byte)(unsafe.Pointer(&got)), unsafe.Sizeof(got)), v)
	if got != want || got.Gen != 0 || len(k) != 4 {
		t.Fatalf("converted %+v, want %+v with generation 0", got, want)
	}
	if _, _, _, err := c.Convert([]byte{1, 0, 0, 0}, full); err == nil {
		t.Fatal("a value of the new size converted as an old one")
	}
}
