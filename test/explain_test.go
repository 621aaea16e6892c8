package test

// 'mhbpf explain' against where real connections go: for every kind of
// policy (default balance sticky per destination, a single uplink failing
// closed, a failover order, per flow, per source and destination pair, by
// source), a bypassed destination, and again with an uplink down.

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/topology"
)

const explainPolicies = `
[[policy]]
name = "mail-isp1-only"
protocol = "tcp"
ports = [8025]
uplinks = ["isp1"]
last_resort = "unreachable"

[[policy]]
name = "panel-isp2-first"
protocol = "tcp"
ports = [8001]
uplinks = ["isp2", "isp1"]

[[policy]]
name = "per-flow"
protocol = "tcp"
ports = [8002]
uplinks = ["isp1", "isp2"]
balance = true
sticky = "flow"

[[policy]]
name = "per-pair"
protocol = "tcp"
ports = [8003]
uplinks = ["isp1", "isp2"]
balance = true
sticky = "pair"

[[policy]]
name = "host10-isp2"
sources = ["100.64.2.10/32"]
protocol = "tcp"
ports = [8004]
uplinks = ["isp2"]
`

// cliExplain is the part of 'mhbpf explain --json' (docs/cli.md) tests read.
type cliExplain struct {
	Bypassed    bool   `json:"bypassed"`
	PolicyID    int    `json:"policy_id"`
	Policy      string `json:"policy"`
	Sticky      string `json:"sticky"`
	Uplink      string `json:"uplink"`
	MhbpfMark   uint32 `json:"mhbpf_mark"`
	StickyEntry *struct {
		Uplink string `json:"uplink"`
		Kept   bool   `json:"kept"`
	} `json:"sticky_entry"`
	Entries []struct {
		Uplink   string  `json:"uplink"`
		Up       bool    `json:"up"`
		Reason   string  `json:"reason"`
		Eligible bool    `json:"eligible"`
		Share    float64 `json:"share"`
	} `json:"entries"`
	Route struct {
		Rule   string `json:"rule"`
		Table  int    `json:"table"`
		Device string `json:"device"`
		Error  string `json:"error"`
	} `json:"route"`
}

func (e *daemonEnv) explain(args ...string) (cliExplain, string) {
	e.t.Helper()
	out, err := e.mhbpf(append([]string{"explain", "--json"}, args...)...)
	var r cliExplain
	if err != nil || json.Unmarshal([]byte(out), &r) != nil {
		e.t.Fatalf("explain %v: %v\n%s", args, err, out)
	}
	text, err := e.mhbpf(append([]string{"explain"}, args...)...)
	if err != nil {
		e.t.Fatalf("explain %v (text): %v\n%s", args, err, text)
	}
	return r, text
}

// dialFrom connects from the LAN host's source port sport; it returns the
// uplink whose server answered ("" if the connection failed).
func (e *daemonEnv) dialFrom(src netip.Addr, sport, port uint16) string {
	got, err := e.topo.Socat(e.topo.LAN, "", "", fmt.Sprintf("TCP4:%s:%d,connect-timeout=2,bind=%s,sourceport=%d", topology.Internet, port, src, sport))
	if err != nil {
		return ""
	}
	name, _ := answer(got)
	return name
}

// liveState is what explain must not change: the flow records and the
// sticky entries.
func liveState(t *testing.T, pinDir string) (flows, sticky int) {
	t.Helper()
	m, err := loader.OpenPinned(pinDir)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.WalkFlows(func(maps.Flow) bool { flows++; return true }); err != nil {
		t.Fatal(err)
	}
	var k, v [64]byte
	it := m.Sticky.Iterate()
	for it.Next(k[:m.Sticky.KeySize()], v[:m.Sticky.ValueSize()]) {
		sticky++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return flows, sticky
}

func TestExplainAgreesWithRealConnections(t *testing.T) {
	e := newDaemonEnv(t, "", explainPolicies)
	// A second LAN host for the per-source policy (not host10).
	if err := e.topo.IP(e.topo.LAN, "addr", "add", "100.64.2.11/24", "dev", "eth0"); err != nil {
		t.Fatal(err)
	}
	for _, port := range []uint16{8000, 8001, 8002, 8003, 8004, 8025} {
		for ns, name := range map[string]string{e.topo.ISP1: "isp1", e.topo.ISP2: "isp2"} {
			srv, err := e.topo.Serve(ns, name, topology.Internet, port)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(srv.Close)
		}
	}
	e.start()
	e.waitFor("both uplinks up", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	host10, host11 := topology.LANHost, netip.MustParseAddr("100.64.2.11")

	type kase struct {
		name   string
		src    netip.Addr
		port   uint16
		policy string // "" : the default balance
		sticky string
	}
	cases := []kase{
		{"default balance", host10, 8000, "", "destination"},
		{"single uplink, fail closed", host10, 8025, "mail-isp1-only", "destination"},
		{"failover order", host10, 8001, "panel-isp2-first", "destination"},
		{"per flow", host10, 8002, "per-flow", "flow"},
		{"per pair", host10, 8003, "per-pair", "pair"},
		{"by source: matching host", host10, 8004, "host10-isp2", "destination"},
		{"by source: other host", host11, 8004, "", "destination"},
	}
	sport := uint16(41000)
	check := func(phase string, want map[string]string) {
		t.Helper()
		for _, c := range cases {
			sport++
			flowsBefore, stickyBefore := liveState(t, e.pinDir)
			r, text := e.explain(topology.Internet.String(), "--src", c.src.String(), "--port", fmt.Sprint(c.port), "--sport", fmt.Sprint(sport))
			if f, s := liveState(t, e.pinDir); f != flowsBefore || s != stickyBefore {
				t.Fatalf("%s, %s: explain wrote to the live maps: flows %d -> %d, sticky entries %d -> %d", phase, c.name, flowsBefore, f, stickyBefore, s)
			}
			wantPolicy := c.policy
			if wantPolicy == "" {
				wantPolicy = "default balance"
			}
			if r.Bypassed || r.Policy != wantPolicy || r.Sticky != c.sticky {
				t.Errorf("%s, %s: explain says policy %q sticky %q (bypassed %v), want %q %q\n%s", phase, c.name, r.Policy, r.Sticky, r.Bypassed, wantPolicy, c.sticky, text)
			}
			went := e.dialFrom(c.src, sport, c.port)
			if r.Uplink != went {
				t.Errorf("%s, %s: explain says %q, the connection went by %q\n%s", phase, c.name, r.Uplink, went, text)
			}
			if w, ok := want[c.name]; ok && went != w {
				t.Errorf("%s, %s: went by %q, want %q", phase, c.name, went, w)
			}
			if went == "" {
				if r.Route.Error == "" {
					t.Errorf("%s, %s: the connection failed, explain's route says nothing of it: %+v\n%s", phase, c.name, r.Route, text)
				}
				continue
			}
			dev := map[string]string{"isp1": "ppp0", "isp2": "ppp1"}[went]
			if r.Route.Device != dev || r.Route.Rule == "" {
				t.Errorf("%s, %s: went by %s, explain's route: %+v\n%s", phase, c.name, dev, r.Route, text)
			}
			// The flow the real connection left has the mark explain named.
			m, err := loader.OpenPinned(e.pinDir)
			if err != nil {
				t.Fatal(err)
			}
			f, ok, err := m.LookupFlow(maps.FlowKey{Proto: 6, Src: netip.AddrPortFrom(c.src, sport), Dst: netip.AddrPortFrom(topology.Internet, c.port)})
			m.Close()
			if err != nil || !ok || f.Mark != r.MhbpfMark {
				t.Errorf("%s, %s: flow %+v (found %v, %v), explain's mark %#x", phase, c.name, f, ok, err, r.MhbpfMark)
			}
			if c.name == "default balance" && phase == "both up" {
				t.Logf("mhbpf explain %s --src %s --port %d:\n%s", topology.Internet, c.src, c.port, text)
			}
		}
	}
	check("both up", map[string]string{"single uplink, fail closed": "isp1", "failover order": "isp2", "by source: matching host": "isp2"})

	// Per flow, the source port decides: explain must tell the ports that
	// go by isp1 from those that go by isp2, before the connections do.
	seen := map[string]bool{}
	for sp := uint16(42000); sp < 42100 && len(seen) < 2; sp++ { // 8:2: all 100 on isp1 has odds 2e-10
		r, text := e.explain(topology.Internet.String(), "--src", host10.String(), "--port", "8002", "--sport", fmt.Sprint(sp))
		if seen[r.Uplink] {
			continue
		}
		seen[r.Uplink] = true
		if went := e.dialFrom(host10, sp, 8002); went != r.Uplink {
			t.Errorf("per flow, source port %d: explain says %q, the connection went by %q\n%s", sp, r.Uplink, went, text)
		}
	}
	if !seen["isp1"] || !seen["isp2"] {
		t.Errorf("per flow (8:2): 100 source ports all explained as %v", seen)
	}

	// The default balance's destination now has a sticky entry, which
	// explain shows as what decided.
	r, text := e.explain(topology.Internet.String(), "--src", host10.String(), "--port", "8000")
	if r.StickyEntry == nil || !r.StickyEntry.Kept || r.StickyEntry.Uplink != r.Uplink {
		t.Errorf("after a connection, the destination's sticky entry: %+v\n%s", r.StickyEntry, text)
	}

	// A bypassed destination: the LAN.
	r, text = e.explain(topology.RouterLAN.String(), "--src", host10.String())
	if !r.Bypassed || r.Uplink != "" || r.MhbpfMark != 0 {
		t.Errorf("LAN destination: %+v\n%s", r, text)
	}

	// isp1 down: mail fails closed, everything else goes by isp2.
	if err := e.topo.IP(e.topo.Router, "link", "set", "ppp0", "down"); err != nil {
		t.Fatal(err)
	}
	e.waitFor("main via ppp1 only", 3*time.Second, func() bool { return e.mainVia("ppp1") })
	e.waitFor("isp1 out in the status", 3*time.Second, func() bool { st, _ := e.statusJSON(); return st.Health == "degraded" })
	check("isp1 down", map[string]string{"single uplink, fail closed": "", "default balance": "isp2", "failover order": "isp2",
		"per flow": "isp2", "per pair": "isp2", "by source: other host": "isp2"})
	r, text = e.explain(topology.Internet.String(), "--src", host10.String(), "--port", "8025")
	if r.Uplink != "" || r.Route.Error != "unreachable" || !strings.Contains(r.Route.Rule, "fwmark 0x800000/0x800000") ||
		len(r.Entries) != 1 || r.Entries[0].Up || r.Entries[0].Reason != "link down" {
		t.Errorf("mail with isp1 down: %+v\n%s", r, text)
	}
	t.Logf("mhbpf explain %s --src %s --port 8025 (isp1 down):\n%s", topology.Internet, host10, text)
}
