package maps

import (
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"time"

	"github.com/cilium/ebpf"

	"github.com/mhbpf/mhbpf/bpf"
)

// Fallback is what a policy does when none of its uplinks is up.
type Fallback uint8

const (
	FallbackMain        = Fallback(bpf.UplinkFallbackFALLBACK_MAIN)        // route by main, whatever it says
	FallbackUnreachable = Fallback(bpf.UplinkFallbackFALLBACK_UNREACHABLE) // fail closed
)

// Sticky is how long a choice holds.
type Sticky uint8

const (
	StickyDestination = Sticky(bpf.UplinkStickyModeSTICKY_DST) // one destination keeps its uplink (default)
	StickyFlow        = Sticky(bpf.UplinkStickyModeSTICKY_FLOW)
	StickyPair        = Sticky(bpf.UplinkStickyModeSTICKY_PAIR) // source + destination
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

func anyMask(rules []Rule, sel func(Rule) []netip.Prefix) uint64 {
	var m uint64
	for i, r := range rules {
		if len(sel(r)) == 0 {
			m |= 1 << i
		}
	}
	return m
}

// PolicyStats says what installing a policy took.
type PolicyStats struct {
	// Prefixes are the entries of the new generation's tables (distinct
	// prefixes, destinations and sources).
	Prefixes int
	// KernelBytes is the memory the kernel accounts to those tables.
	KernelBytes uint64
	Took        time.Duration
}

// ReplacePolicy installs p as a whole (InstallPolicy without the stats).
func (m *Maps) ReplacePolicy(p Policy) error {
	_, err := m.InstallPolicy(p)
	return err
}

// InstallPolicy installs p as a whole. It fills the generation the programs
// are not reading (its prefixes in tables made at their size, loaded in
// batches), then switches the programs over with one write: a packet sees
// either the old policy or the new one, never a mix. The old generation's
// tables are freed once no program can be reading them.
func (m *Maps) InstallPolicy(p Policy) (PolicyStats, error) {
	start := time.Now()
	var stats PolicyStats
	if len(p.Rules) > MaxRules {
		return stats, fmt.Errorf("policy has %d rules, at most %d", len(p.Rules), MaxRules)
	}
	set := bpf.UplinkPolicySet{Nrules: uint32(len(p.Rules))}
	var err error
	if set.Dflt, err = p.Default.encode(0); err != nil {
		return stats, fmt.Errorf("default policy: %w", err)
	}
	rules := make([]bpf.UplinkPolicyRule, len(p.Rules))
	for i, r := range p.Rules {
		if len(r.Ports) > MaxPortRanges {
			return stats, fmt.Errorf("rule %d: %d port ranges, at most %d", i, len(r.Ports), MaxPortRanges)
		}
		rules[i].Proto = r.Proto
		rules[i].Nports = uint8(len(r.Ports))
		for j, pr := range r.Ports {
			if pr.Lo > pr.Hi {
				return stats, fmt.Errorf("rule %d: port range %d-%d is empty", i, pr.Lo, pr.Hi)
			}
			rules[i].Ports[j] = bpf.UplinkPortRange{Lo: pr.Lo, Hi: pr.Hi}
		}
		if rules[i].Policy, err = r.Action.encode(uint32(i + 1)); err != nil {
			return stats, fmt.Errorf("rule %d: %w", i, err)
		}
	}
	dst := func(r Rule) []netip.Prefix { return r.Dst }
	src := func(r Rule) []netip.Prefix { return r.Src }
	set.AnyDst = anyMask(p.Rules, dst)
	set.AnySrc = anyMask(p.Rules, src)

	cur, err := m.policyGeneration()
	if err != nil {
		return stats, err
	}
	next := 1 - cur

	var wait func() error // rewrites a slot of next with its table
	for _, d := range []struct {
		what         string
		sel          func(Rule) []netip.Prefix
		gens4, gens6 *ebpf.Map
	}{{"destination", dst, m.PolicyRangesDst4, m.PolicyRangesDst6}, {"source", src, m.PolicyRangesSrc4, m.PolicyRangesSrc6}} {
		folded := foldPrefixes(p.Rules, d.sel)
		split := sort.Search(len(folded), func(i int) bool { return !folded[i].Prefix.Addr().Is4() })
		for _, f := range []struct {
			gens     *ebpf.Map
			prefixes []prefixRules
			v6       bool
		}{{d.gens4, folded[:split], false}, {d.gens6, folded[split:], true}} {
			tbl, n, err := putRanges(f.gens, next, f.prefixes, f.v6)
			if err != nil {
				return stats, fmt.Errorf("%s prefixes: %w", d.what, err)
			}
			// Kept open for dropGeneration: reading it back from the
			// array would need CAP_SYS_ADMIN (a map by its id).
			defer tbl.Close()
			if wait == nil {
				wait = func() error { return f.gens.Put(next, tbl) }
			}
			stats.Prefixes += len(f.prefixes)
			stats.KernelBytes += n
		}
	}
	for i := range rules {
		if err := m.PolicyRules.Put(next*uint32(MaxRules)+uint32(i), &rules[i]); err != nil {
			return stats, fmt.Errorf("rule %d: %w", i, err)
		}
	}
	if err := m.PolicyMeta.Put(next, &set); err != nil {
		return stats, fmt.Errorf("policy set: %w", err)
	}
	// Bit 1 set: a written generation is never all zero, which an
	// interrupted upgrade's second run takes for a slot not written yet
	// (the programs read bit 0 alone).
	if err := m.PolicyGeneration.Put(uint32(0), next|2); err != nil {
		return stats, fmt.Errorf("policy generation: %w", err)
	}
	stats.Took = time.Since(start)
	return stats, m.dropGeneration(cur, wait)
}

func (m *Maps) policyGeneration() (uint32, error) {
	var g uint32
	if err := m.PolicyGeneration.Lookup(uint32(0), &g); err != nil {
		return 0, fmt.Errorf("policy generation: %w", err)
	}
	return g & 1, nil
}

// batchSize bounds the work of one BPF_MAP_UPDATE_BATCH call.
const batchSize = 1 << 16

// dropGeneration frees generation old's tables after the switch. Updating
// an array of maps makes the kernel wait until every program running
// meanwhile is done (synchronize_rcu), so rewriting a slot of the new
// generation with the table it holds (wait) waits out the packets that read
// the old generation number before the switch; only then do the old tables
// go.
func (m *Maps) dropGeneration(old uint32, wait func() error) error {
	if err := wait(); err != nil {
		return fmt.Errorf("policy generation switch: %w", err)
	}
	var errs []error
	for _, gens := range []*ebpf.Map{m.PolicyRangesDst4, m.PolicyRangesSrc4, m.PolicyRangesDst6, m.PolicyRangesSrc6} {
		errs = append(errs, ignoreNotExist(gens.Delete(old)))
	}
	return errors.Join(errs...)
}

func ignoreNotExist(err error) error {
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil
	}
	return err
}
