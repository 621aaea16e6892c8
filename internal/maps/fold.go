package maps

import (
	"net/netip"
	"slices"
)

// prefixRules is a prefix and the set of rules (bit i = rule i) that match
// every address inside it.
type prefixRules struct {
	Prefix netip.Prefix
	Rules  uint64
}

// foldPrefixes gives each distinct prefix of the rules' (sel) the set of
// rules whose prefixes contain it: its own and those of every shorter
// prefix around it. An LPM lookup returns only the longest match, so the
// longest match must carry them all. O(P log P): sorted by address, then
// length, the prefixes around a prefix are exactly those on a stack of the
// open ones before it.
func foldPrefixes(rules []Rule, sel func(Rule) []netip.Prefix) []prefixRules {
	n := 0
	for _, r := range rules {
		n += len(sel(r))
	}
	all := make([]prefixRules, 0, n)
	for i, r := range rules {
		for _, p := range sel(r) {
			all = append(all, prefixRules{p.Masked(), 1 << i})
		}
	}
	slices.SortFunc(all, func(a, b prefixRules) int {
		if c := a.Prefix.Addr().Compare(b.Prefix.Addr()); c != 0 {
			return c // IPv4 before IPv6, then by address
		}
		return a.Prefix.Bits() - b.Prefix.Bits()
	})
	// One entry per prefix, with the rules of all its occurrences.
	out := all[:0]
	for _, pr := range all {
		if len(out) > 0 && out[len(out)-1].Prefix == pr.Prefix {
			out[len(out)-1].Rules |= pr.Rules
			continue
		}
		out = append(out, pr)
	}
	var open []prefixRules // each contains the next, folded already
	for i := range out {
		p := out[i].Prefix
		for len(open) > 0 && !open[len(open)-1].Prefix.Contains(p.Addr()) {
			open = open[:len(open)-1]
		}
		if len(open) > 0 {
			out[i].Rules |= open[len(open)-1].Rules
		}
		open = append(open, out[i])
	}
	return out
}
