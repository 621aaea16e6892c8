package daemon

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/mhbpf/mhbpf/internal/config"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/statefile"
)

// identitiesFile records each uplink's identity (slot, mark, table) by
// name, for the next configuration and the next daemon: the pinned maps
// and their flows outlive both.
const identitiesFile = "uplinks.json"

type identityRecord struct {
	// Uplinks in the configuration's order (the fib rules' order).
	Uplinks []config.Identity `json:"uplinks"`
}

// previousIdentities is whom the datapath's slots belong to now: the record
// of the last daemon on this state directory, plus, nameless, every slot in
// use in the pinned uplinks map that the record does not name (a first
// start on maps of a daemon that kept no record, or a slot someone else
// wrote). A nameless slot is kept only by an uplink that gets the same
// slot and mark anyway.
func (d *Daemon) previousIdentities() []config.Identity {
	var rec identityRecord
	if err := statefile.Read(d.stateFile(identitiesFile), &rec); err != nil && !errors.Is(err, os.ErrNotExist) {
		d.log.Warn("the record of uplink identities is unreadable; taking the slots in use from the datapath",
			"file", d.stateFile(identitiesFile), "error", err)
		rec.Uplinks = nil
	}
	named := map[int]bool{}
	for _, p := range rec.Uplinks {
		named[p.ID] = true
	}
	prev := rec.Uplinks
	for id := 0; id < maps.MaxUplinks; id++ {
		if named[id] {
			continue
		}
		if u, err := d.dp.Maps.LookupUplink(id); err == nil && u.Mark != 0 {
			prev = append(prev, config.Identity{ID: id, Mark: u.Mark})
		}
	}
	return prev
}

// takeIdentities assigns the starting configuration's identities from what
// the slots belong to now, moves the datapath over and records them.
func (d *Daemon) takeIdentities() error {
	prev := d.previousIdentities()
	changes, err := d.cfg.AssignIdentities(prev)
	if err != nil {
		return err
	}
	d.logIdentities(changes)
	d.moveIdentities(prev)
	if err := d.saveIdentities(); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	return nil
}

func (d *Daemon) saveIdentities() error {
	return statefile.Write(d.stateFile(identitiesFile), identityRecord{Uplinks: d.cfg.Identities()})
}

func (d *Daemon) logIdentities(changes []config.IdentityChange) {
	for _, c := range changes {
		if c.Old.Name == "" {
			d.log.Info("new uplink identity", "uplink", UplinkRef{c.Name, c.New.ID}, "mark", MarkRef{c.Name, c.New.Mark}, "table", TableRef{c.Name, c.New.Table})
			continue
		}
		d.log.Warn("uplink identity changed; its flows are re-marked", "uplink", c.Name,
			"id", fmt.Sprintf("%d -> %d", c.Old.ID, c.New.ID),
			"mark", fmt.Sprintf("%#x -> %#x", c.Old.Mark, c.New.Mark),
			"table", fmt.Sprintf("%d -> %d", c.Old.Table, c.New.Table), "why", c.Why)
	}
	var all []string
	for _, u := range d.cfg.Uplinks {
		all = append(all, fmt.Sprintf("%s=%d/%#x/%d", u.Name, u.ID, u.Mark, u.Table))
	}
	d.log.Info("uplink identities (name=id/mark/table, in preference order)", "uplinks", strings.Join(all, " "))
}

// moveIdentities makes the datapath follow d.cfg's identities, coming from
// prev (in its configuration's order). A slot whose uplink is gone, or
// that now belongs to another uplink, is cleared and forgets its flows
// (their next packet chooses again), the remote endpoints and sticky
// choices naming it, and its counters; the daemon forgets its state of
// that slot. The flows of the uplinks that stay get marks that keep them
// on their uplink: their uplink's bit, now perhaps another, and of their
// fallback bits only those of uplinks that still come later in the
// preference order (a fallback that now comes first would take the flow).
func (d *Daemon) moveIdentities(prev []config.Identity) {
	type slot struct {
		pos int
		u   config.Uplink
	}
	now := map[int]slot{}
	for pos, u := range d.cfg.Uplinks {
		now[u.ID] = slot{pos, u}
	}
	before := map[int]config.Identity{}
	oldPos := map[int]int{}
	idOfBit := map[uint32]int{}
	for pos, p := range prev {
		if _, dup := before[p.ID]; dup || p.ID < 0 || p.ID >= maps.MaxUplinks {
			continue
		}
		before[p.ID], oldPos[p.ID] = p, pos
		if _, dup := idOfBit[p.Mark]; !dup && p.Mark != 0 {
			idOfBit[p.Mark] = p.ID
		}
	}
	retired := map[int]bool{}
	var kept []int
	for id, p := range before {
		n, ok := now[id]
		if !ok || p.Name != "" && p.Name != n.u.Name || p.Name == "" && p.Mark != n.u.Mark {
			retired[id] = true
		} else {
			kept = append(kept, id)
		}
	}
	sort.Slice(kept, func(i, j int) bool { return oldPos[kept[i]] < oldPos[kept[j]] })
	remark := false
	for i, id := range kept {
		remark = remark || before[id].Mark != now[id].u.Mark || i > 0 && now[kept[i-1]].pos > now[id].pos
	}
	for id := range retired {
		if err := d.dp.Maps.ClearUplink(id); err != nil {
			d.log.Error("uplinks map: clearing a retired slot", "id", id, "error", err)
		}
		delete(d.mem.Uplinks, id)
		delete(d.probes, id)
	}
	if len(retired) == 0 && !remark {
		return
	}
	keep := d.cfg.Global.StrictMark | d.cfg.Global.ReplyMark
	gone := func(id int) bool {
		_, ok := now[id]
		return retired[id] || !ok
	}
	deleted, remarked, err := d.dp.Maps.RetireUplinks(gone, func(f maps.Flow) uint32 {
		x := now[f.Uplink]
		mark := f.Mark&keep | x.u.Mark
		for rest := f.Mark &^ keep; rest != 0; rest &= rest - 1 {
			y, ok := idOfBit[rest&-rest]
			if !ok || y == f.Uplink || retired[y] {
				continue
			}
			if ny, ok := now[y]; ok && ny.pos > x.pos {
				mark |= ny.u.Mark
			}
		}
		return mark
	})
	if err != nil {
		d.log.Error("moving the flows to the new uplink identities", "error", err)
	}
	var ids []int
	for id := range retired {
		ids = append(ids, id)
	}
	sort.Ints(ids)
	d.log.Info("uplink slots moved", "retired", fmt.Sprint(ids), "flows_deleted", deleted, "flows_remarked", remarked)
}

// ifaceRoles: each interface's uplink slot, or -1 for the LAN.
func ifaceRoles(c *config.Config) map[string]int {
	m := map[string]int{}
	for _, u := range c.Uplinks {
		m[u.Interface] = u.ID
	}
	for _, i := range c.LAN.Interfaces {
		m[i] = -1
	}
	return m
}

// byPos sorts a policy's choices by their uplinks' positions.
type byPos struct {
	pos     []int
	choices []maps.Choice
}

func (b byPos) Len() int           { return len(b.pos) }
func (b byPos) Less(i, j int) bool { return b.pos[i] < b.pos[j] }
func (b byPos) Swap(i, j int) {
	b.pos[i], b.pos[j] = b.pos[j], b.pos[i]
	b.choices[i], b.choices[j] = b.choices[j], b.choices[i]
}
