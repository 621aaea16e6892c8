package loader_test

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/mhbpf/mhbpf/bpf"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/testutil"
)

// The maps of mhbpf up to 5486cce, built here byte by byte from that
// version's bpf/include/maps.h (CI's checkout has no history to build the
// old binary from).

// oldFlowKeyBytes: struct flow_key {u8 family (4 or 6); u8 proto; u16 pad;
// be16 sport; be16 dport; u32 saddr[4]; u32 daddr[4]}, IPv4 in [0].
func oldFlowKeyBytes(k maps.FlowKey) []byte {
	b := make([]byte, 40)
	b[0] = 6
	if k.Src.Addr().Is4() {
		b[0] = 4
	}
	b[1] = k.Proto
	binary.BigEndian.PutUint16(b[4:], k.Src.Port())
	binary.BigEndian.PutUint16(b[6:], k.Dst.Port())
	s, d := k.Src.Addr().AsSlice(), k.Dst.Addr().AsSlice()
	copy(b[8:], s)
	copy(b[24:], d)
	return b
}

// oldFlowBytes: struct flow {u32 mark; u8 uplink; u8 origin; u16 pad;
// u64 first_seen; u64 last_seen; u64 packets; u64 bytes}.
func oldFlowBytes(f maps.Flow) []byte {
	b := make([]byte, 40)
	binary.NativeEndian.PutUint32(b[0:], f.Mark)
	b[4] = uint8(f.Uplink)
	b[5] = uint8(f.Origin)
	binary.NativeEndian.PutUint64(b[8:], uint64(f.FirstSeen))
	binary.NativeEndian.PutUint64(b[16:], uint64(f.LastSeen))
	binary.NativeEndian.PutUint64(b[24:], 123) // packets
	binary.NativeEndian.PutUint64(b[32:], 45678)
	return b
}

func pinOld(t *testing.T, dir string, spec *ebpf.MapSpec) *ebpf.Map {
	t.Helper()
	m, err := ebpf.NewMap(spec)
	if err != nil {
		t.Fatalf("old map %s: %v", spec.Name, err)
	}
	t.Cleanup(func() { m.Close() })
	if err := m.Pin(filepath.Join(dir, "maps", spec.Name)); err != nil {
		t.Fatal(err)
	}
	return m
}

func oldFlowMap(t *testing.T, dir, name string, size uint32, flows []maps.Flow) *ebpf.Map {
	t.Helper()
	m := pinOld(t, dir, &ebpf.MapSpec{Name: name, Type: ebpf.LRUHash, KeySize: 40, ValueSize: 40, MaxEntries: size})
	for _, f := range flows {
		if err := m.Put(oldFlowKeyBytes(f.Key), oldFlowBytes(f)); err != nil {
			t.Fatal(err)
		}
	}
	return m
}

func migrationFlow(src, dst string, uplink int, origin maps.Origin, i int) maps.Flow {
	return maps.Flow{Key: maps.FlowKey{Proto: 6, Src: netip.MustParseAddrPort(src), Dst: netip.MustParseAddrPort(dst)},
		Uplink: uplink, Origin: origin, Mark: 0x10000 << uplink,
		FirstSeen: time.Duration(1_000_000_000 + i), LastSeen: time.Duration(5_000_000_000 + i)}
}

// lookupIn finds f's key in the named current map and decodes the record.
func lookupIn(t *testing.T, m *ebpf.Map, k maps.FlowKey) (bpf.UplinkFlow, bool) {
	t.Helper()
	key, _ := maps.EncodeFlow(maps.Flow{Key: k})
	var v bpf.UplinkFlow
	if err := m.Lookup(key, &v); err != nil {
		return v, false
	}
	return v, true
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// An install of the version before the per-family flow maps: flows and
// inbound (one 40-byte key for both families, per-flow counters), ifaces
// holding every interface, the policy in LPM tries. PlanUpgrade says what
// Load will do; Load puts every flow into the map of its kind and family
// with its uplink, mark, origin and times; the interfaces are in
// iface_slots before any new program runs; FinishUpgrade takes what the
// old programs recorded meanwhile and removes the old pins.
func TestUpgradeFromSingleFlowMaps(t *testing.T) {
	testutil.RequireRoot(t)
	dir := testutil.PinDir(t, loader.Remove)
	if err := os.MkdirAll(filepath.Join(dir, "maps"), 0o700); err != nil {
		t.Fatal(err)
	}
	lan := []maps.Flow{
		migrationFlow("100.64.2.10:40000", "203.0.113.7:443", 1, maps.OriginBalanced, 1),
		migrationFlow("100.64.2.11:40001", "198.51.100.9:22", 0, maps.OriginPolicy, 2),
		migrationFlow("[2001:db8:2::10]:40002", "[2001:db8:ff::7]:443", 1, maps.OriginBalanced, 3),
		migrationFlow("[2001:db8:2::11]:40003", "[2001:db8:ff::8]:80", 2, maps.OriginPolicy, 4),
	}
	inbound := []maps.Flow{
		migrationFlow("203.0.113.50:51000", "100.64.0.2:8080", 1, maps.OriginBalanced, 5),
		migrationFlow("[2001:db8:ff::50]:51001", "[2001:db8:1::2]:8080", 2, maps.OriginBalanced, 6),
	}
	oldFlows := oldFlowMap(t, dir, "flows", 4096, lan)
	oldFlowMap(t, dir, "inbound", 1024, inbound)
	// A key of a family the old programs never wrote (AF_INET's 2): dropped, counted.
	bogus := oldFlowKeyBytes(lan[0].Key)
	bogus[0] = 2
	if err := oldFlows.Put(bogus, oldFlowBytes(lan[0])); err != nil {
		t.Fatal(err)
	}
	ifaces := pinOld(t, dir, &ebpf.MapSpec{Name: "ifaces", Type: ebpf.Hash, KeySize: 4, ValueSize: 4, MaxEntries: 256})
	if err := ifaces.Put(uint32(7), bpf.UplinkIface{Role: uint8(maps.RoleUplink), Uplink: 1, L3Off: 14}); err != nil {
		t.Fatal(err)
	}
	if err := ifaces.Put(uint32(5000), bpf.UplinkIface{Role: uint8(maps.RoleLAN), L3Off: 14}); err != nil {
		t.Fatal(err)
	}
	// policy_dst4: an LPM trie of {prefixlen, gen, addr} -> u64 then.
	dst4 := pinOld(t, dir, &ebpf.MapSpec{Name: "policy_dst4", Type: ebpf.LPMTrie, KeySize: 12, ValueSize: 8,
		MaxEntries: 16384, Flags: 1 /* BPF_F_NO_PREALLOC */})
	if err := dst4.Put([]byte{56, 0, 0, 0, 0, 0, 0, 0, 198, 51, 100, 0}, uint64(1)); err != nil {
		t.Fatal(err)
	}

	plan, err := loader.PlanUpgrade(loader.Options{PinDir: dir, FlowMapSize: 2048})
	if err != nil {
		t.Fatal(err)
	}
	var said []string
	for _, u := range plan {
		said = append(said, fmt.Sprintf("%s %s %s", u.Map, u.Action, strings.Join(u.Into, "+")))
	}
	want := "flows split flows4+flows6|inbound split inbound4+inbound6|ifaces split iface_slots|policy_dst4 rebuild policy_ranges_dst4"
	if got := strings.Join(said, "|"); got != want {
		t.Fatalf("plan:\n%s\nwant\n%s", got, want)
	}

	d := loadWith(t, dir, 2048)
	defer d.Close()
	if u := upgradeOf(t, d, "flows"); u.Action != loader.ActionSplit || u.Copied != len(lan) || u.Dropped != 1 {
		t.Fatalf("flows: %+v, want %d moved and the bogus one dropped", u, len(lan))
	}
	if u := upgradeOf(t, d, "inbound"); u.Action != loader.ActionSplit || u.Copied != len(inbound) || u.Dropped != 0 {
		t.Fatalf("inbound: %+v, want %d moved", u, len(inbound))
	}
	if u := upgradeOf(t, d, "ifaces"); u.Copied != 1 {
		t.Fatalf("ifaces: %+v, want the one below the slots moved", u)
	}
	if u := upgradeOf(t, d, "policy_dst4"); u.Action != loader.ActionRebuild || u.Dropped != 1 {
		t.Fatalf("policy_dst4: %+v, want rebuilt with 1 dropped", u)
	}
	if d.Maps.PolicyRangesDst4.Type() != ebpf.ArrayOfMaps {
		t.Fatalf("policy_ranges_dst4 is a %s", d.Maps.PolicyRangesDst4.Type())
	}
	check := func(kind string, flows []maps.Flow, v4, v6 *ebpf.Map) {
		t.Helper()
		for _, want := range flows {
			m := v6
			if want.Key.Src.Addr().Is4() {
				m = v4
			}
			got, ok := lookupIn(t, m, want.Key)
			if !ok {
				t.Fatalf("%s flow %s not in %s", kind, want.Key, m)
			}
			if int(got.Uplink) != want.Uplink || got.Mark != want.Mark || maps.Origin(got.Origin) != want.Origin ||
				got.FirstSeen != uint64(want.FirstSeen) || got.LastSeen != uint64(want.LastSeen) || got.SeenJiffies != 0 {
				t.Fatalf("%s flow %s: %+v, want %+v", kind, want.Key, got, want)
			}
		}
	}
	check("LAN", lan, d.Maps.Flows4, d.Maps.Flows6)
	check("inbound", inbound, d.Maps.Inbound4, d.Maps.Inbound6)
	if n4, n6 := count4(t, d.Maps.Flows4), count4(t, d.Maps.Flows6); n4 != 2 || n6 != 2 {
		t.Fatalf("flows4 has %d, flows6 %d, want 2 each", n4, n6)
	}
	var slot bpf.UplinkIface
	if err := d.Maps.IfaceSlots.Lookup(uint32(7), &slot); err != nil || slot.Role != uint8(maps.RoleUplink) || slot.Uplink != 1 || slot.L3Off != 14 {
		t.Fatalf("iface_slots[7] = %+v (%v), want the uplink entry", slot, err)
	}
	noTemporaryPins(t, dir)

	// The old programs still run until the attachments are swapped: what
	// they record meanwhile comes over with FinishUpgrade.
	late := migrationFlow("100.64.2.12:40009", "203.0.113.8:443", 2, maps.OriginBalanced, 9)
	if err := oldFlows.Put(oldFlowKeyBytes(late.Key), oldFlowBytes(late)); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"flows", "inbound"} {
		if !exists(filepath.Join(dir, "maps", name)) {
			t.Fatalf("pin of %s gone before FinishUpgrade: a crash now would lose the late flows", name)
		}
	}
	n, err := d.FinishUpgrade()
	if err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Fatalf("FinishUpgrade copied %d, want the late flow", n)
	}
	check("late", []maps.Flow{late}, d.Maps.Flows4, d.Maps.Flows6)
	for _, name := range []string{"flows", "inbound"} {
		if exists(filepath.Join(dir, "maps", name)) {
			t.Fatalf("pin of %s left after the upgrade", name)
		}
	}
	var v bpf.UplinkIface
	if err := ifaces.Lookup(uint32(7), &v); err == nil {
		t.Fatalf("ifaces still has ifindex 7 (%+v): it has a slot now", v)
	}
	if err := ifaces.Lookup(uint32(5000), &v); err != nil {
		t.Fatalf("ifaces lost ifindex 5000: %v", err)
	}
	plan, err = loader.PlanUpgrade(loader.Options{PinDir: dir, FlowMapSize: 2048})
	if err != nil || len(plan) != 0 {
		t.Fatalf("plan after the upgrade: %+v, %v; want nothing", plan, err)
	}
}

func count4(t *testing.T, m *ebpf.Map) int {
	t.Helper()
	n := 0
	var k, v []byte
	it := m.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

// A crash after Load made the new maps but before FinishUpgrade removed
// the old pin: the next Load moves the flows again, and an entry the new
// programs made meanwhile (here: the same flow on another uplink) wins.
func TestUpgradeFromSingleFlowMapsRecoversFromACrash(t *testing.T) {
	testutil.RequireRoot(t)
	dir := testutil.PinDir(t, loader.Remove)
	if err := os.MkdirAll(filepath.Join(dir, "maps"), 0o700); err != nil {
		t.Fatal(err)
	}
	a := migrationFlow("100.64.2.10:40000", "203.0.113.7:443", 1, maps.OriginBalanced, 1)
	b := migrationFlow("[2001:db8:2::10]:40002", "[2001:db8:ff::7]:443", 1, maps.OriginBalanced, 3)
	oldFlowMap(t, dir, "flows", 4096, []maps.Flow{a, b})
	d := loadWith(t, dir, 0)
	newer := a
	newer.Uplink, newer.Mark = 2, 0x40000
	if err := d.Maps.PutFlow(newer); err != nil {
		t.Fatal(err)
	}
	d.Close() // the crash: no FinishUpgrade
	if !exists(filepath.Join(dir, "maps", "flows")) {
		t.Fatal("the old pin is gone without FinishUpgrade")
	}
	d = loadWith(t, dir, 0)
	defer d.Close()
	if u := upgradeOf(t, d, "flows"); u.Copied != 2 || u.Dropped != 0 {
		t.Fatalf("second move %+v: want both flows kept (in the new maps already)", u)
	}
	got, ok := lookupIn(t, d.Maps.Flows4, a.Key)
	if !ok || got.Uplink != 2 {
		t.Fatalf("flow %s after the recovery: %+v ok=%v, want the new programs' uplink 2", a.Key, got, ok)
	}
	if got, ok := lookupIn(t, d.Maps.Flows6, b.Key); !ok || got.Uplink != 1 {
		t.Fatalf("flow %s after the recovery: %+v ok=%v", b.Key, got, ok)
	}
	if _, err := d.FinishUpgrade(); err != nil {
		t.Fatal(err)
	}
	if exists(filepath.Join(dir, "maps", "flows")) {
		t.Fatal("pin of flows left after the upgrade")
	}
}

// Each split is looked at on its own: an install with no old flow maps
// but interfaces below the slots in ifaces (a crash after the flows were
// moved) still has those moved, and check says so.
func TestUpgradeMovesIfacesWithoutOldFlowMaps(t *testing.T) {
	testutil.RequireRoot(t)
	dir := testutil.PinDir(t, loader.Remove)
	if err := os.MkdirAll(filepath.Join(dir, "maps"), 0o700); err != nil {
		t.Fatal(err)
	}
	ifaces := pinOld(t, dir, &ebpf.MapSpec{Name: "ifaces", Type: ebpf.Hash, KeySize: 4, ValueSize: 4, MaxEntries: 256})
	if err := ifaces.Put(uint32(9), bpf.UplinkIface{Role: uint8(maps.RoleLAN), L3Off: 14}); err != nil {
		t.Fatal(err)
	}
	plan, err := loader.PlanUpgrade(loader.Options{PinDir: dir})
	if err != nil || len(plan) != 1 || plan[0].Map != "ifaces" || plan[0].Action != loader.ActionSplit {
		t.Fatalf("plan %+v (%v), want ifaces split", plan, err)
	}
	d := loadWith(t, dir, 0)
	defer d.Close()
	var slot bpf.UplinkIface
	if err := d.Maps.IfaceSlots.Lookup(uint32(9), &slot); err != nil || slot.Role != uint8(maps.RoleLAN) {
		t.Fatalf("iface_slots[9] = %+v (%v)", slot, err)
	}
	if _, err := d.FinishUpgrade(); err != nil {
		t.Fatal(err)
	}
	if err := ifaces.Lookup(uint32(9), &slot); err == nil {
		t.Fatal("ifaces still has ifindex 9 after the upgrade")
	}
}

// An install of the version before the range tables (up to 3b49b68): the
// policy in LPM tries, policy_dst4 and so on, read by the generation in
// policy_gen. The generation moves to policy_generation, the tries stay
// behind, so that the old programs, until the new ones take their place,
// keep their generation and tries while the new policy is installed
// (which switches policy_generation only); a restart before FinishUpgrade
// does not take the generation back; FinishUpgrade removes the old pins.
func TestUpgradeFromPolicyTries(t *testing.T) {
	testutil.RequireRoot(t)
	dir := testutil.PinDir(t, loader.Remove)
	if err := os.MkdirAll(filepath.Join(dir, "maps"), 0o700); err != nil {
		t.Fatal(err)
	}
	const cur = 1 // the generation the old programs read
	oldGen := pinOld(t, dir, &ebpf.MapSpec{Name: "policy_gen", Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err := oldGen.Put(uint32(0), uint32(cur)); err != nil {
		t.Fatal(err)
	}
	trie := &ebpf.MapSpec{Type: ebpf.LPMTrie, KeySize: 8, ValueSize: 8, MaxEntries: 1, Flags: 1 /* BPF_F_NO_PREALLOC */}
	var oldTries []*ebpf.Map
	for _, name := range []string{"policy_dst4", "policy_src4", "policy_dst6", "policy_src6"} {
		inner := trie.Copy()
		if strings.HasSuffix(name, "6") {
			inner.KeySize = 20
		}
		gens := pinOld(t, dir, &ebpf.MapSpec{Name: name, Type: ebpf.ArrayOfMaps, KeySize: 4, ValueSize: 4, MaxEntries: 2, InnerMap: inner})
		m, err := ebpf.NewMap(inner)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		if err := gens.Put(uint32(cur), m); err != nil {
			t.Fatal(err)
		}
		oldTries = append(oldTries, gens)
	}

	plan, err := loader.PlanUpgrade(loader.Options{PinDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	var said []string
	for _, u := range plan {
		said = append(said, fmt.Sprintf("%s %s %s", u.Map, u.Action, strings.Join(u.Into, "+")))
	}
	want := "policy_gen split policy_generation|policy_dst4 split policy_ranges_dst4|policy_src4 split policy_ranges_src4|" +
		"policy_dst6 split policy_ranges_dst6|policy_src6 split policy_ranges_src6"
	if got := strings.Join(said, "|"); got != want {
		t.Fatalf("plan:\n%s\nwant\n%s", got, want)
	}

	d := loadWith(t, dir, 0)
	defer func() { d.Close() }() // the last one
	var g uint32
	// Bit 1: written (never all zero, which a second run of an interrupted
	// upgrade would take for not written yet).
	if err := d.Maps.PolicyGeneration.Lookup(uint32(0), &g); err != nil || g != cur|2 {
		t.Fatalf("policy_generation %#x (%v), want the old programs' %d carried over, with bit 1", g, err, cur)
	}
	// The daemon installs its policy before the swap: into the other
	// generation, switching policy_generation alone.
	if err := d.Maps.ReplacePolicy(maps.Policy{Rules: []maps.Rule{{Dst: []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")},
		Action: maps.Action{Uplinks: []maps.Choice{{Uplink: 1, Weight: 1}}}}}}); err != nil {
		t.Fatal(err)
	}
	if err := d.Maps.PolicyGeneration.Lookup(uint32(0), &g); err != nil || g != (1-cur)|2 {
		t.Fatalf("policy_generation %#x after the install, want %d with bit 1", g, 1-cur)
	}
	if err := oldGen.Lookup(uint32(0), &g); err != nil || g != cur {
		t.Fatalf("the old programs' policy_gen is %d now (%v), want still %d", g, err, cur)
	}
	for _, gens := range oldTries {
		var id uint32
		if err := gens.Lookup(uint32(cur), &id); err != nil || id == 0 {
			t.Fatalf("an old trie of generation %d is gone before the swap (%v)", cur, err)
		}
	}
	// A crash before FinishUpgrade: the next start finds the old pins
	// again, and the generation the new programs read (0 now, with bit 1)
	// must not go back to the old one's.
	d.Close()
	d = loadWith(t, dir, 0)
	if err := d.Maps.PolicyGeneration.Lookup(uint32(0), &g); err != nil || g != (1-cur)|2 {
		t.Fatalf("policy_generation %#x after a restart midway, want %d with bit 1 as installed", g, 1-cur)
	}
	if _, err := d.FinishUpgrade(); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"policy_gen", "policy_dst4", "policy_src4", "policy_dst6", "policy_src6"} {
		if exists(filepath.Join(dir, "maps", name)) {
			t.Fatalf("the pin of %s outlived FinishUpgrade", name)
		}
	}
}
