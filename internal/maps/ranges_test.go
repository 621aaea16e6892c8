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
		if len(tbl.index) > 1<<maxIndexBits || tbl.indexBits < 1 || tbl.skip+tbl.indexBits > width {
			t.Fatalf("round %d: index of %d bits after %d skipped", round, tbl.indexBits, tbl.skip)
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
			if got, want := tbl.lookup(addrNumber(a)), longestMatch(folded, a); got != want {
				t.Fatalf("round %d (%d prefixes, skip %d, index %d bits): %s gives rules %#x, want %#x",
					round, len(folded), tbl.skip, tbl.indexBits, a, got, want)
			}
		}
		if limit := 2 + 1<<tbl.indexBits + 2*(2*len(folded)+1) + len(folded); tbl.entries() > limit {
			t.Fatalf("round %d: %d entries for %d prefixes, want at most %d", round, tbl.entries(), len(folded), limit)
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
			if got := tbl.lookup(addrNumber(ad)); got != 0 {
				t.Fatalf("%s: rules %#x in an empty table", a, got)
			}
		}
	}
}
