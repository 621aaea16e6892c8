package maps

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"net/netip"
	"sort"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// The policy's prefixes reach the programs as a range table
// (bpf/include/maps.h has its layout): the address space cut into ranges
// of one rule set each, sorted, behind a tree of direct indexes. A node
// indexes the bits after the part its ranges share; an index entry holds
// at most a few ranges (leafRanges), or a node of its own for the bits
// after. A lookup reads one or a few nodes, an index entry, a short binary
// search and the rule set: about the same array reads at 10 prefixes as at
// a million, where an LPM trie walks deeper the more it holds, and a list
// crowded into one /10 or /32 gets nodes down into it instead of one long
// search. Its size is bounded by the prefixes: at most 2P+1 ranges, one
// more per index entry, and indexes about as long as their ranges.

const (
	// maxIndexBits bounds the root's index: 2^20 entries (8 MB for IPv4,
	// 24 MB for IPv6) once a policy has a million ranges; a node below
	// has at most 2^maxNodeIndexBits.
	maxIndexBits     = 20
	maxNodeIndexBits = 16
	// leafRanges: an index entry of more ranges gets a node of its own,
	// down to rangeLevels levels (RANGE_LEVELS in bpf/include/policy.h).
	leafRanges  = 8
	rangeLevels = 4
)

// u128 is an address as a number: IPv4 in the low 32 bits.
type u128 struct{ hi, lo uint64 }

func (a u128) less(b u128) bool { return a.hi < b.hi || a.hi == b.hi && a.lo < b.lo }

func (a u128) or(b u128) u128 { return u128{a.hi | b.hi, a.lo | b.lo} }

func (a u128) add1() u128 {
	lo, carry := bits.Add64(a.lo, 1, 0)
	return u128{a.hi + carry, lo}
}

// ones is the number with the low n bits set, 0 <= n <= 128.
func ones(n int) u128 {
	switch {
	case n <= 0:
		return u128{}
	case n < 64:
		return u128{0, 1<<n - 1}
	case n == 64:
		return u128{0, ^uint64(0)}
	case n < 128:
		return u128{1<<(n-64) - 1, ^uint64(0)}
	}
	return u128{^uint64(0), ^uint64(0)}
}

func (a u128) shl(n int) u128 {
	switch {
	case n <= 0:
		return a
	case n < 64:
		return u128{a.hi<<n | a.lo>>(64-n), a.lo << n}
	case n < 128:
		return u128{a.lo << (n - 64), 0}
	}
	return u128{}
}

func (a u128) shr(n int) u128 {
	switch {
	case n <= 0:
		return a
	case n < 64:
		return u128{a.hi >> n, a.lo>>n | a.hi<<(64-n)}
	case n < 128:
		return u128{0, a.hi >> (n - 64)}
	}
	return u128{}
}

func addrNumber(a netip.Addr) u128 {
	if a.Is4() {
		b := a.As4()
		return u128{0, uint64(binary.BigEndian.Uint32(b[:]))}
	}
	b := a.As16()
	return u128{binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])}
}

// commonBits is how many leading bits (of width) a and b share.
func commonBits(a, b u128, width int) int {
	x := u128{a.hi ^ b.hi, a.lo ^ b.lo}
	n := bits.LeadingZeros64(x.hi)
	if n == 64 {
		n += bits.LeadingZeros64(x.lo)
	}
	return min(n-(128-width), width)
}

// addrRange is a range of the table: from start to the next range's start,
// the rules of set (an index into rangeTable.sets, 1-based; 0 none).
type addrRange struct {
	start u128
	set   uint32
}

// tableNode indexes a span of the address space: the bits [from, from +
// indexBits) of the addresses under base (its ranges' shared from bits);
// below base the span is set below, above it set above.
type tableNode struct {
	from, indexBits int
	base            u128
	below, above    uint32
	entries         []tableEntry
}

// tableEntry is one index entry: count ranges from first (of
// rangeTable.ranges), or with count 0 the whole entry is set first, or
// node child (> 0).
type tableEntry struct {
	first, count uint32
	child        int
}

// rangeTable is the table of one direction and family.
type rangeTable struct {
	width  int // 32 or 128
	nodes  []*tableNode
	ranges []addrRange
	sets   []uint64 // the rule sets, set i at sets[i-1]
	setOf  map[uint64]uint32
}

func (t *rangeTable) set(rules uint64) uint32 {
	if rules == 0 {
		return 0
	}
	if i, ok := t.setOf[rules]; ok {
		return i
	}
	t.sets = append(t.sets, rules)
	t.setOf[rules] = uint32(len(t.sets))
	return uint32(len(t.sets))
}

// buildRanges makes the table of prefixes (folded: sorted by address,
// then length, each with its whole rule set) of one family. O(P).
func buildRanges(prefixes []prefixRules, v6 bool) *rangeTable {
	t := &rangeTable{width: 32, setOf: map[uint64]uint32{}}
	if v6 {
		t.width = 128
	}
	t.node(ranges(t, prefixes), 0)
	return t
}

// node makes the node of a span whose ranges are rs (rs[0] starts the
// span) and returns its number.
func (t *rangeTable) node(rs []addrRange, level int) int {
	n := &tableNode{below: rs[0].set, above: rs[len(rs)-1].set}
	id := len(t.nodes)
	t.nodes = append(t.nodes, n)
	if len(rs) > 1 {
		// The index must keep a bit: from < width.
		n.from = min(commonBits(rs[1].start, rs[len(rs)-1].start, t.width), t.width-1)
		n.base = rs[1].start.shr(t.width - n.from).shl(t.width - n.from)
	}
	end := n.base.or(ones(t.width - n.from))
	lo := sort.Search(len(rs), func(i int) bool { return n.base.less(rs[i].start) }) - 1 // holds base
	hi := sort.Search(len(rs), func(i int) bool { return end.less(rs[i].start) })
	region := rs[lo:hi]
	maxBits := maxNodeIndexBits
	if level == 0 {
		maxBits = maxIndexBits
	}
	n.indexBits = min(max(bits.Len(uint(len(region)))-1, 1), maxBits, t.width-n.from)
	shift := t.width - n.from - n.indexBits
	n.entries = make([]tableEntry, 1<<n.indexBits)
	j := 0 // region[j] holds the entry's first address
	for c := range n.entries {
		start := n.base.or(u128{0, uint64(c)}.shl(shift))
		last := start.or(ones(shift))
		for j+1 < len(region) && !start.less(region[j+1].start) {
			j++
		}
		k := j + 1
		for k < len(region) && !last.less(region[k].start) {
			k++
		}
		switch count := k - j; {
		case count == 1:
			n.entries[c] = tableEntry{first: region[j].set}
		case count > leafRanges && level+1 < rangeLevels:
			sub := make([]addrRange, 0, count)
			sub = append(append(sub, addrRange{start, region[j].set}), region[j+1:k]...)
			n.entries[c] = tableEntry{child: t.node(sub, level+1)}
		default:
			n.entries[c] = tableEntry{first: uint32(len(t.ranges)), count: uint32(count)}
			t.ranges = append(append(t.ranges, addrRange{start, region[j].set}), region[j+1:k]...)
		}
		j = k - 1
	}
	return id
}

// ranges cuts the whole address space into ranges of one rule set, from
// prefixes sorted by address then length: a sweep with the prefixes open
// at the current address on a stack, the innermost on top (its set is the
// longest match's).
func ranges(t *rangeTable, prefixes []prefixRules) []addrRange {
	out := []addrRange{{}}
	put := func(start u128, set uint32) {
		last := &out[len(out)-1]
		if last.start == start {
			last.set = set
			if len(out) > 1 && out[len(out)-2].set == set {
				out = out[:len(out)-1]
			}
			return
		}
		if last.set != set {
			out = append(out, addrRange{start, set})
		}
	}
	type open struct {
		end u128
		set uint32
	}
	var stack []open
	max := ones(t.width)
	closeBefore := func(at u128, all bool) {
		for len(stack) > 0 && (all || stack[len(stack)-1].end.less(at)) {
			end := stack[len(stack)-1].end
			stack = stack[:len(stack)-1]
			if end == max {
				continue // nothing after the end of the space
			}
			set := uint32(0)
			if len(stack) > 0 {
				set = stack[len(stack)-1].set
			}
			put(end.add1(), set)
		}
	}
	for _, p := range prefixes {
		start := addrNumber(p.Prefix.Addr())
		closeBefore(start, false)
		set := t.set(p.Rules)
		put(start, set)
		stack = append(stack, open{start.or(ones(t.width - p.Prefix.Bits())), set})
	}
	closeBefore(u128{}, true)
	return out
}

// The map's layout (bpf/include/maps.h): [0] where the sets start, the
// nodes from 1 (the root first), each its two header entries and its
// index, then the ranges, then the sets.
const childEntry = 1 << 63

// nodeHeaders is how many entries a node's header takes: IPv4 two (base
// and the sets below and above do not fit in one), IPv6 one.
func (t *rangeTable) nodeHeaders() int {
	if t.width == 128 {
		return 1
	}
	return 2
}

// maxSets6: an IPv6 node's header holds the sets below and above in 24
// bits each.
const maxSets6 = 1<<24 - 1

// layout gives each node its offset in the map, and says where the
// ranges and the sets start.
func (t *rangeTable) layout() (offsets []int, rangesAt, setsAt, entries int) {
	at := 1
	for _, n := range t.nodes {
		offsets = append(offsets, at)
		at += t.nodeHeaders() + len(n.entries)
	}
	rangesAt = at
	setsAt = rangesAt + len(t.ranges)
	return offsets, rangesAt, setsAt, setsAt + len(t.sets)
}

// entryValue is an index entry as the programs read it: count << 32 |
// first, the set alone (count 0), or childEntry | the node's offset.
func entryValue(e tableEntry, offsets []int, rangesAt int) uint64 {
	switch {
	case e.child > 0:
		return childEntry | uint64(offsets[e.child])
	case e.count == 0:
		return uint64(e.first)
	}
	return uint64(e.count)<<32 | (uint64(rangesAt) + uint64(e.first))
}

func nodeHeader(n *tableNode) uint64 {
	return uint64(n.from) | uint64(n.indexBits)<<8 | uint64(n.above)<<32
}

// encode4 is an IPv4 table's entries.
func (t *rangeTable) encode4() []uint64 {
	offsets, rangesAt, setsAt, total := t.layout()
	v := make([]uint64, 0, total)
	v = append(v, uint64(setsAt))
	for _, n := range t.nodes {
		v = append(v, nodeHeader(n), n.base.lo<<32|uint64(n.below))
		for _, e := range n.entries {
			v = append(v, entryValue(e, offsets, rangesAt))
		}
	}
	for _, r := range t.ranges {
		v = append(v, r.start.lo<<32|uint64(r.set))
	}
	return append(v, t.sets...)
}

// encode6 is an IPv6 table's entries.
func (t *rangeTable) encode6() []range6 {
	offsets, rangesAt, setsAt, total := t.layout()
	v := make([]range6, 0, total)
	v = append(v, range6{V: uint64(setsAt)})
	for _, n := range t.nodes {
		v = append(v, range6{Hi: n.base.hi, Lo: n.base.lo,
			V: uint64(n.from) | uint64(n.indexBits)<<8 | uint64(n.below)<<16 | uint64(n.above)<<40})
		for _, e := range n.entries {
			v = append(v, range6{V: entryValue(e, offsets, rangesAt)})
		}
	}
	for _, r := range t.ranges {
		v = append(v, range6{Hi: r.start.hi, Lo: r.start.lo, V: uint64(r.set)})
	}
	for _, s := range t.sets {
		v = append(v, range6{V: s})
	}
	return v
}

// range6 is struct range6 of bpf/include/maps.h.
type range6 struct{ Hi, Lo, V uint64 }

// putRanges makes generation gen of gens the table of prefixes (also of
// none: every generation has its tables, which dropGeneration relies on)
// and returns it, open, with the memory the kernel accounts to it.
func putRanges(gens *ebpf.Map, gen uint32, prefixes []prefixRules, v6 bool) (*ebpf.Map, uint64, error) {
	t := buildRanges(prefixes, v6)
	_, _, _, n := t.layout()
	if v6 && len(t.sets) > maxSets6 {
		return nil, 0, fmt.Errorf("%d distinct sets of rules among the IPv6 prefixes, at most %d", len(t.sets), maxSets6)
	}
	if n >= 1<<31 {
		return nil, 0, fmt.Errorf("%d prefixes make %d table entries, more than a map holds", len(prefixes), n)
	}
	valueSize := uint32(8)
	if v6 {
		valueSize = uint32(binary.Size(range6{}))
	}
	tbl, err := ebpf.NewMap(&ebpf.MapSpec{Name: "policy_ranges", Type: ebpf.Array, KeySize: 4, ValueSize: valueSize,
		MaxEntries: uint32(n), Flags: unix.BPF_F_INNER_MAP})
	if err != nil {
		return nil, 0, fmt.Errorf("create a table of %d prefixes (%d entries): %w", len(prefixes), n, err)
	}
	if v6 {
		err = fillArray(tbl, t.encode6())
	} else {
		err = fillArray(tbl, t.encode4())
	}
	if err == nil {
		err = gens.Put(gen, tbl)
	}
	if err != nil {
		tbl.Close()
		return nil, 0, err
	}
	var bytes uint64
	if info, err := tbl.Info(); err == nil {
		bytes, _ = info.Memlock()
	}
	return tbl, bytes, nil
}

// fillArray writes values at keys 0, 1, ... in batches, one by one where
// the kernel has no batch updates.
func fillArray[V any](m *ebpf.Map, values []V) error {
	keys := make([]uint32, min(len(values), batchSize))
	for i := 0; i < len(values); i += batchSize {
		j := min(i+batchSize, len(values))
		ks := keys[:j-i]
		for k := range ks {
			ks[k] = uint32(i + k)
		}
		_, err := m.BatchUpdate(ks, values[i:j], nil)
		if errors.Is(err, ebpf.ErrNotSupported) {
			for k := i; k < j; k++ {
				if err := m.Put(uint32(k), values[k]); err != nil {
					return fmt.Errorf("entry %d: %w", k, err)
				}
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("entries %d-%d: %w", i, j-1, err)
		}
	}
	return nil
}
