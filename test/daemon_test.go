package test

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/daemontest"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/testutil"
	"github.com/mhbpf/mhbpf/internal/topology"
)

func TestMain(m *testing.M) {
	// Some tests run this binary again as a client in a namespace: then it
	// is that client, and no test (a helper "test" would show as a skip).
	if spec := os.Getenv("MHBPF_DIAL_MANY"); spec != "" {
		os.Exit(helperDialMany(spec))
	}
	if target := os.Getenv("MHBPF_MARKED_DIAL"); target != "" {
		os.Exit(helperMarkedDial(target))
	}
	code := m.Run()
	daemontest.RemoveBinary()
	os.Exit(code)
}

type daemonEnv struct {
	t        *testing.T
	topo     *topology.Topology
	bin      string
	cfgPath  string
	stateDir string
	pinDir   string
	cgroup   string
	cmd      *exec.Cmd
	log      *daemontest.Log
	wrap     []string // runs the daemon through this (e.g. setpriv)
	env      []string // added to the daemon's environment
	// expectErrors: the test provokes errors the daemon must log; any
	// other test fails on an ERROR line in the daemon's log.
	expectErrors bool
	logs         []string // logs of earlier daemon processes of this test
}

const daemonConfig = `
[global]
pin_dir = %q
state_dir = %q
cgroup = %q
up_delay = "300ms"
resync_every = "2s"

[[uplink]]
name = "isp1"
interface = "ppp0"
gateway = "100.64.0.1"
gateway6 = "2001:db8:0:1::1"
weight = 8
%s

[[uplink]]
name = "isp2"
interface = "ppp1"
gateway = "100.64.1.1"
gateway6 = "2001:db8:0:2::1"
weight = 2

[lan]
interfaces = ["eth2"]
bypass = ["100.64.2.0/24", "2001:db8:0:3::/64"]
%s
`

// newDaemonEnv builds the topology and writes a configuration; isp1Extra
// goes into isp1's table, extra at the end of the file.
func newDaemonEnv(t *testing.T, isp1Extra, extra string) *daemonEnv {
	t.Helper()
	testutil.RequireRoot(t)
	topo, err := topology.Build()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(topo.Close)
	dir := t.TempDir()
	e := &daemonEnv{t: t, topo: topo, bin: daemontest.Binary(t), cfgPath: filepath.Join(dir, "mhbpf.toml"),
		stateDir: filepath.Join(dir, "state"), pinDir: filepath.Join("/sys/fs/bpf", testutil.UniqueName("mhbpf-test-")),
		cgroup: testutil.Cgroup(t)}
	e.writeConfig(fmt.Sprintf(daemonConfig, e.pinDir, e.stateDir, e.cgroup, isp1Extra, extra))
	e.checkAtEnd()
	return e
}

// checkAtEnd registers what every daemon test ends with: the daemon
// stopped, no ERROR line in the logs of any of its processes (unless the
// test provokes them), 'mhbpf down' clean, the pins gone.
func (e *daemonEnv) checkAtEnd() {
	t := e.t
	t.Cleanup(func() {
		e.stop()
		if !e.expectErrors {
			daemontest.CheckNoErrors(t, strings.Join(append(e.logs, logOf(e.log)), "\n"))
		}
		e.daemon().Down(t)
	})
}

// daemon is where the daemon runs, for the harness's commands.
func (e *daemonEnv) daemon() daemontest.Daemon {
	return daemontest.Daemon{Bin: e.bin, Netns: e.topo.Router, StateDir: e.stateDir, PinDir: e.pinDir}
}

func (e *daemonEnv) writeConfig(text string) {
	e.t.Helper()
	if err := os.WriteFile(e.cfgPath, []byte(text), 0o644); err != nil {
		e.t.Fatal(err)
	}
}

// inRouter runs a command in the router's network namespace.
func (e *daemonEnv) inRouter(args ...string) *exec.Cmd {
	return daemontest.InNetns(e.topo.Router, args...)
}

func (e *daemonEnv) mhbpf(args ...string) (string, error) {
	return e.daemon().CLI(args...)
}

func logOf(b *daemontest.Log) string {
	if b == nil {
		return ""
	}
	return b.String()
}

func (e *daemonEnv) start() {
	e.t.Helper()
	if e.log != nil {
		e.logs = append(e.logs, e.log.String())
	}
	e.log = &daemontest.Log{}
	e.cmd = e.inRouter(append(append([]string{}, e.wrap...), e.bin, "run", "--debug", "--config", e.cfgPath)...)
	e.cmd.Stdout, e.cmd.Stderr = e.log, e.log
	if len(e.env) > 0 {
		e.cmd.Env = append(os.Environ(), e.env...)
	}
	if err := e.cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	// nsenter and setpriv exec the daemon: its pid is the command's.
	pid := e.cmd.Process.Pid
	e.waitFor("the daemon's first pass", 10*time.Second, func() bool {
		_, running := e.daemon().Running(pid)
		return running
	})
}

func (e *daemonEnv) stop() {
	topology.Stop(e.cmd, 5*time.Second)
	e.cmd = nil
}

func (e *daemonEnv) kill9() {
	_ = e.cmd.Process.Kill()
	_ = e.cmd.Wait()
	e.cmd = nil
}

func (e *daemonEnv) waitFor(what string, limit time.Duration, ok func() bool) time.Duration {
	e.t.Helper()
	return e.waitFrom(time.Now(), what, limit, ok)
}

// waitFrom waits until ok, at most limit from start: the moment of the
// event whose effect the limit is a requirement for (taken just before
// the command that causes it), not the first poll, so that the time the
// command itself took counts against the limit.
func (e *daemonEnv) waitFrom(start time.Time, what string, limit time.Duration, ok func() bool) time.Duration {
	e.t.Helper()
	took, err := daemontest.Until(start, testutil.Deadline(limit), 10*time.Millisecond, nil, ok)
	if err != nil {
		e.t.Fatalf("%s: %v\nrules:\n%s\nroutes:\n%s\ndaemon log:\n%s", what, err,
			e.ip("rule"), e.ip("route", "show", "table", "all"), logOf(e.log))
	}
	return took
}

func (e *daemonEnv) ip(args ...string) string {
	out, _ := exec.Command("ip", append([]string{"-n", e.topo.Router}, args...)...).CombinedOutput()
	return string(out)
}

func (e *daemonEnv) defaultRoute() string {
	return strings.TrimSpace(e.ip("route", "show", "default"))
}

// mainVia reports whether main's default route goes through exactly the
// given devices.
func (e *daemonEnv) mainVia(devs ...string) bool {
	r := e.defaultRoute()
	if r == "" {
		return len(devs) == 0
	}
	n := strings.Count(r, " dev ")
	if n != len(devs) {
		return false
	}
	for _, d := range devs {
		if !strings.Contains(r, "dev "+d+" ") && !strings.HasSuffix(r, "dev "+d) {
			return false
		}
	}
	return true
}

// snapshot is the routing state of the router namespace that mhbpf may
// touch, as text.
func (e *daemonEnv) snapshot() string {
	var b strings.Builder
	for _, args := range [][]string{
		{"ip", "rule"}, {"ip", "-6", "rule"}, {"ip", "route", "show", "table", "all"}, {"ip", "-6", "route", "show", "table", "all"},
		{"nft", "list", "ruleset"},
		{"tc", "filter", "show", "dev", "ppp0", "ingress"}, {"tc", "filter", "show", "dev", "ppp1", "ingress"},
		{"tc", "filter", "show", "dev", "eth2", "ingress"}, {"tc", "qdisc", "show"},
		{"sysctl", "net.ipv4.ip_forward", "net.ipv4.tcp_fwmark_accept", "net.ipv4.fwmark_reflect", "net.ipv6.fwmark_reflect",
			"net.ipv4.conf.all.rp_filter", "net.ipv4.conf.ppp0.rp_filter", "net.ipv4.conf.ppp1.rp_filter", "net.ipv6.conf.all.forwarding"},
	} {
		out, _ := e.inRouter(args...).CombinedOutput()
		fmt.Fprintf(&b, "$ %s\n", strings.Join(args, " "))
		for _, line := range strings.SplitAfter(string(out), "\n") {
			// The kernel adds IPv6 link-local and multicast routes (when
			// duplicate address detection ends, or a link comes back) on its
			// own schedule and in its own order: not mhbpf's doing.
			if !strings.Contains(line, "fe80::") && !strings.Contains(line, "ff00::/8") {
				b.WriteString(line)
			}
		}
	}
	entries, _ := os.ReadDir(e.pinDir)
	fmt.Fprintf(&b, "pins: %d\n", len(entries))
	return b.String()
}

func TestDaemonInstallsTheMarkScheme(t *testing.T) {
	e := newDaemonEnv(t, "", "")
	// Strict reverse-path filtering everywhere (conf.all), but off on
	// ppp1: the uplinks come out loose, ppp1 included (the greater of the
	// two counts), the LAN keeps its strict check.
	for _, kv := range []string{"net.ipv4.conf.all.rp_filter=1", "net.ipv4.conf.ppp1.rp_filter=0"} {
		if out, err := e.inRouter("sysctl", "-qw", kv).CombinedOutput(); err != nil {
			t.Fatalf("%v %s", err, out)
		}
	}
	e.start()
	e.waitFor("main's multipath default route", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	r := e.defaultRoute()
	if !strings.Contains(r, "weight 8") || !strings.Contains(r, "weight 2") || !strings.Contains(r, "proto 77") {
		t.Fatalf("main default route %q, want weights 8 and 2, proto 77", r)
	}
	// The whole layout, as the kernel lists it: answers by their arrival
	// uplink first, then main's routes more specific than default, then
	// the uplink tables by source and by mark, then fail closed.
	const wantRules = `10000:	from all iif ppp0 lookup main proto 77
10001:	from all iif ppp1 lookup main proto 77
10016:	from all to 100.64.2.0/24 lookup main proto 77
10020:	from all fwmark 0x410000/0x410000 lookup 100 proto 77
10021:	from all fwmark 0x420000/0x420000 lookup 101 proto 77
10036:	from all lookup main suppress_prefixlength 1 proto 77
10040:	from 100.64.0.2 lookup 100 proto 77
10041:	from 100.64.1.2 lookup 101 proto 77
10060:	from all fwmark 0x10000/0x10000 lookup 100 proto 77
10061:	from all fwmark 0x20000/0x20000 lookup 101 proto 77
10080:	from all fwmark 0x800000/0x800000 unreachable proto 77
`
	const wantRules6 = `10000:	from all iif ppp0 lookup main proto 77
10001:	from all iif ppp1 lookup main proto 77
10016:	from all to 2001:db8:0:3::/64 lookup main proto 77
10020:	from all fwmark 0x410000/0x410000 lookup 100 proto 77
10021:	from all fwmark 0x420000/0x420000 lookup 101 proto 77
10036:	from all lookup main suppress_prefixlength 1 proto 77
10040:	from 2001:db8:0:1::2 lookup 100 proto 77
10041:	from 2001:db8:0:2::2 lookup 101 proto 77
10060:	from all fwmark 0x10000/0x10000 lookup 100 proto 77
10061:	from all fwmark 0x20000/0x20000 lookup 101 proto 77
10080:	from all fwmark 0x800000/0x800000 unreachable proto 77
`
	if got := daemontest.Lines(e.ip("rule"), "proto 77") + "\n"; got != wantRules {
		t.Errorf("IPv4 rules:\n%s\nwant:\n%s", got, wantRules)
	}
	if got := daemontest.Lines(e.ip("-6", "rule"), "proto 77") + "\n"; got != wantRules6 {
		t.Errorf("IPv6 rules:\n%s\nwant:\n%s", got, wantRules6)
	}
	for table, dev := range map[string]string{"100": "ppp0", "101": "ppp1"} {
		if got := e.ip("route", "show", "table", table); !strings.Contains(got, "default via") || !strings.Contains(got, "dev "+dev) {
			t.Errorf("table %s: %q", table, got)
		}
		if got := e.ip("-6", "route", "show", "table", table); !strings.Contains(got, "default via") || !strings.Contains(got, "dev "+dev) {
			t.Errorf("IPv6 table %s: %q", table, got)
		}
	}
	if r := e.ip("-6", "route", "show", "default"); !strings.Contains(r, "weight 8") || !strings.Contains(r, "weight 2") {
		t.Errorf("IPv6 main default route %q, want weights 8 and 2", r)
	}
	for k, v := range map[string]string{"net.ipv4.ip_forward": "1", "net.ipv4.tcp_fwmark_accept": "1", "net.ipv4.fwmark_reflect": "1",
		"net.ipv4.conf.ppp0.rp_filter": "2", "net.ipv4.conf.ppp1.rp_filter": "2",
		"net.ipv4.conf.all.rp_filter": "1", "net.ipv4.conf.eth2.rp_filter": "0"} {
		out, _ := e.inRouter("sysctl", "-n", k).Output()
		if strings.TrimSpace(string(out)) != v {
			t.Errorf("sysctl %s = %q, want %s", k, out, v)
		}
	}
	// A second pass changes nothing: the reconciler is idempotent.
	before := e.snapshot()
	time.Sleep(2500 * time.Millisecond) // one periodic resync
	if after := e.snapshot(); after != before {
		t.Fatalf("state changed without cause:\n%s\n---\n%s\nlog:\n%s", before, after, e.log.String())
	}
	out, err := e.mhbpf("status")
	if err != nil || !strings.Contains(out, "isp1") || !strings.Contains(out, "running") {
		t.Fatalf("status: %v\n%s", err, out)
	}
	t.Logf("mhbpf status:\n%s", out)
}

// pppd going away unregisters ppp0, and the kernel deletes main's whole
// multipath default route with it: the daemon must put one back over ppp1.
func TestDaemonRestoresMainRouteWhenAnUplinkVanishes(t *testing.T) {
	e := newDaemonEnv(t, "", "")
	srv, err := e.topo.Serve(e.topo.ISP2, "isp2", topology.Internet, 8000)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })

	vanished := time.Now()
	if err := e.topo.IP(e.topo.Router, "link", "del", "ppp0"); err != nil {
		t.Fatal(err)
	}
	took := e.waitFrom(vanished, "main's default route via ppp1 alone", time.Second, func() bool { return e.mainVia("ppp1") })
	t.Logf("main route back over ppp1 %v after ppp0 vanished", took)
	got, err := e.topo.Dial(e.topo.LAN, "", topology.Internet, 8000)
	if err != nil || got != "isp2 "+topology.LANHost.String() {
		t.Fatalf("LAN traffic after losing ppp0: %q, %v", got, err)
	}
	if rules := e.ip("rule"); strings.Contains(rules, "100.64.0.2") {
		t.Fatalf("the vanished uplink's from rule stayed:\n%s", rules)
	}
}

// Someone (pppd, an admin) deletes mhbpf's default route: back within a
// second.
func TestDaemonRestoresDeletedRoute(t *testing.T) {
	e := newDaemonEnv(t, "", "")
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	for _, table := range []string{"main", "100"} {
		deleted := time.Now()
		if err := e.topo.IP(e.topo.Router, "route", "del", "default", "table", table); err != nil {
			t.Fatal(err)
		}
		took := e.waitFrom(deleted, "default route of table "+table+" back", time.Second, func() bool {
			return strings.Contains(e.ip("route", "show", "default", "table", table), "default")
		})
		t.Logf("table %s: default route back after %v", table, took)
	}
}

func TestDaemonTwoLinksAtOnce(t *testing.T) {
	e := newDaemonEnv(t, "", "")
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	batch := func(state string) {
		cmd := exec.Command("ip", "-n", e.topo.Router, "-batch", "-")
		cmd.Stdin = strings.NewReader(fmt.Sprintf("link set ppp0 %s\nlink set ppp1 %s\n", state, state))
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
	}
	down := time.Now()
	batch("down")
	e.waitFrom(down, "no default route with both links down", time.Second, func() bool { return e.mainVia() })
	for _, table := range []string{"100", "101"} {
		if got := e.ip("route", "show", "table", table); strings.Contains(got, "default") {
			t.Fatalf("table %s kept a route to a dead link: %s", table, got)
		}
	}
	batch("up")
	e.waitFor("both back (after up_delay)", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
}

// A link flapping 50 times in 10 seconds leaves exactly the rules and
// routes of a link that is simply up.
func TestDaemonFlapsLeaveNoDebris(t *testing.T) {
	e := newDaemonEnv(t, "", "")
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	settled := e.snapshot()
	for i := 0; i < 50; i++ {
		for _, s := range []string{"down", "up"} {
			if err := e.topo.IP(e.topo.Router, "link", "set", "ppp1", s); err != nil {
				t.Fatal(err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	var last string
	deadline := time.Now().Add(5 * time.Second)
	for last = e.snapshot(); last != settled && time.Now().Before(deadline); last = e.snapshot() {
		time.Sleep(50 * time.Millisecond)
	}
	if last != settled {
		t.Fatalf("not settled 5s after flapping:\n%s\n--- want ---\n%s\nlog:\n%s", last, settled, e.log.String())
	}
	if n := strings.Count(e.ip("rule"), "proto 77"); n != 11 {
		t.Fatalf("%d mhbpf rules after flapping, want 11 (2 iif, 1 LAN, 2 reply, 1 main, 2 from, 2 mark, 1 strict):\n%s", n, e.ip("rule"))
	}
}

// A bad configuration on SIGHUP is refused and changes nothing.
func TestDaemonBadReloadKeepsState(t *testing.T) {
	e := newDaemonEnv(t, "", "")
	e.expectErrors = true // the refusal is an error
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	before := e.snapshot()
	good, _ := os.ReadFile(e.cfgPath)
	e.writeConfig(strings.Replace(string(good), "weight = 2", "weight = 0", 1))
	if err := e.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	e.waitFor("the refusal in the log", 3*time.Second, func() bool {
		return strings.Contains(e.log.String(), "reload refused") && strings.Contains(e.log.String(), "weight 0 in a balanced tier")
	})
	time.Sleep(300 * time.Millisecond)
	if after := e.snapshot(); after != before {
		t.Fatalf("a refused reload changed the state:\n%s\n---\n%s", before, after)
	}
	if err := e.cmd.Process.Signal(syscall.Signal(0)); err != nil {
		t.Fatal("the daemon died on a bad reload")
	}
}

// A bad configuration at start: non-zero exit, a clear error, nothing changed.
func TestDaemonBadConfigAtStartChangesNothing(t *testing.T) {
	e := newDaemonEnv(t, "", "")
	before := e.snapshot()
	good, _ := os.ReadFile(e.cfgPath)
	e.writeConfig(strings.Replace(string(good), `interface = "ppp1"`, `interface = "ppp0"`, 1))
	out, err := e.inRouter(e.bin, "run", "--config", e.cfgPath).CombinedOutput()
	if err == nil {
		t.Fatal("daemon started with a bad config")
	}
	if !strings.Contains(string(out), "mhbpf.toml:") || !strings.Contains(string(out), "uplink[1].interface") {
		t.Fatalf("error does not name file, line and key: %s", out)
	}
	if after := e.snapshot(); after != before {
		t.Fatalf("a refused start changed the state:\n%s\n---\n%s", before, after)
	}
}

// kill -9, then 'mhbpf down': the namespace is as it was before mhbpf.
func TestDownAfterCrashRestoresEverything(t *testing.T) {
	e := newDaemonEnv(t, "masquerade = true", "")
	// Start from values mhbpf changes, so restoring is visible.
	for _, kv := range []string{"net.ipv4.ip_forward=0", "net.ipv4.tcp_fwmark_accept=0", "net.ipv4.conf.ppp0.rp_filter=1"} {
		if out, err := e.inRouter("sysctl", "-qw", kv).CombinedOutput(); err != nil {
			t.Fatalf("%v %s", err, out)
		}
	}
	before := e.snapshot()
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	if out, _ := e.inRouter("nft", "list", "table", "inet", "mhbpf").CombinedOutput(); !strings.Contains(string(out), "masquerade") {
		t.Fatalf("no masquerade table: %s", out)
	}
	e.kill9()
	if e.snapshot() == before {
		t.Fatal("nothing was installed, the test proves nothing")
	}
	for i := 0; i < 2; i++ { // idempotent
		if out, err := e.mhbpf("down"); err != nil {
			t.Fatalf("down %d: %v\n%s", i+1, err, out)
		}
		if after := e.snapshot(); after != before {
			t.Fatalf("after down %d:\n%s\n--- want ---\n%s", i+1, after, before)
		}
	}
	if _, err := os.Stat(e.pinDir); err == nil {
		t.Fatal("pin directory left behind")
	}
}

// kill -9 leaves the datapath pinned and forwarding; a new daemon, with
// other weights, takes over without moving a flow. Connections are held
// open throughout: TCP to a destination balanced per destination, TCP and
// UDP balanced per flow. The new weights are chosen so that a choice made
// afresh would put every one of them on the other uplink: if the restart
// lost the flows or the sticky map, a UDP datagram would be answered by
// the other ISP, a TCP segment would meet a reset, or (TCP mid-stream
// without a record passes unmarked) the record would be missing. Each
// record is compared before and after: the same one, still counting.
func TestDaemonRestartKeepsFlows(t *testing.T) {
	e := newDaemonEnv(t, "", perFlowPolicies)
	serveGreetEcho(t, e, 8030)
	serveGreetEcho(t, e, 8031)
	serveUDP(t, e, 8032)

	// The weights after the restart: the destination's choice (default
	// policy, id 0) and each chosen flow's would differ from now.
	destHash := stickyHash(0, modeDestination, netip.Addr{}, topology.Internet)
	w1, w2, ok := flipWeights(destHash)
	if !ok {
		t.Fatal("no weights move the destination to the other uplink")
	}
	destUplink := uplinkName(pick(destHash, 8, 2))
	t.Logf("203.0.113.10 on %s with weights 8:2, on %s with %d:%d", destUplink, uplinkName(pick(destHash, w1, w2)), w1, w2)

	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	var conns []*lanConn
	for i := 0; i < 3; i++ {
		h := lanConnect(t, e, protoTCP, 0, 8030)
		if h.uplink != destUplink {
			t.Fatalf("%v by %s, want %s: the test's model of the choice (choice_test.go) is wrong", h, h.uplink, destUplink)
		}
		conns = append(conns, h)
	}
	for _, c := range []struct {
		proto uint8
		port  uint16
		first uint16
	}{{protoTCP, 8031, 41000}, {protoUDP, 8032, 42000}} {
		for _, src := range flippingPorts(c.proto, c.port, w1, w2, c.first, 4) {
			h := lanConnect(t, e, c.proto, src, c.port)
			want := uplinkName(pick(flowHash(c.proto, h.key.Src, h.key.Dst), 8, 2))
			if h.uplink != want {
				t.Fatalf("%v by %s, want %s: the test's model of the choice (choice_test.go) is wrong", h, h.uplink, want)
			}
			conns = append(conns, h)
		}
	}
	before := flowsOf(t, e, conns)
	if out, err := e.mhbpf("flows"); err != nil {
		t.Fatalf("mhbpf flows: %v\n%s", err, out)
	} else {
		for _, h := range conns {
			if !strings.Contains(out, h.key.Src.String()+" ") {
				t.Fatalf("mhbpf flows does not list %v:\n%s", h, out)
			}
		}
	}

	e.kill9()
	for _, h := range conns {
		h.stillThere(t, "with the daemon killed")
	}
	e.setWeights(w1, w2)
	e.start()
	e.waitWeights(w1, w2)
	for _, h := range conns {
		h.stillThere(t, "after the restart with new weights")
	}
	after := flowsOf(t, e, conns)
	for _, h := range conns {
		b, a := before[h.key], after[h.key]
		if a.FirstSeen != b.FirstSeen || a.Uplink != b.Uplink || a.Mark != b.Mark || a.Origin != b.Origin || a.LastSeen < b.LastSeen {
			t.Fatalf("%v: the record was not kept across the restart:\nbefore %+v\nafter  %+v", h, b, a)
		}
	}

	// The stored choice of the destination is kept too: a new connection
	// to it takes its uplink, although the new weights would not.
	if h := lanConnect(t, e, protoTCP, 0, 8030); h.uplink != destUplink {
		t.Fatalf("new connection to the destination after the restart: by %s, want its stored %s", h.uplink, destUplink)
	}
	// And the new weights are in force: a new flow balanced per flow
	// takes the uplink they give it.
	src := flippingPorts(protoTCP, 8031, w1, w2, 43000, 1)[0]
	h := lanConnect(t, e, protoTCP, src, 8031)
	if want := uplinkName(pick(flowHash(protoTCP, h.key.Src, h.key.Dst), w1, w2)); h.uplink != want {
		t.Fatalf("new per-flow connection after the restart: by %s, want %s (weights %d:%d)", h.uplink, want, w1, w2)
	}
}

// The link stays up but the provider behind it drops everything: the
// probes notice and the uplink is taken out, then put back.
func TestDaemonHealthTakesOutSilentlyDeadUplink(t *testing.T) {
	probe := "198.51.100.53"
	e := newDaemonEnv(t, fmt.Sprintf(`
  [uplink.health]
  targets = [%q]
  interval = "100ms"
  timeout = "80ms"
  failures = 3
  successes = 2`, probe), "")
	if err := e.topo.IP(e.topo.ISP1, "addr", "add", probe+"/32", "dev", "lo"); err != nil {
		t.Fatal(err)
	}
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	// The far end stops answering; the link is untouched.
	if err := e.topo.IP(e.topo.ISP1, "addr", "del", probe+"/32", "dev", "lo"); err != nil {
		t.Fatal(err)
	}
	took := e.waitFor("isp1 out of main", 3*time.Second, func() bool { return e.mainVia("ppp1") })
	t.Logf("silent failure detected after %v", took)
	// Its table keeps the route: the probes need it to see the provider
	// come back. What matters is that nothing new is sent there.
	out, _ := e.mhbpf("uplinks")
	if !strings.Contains(out, "down") {
		t.Fatalf("the datapath still has isp1 up:\n%s", out)
	}
	out, _ = e.mhbpf("status")
	if !strings.Contains(out, "probes failing") {
		t.Fatalf("status does not say why:\n%s", out)
	}
	if err := e.topo.IP(e.topo.ISP1, "addr", "add", probe+"/32", "dev", "lo"); err != nil {
		t.Fatal(err)
	}
	e.waitFor("isp1 back", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
}

// IPv6 end to end: a LAN host's connection and the router's own (connect6
// hook) follow a policy to isp2; the server sees the LAN host's address
// and isp2's address respectively.
func TestDaemonIPv6Steering(t *testing.T) {
	e := newDaemonEnv(t, "", `
[[policy]]
name = "v6-to-isp2"
destinations = ["2001:db8:ff::10/128"]
uplinks = ["isp2"]
`)
	for ns, name := range map[string]string{e.topo.ISP1: "isp1", e.topo.ISP2: "isp2"} {
		srv, err := e.topo.Serve(ns, name, topology.Internet6, 8005)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(srv.Close)
	}
	e.start()
	e.waitFor("IPv6 multipath", 3*time.Second, func() bool {
		r := e.ip("-6", "route", "show", "default")
		return strings.Contains(r, "ppp0") && strings.Contains(r, "ppp1")
	})
	got, err := e.topo.Dial(e.topo.LAN, "", topology.Internet6, 8005)
	if err != nil {
		t.Fatal(err)
	}
	if name, peer := answer(got); name != "isp2" || peer != topology.LANHost6 {
		t.Fatalf("LAN IPv6 connection: server said %q, want isp2 seeing %s", got, topology.LANHost6)
	}
	got, err = e.topo.Dial(e.topo.Router, e.cgroup, topology.Internet6, 8005)
	if err != nil {
		t.Fatal(err)
	}
	if name, peer := answer(got); name != "isp2" || peer != topology.ISP2Local6 {
		t.Fatalf("router's own IPv6 connection: server said %q, want isp2 seeing %s", got, topology.ISP2Local6)
	}
	// Unconnected UDP over IPv6: the sendmsg6 hook picks isp2's source.
	for ns, name := range map[string]string{e.topo.ISP1: "isp1", e.topo.ISP2: "isp2"} {
		serveUDPAnswers(t, ns, name, topology.Internet6, 8006)
	}
	got, err = e.topo.Socat(e.topo.Router, e.cgroup, "hello\n", fmt.Sprintf("UDP6-SENDTO:[%s]:8006", topology.Internet6))
	if err != nil {
		t.Fatal(err)
	}
	if name, peer := answer(got); name != "isp2" || peer != topology.ISP2Local6 {
		t.Fatalf("router's own IPv6 datagram: server said %q, want isp2 seeing %s", got, topology.ISP2Local6)
	}
}

// answer splits a test server's "name peeraddr" (socat writes IPv6 peers
// bracketed and in full).
func answer(s string) (string, netip.Addr) {
	name, addr, _ := strings.Cut(s, " ")
	a, _ := netip.ParseAddr(strings.Trim(addr, "[]"))
	return name, a
}

// isp2's address is dynamic: when pppd comes back with another one, the
// "from" rule and the uplinks map follow it.
func TestDaemonFollowsAddressChange(t *testing.T) {
	e := newDaemonEnv(t, "", "")
	e.start()
	e.waitFor("from rule of the first address", 3*time.Second, func() bool {
		return strings.Contains(e.ip("rule"), "from 100.64.1.2 lookup 101")
	})
	rt := e.topo.Router
	changed := time.Now()
	if err := e.topo.IP(rt, "addr", "del", "100.64.1.2/30", "dev", "ppp1"); err != nil {
		t.Fatal(err)
	}
	if err := e.topo.IP(rt, "addr", "add", "100.64.1.6/30", "dev", "ppp1"); err != nil {
		t.Fatal(err)
	}
	took := e.waitFrom(changed, "from rule of the new address", time.Second, func() bool {
		r := e.ip("rule")
		return strings.Contains(r, "from 100.64.1.6 lookup 101") && !strings.Contains(r, "100.64.1.2")
	})
	t.Logf("new address followed after %v", took)
	out, _ := e.mhbpf("uplinks")
	if !strings.Contains(out, "up") {
		t.Fatalf("uplinks: %s", out)
	}
	st, _ := e.mhbpf("status")
	if !strings.Contains(st, "100.64.1.6") {
		t.Fatalf("status does not show the new address:\n%s", st)
	}
}

// Masquerade: what leaves by a masquerading uplink carries its address,
// IPv4 and IPv6 (the table is family inet).
func TestDaemonMasquerade(t *testing.T) {
	e := newDaemonEnv(t, "masquerade = true", `
[[policy]]
name = "to-isp1"
destinations = ["203.0.113.10/32", "2001:db8:ff::10/128"]
uplinks = ["isp1"]
`)
	for _, a := range []netip.Addr{topology.Internet, topology.Internet6} {
		srv, err := e.topo.Serve(e.topo.ISP1, "isp1", a, 8006)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(srv.Close)
	}
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	got, err := e.topo.Dial(e.topo.LAN, "", topology.Internet, 8006)
	if err != nil {
		t.Fatal(err)
	}
	if name, peer := answer(got); name != "isp1" || peer != topology.ISP1Local {
		t.Fatalf("server said %q, want isp1 seeing the router's isp1 address %s", got, topology.ISP1Local)
	}
	got, err = e.topo.Dial(e.topo.LAN, "", topology.Internet6, 8006)
	if err != nil {
		t.Fatal(err)
	}
	if name, peer := answer(got); name != "isp1" || peer != topology.ISP1Local6 {
		t.Fatalf("IPv6: server said %q, want isp1 seeing the router's isp1 address %s (NAT66)", got, topology.ISP1Local6)
	}
}

// Probes by TCP connect, and the metrics endpoint shows the verdict.
func TestDaemonTCPHealthAndMetrics(t *testing.T) {
	e := newDaemonEnv(t, `
  [uplink.health]
  method = "tcp"
  port = 8007
  targets = ["203.0.113.10"]
  interval = "100ms"
  timeout = "80ms"
  failures = 2
  successes = 1`, "")
	e.withMetrics()
	srv, err := e.topo.Serve(e.topo.ISP1, "probe", topology.Internet, 8007)
	if err != nil {
		t.Fatal(err)
	}
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	metrics := e.metricsText
	if m := metrics(); !strings.Contains(m, `mhbpf_uplink_up{interface="ppp0",uplink="isp1"} 1`) {
		t.Fatalf("metrics:\n%s", m)
	}
	srv.Close() // the probed service goes away; the link stays
	e.waitFor("isp1 out after TCP probes fail", 3*time.Second, func() bool { return e.mainVia("ppp1") })
	// The pass that changes main's route publishes the metrics at its end:
	// a scrape in between may still see the old verdict.
	var m string
	ok := func() bool {
		m = metrics()
		return strings.Contains(m, `mhbpf_uplink_up{interface="ppp0",uplink="isp1"} 0`) &&
			strings.Contains(m, `mhbpf_uplink_new_flows_total{uplink="isp2"}`)
	}
	for end := time.Now().Add(testutil.Deadline(time.Second)); !ok(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("metrics after the failure:\n%s", m)
		}
	}
}

func TestCheckCommand(t *testing.T) {
	bin := daemontest.Binary(t)
	out, err := exec.Command(bin, "check", "../internal/config/scenario.toml").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "ok: 3 uplinks, 1 LAN interfaces, 4 policies") {
		t.Fatalf("check of the scenario: %v\n%s", err, out)
	}
	bad := filepath.Join(t.TempDir(), "bad.toml")
	if err := os.WriteFile(bad, []byte("[[uplink]]\nname = \"a\"\ninterface = \"ppp0\"\nweight = 0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err = exec.Command(bin, "check", bad).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "bad.toml:4: uplink[0].weight: weight 0 in a balanced tier") {
		t.Fatalf("check of a bad file: %v\n%s", err, out)
	}
}

// A good reload takes effect without a restart: new weights reach main's
// route and the datapath.
func TestDaemonGoodReload(t *testing.T) {
	e := newDaemonEnv(t, "", "")
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	good, _ := os.ReadFile(e.cfgPath)
	e.writeConfig(strings.Replace(string(good), "weight = 2", "weight = 6", 1))
	if err := e.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	e.waitFor("weight 6 in main's route", 3*time.Second, func() bool {
		return strings.Contains(e.defaultRoute(), "weight 6")
	})
	m, err := loader.OpenPinned(e.pinDir)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if u, err := m.LookupUplink(1); err != nil || u.Weight != 6 || !u.Up {
		t.Fatalf("datapath's isp2 after reload: %+v %v", u, err)
	}
	if !strings.Contains(e.log.String(), "configuration reloaded") {
		t.Fatalf("no reload in the log:\n%s", e.log.String())
	}
}

// Pinned maps outlive the daemon: an uplink slot a former configuration
// used must not stay "up" for the datapath to choose.
func TestDaemonClearsStaleUplinkSlots(t *testing.T) {
	e := newDaemonEnv(t, "", "")
	d, err := loader.Load(loader.Options{PinDir: e.pinDir, NetnsCookie: testutil.NetnsCookie(t, e.topo.Router)})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Maps.SetUplink(5, maps.Uplink{Mark: 0x200000, Weight: 50, Up: true}); err != nil {
		t.Fatal(err)
	}
	d.Close()
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	m, err := loader.OpenPinned(e.pinDir)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if u, err := m.LookupUplink(5); err != nil || u.Up || u.Mark != 0 {
		t.Fatalf("stale slot 5: %+v %v", u, err)
	}
}

// teardown_on_exit: SIGTERM removes everything, like 'mhbpf down'.
func TestDaemonTeardownOnExit(t *testing.T) {
	e := newDaemonEnv(t, "masquerade = true", "")
	cfg, _ := os.ReadFile(e.cfgPath)
	e.writeConfig(strings.Replace(string(cfg), "[global]\n", "[global]\nteardown_on_exit = true\n", 1))
	e.addForeignDefaults("ppp0") // replaced by mhbpf's, put back at exit
	before := e.snapshot()
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	if e.snapshot() == before {
		t.Fatal("nothing was installed, the test proves nothing")
	}
	e.stop() // SIGTERM
	if after := e.snapshot(); after != before {
		t.Fatalf("after SIGTERM with teardown_on_exit:\n%s\n--- want ---\n%s\nlog:\n%s", after, before, e.log.String())
	}
}

// The daemon runs with exactly the capabilities the systemd unit grants:
// the sets the kernel shows for the running process are the ones systemd
// would give it (root, no User=: bounding, permitted and effective are
// CapabilityBoundingSet; inheritable and ambient are AmbientCapabilities),
// and with them it converges and steers.
func TestDaemonRunsWithUnitCapabilities(t *testing.T) {
	wrap, caps := unitCapabilities(t)
	want := unitCapSets(t)
	e := newDaemonEnv(t, "", "")
	e.wrap = wrap
	srv, err := e.topo.Serve(e.topo.ISP2, "isp2", topology.Internet, 8000)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	srv1, err := e.topo.Serve(e.topo.ISP1, "isp1", topology.Internet, 8000)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv1.Close)
	e.start()
	e.waitFor("multipath with only "+strings.Join(caps, " "), 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	if got, err := e.topo.Dial(e.topo.LAN, "", topology.Internet, 8000); err != nil {
		t.Fatalf("LAN traffic: %q, %v\n%s", got, err, e.log.String())
	}
	// Read after the first pass and after traffic: a daemon that dropped
	// or gained a capability on the way shows it here.
	got := processCapSets(t, e.cmd.Process.Pid)
	for _, set := range []string{"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"} {
		if got[set] != want[set] {
			t.Errorf("%s of the running daemon: %#016x (%s), the unit grants %#016x (%s)", set,
				got[set], capNames(got[set]), want[set], capNames(want[set]))
		}
	}
	if strings.Contains(e.log.String(), "level=ERROR") {
		t.Fatalf("errors with the unit's capabilities:\n%s", e.log.String())
	}
}

// capBits are the capabilities a unit may name, by their bit.
var capBits = map[string]uint{
	"CAP_CHOWN": unix.CAP_CHOWN, "CAP_DAC_OVERRIDE": unix.CAP_DAC_OVERRIDE, "CAP_DAC_READ_SEARCH": unix.CAP_DAC_READ_SEARCH,
	"CAP_FOWNER": unix.CAP_FOWNER, "CAP_KILL": unix.CAP_KILL, "CAP_SETGID": unix.CAP_SETGID, "CAP_SETUID": unix.CAP_SETUID,
	"CAP_SETPCAP": unix.CAP_SETPCAP, "CAP_NET_BIND_SERVICE": unix.CAP_NET_BIND_SERVICE, "CAP_NET_BROADCAST": unix.CAP_NET_BROADCAST,
	"CAP_NET_ADMIN": unix.CAP_NET_ADMIN, "CAP_NET_RAW": unix.CAP_NET_RAW, "CAP_IPC_LOCK": unix.CAP_IPC_LOCK,
	"CAP_SYS_MODULE": unix.CAP_SYS_MODULE, "CAP_SYS_PTRACE": unix.CAP_SYS_PTRACE, "CAP_SYS_ADMIN": unix.CAP_SYS_ADMIN,
	"CAP_SYS_RESOURCE": unix.CAP_SYS_RESOURCE, "CAP_SYS_NICE": unix.CAP_SYS_NICE, "CAP_PERFMON": unix.CAP_PERFMON,
	"CAP_BPF": unix.CAP_BPF, "CAP_CHECKPOINT_RESTORE": unix.CAP_CHECKPOINT_RESTORE,
}

func capNames(mask uint64) string {
	var names []string
	for name, bit := range capBits {
		if mask&(1<<bit) != 0 {
			names = append(names, name)
			mask &^= 1 << bit
		}
	}
	sort.Strings(names)
	if mask != 0 {
		names = append(names, fmt.Sprintf("%#x", mask))
	}
	return strings.Join(names, " ")
}

// unitCapSets are the capability sets systemd gives the unit's process
// (it runs as root: no User=).
func unitCapSets(t *testing.T) map[string]uint64 {
	t.Helper()
	mask := func(key string) uint64 {
		var m uint64
		for _, name := range unitList(t, key) {
			bit, ok := capBits[name]
			if !ok {
				t.Fatalf("dist/mhbpf.service: %s names %s, which this test does not know", key, name)
			}
			m |= 1 << bit
		}
		return m
	}
	bnd := mask("CapabilityBoundingSet")
	amb := mask("AmbientCapabilities") & bnd
	return map[string]uint64{"CapBnd": bnd, "CapPrm": bnd, "CapEff": bnd, "CapInh": amb, "CapAmb": amb}
}

// processCapSets reads the capability sets of a process from the kernel.
func processCapSets(t *testing.T, pid int) map[string]uint64 {
	t.Helper()
	status := readFile(t, fmt.Sprintf("/proc/%d/status", pid))
	sets := map[string]uint64{}
	for _, line := range strings.Split(status, "\n") {
		key, v, ok := strings.Cut(line, ":")
		if !ok || !strings.HasPrefix(key, "Cap") {
			continue
		}
		n, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		if err != nil {
			t.Fatalf("/proc/%d/status: %q: %v", pid, line, err)
		}
		sets[key] = n
	}
	if len(sets) != 5 {
		t.Fatalf("/proc/%d/status: capability sets %v, want CapInh CapPrm CapEff CapBnd CapAmb\n%s", pid, sets, status)
	}
	return sets
}

// unitList is the value of a list setting of the unit, e.g.
// CapabilityBoundingSet.
func unitList(t *testing.T, key string) []string {
	t.Helper()
	var list []string
	for _, line := range strings.Split(readFile(t, "../dist/mhbpf.service"), "\n") {
		if v, ok := strings.CutPrefix(line, key+"="); ok {
			list = append(list, strings.Fields(v)...)
		}
	}
	return list
}

// unitCapabilities is the wrapper that runs the daemon as systemd runs the
// unit, capability-wise (bounding set, inheritable and ambient sets), and
// the bounding set's names.
func unitCapabilities(t *testing.T) (wrap, caps []string) {
	t.Helper()
	caps = unitList(t, "CapabilityBoundingSet")
	if len(caps) == 0 {
		t.Fatal("the unit sets no CapabilityBoundingSet")
	}
	set := func(names []string) string {
		s := "-all"
		for _, c := range names {
			s += ",+" + strings.ToLower(strings.TrimPrefix(c, "CAP_"))
		}
		return s
	}
	amb := set(unitList(t, "AmbientCapabilities"))
	return []string{"setpriv", "--bounding-set=" + set(caps), "--inh-caps=" + amb, "--ambient-caps=" + amb}, caps
}

// The unit file is valid for systemd.
func TestUnitFileVerifies(t *testing.T) {
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Skip("SKIPPED LOUDLY: no systemd-analyze on this machine")
	}
	unit, err := os.ReadFile("../dist/mhbpf.service")
	if err != nil {
		t.Fatal(err)
	}
	// verify wants the binaries to exist: point them at one that does.
	dir := t.TempDir()
	path := filepath.Join(dir, "mhbpf.service")
	if err := os.WriteFile(path, []byte(strings.ReplaceAll(string(unit), "/usr/local/bin/mhbpf", "/bin/true")), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("systemd-analyze", "verify", path).CombinedOutput(); err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// A flood of netlink events overflows the daemon's subscription (ENOBUFS):
// it subscribes again, resyncs, and keeps converging.
func TestDaemonSurvivesNetlinkOverflow(t *testing.T) {
	e := newDaemonEnv(t, "", "")
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })

	// While the daemon is stopped, 30000 route events pile up in its
	// socket, far beyond its receive buffer.
	var batch strings.Builder
	for i := 0; i < 30000; i++ {
		fmt.Fprintf(&batch, "route add 100.127.%d.%d/32 dev eth2 table 150\n", i/250, i%250+1)
	}
	if err := e.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("ip", "-n", e.topo.Router, "-batch", "-")
	cmd.Stdin = strings.NewReader(batch.String())
	out, err := cmd.CombinedOutput()
	_ = e.cmd.Process.Signal(syscall.SIGCONT)
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	e.waitFor("the daemon noticing the overflow", 10*time.Second, func() bool {
		return strings.Contains(e.log.String(), "netlink subscription failed; resubscribing")
	})
	t.Logf("%s", daemontest.Lines(e.log.String(), "netlink"))
	// Still converging: a deleted route comes back.
	deleted := time.Now()
	if err := e.topo.IP(e.topo.Router, "route", "del", "default"); err != nil {
		t.Fatal(err)
	}
	e.waitFrom(deleted, "main's default route back after the resubscription", time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
}

// The LAN's own subnets are never steered, configured or not.
func TestDaemonBypassesLANSubnets(t *testing.T) {
	e := newDaemonEnv(t, "", "")
	cfg, _ := os.ReadFile(e.cfgPath)
	e.writeConfig(strings.Replace(string(cfg), `bypass = ["100.64.2.0/24", "2001:db8:0:3::/64"]`, "", 1))
	e.start()
	e.waitFor("the LAN subnets in the bypass set", 3*time.Second, func() bool {
		return strings.Contains(e.log.String(), "100.64.2.0/24") && strings.Contains(e.log.String(), "2001:db8:0:3::/64")
	})
	// A LAN host talking to the router's LAN address: not a flow to steer.
	srv, err := e.topo.Serve(e.topo.Router, "router", topology.RouterLAN, 8010)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	if got, err := e.topo.Dial(e.topo.LAN, "", topology.RouterLAN, 8010); err != nil {
		t.Fatalf("%q, %v", got, err)
	}
	out, _ := e.mhbpf("flows")
	if strings.Contains(out, topology.RouterLAN.String()) {
		t.Fatalf("a flow to the LAN was recorded:\n%s", out)
	}
}

// A second daemon on the same state directory refuses to start.
func TestSecondDaemonRefused(t *testing.T) {
	e := newDaemonEnv(t, "", "")
	e.start()
	out, err := e.inRouter(e.bin, "run", "--config", e.cfgPath).CombinedOutput()
	if err == nil || !strings.Contains(string(out), fmt.Sprintf("another mhbpf daemon (pid %d)", e.cmd.Process.Pid)) {
		t.Fatalf("second daemon: %v\n%s", err, out)
	}
}

// A policy's prefixes from a file: read at start, read again on SIGHUP
// (a user drops in a new country list), and a bad new list is refused with
// the file's line while the running policy stays.
func TestDaemonPolicyPrefixFileReloads(t *testing.T) {
	list := filepath.Join(t.TempDir(), "list.txt")
	writeList := func(text string) {
		t.Helper()
		if err := os.WriteFile(list, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	writeList("# the destinations isp2 serves\n" + topology.Internet.String() + "\n198.51.100.0/24\n")
	e := newDaemonEnv(t, "", fmt.Sprintf(`
[[policy]]
name = "listed"
destination_files = [%q]
uplinks = ["isp2"]

[[policy]]
name = "rest"
protocol = "tcp"
uplinks = ["isp1"]
`, list))
	e.expectErrors = true // the bad list's refusal is an error
	serveGreetEcho(t, e, 8050)
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	if h := lanConnect(t, e, protoTCP, 0, 8050); h.uplink != "isp2" {
		t.Fatalf("listed destination: by %s, want isp2", h.uplink)
	}
	if !strings.Contains(e.log.String(), "policy installed") || !strings.Contains(e.log.String(), "prefixes=2") {
		t.Fatalf("no 'policy installed' line with the list's 2 prefixes:\n%s", daemontest.Lines(e.log.String(), "policy"))
	}

	reloads := strings.Count(e.log.String(), "configuration reloaded")
	writeList("# the destination moved off the list\n198.51.100.0/24\n")
	if err := e.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	e.waitFor("the reload", 3*time.Second, func() bool {
		return strings.Count(e.log.String(), "configuration reloaded") > reloads
	})
	if h := lanConnect(t, e, protoTCP, 0, 8050); h.uplink != "isp1" {
		t.Fatalf("destination no longer listed: by %s, want isp1 (policy rest)", h.uplink)
	}

	writeList("198.51.100.0/24\n203.0.113.0/33\n")
	if err := e.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	e.waitFor("the refusal naming the file's line", 3*time.Second, func() bool {
		return strings.Contains(e.log.String(), "reload refused") && strings.Contains(e.log.String(), "list.txt:2:")
	})
	if h := lanConnect(t, e, protoTCP, 0, 8050); h.uplink != "isp1" {
		t.Fatalf("after a refused list: by %s, want isp1 (the running policy)", h.uplink)
	}
}
