package test

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/mhbpf/mhbpf/internal/daemontest"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/topology"
)

// Issue 8, upgrade: a daemon started on pinned maps of another size (here
// flow_map_size, after kill -9 and after a clean stop) migrates them
// instead of refusing to start and leaving the old programs running
// unmanaged on the old maps. Connections held open throughout keep their
// uplink; their records are carried over (same first-seen time, uplink,
// mark), as 'mhbpf flows' shows; the new programs run on the new maps (a
// new connection's record is in the new pinned map); no temporary pin is
// left, and 'mhbpf down' removes everything. The weights change too, so
// that a flow whose record was lost would be given the other uplink.
func TestDaemonUpgradeResizesFlowMap(t *testing.T) {
	e := newDaemonEnv(t, "", perFlowPolicies)
	serveGreetEcho(t, e, 8031)
	serveUDP(t, e, 8032)
	w1, w2, ok := flipWeights(stickyHash(0, modeDestination, netip.Addr{}, topology.Internet))
	if !ok {
		t.Fatal("no weights to flip to")
	}

	e.start()
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
	before := flowsOf(t, e, conns)
	listedBefore := e.listedFlows(t, conns)

	for _, step := range []struct {
		how  string
		size int
		stop func()
	}{{"kill -9", 4096, e.kill9}, {"SIGTERM", 8192, e.stop}} {
		step.stop()
		for _, h := range conns {
			h.stillThere(t, "with the daemon stopped ("+step.how+")")
		}
		e.setFlowMapSize(step.size)
		if step.how == "kill -9" {
			e.setWeights(w1, w2) // and they stay so for the next step
		}
		out, err := e.mhbpf("check", e.cfgPath)
		for _, name := range []string{"flows4", "flows6", "remotes"} {
			if want := "warning: pinned map " + name + " will be migrated (resize)"; err != nil || !strings.Contains(out, want) {
				t.Fatalf("mhbpf check with flow_map_size = %d does not say %q: %v\n%s", step.size, want, err, out)
			}
		}
		e.start()
		if got := e.pinnedMaxEntries(t, "flows4"); got != uint32(step.size) {
			t.Fatalf("after %s and flow_map_size = %d: the pinned flow map has %d entries", step.how, step.size, got)
		}
		t.Logf("after %s, flow_map_size = %d:\n%s", step.how, step.size, daemontest.Lines(e.log.String(), "pinned map"))
		for _, name := range []string{"flows4", "remotes"} {
			want := fmt.Sprintf("map=%s action=resize", name)
			if !strings.Contains(e.log.String(), want) {
				t.Fatalf("after %s: the log does not say %q:\n%s", step.how, want, e.log.String())
			}
		}
		for _, h := range conns {
			h.stillThere(t, "after the upgrade ("+step.how+")")
		}
		after := flowsOf(t, e, conns)
		for _, h := range conns {
			b, a := before[h.key], after[h.key]
			if a.FirstSeen != b.FirstSeen || a.Uplink != b.Uplink || a.Mark != b.Mark || a.Origin != b.Origin {
				t.Fatalf("%s: %v: the record was not carried over:\nbefore %+v\nafter  %+v", step.how, h, b, a)
			}
		}
		// The new programs keep the carried records fresh: a packet
		// refreshes last_seen at most once a second (LAST_SEEN_STEP_NS),
		// so traffic after more than a second must have moved it on.
		time.Sleep(maps.LastSeenStep + 100*time.Millisecond)
		for _, h := range conns {
			h.stillThere(t, "a second after the upgrade ("+step.how+")")
		}
		refreshed := flowsOf(t, e, conns)
		for _, h := range conns {
			if b, a := before[h.key], refreshed[h.key]; a.LastSeen <= b.LastSeen || a.FirstSeen != b.FirstSeen {
				t.Fatalf("%s: %v: the carried record is not refreshed by the new programs:\nbefore %+v\nafter  %+v", step.how, h, b, a)
			}
		}
		before = refreshed // the next step compares with these
		if listed := e.listedFlows(t, conns); listed != listedBefore {
			t.Fatalf("%s: mhbpf flows before:\n%s\nafter:\n%s", step.how, listedBefore, listed)
		}
		// The new programs write the new map: a new connection's record
		// is there (old programs would record it in the old, unpinned map).
		fresh := lanConnect(t, e, protoTCP, 0, 8031)
		flowsOf(t, e, []*lanConn{fresh})
		e.noTemporaryPins(t)
	}

	e.stop()
	if out, err := e.mhbpf("down"); err != nil {
		t.Fatalf("mhbpf down: %v\n%s", err, out)
	}
	if _, err := os.Stat(e.pinDir); !os.IsNotExist(err) {
		t.Fatalf("after mhbpf down the pin directory is still there (%v)", err)
	}
}

// listedFlows is what 'mhbpf flows' says of the connections: protocol,
// source, destination, uplink, origin, one line each, sorted.
func (e *daemonEnv) listedFlows(t *testing.T, conns []*lanConn) string {
	t.Helper()
	out, err := e.mhbpf("flows")
	if err != nil {
		t.Fatalf("mhbpf flows: %v\n%s", err, out)
	}
	want := map[string]bool{}
	for _, h := range conns {
		want[h.key.Src.String()+" "+h.key.Dst.String()] = true
	}
	var lines []string
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) >= 5 && want[f[1]+" "+f[2]] {
			lines = append(lines, strings.Join(f[:5], " "))
		}
	}
	if len(lines) != len(conns) {
		t.Fatalf("mhbpf flows lists %d of the %d connections:\n%s", len(lines), len(conns), out)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

func (e *daemonEnv) pinnedMaxEntries(t *testing.T, name string) uint32 {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(e.pinDir, "maps", name), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	return m.MaxEntries()
}

// noTemporaryPins: the pin directory holds the maps, the links and
// qdisc markers, nothing half-done.
func (e *daemonEnv) noTemporaryPins(t *testing.T) {
	t.Helper()
	var stray []string
	_ = filepath.Walk(e.pinDir, func(p string, info os.FileInfo, err error) error {
		rel, _ := filepath.Rel(e.pinDir, p)
		if err == nil && (strings.Contains(rel, "tmp") || strings.Contains(rel, "upgrade")) {
			stray = append(stray, rel)
		}
		return nil
	})
	if len(stray) > 0 {
		t.Fatalf("temporary pins left: %v", stray)
	}
}

// setFlowMapSize sets global.flow_map_size, replacing an earlier setting.
func (e *daemonEnv) setFlowMapSize(size int) {
	e.t.Helper()
	raw, err := os.ReadFile(e.cfgPath)
	if err != nil {
		e.t.Fatal(err)
	}
	var kept []string
	for _, l := range strings.Split(string(raw), "\n") {
		if !strings.HasPrefix(l, "flow_map_size = ") {
			kept = append(kept, l)
		}
	}
	e.writeConfig(strings.Join(kept, "\n"))
	e.setGlobal(fmt.Sprintf("flow_map_size = %d", size))
}
