package test

import (
	"fmt"
	"net/netip"
	"os/exec"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mhbpf/mhbpf/internal/daemon"
	"github.com/mhbpf/mhbpf/internal/daemontest"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/topology"
)

// The third uplink's line: tun0 in the router (a veth here) to a namespace
// isp3 that also answers for the internet address.
var (
	isp3Local = netip.MustParseAddr("100.64.40.2")
	isp3Peer  = netip.MustParseAddr("100.64.40.1")
)

// addISP3 adds the third uplink's namespace and line to e's topology; it
// is removed with the test (the router's end goes with its peer).
func addISP3(t *testing.T, e *daemonEnv) string {
	t.Helper()
	ns := strings.TrimSuffix(e.topo.Router, "-rt") + "-isp3"
	if err := exec.Command("ip", "netns", "add", ns).Run(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	for _, s := range [][]string{
		{"-n", e.topo.Router, "link", "add", "tun0", "type", "veth", "peer", "name", "wan", "netns", ns},
		{"-n", e.topo.Router, "addr", "add", isp3Local.String() + "/30", "dev", "tun0"},
		{"-n", ns, "addr", "add", isp3Peer.String() + "/30", "dev", "wan"},
		{"-n", ns, "addr", "add", topology.Internet.String() + "/32", "dev", "lo"},
		{"-n", ns, "link", "set", "lo", "up"},
		{"-n", ns, "link", "set", "wan", "up"},
		{"-n", e.topo.Router, "link", "set", "tun0", "up"},
		{"-n", ns, "route", "add", topology.LANPrefix.String(), "via", isp3Local.String()},
	} {
		if out, err := exec.Command("ip", s...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(s, " "), err, out)
		}
	}
	return ns
}

// holdOpen holds a connection from the LAN to the internet address's port.
func holdOpen(t *testing.T, e *daemonEnv, port uint16) *heldConn {
	t.Helper()
	return holdConn(t, e.topo.LAN, fmt.Sprintf("TCP4:%s:%d,connect-timeout=2", topology.Internet, port))
}

// serveLines starts a line server in ns on the internet address. Its
// connection handlers are killed with it (a connection whose client's
// packets went elsewhere would keep one waiting for ever).
func serveLines(t *testing.T, e *daemonEnv, ns, name string, port uint16) {
	t.Helper()
	cmd := e.topo.Exec(ns, "socat", fmt.Sprintf("TCP4-LISTEN:%d,bind=%s,fork,reuseaddr", port, topology.Internet),
		"SYSTEM:while read l; do echo "+name+" $l; done")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		_ = cmd.Wait()
	})
	for start := time.Now(); ; time.Sleep(20 * time.Millisecond) {
		out, _ := e.topo.Exec(ns, "ss", "-Hltn", fmt.Sprintf("sport = :%d", port)).Output()
		if strings.Contains(string(out), fmt.Sprintf(":%d", port)) {
			return
		}
		if time.Since(start) > 5*time.Second {
			t.Fatalf("line server on port %d in %s did not start", port, ns)
		}
	}
}

const identityConfig = `
[global]
pin_dir = %q
state_dir = %q
cgroup = %q
up_delay = "300ms"
resync_every = "2s"
%s
[lan]
interfaces = ["eth2"]
bypass = ["100.64.2.0/24", "2001:db8:0:3::/64"]
%s
`

var identityUplinks = map[string]string{
	"isp1": `
[[uplink]]
name = "isp1"
interface = "ppp0"
gateway = "100.64.0.1"
gateway6 = "2001:db8:0:1::1"
weight = 8
`,
	"isp2": `
[[uplink]]
name = "isp2"
interface = "ppp1"
gateway = "100.64.1.1"
gateway6 = "2001:db8:0:2::1"
weight = 2
`,
	"isp3": `
[[uplink]]
name = "isp3"
interface = "tun0"
gateway = "100.64.40.1"
balance = false
`,
}

const (
	identityPolicies = `
[[policy]]
name = "via-isp2"
destinations = ["203.0.113.10/32"]
protocol = "tcp"
ports = [8020, 8022]
uplinks = ["isp2", "isp3"]

[[policy]]
name = "via-isp3"
destinations = ["203.0.113.10/32"]
protocol = "tcp"
ports = [8023]
uplinks = ["isp3", "isp2"]
`
	isp1Policy = `
[[policy]]
name = "via-isp1"
destinations = ["203.0.113.10/32"]
protocol = "tcp"
ports = [8021]
uplinks = ["isp1"]
`
)

func (e *daemonEnv) identityConfig(uplinks []string, policies string) {
	var ups strings.Builder
	for _, u := range uplinks {
		ups.WriteString(identityUplinks[u])
	}
	e.writeConfig(fmt.Sprintf(identityConfig, e.pinDir, e.stateDir, e.cgroup, ups.String(), policies))
}

// flowsByPort reads the pinned flow map: the LAN's flows to the internet
// address, by destination port.
func (e *daemonEnv) flowsByPort() map[uint16][]maps.Flow {
	e.t.Helper()
	m, err := loader.OpenPinned(e.pinDir)
	if err != nil {
		e.t.Fatal(err)
	}
	defer m.Close()
	out := map[uint16][]maps.Flow{}
	if err := m.WalkFlows(func(f maps.Flow) bool {
		if f.Key.Src.Addr() == topology.LANHost && f.Key.Dst.Addr() == topology.Internet {
			out[f.Key.Dst.Port()] = append(out[f.Key.Dst.Port()], f)
		}
		return true
	}); err != nil {
		e.t.Fatal(err)
	}
	return out
}

// statusIdentities is "name=id/mark/table ..." in the status's order.
func (e *daemonEnv) statusIdentities() string {
	e.t.Helper()
	st, err := daemon.LoadStatus(e.stateDir)
	if err != nil {
		e.t.Fatal(err)
	}
	var out []string
	for _, u := range st.Uplinks {
		out = append(out, fmt.Sprintf("%s=%d/%#x/%d", u.Name, u.ID, u.Mark, u.Table))
	}
	return strings.Join(out, " ")
}

func flowKeys(fs []maps.Flow) []string {
	var out []string
	for _, f := range fs {
		out = append(out, f.Key.String())
	}
	sort.Strings(out)
	return out
}

// Issue 8: removing an uplink and reordering the rest on reload moves no
// other uplink's slot, mark or table, nor its flows; a restart keeps them
// too. isp2 comes last first, so that giving ids and marks by position
// would move it (to slot 0, mark 0x10000, table 100); isp3's connection
// carries isp2's bit as its fallback, which must go once isp2 comes first.
func TestDaemonReloadKeepsUplinkIdentity(t *testing.T) {
	e := newDaemonEnv(t, "", "")
	isp3 := addISP3(t, e)
	e.identityConfig([]string{"isp1", "isp3", "isp2"}, identityPolicies+isp1Policy)
	serveLines(t, e, e.topo.ISP2, "isp2", 8020)
	serveLines(t, e, isp3, "isp3", 8023)
	for port, ns := range map[uint16]string{8021: e.topo.ISP1, 8022: e.topo.ISP2} {
		srv, err := e.topo.Serve(ns, "srv", topology.Internet, port)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(srv.Close)
	}
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	const identities = "isp1=0/0x10000/100 isp3=1/0x20000/101 isp2=2/0x40000/102"
	if got := e.statusIdentities(); got != identities {
		t.Fatalf("identities %s, want %s", got, identities)
	}

	viaISP2, viaISP3 := holdOpen(t, e, 8020), holdOpen(t, e, 8023)
	if got := viaISP2.say("one"); got != "isp2 one" {
		t.Fatalf("held connection to isp2: %q", got)
	}
	if got := viaISP3.say("one"); got != "isp3 one" {
		t.Fatalf("held connection to isp3: %q", got)
	}
	for _, port := range []uint16{8021, 8022, 8022} {
		if _, err := e.topo.Dial(e.topo.LAN, "", topology.Internet, port); err != nil {
			t.Fatal(err)
		}
	}
	// Before: isp2 (last) carries no fallback bit, isp3 carries isp2's.
	before := e.flowsByPort()
	for port, want := range map[uint16]struct {
		n          int
		uplink     int
		mark       uint32
		whoseFlows string
	}{
		8020: {1, 2, 0x40000, "isp2"}, 8022: {2, 2, 0x40000, "isp2"},
		8023: {1, 1, 0x20000 | 0x40000, "isp3 falling back to isp2"}, 8021: {1, 0, 0x10000, "isp1"},
	} {
		fs := before[port]
		if len(fs) != want.n {
			t.Fatalf("port %d: %d flows, want %d: %+v", port, len(fs), want.n, fs)
		}
		for _, f := range fs {
			if f.Uplink != want.uplink || f.Mark != want.mark {
				t.Fatalf("port %d (%s): flow %+v, want uplink %d mark %#x", port, want.whoseFlows, f, want.uplink, want.mark)
			}
		}
	}
	flowsOut, _ := e.mhbpf("flows")
	if !strings.Contains(daemontest.Lines(flowsOut, ":8020"), " isp2 ") || !strings.Contains(daemontest.Lines(flowsOut, ":8023"), " isp3 ") {
		t.Fatalf("mhbpf flows does not name the uplinks by slot:\n%s", flowsOut)
	}

	// isp1 goes, isp2 now comes first.
	orig := before
	e.identityConfig([]string{"isp2", "isp3"}, identityPolicies)
	if err := e.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	const wantRules = `10000:	from all iif ppp1 lookup main proto 77
10001:	from all iif tun0 lookup main proto 77
10016:	from all to 100.64.2.0/24 lookup main proto 77
10020:	from all fwmark 0x440000/0x440000 lookup 102 proto 77
10021:	from all fwmark 0x420000/0x420000 lookup 101 proto 77
10036:	from all lookup main suppress_prefixlength 1 proto 77
10040:	from 100.64.1.2 lookup 102 proto 77
10041:	from 100.64.40.2 lookup 101 proto 77
10060:	from all fwmark 0x40000/0x40000 lookup 102 proto 77
10061:	from all fwmark 0x20000/0x20000 lookup 101 proto 77
10080:	from all fwmark 0x800000/0x800000 unreachable proto 77
`
	rules := func() string { return daemontest.Lines(e.ip("rule"), "proto 77") + "\n" }
	const newIdentities = "isp2=2/0x40000/102 isp3=1/0x20000/101"
	e.waitFor("the new preference order in the rules and the status", 3*time.Second, func() bool {
		return rules() == wantRules && e.mainVia("ppp1") && e.statusIdentities() == newIdentities
	})
	check := func(when string) {
		t.Helper()
		const identities = newIdentities
		if got := e.statusIdentities(); got != identities {
			t.Fatalf("%s: identities %s, want %s", when, got, identities)
		}
		if got := rules(); got != wantRules {
			t.Fatalf("%s: rules\n%s\nwant\n%s", when, got, wantRules)
		}
		if got := viaISP2.say(when); got != "isp2 "+when {
			t.Fatalf("%s: the held connection through isp2 answered %q\nrules:\n%s\nlog:\n%s", when, got, e.ip("rule"), e.log.String())
		}
		if got := viaISP3.say(when); got != "isp3 "+when {
			t.Fatalf("%s: the held connection through isp3 answered %q\nrules:\n%s\nlog:\n%s", when, got, e.ip("rule"), e.log.String())
		}
		after := e.flowsByPort()
		for _, port := range []uint16{8020, 8022, 8023} {
			if b, a := flowKeys(before[port]), flowKeys(after[port]); strings.Join(a, ",") != strings.Join(b, ",") {
				t.Fatalf("%s: flows to port %d\nbefore %v\nafter  %v", when, port, b, a)
			}
		}
		for _, f := range append(after[8020], after[8022]...) {
			want := uint32(0x40000)
			if !contains(orig[f.Key.Dst.Port()], f.Key) {
				want = 0x40000 | 0x20000 // a new flow: isp3 comes after isp2 now
			}
			if f.Uplink != 2 || f.Mark != want {
				t.Fatalf("%s: isp2's flow %+v, want uplink 2 mark %#x", when, f, want)
			}
		}
		for _, f := range after[8023] {
			// isp2's fallback bit would now take the flow (isp2's rule
			// comes first): only isp3's own bit is left.
			if f.Uplink != 1 || f.Mark != 0x20000 {
				t.Fatalf("%s: isp3's flow %+v, want uplink 1 mark 0x20000", when, f)
			}
		}
		if fs := after[8021]; len(fs) != 0 {
			t.Fatalf("%s: the removed isp1's flows stayed: %+v", when, fs)
		}
		m, err := loader.OpenPinned(e.pinDir)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		if u, err := m.LookupUplink(0); err != nil || u.Up || u.Mark != 0 {
			t.Fatalf("%s: the removed isp1's slot 0: %+v %v", when, u, err)
		}
		for id, mark := range map[int]uint32{1: 0x20000, 2: 0x40000} {
			if u, err := m.LookupUplink(id); err != nil || !u.Up || u.Mark != mark {
				t.Fatalf("%s: slot %d: %+v %v, want up with mark %#x", when, id, u, err, mark)
			}
		}
	}
	check("reloaded")
	if !strings.Contains(e.log.String(), `msg="uplink slots moved" retired=[0] flows_deleted=1 flows_remarked=1`) {
		t.Fatalf("the move is not in the log:\n%s", daemontest.Lines(e.log.String(), "uplink"))
	}
	// New flows follow the new order: isp2 first, isp3's bit as its
	// fallback (check looks at its mark).
	if got, err := e.topo.Dial(e.topo.LAN, "", topology.Internet, 8022); err != nil || !strings.HasPrefix(got, "srv ") {
		t.Fatalf("new connection: %q %v", got, err)
	}
	before = e.flowsByPort()
	if len(before[8022]) != 3 {
		t.Fatalf("the new connection's flow is missing: %+v", before[8022])
	}

	// A restart: the record in the state directory keeps them all.
	e.stop()
	if got := viaISP2.say("stopped"); got != "isp2 stopped" {
		t.Fatalf("with the daemon stopped: %q", got)
	}
	e.start()
	check("restarted")
	if strings.Contains(e.log.String(), "new uplink identity") || strings.Contains(e.log.String(), "uplink slots moved") {
		t.Fatalf("the restarted daemon did not take the remembered identities:\n%s", daemontest.Lines(e.log.String(), "uplink"))
	}
}

func contains(fs []maps.Flow, k maps.FlowKey) bool {
	for _, f := range fs {
		if f.Key == k {
			return true
		}
	}
	return false
}
