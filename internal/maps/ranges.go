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
// of one rule set each, sorted, with a direct index over the bits after
// the part every prefix shares. A lookup reads the header, the index
// entry and a binary search over the few ranges of one index entry: the
// same few array reads at 10 prefixes as at a million, where an LPM trie
// walks deeper the more it holds. Its size is bounded by the prefixes:
// at most 2P+1 ranges, one per index entry more, and an index of at most
// 2^maxIndexBits entries, about as many as there are ranges.

// maxIndexBits bounds the direct index: 2^20 entries (8 MB for IPv4, 24
// MB for IPv6) once a policy has a million ranges.
const maxIndexBits = 20

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

// highBits is the top n bits of a (an address of width bits).
func highBits(a u128, width, n int) u128 {
	return a.shr(width - n)
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

// indexEntry is one entry of the direct index: first and count index
// rangeTable.ranges; count 0: the whole entry is set first.
type indexEntry struct{ first, count uint32 }

// rangeTable is the table of one direction and family.
type rangeTable struct {
	width       int // 32 or 128
	skip        int // leading bits every prefix shares (base's)
	indexBits   int
	base        u128
	index       []indexEntry
	ranges      []addrRange
	sets        []uint64 // the rule sets, set i at sets[i-1]
	setOf       map[uint64]uint32
	firstRanges int // where the ranges start in the map
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
	whole := ranges(t, prefixes)
	if len(prefixes) > 0 {
		first, last := addrNumber(prefixes[0].Prefix.Addr()), addrNumber(prefixes[len(prefixes)-1].Prefix.Addr())
		t.skip = commonBits(first, last, t.width)
		for _, p := range prefixes {
			t.skip = min(t.skip, p.Prefix.Bits())
		}
		// The index needs a bit at least.
		t.skip = min(t.skip, t.width-1)
		t.base = highBits(first, t.width, t.skip).shl(t.width - t.skip)
	}
	// Outside base's region no prefix holds: only its ranges are kept.
	regionEnd := t.base.or(ones(t.width - t.skip))
	lo := sort.Search(len(whole), func(i int) bool { return t.base.less(whole[i].start) }) - 1 // holds base
	hi := sort.Search(len(whole), func(i int) bool { return regionEnd.less(whole[i].start) })
	region := whole[lo:hi]
	t.indexBits = min(max(bits.Len(uint(len(region)))-1, 1), maxIndexBits, t.width-t.skip)
	shift := t.width - t.skip - t.indexBits
	t.index = make([]indexEntry, 1<<t.indexBits)
	t.ranges = make([]addrRange, 0, len(region)+len(t.index))
	j := 0 // region[j] holds the entry's first address
	for c := range t.index {
		start := t.base.or(u128{0, uint64(c)}.shl(shift))
		end := start.or(ones(shift))
		for j+1 < len(region) && !start.less(region[j+1].start) {
			j++
		}
		k := j + 1
		for k < len(region) && !end.less(region[k].start) {
			k++
		}
		if k == j+1 {
			t.index[c] = indexEntry{first: region[j].set}
			continue
		}
		t.index[c] = indexEntry{first: uint32(len(t.ranges)), count: uint32(k - j)}
		t.ranges = append(t.ranges, addrRange{start, region[j].set})
		t.ranges = append(t.ranges, region[j+1:k]...)
		j = k - 1
	}
	return t
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

// lookup is what the programs compute for a (range_rules4/6): the tests
// hold the kernel's answers to it.
func (t *rangeTable) lookup(a u128) uint64 {
	if t.skip > 0 && highBits(a, t.width, t.skip) != highBits(t.base, t.width, t.skip) {
		return 0
	}
	c := highBits(a.shl(t.skip).and(ones(t.width)), t.width, t.indexBits).lo
	e := t.index[c]
	set := e.first
	if e.count > 0 {
		rs := t.ranges[e.first : e.first+e.count]
		i := 0
		for i+1 < len(rs) && !a.less(rs[i+1].start) {
			i++
		}
		set = rs[i].set
	}
	if set == 0 {
		return 0
	}
	return t.sets[set-1]
}

func (a u128) and(b u128) u128 { return u128{a.hi & b.hi, a.lo & b.lo} }

// entries are the map's: header, base, index, ranges, sets.
func (t *rangeTable) entries() int { return 2 + len(t.index) + len(t.ranges) + len(t.sets) }

// range6 is struct range6 of bpf/include/maps.h.
type range6 struct{ Hi, Lo, V uint64 }

// putRanges makes generation gen of gens the table of prefixes (also of
// none: every generation has its tables, which dropGeneration relies on)
// and returns it, open, with the memory the kernel accounts to it.
func putRanges(gens *ebpf.Map, gen uint32, prefixes []prefixRules, v6 bool) (*ebpf.Map, uint64, error) {
	t := buildRanges(prefixes, v6)
	n := t.entries()
	if n >= 1<<32 {
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
	rangesAt := 2 + len(t.index)
	setsAt := rangesAt + len(t.ranges)
	header := uint64(t.skip) | uint64(t.indexBits)<<8 | uint64(setsAt)<<16
	index := func(e indexEntry) uint64 {
		if e.count == 0 {
			return uint64(e.first)
		}
		return uint64(e.count)<<32 | (uint64(rangesAt) + uint64(e.first))
	}
	if v6 {
		values := make([]range6, 0, n)
		values = append(values, range6{V: header}, range6{Hi: t.base.hi, Lo: t.base.lo})
		for _, e := range t.index {
			values = append(values, range6{V: index(e)})
		}
		for _, r := range t.ranges {
			values = append(values, range6{Hi: r.start.hi, Lo: r.start.lo, V: uint64(r.set)})
		}
		for _, s := range t.sets {
			values = append(values, range6{V: s})
		}
		err = fillArray(tbl, values)
	} else {
		values := make([]uint64, 0, n)
		values = append(values, header, t.base.lo)
		for _, e := range t.index {
			values = append(values, index(e))
		}
		for _, r := range t.ranges {
			values = append(values, r.start.lo<<32|uint64(r.set))
		}
		values = append(values, t.sets...)
		err = fillArray(tbl, values)
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
