package maps

import (
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
)

// A converter is found by map name and the shapes of both layouts, not by
// capacity; the latest registration wins.
func TestConverterFor(t *testing.T) {
	from := Layout{Type: ebpf.LRUHash, KeySize: 40, ValueSize: 24, MaxEntries: 4096}
	to := Layout{Type: ebpf.LRUHash, KeySize: 40, ValueSize: 40}
	mark := func(b byte) func(k, v []byte) ([]byte, []byte, bool, error) {
		return func(k, v []byte) ([]byte, []byte, bool, error) { return k, []byte{b}, true, nil }
	}
	RegisterConverter(Converter{Map: "test-flows", From: from, To: to, Convert: mark(1)})
	RegisterConverter(Converter{Map: "test-flows", From: from, To: to, Convert: mark(2)})
	bigger := from
	bigger.MaxEntries = 1 << 20
	c, ok := ConverterFor("test-flows", bigger, to)
	if !ok {
		t.Fatal("no converter for another capacity of the same layout")
	}
	if _, v, _, _ := c.Convert(nil, nil); v[0] != 2 {
		t.Fatalf("converter %d, want the latest registered", v[0])
	}
	other := from
	other.ValueSize = 32
	if _, ok := ConverterFor("test-flows", other, to); ok {
		t.Fatal("converter found for a layout it was not registered for")
	}
	if _, ok := ConverterFor("sticky", from, to); ok {
		t.Fatal("converter found for another map")
	}
}

// What a converter returns is the flow in the current layout.
func TestEncodeFlowRoundTrip(t *testing.T) {
	f := Flow{Key: FlowKey{Proto: 17, Src: netip.MustParseAddrPort("[2001:db8:0:3::10]:5353"), Dst: netip.MustParseAddrPort("[2001:db8::1]:53")},
		Uplink: 3, Origin: OriginPolicy, Mark: 0x80000, FirstSeen: 5, LastSeen: 9}
	k, v := EncodeFlow(f)
	got, err := DecodeFlowKey(k)
	if err != nil || got != f.Key {
		t.Fatalf("key %v (%v), want %v", got, err, f.Key)
	}
	if r := Recency("flows4")(v); r != 9 {
		t.Fatalf("recency %d, want the last-seen time 9", r)
	}
	if _, err := DecodeFlowKey(k[:10]); err == nil {
		t.Fatal("a short key decoded")
	}
}
