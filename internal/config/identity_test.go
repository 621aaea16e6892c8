package config

import (
	"fmt"
	"reflect"
	"strings"
	"testing"
)

// uplinksConfig is a configuration with uplinks of these names, in this
// order; extra lines go into an uplink's table (name=lines).
func uplinksConfig(t *testing.T, names []string, extra map[string]string) *Config {
	t.Helper()
	return globalConfig(t, "", names, extra)
}

func globalConfig(t *testing.T, global string, names []string, extra map[string]string) *Config {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "[global]\n%s\n", global)
	for i, n := range names {
		fmt.Fprintf(&b, "[[uplink]]\nname = %q\ninterface = \"if%d%s\"\n%s\n", n, i, n, extra[n])
	}
	c, err := Parse("test.toml", []byte(b.String()))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func ident(name string, id int, mark uint32, table int) Identity {
	return Identity{Name: name, ID: id, Mark: mark, Table: table}
}

func assign(t *testing.T, c *Config, prev []Identity) ([]Identity, []IdentityChange) {
	t.Helper()
	changes, err := c.AssignIdentities(prev)
	if err != nil {
		t.Fatal(err)
	}
	return c.Identities(), changes
}

func wantIdentities(t *testing.T, got, want []Identity) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("identities\n got %+v\nwant %+v", got, want)
	}
}

// Without memory: slots in order, the lowest free bits and tables, around
// the configured ones. That is what Parse gives on its own.
func TestIdentitiesFresh(t *testing.T) {
	c := uplinksConfig(t, []string{"isp1", "isp2", "vpn"}, map[string]string{"isp2": "mark = 0x10000\ntable = 100"})
	want := []Identity{ident("isp1", 0, 0x20000, 101), ident("isp2", 1, 0x10000, 100), ident("vpn", 2, 0x40000, 102)}
	wantIdentities(t, c.Identities(), want)
	got, changes := assign(t, c, nil)
	wantIdentities(t, got, want)
	if len(changes) != 3 || changes[0].Old.Name != "" {
		t.Fatalf("changes %+v, want three new names", changes)
	}
}

// The case: isp1 removed and the order changed. Nobody else's slot,
// mark or table moves.
func TestIdentitiesSurviveRemovalAndReorder(t *testing.T) {
	prev := uplinksConfig(t, []string{"isp1", "isp2", "tun0"}, nil).Identities()
	wantIdentities(t, prev, []Identity{ident("isp1", 0, 0x10000, 100), ident("isp2", 1, 0x20000, 101), ident("tun0", 2, 0x40000, 102)})

	c := uplinksConfig(t, []string{"tun0", "isp2"}, nil)
	got, changes := assign(t, c, prev)
	wantIdentities(t, got, []Identity{ident("tun0", 2, 0x40000, 102), ident("isp2", 1, 0x20000, 101)})
	if len(changes) != 0 {
		t.Fatalf("changes %+v, want none", changes)
	}
	// Assigning again from the result changes nothing (a restart).
	c2 := uplinksConfig(t, []string{"tun0", "isp2"}, nil)
	if got2, changes := assign(t, c2, got); !reflect.DeepEqual(got2, got) || len(changes) != 0 {
		t.Fatalf("again: %+v %+v", got2, changes)
	}
}

// A new name gets the lowest free slot, bit and table, also one a removed
// name left; a new name listed first does not take a remembered one's.
func TestIdentitiesNewNamesTakeWhatIsFree(t *testing.T) {
	prev := []Identity{ident("tun0", 2, 0x40000, 102), ident("isp2", 1, 0x20000, 101)} // isp1 (0) is gone
	c := uplinksConfig(t, []string{"new", "tun0", "isp2", "other"}, nil)
	got, changes := assign(t, c, prev)
	wantIdentities(t, got, []Identity{ident("new", 0, 0x10000, 100), ident("tun0", 2, 0x40000, 102),
		ident("isp2", 1, 0x20000, 101), ident("other", 3, 0x80000, 103)})
	if len(changes) != 2 || changes[0].Name != "new" || changes[1].Name != "other" || changes[0].Old.Name != "" {
		t.Fatalf("changes %+v, want new and other as new names", changes)
	}

	// The remembered uplink holds the lowest of everything: a new one in
	// front of it still goes around it.
	prev = []Identity{ident("isp2", 0, 0x10000, 100)}
	c = uplinksConfig(t, []string{"first", "isp2"}, nil)
	got, _ = assign(t, c, prev)
	wantIdentities(t, got, []Identity{ident("first", 1, 0x20000, 101), ident("isp2", 0, 0x10000, 100)})
}

// A configured mark or table wins over a remembered one. Only the uplink
// whose remembered bit or table was taken moves, and the change says why;
// the unchanged third uplink stays.
func TestIdentitiesConfiguredWins(t *testing.T) {
	prev := []Identity{ident("isp1", 0, 0x10000, 100), ident("isp2", 1, 0x20000, 101), ident("vpn", 2, 0x40000, 102)}
	c := uplinksConfig(t, []string{"isp1", "isp2", "vpn"}, map[string]string{"isp2": "mark = 0x10000\ntable = 100"})
	got, changes := assign(t, c, prev)
	wantIdentities(t, got, []Identity{ident("isp1", 0, 0x20000, 101), ident("isp2", 1, 0x10000, 100), ident("vpn", 2, 0x40000, 102)})
	if len(changes) != 2 {
		t.Fatalf("changes %+v, want isp1 and isp2", changes)
	}
	byName := map[string]IdentityChange{}
	for _, ch := range changes {
		byName[ch.Name] = ch
	}
	if w := byName["isp1"].Why; !strings.Contains(w, "mark 0x10000 is configured for uplink isp2") ||
		!strings.Contains(w, "table 100 is configured for uplink isp2") {
		t.Fatalf("isp1's change says %q", w)
	}
	if w := byName["isp2"].Why; !strings.Contains(w, "mark 0x10000 is configured") || !strings.Contains(w, "table 100 is configured") {
		t.Fatalf("isp2's change says %q", w)
	}

	// A configured bit that only a removed name had: nobody moves.
	prev = []Identity{ident("old", 0, 0x10000, 100), ident("isp2", 1, 0x20000, 101), ident("vpn", 2, 0x40000, 102)}
	c = uplinksConfig(t, []string{"isp2", "vpn", "isp3"}, map[string]string{"isp3": "mark = 0x10000"})
	got, changes = assign(t, c, prev)
	wantIdentities(t, got, []Identity{ident("isp2", 1, 0x20000, 101), ident("vpn", 2, 0x40000, 102), ident("isp3", 0, 0x10000, 100)})
	if len(changes) != 1 || changes[0].Name != "isp3" {
		t.Fatalf("changes %+v, want only isp3, new", changes)
	}
}

// What is no longer valid (a restart with another mark_mask or table
// range), or a damaged memory (two names on one slot), is assigned anew
// and said so.
func TestIdentitiesInvalidMemory(t *testing.T) {
	prev := []Identity{ident("isp1", 0, 0x1, 300), ident("isp2", 0, 0x20000, 101), ident("vpn", 99, 0x40000, 102)}
	c := uplinksConfig(t, []string{"isp1", "isp2", "vpn"}, nil)
	got, changes := assign(t, c, prev)
	wantIdentities(t, got, []Identity{ident("isp1", 0, 0x10000, 100), ident("isp2", 1, 0x20000, 101), ident("vpn", 2, 0x40000, 102)})
	why := map[string]string{}
	for _, ch := range changes {
		why[ch.Name] = ch.Why
	}
	for name, want := range map[string][]string{
		"isp1": {"mark 0x1 is not an uplink bit of mark_mask 0xff0000", "table 300 is outside global.tables 100-199"},
		"isp2": {"slot 0 is remembered for uplink isp1"},
		"vpn":  {"slot 99 is out of range"},
	} {
		for _, w := range want {
			if !strings.Contains(why[name], w) {
				t.Errorf("%s: %q, want %q in it", name, why[name], w)
			}
		}
	}
}

// Sixteen uplinks, then every one replaced by a new name: there is always
// room, because the removed ones free theirs.
func TestIdentitiesFull(t *testing.T) {
	const global = "mark_mask = 0x0003ffff" // strict 0x20000, reply 0x10000, 16 uplink bits
	var names, others []string
	for i := 0; i < MaxUplinks; i++ {
		names = append(names, fmt.Sprintf("a%d", i))
		others = append(others, fmt.Sprintf("b%d", i))
	}
	prev := globalConfig(t, global, names, nil).Identities()
	got, changes := assign(t, globalConfig(t, global, others, nil), prev)
	if len(changes) != MaxUplinks {
		t.Fatalf("changes %+v", changes)
	}
	ids, marks, tables := map[int]bool{}, map[uint32]bool{}, map[int]bool{}
	for _, id := range got {
		if id.Mark&0xffff == 0 || marks[id.Mark] || ids[id.ID] || tables[id.Table] {
			t.Fatalf("bad or repeated identity in %+v", got)
		}
		ids[id.ID], marks[id.Mark], tables[id.Table] = true, true, true
	}
	// More than there is room for: an error, not a silent overlap (Parse
	// refuses such a configuration first).
	c := globalConfig(t, global, others, nil)
	c.Uplinks = append(c.Uplinks, Uplink{Name: "one-too-many"})
	if _, err := c.AssignIdentities(prev); err == nil || !strings.Contains(err.Error(), "no free slot") {
		t.Fatalf("17 uplinks: %v", err)
	}
}
