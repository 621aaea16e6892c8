package daemonbench

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/daemon"
	"github.com/mhbpf/mhbpf/internal/daemontest"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/testutil"
	"github.com/mhbpf/mhbpf/internal/topology"
)

func TestMain(m *testing.M) {
	code := m.Run()
	daemontest.RemoveBinary()
	os.Exit(code)
}

// record notes something this run made in MHBPF_BENCH_LEDGER (if set),
// one "kind value" a line: bench/parts/daemon.sh removes what is listed
// there when a run is interrupted or fails before its cleanups ran.
func record(kind, value string) {
	path := os.Getenv("MHBPF_BENCH_LEDGER")
	if path == "" {
		return
	}
	f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, "%s %s\n", kind, value)
}

// env is the scenario's namespaces, optionally with more uplinks, and one
// daemon process in the router's namespace.
type env struct {
	b        *testing.B
	topo     *topology.Topology
	bin      string
	dir      string
	cfgPath  string
	stateDir string
	pinDir   string
	cgroup   string
	extraNS  string // the namespace of uplinks 3..n, if any
	cmd      *exec.Cmd
	exited   chan struct{} // closed when cmd has ended
	log      daemontest.Log
}

// The config of the benchmarks: the product's defaults (probe interval,
// timeout, failures, successes; up_delay; resync_every), every uplink
// probed by ICMP to the internet address its ISP answers.
const baseConfig = `
[global]
pin_dir = %q
state_dir = %q
cgroup = %q
%s

[[uplink]]
name = "isp1"
interface = "ppp0"
gateway = "100.64.0.1"
gateway6 = "2001:db8:0:1::1"
weight = 8
  [uplink.health]
  targets = ["203.0.113.10"]

[[uplink]]
name = "isp2"
interface = "ppp1"
gateway = "100.64.1.1"
gateway6 = "2001:db8:0:2::1"
weight = 2
  [uplink.health]
  targets = ["203.0.113.10"]
%s
[lan]
interfaces = ["eth2"]
bypass = ["100.64.2.0/24", "2001:db8:0:3::/64"]
%s
`

// extraUplink is uplink i (2..15) of a 16-uplink box: a veth to a third
// ISP namespace that holds all of them, 100.65.i.0/30.
func extraUplink(i int) (name, ifname string, local, peer netip.Addr) {
	return fmt.Sprintf("isp%d", i+1), fmt.Sprintf("up%d", i), netip.AddrFrom4([4]byte{100, 65, byte(i), 2}), netip.AddrFrom4([4]byte{100, 65, byte(i), 1})
}

// newEnv builds the namespaces (uplinks: 2 or up to 16) and writes the
// configuration; global and policy go into their sections.
func newEnv(b *testing.B, uplinks int, global, policy string) *env {
	b.Helper()
	testutil.RequireRoot(b)
	topo, err := topology.Build()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(topo.Close)
	for _, ns := range []string{topo.Router, topo.ISP1, topo.ISP2, topo.LAN} {
		record("netns", ns)
	}
	e := &env{b: b, topo: topo, bin: daemontest.Binary(b), dir: b.TempDir(),
		pinDir: filepath.Join("/sys/fs/bpf", testutil.UniqueName("mhbpf-bench-")), cgroup: testutil.Cgroup(b)}
	e.cfgPath, e.stateDir = filepath.Join(e.dir, "mhbpf.toml"), filepath.Join(e.dir, "state")
	record("pins", e.pinDir)
	record("cgroup", e.cgroup)
	var more strings.Builder
	if uplinks > 2 {
		e.extraNS = topo.Router[:len(topo.Router)-len("-rt")] + "-ispn"
		b.Cleanup(func() { _ = exec.Command("ip", "netns", "del", e.extraNS).Run() })
		record("netns", e.extraNS)
		e.ip("netns", "add", e.extraNS)
		e.ip("-n", e.extraNS, "link", "set", "lo", "up")
		e.ip("-n", e.extraNS, "addr", "add", topology.Internet.String()+"/32", "dev", "lo")
		for i := 2; i < uplinks; i++ {
			name, ifname, local, peer := extraUplink(i)
			wan := fmt.Sprintf("wan%d", i)
			e.ip("-n", topo.Router, "link", "add", ifname, "type", "veth", "peer", "name", wan, "netns", e.extraNS)
			e.ip("-n", topo.Router, "addr", "add", local.String()+"/30", "dev", ifname)
			e.ip("-n", e.extraNS, "addr", "add", peer.String()+"/30", "dev", wan)
			e.ip("-n", topo.Router, "link", "set", ifname, "up")
			e.ip("-n", e.extraNS, "link", "set", wan, "up")
			// The default balance takes at most 8 (maps.MaxPolicyUplinks):
			// the rest are for policies (none here), probed and routed all the same.
			fmt.Fprintf(&more, "\n[[uplink]]\nname = %q\ninterface = %q\ngateway = %q\nweight = 1\nbalance = %v\n  [uplink.health]\n  targets = [%q]\n",
				name, ifname, peer, i < maps.MaxPolicyUplinks, topology.Internet)
		}
		// 16 uplink bits, the strict and the reply bit.
		global += "\nmark_mask = 0xffffc000\n"
	}
	cfg := fmt.Sprintf(baseConfig, e.pinDir, e.stateDir, e.cgroup, global, more.String(), policy)
	if err := os.WriteFile(e.cfgPath, []byte(cfg), 0o644); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(e.stop)
	return e
}

func (e *env) ip(args ...string) {
	e.b.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		e.b.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// daemon is where the daemon runs, for the harness's commands.
func (e *env) daemon() daemontest.Daemon {
	return daemontest.Daemon{Bin: e.bin, Netns: e.topo.Router, StateDir: e.stateDir, PinDir: e.pinDir}
}

// start runs the daemon and waits for its first pass and every uplink in
// use.
func (e *env) start() {
	e.b.Helper()
	e.cmd = daemontest.InNetns(e.topo.Router, e.bin, "run", "--config", e.cfgPath)
	e.cmd.Stdout, e.cmd.Stderr = &e.log, &e.log
	if err := e.cmd.Start(); err != nil {
		e.b.Fatal(err)
	}
	record("daemon", fmt.Sprintf("%d %s", e.cmd.Process.Pid, e.stateDir))
	e.exited = make(chan struct{})
	go func(cmd *exec.Cmd, exited chan struct{}) { _ = cmd.Wait(); close(exited) }(e.cmd, e.exited)
	e.waitFor("every uplink up", 60*time.Second, e.allUp)
}

// stop ends the daemon, fails the benchmark on an ERROR in its log, and
// removes what it installed ('mhbpf down') and its pins.
func (e *env) stop() {
	if e.cmd != nil {
		_ = e.cmd.Process.Signal(unix.SIGTERM)
		select {
		case <-e.exited:
		case <-time.After(5 * time.Second):
			_ = e.cmd.Process.Kill()
			<-e.exited
		}
		e.cmd = nil
		daemontest.CheckNoErrors(e.b, e.log.String())
	}
	e.daemon().Down(e.b)
}

func (e *env) status() daemon.Status {
	st, _ := daemon.LoadStatus(e.stateDir)
	return st
}

// allUp: a pass of the daemon that runs (this process) says every uplink
// is in use.
func (e *env) allUp() bool {
	if e.cmd == nil {
		return false
	}
	st, running := e.daemon().Running(e.cmd.Process.Pid)
	if !running || len(st.Uplinks) == 0 {
		return false
	}
	for _, u := range st.Uplinks {
		if !u.Usable {
			return false
		}
	}
	return true
}

// allUpSince: allUp, in a status written after since (a status from before
// an event says nothing about it: the daemon writes it at the end of a
// pass, after the routes).
func (e *env) allUpSince(since time.Time) func() bool {
	return func() bool { return e.status().Updated.After(since) && e.allUp() }
}

func (e *env) usable(name string) bool {
	for _, u := range e.status().Uplinks {
		if u.Name == name {
			return u.Usable
		}
	}
	return false
}

// waitFor polls ok every 5 ms for at most limit and returns how long it
// took from start.
func (e *env) waitFrom(start time.Time, what string, limit time.Duration, ok func() bool) time.Duration {
	e.b.Helper()
	took, err := daemontest.Until(start, limit, 5*time.Millisecond, e.exited, ok)
	if err != nil {
		e.b.Fatalf("%s: %v\ndaemon log:\n%s", what, err, e.log.String())
	}
	return took
}

func (e *env) waitFor(what string, limit time.Duration, ok func() bool) time.Duration {
	e.b.Helper()
	return e.waitFrom(time.Now(), what, limit, ok)
}

// routerRoutes reports whether main's default route goes through exactly
// devs and each uplink table in tables has a default route.
func (e *env) routesRight(devs []string, tables []int) bool {
	out, _ := exec.Command("ip", "-n", e.topo.Router, "route", "show", "default").Output()
	r := string(out)
	if strings.Count(r, " dev ") != len(devs) {
		return false
	}
	for _, d := range devs {
		if !strings.Contains(r, "dev "+d+" ") && !strings.Contains(r, "dev "+d+"\n") {
			return false
		}
	}
	for _, t := range tables {
		out, _ := exec.Command("ip", "-n", e.topo.Router, "route", "show", "default", "table", strconv.Itoa(t)).Output()
		if !strings.Contains(string(out), "default") {
			return false
		}
	}
	return true
}

// nsHandle is a netlink handle in namespace name, closed at the end.
func (e *env) nsHandle(name string) *netlink.Handle {
	e.b.Helper()
	ns, err := netns.GetFromName(name)
	if err != nil {
		e.b.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		e.b.Fatal(err)
	}
	e.b.Cleanup(h.Close)
	return h
}

// carrier takes the ISP's end of an uplink's line down or up: the
// router's interface stays administratively up and loses its carrier, as
// when a modem's line drops. Down flushes the ISP's routes over the line;
// up puts its route to the LAN back.
type line struct {
	h      *netlink.Handle
	wan    netlink.Link
	routes []*netlink.Route
}

func (e *env) line(ispNS string, local, local6 netip.Addr) *line {
	e.b.Helper()
	// The ISP keeps its IPv6 address over a drop, as its IPv4 one.
	if out, err := e.topo.Exec(ispNS, "sysctl", "-qw", "net.ipv6.conf.wan.keep_addr_on_down=1").CombinedOutput(); err != nil {
		e.b.Fatalf("sysctl in %s: %v: %s", ispNS, err, out)
	}
	h := e.nsHandle(ispNS)
	wan, err := h.LinkByName("wan")
	if err != nil {
		e.b.Fatal(err)
	}
	l := &line{h: h, wan: wan}
	for _, r := range []struct {
		dst netip.Prefix
		via netip.Addr
	}{{topology.LANPrefix, local}, {topology.LANPrefix6, local6}} {
		l.routes = append(l.routes, &netlink.Route{LinkIndex: wan.Attrs().Index,
			Dst: &net.IPNet{IP: r.dst.Addr().AsSlice(), Mask: net.CIDRMask(r.dst.Bits(), r.dst.Addr().BitLen())}, Gw: r.via.AsSlice()})
	}
	return l
}

func (l *line) set(up bool) error {
	if !up {
		return l.h.LinkSetDown(l.wan)
	}
	return l.h.LinkSetUp(l.wan)
}

// restoreRoutes puts the ISP's routes to the LAN back after a down.
func (l *line) restoreRoutes() error {
	for _, r := range l.routes {
		if err := l.h.RouteReplace(r); err != nil {
			return err
		}
	}
	return nil
}

// process is what /proc says of the daemon: CPU time (utime + stime) and
// resident memory now and at its peak.
type process struct {
	cpu       time.Duration
	rss, peak uint64
}

func (e *env) process() process {
	e.b.Helper()
	pid := e.cmd.Process.Pid
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		e.b.Fatal(err)
	}
	// Fields after the command name (which may hold spaces) in parens.
	f := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+2:]))
	utime, _ := strconv.ParseUint(f[11], 10, 64)
	stime, _ := strconv.ParseUint(f[12], 10, 64)
	p := process{cpu: time.Duration(utime+stime) * time.Second / clockTicks}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		e.b.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		for field, dst := range map[string]*uint64{"VmRSS:": &p.rss, "VmHWM:": &p.peak} {
			if v, ok := strings.CutPrefix(line, field); ok {
				kb, _ := strconv.ParseUint(strings.Fields(v)[0], 10, 64)
				*dst = kb * 1024
			}
		}
	}
	return p
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat's times: 100 on
// every Linux architecture Go runs on.
const clockTicks = 100

// inNS runs fn on a thread of its own in namespace name: sockets fn makes
// are that namespace's. The thread is not given back (it ends with fn's
// goroutine), so nothing else ever runs in the namespace by mistake.
func inNS(name string, fn func()) error {
	ns, err := netns.GetFromName(name)
	if err != nil {
		return err
	}
	defer ns.Close()
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		if err := netns.Set(ns); err != nil {
			done <- err
			return
		}
		fn()
		done <- nil
	}()
	return <-done
}

// serveName listens in namespace ns on addr:port and answers every
// connection with name, then closes it.
func (e *env) serveName(ns, name string, addr netip.Addr, port uint16) {
	e.b.Helper()
	var ln net.Listener
	var lerr error
	if err := inNS(ns, func() { ln, lerr = net.Listen("tcp", netip.AddrPortFrom(addr, port).String()) }); err != nil || lerr != nil {
		e.b.Fatalf("listen in %s: %v %v", ns, err, lerr)
	}
	e.b.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = c.Write([]byte(name))
			_ = c.Close()
		}
	}()
}

// dialName connects from the LAN to addr:port and returns what the server
// said ("" and an error on failure).
func (e *env) dialName(addr netip.Addr, port uint16, timeout time.Duration) (string, error) {
	var got string
	var derr error
	if err := inNS(e.topo.LAN, func() {
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(addr, port).String(), timeout)
		if err != nil {
			derr = err
			return
		}
		defer c.Close()
		_ = c.SetReadDeadline(time.Now().Add(timeout))
		b := make([]byte, 16)
		n, err := c.Read(b)
		if n == 0 {
			derr = err
			return
		}
		got = string(b[:n])
	}); err != nil {
		return "", err
	}
	return got, derr
}

// median of at least one value.
func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	for i := range s {
		for j := i + 1; j < len(s); j++ {
			if s[j] < s[i] {
				s[i], s[j] = s[j], s[i]
			}
		}
	}
	return s[(len(s)-1)/2]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
