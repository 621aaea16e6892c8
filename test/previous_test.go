package test

import (
	"encoding/binary"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/mhbpf/mhbpf/bpf"
	"github.com/mhbpf/mhbpf/internal/daemontest"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/topology"
)

// Issue 8, upgrade from the version before the per-family flow maps
// (5486cce): its flows are in `flows` (and `inbound`), one 40-byte key for
// both families, and its interfaces all in `ifaces`. A new daemon started
// on that install moves every flow into flows4/flows6 before its programs
// run: connections held open keep their uplink and their records (first
// seen, uplink, mark, origin); the old pins are gone once the programs are
// swapped; 'mhbpf check' said so first.
//
// The real previous binary (MHBPF_OLD_BIN, built from 5486cce) makes the
// old install; without it this test skips, loudly (CI's checkout has no
// history to build it from). TestDaemonUpgradeFromPreviousLayout below
// runs everywhere, on an install rewritten into the old layout.
func TestDaemonUpgradeFromPreviousVersion(t *testing.T) {
	old := os.Getenv("MHBPF_OLD_BIN")
	if old == "" {
		t.Skip("MHBPF_OLD_BIN is not set: no binary of the previous version (git worktree add /tmp/old 5486cce && cd /tmp/old && go build -o /tmp/mhbpf-old ./cmd/mhbpf) to upgrade from")
	}
	upgradeFromPrevious(t, func(e *daemonEnv) {
		e.bin = old
		e.start()
	}, func(e *daemonEnv) { e.stop() })
}

// The same upgrade without the old binary: the current daemon runs, is
// killed, and its pinned maps are rewritten into the previous version's
// names and layouts (what 5486cce pinned) before the new daemon starts.
func TestDaemonUpgradeFromPreviousLayout(t *testing.T) {
	upgradeFromPrevious(t, func(e *daemonEnv) { e.start() }, func(e *daemonEnv) {
		e.kill9()
		e.rewriteToPreviousLayout(t)
	})
}

func upgradeFromPrevious(t *testing.T, startOld, stopOld func(*daemonEnv)) {
	e := newDaemonEnv(t, "", perFlowPolicies)
	newBin := e.bin
	serveGreetEcho(t, e, 8031)
	serveUDP(t, e, 8032)
	w1, w2, ok := flipWeights(stickyHash(0, modeDestination, netip.Addr{}, topology.Internet))
	if !ok {
		t.Fatal("no weights to flip to")
	}
	startOld(e)
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	var conns []*lanConn
	for _, c := range []struct {
		proto uint8
		port  uint16
		first uint16
	}{{protoTCP, 8031, 41000}, {protoUDP, 8032, 42000}} {
		for _, src := range flippingPorts(c.proto, c.port, w1, w2, c.first, 4) {
			conns = append(conns, lanConnect(t, e, c.proto, src, c.port))
		}
	}
	uplinks := map[string]bool{}
	for _, h := range conns {
		uplinks[h.uplink] = true
	}
	if len(uplinks) != 2 {
		t.Fatalf("the connections use %v: the test wants both uplinks", uplinks)
	}
	stopOld(e)
	before := previousFlowsOf(t, e, conns)
	for _, h := range conns {
		h.stillThere(t, "with the old daemon stopped")
	}
	e.bin = newBin
	e.setWeights(w1, w2) // a flow whose record was lost would be given the other uplink
	out, err := e.mhbpf("check", e.cfgPath)
	for _, want := range []string{"pinned map flows will be migrated (split)", "flows4, flows6",
		"pinned map inbound will be migrated (split)"} {
		if err != nil || !strings.Contains(out, want) {
			t.Fatalf("mhbpf check on the old install does not say %q (%v):\n%s", want, err, out)
		}
	}
	e.start()
	t.Logf("the new daemon:\n%s", daemontest.Lines(e.log.String(), "pinned map"))
	for _, want := range []string{"map=flows action=split", "map=inbound action=split", "map=uplinks action=convert"} {
		if !strings.Contains(e.log.String(), want) {
			t.Fatalf("the log does not say %q:\n%s", want, e.log.String())
		}
	}
	// FinishUpgrade follows the first pass, which swapped the programs.
	e.waitFor("the old pins removed", 3*time.Second, func() bool {
		for _, name := range []string{"flows", "inbound"} {
			if _, err := os.Stat(filepath.Join(e.pinDir, "maps", name)); !os.IsNotExist(err) {
				return false
			}
		}
		return true
	})
	for _, h := range conns {
		h.stillThere(t, "after the upgrade")
	}
	after := flowsOf(t, e, conns)
	for _, h := range conns {
		b, a := before[h.key], after[h.key]
		if a.FirstSeen != b.FirstSeen || a.Uplink != b.Uplink || a.Mark != b.Mark || a.Origin != b.Origin {
			t.Fatalf("%v: the record was not carried over:\nbefore %+v\nafter  %+v", h, b, a)
		}
	}
	// The new programs refresh the carried records (at most once a
	// second: seen_jiffies 0 lets the first packet do it).
	time.Sleep(maps.LastSeenStep + 100*time.Millisecond)
	for _, h := range conns {
		h.stillThere(t, "a second after the upgrade")
	}
	refreshed := flowsOf(t, e, conns)
	for _, h := range conns {
		if b, a := before[h.key], refreshed[h.key]; a.LastSeen <= b.LastSeen || a.Uplink != b.Uplink {
			t.Fatalf("%v: the new programs do not refresh the carried record:\nbefore %+v\nafter  %+v", h, b, a)
		}
	}
	fresh := lanConnect(t, e, protoTCP, 0, 8031)
	flowsOf(t, e, []*lanConn{fresh})
	e.noTemporaryPins(t)
	if out, err := e.mhbpf("check", e.cfgPath); err != nil || strings.Contains(out, "will be migrated") {
		t.Fatalf("mhbpf check after the upgrade (%v):\n%s", err, out)
	}
	e.stop()
	if out, err := e.mhbpf("down"); err != nil {
		t.Fatalf("mhbpf down: %v\n%s", err, out)
	}
	if _, err := os.Stat(e.pinDir); !os.IsNotExist(err) {
		t.Fatalf("after mhbpf down the pin directory is still there (%v)", err)
	}
}

// The previous version's flow key (bpf/include/maps.h of 5486cce):
// {u8 family (4 or 6); u8 proto; u16 pad; be16 sport; be16 dport;
// u32 saddr[4]; u32 daddr[4]}, IPv4 in [0]; its record {u32 mark;
// u8 uplink; u8 origin; u16 pad; u64 first_seen; u64 last_seen;
// u64 packets; u64 bytes}.
func previousFlowKey(k maps.FlowKey) []byte {
	b := make([]byte, 40)
	b[0] = 6
	if k.Src.Addr().Is4() {
		b[0] = 4
	}
	b[1] = k.Proto
	binary.BigEndian.PutUint16(b[4:], k.Src.Port())
	binary.BigEndian.PutUint16(b[6:], k.Dst.Port())
	copy(b[8:], k.Src.Addr().AsSlice())
	copy(b[24:], k.Dst.Addr().AsSlice())
	return b
}

func previousFlow(f maps.Flow) []byte {
	b := make([]byte, 40)
	binary.NativeEndian.PutUint32(b[0:], f.Mark)
	b[4], b[5] = uint8(f.Uplink), uint8(f.Origin)
	binary.NativeEndian.PutUint64(b[8:], uint64(f.FirstSeen))
	binary.NativeEndian.PutUint64(b[16:], uint64(f.LastSeen))
	return b
}

// previousFlowsOf reads the connections' records from the old `flows` pin.
func previousFlowsOf(t *testing.T, e *daemonEnv, conns []*lanConn) map[maps.FlowKey]maps.Flow {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(e.pinDir, "maps", "flows"), nil)
	if err != nil {
		t.Fatalf("the old install has no flows pin: %v", err)
	}
	defer m.Close()
	if m.KeySize() != 40 || m.ValueSize() != 40 {
		t.Fatalf("the old flows pin has key %d, value %d bytes; the previous version's are 40 and 40", m.KeySize(), m.ValueSize())
	}
	out := map[maps.FlowKey]maps.Flow{}
	for _, h := range conns {
		var v []byte
		if err := m.Lookup(previousFlowKey(h.key), &v); err != nil {
			t.Fatalf("%v: no record in the old flows map: %v", h, err)
		}
		out[h.key] = maps.Flow{Key: h.key, Mark: binary.NativeEndian.Uint32(v[0:]), Uplink: int(v[4]), Origin: maps.Origin(v[5]),
			FirstSeen: time.Duration(binary.NativeEndian.Uint64(v[8:])), LastSeen: time.Duration(binary.NativeEndian.Uint64(v[16:]))}
	}
	return out
}

// rewriteToPreviousLayout turns the pins of a stopped daemon into what the
// previous version pinned: flows4+flows6 into `flows`, inbound4+inbound6
// into `inbound` (old key and record), iface_slots back into `ifaces`.
func (e *daemonEnv) rewriteToPreviousLayout(t *testing.T) {
	t.Helper()
	dir := filepath.Join(e.pinDir, "maps")
	for _, kind := range []struct {
		old    string
		size   uint32
		v4, v6 string
	}{{"flows", 262144, "flows4", "flows6"}, {"inbound", 65536, "inbound4", "inbound6"}} {
		om, err := ebpf.NewMap(&ebpf.MapSpec{Name: kind.old, Type: ebpf.LRUHash, KeySize: 40, ValueSize: 40, MaxEntries: kind.size})
		if err != nil {
			t.Fatal(err)
		}
		for _, name := range []string{kind.v4, kind.v6} {
			m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
			if err != nil {
				t.Fatal(err)
			}
			var k []byte
			var v bpf.UplinkFlow
			it := m.Iterate()
			for it.Next(&k, &v) {
				fk, err := maps.DecodeFlowKey(k)
				if err != nil {
					t.Fatal(err)
				}
				f := maps.Flow{Key: fk, Mark: v.Mark, Uplink: int(v.Uplink), Origin: maps.Origin(v.Origin),
					FirstSeen: time.Duration(v.FirstSeen), LastSeen: time.Duration(v.LastSeen)}
				if err := om.Put(previousFlowKey(fk), previousFlow(f)); err != nil {
					t.Fatal(err)
				}
			}
			if err := it.Err(); err != nil {
				t.Fatal(err)
			}
			m.Close()
			if err := os.Remove(filepath.Join(dir, name)); err != nil {
				t.Fatal(err)
			}
		}
		if err := om.Pin(filepath.Join(dir, kind.old)); err != nil {
			t.Fatal(err)
		}
		om.Close()
	}
	slots, err := ebpf.LoadPinnedMap(filepath.Join(dir, "iface_slots"), nil)
	if err != nil {
		t.Fatal(err)
	}
	ifaces, err := ebpf.LoadPinnedMap(filepath.Join(dir, "ifaces"), nil)
	if err != nil {
		t.Fatal(err)
	}
	var idx uint32
	var v bpf.UplinkIface
	moved := 0
	it := slots.Iterate()
	for it.Next(&idx, &v) {
		if v.Role != 0 {
			if err := ifaces.Put(idx, v); err != nil {
				t.Fatal(err)
			}
			moved++
		}
	}
	if err := it.Err(); err != nil || moved == 0 {
		t.Fatalf("iface_slots held %d interfaces (%v)", moved, err)
	}
	slots.Close()
	ifaces.Close()
	if err := os.Remove(filepath.Join(dir, "iface_slots")); err != nil {
		t.Fatal(err)
	}

	// struct uplink had no flow generation: 4 bytes shorter.
	up, err := ebpf.LoadPinnedMap(filepath.Join(dir, "uplinks"), nil)
	if err != nil {
		t.Fatal(err)
	}
	short := up.ValueSize() - 4
	om, err := ebpf.NewMap(&ebpf.MapSpec{Name: "uplinks", Type: ebpf.Array, KeySize: 4, ValueSize: short, MaxEntries: up.MaxEntries()})
	if err != nil {
		t.Fatal(err)
	}
	var uv []byte
	for it := up.Iterate(); it.Next(&idx, &uv); {
		if err := om.Put(idx, uv[:short]); err != nil {
			t.Fatal(err)
		}
	}
	up.Close()
	if err := os.Remove(filepath.Join(dir, "uplinks")); err != nil {
		t.Fatal(err)
	}
	if err := om.Pin(filepath.Join(dir, "uplinks")); err != nil {
		t.Fatal(err)
	}
	om.Close()
}
