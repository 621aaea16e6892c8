package main

// The test bed of one measurement: the project's topology (LAN host, router,
// two ISPs that drop what does not carry their customer's address, BCP 38)
// and a server namespace behind both ISPs. Every setup gets a fresh one, so
// no conntrack entry, TIME_WAIT socket or leftover rule of one setup meets
// the next.
//
//	lan ─eth2─ router ─ppp0─ isp1 ─┐
//	                  ─ppp1─ isp2 ─┴─ srv (203.0.113.0/24)

import (
	"bufio"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/mhbpf/mhbpf/internal/topology"
)

// Servers is the network behind both ISPs, reachable by either uplink:
// every address of it is the server's (a local route), so the LAN talks
// to many destinations, as a LAN does. mhbpf keeps a destination on its
// uplink (sticky per destination); with one destination it would send
// everything one way, where plain routing spreads connections by their
// five-tuple.
var Servers = netip.MustParsePrefix("203.0.113.0/24")

// destinations are the first n addresses of Servers.
func destinations(n int) []netip.Addr {
	out := make([]netip.Addr, 0, n)
	for a := Servers.Addr().Next(); len(out) < n && Servers.Contains(a); a = a.Next() {
		out = append(out, a)
	}
	return out
}

type bed struct {
	*topology.Topology
	Srv    string // the server's namespace
	dir    string // the server's control socket
	server *exec.Cmd
	track  *tracker
}

// The links between the ISPs and the server, and the ISP side's address.
var ispLinks = []struct {
	isp         func(*topology.Topology) string
	dev         string
	ispAddr     string // the ISP's end, /30
	srvAddr     string
	routeToPeer netip.Prefix // the uplink's /30: the customer the server answers through this ISP
}{
	{func(t *topology.Topology) string { return t.ISP1 }, "isp1", "100.64.10.1", "100.64.10.2", netip.PrefixFrom(topology.ISP1Local, 30).Masked()},
	{func(t *topology.Topology) string { return t.ISP2 }, "isp2", "100.64.11.1", "100.64.11.2", netip.PrefixFrom(topology.ISP2Local, 30).Masked()},
}

func newBed(self string, track *tracker) (b *bed, err error) {
	t, err := topology.Build()
	if err != nil {
		return nil, err
	}
	b = &bed{Topology: t, Srv: strings.TrimSuffix(t.Router, "-rt") + "-srv", track: track}
	for _, ns := range []string{t.Router, t.ISP1, t.ISP2, t.LAN} {
		track.add("netns", ns)
	}
	defer func() {
		if err != nil {
			b.Close()
		}
	}()
	if err = run("ip", "netns", "add", b.Srv); err != nil {
		return b, err
	}
	track.add("netns", b.Srv)
	steps := [][]string{{"-n", b.Srv, "link", "set", "lo", "up"}, {"-n", b.Srv, "addr", "add", Servers.String(), "dev", "lo"}}
	for _, l := range ispLinks {
		isp := l.isp(t)
		steps = append(steps,
			// The server lives behind the ISPs now, not in them.
			[]string{"-n", isp, "addr", "del", topology.Internet.String() + "/32", "dev", "lo"},
			[]string{"-n", isp, "link", "add", "srv", "type", "veth", "peer", "name", l.dev, "netns", b.Srv},
			[]string{"-n", isp, "addr", "add", l.ispAddr + "/30", "dev", "srv"},
			[]string{"-n", b.Srv, "addr", "add", l.srvAddr + "/30", "dev", l.dev},
			[]string{"-n", isp, "link", "set", "srv", "up"},
			[]string{"-n", b.Srv, "link", "set", l.dev, "up"},
			[]string{"-n", isp, "route", "add", Servers.String(), "via", l.srvAddr},
			[]string{"-n", b.Srv, "route", "add", l.routeToPeer.String(), "via", l.ispAddr},
		)
	}
	for _, s := range steps {
		if err = run("ip", s...); err != nil {
			return b, err
		}
	}
	sysctls := map[string][]string{
		// The kernel's default, which mhbpf leaves as found: no setup
		// pays a reverse-path lookup per packet that another does not.
		t.Router: {"net.ipv4.conf.all.rp_filter=0"},
		t.ISP1:   {"net.ipv4.ip_forward=1"},
		t.ISP2:   {"net.ipv4.ip_forward=1"},
		// A burst of new connections must not overflow the listener.
		b.Srv: {"net.core.somaxconn=4096", "net.ipv4.tcp_max_syn_backlog=4096"},
		// The client's ports are free again at once (the server closes
		// first), but a window of new connections needs more than 28k.
		t.LAN: {"net.ipv4.ip_local_port_range=1024 65000"},
	}
	for ns, kvs := range sysctls {
		for _, kv := range kvs {
			if err = run("ip", "netns", "exec", ns, "sysctl", "-qw", kv); err != nil {
				return b, err
			}
		}
	}
	if b.dir, err = os.MkdirTemp("", "mhbpf-e2e-"); err != nil {
		return b, err
	}
	b.server = exec.Command("ip", "netns", "exec", b.Srv, self, "serve", "-ctl", b.ctl())
	b.server.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	b.server.Stderr = os.Stderr
	out, err := b.server.StdoutPipe()
	if err != nil {
		return b, err
	}
	if err = b.server.Start(); err != nil {
		return b, err
	}
	track.add("pid", fmt.Sprint(b.server.Process.Pid))
	ready := make(chan bool, 1)
	go func() { ready <- bufio.NewScanner(out).Scan() }()
	select {
	case ok := <-ready:
		if !ok {
			return b, fmt.Errorf("the server in %s did not start", b.Srv)
		}
	case <-time.After(10 * time.Second):
		return b, fmt.Errorf("the server in %s did not start within 10s", b.Srv)
	}
	return b, nil
}

func (b *bed) ctl() string { return filepath.Join(b.dir, "ctl.sock") }

// Close stops the server and removes the namespaces (and so every link,
// rule, route, nftables table and iptables rule in them).
func (b *bed) Close() {
	if b.server != nil && b.server.Process != nil {
		_ = syscall.Kill(-b.server.Process.Pid, syscall.SIGKILL)
		_ = b.server.Wait()
	}
	b.Topology.Close()
	_ = exec.Command("ip", "netns", "del", b.Srv).Run()
	if b.dir != "" {
		_ = os.RemoveAll(b.dir)
	}
}

// spoofedDrops is what both ISPs dropped for its source address: packets
// that left by the wrong uplink (or unmasqueraded).
func (b *bed) spoofedDrops() (int, error) {
	n1, err := b.SpoofedDrops(b.ISP1)
	if err != nil {
		return 0, err
	}
	n2, err := b.SpoofedDrops(b.ISP2)
	return n1 + n2, err
}

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// runIn runs a command in ns with stdin.
func runIn(ns, stdin, name string, args ...string) error {
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns, name}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s in %s: %v: %s", name, strings.Join(args, " "), ns, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// tracker appends what the bench makes to a file, one "kind name" a line,
// so that bench/parts/e2e.sh's trap can remove it even if this process
// was killed before its own cleanup ran.
type tracker struct{ f *os.File }

func (t *tracker) add(kind, name string) {
	if t != nil && t.f != nil {
		fmt.Fprintf(t.f, "%s %s\n", kind, name)
	}
}
