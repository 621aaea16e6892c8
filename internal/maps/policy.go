package maps

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/mhbpf/mhbpf/bpf"
)

// Fallback is what a policy does when none of its uplinks is up.
type Fallback uint8

const (
	FallbackMain        Fallback = 0 // route by main, whatever it says
	FallbackUnreachable Fallback = 1 // fail closed
)

// Sticky is how long a choice holds.
type Sticky uint8

const (
	StickyDestination Sticky = 0 // one destination keeps its uplink (default)
	StickyFlow        Sticky = 1
	StickyPair        Sticky = 2 // source + destination
)

// Choice is one acceptable uplink of a policy.
type Choice struct {
	Uplink uint8
	Tier   uint8 // lower is preferred; the up uplinks of the best tier share by weight
	Weight uint16
}

// Action is what a policy does with a new flow.
type Action struct {
	// Uplinks in fib rule order (the uplinks' preference order, which is
	// not their id order): the mark of a choice carries the bits of the
	// uplinks listed after it, for the kernel to fall through to. Which one
	// is preferred is the tiers' business.
	Uplinks  []Choice
	Fallback Fallback
	Sticky   Sticky
}

type PortRange struct{ Lo, Hi uint16 }

// Rule matches when every given condition holds: destination in one of Dst
// (none: any), source in one of Src (none: any), protocol (0: any),
// destination port in one of Ports (none: any).
type Rule struct {
	Dst, Src []netip.Prefix
	Proto    uint8
	Ports    []PortRange
	Action   Action
}

// Policy is the whole policy: rules in order, first match wins, and the
// default action for everything else.
type Policy struct {
	Rules   []Rule
	Default Action
}

func (a Action) encode(id uint32) (bpf.UplinkPolicy, error) {
	var p bpf.UplinkPolicy
	if len(a.Uplinks) > MaxPolicyUplinks {
		return p, fmt.Errorf("%d uplinks, at most %d", len(a.Uplinks), MaxPolicyUplinks)
	}
	for i, c := range a.Uplinks {
		if int(c.Uplink) >= MaxUplinks {
			return p, fmt.Errorf("uplink id %d out of range", c.Uplink)
		}
		p.Entries[i] = bpf.UplinkPolicyEntry{Uplink: c.Uplink, Tier: c.Tier, Weight: c.Weight}
	}
	p.Nentries = uint8(len(a.Uplinks))
	p.Fallback = uint8(a.Fallback)
	p.Sticky = uint8(a.Sticky)
	p.Id = id
	return p, nil
}

// prefixRules maps each prefix to the set of rules (bit i = rule i) that
// match every address inside it. An LPM lookup returns only the longest
// prefix, so each prefix also carries the rules of the prefixes containing it.
func prefixRules(rules []Rule, sel func(Rule) []netip.Prefix) map[netip.Prefix]uint64 {
	out := map[netip.Prefix]uint64{}
	for i, r := range rules {
		for _, p := range sel(r) {
			out[p.Masked()] |= 1 << i
		}
	}
	folded := make(map[netip.Prefix]uint64, len(out))
	for p, b := range out {
		for q, qb := range out {
			if q.Bits() < p.Bits() && q.Addr().Is4() == p.Addr().Is4() && q.Contains(p.Addr()) {
				b |= qb
			}
		}
		folded[p] = b
	}
	return folded
}

func anyMask(rules []Rule, sel func(Rule) []netip.Prefix) uint64 {
	var m uint64
	for i, r := range rules {
		if len(sel(r)) == 0 {
			m |= 1 << i
		}
	}
	return m
}

// ReplacePolicy installs p as a whole. It fills the generation the programs
// are not reading, then switches them over with one write: a packet sees
// either the old policy or the new one, never a mix.
func (m *Maps) ReplacePolicy(p Policy) error {
	if len(p.Rules) > MaxRules {
		return fmt.Errorf("policy has %d rules, at most %d", len(p.Rules), MaxRules)
	}
	set := bpf.UplinkPolicySet{Nrules: uint32(len(p.Rules))}
	var err error
	if set.Dflt, err = p.Default.encode(0); err != nil {
		return fmt.Errorf("default policy: %w", err)
	}
	rules := make([]bpf.UplinkPolicyRule, len(p.Rules))
	for i, r := range p.Rules {
		if len(r.Ports) > MaxPortRanges {
			return fmt.Errorf("rule %d: %d port ranges, at most %d", i, len(r.Ports), MaxPortRanges)
		}
		rules[i].Proto = r.Proto
		rules[i].Nports = uint8(len(r.Ports))
		for j, pr := range r.Ports {
			if pr.Lo > pr.Hi {
				return fmt.Errorf("rule %d: port range %d-%d is empty", i, pr.Lo, pr.Hi)
			}
			rules[i].Ports[j] = bpf.UplinkPortRange{Lo: pr.Lo, Hi: pr.Hi}
		}
		if rules[i].Policy, err = r.Action.encode(uint32(i + 1)); err != nil {
			return fmt.Errorf("rule %d: %w", i, err)
		}
	}
	dst := func(r Rule) []netip.Prefix { return r.Dst }
	src := func(r Rule) []netip.Prefix { return r.Src }
	set.AnyDst = anyMask(p.Rules, dst)
	set.AnySrc = anyMask(p.Rules, src)

	cur, err := m.policyGeneration()
	if err != nil {
		return err
	}
	next := 1 - cur

	// Whatever the generation before last left behind goes first.
	if err := m.clearLPMGeneration(next); err != nil {
		return err
	}
	if err := m.putLPM(m.PolicyDst4, m.PolicyDst6, next, prefixRules(p.Rules, dst)); err != nil {
		return fmt.Errorf("destination prefixes: %w", err)
	}
	if err := m.putLPM(m.PolicySrc4, m.PolicySrc6, next, prefixRules(p.Rules, src)); err != nil {
		return fmt.Errorf("source prefixes: %w", err)
	}
	for i := range rules {
		if err := m.PolicyRules.Put(next*MaxRules+uint32(i), &rules[i]); err != nil {
			return fmt.Errorf("rule %d: %w", i, err)
		}
	}
	if err := m.PolicyMeta.Put(next, &set); err != nil {
		return fmt.Errorf("policy set: %w", err)
	}
	return m.PolicyGen.Put(uint32(0), next)
}

func (m *Maps) policyGeneration() (uint32, error) {
	var g uint32
	if err := m.PolicyGen.Lookup(uint32(0), &g); err != nil {
		return 0, fmt.Errorf("policy generation: %w", err)
	}
	return g & 1, nil
}

func (m *Maps) putLPM(m4, m6 *ebpf.Map, gen uint32, prefixes map[netip.Prefix]uint64) error {
	for p, bits := range prefixes {
		var err error
		if p.Addr().Is4() {
			k := bpf.UplinkLpm4Key{Prefixlen: 32 + uint32(p.Bits()), Gen: gen, Addr: addr4(p.Addr())}
			err = m4.Put(&k, bits)
		} else {
			k := bpf.UplinkLpm6Key{Prefixlen: 32 + uint32(p.Bits()), Gen: gen, Addr: addr16(p.Addr())}
			err = m6.Put(&k, bits)
		}
		if err != nil {
			return fmt.Errorf("%v: %w", p, err)
		}
	}
	return nil
}

func (m *Maps) clearLPMGeneration(gen uint32) error {
	var errs []error
	for _, mp := range []*ebpf.Map{m.PolicyDst4, m.PolicySrc4} {
		var k bpf.UplinkLpm4Key
		var v uint64
		var stale []bpf.UplinkLpm4Key
		for it := mp.Iterate(); it.Next(&k, &v); {
			if k.Gen == gen {
				stale = append(stale, k)
			}
		}
		for _, k := range stale {
			errs = append(errs, ignoreNotExist(mp.Delete(&k)))
		}
	}
	for _, mp := range []*ebpf.Map{m.PolicyDst6, m.PolicySrc6} {
		var k bpf.UplinkLpm6Key
		var v uint64
		var stale []bpf.UplinkLpm6Key
		for it := mp.Iterate(); it.Next(&k, &v); {
			if k.Gen == gen {
				stale = append(stale, k)
			}
		}
		for _, k := range stale {
			errs = append(errs, ignoreNotExist(mp.Delete(&k)))
		}
	}
	return errors.Join(errs...)
}

func ignoreNotExist(err error) error {
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil
	}
	return err
}
