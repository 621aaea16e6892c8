package bpf_test

import (
	"encoding/binary"
	"fmt"
	"math/bits"
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

// spreadPrefixes are n4 IPv4 prefixes spread over the whole IPv4 space and
// n6 IPv6 ones over 2000::/3, each alone in its slot of the space (none
// touches another, so nothing merges: 2n+1 ranges, the most n prefixes
// make), of random lengths that fit the slot; rule i%2 owns prefix i,
// e.g. a policy's two lists interleaved, the same for the same seed.
func spreadPrefixes(seed uint64, n4, n6 int) (lists [2][]netip.Prefix) {
	rng := rand.New(rand.NewPCG(seed, 2))
	if n4 > 0 {
		slot := uint64(1) << 32 / uint64(2*n4) // the slot's free half keeps neighbours apart
		minBits := 32 - (bits.Len64(slot) - 1)
		for i := 0; i < n4; i++ {
			bitsN := minBits + rng.IntN(33-minBits)
			a := uint32(uint64(i) * 2 * slot)
			var b [4]byte
			binary.BigEndian.PutUint32(b[:], a)
			lists[i%2] = append(lists[i%2], netip.PrefixFrom(netip.AddrFrom4(b), bitsN).Masked())
		}
	}
	if n6 > 0 {
		// 2000::/3: the slots are spread over its top 64 bits.
		slot := (uint64(1) << 61) / uint64(2*n6)
		minBits := 3 + 61 - (bits.Len64(slot) - 1)
		for i := 0; i < n6; i++ {
			bitsN := minBits + rng.IntN(min(64, 128-minBits))
			var b [16]byte
			binary.BigEndian.PutUint64(b[:8], 1<<61|uint64(i)*2*slot)
			lists[i%2] = append(lists[i%2], netip.PrefixFrom(netip.AddrFrom16(b), bitsN).Masked())
		}
	}
	return lists
}

// tablePrefixesNoMerge are n4 IPv4 prefixes in 100.64.0.0/10 and n6 IPv6
// ones in 2001:db8::/32, each alone in its slot (none touching another,
// so nothing merges), of random lengths that fit it.
func tablePrefixesNoMerge(seed uint64, n4, n6 int) []netip.Prefix {
	rng := rand.New(rand.NewPCG(seed, 3))
	var out []netip.Prefix
	if n4 > 0 {
		slot := uint64(1) << 22 / uint64(2*n4)
		minBits := 32 - (bits.Len64(max(slot, 1)) - 1)
		for i := 0; i < n4; i++ {
			var b [4]byte
			binary.BigEndian.PutUint32(b[:], 100<<24|64<<16+uint32(uint64(i)*2*slot))
			out = append(out, netip.PrefixFrom(netip.AddrFrom4(b), minBits+rng.IntN(33-minBits)).Masked())
		}
	}
	if n6 > 0 {
		slot := uint64(1) << 32 / uint64(2*n6)
		minBits := 64 - (bits.Len64(slot) - 1)
		for i := 0; i < n6; i++ {
			var b [16]byte
			binary.BigEndian.PutUint64(b[:8], 0x20010db8<<32|uint64(i)*2*slot)
			out = append(out, netip.PrefixFrom(netip.AddrFrom16(b), minBits+rng.IntN(65-minBits)).Masked())
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
		for _, gens := range []*ebpf.Map{e.m.PolicyRangesDst4, e.m.PolicyRangesDst6, e.m.PolicyRangesSrc4, e.m.PolicyRangesSrc6} {
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
	lists := spreadPrefixes(7, 1_000_000, 200_000)
	var total time.Duration
	var stats maps.PolicyStats
	for i := 0; i < b.N; i++ {
		var err error
		start := time.Now()
		via := maps.Action{Uplinks: []maps.Choice{{Uplink: vpn, Weight: 1}}}
		stats, err = e.m.InstallPolicy(maps.Policy{Default: balanced(), Rules: []maps.Rule{{Dst: lists[0], Action: via}, {Dst: lists[1], Action: via}}})
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

// A new flow's cost with policies of 10, 10,000 and 1,000,000 IPv4
// prefixes, and of 10, 10,000 and 200,000 IPv6 ones (the goal: within 10%
// of the 10-prefix policy): a destination inside a listed prefix, its
// policy's uplink down so that nothing is recorded and every run does the
// lookup and the choice.
func BenchmarkLANNewFlowPolicyPrefixes(b *testing.B) {
	for _, c := range []struct {
		family string
		n      int
		// clustered: the list fills one /10 (IPv4) or /32 (IPv6),
		// and one prefix far away: the part all prefixes share is
		// short, the direct index cuts only a few bits into the
		// cluster, and the binary search in its entries is long (the
		// range tables' worst case; about the trie's cost).
		clustered bool
	}{{"ipv4", 10, false}, {"ipv4", 10_000, false}, {"ipv4", 1_000_000, false}, {"ipv4", 1_000_000, true},
		{"ipv6", 10, false}, {"ipv6", 10_000, false}, {"ipv6", 200_000, false}, {"ipv6", 200_000, true}} {
		name := fmt.Sprintf("%s/prefixes=%d", c.family, c.n)
		if c.clustered {
			name += "/clustered"
		}
		b.Run(name, func(b *testing.B) {
			e := benchEnv(b)
			var lists [2][]netip.Prefix
			src := lanHost
			switch {
			case c.family == "ipv4" && c.clustered:
				lists[0] = append(tablePrefixesNoMerge(9, c.n, 0), netip.MustParsePrefix("8.8.8.0/24"))
			case c.family == "ipv4":
				lists = spreadPrefixes(9, c.n, 0)
			case c.clustered:
				lists[0], src = append(tablePrefixesNoMerge(9, 0, c.n), netip.MustParsePrefix("2a00:1450::/32")), lanHost6
			default:
				lists, src = spreadPrefixes(9, 0, c.n), lanHost6
			}
			vpnOnly := maps.Action{Uplinks: []maps.Choice{{Uplink: vpn, Weight: 1}}, Fallback: maps.FallbackUnreachable}
			var rules []maps.Rule
			for _, l := range lists {
				if len(l) > 0 { // (a rule without prefixes would hold everywhere)
					rules = append(rules, maps.Rule{Dst: l, Action: vpnOnly})
				}
			}
			e.policy(maps.Policy{Default: balanced(), Rules: rules})
			e.uplink(vpn, markVPN, 1, false)
			// a third of the way: the middle of the IPv4 space is 127/8
			p := syn(ap(src, 40000), ap(lists[0][len(lists[0])/3].Addr(), 443))
			if m := run(b, e.d.LANProgram(), p.Bytes(), 0); m != markStrict {
				b.Fatalf("mark %#x, want the policy's fail-closed bit alone", m)
			}
			benchProgram(b, e.d.LANProgram(), p.Bytes())
		})
	}
}

var _ = packet.ProtoTCP
