package bpf_test

import (
	"errors"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/packet"
)

// Whatever bytes arrive, the programs pass the packet (TC_ACT_OK) and keep
// every mark bit outside mhbpf's mask. `go test` runs the seeds; run
// `go test -fuzz FuzzTCPrograms ./bpf/` to search further.
func FuzzTCPrograms(f *testing.F) {
	for _, p := range []packet.Packet{
		syn(ap(lanHost, 1), ap(remote, 80)),
		syn(ap(lanHost6, 1), ap(remote6, 80)),
		{Src: ap(lanHost, 5), Dst: ap(remote, 53), Proto: packet.ProtoUDP, L3: true},
		{Src: ap(lanHost6, 5), Dst: ap(remote6, 0), Proto: packet.ProtoICMPv6, ICMPType: 128, Ext: []uint8{0, 44}},
	} {
		f.Add(p.Bytes(), uint32(0xdeadbeef), false)
		f.Add(p.Bytes(), uint32(0), true)
	}
	e := newEnvTB(f)
	f.Fuzz(func(t *testing.T, data []byte, mark uint32, l3 bool) {
		for _, role := range []maps.Role{maps.RoleLAN, maps.RoleUplink} {
			if err := e.m.SetIface(testIfindex, maps.Iface{Role: role, L3Offset: l3off(l3)}); err != nil {
				t.Fatal(err)
			}
			prog := e.d.LANProgram()
			if role == maps.RoleUplink {
				prog = e.d.UplinkProgram()
			}
			var out skbContext
			ret, err := prog.Run(&ebpf.RunOptions{Data: data, Context: skbContext{Mark: mark}, ContextOut: &out})
			if errors.Is(err, unix.EINVAL) {
				return // the kernel refuses to run it (too short for an skb)
			}
			if err != nil {
				t.Fatal(err)
			}
			if ret != 0 {
				t.Fatalf("role %d returned %d for %x", role, ret, data)
			}
			if out.Mark&^markMask != mark&^markMask {
				t.Fatalf("role %d changed bits outside the mask: %#x -> %#x", role, mark, out.Mark)
			}
		}
	})
}
