package loader

// Maps an older version pinned under a name no current map has (flows,
// split into flows4 and flows6), or whose entries moved in part to a new
// map (ifaces below IfaceSlots, now in iface_slots): each registered
// maps.Split names the old map and what replaced it. The new maps are made
// and filled from the old pin before the objects load, so the new programs
// find every flow and interface from their first packet. The old pin stays
// until FinishUpgrade has copied what the old programs recorded meanwhile;
// then it is removed (Keep: the moved entries are deleted from it).
//
// A crash leaves the old pin, so the next start does it again; entries
// already in the new maps (the new programs' own, if they ran) win.

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"

	"github.com/mhbpf/mhbpf/internal/maps"
)

// ActionSplit: the entries of a map of another name that an older
// version pinned are moved into the maps that replaced it.
const ActionSplit MapAction = "split"

type pendingSplit struct {
	split  maps.Split
	old    *ebpf.Map
	oldPin string
	to     map[string]*ebpf.Map // nil: rebuilt, nothing to copy
	seen   map[string]bool      // keys of the first copy
}

// openSplit opens the old pin of s if there is one this version has to
// move entries out of (nil map: none).
func openSplit(pinDir string, s maps.Split, specs map[string]*ebpf.MapSpec) (*ebpf.Map, error) {
	if (specs[s.From] != nil) != s.Keep {
		return nil, nil // a current map of that name: not a predecessor
	}
	for _, to := range s.To {
		if specs[to] == nil {
			return nil, nil
		}
	}
	old, err := ebpf.LoadPinnedMap(filepath.Join(mapsDir(pinDir), s.From), nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open pinned map %s: %w", s.From, err)
	}
	return old, nil
}

// routeEntries converts the entries of the old map into their new maps;
// dropped are those no new map takes (of a map that is not kept).
func routeEntries(s maps.Split, in []entry) (out map[string][]entry, moved []entry, dropped int, err error) {
	out = map[string][]entry{}
	for _, e := range in {
		ne := entry{}
		to := ""
		keep := true
		for _, v := range e.values {
			t, k, nv, ok, err := s.Convert(e.key, v)
			if err != nil {
				return nil, nil, dropped, fmt.Errorf("convert %s: %w", s.From, err)
			}
			if !ok {
				keep = false
				break
			}
			to, ne.key = t, k
			ne.values = append(ne.values, nv)
		}
		if !keep {
			if !s.Keep {
				dropped++
			}
			continue
		}
		out[to] = append(out[to], ne)
		moved = append(moved, e)
	}
	return out, moved, dropped, nil
}

// planSplit says what s would do (nil: nothing).
func planSplit(s maps.Split, old *ebpf.Map, specs map[string]*ebpf.MapSpec) (*MapUpgrade, []entry, error) {
	u := &MapUpgrade{Map: s.From, Into: s.To, Action: ActionSplit, Old: maps.LayoutOf(old), New: maps.LayoutOfSpec(specs[s.To[0]])}
	entries, batched, err := readEntries(old)
	if err != nil {
		return nil, nil, fmt.Errorf("read pinned map %s: %w", s.From, err)
	}
	u.Batched = batched
	if !u.Old.SameShape(s.Layout) {
		if s.Keep {
			return nil, nil, nil // the same-name upgrade deals with it
		}
		u.Action = ActionRebuild
		u.Dropped = len(entries)
		return u, nil, nil
	}
	if s.Keep {
		_, moved, _, err := routeEntries(s, entries)
		if err != nil || len(moved) == 0 {
			return nil, nil, err
		}
	}
	return u, entries, nil
}

func planSplits(pinDir string, specs map[string]*ebpf.MapSpec) ([]MapUpgrade, error) {
	var out []MapUpgrade
	for _, s := range maps.Splits() {
		old, err := openSplit(pinDir, s, specs)
		if err != nil {
			return out, err
		}
		if old == nil {
			continue
		}
		u, _, err := planSplit(s, old, specs)
		old.Close()
		if err != nil {
			return out, err
		}
		if u != nil {
			out = append(out, *u)
		}
	}
	return out, nil
}

// splitPinned makes and fills the maps that replaced an older version's.
func splitPinned(pinDir string, specs map[string]*ebpf.MapSpec) ([]MapUpgrade, []*pendingSplit, error) {
	var ups []MapUpgrade
	var pending []*pendingSplit
	fail := func(err error) ([]MapUpgrade, []*pendingSplit, error) {
		for _, p := range pending {
			p.close()
		}
		return ups, nil, err
	}
	for _, s := range maps.Splits() {
		old, err := openSplit(pinDir, s, specs)
		if err != nil {
			return fail(err)
		}
		if old == nil {
			continue
		}
		u, entries, err := planSplit(s, old, specs)
		if err != nil || u == nil {
			old.Close()
			if err != nil {
				return fail(err)
			}
			continue
		}
		p := &pendingSplit{split: s, old: old, oldPin: filepath.Join(mapsDir(pinDir), s.From), seen: map[string]bool{}}
		pending = append(pending, p)
		if u.Action == ActionRebuild {
			ups = append(ups, *u)
			continue
		}
		if err := p.fill(pinDir, specs, entries, u); err != nil {
			return fail(fmt.Errorf("move pinned map %s into %s: %w", s.From, strings.Join(s.To, ", "), err))
		}
		ups = append(ups, *u)
	}
	return ups, pending, nil
}

// fill opens (a crashed earlier run made it) or makes every new map and
// writes the converted entries into it; an entry already there wins.
func (p *pendingSplit) fill(pinDir string, specs map[string]*ebpf.MapSpec, entries []entry, u *MapUpgrade) error {
	for _, e := range entries {
		p.seen[string(e.key)] = true
	}
	routed, _, dropped, err := routeEntries(p.split, entries)
	if err != nil {
		return err
	}
	u.Dropped = dropped
	p.to = map[string]*ebpf.Map{}
	for _, to := range p.split.To {
		pin := filepath.Join(mapsDir(pinDir), to)
		m, err := ebpf.LoadPinnedMap(pin, nil)
		fresh := errors.Is(err, os.ErrNotExist)
		if fresh {
			s := specs[to].Copy()
			s.Pinning = ebpf.PinNone
			m, err = ebpf.NewMap(s)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", to, err)
		}
		p.to[to] = m
		in, _ := fitEntries(routed[to], maps.LayoutOf(m), maps.Recency(to))
		if !fresh {
			// A crashed earlier run made it: what is there already wins.
			written, there, err := putNew(m, in)
			if err != nil {
				return fmt.Errorf("write %s: %w", to, err)
			}
			u.Copied += written + there
			u.Dropped += len(in) - written - there
			continue
		}
		if _, _, err := writeEntries(m, in, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("write %s: %w", to, err)
		}
		present := len(in)
		if !isArray(m.Type()) { // an LRU map evicts on its own what does not fit
			if present, err = countEntries(m); err != nil {
				return err
			}
		}
		u.Copied += present
		u.Dropped += len(in) - present
		if fresh {
			if err := pinByRename(pinDir, m, to); err != nil {
				return err
			}
		}
	}
	return nil
}

// pinByRename pins a new map at name in one step (see replaceMap).
func pinByRename(pinDir string, m *ebpf.Map, name string) error {
	tmp := filepath.Join(upgradeDir(pinDir), name)
	if err := os.MkdirAll(upgradeDir(pinDir), 0o700); err != nil {
		return err
	}
	if err := m.Pin(tmp); err != nil {
		return fmt.Errorf("pin %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, filepath.Join(mapsDir(pinDir), name)); err != nil {
		_ = m.Unpin()
		return fmt.Errorf("pin %s: %w", name, err)
	}
	return os.Remove(upgradeDir(pinDir))
}

// putNew writes the entries a map does not have yet (an array's slot is
// empty while all zero); it returns how many it wrote and how many were
// there already.
func putNew(m *ebpf.Map, in []entry) (n, there int, err error) {
	for _, e := range in {
		flags := ebpf.UpdateNoExist
		if isArray(m.Type()) {
			var cur []byte
			if err := m.Lookup(e.key, &cur); err != nil {
				return n, there, err
			}
			if !allZero(cur) {
				there++
				continue
			}
			flags = ebpf.UpdateAny
		}
		switch err := putEntry(m, e, flags); {
		case err == nil:
			n++
		case errors.Is(err, ebpf.ErrKeyExist):
			there++
		case !isFull(err):
			return n, there, err
		}
	}
	return n, there, nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// finish copies what the old programs recorded after the first copy, and
// lets the old map go: its pin removed, or (Keep) the moved entries
// deleted from it.
func (p *pendingSplit) finish() (int, error) {
	n := 0
	if p.to != nil {
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
		routed, _, _, err := routeEntries(p.split, late)
		if err != nil {
			return 0, err
		}
		for to, in := range routed {
			c, _, err := putNew(p.to[to], in)
			n += c
			if err != nil {
				return n, fmt.Errorf("%s: %w", to, err)
			}
		}
		if p.split.Keep {
			_, moved, _, err := routeEntries(p.split, entries)
			if err != nil {
				return n, err
			}
			for _, e := range moved {
				if err := p.old.Delete(e.key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
					return n, err
				}
			}
			return n, nil
		}
	}
	if err := os.Remove(p.oldPin); err != nil && !errors.Is(err, os.ErrNotExist) {
		return n, err
	}
	return n, nil
}

func (p *pendingSplit) close() {
	p.old.Close()
	for _, m := range p.to {
		m.Close()
	}
}
