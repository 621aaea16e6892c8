package loader

// Upgrades: a new mhbpf whose maps differ from the pinned ones (another
// flow_map_size, another layout) takes the pinned maps over instead of
// refusing to start while the old programs keep running on them,
// unmanaged. Each pinned map is compared with the new spec; one that does
// not fit is replaced by a new map that gets its entries (copied, or
// rewritten by a registered converter, or none: rebuilt), pinned under a
// temporary name and renamed over the old pin, so that there is always one
// complete map at the name. The old programs keep the old map until the
// attachments are swapped in place (AttachTC, AttachCgroup update the
// pinned links); FinishUpgrade then copies what they recorded meanwhile.
//
// A crash at any point leaves a state the next start recovers: before the
// rename the old pin is untouched and the temporary pins (upgradeDir) are
// removed and the work done again; after it the new map is the pinned one.
// 'mhbpf down' removes the whole pin directory, temporary pins included.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/maps"
)

// MapAction is what a load did with one pinned map.
type MapAction string

const (
	// ActionResize: same layout, another capacity; entries copied.
	ActionResize MapAction = "resize"
	// ActionConvert: another layout; entries rewritten by a converter.
	ActionConvert MapAction = "convert"
	// ActionRebuild: another layout and no converter; the map starts
	// empty (for the flows: live connections choose their uplink again).
	ActionRebuild MapAction = "rebuild"
)

// MapUpgrade is what happened, or what would happen, to one pinned map.
type MapUpgrade struct {
	Map string
	// Into are the maps that replaced Map (ActionSplit, or an ActionRebuild
	// of a map of an older version whose layout no split knows).
	Into     []string
	Action   MapAction
	Old, New maps.Layout
	// Copied entries are in the new map; Dropped ones are not (no
	// converter, refused by it, beyond a smaller array, evicted from a
	// smaller LRU map, or refused by a full hash map).
	Copied, Dropped int
	// Batched: the entries were read and written with the batch calls.
	Batched bool
}

// Upgrade is what Load did with the pinned maps.
type Upgrade struct {
	Maps []MapUpgrade
	// Recovered names temporary pins of an upgrade that did not finish
	// (a crash), removed before this one.
	Recovered []string
}

func upgradeDir(pinDir string) string { return filepath.Join(pinDir, "upgrade") }

// pendingUpgrade is an old map whose programs may still be running, and
// what FinishUpgrade needs to copy their late entries.
type pendingUpgrade struct {
	name    string
	old     *ebpf.Map
	new     *ebpf.Map
	convert convertFunc
	seen    map[string]bool // keys of the first copy
}

type convertFunc func(key, value []byte) ([]byte, []byte, bool, error)

// mapSpecs are the maps the objects pin, by name (the three objects share
// one header: the first spec of a name stands for all).
func mapSpecs(specs ...*ebpf.CollectionSpec) map[string]*ebpf.MapSpec {
	out := map[string]*ebpf.MapSpec{}
	for _, s := range specs {
		for name, m := range s.Maps {
			if m.Pinning != ebpf.PinByName {
				continue
			}
			if _, ok := out[name]; !ok {
				out[name] = m
			}
		}
	}
	return out
}

func sortedNames(specs map[string]*ebpf.MapSpec) []string {
	names := make([]string, 0, len(specs))
	for n := range specs {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// planUpgrade compares every pinned map with its spec; it changes nothing.
// A missing pin is no upgrade (Load creates the map).
func planUpgrade(pinDir string, specs map[string]*ebpf.MapSpec) ([]MapUpgrade, error) {
	var out []MapUpgrade
	for _, name := range sortedNames(specs) {
		u, old, err := compare(pinDir, name, specs[name])
		if old != nil {
			old.Close()
		}
		if err != nil {
			return out, err
		}
		if u != nil {
			out = append(out, *u)
		}
	}
	return out, nil
}

// compare opens the pin of name and says what it needs (nil: nothing; the
// returned map is the open pin, or nil).
func compare(pinDir, name string, spec *ebpf.MapSpec) (*MapUpgrade, *ebpf.Map, error) {
	old, err := ebpf.LoadPinnedMap(filepath.Join(mapsDir(pinDir), name), nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("open pinned map %s: %w", name, err)
	}
	if err := spec.Compatible(old); err == nil {
		return nil, old, nil
	} else if !errors.Is(err, ebpf.ErrMapIncompatible) {
		return nil, old, fmt.Errorf("pinned map %s: %w", name, err)
	}
	u := &MapUpgrade{Map: name, Old: maps.LayoutOf(old), New: maps.LayoutOfSpec(spec)}
	switch {
	case u.Old.SameShape(u.New):
		u.Action = ActionResize
	default:
		if _, ok := maps.ConverterFor(name, u.Old, u.New); ok {
			u.Action = ActionConvert
		} else {
			u.Action = ActionRebuild
		}
	}
	return u, old, nil
}

// PlanUpgrade says what loading with o would do to the maps pinned under
// o.PinDir, without changing anything: what 'mhbpf check' warns about.
func PlanUpgrade(o Options) ([]MapUpgrade, error) {
	opts := o.withDefaults()
	if !exists(mapsDir(opts.PinDir)) {
		return nil, nil
	}
	feat, err := ProbeFeatures()
	if err != nil {
		return nil, err
	}
	specs, err := configuredSpecs(&opts, feat)
	if err != nil {
		return nil, err
	}
	all := mapSpecs(specs...)
	plan, err := planUpgrade(opts.PinDir, all)
	if err != nil {
		return plan, err
	}
	split, err := planSplits(opts.PinDir, all)
	return append(plan, split...), err
}

// upgradePinned replaces every pinned map that does not fit its spec. The
// old maps stay open in the returned pending list until FinishUpgrade.
func upgradePinned(pinDir string, specs map[string]*ebpf.MapSpec) (Upgrade, []*pendingUpgrade, error) {
	var up Upgrade
	tmp := upgradeDir(pinDir)
	if entries, err := os.ReadDir(tmp); err == nil {
		for _, e := range entries {
			up.Recovered = append(up.Recovered, e.Name())
		}
	}
	if err := os.RemoveAll(tmp); err != nil {
		return up, nil, fmt.Errorf("remove the temporary pins of an unfinished upgrade: %w", err)
	}
	var pending []*pendingUpgrade
	fail := func(err error) (Upgrade, []*pendingUpgrade, error) {
		for _, p := range pending {
			p.close()
		}
		return up, nil, err
	}
	for _, name := range sortedNames(specs) {
		u, old, err := compare(pinDir, name, specs[name])
		if err != nil {
			if old != nil {
				old.Close()
			}
			return fail(err)
		}
		if u == nil {
			if old != nil {
				old.Close()
			}
			continue
		}
		p, err := replaceMap(pinDir, specs[name], u, old)
		if err != nil {
			old.Close()
			return fail(fmt.Errorf("upgrade pinned map %s (%s to %s): %w", name, u.Old, u.New, err))
		}
		up.Maps = append(up.Maps, *u)
		if p != nil {
			pending = append(pending, p)
		} else {
			old.Close()
		}
	}
	if err := os.Remove(tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fail(err)
	}
	return up, pending, nil
}

// replaceMap makes the new map for u, fills it from old, and puts its pin
// in the place of old's.
func replaceMap(pinDir string, spec *ebpf.MapSpec, u *MapUpgrade, old *ebpf.Map) (*pendingUpgrade, error) {
	s := spec.Copy()
	s.Pinning = ebpf.PinNone
	nm, err := ebpf.NewMap(s)
	if err != nil {
		return nil, fmt.Errorf("create: %w", err)
	}
	var p *pendingUpgrade
	switch u.Action {
	case ActionRebuild:
		n, err := countEntries(old)
		if err != nil {
			nm.Close()
			return nil, err
		}
		u.Dropped = n
	default:
		conv := identity
		if u.Action == ActionConvert {
			c, _ := maps.ConverterFor(u.Map, u.Old, u.New)
			conv = c.Convert
		}
		p = &pendingUpgrade{name: u.Map, old: old, new: nm, convert: conv, seen: map[string]bool{}}
		if err := p.copy(u); err != nil {
			nm.Close()
			return nil, err
		}
	}
	tmp := filepath.Join(upgradeDir(pinDir), u.Map)
	if err := os.MkdirAll(upgradeDir(pinDir), 0o700); err != nil {
		nm.Close()
		return nil, err
	}
	if err := nm.Pin(tmp); err != nil {
		nm.Close()
		return nil, fmt.Errorf("pin %s: %w", tmp, err)
	}
	// rename(2) replaces the old pin in one step: a crash leaves either
	// map complete at the name, never none.
	if err := os.Rename(tmp, filepath.Join(mapsDir(pinDir), u.Map)); err != nil {
		_ = nm.Unpin()
		nm.Close()
		return nil, fmt.Errorf("replace the pin: %w", err)
	}
	if p == nil {
		nm.Close()
	}
	return p, nil
}

func identity(k, v []byte) ([]byte, []byte, bool, error) { return k, v, true, nil }

// copy moves every entry of the old map, converted, into the new one.
func (p *pendingUpgrade) copy(u *MapUpgrade) error {
	entries, batched, err := readEntries(p.old)
	if err != nil {
		return fmt.Errorf("read: %w", err)
	}
	for _, e := range entries {
		p.seen[string(e.key)] = true
	}
	conv, dropped, err := convertEntries(entries, p.convert)
	if err != nil {
		return err
	}
	newL := maps.LayoutOf(p.new)
	conv, beyond := fitEntries(conv, newL, maps.Recency(u.Map))
	written, wbatched, err := writeEntries(p.new, conv, ebpf.UpdateAny)
	if err != nil {
		return fmt.Errorf("write: %w", err)
	}
	present, err := countEntries(p.new)
	if err != nil {
		return err
	}
	// An LRU map evicts on its own what does not fit.
	evicted := max(written-present, 0)
	u.Copied = written - evicted
	u.Dropped = dropped + beyond + evicted + (len(conv) - written)
	u.Batched = batched && wbatched
	return nil
}

// FinishUpgrade copies what the old programs recorded in the old maps
// after the first copy (a flow that started meanwhile), now that the
// attachments run the new programs, and lets the old maps go. Entries the
// new programs made meanwhile win. It returns how many entries it copied.
func (d *Datapath) FinishUpgrade() (int, error) {
	var errs []error
	n := 0
	for _, p := range d.pending {
		c, err := p.finish()
		n += c
		if err != nil {
			errs = append(errs, fmt.Errorf("finish upgrade of map %s: %w", p.name, err))
		}
		p.close()
	}
	d.pending = nil
	for _, p := range d.splits {
		c, err := p.finish()
		n += c
		if err != nil {
			errs = append(errs, fmt.Errorf("finish moving map %s into %s: %w", p.split.From, strings.Join(p.split.To, ", "), err))
		}
		p.close()
	}
	d.splits = nil
	return n, errors.Join(errs...)
}

func (p *pendingUpgrade) finish() (int, error) {
	entries, _, err := readEntries(p.old)
	if err != nil {
		return 0, err
	}
	var late []entry
	for _, e := range entries {
		if !p.seen[string(e.key)] {
			late = append(late, e)
		}
	}
	conv, _, err := convertEntries(late, p.convert)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, e := range conv {
		err := putEntry(p.new, e, ebpf.UpdateNoExist)
		if err == nil {
			n++
		} else if !errors.Is(err, ebpf.ErrKeyExist) {
			return n, err
		}
	}
	return n, nil
}

func (p *pendingUpgrade) close() {
	p.old.Close()
	p.new.Close()
}

// entry is one raw map entry; values has one element per possible CPU
// for a per-CPU map, else one.
type entry struct {
	key    []byte
	values [][]byte
}

func perCPU(t ebpf.MapType) bool {
	switch t {
	case ebpf.PerCPUHash, ebpf.PerCPUArray, ebpf.LRUCPUHash, ebpf.PerCPUCGroupStorage:
		return true
	}
	return false
}

func isArray(t ebpf.MapType) bool { return t == ebpf.Array || t == ebpf.PerCPUArray }

func convertEntries(in []entry, conv convertFunc) (out []entry, dropped int, err error) {
	for _, e := range in {
		ne := entry{}
		keep := true
		for _, v := range e.values {
			k, nv, ok, err := conv(e.key, v)
			if err != nil {
				return nil, dropped, fmt.Errorf("convert: %w", err)
			}
			if !ok {
				keep = false
				break
			}
			ne.key = k
			ne.values = append(ne.values, nv)
		}
		if keep {
			out = append(out, ne)
		} else {
			dropped++
		}
	}
	return out, dropped, nil
}

// fitEntries drops what cannot go into a map of layout l: array indexes
// past its end; and orders the entries oldest first, when a smaller LRU
// map will evict some, so that it evicts the oldest.
func fitEntries(in []entry, l maps.Layout, recency func([]byte) uint64) ([]entry, int) {
	dropped := 0
	if isArray(l.Type) {
		out := in[:0]
		for _, e := range in {
			if len(e.key) == 4 && nativeUint32(e.key) < l.MaxEntries {
				out = append(out, e)
			} else {
				dropped++
			}
		}
		in = out
	}
	if recency != nil && len(in) > int(l.MaxEntries) {
		sort.SliceStable(in, func(i, j int) bool { return recency(in[i].values[0]) < recency(in[j].values[0]) })
	}
	return in, dropped
}

// nativeUint32 reads an array map's index as the kernel stores it.
func nativeUint32(b []byte) uint32 { return binary.NativeEndian.Uint32(b) }

func countEntries(m *ebpf.Map) (int, error) {
	entries, _, err := readEntries(m)
	return len(entries), err
}

const batchSize = 4096

// readEntries reads every entry, with batch lookups where the map type
// has them (hash and array maps), else key by key (LPM tries).
func readEntries(m *ebpf.Map) ([]entry, bool, error) {
	if out, err := readBatch(m); err == nil {
		return out, true, nil
	} else if !errors.Is(err, ebpf.ErrNotSupported) {
		return nil, false, err
	}
	var out []entry
	var k []byte
	it := m.Iterate()
	if perCPU(m.Type()) {
		ncpu, err := ebpf.PossibleCPU()
		if err != nil {
			return nil, false, err
		}
		vs := make([][]byte, ncpu)
		for it.Next(&k, vs) {
			out = append(out, entry{key: k, values: cloneAll(vs)})
		}
	} else {
		var v []byte
		for it.Next(&k, &v) {
			out = append(out, entry{key: k, values: [][]byte{v}})
		}
	}
	return out, false, it.Err()
}

func cloneAll(vs [][]byte) [][]byte {
	out := make([][]byte, len(vs))
	for i, v := range vs {
		out[i] = append([]byte(nil), v...)
	}
	return out
}

// byteArrays is a slice of n arrays of size bytes each: what the batch
// calls take for keys and values whose size is known only at run time.
func byteArrays(size uint32, n int) reflect.Value {
	return reflect.MakeSlice(reflect.SliceOf(reflect.ArrayOf(int(size), reflect.TypeFor[byte]())), n, n)
}

func arrayBytes(v reflect.Value, i int) []byte {
	a := v.Index(i)
	b := make([]byte, a.Len())
	reflect.Copy(reflect.ValueOf(b), a)
	return b
}

func readBatch(m *ebpf.Map) ([]entry, error) {
	ncpu := 1
	if perCPU(m.Type()) {
		n, err := ebpf.PossibleCPU()
		if err != nil {
			return nil, err
		}
		ncpu = n
	}
	var out []entry
	var cursor ebpf.MapBatchCursor
	for {
		keys := byteArrays(m.KeySize(), batchSize)
		vals := byteArrays(m.ValueSize(), batchSize*ncpu)
		n, err := m.BatchLookup(&cursor, keys.Interface(), vals.Interface(), nil)
		for i := 0; i < n; i++ {
			e := entry{key: arrayBytes(keys, i)}
			for c := 0; c < ncpu; c++ {
				e.values = append(e.values, arrayBytes(vals, i*ncpu+c))
			}
			out = append(out, e)
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return out, nil
		}
		if err != nil {
			return nil, err
		}
	}
}

// writeEntries writes the entries in batches where the map type has
// them, else one by one; it returns how many the kernel took.
func writeEntries(m *ebpf.Map, entries []entry, flags ebpf.MapUpdateFlags) (int, bool, error) {
	batched := true
	written := 0
	for start := 0; start < len(entries); start += batchSize {
		chunk := entries[start:min(start+batchSize, len(entries))]
		if batched {
			n, err := writeBatch(m, chunk, flags)
			if err == nil {
				written += n
				continue
			}
			if !errors.Is(err, ebpf.ErrNotSupported) && !isFull(err) {
				return written, false, err
			}
			// Key by key: a full map drops some, the rest go in.
			batched = false
		}
		for _, e := range chunk {
			err := putEntry(m, e, flags)
			if err == nil {
				written++
			} else if !errors.Is(err, ebpf.ErrKeyExist) && !isFull(err) {
				return written, false, err
			}
		}
	}
	return written, batched, nil
}

// isFull: a plain hash map that is full refuses the entry (E2BIG); that
// entry is dropped, the others go on.
func isFull(err error) bool { return errors.Is(err, unix.E2BIG) }

func writeBatch(m *ebpf.Map, chunk []entry, flags ebpf.MapUpdateFlags) (int, error) {
	ncpu := len(chunk[0].values)
	keys := byteArrays(m.KeySize(), len(chunk))
	vals := byteArrays(m.ValueSize(), len(chunk)*ncpu)
	for i, e := range chunk {
		reflect.Copy(keys.Index(i), reflect.ValueOf(e.key))
		for c, v := range e.values {
			reflect.Copy(vals.Index(i*ncpu+c), reflect.ValueOf(v))
		}
	}
	return m.BatchUpdate(keys.Interface(), vals.Interface(), &ebpf.BatchOptions{ElemFlags: uint64(flags)})
}

func putEntry(m *ebpf.Map, e entry, flags ebpf.MapUpdateFlags) error {
	if perCPU(m.Type()) {
		return m.Update(e.key, e.values, flags)
	}
	return m.Update(e.key, e.values[0], flags)
}

// Log says per map what the upgrade did: INFO for maps whose entries were
// carried over, WARN for maps rebuilt empty.
func (u Upgrade) Log(log *slog.Logger) {
	if len(u.Recovered) > 0 {
		log.Warn("removed the temporary pins of an upgrade that did not finish (a crash); done again", "pins", u.Recovered)
	}
	for _, m := range u.Maps {
		attrs := []any{"map", m.Map, "action", m.Action, "old", m.Old.String(), "new", m.New.String(),
			"copied", m.Copied, "dropped", m.Dropped, "batched", m.Batched}
		if len(m.Into) > 0 {
			attrs = append(attrs, "into", m.Into)
		}
		switch {
		case m.Action == ActionSplit:
			log.Info("pinned map of the previous version moved into the maps that replace it", attrs...)
		case m.Action == ActionRebuild && len(m.Into) > 0:
			log.Warn("pinned map of the previous version dropped: no split knows its layout; the maps that replace it start empty", attrs...)
		case m.Action == ActionRebuild:
			log.Warn("pinned map rebuilt empty: its layout changed and no converter knows the old one", attrs...)
		case m.Action == ActionConvert:
			log.Info("pinned map converted to the new layout", attrs...)
		default:
			log.Info("pinned map resized", attrs...)
		}
	}
}
