package test

// The CLI's answers on a real daemon: 'status' (text, --json, exit codes)
// and 'flows' (names, filters, --json, flush), checked against where real
// connections went.

import (
	"encoding/json"
	"errors"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mhbpf/mhbpf/internal/topology"
)

// exitCode is a finished command's exit status (0 for nil).
func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

// cliStatus is the part of 'mhbpf status --json' (docs/cli.md) tests read.
type cliStatus struct {
	Health   string `json:"health"`
	ExitCode int    `json:"exit_code"`
	Running  bool   `json:"running"`
	PID      int    `json:"pid"`
	State    string `json:"state"`
	Uplinks  []struct {
		Name     string   `json:"name"`
		ID       int      `json:"id"`
		Usable   bool     `json:"usable"`
		Reason   string   `json:"reason"`
		Probed   bool     `json:"probed"`
		RTTms    *float64 `json:"rtt_ms"`
		Mark     uint32   `json:"mark"`
		Counters struct {
			TxBytes  uint64 `json:"tx_bytes"`
			NewFlows uint64 `json:"new_flows"`
		} `json:"counters"`
	} `json:"uplinks"`
}

// statusJSON runs 'mhbpf status --json' and parses it; the exit code must
// be the one the JSON names.
func (e *daemonEnv) statusJSON() (cliStatus, int) {
	e.t.Helper()
	cmd := e.inRouter(e.bin, "--state-dir", e.stateDir, "--pin-dir", e.pinDir, "status", "--json")
	out, err := cmd.Output()
	var st cliStatus
	if jerr := json.Unmarshal(out, &st); jerr != nil {
		e.t.Fatalf("status --json: %v (exit %d): not JSON: %v\n%s", err, exitCode(err), jerr, out)
	}
	if code := exitCode(err); code != st.ExitCode {
		e.t.Fatalf("status --json exited %d but says exit_code %d\n%s", code, st.ExitCode, out)
	}
	return st, st.ExitCode
}

func TestStatusExitCodesAndJSON(t *testing.T) {
	e := newDaemonEnv(t, "", "")

	// No daemon ever ran with this state directory: not running.
	if st, code := e.statusJSON(); code != 5 || st.Health != "not-running" || st.Running {
		t.Fatalf("before the daemon: exit %d, %+v; want 5, not-running", code, st)
	}
	if out, err := e.mhbpf("status"); exitCode(err) != 5 || !strings.Contains(out, "is the daemon running?") {
		t.Fatalf("text status before the daemon: exit %d\n%s", exitCode(err), out)
	}

	e.start()
	e.waitFor("both uplinks up", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	st, code := e.statusJSON()
	if code != 0 || st.Health != "healthy" || !st.Running || st.PID != e.cmd.Process.Pid || st.State != "running" {
		t.Fatalf("healthy daemon: exit %d, %+v", code, st)
	}
	if len(st.Uplinks) != 2 || st.Uplinks[0].Name != "isp1" || st.Uplinks[1].Name != "isp2" ||
		!st.Uplinks[0].Usable || !st.Uplinks[1].Usable || st.Uplinks[0].Mark != markISP1 || st.Uplinks[1].Mark != markISP2 {
		t.Fatalf("uplinks: %+v", st.Uplinks)
	}
	if st.Uplinks[0].Probed || st.Uplinks[0].RTTms != nil {
		t.Fatalf("isp1 has no probes configured, yet: %+v", st.Uplinks[0])
	}
	if out, err := e.mhbpf("status"); err != nil || !strings.Contains(out, "isp2") {
		t.Fatalf("text status of a healthy daemon: exit %d\n%s", exitCode(err), out)
	}

	// One uplink out: degraded, and the JSON says which and why.
	if err := e.topo.IP(e.topo.Router, "link", "set", "ppp1", "down"); err != nil {
		t.Fatal(err)
	}
	e.waitFor("degraded", 3*time.Second, func() bool { _, c := e.statusJSON(); return c == 3 })
	st, _ = e.statusJSON()
	if st.Health != "degraded" || !st.Uplinks[0].Usable || st.Uplinks[1].Usable || st.Uplinks[1].Reason == "" {
		t.Fatalf("isp2 down: %+v", st)
	}
	t.Logf("isp2's reason: %q", st.Uplinks[1].Reason)

	// Both out: down.
	if err := e.topo.IP(e.topo.Router, "link", "set", "ppp0", "down"); err != nil {
		t.Fatal(err)
	}
	e.waitFor("all down", 3*time.Second, func() bool { _, c := e.statusJSON(); return c == 4 })
	if st, _ = e.statusJSON(); st.Health != "down" {
		t.Fatalf("both down: %+v", st)
	}
	if _, err := e.mhbpf("status"); exitCode(err) != 4 {
		t.Fatalf("text status, both down: exit %d", exitCode(err))
	}

	// The daemon gone (its status file stays): not running.
	e.stop()
	if st, code := e.statusJSON(); code != 5 || st.Running || st.Health != "not-running" || len(st.Uplinks) != 2 {
		t.Fatalf("after the daemon: exit %d, %+v", code, st)
	}
}

type cliFlow struct {
	Proto    string `json:"proto"`
	Src      string `json:"src"`
	SrcPort  uint16 `json:"src_port"`
	Dst      string `json:"dst"`
	DstPort  uint16 `json:"dst_port"`
	Uplink   string `json:"uplink"`
	UplinkID int    `json:"uplink_id"`
	Origin   string `json:"origin"`
	Policy   string `json:"policy"`
	PolicyID int    `json:"policy_id"`
	Mark     uint32 `json:"mark"`
	// The record's times: a live flow's age is >= 0 and its mark carries
	// an uplink bit.
	AgeSeconds *float64 `json:"age_seconds"`
}

func (e *daemonEnv) flowsJSON(args ...string) []cliFlow {
	e.t.Helper()
	out, err := e.inRouter(append([]string{e.bin, "--state-dir", e.stateDir, "--pin-dir", e.pinDir, "flows", "--json"}, args...)...).Output()
	if err != nil {
		e.t.Fatalf("flows --json %v: %v\n%s", args, err, out)
	}
	var fl []cliFlow
	if err := json.Unmarshal(out, &fl); err != nil {
		e.t.Fatalf("flows --json %v: not JSON: %v\n%s", args, err, out)
	}
	return fl
}

func TestFlowsByNameFiltersJSONAndFlush(t *testing.T) {
	e := newDaemonEnv(t, "", `
[[policy]]
name = "panel-via-isp2"
protocol = "tcp"
ports = [8001]
uplinks = ["isp2"]

[[policy]]
name = "mail-via-isp1"
protocol = "tcp"
ports = [8002]
uplinks = ["isp1"]
`)
	// 8000 balanced, 8001 and 8002 by two different named policies.
	ports := []uint16{8000, 8001, 8002}
	for _, port := range ports {
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

	// Where each real connection went, by the server that answered.
	went := map[uint16]string{}
	for _, port := range ports {
		got, err := e.topo.Dial(e.topo.LAN, "", topology.Internet, port)
		if err != nil {
			t.Fatal(err)
		}
		name, peer := answer(got)
		if peer != topology.LANHost {
			t.Fatalf("port %d: server saw %s", port, got)
		}
		went[port] = name
	}
	if went[8001] != "isp2" || went[8002] != "isp1" {
		t.Fatalf("the policies' ports went by %s (8001, want isp2) and %s (8002, want isp1)", went[8001], went[8002])
	}

	all := e.flowsJSON()
	if len(all) != len(ports) {
		t.Fatalf("want the %d flows of the %d connections, got %+v", len(ports), len(ports), all)
	}
	for _, f := range all {
		if f.Proto != "tcp" || f.Src != topology.LANHost.String() || f.Dst != topology.Internet.String() || f.AgeSeconds == nil || *f.AgeSeconds < 0 || f.Mark == 0 {
			t.Errorf("flow: %+v", f)
		}
		if f.Uplink != went[f.DstPort] {
			t.Errorf("flow to port %d: the map says %s, the connection went by %s", f.DstPort, f.Uplink, went[f.DstPort])
		}
		wantOrigin := map[uint16]string{8000: "balanced", 8001: "policy", 8002: "policy"}[f.DstPort]
		wantPolicy := map[uint16]string{8001: "panel-via-isp2", 8002: "mail-via-isp1"}[f.DstPort]
		wantID := map[uint16]int{8001: 1, 8002: 2}[f.DstPort]
		if f.Origin != wantOrigin || f.Policy != wantPolicy || f.PolicyID != wantID {
			t.Errorf("flow to port %d: origin %s policy %q (id %d), want %s %q (id %d)",
				f.DstPort, f.Origin, f.Policy, f.PolicyID, wantOrigin, wantPolicy, wantID)
		}
	}

	for _, c := range []struct {
		args  []string
		ports []uint16
	}{
		{[]string{"--uplink", "isp2"}, portsOn(went, "isp2")},
		{[]string{"--uplink", "isp1"}, portsOn(went, "isp1")},
		{[]string{"--policy", "policy"}, []uint16{8001, 8002}},
		{[]string{"--policy", "panel-via-isp2"}, []uint16{8001}},
		{[]string{"--policy", "mail-via-isp1"}, []uint16{8002}},
		{[]string{"--policy", "mail-via-isp1", "--uplink", "isp2"}, nil},
		{[]string{"--policy", "balanced", "--proto", "tcp"}, []uint16{8000}},
		{[]string{"--policy", "inbound"}, nil},
		{[]string{"--proto", "udp"}, nil},
		{[]string{"--src", "100.64.2.0/24", "--dst", "203.0.113.10"}, ports},
		{[]string{"--src", "100.64.2.11"}, nil},
		{[]string{"--dst", "2001:db8::/32"}, nil},
	} {
		var got []uint16
		for _, f := range e.flowsJSON(c.args...) {
			got = append(got, f.DstPort)
		}
		if !samePorts(got, c.ports) {
			t.Errorf("flows %v: ports %v, want %v", c.args, got, c.ports)
		}
	}

	out, err := e.mhbpf("flows", "--uplink", "isp3")
	if err == nil || !strings.Contains(out, `--uplink "isp3": no such uplink (uplinks: isp1, isp2)`) {
		t.Fatalf("unknown uplink: %v\n%s", err, out)
	}
	out, err = e.mhbpf("flows", "--policy", "mail")
	if err == nil || !strings.Contains(out, `--policy "mail": want balanced, policy, inbound or a [[policy]] name (policies: panel-via-isp2, mail-via-isp1)`) {
		t.Fatalf("unknown policy: %v\n%s", err, out)
	}
	out, err = e.mhbpf("flows", "--dst", "203.0.113.300")
	if err == nil || !strings.Contains(out, `--dst "203.0.113.300"`) {
		t.Fatalf("bad --dst: %v\n%s", err, out)
	}
	text, err := e.mhbpf("flows", "--uplink", "isp2")
	if err != nil || !strings.Contains(text, "203.0.113.10:8001") || !strings.Contains(text, " isp2 ") || !strings.Contains(text, " panel-via-isp2 ") {
		t.Fatalf("text flows: %v\n%s", err, text)
	}
	t.Logf("mhbpf flows --uplink isp2:\n%s", text)

	out, err = e.mhbpf("flows", "flush", "--uplink", "isp2")
	n := len(portsOn(went, "isp2"))
	if err != nil || !strings.Contains(out, "flows forgotten (uplink isp2)") || !strings.HasPrefix(out, strconv.Itoa(n)+" ") {
		t.Fatalf("flush isp2 (%d flows on it): %v\n%s", n, err, out)
	}
	if left := e.flowsJSON("--uplink", "isp2"); len(left) != 0 {
		t.Fatalf("after flush --uplink isp2: %+v", left)
	}
	if left := e.flowsJSON(); len(left) != len(ports)-n {
		t.Fatalf("flush --uplink isp2 took other flows too: %+v", left)
	}
	if out, err = e.mhbpf("flows", "flush"); err != nil || !strings.Contains(out, "flows forgotten (all uplinks)") {
		t.Fatalf("flush: %v\n%s", err, out)
	}
	if left := e.flowsJSON(); len(left) != 0 {
		t.Fatalf("after flush: %+v", left)
	}
}

func portsOn(went map[uint16]string, uplink string) []uint16 {
	var p []uint16
	for port, u := range went {
		if u == uplink {
			p = append(p, port)
		}
	}
	return p
}

func samePorts(a, b []uint16) bool {
	if len(a) != len(b) {
		return false
	}
	seen := map[uint16]int{}
	for _, p := range a {
		seen[p]++
	}
	for _, p := range b {
		seen[p]--
	}
	for _, n := range seen {
		if n != 0 {
			return false
		}
	}
	return true
}
