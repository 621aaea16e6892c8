package test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mhbpf/mhbpf/internal/daemontest"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/testutil"
	"github.com/mhbpf/mhbpf/internal/topology"
)

// pppLink is one real pppd session between the router namespace and an ISP
// namespace, over a pty: the router's end is pppN (no Ethernet header),
// the ISP's is ppp1N.
type pppLink struct {
	cmd  *exec.Cmd
	unit int
	log  string
}

func startPPP(t *testing.T, routerNS, ispNS string, unit int, local, peer string) *pppLink {
	t.Helper()
	dir := t.TempDir()
	l := &pppLink{unit: unit, log: filepath.Join(dir, "pppd.log")}
	far := fmt.Sprintf("ip netns exec %s pppd noauth notty nodetach local unit %d linkname %s-far %s:%s",
		ispNS, 10+unit, ispNS, peer, local)
	l.cmd = exec.Command("ip", "netns", "exec", routerNS, "pppd", "nodetach", "noauth", "nodefaultroute", "noipdefault",
		"local", fmt.Sprintf("%s:%s", local, peer), "unit", fmt.Sprint(unit), "linkname", routerNS+fmt.Sprint(unit),
		"logfile", l.log, "pty", far)
	if err := l.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.stop() })
	return l
}

func (l *pppLink) stop() {
	topology.Stop(l.cmd, 5*time.Second)
	l.cmd = nil
}

// The scenario's uplinks as they really are: pppd sessions (L3 framing,
// device routes, no gateway), on a kernel with PPP — the VM suite's 6.1,
// which also has no tcx, so the clsact attach path carries the traffic.
func TestPPPUplinks(t *testing.T) {
	topo, isp1, waitDev := pppUplinks(t)
	rt := topo.Router

	e := &daemonEnv{t: t, topo: topo, bin: daemontest.Binary(t), cfgPath: filepath.Join(t.TempDir(), "mhbpf.toml"),
		stateDir: filepath.Join(t.TempDir(), "state"), pinDir: filepath.Join("/sys/fs/bpf", testutil.UniqueName("mhbpf-test-")),
		cgroup: testutil.Cgroup(t)}
	e.writeConfig(fmt.Sprintf(`
[global]
pin_dir = %q
state_dir = %q
cgroup = %q
up_delay = "300ms"

[[uplink]]
name = "isp1"
interface = "ppp0"
weight = 8

[[uplink]]
name = "isp2"
interface = "ppp1"
weight = 2

[lan]
interfaces = ["eth2"]
bypass = ["100.64.2.0/24"]

[[policy]]
name = "to-isp2"
destinations = ["203.0.113.10/32"]
protocol = "tcp"
ports = [8001]
uplinks = ["isp2"]

[[policy]]
name = "to-isp1"
destinations = ["203.0.113.10/32"]
protocol = "tcp"
ports = [8002]
uplinks = ["isp1"]
last_resort = "unreachable"
`, e.pinDir, e.stateDir, e.cgroup))
	e.checkAtEnd() // no ERROR in the daemon's log, 'mhbpf down' clean
	for ns, name := range map[string]string{topo.ISP1: "isp1", topo.ISP2: "isp2"} {
		for _, port := range []uint16{8000, 8001, 8002} {
			srv, err := topo.Serve(ns, name, topology.Internet, port)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(srv.Close)
		}
	}
	e.start()
	e.waitFor("multipath over the ppp links", 10*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	// The attach path is the kernel's: clsact before 6.6 (the VM's 6.1),
	// tcx from 6.6 on; the status and the log say which.
	mode := string(loader.ModeTCX)
	if !testutil.KernelAtLeast(6, 6) {
		mode = string(loader.ModeClsact)
	}
	st, _ := e.mhbpf("status")
	t.Logf("%s", st)
	if !strings.Contains(st, "tc mode "+mode+",") || e.tcMode() != mode {
		t.Fatalf("kernel %s: want tc mode %s; log says %s, status:\n%s", testutil.KernelRelease(), mode, e.tcMode(), st)
	}
	upIn := "uplink_ingress"
	if mode == string(loader.ModeClsact) {
		upIn = "mhbpf_uplink"
	}
	// isp1 by policy: the server says isp1, and the program on ppp0 counted
	// the answer (what arrived on ppp0 went through it).
	viaISP1 := func(when string) {
		t.Helper()
		before := e.uplinkCounters(0)
		got, err := topo.Dial(topo.LAN, "", topology.Internet, 8002)
		if err != nil || got != "isp1 "+topology.LANHost.String() {
			t.Fatalf("%s: LAN by policy to isp1: %q, %v", when, got, err)
		}
		after := e.uplinkCounters(0)
		if after.RxPackets <= before.RxPackets || after.NewFlows <= before.NewFlows {
			t.Fatalf("%s: isp1's counters %+v -> %+v: ppp0's program saw nothing of the connection", when, before, after)
		}
		if progs := e.tcPrograms(mode, "ppp0", false); !strings.Contains(progs, upIn) {
			t.Fatalf("%s: ppp0 ingress has %q, want %s", when, progs, upIn)
		}
	}
	viaISP1("at the start")

	// A LAN host by policy to isp2, through ppp1's L3 framing both ways.
	got, err := topo.Dial(topo.LAN, "", topology.Internet, 8001)
	if err != nil || got != "isp2 "+topology.LANHost.String() {
		t.Fatalf("LAN by policy to isp2: %q, %v", got, err)
	}
	// The router's own connection, by policy to isp2, with isp2's address.
	got, err = topo.Dial(rt, e.cgroup, topology.Internet, 8001)
	if err != nil || got != "isp2 "+topology.ISP2Local.String() {
		t.Fatalf("router by policy to isp2: %q, %v", got, err)
	}

	// pppd of isp1 exits: ppp0 is unregistered, and with it main's whole
	// multipath route; the daemon puts one back over ppp1.
	isp1.stop()
	took := e.waitFor("main's route over ppp1 alone after pppd exited", 3*time.Second, func() bool { return e.mainVia("ppp1") })
	t.Logf("main route back over ppp1 %v after isp1's pppd exited", took)
	got, err = topo.Dial(topo.LAN, "", topology.Internet, 8000)
	if err != nil || got != "isp2 "+topology.LANHost.String() {
		t.Fatalf("LAN after isp1 went: %q, %v", got, err)
	}

	// pppd comes back: a new ppp0 (new ifindex), attached again, used again.
	startPPP(t, rt, topo.ISP1, 0, "100.64.0.2", "100.64.0.1")
	waitDev(rt, "ppp0")
	waitDev(topo.ISP1, "ppp10")
	if err := topo.IP(topo.ISP1, "route", "replace", topology.LANPrefix.String(), "dev", "ppp10"); err != nil {
		t.Fatal(err)
	}
	e.waitFor("multipath again", 10*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	// The new ppp0 carries traffic through mhbpf's program again: attached
	// to the new device, and chosen.
	viaISP1("after pppd came back")
	got, err = topo.Dial(rt, e.cgroup, topology.Internet, 8002)
	if err != nil || got != "isp1 "+topology.ISP1Local.String() {
		t.Fatalf("router by policy to isp1 after pppd came back: %q, %v", got, err)
	}
}

// pppUplinks is the small topology with its ppp0 and ppp1 veths replaced by
// real pppd sessions to the ISPs, up, with the ISPs' routes to the LAN over
// them. waitDev waits for a ppp device of a namespace to be up with its
// address.
func pppUplinks(t *testing.T) (topo *topology.Topology, isp1 *pppLink, waitDev func(ns, dev string)) {
	t.Helper()
	testutil.RequireRoot(t)
	if _, err := os.Stat("/dev/ppp"); err != nil {
		t.Skipf("SKIPPED LOUDLY: kernel %s has no PPP (/dev/ppp); this test runs in the VM suite (make test-vm)", testutil.KernelRelease())
	}
	if _, err := exec.LookPath("pppd"); err != nil {
		t.Fatal("pppd is not installed (make deps installs it)")
	}
	topo, err := topology.Build() // ppp0/ppp1 veths are replaced by pppd below
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(topo.Close)
	rt := topo.Router
	for _, dev := range []string{"ppp0", "ppp1"} {
		if err := topo.IP(rt, "link", "del", dev); err != nil {
			t.Fatal(err)
		}
	}
	isp1 = startPPP(t, rt, topo.ISP1, 0, "100.64.0.2", "100.64.0.1")
	startPPP(t, rt, topo.ISP2, 1, "100.64.1.2", "100.64.1.1")
	waitDev = func(ns, dev string) {
		t.Helper()
		// pppd sets the address before it brings the device up: a route
		// over it needs both.
		up := func() bool {
			out, _ := exec.Command("ip", "-n", ns, "-o", "link", "show", "dev", dev).CombinedOutput()
			return strings.Contains(string(out), ",UP") || strings.Contains(string(out), "<UP")
		}
		for start := time.Now(); time.Since(start) < 30*time.Second; time.Sleep(100 * time.Millisecond) {
			if out, _ := exec.Command("ip", "-n", ns, "-br", "addr", "show", "dev", dev).CombinedOutput(); strings.Contains(string(out), "100.64.") && up() {
				return
			}
		}
		log, _ := os.ReadFile(isp1.log)
		t.Fatalf("%s did not come up in %s; pppd log:\n%s", dev, ns, log)
	}
	waitDev(rt, "ppp0")
	waitDev(rt, "ppp1")
	waitDev(topo.ISP1, "ppp10")
	waitDev(topo.ISP2, "ppp11")
	for ns, dev := range map[string]string{topo.ISP1: "ppp10", topo.ISP2: "ppp11"} {
		if err := topo.IP(ns, "route", "replace", topology.LANPrefix.String(), "dev", dev); err != nil {
			t.Fatal(err)
		}
	}

	return topo, isp1, waitDev
}
