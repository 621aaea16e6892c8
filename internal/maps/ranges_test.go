package maps

import (
	"math/rand/v2"
	"net/netip"
	"testing"
)

// longestMatch is what a range table must answer: the rules of the longest
// folded prefix holding a (folded: it carries the shorter ones' rules).
func longestMatch(folded []prefixRules, a netip.Addr) uint64 {
	best, bits := uint64(0), -1
	for _, p := range folded {
		if p.Prefix.Contains(a) && p.Prefix.Bits() > bits {
			best, bits = p.Rules, p.Prefix.Bits()
		}
	}
	return best
}

// The table answers as a longest-prefix match over random policies: nested
// and adjacent prefixes, /0 and host routes, prefixes sharing a long part
// (skip), in both families; probed at every range's edges and at random.
func TestRangeTableIsLongestMatch(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for round := 0; round < 300; round++ {
		v6 := round%2 == 1
		width := 32
		if v6 {
			width = 128
		}
		n := rng.IntN(40)
		if round%10 == 0 {
			n = rng.IntN(2000)
		}
		// A shared part of random length, so that skip varies.
		shared := rng.IntN(width)
		var seed [16]byte
		for i := range seed {
			seed[i] = byte(rng.Uint32())
		}
		var rules []Rule
		for r := 0; r < 1+rng.IntN(5); r++ {
			var list []netip.Prefix
			for i := 0; i < n; i++ {
				var b [16]byte
				for k := range b {
					b[k] = byte(rng.Uint32())
				}
				// keep the shared part of the seed (most of the time)
				if rng.IntN(8) != 0 {
					for bit := 0; bit < shared; bit++ {
						m := byte(0x80 >> (bit % 8))
						b[bit/8] = b[bit/8]&^m | seed[bit/8]&m
					}
				}
				var a netip.Addr
				if v6 {
					a = netip.AddrFrom16(b)
				} else {
					a = netip.AddrFrom4([4]byte(b[:4]))
				}
				bits := rng.IntN(width + 1)
				if rng.IntN(3) == 0 {
					bits = max(bits, shared)
				}
				list = append(list, netip.PrefixFrom(a, bits).Masked())
			}
			rules = append(rules, Rule{Dst: list})
		}
		folded := foldPrefixes(rules, func(r Rule) []netip.Prefix { return r.Dst })
		tbl := buildRanges(folded, v6)
		for _, n := range tbl.nodes {
			if n.indexBits < 1 || n.from+n.indexBits > width || n.indexBits > maxIndexBits {
				t.Fatalf("round %d: a node indexes %d bits from bit %d", round, n.indexBits, n.from)
			}
		}
		var enc4 []uint64
		var enc6 []range6
		if v6 {
			enc6 = tbl.encode6()
		} else {
			enc4 = tbl.encode4()
		}
		ask := func(a netip.Addr) uint64 {
			n := addrNumber(a)
			if v6 {
				return lookup6(enc6, n.hi, n.lo)
			}
			return lookup4(enc4, n.lo)
		}
		var probes []netip.Addr
		for _, p := range folded {
			first := p.Prefix.Addr()
			last := lastAddr(p.Prefix)
			probes = append(probes, first, last)
			if a := first.Prev(); a.IsValid() {
				probes = append(probes, a)
			}
			if a := last.Next(); a.IsValid() {
				probes = append(probes, a)
			}
		}
		for i := 0; i < 200; i++ {
			var b [16]byte
			for k := range b {
				b[k] = byte(rng.Uint32())
			}
			if v6 {
				probes = append(probes, netip.AddrFrom16(b))
			} else {
				probes = append(probes, netip.AddrFrom4([4]byte(b[:4])))
			}
		}
		for _, a := range probes {
			if got, want := ask(a), longestMatch(folded, a); got != want {
				t.Fatalf("round %d (%d prefixes, %d nodes): %s gives rules %#x, want %#x",
					round, len(folded), len(tbl.nodes), a, got, want)
			}
		}
		_, _, _, entries := tbl.layout()
		index := 0
		for _, n := range tbl.nodes {
			index += tbl.nodeHeaders() + len(n.entries)
		}
		// ranges: at most 2P+1, and one more per index entry
		if limit := 1 + index + (2*len(folded) + 1) + index + len(folded); entries > limit {
			t.Fatalf("round %d: %d entries for %d prefixes, want at most %d", round, entries, len(folded), limit)
		}
	}
}

func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for bit := p.Bits(); bit < len(b)*8; bit++ {
		b[bit/8] |= 0x80 >> (bit % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// A table of no prefixes answers none everywhere.
func TestRangeTableOfNothing(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		tbl := buildRanges(nil, v6)
		for _, a := range []string{"0.0.0.0", "255.255.255.255", "100.64.0.1", "::", "2001:db8::1"} {
			ad := netip.MustParseAddr(a)
			if ad.Is4() == v6 {
				continue
			}
			if got := lookupEncoded(tbl, ad); got != 0 {
				t.Fatalf("%s: rules %#x in an empty table", a, got)
			}
		}
	}
}

// lookup4 and lookup6 are range_rules4 and range_rules6 of
// bpf/include/policy.h line by line, shifts masked as the JIT masks them,
// over the entries putRanges writes: the tests hold the programs'
// algorithm and the encoding to a longest-prefix match.
func lookup4(v []uint64, a uint64) uint64 {
	at := func(k uint32) (uint64, bool) {
		if int(k) >= len(v) {
			return 0, false
		}
		return v[k], true
	}
	g, ok := at(0)
	if !ok {
		return 0
	}
	sets := uint32(g)
	node, set := uint32(1), uint32(0)
	lo, hi := uint32(0), uint32(0)
	search, found := false, false
	for level := 0; level < rangeLevels && !search && !found; level++ {
		h0, ok := at(node)
		if !ok {
			return 0
		}
		from, ib := uint32(h0&0xff), uint32((h0>>8)&0xff)
		if from != 0 {
			h1, ok := at(node + 1)
			if !ok {
				return 0
			}
			top, btop := a>>((32-from)&63), (h1>>32)>>((32-from)&63)
			if top < btop {
				set, found = uint32(h1), true
				break
			}
			if top > btop {
				set, found = uint32(h0>>32), true
				break
			}
		}
		e, ok := at(node + 2 + uint32(((a<<from)&0xffffffff)>>((32-ib)&63)))
		if !ok {
			return 0
		}
		switch {
		case e>>63 != 0:
			node = uint32(e)
		case e>>32 == 0:
			set, found = uint32(e), true
		default:
			lo, hi, search = uint32(e), uint32(e)+uint32(e>>32)-1, true
		}
	}
	if search {
		for i := 0; i < 32 && lo < hi; i++ {
			mid := lo + (hi-lo+1)/2
			r, ok := at(mid)
			if !ok {
				return 0
			}
			if r>>32 <= a {
				lo = mid
			} else {
				hi = mid - 1
			}
		}
		r, ok := at(lo)
		if !ok {
			return 0
		}
		set, found = uint32(r), true
	}
	if !found || set == 0 {
		return 0
	}
	bits, ok := at(sets + set - 1)
	if !ok {
		return 0
	}
	return bits
}

func lookup6(v []range6, ahi, alo uint64) uint64 {
	at := func(k uint32) (range6, bool) {
		if int(k) >= len(v) {
			return range6{}, false
		}
		return v[k], true
	}
	g, ok := at(0)
	if !ok {
		return 0
	}
	sets := uint32(g.V)
	node, set := uint32(1), uint32(0)
	lo, hi := uint32(0), uint32(0)
	search, found := false, false
	for level := 0; level < rangeLevels && !search && !found; level++ {
		h, ok := at(node)
		if !ok {
			return 0
		}
		from, ib := uint32(h.V&0xff), uint32((h.V>>8)&0xff)
		if from != 0 {
			cmp := 0
			if from <= 64 {
				top, btop := ahi>>((64-from)&63), h.Hi>>((64-from)&63)
				cmp = compare(top, btop)
			} else if cmp = compare(ahi, h.Hi); cmp == 0 {
				cmp = compare(alo>>((128-from)&63), h.Lo>>((128-from)&63))
			}
			if cmp < 0 {
				set, found = uint32((h.V>>16)&0xffffff), true
				break
			}
			if cmp > 0 {
				set, found = uint32(h.V>>40), true
				break
			}
		}
		e, ok := at(node + 1 + uint32(bits128(ahi, alo, from, ib)))
		if !ok {
			return 0
		}
		switch {
		case e.V>>63 != 0:
			node = uint32(e.V)
		case e.V>>32 == 0:
			set, found = uint32(e.V), true
		default:
			lo, hi, search = uint32(e.V), uint32(e.V)+uint32(e.V>>32)-1, true
		}
	}
	if search {
		for i := 0; i < 32 && lo < hi; i++ {
			mid := lo + (hi-lo+1)/2
			r, ok := at(mid)
			if !ok {
				return 0
			}
			if r.Hi < ahi || r.Hi == ahi && r.Lo <= alo {
				lo = mid
			} else {
				hi = mid - 1
			}
		}
		r, ok := at(lo)
		if !ok {
			return 0
		}
		set, found = uint32(r.V), true
	}
	if !found || set == 0 {
		return 0
	}
	bits, ok := at(sets + set - 1)
	if !ok {
		return 0
	}
	return bits.V
}

func compare(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// bits128 is policy.h's: bits [from, from+n) of hi:lo.
func bits128(hi, lo uint64, from, n uint32) uint64 {
	var x uint64
	switch {
	case from >= 64:
		x = lo << ((from - 64) & 63)
	case from == 0:
		x = hi
	default:
		x = hi<<(from&63) | lo>>((64-from)&63)
	}
	return x >> ((64 - n) & 63)
}

// lookupEncoded asks the encoded table of folded's family what the
// programs would.
func lookupEncoded(tbl *rangeTable, a netip.Addr) uint64 {
	n := addrNumber(a)
	if a.Is4() {
		return lookup4(tbl.encode4(), n.lo)
	}
	return lookup6(tbl.encode6(), n.hi, n.lo)
}

// A list crowded into one /10 (IPv4) or /32 (IPv6), a second crowd inside
// a /24 or /56 of it, and prefixes far away: the part all prefixes share
// is short, so the crowds get nodes of their own instead of one long
// search; no index entry of the last level's parents holds more than
// leafRanges ranges unless the levels ran out.
func TestRangeTableCrowdedList(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	for _, v6 := range []bool{false, true} {
		var list []netip.Prefix
		add := func(base netip.Prefix, n, minBits, maxBits int) {
			for i := 0; i < n; i++ {
				b := base.Addr().AsSlice()
				for bit := base.Bits(); bit < len(b)*8; bit++ {
					if rng.IntN(2) == 1 {
						b[bit/8] |= 0x80 >> (bit % 8)
					}
				}
				a, _ := netip.AddrFromSlice(b)
				list = append(list, netip.PrefixFrom(a, minBits+rng.IntN(maxBits-minBits+1)).Masked())
			}
		}
		if v6 {
			add(netip.MustParsePrefix("2001:db8::/32"), 20000, 40, 64)
			add(netip.MustParsePrefix("2001:db8:1234:5600::/56"), 3000, 60, 128)
			list = append(list, netip.MustParsePrefix("2a00:1450::/32"), netip.MustParsePrefix("2c0f::/16"))
		} else {
			add(netip.MustParsePrefix("100.64.0.0/10"), 20000, 20, 32)
			add(netip.MustParsePrefix("100.80.7.0/24"), 3000, 26, 32)
			list = append(list, netip.MustParsePrefix("8.8.8.0/24"), netip.MustParsePrefix("203.0.113.0/24"))
		}
		half := len(list) / 2
		folded := foldPrefixes([]Rule{{Dst: list[:half]}, {Dst: list[half:]}}, func(r Rule) []netip.Prefix { return r.Dst })
		tbl := buildRanges(folded, v6)
		longest := 0
		for _, n := range tbl.nodes {
			for _, e := range n.entries {
				longest = max(longest, int(e.count))
			}
		}
		t.Logf("v6 %v: %d prefixes, %d nodes, longest search over %d ranges", v6, len(folded), len(tbl.nodes), longest)
		if len(tbl.nodes) < 2 || longest > 64 {
			t.Fatalf("v6 %v: %d nodes, an index entry of %d ranges: the crowd got no node of its own", v6, len(tbl.nodes), longest)
		}
		for i := 0; i < 3000; i++ {
			p := folded[rng.IntN(len(folded))].Prefix
			for _, a := range []netip.Addr{p.Addr(), lastAddr(p), p.Addr().Prev(), lastAddr(p).Next()} {
				if !a.IsValid() {
					continue
				}
				if got, want := lookupEncoded(tbl, a), longestMatch(folded, a); got != want {
					t.Fatalf("v6 %v: %s gives rules %#x, want %#x", v6, a, got, want)
				}
			}
		}
	}
}
