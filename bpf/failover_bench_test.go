package bpf_test

import (
	"fmt"
	"testing"

	"github.com/mhbpf/mhbpf/bpf"
	"github.com/mhbpf/mhbpf/internal/loader"
)

// What an uplink going down costs the control plane, by flow count:
//
//	go test -run '^$' -bench 'UplinkDown' -benchtime 3x ./bpf/
//
// RetiresFlows is what the daemon does (one map write: the uplink's
// generation moves on); DeletesFlows is the walk it replaced, which
// `mhbpf flows flush --uplink` still does when asked to.
func BenchmarkUplinkDownRetiresFlows(b *testing.B) {
	for _, n := range []int{10_000, 100_000, 1_000_000} {
		b.Run(fmt.Sprintf("flows=%d", n), func(b *testing.B) {
			e := newEnvWith(b, loader.Options{FlowMapSize: uint32(n)})
			fillFlows4(b, e, n)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := e.m.ForgetFlowsOfUplink(isp1); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkUplinkDownDeletesFlows(b *testing.B) {
	for _, n := range []int{10_000, 100_000} {
		b.Run(fmt.Sprintf("flows=%d", n), func(b *testing.B) {
			e := newEnvWith(b, loader.Options{FlowMapSize: uint32(n)})
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				fillFlows4(b, e, n)
				b.StartTimer()
				if _, err := e.m.DeleteFlowsOfUplink(isp1); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// fillFlows4 fills the IPv4 flow map with n flows, every other one on isp1.
func fillFlows4(b *testing.B, e *env, n int) {
	b.Helper()
	const chunk = 16384
	keys := make([]bpf.UplinkFlow4Key, 0, chunk)
	vals := make([]bpf.UplinkFlow, 0, chunk)
	for i := 0; i < n; i++ {
		keys = append(keys, bpf.UplinkFlow4Key{Saddr: 0x0a024064 /* 100.64.2.10 */, Daddr: 100 | 96<<8 | uint32(i>>16)<<16,
			Sport: uint16(i), Dport: 443, Proto: 6})
		vals = append(vals, bpf.UplinkFlow{Mark: markISP1 << uint(i%2), Uplink: uint8(i % 2)})
		if len(keys) == chunk || i == n-1 {
			if _, err := e.m.Flows4.BatchUpdate(keys, vals, nil); err != nil {
				b.Fatal(err)
			}
			keys, vals = keys[:0], vals[:0]
		}
	}
}
