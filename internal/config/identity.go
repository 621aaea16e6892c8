package config

import (
	"fmt"
	"math/bits"
	"strings"
)

// MaxUplinks is how many uplinks the datapath has slots for.
const MaxUplinks = 16

// Identity is what makes an uplink the same uplink to the datapath and the
// kernel: its slot in the BPF maps (the id every flow, sticky entry and
// policy entry stores), its mark bit (which every flow's mark and every
// socket's SO_MARK carries) and its routing table. It belongs to the name:
// removing or reordering other uplinks must not change it, or flows of one
// uplink would move to another.
type Identity struct {
	Name  string `json:"name"`
	ID    int    `json:"id"`
	Mark  uint32 `json:"mark"`
	Table int    `json:"table"`
}

// Identities lists the uplinks' identities in the configuration's order.
func (c *Config) Identities() []Identity {
	out := make([]Identity, len(c.Uplinks))
	for i, u := range c.Uplinks {
		out[i] = Identity{Name: u.Name, ID: u.ID, Mark: u.Mark, Table: u.Table}
	}
	return out
}

// IdentityChange is an uplink whose identity is not the one remembered for
// its name, or a name seen for the first time (Old.Name == "").
type IdentityChange struct {
	Name     string
	Old, New Identity
	Why      string // for a remembered name: what made it change
}

// AssignIdentities gives every uplink its slot, and its mark and table where
// the configuration sets none, keeping what prev (the identities of an
// earlier configuration, in any order) says for the same name:
//
//   - A configured mark or table wins. A remembered one that the
//     configuration now gives to another uplink is lost (that uplink then
//     gets a free one, and the change says why); no other uplink moves.
//   - A name seen before keeps its slot, and its mark and table unless
//     configured otherwise or no longer valid (outside mark_mask or
//     global.tables after a restart with other global settings).
//   - New names, and those that could not keep theirs, get the lowest free
//     slot, mark bit and table, in configuration order.
//
// Names in prev that are gone free their slot, bit and table. It sets ID,
// Mark and Table of c.Uplinks and returns the changes against prev. An
// error means there are not enough free slots, bits or tables, which
// validation rules out.
func (c *Config) AssignIdentities(prev []Identity) ([]IdentityChange, error) {
	g := &c.Global
	free := g.MarkMask &^ (g.StrictMark | g.ReplyMark)
	old := make(map[string]Identity, len(prev))
	for _, p := range prev {
		if _, dup := old[p.Name]; !dup && p.Name != "" {
			old[p.Name] = p
		}
	}
	n := len(c.Uplinks)
	ids, marks, tables := make([]int, n), make([]uint32, n), make([]int, n)
	why := make([][]string, n)
	idOwner, markOwner, tableOwner := map[int]int{}, map[uint32]int{}, map[int]int{}
	for i, u := range c.Uplinks {
		ids[i] = -1
		if u.MarkSet {
			marks[i] = u.Mark
			markOwner[u.Mark] = i
		}
		if u.TableSet {
			tables[i] = u.Table
			tableOwner[u.Table] = i
		}
	}
	owner := func(j int, configured bool) string {
		if configured {
			return "configured for uplink " + c.Uplinks[j].Name
		}
		return "remembered for uplink " + c.Uplinks[j].Name
	}
	for i, u := range c.Uplinks {
		p, ok := old[u.Name]
		if !ok {
			continue
		}
		if j, taken := idOwner[p.ID]; p.ID < 0 || p.ID >= MaxUplinks {
			why[i] = append(why[i], fmt.Sprintf("slot %d is out of range", p.ID))
		} else if taken {
			why[i] = append(why[i], fmt.Sprintf("slot %d is %s", p.ID, owner(j, false)))
		} else {
			ids[i] = p.ID
			idOwner[p.ID] = i
		}
		switch j, taken := markOwner[p.Mark]; {
		case u.MarkSet:
			if u.Mark != p.Mark {
				why[i] = append(why[i], fmt.Sprintf("mark %#x is configured", u.Mark))
			}
		case bits.OnesCount32(p.Mark) != 1 || p.Mark&free == 0:
			why[i] = append(why[i], fmt.Sprintf("mark %#x is not an uplink bit of mark_mask %#x", p.Mark, g.MarkMask))
		case taken:
			why[i] = append(why[i], fmt.Sprintf("mark %#x is %s", p.Mark, owner(j, c.Uplinks[j].MarkSet)))
		default:
			marks[i] = p.Mark
			markOwner[p.Mark] = i
		}
		switch j, taken := tableOwner[p.Table]; {
		case u.TableSet:
			if u.Table != p.Table {
				why[i] = append(why[i], fmt.Sprintf("table %d is configured", u.Table))
			}
		case p.Table < g.TableMin || p.Table > g.TableMax:
			why[i] = append(why[i], fmt.Sprintf("table %d is outside global.tables %d-%d", p.Table, g.TableMin, g.TableMax))
		case taken:
			why[i] = append(why[i], fmt.Sprintf("table %d is %s", p.Table, owner(j, c.Uplinks[j].TableSet)))
		default:
			tables[i] = p.Table
			tableOwner[p.Table] = i
		}
	}
	for i, u := range c.Uplinks {
		if ids[i] < 0 {
			for id := 0; id < MaxUplinks; id++ {
				if _, taken := idOwner[id]; !taken {
					ids[i] = id
					idOwner[id] = i
					break
				}
			}
			if ids[i] < 0 {
				return nil, fmt.Errorf("uplink %s: no free slot (at most %d uplinks)", u.Name, MaxUplinks)
			}
		}
		if marks[i] == 0 {
			for rest := free; rest != 0; rest &= rest - 1 {
				bit := rest & -rest
				if _, taken := markOwner[bit]; !taken {
					marks[i] = bit
					markOwner[bit] = i
					break
				}
			}
			if marks[i] == 0 {
				return nil, fmt.Errorf("uplink %s: no free bit left in mark_mask %#x", u.Name, g.MarkMask)
			}
		}
		if tables[i] == 0 {
			for t := g.TableMin; t <= g.TableMax; t++ {
				if _, taken := tableOwner[t]; !taken {
					tables[i] = t
					tableOwner[t] = i
					break
				}
			}
			if tables[i] == 0 {
				return nil, fmt.Errorf("uplink %s: no free table left in global.tables %d-%d", u.Name, g.TableMin, g.TableMax)
			}
		}
	}
	var changes []IdentityChange
	for i := range c.Uplinks {
		u := &c.Uplinks[i]
		u.ID, u.Mark, u.Table = ids[i], marks[i], tables[i]
		now := Identity{Name: u.Name, ID: u.ID, Mark: u.Mark, Table: u.Table}
		if p, ok := old[u.Name]; !ok {
			changes = append(changes, IdentityChange{Name: u.Name, New: now})
		} else if p != now {
			changes = append(changes, IdentityChange{Name: u.Name, Old: p, New: now, Why: strings.Join(why[i], "; ")})
		}
	}
	return changes, nil
}
