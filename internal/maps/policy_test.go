package maps

import (
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
		{"uplink out of range", Policy{Default: Action{Uplinks: []Choice{{Uplink: MaxUplinks}}}}},
	} {
		if err := m.ReplacePolicy(tc.p); err == nil {
			t.Errorf("%s: accepted", tc.name)
		}
	}
}
