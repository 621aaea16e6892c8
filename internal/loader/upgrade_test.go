package loader_test

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/mhbpf/mhbpf/bpf"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/testutil"
)

func testFlow(i int) maps.Flow {
	return maps.Flow{
		Key: maps.FlowKey{Proto: 6, Src: netip.AddrPortFrom(netip.MustParseAddr("100.64.2.10"), uint16(10000+i)),
			Dst: netip.MustParseAddrPort("203.0.113.7:443")},
		Uplink: i % 2, Origin: maps.OriginBalanced, Mark: 0x10000 << (i % 2),
		FirstSeen: time.Duration(i + 1), LastSeen: time.Duration(1000 + i),
	}
}

func loadWith(t *testing.T, dir string, flowMapSize uint32) *loader.Datapath {
	t.Helper()
	d, err := loader.Load(loader.Options{NetnsCookie: testutil.NetnsCookie(t, ""), PinDir: dir, FlowMapSize: flowMapSize})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func upgradeOf(t *testing.T, d *loader.Datapath, name string) loader.MapUpgrade {
	t.Helper()
	for _, m := range d.Upgrade().Maps {
		if m.Map == name {
			return m
		}
	}
	t.Fatalf("no upgrade of map %s in %+v", name, d.Upgrade())
	return loader.MapUpgrade{}
}

func noTemporaryPins(t *testing.T, dir string) {
	t.Helper()
	if _, err := os.Stat(filepath.Join(dir, "upgrade")); !os.IsNotExist(err) {
		t.Fatalf("temporary pin directory left (%v)", err)
	}
}

// A new flow_map_size resizes the pinned flow and remote maps instead of
// refusing to load: every flow is carried over, batched; the pin is the
// new map; what the old programs record after the copy (written here to
// the old map) comes over with FinishUpgrade; the other maps are reused.
func TestUpgradeResizesPinnedMaps(t *testing.T) {
	testutil.RequireRoot(t)
	dir := testutil.PinDir(t, loader.Remove)
	d := loadWith(t, dir, 1024)
	const n = 300
	for i := 0; i < n; i++ {
		if err := d.Maps.PutFlow(testFlow(i)); err != nil {
			t.Fatal(err)
		}
	}
	d.Close()
	// What the old programs keep writing to: the old map, open.
	old, err := ebpf.LoadPinnedMap(filepath.Join(dir, "maps", "flows4"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()

	plan, err := loader.PlanUpgrade(loader.Options{PinDir: dir, FlowMapSize: 2048})
	if err != nil {
		t.Fatal(err)
	}
	if len(plan) != 3 || plan[0].Map != "flows4" || plan[0].Action != loader.ActionResize ||
		plan[1].Map != "flows6" || plan[1].Action != loader.ActionResize || plan[2].Map != "remotes" {
		t.Fatalf("plan %+v, want flows4, flows6 and remotes resized", plan)
	}
	if old.MaxEntries() != 1024 {
		t.Fatal("planning changed the pinned map")
	}

	d = loadWith(t, dir, 2048)
	defer d.Close()
	u := upgradeOf(t, d, "flows4")
	if u.Action != loader.ActionResize || u.Copied != n || u.Dropped != 0 || !u.Batched || u.Old.MaxEntries != 1024 || u.New.MaxEntries != 2048 {
		t.Fatalf("flows upgrade %+v, want %d copied in batches from 1024 to 2048 entries", u, n)
	}
	if len(d.Upgrade().Maps) != 3 {
		t.Fatalf("upgrades %+v: only flows4, flows6 and remotes are sized by flow_map_size", d.Upgrade().Maps)
	}
	if d.Maps.Flows4.MaxEntries() != 2048 {
		t.Fatalf("loaded flow map has %d entries", d.Maps.Flows4.MaxEntries())
	}
	pinned, err := ebpf.LoadPinnedMap(filepath.Join(dir, "maps", "flows4"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if pinned.MaxEntries() != 2048 {
		t.Fatalf("pinned flow map has %d entries", pinned.MaxEntries())
	}
	pinned.Close()
	noTemporaryPins(t, dir)
	for i := 0; i < n; i++ {
		want := testFlow(i)
		f, ok, err := d.Maps.LookupFlow(want.Key)
		if err != nil || !ok || f != want {
			t.Fatalf("flow %d after the resize: %+v ok=%v err=%v, want %+v", i, f, ok, err, want)
		}
	}

	late := testFlow(n)
	k, v := maps.EncodeFlow(late)
	if err := old.Put(k, v); err != nil {
		t.Fatal(err)
	}
	copied, err := d.FinishUpgrade()
	if err != nil || copied != 1 {
		t.Fatalf("FinishUpgrade: %d copied, %v; want the 1 late flow", copied, err)
	}
	if f, ok, _ := d.Maps.LookupFlow(late.Key); !ok || f != late {
		t.Fatalf("late flow: %+v ok=%v", f, ok)
	}
}

// A smaller flow map keeps the most recently seen flows.
func TestUpgradeShrinkKeepsRecentFlows(t *testing.T) {
	testutil.RequireRoot(t)
	dir := testutil.PinDir(t, loader.Remove)
	d := loadWith(t, dir, 4096)
	const n = 3000
	for i := 0; i < n; i++ {
		if err := d.Maps.PutFlow(testFlow(i)); err != nil {
			t.Fatal(err)
		}
	}
	d.Close()
	d = loadWith(t, dir, 1024)
	defer d.Close()
	u := upgradeOf(t, d, "flows4")
	t.Logf("%d flows into 1024 entries: %d copied, %d dropped", n, u.Copied, u.Dropped)
	if u.Copied+u.Dropped != n || u.Copied > 1024 || u.Copied < 512 {
		t.Fatalf("flows upgrade %+v: want at most 1024 of %d copied, the rest dropped", u, n)
	}
	for i := n - 256; i < n; i++ {
		if _, ok, _ := d.Maps.LookupFlow(testFlow(i).Key); !ok {
			t.Fatalf("flow %d, among the 256 most recent, was dropped (%+v)", i, u)
		}
	}
}

// The flows' layout of an imagined older mhbpf: a 24-byte value without
// origin, first-seen time and byte count.
type oldFlow struct {
	Mark     uint32
	Uplink   uint8
	Pad      [3]uint8
	LastSeen uint64
	Packets  uint64
}

// A pinned map of another layout goes through the converter registered
// for it: each flow keeps its uplink and mark, so no live connection
// moves. A map of another layout that no converter knows is rebuilt
// empty and says how many entries it lost. The loader then runs on the
// new layout.
func TestUpgradeConvertsOrRebuildsOtherLayouts(t *testing.T) {
	testutil.RequireRoot(t)
	dir := testutil.PinDir(t, loader.Remove)
	if err := os.MkdirAll(filepath.Join(dir, "maps"), 0o700); err != nil {
		t.Fatal(err)
	}
	keySize := uint32(unsafe.Sizeof(bpf.UplinkFlow4Key{}))
	oldLayout := maps.Layout{Type: ebpf.LRUHash, KeySize: keySize, ValueSize: uint32(unsafe.Sizeof(oldFlow{})), MaxEntries: 4096}
	oldFlows, err := ebpf.NewMap(&ebpf.MapSpec{Name: "flows4", Type: oldLayout.Type, KeySize: oldLayout.KeySize,
		ValueSize: oldLayout.ValueSize, MaxEntries: oldLayout.MaxEntries})
	if err != nil {
		t.Fatal(err)
	}
	defer oldFlows.Close()
	const n = 100
	for i := 0; i < n; i++ {
		f := testFlow(i)
		k, _ := maps.EncodeFlow(f)
		if err := oldFlows.Put(k, oldFlow{Mark: f.Mark, Uplink: uint8(f.Uplink), LastSeen: uint64(f.LastSeen), Packets: 1}); err != nil {
			t.Fatal(err)
		}
	}
	if err := oldFlows.Pin(filepath.Join(dir, "maps", "flows4")); err != nil {
		t.Fatal(err)
	}
	// sticky in a layout nobody converts: an 8-byte value.
	oldSticky, err := ebpf.NewMap(&ebpf.MapSpec{Name: "sticky", Type: ebpf.LRUHash,
		KeySize: uint32(unsafe.Sizeof(bpf.UplinkStickyKey{})), ValueSize: 8, MaxEntries: 1024})
	if err != nil {
		t.Fatal(err)
	}
	defer oldSticky.Close()
	for i := 0; i < 5; i++ {
		k := bpf.UplinkStickyKey{Policy: uint32(i)}
		if err := oldSticky.Put(&k, uint64(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := oldSticky.Pin(filepath.Join(dir, "maps", "sticky")); err != nil {
		t.Fatal(err)
	}

	plan, err := loader.PlanUpgrade(loader.Options{PinDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if len(plan) != 2 || fmt.Sprintf("%s %s %s %s", plan[0].Map, plan[0].Action, plan[1].Map, plan[1].Action) != "flows4 rebuild sticky rebuild" {
		t.Fatalf("plan before a converter is registered: %+v", plan)
	}

	newLayout := maps.Layout{Type: ebpf.LRUHash, KeySize: keySize, ValueSize: uint32(unsafe.Sizeof(bpf.UplinkFlow{}))}
	maps.RegisterConverter(maps.Converter{Map: "flows4", From: oldLayout, To: newLayout,
		Convert: func(key, value []byte) ([]byte, []byte, bool, error) {
			fk, err := maps.DecodeFlowKey(key)
			if err != nil {
				return nil, nil, false, err
			}
			var o oldFlow
			if _, err := binary.Decode(value, binary.NativeEndian, &o); err != nil {
				return nil, nil, false, err
			}
			k, v := maps.EncodeFlow(maps.Flow{Key: fk, Uplink: int(o.Uplink), Mark: o.Mark, Origin: maps.OriginBalanced,
				FirstSeen: time.Duration(o.LastSeen), LastSeen: time.Duration(o.LastSeen)})
			return k, v, true, nil
		}})

	d := loadWith(t, dir, 0)
	defer d.Close()
	if u := upgradeOf(t, d, "flows4"); u.Action != loader.ActionConvert || u.Copied != n || u.Dropped != 0 {
		t.Fatalf("flows upgrade %+v, want %d converted", u, n)
	}
	if u := upgradeOf(t, d, "sticky"); u.Action != loader.ActionRebuild || u.Copied != 0 || u.Dropped != 5 {
		t.Fatalf("sticky upgrade %+v, want rebuilt with 5 dropped", u)
	}
	for i := 0; i < n; i++ {
		want := testFlow(i)
		f, ok, err := d.Maps.LookupFlow(want.Key)
		if err != nil || !ok || f.Uplink != want.Uplink || f.Mark != want.Mark {
			t.Fatalf("flow %d after the conversion: %+v ok=%v err=%v, want uplink %d mark %#x", i, f, ok, err, want.Uplink, want.Mark)
		}
	}
	if d.Maps.Sticky.ValueSize() != uint32(unsafe.Sizeof(bpf.UplinkStickyEntry{})) {
		t.Fatalf("sticky map still has %d-byte values", d.Maps.Sticky.ValueSize())
	}
	noTemporaryPins(t, dir)
	if _, err := d.FinishUpgrade(); err != nil {
		t.Fatal(err)
	}
}

// A crash in the middle of an upgrade leaves a temporary pin and the old
// pin in place: the next load removes the half-done copy, says so, and
// upgrades again.
func TestUpgradeRecoversFromACrash(t *testing.T) {
	testutil.RequireRoot(t)
	dir := testutil.PinDir(t, loader.Remove)
	d := loadWith(t, dir, 1024)
	for i := 0; i < 10; i++ {
		if err := d.Maps.PutFlow(testFlow(i)); err != nil {
			t.Fatal(err)
		}
	}
	d.Close()
	// The half-made new map of a crashed upgrade.
	if err := os.MkdirAll(filepath.Join(dir, "upgrade"), 0o700); err != nil {
		t.Fatal(err)
	}
	half, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.LRUHash, KeySize: uint32(unsafe.Sizeof(bpf.UplinkFlow4Key{})),
		ValueSize: uint32(unsafe.Sizeof(bpf.UplinkFlow{})), MaxEntries: 2048})
	if err != nil {
		t.Fatal(err)
	}
	if err := half.Pin(filepath.Join(dir, "upgrade", "flows4")); err != nil {
		t.Fatal(err)
	}
	half.Close()

	d = loadWith(t, dir, 2048)
	defer d.Close()
	if r := d.Upgrade().Recovered; len(r) != 1 || r[0] != "flows4" {
		t.Fatalf("recovered %v, want the temporary pin of flows", r)
	}
	if u := upgradeOf(t, d, "flows4"); u.Copied != 10 {
		t.Fatalf("flows upgrade %+v, want 10 copied", u)
	}
	noTemporaryPins(t, dir)
}

// A per-CPU array of another size (counters, were MAX_UPLINKS to grow)
// keeps every CPU's value of every slot it had.
func TestUpgradeResizesPerCPUArray(t *testing.T) {
	testutil.RequireRoot(t)
	dir := testutil.PinDir(t, loader.Remove)
	if err := os.MkdirAll(filepath.Join(dir, "maps"), 0o700); err != nil {
		t.Fatal(err)
	}
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	old, err := ebpf.NewMap(&ebpf.MapSpec{Name: "counters", Type: ebpf.PerCPUArray, KeySize: 4,
		ValueSize: uint32(unsafe.Sizeof(bpf.UplinkUplinkCounters{})), MaxEntries: 8})
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	for id := uint32(0); id < 8; id++ {
		per := make([]bpf.UplinkUplinkCounters, ncpu)
		for c := range per {
			per[c].RxPackets = uint64(100*id) + uint64(c)
		}
		if err := old.Put(id, per); err != nil {
			t.Fatal(err)
		}
	}
	if err := old.Pin(filepath.Join(dir, "maps", "counters")); err != nil {
		t.Fatal(err)
	}
	d := loadWith(t, dir, 0)
	defer d.Close()
	if u := upgradeOf(t, d, "counters"); u.Action != loader.ActionResize || u.Copied != 8 || u.New.MaxEntries != uint32(maps.MaxUplinks) {
		t.Fatalf("counters upgrade %+v, want 8 slots copied into %d", u, maps.MaxUplinks)
	}
	for id := 0; id < 8; id++ {
		c, err := d.Maps.UplinkCounters(id)
		want := uint64(100*id*ncpu) + uint64(ncpu*(ncpu-1)/2)
		if err != nil || c.RxPackets != want {
			t.Fatalf("slot %d: rx packets %d (%v), want %d summed over %d CPUs", id, c.RxPackets, err, want, ncpu)
		}
	}
}

// 'mhbpf down' after a crash in the middle of an upgrade leaves nothing:
// the temporary pins go with the pin directory.
func TestRemoveTakesTemporaryPins(t *testing.T) {
	testutil.RequireRoot(t)
	dir := testutil.PinDir(t, loader.Remove)
	loadWith(t, dir, 1024).Close()
	if err := os.MkdirAll(filepath.Join(dir, "upgrade"), 0o700); err != nil {
		t.Fatal(err)
	}
	half, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 4, ValueSize: 4, MaxEntries: 16})
	if err != nil {
		t.Fatal(err)
	}
	defer half.Close()
	if err := half.Pin(filepath.Join(dir, "upgrade", "flows4")); err != nil {
		t.Fatal(err)
	}
	if err := loader.Remove(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("pin directory left after Remove (%v)", err)
	}
}

// The cost of an upgrade that resizes a flow map holding 200,000 flows
// (the daemon's start waits for it):
//
//	go test -run '^$' -bench BenchmarkUpgradeResize -benchtime 3x ./internal/loader/
func BenchmarkUpgradeResize(b *testing.B) {
	testutil.RequireRoot(b)
	const n = 200000
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		dir := testutil.PinDir(b, loader.Remove)
		d, err := loader.Load(loader.Options{NetnsCookie: testutil.NetnsCookie(b, ""), PinDir: dir, FlowMapSize: 262144})
		if err != nil {
			b.Fatal(err)
		}
		for j := 0; j < n; j++ {
			f := testFlow(j)
			f.Key.Src = netip.AddrPortFrom(netip.AddrFrom4([4]byte{100, 64, byte(2 + j>>16), byte(j >> 8)}), uint16(j))
			if err := d.Maps.PutFlow(f); err != nil {
				b.Fatal(err)
			}
		}
		d.Close()
		b.StartTimer()
		d, err = loader.Load(loader.Options{NetnsCookie: testutil.NetnsCookie(b, ""), PinDir: dir, FlowMapSize: 524288})
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		for _, u := range d.Upgrade().Maps {
			if u.Map == "flows4" && u.Copied != n {
				b.Fatalf("%d of %d flows copied", u.Copied, n)
			}
		}
		d.Close()
	}
}
