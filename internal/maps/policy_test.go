package maps

import (
	"maps"
	"math/rand/v2"
	"net/netip"
	"testing"
)

// An LPM lookup returns only the longest prefix, so a longer prefix must
// carry the rules of every shorter prefix that contains it, and nothing else.
func TestPrefixRulesFoldContainingPrefixes(t *testing.T) {
	pfx := netip.MustParsePrefix
	rules := []Rule{
		{Dst: []netip.Prefix{pfx("198.51.100.0/24")}},
		{Dst: []netip.Prefix{pfx("198.51.100.128/25"), pfx("2001:db8::/32")}},
		{Dst: []netip.Prefix{pfx("0.0.0.0/0")}},
		{Dst: []netip.Prefix{pfx("198.51.100.200/32"), pfx("203.0.113.0/24")}},
		{}, // no destination: matches via anyMask, not the trie
		{Dst: []netip.Prefix{pfx("2001:db8:1::/48"), pfx("198.51.100.7/24")}}, // host bits are masked
	}
	folded := foldPrefixes(rules, func(r Rule) []netip.Prefix { return r.Dst })
	got := map[netip.Prefix]uint64{}
	for _, f := range folded {
		if _, dup := got[f.Prefix]; dup {
			t.Fatalf("%v twice", f.Prefix)
		}
		got[f.Prefix] = f.Rules
	}
	want := map[netip.Prefix]uint64{
		pfx("198.51.100.0/24"):   1<<0 | 1<<2 | 1<<5,
		pfx("198.51.100.128/25"): 1<<0 | 1<<1 | 1<<2 | 1<<5,
		pfx("198.51.100.200/32"): 1<<0 | 1<<1 | 1<<2 | 1<<3 | 1<<5,
		pfx("0.0.0.0/0"):         1 << 2,
		pfx("203.0.113.0/24"):    1<<2 | 1<<3,
		pfx("2001:db8::/32"):     1 << 1,
		pfx("2001:db8:1::/48"):   1<<1 | 1<<5,
	}
	if len(got) != len(want) {
		t.Fatalf("got %d prefixes, want %d: %v", len(got), len(want), got)
	}
	for p, bits := range want {
		if got[p] != bits {
			t.Errorf("%v: rules %b, want %b", p, got[p], bits)
		}
	}
	if m := anyMask(rules, func(r Rule) []netip.Prefix { return r.Dst }); m != 1<<4 {
		t.Errorf("anyMask %b, want %b", m, 1<<4)
	}
}

func TestReplacePolicyRejectsBadInput(t *testing.T) {
	m := &Maps{} // never reached: validation comes before any map access
	many := make([]Rule, MaxRules+1)
	for _, tc := range []struct {
		name string
		p    Policy
	}{
		{"too many rules", Policy{Rules: many}},
		{"empty port range", Policy{Rules: []Rule{{Ports: []PortRange{{Lo: 90, Hi: 80}}}}}},
		{"too many uplinks", Policy{Default: Action{Uplinks: make([]Choice, MaxPolicyUplinks+1)}}},
		{"uplink out of range", Policy{Default: Action{Uplinks: []Choice{{Uplink: uint8(MaxUplinks)}}}}},
	} {
		if err := m.ReplacePolicy(tc.p); err == nil {
			t.Errorf("%s: accepted", tc.name)
		}
	}
}

// The sweep gives every prefix exactly what the definition says: the rules
// of every prefix of the policy that contains it. Checked against the
// definition itself (quadratic) on random nested prefixes of both families.
func TestFoldPrefixesIsTheDefinition(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var rules []Rule
	for i := 0; i < 20; i++ {
		var r Rule
		for j := 0; j < 30; j++ {
			if rng.IntN(4) == 0 {
				a := [16]byte{0x20, 0x01, 0x0d, 0xb8, byte(rng.IntN(4))}
				r.Dst = append(r.Dst, netip.PrefixFrom(netip.AddrFrom16(a), 32+rng.IntN(12)).Masked())
			} else {
				a := [4]byte{100, 64 | byte(rng.IntN(2)), byte(rng.IntN(4)), byte(rng.IntN(256))}
				r.Dst = append(r.Dst, netip.PrefixFrom(netip.AddrFrom4(a), 10+rng.IntN(23)).Masked())
			}
		}
		rules = append(rules, r)
	}
	dst := func(r Rule) []netip.Prefix { return r.Dst }
	got := foldPrefixes(rules, dst)
	want := map[netip.Prefix]uint64{}
	for i, r := range rules {
		for _, p := range r.Dst {
			want[p] |= 1 << i
		}
	}
	direct := maps.Clone(want)
	for p := range want {
		for q, qb := range direct {
			if q.Bits() < p.Bits() && q.Addr().Is4() == p.Addr().Is4() && q.Contains(p.Addr()) {
				want[p] |= qb
			}
		}
	}
	if len(got) != len(want) {
		t.Fatalf("%d prefixes, want %d", len(got), len(want))
	}
	for _, f := range got {
		if want[f.Prefix] != f.Rules {
			t.Fatalf("%v: rules %b, want %b", f.Prefix, f.Rules, want[f.Prefix])
		}
	}
}

// Folding a full table's worth of prefixes (how long: `go test -bench
// FoldPrefixes ./internal/maps/`).
func BenchmarkFoldPrefixes(b *testing.B) {
	rng := rand.New(rand.NewPCG(3, 4))
	r := Rule{}
	for i := 0; i < 1_000_000; i++ {
		a := [4]byte{100, 64 | byte(rng.IntN(64)), byte(rng.IntN(256)), byte(rng.IntN(256))}
		r.Dst = append(r.Dst, netip.PrefixFrom(netip.AddrFrom4(a), 16+rng.IntN(17)).Masked())
	}
	for b.Loop() {
		foldPrefixes([]Rule{r}, func(r Rule) []netip.Prefix { return r.Dst })
	}
}
