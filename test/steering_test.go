// Package test holds the integration tests: mhbpf's datapath on the running
// kernel, in network namespaces, with real TCP servers and clients.
package test

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/testutil"
	"github.com/mhbpf/mhbpf/internal/topology"
)

const (
	markISP1   = 0x00010000
	markISP2   = 0x00020000
	markStrict = 0x00800000
	isp1, isp2 = 0, 1
	tableISP1  = "101"
	tableISP2  = "102"
)

type scenario struct {
	topo *topology.Topology
	d    *loader.Datapath
}

// newScenario builds the namespaces, the fib rules and tables of the mark
// scheme (what the daemon installs; here by hand), and loads the datapath.
// main's default route points to isp1 only, so anything that leaves by isp2
// was steered.
func newScenario(t *testing.T) *scenario {
	t.Helper()
	testutil.RequireRoot(t)
	topo, err := topology.Build()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(topo.Close)
	rt := topo.Router
	// The router filters strictly by reverse path: the uplinks loose, as
	// the daemon makes them (an answer arrives by isp2 while main's route
	// back is isp1).
	if out, err := topo.Exec(rt, "sysctl", "-qw", "net.ipv4.conf.ppp0.rp_filter=2", "net.ipv4.conf.ppp1.rp_filter=2").CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	for _, args := range [][]string{
		{"route", "add", "default", "via", topology.ISP1Peer.String(), "table", tableISP1},
		{"route", "add", "default", "via", topology.ISP2Peer.String(), "table", tableISP2},
		{"route", "add", "default", "via", topology.ISP1Peer.String()},
		// Packets arriving from an uplink route by main (they are for the
		// box or, after DNAT, the LAN): their mark is for the answers.
		{"rule", "add", "pref", "1000", "iif", "ppp0", "lookup", "main"},
		{"rule", "add", "pref", "1001", "iif", "ppp1", "lookup", "main"},
		{"rule", "add", "pref", "1010", "fwmark", "0x10000/0x10000", "lookup", tableISP1},
		{"rule", "add", "pref", "1011", "fwmark", "0x20000/0x20000", "lookup", tableISP2},
		{"rule", "add", "pref", "1020", "fwmark", "0x800000/0x800000", "unreachable"},
		// Traffic from an uplink's own address leaves by that uplink.
		{"rule", "add", "pref", "1030", "from", topology.ISP1Local.String(), "lookup", tableISP1},
		{"rule", "add", "pref", "1031", "from", topology.ISP2Local.String(), "lookup", tableISP2},
	} {
		if err := topo.IP(rt, args...); err != nil {
			t.Fatal(err)
		}
	}

	d, err := loader.Load(loader.Options{PinDir: testutil.PinDir(t, loader.Remove), MarkMask: 0x00ff0000, MarkStrict: markStrict,
		// The test process loads from the host namespace; the traffic runs
		// in the router's, where the daemon would run.
		NetnsCookie: testutil.NetnsCookie(t, topo.Router)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	for id, u := range map[int]maps.Uplink{
		isp1: {Mark: markISP1, Weight: 8, Up: true, Addr4: topology.ISP1Local},
		isp2: {Mark: markISP2, Weight: 2, Up: true, Addr4: topology.ISP2Local},
	} {
		if err := d.Maps.SetUplink(id, u); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.Maps.SetBypass([]netip.Prefix{topology.LANPrefix}); err != nil {
		t.Fatal(err)
	}
	return &scenario{topo: topo, d: d}
}

func (s *scenario) attach(t *testing.T, ifname string, role maps.Role, uplink int) {
	t.Helper()
	testutil.InNetNS(t, s.topo.Router, func() {
		mode, err := s.d.AttachTC(ifname, role, uplink)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s attached with %s", ifname, mode)
	})
}

func (s *scenario) policy(t *testing.T, rules ...maps.Rule) {
	t.Helper()
	p := maps.Policy{
		Default: maps.Action{Uplinks: []maps.Choice{{Uplink: isp1, Weight: 8}, {Uplink: isp2, Weight: 2}}},
		Rules:   rules,
	}
	if err := s.d.Maps.ReplacePolicy(p); err != nil {
		t.Fatal(err)
	}
}

func (s *scenario) serveInternet(t *testing.T, port uint16) {
	t.Helper()
	for ns, name := range map[string]string{s.topo.ISP1: "isp1", s.topo.ISP2: "isp2"} {
		srv, err := s.topo.Serve(ns, name, topology.Internet, port)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(srv.Close)
	}
}

func only(id uint8) maps.Action {
	return maps.Action{Uplinks: []maps.Choice{{Uplink: id, Weight: 1}}}
}

// A LAN host's connection leaves by the uplink the datapath chose.
func TestLANConnectionLeavesByChosenUplink(t *testing.T) {
	s := newScenario(t)
	s.serveInternet(t, 8000)
	s.serveInternet(t, 8001)
	s.policy(t, maps.Rule{Proto: 6, Ports: []maps.PortRange{{Lo: 8001, Hi: 8001}}, Action: only(isp2)})

	// Before the LAN program is attached, main sends everything to isp1:
	// the test can tell the paths apart.
	got, err := s.topo.Dial(s.topo.LAN, "", topology.Internet, 8001)
	if err != nil || !strings.HasPrefix(got, "isp1 ") {
		t.Fatalf("unsteered: %q, %v; want isp1 by main", got, err)
	}

	s.attach(t, "eth2", maps.RoleLAN, 0)
	got, err = s.topo.Dial(s.topo.LAN, "", topology.Internet, 8001)
	if err != nil {
		t.Fatal(err)
	}
	if got != "isp2 "+topology.LANHost.String() {
		t.Fatalf("policy to isp2: server said %q", got)
	}

	// Balanced: the server that answered is the uplink the flow map holds.
	seen := map[string]bool{}
	for i := 0; i < 12; i++ {
		got, err := s.topo.Dial(s.topo.LAN, "", topology.Internet, 8000)
		if err != nil {
			t.Fatal(err)
		}
		var flowUplink = -1
		_ = s.d.Maps.WalkFlows(func(f maps.Flow) bool {
			if f.Key.Dst.Port() == 8000 && f.Origin == maps.OriginBalanced {
				flowUplink = f.Uplink
			}
			return true
		})
		want := fmt.Sprintf("isp%d %s", flowUplink+1, topology.LANHost)
		if got != want {
			t.Fatalf("connection %d: server said %q, flow map says %q", i, got, want)
		}
		seen[got] = true
		// Forget the flows so the next connection is a new choice; the
		// destination's stickiness still holds, so vary nothing else.
		if _, err := s.d.Maps.DeleteFlowsOfUplink(flowUplink); err != nil {
			t.Fatal(err)
		}
	}
	if len(seen) != 1 {
		t.Fatalf("one destination changed uplink between connections: %v", seen)
	}
}

// A process on the router itself: the socket hook marks the socket, and the
// source address follows the chosen uplink's table.
func TestLocalConnectionLeavesByChosenUplinkWithItsAddress(t *testing.T) {
	s := newScenario(t)
	s.serveInternet(t, 8002)
	s.policy(t, maps.Rule{Dst: []netip.Prefix{netip.PrefixFrom(topology.Internet, 32)}, Proto: 6,
		Ports: []maps.PortRange{{Lo: 8002, Hi: 8002}}, Action: only(isp2)})
	cg := testutil.Cgroup(t)

	got, err := s.topo.Dial(s.topo.Router, cg, topology.Internet, 8002)
	if err != nil || got != "isp1 "+topology.ISP1Local.String() {
		t.Fatalf("without hooks: %q, %v; want isp1 with isp1's address", got, err)
	}
	if err := s.d.AttachCgroup(cg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.d.DetachCgroup() })
	got, err = s.topo.Dial(s.topo.Router, cg, topology.Internet, 8002)
	if err != nil {
		t.Fatal(err)
	}
	if got != "isp2 "+topology.ISP2Local.String() {
		t.Fatalf("with hooks: server said %q, want isp2 seeing %s", got, topology.ISP2Local)
	}
	c, err := s.d.Maps.UplinkCounters(isp2)
	if err != nil || c.NewFlows == 0 {
		t.Fatalf("isp2 counted no new flow: %+v %v", c, err)
	}
}

// Unconnected UDP (sendmsg) is steered per datagram; a socket that carries
// a mark bit outside mhbpf's mask is someone else's and is left alone.
func TestLocalUDPAndForeignMarkedSockets(t *testing.T) {
	s := newScenario(t)
	for ns, name := range map[string]string{s.topo.ISP1: "isp1", s.topo.ISP2: "isp2"} {
		serveUDPAnswers(t, ns, name, topology.Internet, 8003)
		tcp, err := s.topo.Serve(ns, name, topology.Internet, 8004)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(tcp.Close)
	}
	s.policy(t, maps.Rule{Dst: []netip.Prefix{netip.PrefixFrom(topology.Internet, 32)}, Action: only(isp2)})
	cg := testutil.Cgroup(t)
	if err := s.d.AttachCgroup(cg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.d.DetachCgroup() })

	udp := fmt.Sprintf("UDP4-SENDTO:%s:8003", topology.Internet)
	got, err := s.topo.Socat(s.topo.Router, cg, "hello\n", udp)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(got, "isp2 "+topology.ISP2Local.String()) {
		t.Fatalf("sendto: server said %q, want isp2 seeing %s", got, topology.ISP2Local)
	}

	// SO_MARK 0x1 set before connect: outside the mask, so the hook leaves
	// the socket to main's route, isp1. (socat sets socket options only
	// after connecting, so this client is the test binary itself.)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sh", "-c", `echo $$ > "$1/cgroup.procs" && exec ip netns exec "$2" "$3"`, // TestMain runs helperMarkedDial
		"sh", cg, s.topo.Router, exe)
	cmd.Env = append(os.Environ(), "MHBPF_MARKED_DIAL="+netip.AddrPortFrom(topology.Internet, 8004).String())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("marked dial: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "said: isp1 "+topology.ISP1Local.String()) {
		t.Fatalf("foreign-marked socket: %s\nwant isp1 by main", out)
	}
	// The same connection without the foreign mark is steered.
	got, err = s.topo.Dial(s.topo.Router, cg, topology.Internet, 8004)
	if err != nil || got != "isp2 "+topology.ISP2Local.String() {
		t.Fatalf("unmarked socket: %q, %v", got, err)
	}
}

// helperMarkedDial is the client of TestLocalUDPAndForeignMarkedSockets:
// a TCP connection whose socket carries SO_MARK 0x1 before it connects.
// TestMain runs it instead of the tests when MHBPF_MARKED_DIAL is set.
func helperMarkedDial(target string) int {
	d := net.Dialer{Timeout: 3 * time.Second, Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, 1) })
		return errors.Join(err, serr)
	}}
	conn, err := d.Dial("tcp4", target)
	if err != nil {
		fmt.Println("marked dial:", err)
		return 1
	}
	defer conn.Close()
	_ = conn.SetReadDeadline(time.Now().Add(3 * time.Second))
	b, _ := io.ReadAll(conn)
	fmt.Printf("said: %s\n", strings.TrimSpace(string(b)))
	return 0
}

// A connection that came in on ppp1 is answered via ppp1, although main's
// route to the client points to ppp0.
func TestInboundConnectionIsAnsweredByArrivalUplink(t *testing.T) {
	s := newScenario(t)
	rt := s.topo.Router
	if err := s.topo.IP(rt, "route", "add", topology.ISP2Client.String()+"/32", "via", topology.ISP1Peer.String()); err != nil {
		t.Fatal(err)
	}
	// The "from <address>" rules would route the answer by its source
	// address alone; without them, only the mark can.
	for _, pref := range []string{"1030", "1031"} {
		if err := s.topo.IP(rt, "rule", "del", "pref", pref); err != nil {
			t.Fatal(err)
		}
	}
	srv, err := s.topo.Serve(rt, "router", topology.ISP2Local, 9000)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	// isp2's client must reach the router's isp2 address from its own one.
	if err := s.topo.IP(s.topo.ISP2, "route", "add", topology.ISP2Local.String()+"/32", "dev", "wan", "src", topology.ISP2Client.String()); err != nil {
		t.Fatal(err)
	}

	if got, err := s.topo.Dial(s.topo.ISP2, "", topology.ISP2Local, 9000); err == nil {
		t.Fatalf("without the uplink program the answer should go astray via ppp0, but got %q", got)
	}
	s.attach(t, "ppp0", maps.RoleUplink, isp1)
	s.attach(t, "ppp1", maps.RoleUplink, isp2)
	got, err := s.topo.Dial(s.topo.ISP2, "", topology.ISP2Local, 9000)
	if err != nil {
		t.Fatal(err)
	}
	if got != "router "+topology.ISP2Client.String() {
		t.Fatalf("server said %q", got)
	}
	var inbound int
	_ = s.d.Maps.WalkFlows(func(f maps.Flow) bool {
		if f.Origin == maps.OriginInbound && f.Uplink == isp2 && f.Key.Dst.Port() == 9000 {
			inbound++
		}
		return true
	})
	if inbound != 1 {
		t.Fatalf("%d inbound flows on isp2 for port 9000, want 1", inbound)
	}
}

// Addresses of a container: a network namespace of its own, with a veth to
// a peer namespace, and its processes in the hooked cgroup (a container's
// cgroup sits below the root, where the daemon attaches the hooks).
var (
	containerAddr  = netip.MustParseAddr("100.64.9.2")
	containerPeer  = netip.MustParseAddr("100.64.9.1")
	containerAddr6 = netip.MustParseAddr("2001:db8:0:9::2")
	containerPeer6 = netip.MustParseAddr("2001:db8:0:9::1")
)

// container makes the namespaces "container" and its peer, removed when the
// test ends, and counts in the container's output hook every packet and
// every packet carrying a bit of mhbpf's mask.
func (s *scenario) container(t *testing.T) (ctr, peer string) {
	t.Helper()
	id := testutil.UniqueName("")
	ctr, peer = "mhctr"+id, "mhpeer"+id
	for _, ns := range []string{ctr, peer} {
		testutil.Run(t, "ip", "netns", "add", ns)
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	}
	for _, args := range [][]string{
		{"-n", ctr, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", peer},
		{"-n", ctr, "addr", "add", containerAddr.String() + "/30", "dev", "eth0"},
		{"-n", peer, "addr", "add", containerPeer.String() + "/30", "dev", "eth0"},
		{"-n", ctr, "addr", "add", containerAddr6.String() + "/64", "dev", "eth0", "nodad"},
		{"-n", peer, "addr", "add", containerPeer6.String() + "/64", "dev", "eth0", "nodad"},
		{"-n", ctr, "link", "set", "lo", "up"},
		{"-n", peer, "link", "set", "lo", "up"},
		{"-n", ctr, "link", "set", "eth0", "up"},
		{"-n", peer, "link", "set", "eth0", "up"},
	} {
		testutil.Run(t, "ip", args...)
	}
	cmd := s.topo.Exec(ctr, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(`table inet mhbpf_test {
	chain out {
		type filter hook output priority 0;
		counter comment "all"
		meta mark & 0x00ff0000 != 0 counter comment "marked"
	}
}
`)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft in %s: %v\n%s", ctr, err, out)
	}
	return ctr, peer
}

// containerCounter reads a counter of container's output chain.
func (s *scenario) containerCounter(t *testing.T, ctr, name string) int {
	t.Helper()
	out, err := s.topo.Exec(ctr, "nft", "list", "table", "inet", "mhbpf_test").CombinedOutput()
	if err != nil {
		t.Fatalf("nft list in %s: %v\n%s", ctr, err, out)
	}
	m := regexp.MustCompile(`counter packets (\d+) bytes \d+ comment "` + regexp.QuoteMeta(name) + `"`).FindStringSubmatch(string(out))
	if m == nil {
		t.Fatalf("no counter %q in %s:\n%s", name, ctr, out)
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// The socket hooks act on the network namespace the datapath was loaded
// for only: a process in another namespace (a container) below the hooked
// cgroup sends unconnected UDP and connects over TCP as without mhbpf, with
// its own source address and no mark; the router's own sockets, in the same
// cgroup, are still steered.
func TestSocketsOfOtherNetnsAreLeftAlone(t *testing.T) {
	s := newScenario(t)
	ctr, peer := s.container(t)
	for _, port := range []uint16{8010, 8011} {
		for _, addr := range []netip.Addr{containerPeer, containerPeer6} {
			if port == 8011 {
				serveUDPAnswers(t, peer, "peer", addr, port)
				continue
			}
			srv, err := s.topo.Serve(peer, "peer", addr, port)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(srv.Close)
		}
	}
	for ns, name := range map[string]string{s.topo.ISP1: "isp1", s.topo.ISP2: "isp2"} {
		serveUDPAnswers(t, ns, name, topology.Internet, 8011)
		tcp, err := s.topo.Serve(ns, name, topology.Internet, 8010)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(tcp.Close)
	}
	// Everything is steered in the router's namespace: the internet by
	// isp2, any other destination (the container's peer's addresses too)
	// by the balanced default.
	s.policy(t, maps.Rule{Dst: []netip.Prefix{netip.PrefixFrom(topology.Internet, 32)}, Action: only(isp2)})
	cg := testutil.Cgroup(t)
	if err := s.d.AttachCgroup(cg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.d.DetachCgroup() })

	for _, c := range []struct {
		what, address string
		want          netip.Addr
	}{
		{"UDP sendto", fmt.Sprintf("UDP4-SENDTO:%s:8011", containerPeer), containerAddr},
		{"TCP", fmt.Sprintf("TCP4:%s:8010,connect-timeout=2", containerPeer), containerAddr},
		{"UDP6 sendto", fmt.Sprintf("UDP6-SENDTO:[%s]:8011", containerPeer6), containerAddr6},
		{"TCP6", fmt.Sprintf("TCP6:[%s]:8010,connect-timeout=2", containerPeer6), containerAddr6},
	} {
		input := ""
		if strings.HasPrefix(c.what, "UDP") {
			input = "hello\n"
		}
		got, err := s.topo.Socat(ctr, cg, input, c.address)
		if err != nil {
			t.Errorf("container %s: %v", c.what, err)
			continue
		}
		if name, addr := answer(got); name != "peer" || addr != c.want {
			t.Errorf("container %s: server said %q, want peer seeing %s (the container's own address)", c.what, got, c.want)
		}
	}
	if n := s.containerCounter(t, ctr, "all"); n == 0 {
		t.Errorf("the container's output chain counted no packet: the mark check below proves nothing")
	}
	if n := s.containerCounter(t, ctr, "marked"); n != 0 {
		t.Errorf("%d packets of the container carried a bit of mhbpf's mark mask", n)
	}
	var flows uint64
	for _, id := range []int{isp1, isp2} {
		c, err := s.d.Maps.UplinkCounters(id)
		if err != nil {
			t.Fatal(err)
		}
		flows += c.NewFlows
	}
	if flows != 0 {
		t.Errorf("the hooks counted %d new flows for the container's sockets", flows)
	}

	// The router's own sockets in the same cgroup are still steered.
	got, err := s.topo.Socat(s.topo.Router, cg, "hello\n", fmt.Sprintf("UDP4-SENDTO:%s:8011", topology.Internet))
	if err != nil || !strings.HasPrefix(got, "isp2 "+topology.ISP2Local.String()) {
		t.Fatalf("router sendto: server said %q, %v; want isp2 seeing %s", got, err, topology.ISP2Local)
	}
	got, err = s.topo.Dial(s.topo.Router, cg, topology.Internet, 8010)
	if err != nil || got != "isp2 "+topology.ISP2Local.String() {
		t.Fatalf("router TCP: server said %q, %v; want isp2 seeing %s", got, err, topology.ISP2Local)
	}
}
