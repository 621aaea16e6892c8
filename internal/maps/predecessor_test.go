package maps

import (
	"bytes"
	"encoding/binary"
	"testing"
	"unsafe"

	"github.com/mhbpf/mhbpf/bpf"
)

// The split of the previous version's flow records, byte for byte: the
// old offsets from 5486cce's bpf/include/maps.h, the new ones from the
// generated types (today's C). No root: pure bytes.
func TestSplitFlowBytes(t *testing.T) {
	if s := unsafe.Sizeof(oldFlowKey{}); s != 40 {
		t.Fatalf("old flow_key is %d bytes, was 40", s)
	}
	if s := unsafe.Sizeof(oldFlowValue{}); s != 40 {
		t.Fatalf("old flow is %d bytes, was 40", s)
	}
	val := make([]byte, 40)
	binary.NativeEndian.PutUint32(val[0:], 0x20000) // mark
	val[4], val[5] = 1, 2                           // uplink, origin
	binary.NativeEndian.PutUint64(val[8:], 111)     // first_seen
	binary.NativeEndian.PutUint64(val[16:], 222)    // last_seen
	binary.NativeEndian.PutUint64(val[24:], 333)    // packets
	binary.NativeEndian.PutUint64(val[32:], 444)    // bytes

	key4 := make([]byte, 40)
	key4[0], key4[1] = 4, 6
	copy(key4[4:], []byte{0x9c, 0x40, 0x01, 0xbb}) // sport 40000, dport 443
	copy(key4[8:], []byte{100, 64, 2, 10})
	copy(key4[24:], []byte{203, 0, 113, 7})
	to, k, v, ok, err := splitFlow("flows")(key4, val)
	if err != nil || !ok || to != "flows4" {
		t.Fatalf("IPv4: %s %v %v", to, ok, err)
	}
	// flow4_key {be32 saddr; be32 daddr; be16 sport; be16 dport; u8 proto; u8 pad[3]}
	want4 := []byte{100, 64, 2, 10, 203, 0, 113, 7, 0x9c, 0x40, 0x01, 0xbb, 6, 0, 0, 0}
	if !bytes.Equal(k, want4) {
		t.Fatalf("IPv4 key % x, want % x", k, want4)
	}
	if fk, err := DecodeFlowKey(k); err != nil || fk.String() != "tcp 100.64.2.10:40000 -> 203.0.113.7:443" {
		t.Fatalf("IPv4 key decodes as %v (%v)", fk, err)
	}
	// flow {u32 mark; u8 uplink; u8 origin; u16 pad; u32 seen_jiffies; u32 pad2; u64 first_seen; u64 last_seen}
	if len(v) != int(unsafe.Sizeof(bpf.UplinkFlow{})) || binary.NativeEndian.Uint32(v[0:]) != 0x20000 || v[4] != 1 || v[5] != 2 ||
		binary.NativeEndian.Uint32(v[8:]) != 0 || binary.NativeEndian.Uint64(v[16:]) != 111 || binary.NativeEndian.Uint64(v[24:]) != 222 {
		t.Fatalf("value % x", v)
	}

	key6 := make([]byte, 40)
	key6[0], key6[1] = 6, 17
	copy(key6[4:], []byte{0x9c, 0x41, 0x00, 0x35})
	src := []byte{0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10}
	dst := []byte{0x20, 0x01, 0x0d, 0xb8, 0, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x07}
	copy(key6[8:], src)
	copy(key6[24:], dst)
	to, k, _, ok, err = splitFlow("inbound")(key6, val)
	if err != nil || !ok || to != "inbound6" {
		t.Fatalf("IPv6: %s %v %v", to, ok, err)
	}
	// flow6_key {u32 saddr[4]; u32 daddr[4]; be16 sport; be16 dport; u8 proto; u8 pad[3]}
	want6 := append(append(append([]byte{}, src...), dst...), 0x9c, 0x41, 0x00, 0x35, 17, 0, 0, 0)
	if !bytes.Equal(k, want6) {
		t.Fatalf("IPv6 key % x, want % x", k, want6)
	}

	key4[0] = 2 // AF_INET: never written by the old programs (family was 4 or 6)
	if _, _, _, ok, err := splitFlow("flows")(key4, val); ok || err != nil {
		t.Fatalf("family 2 kept (%v, %v)", ok, err)
	}
}
