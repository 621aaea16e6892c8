package bpf_test

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/packet"
)

// tablePrefixes are n4 distinct IPv4 prefixes in 100.64.0.0/10 (lengths
// 24 to 32: the internet's table is mostly /24s, but a /10 holds only
// 16,384 of them) and n6 distinct IPv6 prefixes in 2001:db8::/32 (lengths
// 40 to 64), the same for the same seed.
func tablePrefixes(seed uint64, n4, n6 int) []netip.Prefix {
	rng := rand.New(rand.NewPCG(seed, 1))
	seen := make(map[netip.Prefix]bool, n4+n6)
	out := make([]netip.Prefix, 0, n4+n6)
	for len(out) < n4 {
		a := [4]byte{100, 64 | byte(rng.IntN(64)), byte(rng.IntN(256)), byte(rng.IntN(256))}
		p := netip.PrefixFrom(netip.AddrFrom4(a), 24+rng.IntN(9)).Masked()
		if !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	for len(out) < n4+n6 {
		a := [16]byte{0x20, 0x01, 0x0d, 0xb8, byte(rng.IntN(256)), byte(rng.IntN(256)), byte(rng.IntN(256)), byte(rng.IntN(256))}
		p := netip.PrefixFrom(netip.AddrFrom16(a), 40+rng.IntN(25)).Masked()
		if !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	return out
}

// A policy of 100,000 IPv4 and 20,000 IPv6 prefixes (a country's list,
// many times over) steers by them, and a replacement by another such
// policy leaves one generation of tries behind, not two.
func TestPolicyOfManyPrefixes(t *testing.T) {
	e := newEnv(t)
	toVPN := maps.Action{Uplinks: []maps.Choice{{Uplink: vpn, Weight: 1}}}
	toISP2 := maps.Action{Uplinks: []maps.Choice{{Uplink: isp2, Weight: 1}}}
	for round, act := range []maps.Action{toVPN, toISP2} {
		want := []uint32{markVPN, markISP2}[round]
		list := tablePrefixes(uint64(round), 100_000, 20_000)
		stats, err := e.m.InstallPolicy(maps.Policy{Default: balanced(), Rules: []maps.Rule{{Dst: list, Action: act}}})
		if err != nil {
			t.Fatal(err)
		}
		if stats.Prefixes != len(list) || stats.KernelBytes == 0 {
			t.Fatalf("stats %+v: want %d prefixes and their memory", stats, len(list))
		}
		t.Logf("round %d: %+v", round, stats)
		// Addresses inside listed prefixes (every 1000th), and outside.
		for i := 0; i < len(list); i += 1000 {
			p := syn(ap(list[i].Addr(), 443), ap(list[i].Addr().Next(), 443))
			p.Src = ap(lanHost, uint16(1000+i/1000+round*200))
			if list[i].Addr().Is6() {
				p.Src = ap(lanHost6, p.Src.Port())
			}
			p.Dst = ap(list[i].Addr(), 443)
			if m := e.lanRun(p, 0); m != want {
				t.Fatalf("round %d: %v in %v: mark %#x, want %#x", round, p.Dst, list[i], m, want)
			}
		}
		for _, dst := range []netip.Addr{netip.MustParseAddr("203.0.113.9"), netip.MustParseAddr("2001:db9::1")} {
			src := lanHost
			if dst.Is6() {
				src = lanHost6
			}
			if m := e.lanRun(syn(ap(src, uint16(50+round)), ap(dst, 443)), 0); uplinkOf(m) != isp1 && uplinkOf(m) != isp2 || m&markVPN != 0 {
				t.Fatalf("round %d: %v is in no list: mark %#x, want the default balance", round, dst, m)
			}
		}
		for _, gens := range []*ebpf.Map{e.m.PolicyDst4, e.m.PolicyDst6, e.m.PolicySrc4, e.m.PolicySrc6} {
			n := 0
			var inner *ebpf.Map
			for g := uint32(0); g < 2; g++ {
				if err := gens.Lookup(g, &inner); err == nil {
					n++
					inner.Close()
				}
			}
			if n != 1 {
				t.Fatalf("round %d: %d generations of tries, want the current one only", round, n)
			}
		}
	}
}

// Installing the full table: 1,000,000 IPv4 and 200,000 IPv6 prefixes
// (the goal is under 5 s), and the kernel memory its tries take:
//
//	go test -run '^$' -bench InstallPolicyFullTable -benchtime 3x ./bpf/
func BenchmarkInstallPolicyFullTable(b *testing.B) {
	e := benchEnv(b)
	list := tablePrefixes(7, 1_000_000, 200_000)
	var total time.Duration
	var stats maps.PolicyStats
	for i := 0; i < b.N; i++ {
		var err error
		start := time.Now()
		stats, err = e.m.InstallPolicy(maps.Policy{Default: balanced(), Rules: []maps.Rule{{Dst: list,
			Action: maps.Action{Uplinks: []maps.Choice{{Uplink: vpn, Weight: 1}}}}}})
		if err != nil {
			b.Fatal(err)
		}
		total += time.Since(start)
	}
	b.ReportMetric(total.Seconds()/float64(b.N), "s/install")
	b.ReportMetric(float64(stats.KernelBytes)/1e6, "MB-kernel")
	b.ReportMetric(float64(stats.Prefixes), "prefixes")
	b.ReportMetric(0, "ns/op")
}

// A new flow's cost with policies of 10, 10,000 and 1,000,000 prefixes
// (the goal: within 10% of each other): a destination inside a listed
// prefix, its policy's uplink down so that nothing is recorded and every
// run does the lookup and the choice.
func BenchmarkLANNewFlowPolicyPrefixes(b *testing.B) {
	for _, n := range []int{10, 10_000, 1_000_000} {
		b.Run(fmt.Sprintf("prefixes=%d", n), func(b *testing.B) {
			e := benchEnv(b)
			list := tablePrefixes(9, n, 0)
			e.policy(maps.Policy{Default: balanced(), Rules: []maps.Rule{{Dst: list,
				Action: maps.Action{Uplinks: []maps.Choice{{Uplink: vpn, Weight: 1}}, Fallback: maps.FallbackUnreachable}}}})
			e.uplink(vpn, markVPN, 1, false)
			p := syn(ap(lanHost, 40000), ap(list[len(list)/2].Addr(), 443))
			if m := run(b, e.d.LANProgram(), p.Bytes(), 0); m != markStrict {
				b.Fatalf("mark %#x, want the policy's fail-closed bit alone", m)
			}
			benchProgram(b, e.d.LANProgram(), p.Bytes())
		})
	}
}

var _ = packet.ProtoTCP
