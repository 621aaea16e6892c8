package test

import (
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/mhbpf/mhbpf/internal/daemontest"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/testutil"
	"github.com/mhbpf/mhbpf/internal/topology"
)

// Drift: other software removes what mhbpf installed, and the daemon puts
// it back within 2 s (measured from the removal) and logs what it repaired.

const toISP2 = `
[[policy]]
name = "to-isp2"
destinations = ["203.0.113.10/32"]
uplinks = ["isp2"]
`

// Restarting nftables.service on Debian runs 'nft flush ruleset': every
// table goes, mhbpf's masquerade with it, and the LAN is offline until the
// table is back.
func TestDaemonRestoresNFTablesAfterFlush(t *testing.T) {
	e := newDaemonEnv(t, "masquerade = true", `
[[policy]]
name = "to-isp1"
destinations = ["203.0.113.10/32"]
uplinks = ["isp1"]
`)
	srv, err := e.topo.Serve(e.topo.ISP1, "isp1", topology.Internet, 8006)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	masqueraded := func(when string) {
		t.Helper()
		got, err := e.topo.Dial(e.topo.LAN, "", topology.Internet, 8006)
		if err != nil {
			t.Fatalf("%s: %v", when, err)
		}
		if name, peer := answer(got); name != "isp1" || peer != topology.ISP1Local {
			t.Fatalf("%s: server said %q, want isp1 seeing the router's isp1 address %s", when, got, topology.ISP1Local)
		}
	}
	masqueraded("before the flush")
	table := func() string {
		out, _ := e.inRouter("nft", "list", "table", "inet", "mhbpf").CombinedOutput()
		return string(out)
	}
	want := table()
	if !strings.Contains(want, "masquerade") || !strings.Contains(want, "maxseg") {
		t.Fatalf("no masquerade and MSS clamping in mhbpf's table:\n%s", want)
	}

	// The WARN line of the repair shows that the table was really gone
	// (a repair can be quicker than a look with nft).
	repairs := func() int {
		return strings.Count(daemontest.Lines(e.log.String(), "level=WARN"), "nft table inet mhbpf")
	}
	for round, breakIt := range []struct {
		what string
		args []string
	}{
		{"nft flush ruleset", []string{"nft", "flush", "ruleset"}},
		{"a rule of mhbpf's deleted", []string{"nft", "flush", "chain", "inet", "mhbpf", "postrouting"}},
		{"the table flushed again", []string{"nft", "flush", "ruleset"}},
	} {
		n := repairs()
		if out, err := e.inRouter(breakIt.args...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", breakIt.what, err, out)
		}
		took := e.waitFor("mhbpf's table back after "+breakIt.what, 2*time.Second, func() bool { return table() == want })
		e.waitFor("the WARN line of the repair after "+breakIt.what, 500*time.Millisecond, func() bool { return repairs() > n })
		t.Logf("round %d: table back %v after %s", round+1, took, breakIt.what)
		masqueraded("after " + breakIt.what)
	}
	t.Logf("%s", daemontest.Lines(e.log.String(), "level=WARN"))
	if n := repairs(); n != 3 {
		t.Fatalf("%d WARN lines about the nft table, want one per repair (3):\n%s", n, e.log.String())
	}
	// Repairing is not a loop: a settled daemon leaves the table alone.
	before := e.log.String()
	time.Sleep(2500 * time.Millisecond) // one periodic resync
	if after := e.log.String()[len(before):]; strings.Contains(after, "nft table") {
		t.Fatalf("the daemon rewrote a table nobody touched:\n%s", after)
	}
}

// tcMode is the attach mechanism the daemon reported when it attached.
func (e *daemonEnv) tcMode() string {
	e.t.Helper()
	m := regexp.MustCompile(`msg=attached .* mode=(\w+)`).FindStringSubmatch(e.log.String())
	if m == nil {
		e.t.Fatalf("no attach mode in the log:\n%s", e.log.String())
	}
	return m[1]
}

// tcPrograms lists the names of the programs on ifname's hook in the
// router: tcx programs, or cls_bpf filters (tc's listing) in clsact mode.
func (e *daemonEnv) tcPrograms(mode, ifname string, egress bool) string {
	e.t.Helper()
	if mode == string(loader.ModeClsact) {
		dir := "ingress"
		if egress {
			dir = "egress"
		}
		out, _ := e.inRouter("tc", "filter", "show", "dev", ifname, dir).CombinedOutput()
		return string(out)
	}
	attach := ebpf.AttachTCXIngress
	if egress {
		attach = ebpf.AttachTCXEgress
	}
	var names []string
	testutil.InNetNS(e.t, e.topo.Router, func() {
		l, err := netlink.LinkByName(ifname)
		if err != nil {
			e.t.Fatal(err)
		}
		res, err := link.QueryPrograms(link.QueryOptions{Target: l.Attrs().Index, Attach: attach})
		if err != nil {
			e.t.Fatal(err)
		}
		for _, p := range res.Programs {
			prog, err := ebpf.NewProgramFromID(p.ID)
			if err != nil {
				continue
			}
			info, _ := prog.Info()
			prog.Close()
			names = append(names, info.Name)
		}
	})
	return strings.Join(names, " ")
}

// newFlows is the datapath's count of new flows given to an uplink.
func (e *daemonEnv) newFlows(id int) uint64 {
	e.t.Helper()
	return e.uplinkCounters(id).NewFlows
}

// uplinkCounters are the datapath's counters of an uplink (by its slot).
func (e *daemonEnv) uplinkCounters(id int) maps.Counters {
	e.t.Helper()
	m, err := loader.OpenPinned(e.pinDir)
	if err != nil {
		e.t.Fatal(err)
	}
	defer m.Close()
	c, err := m.UplinkCounters(id)
	if err != nil {
		e.t.Fatal(err)
	}
	return c
}

// steered: a LAN connection to the internet takes isp2, its policy's
// uplink, and the datapath counts it as a new flow of isp2 (so it was the
// LAN program that chose, not main's multipath route by chance).
func (e *daemonEnv) steered(when string) {
	e.t.Helper()
	n := e.newFlows(1)
	got, err := e.topo.Dial(e.topo.LAN, "", topology.Internet, 8000)
	if err != nil {
		e.t.Fatalf("%s: %v", when, err)
	}
	if name, peer := answer(got); name != "isp2" || peer != topology.LANHost {
		e.t.Fatalf("%s: server said %q, want isp2 seeing %s", when, got, topology.LANHost)
	}
	if m := e.newFlows(1); m <= n {
		e.t.Fatalf("%s: isp2's new flows %d -> %d: the LAN program did not choose", when, n, m)
	}
}

func (e *daemonEnv) serveBoth(port uint16) {
	e.t.Helper()
	for ns, name := range map[string]string{e.topo.ISP1: "isp1", e.topo.ISP2: "isp2"} {
		srv, err := e.topo.Serve(ns, name, topology.Internet, port)
		if err != nil {
			e.t.Fatal(err)
		}
		e.t.Cleanup(srv.Close)
	}
}

// A QoS script deletes the clsact qdisc (clsact mode), or something
// detaches or unpins a tcx link (tcx mode): the datapath is back on that
// interface within 2 s and steers again.
func TestDaemonRepairsDetachedTC(t *testing.T) {
	e := newDaemonEnv(t, "", toISP2)
	e.serveBoth(8000)
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	e.steered("before")
	mode := e.tcMode()
	t.Logf("tc mode %s", mode)
	lanIn, lanEg, upIn := "lan_ingress", "lan_egress", "uplink_ingress"
	if mode == string(loader.ModeClsact) {
		lanIn, lanEg, upIn = "mhbpf_lan ", "mhbpf_lan_egress", "mhbpf_uplink"
	}
	intact := func() bool {
		return strings.Contains(e.tcPrograms(mode, "eth2", false), lanIn) &&
			strings.Contains(e.tcPrograms(mode, "eth2", true), lanEg) &&
			strings.Contains(e.tcPrograms(mode, "ppp1", false), upIn)
	}
	if !intact() {
		t.Fatalf("programs not attached at the start: eth2 ingress %q egress %q, ppp1 %q",
			e.tcPrograms(mode, "eth2", false), e.tcPrograms(mode, "eth2", true), e.tcPrograms(mode, "ppp1", false))
	}
	pin := func(name string) string { return filepath.Join(e.pinDir, "links", name) }
	type breakage struct {
		what string
		do   func() error
	}
	var rounds []breakage
	if mode == string(loader.ModeClsact) {
		qdiscDel := func(dev string) func() error {
			return func() error {
				out, err := e.inRouter("tc", "qdisc", "del", "dev", dev, "clsact").CombinedOutput()
				if err != nil {
					t.Logf("%s", out)
				}
				return err
			}
		}
		rounds = []breakage{
			{"tc qdisc del dev eth2 clsact", qdiscDel("eth2")},
			{"tc qdisc del dev ppp1 clsact", qdiscDel("ppp1")},
			{"tc filter del dev eth2 ingress", func() error {
				return e.inRouter("tc", "filter", "del", "dev", "eth2", "ingress").Run()
			}},
		}
	} else {
		// The daemon holds no file descriptor of its links: a pin is all
		// that keeps one alive, so unpinning and closing destroys it.
		unpin := func(name string) func() error {
			return func() error {
				l, err := link.LoadPinnedLink(pin(name), nil)
				if err != nil {
					return err
				}
				defer l.Close()
				return l.Unpin()
			}
		}
		// BPF_LINK_DETACH (bpftool link detach): the pin stays, the link
		// is attached to nothing.
		detach := func(name string) func() error {
			return func() error {
				l, err := link.LoadPinnedLink(pin(name), nil)
				if err != nil {
					return err
				}
				defer l.Close()
				return l.Detach()
			}
		}
		rounds = []breakage{
			{"eth2's tcx ingress link unpinned and closed", unpin("tc-eth2")},
			{"eth2's tcx egress link detached", detach("tce-eth2")},
			{"ppp1's tcx link detached", detach("tc-ppp1")},
		}
	}
	// A repair can be quicker than a look with tc: the WARN line of the
	// repair is what shows that something was gone.
	repairs := func() int { return strings.Count(daemontest.Lines(e.log.String(), "level=WARN"), "reattached") }
	for _, r := range rounds {
		n := repairs()
		if err := r.do(); err != nil {
			t.Fatalf("%s: %v", r.what, err)
		}
		took := e.waitFor("the datapath back after "+r.what, 2*time.Second, intact)
		e.waitFor("the WARN line of the repair after "+r.what, 500*time.Millisecond, func() bool { return repairs() > n })
		t.Logf("programs back %v after %s", took, r.what)
		e.steered("after " + r.what)
	}
	t.Logf("%s", daemontest.Lines(e.log.String(), "level=WARN"))
	if n := repairs(); n != len(rounds) {
		t.Fatalf("%d WARN lines about reattaching, want one per repair (%d):\n%s", n, len(rounds), e.log.String())
	}
	// Settled: no repair without a cause.
	before := e.log.String()
	time.Sleep(2500 * time.Millisecond)
	if after := e.log.String()[len(before):]; strings.Contains(after, "reattached") {
		t.Fatalf("the daemon reattached what nobody touched:\n%s", after)
	}
}

// The socket hooks' cgroup links are unpinned and closed, or detached: the
// router's own connections are steered again within 2 s.
func TestDaemonRepairsDetachedSocketHooks(t *testing.T) {
	e := newDaemonEnv(t, "", toISP2)
	e.serveBoth(8000)
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	// The router's own connection takes isp2, with isp2's address, and the
	// connect4 hook counts it (not main's multipath route by chance).
	own := func(when string) {
		t.Helper()
		n := e.newFlows(1)
		got, err := e.topo.Dial(e.topo.Router, e.cgroup, topology.Internet, 8000)
		if err != nil {
			t.Fatalf("%s: %v", when, err)
		}
		if name, peer := answer(got); name != "isp2" || peer != topology.ISP2Local {
			t.Fatalf("router's own connection %s: server said %q, want isp2 seeing %s", when, got, topology.ISP2Local)
		}
		if m := e.newFlows(1); m <= n {
			t.Fatalf("router's own connection %s: isp2's new flows %d -> %d: the socket hook did not choose", when, n, m)
		}
	}
	own("before")
	hooked := func() bool {
		for _, h := range []string{"connect4", "connect6", "sendmsg4", "sendmsg6"} {
			l, err := link.LoadPinnedLink(filepath.Join(e.pinDir, "links", "cgroup-"+h), nil)
			if err != nil {
				return false
			}
			info, err := l.Info()
			l.Close()
			if err != nil || info.Cgroup() == nil || info.Cgroup().CgroupId == 0 {
				return false
			}
		}
		return true
	}
	if !hooked() {
		t.Fatal("socket hooks not attached at the start")
	}
	repairs := func() int {
		return strings.Count(daemontest.Lines(e.log.String(), "level=WARN"), "socket hook links were gone")
	}
	for _, r := range []struct {
		what string
		do   func(link.Link) error
	}{
		{"connect4 unpinned and closed", func(l link.Link) error { return l.Unpin() }},
		{"connect4 detached", func(l link.Link) error { return l.Detach() }},
	} {
		n := repairs()
		l, err := link.LoadPinnedLink(filepath.Join(e.pinDir, "links", "cgroup-connect4"), nil)
		if err != nil {
			t.Fatal(err)
		}
		err = r.do(l)
		l.Close()
		if err != nil {
			t.Fatalf("%s: %v", r.what, err)
		}
		took := e.waitFor("socket hooks back after "+r.what, 2*time.Second, hooked)
		e.waitFor("the WARN line of the repair after "+r.what, 500*time.Millisecond, func() bool { return repairs() > n })
		t.Logf("socket hooks back %v after %s", took, r.what)
		own("after " + r.what)
	}
	t.Logf("%s", daemontest.Lines(e.log.String(), "level=WARN"))
	if n := repairs(); n != 2 {
		t.Fatalf("%d WARN lines about the socket hooks, want one per repair:\n%s", n, e.log.String())
	}
}
