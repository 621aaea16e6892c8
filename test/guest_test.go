package test

// mhbpf is a guest on a router that already works: what the router itself
// says to LAN hosts (ICMP errors, answers on its public addresses, hairpin
// port forwards) must reach them, and main's routes more specific than the
// default must keep winning, while answers to remote peers still leave by
// the uplink their flow came in on.

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/mhbpf/mhbpf/internal/topology"
)

// pppoeMTU is what PPPoE leaves of Ethernet's 1500.
const pppoeMTU = "1492"

// setUplinkMTU gives the router's side of both uplinks PPPoE's MTU. The
// ISP side stays at 1500, like a far server's: its MSS does not save the
// LAN host from needing PMTU discovery.
func (e *daemonEnv) setUplinkMTU() {
	e.t.Helper()
	for _, dev := range []string{"ppp0", "ppp1"} {
		if err := e.topo.IP(e.topo.Router, "link", "set", dev, "mtu", pppoeMTU); err != nil {
			e.t.Fatal(err)
		}
	}
}

// run runs a command in namespace ns with a deadline and input, returning
// its combined output.
func runIn(t *testing.T, limit time.Duration, input []byte, ns string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns}, args...)...)
	if input != nil {
		cmd.Stdin = bytes.NewReader(input)
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// serveCount starts a TCP server in ns that answers each connection with
// the number of bytes it received.
func serveCount(t *testing.T, topo *topology.Topology, ns string, addr netip.Addr, port uint16) {
	t.Helper()
	listen := fmt.Sprintf("TCP4-LISTEN:%d,bind=%s,fork,reuseaddr", port, addr)
	if addr.Is6() {
		listen = fmt.Sprintf("TCP6-LISTEN:%d,bind=[%s],fork,reuseaddr", port, addr)
	}
	srv, err := topo.ServeSocat(ns, listen, "wc -c", "-Hltn", port)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
}

func tcpAddr(a netip.Addr, port uint16) string {
	if a.Is6() {
		return fmt.Sprintf("TCP6:[%s]:%d", a, port)
	}
	return fmt.Sprintf("TCP4:%s:%d", a, port)
}

// A LAN host's packet too big for a PPPoE uplink gets the router's
// "fragmentation needed" / "packet too big" back, the host learns the MTU,
// and a 2 MB upload completes. MSS clamping is off: this is PMTU discovery
// itself.
func TestLANHostLearnsUplinkMTU(t *testing.T) {
	e := newDaemonEnv(t, "clamp_mss = false", "")
	e.writeConfig(strings.Replace(readFile(t, e.cfgPath), "weight = 2\n", "weight = 2\nclamp_mss = false\n", 1))
	e.setUplinkMTU()
	for _, ns := range []string{e.topo.ISP1, e.topo.ISP2} {
		serveCount(t, e.topo, ns, topology.Internet, 8030)
		serveCount(t, e.topo, ns, topology.Internet6, 8030)
	}
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })

	upload := bytes.Repeat([]byte("mhbpf-pmtu\n"), 2<<20/11+1)[:2<<20]
	for _, c := range []struct {
		dst        netip.Addr
		ping       []string
		mtuOnRoute string
	}{
		{topology.Internet, []string{"ping", "-c1", "-W2", "-M", "do", "-s", "1472"}, "mtu 1492"},
		{topology.Internet6, []string{"ping", "-6", "-c1", "-W2", "-M", "do", "-s", "1452"}, "mtu 1492"},
	} {
		// The first too-big packet is answered by the router; the host
		// keeps what it learnt as a route exception.
		out, _ := runIn(t, 5*time.Second, nil, e.topo.LAN, append(c.ping, c.dst.String())...)
		got, _ := runIn(t, 5*time.Second, nil, e.topo.LAN, "ip", "route", "get", c.dst.String())
		if !strings.Contains(got, c.mtuOnRoute) {
			t.Fatalf("%s: the LAN host did not learn the uplink's MTU: ip route get says %q (ping said %q)", c.dst, got, out)
		}
		out, err := runIn(t, 30*time.Second, upload, e.topo.LAN, "socat", "-t10", "-T10", "STDIO", tcpAddr(c.dst, 8030))
		if err != nil || strings.TrimSpace(out) != fmt.Sprint(len(upload)) {
			t.Fatalf("%s: 2 MB upload: server counted %q, want %d (%v)", c.dst, strings.TrimSpace(out), len(upload), err)
		}
	}
}

var mssRE = regexp.MustCompile(`\bmss:(\d+)`)

// The MSS a server in an ISP sees on a connection from the LAN host.
func (e *daemonEnv) serverMSS(ns string, dst netip.Addr, port uint16) string {
	e.t.Helper()
	listen := fmt.Sprintf("TCP4-LISTEN:%d,bind=%s,reuseaddr", port, dst)
	if dst.Is6() {
		listen = fmt.Sprintf("TCP6-LISTEN:%d,bind=[%s],reuseaddr", port, dst)
	}
	srv, err := e.topo.ServeSocat(ns, listen, "sleep 3", "-Hltn", port)
	if err != nil {
		e.t.Fatal(err)
	}
	defer srv.Close()
	client := exec.Command("ip", "netns", "exec", e.topo.LAN, "socat", "-T3", "-u", tcpAddr(dst, port), "STDOUT")
	if err := client.Start(); err != nil {
		e.t.Fatal(err)
	}
	defer func() { _ = client.Process.Kill(); _ = client.Wait() }()
	var out string
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		b, _ := exec.Command("ip", "netns", "exec", ns, "ss", "-Htin", "state", "established", fmt.Sprintf("sport = :%d", port)).Output()
		out = string(b)
		if m := mssRE.FindStringSubmatch(out); m != nil {
			return m[1]
		}
	}
	e.t.Fatalf("no established connection on %s port %d: %q", ns, port, out)
	return ""
}

// clamp_mss is on by default for ppp* uplinks and rewrites the SYN's MSS
// to the route MTU; off, the LAN host's own MSS passes.
func TestMSSClampOnPPPUplinks(t *testing.T) {
	e := newDaemonEnv(t, "clamp_mss = false", `
[[policy]]
name = "internet-by-isp1"
destinations = ["203.0.113.10/32", "2001:db8:ff::10/128"]
uplinks = ["isp1"]

[[policy]]
name = "isp2-client-by-isp2"
destinations = ["198.51.100.50/32"]
uplinks = ["isp2"]
`)
	e.setUplinkMTU()
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	// ss shows the segment size the server sends, which the timestamp
	// option (12 bytes) makes smaller than the MSS the SYN carried.
	if got := e.serverMSS(e.topo.ISP2, topology.ISP2Client, 8031); got != "1440" {
		t.Errorf("IPv4 SYN by ppp1 (clamp_mss default): server sends %s-byte segments, want 1440 (MSS 1492 - 40, timestamps)", got)
	}
	if got := e.serverMSS(e.topo.ISP1, topology.Internet, 8032); got != "1448" {
		t.Errorf("IPv4 SYN by ppp0 (clamp_mss = false): server sends %s-byte segments, want 1448 (the host's own MSS 1460, timestamps)", got)
	}
	out, _ := e.inRouter("nft", "list", "table", "inet", "mhbpf").CombinedOutput()
	if !strings.Contains(string(out), `oifname "ppp1" tcp flags syn tcp option maxseg size set rt mtu`) ||
		strings.Contains(string(out), `"ppp0"`) {
		t.Errorf("nft table inet mhbpf:\n%s", out)
	}
}

// The router's own answers to LAN hosts reach them: time exceeded (the
// first hop of a traceroute), a RST from a closed port on an uplink
// address, echo replies and a service on each uplink address.
func TestRouterAnswersLANHosts(t *testing.T) {
	e := newDaemonEnv(t, "", "")
	srv, err := e.topo.Serve(e.topo.Router, "router", topology.ISP1Local, 8033)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })

	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"ping", "-c1", "-W2", "-t1", topology.Internet.String()}, "Time to live exceeded"},
		{[]string{"ping", "-6", "-c1", "-W2", "-t1", topology.Internet6.String()}, "Time exceeded: Hop limit"},
	} {
		out, _ := runIn(t, 5*time.Second, nil, e.topo.LAN, c.args...)
		if !strings.Contains(out, c.want) {
			t.Errorf("%s: want %q from the router, got:\n%s", strings.Join(c.args, " "), c.want, out)
		}
	}
	for _, a := range []netip.Addr{topology.ISP1Local, topology.ISP2Local, topology.ISP1Local6, topology.ISP2Local6} {
		if out, err := runIn(t, 5*time.Second, nil, e.topo.LAN, "ping", "-c1", "-W2", a.String()); err != nil {
			t.Errorf("LAN ping to the router's uplink address %s: %v\n%s", a, err, out)
		}
	}
	got, err := e.topo.Dial(e.topo.LAN, "", topology.ISP1Local, 8033)
	if name, peer := answer(got); err != nil || name != "router" || peer != topology.LANHost {
		t.Errorf("LAN host to the router's service on its isp1 address: %q, %v", got, err)
	}
	// A closed port: the kernel's RST carries the SYN's mark (reflected).
	_, err = e.topo.Dial(e.topo.LAN, "", topology.ISP2Local, 9)
	if err == nil || !strings.Contains(err.Error(), "Connection refused") {
		t.Errorf("LAN host to a closed port on the router's isp2 address: %v, want connection refused", err)
	}
}

// A port forward on isp1's address works from the LAN (hairpin NAT, the
// admin's own nft table) and from the internet; answers to a remote peer
// leave by its arrival uplink even when an admin's static route in main
// points that peer at the other uplink, for a port forward and for a
// service on the box.
func TestHairpinAndAnswersBeatSpecificRoutes(t *testing.T) {
	e := newDaemonEnv(t, "", "")
	nft := `table ip hairpin {
	chain pre { type nat hook prerouting priority dstnat; ip daddr 100.64.0.2 tcp dport 8034 dnat to 100.64.2.10:8035; }
	chain post { type nat hook postrouting priority srcnat; ip saddr 100.64.2.0/24 ip daddr 100.64.2.10 tcp dport 8035 ct status dnat masquerade; }
}`
	cmd := e.inRouter("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(nft)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v\n%s", err, out)
	}
	// An admin's static route: the internet host by isp2.
	if err := e.topo.IP(e.topo.Router, "route", "add", topology.Internet.String()+"/32", "via", topology.ISP2Peer.String(), "dev", "ppp1"); err != nil {
		t.Fatal(err)
	}
	for _, s := range []struct {
		ns   string
		name string
		addr netip.Addr
		port uint16
	}{{e.topo.LAN, "lan", topology.LANHost, 8035}, {e.topo.Router, "router", topology.ISP1Local, 8036}} {
		srv, err := e.topo.Serve(s.ns, s.name, s.addr, s.port)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(srv.Close)
	}
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })

	got, err := e.topo.Dial(e.topo.LAN, "", topology.ISP1Local, 8034)
	if name, peer := answer(got); err != nil || name != "lan" || peer != topology.RouterLAN {
		t.Errorf("hairpin: LAN host to isp1's forwarded port: %q, %v; want the LAN server seeing the router", got, err)
	}
	// The static route sends the box's new connections to the internet
	// host by isp2 (main's specific route wins over the balance).
	if r := e.ip("route", "get", topology.Internet.String(), "mark", "0x10000"); !strings.Contains(r, "dev ppp1") {
		t.Errorf("marked for isp1, to a destination main routes by ppp1: %q, want main's route", r)
	}
	for _, port := range []uint16{8034, 8036} {
		got, err := e.topo.Socat(e.topo.ISP1, "", "", fmt.Sprintf("TCP4:%s:%d,bind=%s,connect-timeout=2", topology.ISP1Local, port, topology.Internet))
		if _, peer := answer(got); err != nil || peer != topology.Internet {
			t.Errorf("visitor from isp1 to port %d (main routes it by isp2): %q, %v; the answer must leave by isp1", port, got, err)
		}
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// One packet from the internet cannot rewrite policy: after a spoofed SYN
// (and a spoofed UDP datagram) from a server's port arrives on isp2, the
// LAN's connections to that server and port still follow their policy
// (isp1 only, fail closed). The port-forward answers that must follow the
// arrival uplink are TestHairpinAndAnswersBeatSpecificRoutes'.
func TestSpoofedPacketCannotRewritePolicy(t *testing.T) {
	e := newDaemonEnv(t, "", `
[[policy]]
name = "smtp"
protocol = "tcp"
ports = [25]
uplinks = ["isp1"]
last_resort = "unreachable"

[[policy]]
name = "dns"
protocol = "udp"
ports = [53]
uplinks = ["isp1"]
last_resort = "unreachable"
`)
	// The servers answer in isp1 only: in isp2 the spoofer owns their
	// address and ports, and a connection that goes by isp2 is lost.
	for _, a := range []netip.Addr{topology.Internet, topology.Internet6} {
		srv, err := e.topo.Serve(e.topo.ISP1, "isp1", a, 25)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(srv.Close)
	}
	serveUDPAnswers(t, e.topo.ISP1, "isp1", topology.Internet, 53)
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })

	// The spoofed packets: the server's address and port, to the router's
	// isp2 address. The router answers the SYN with a RST; that is all.
	spoof := []string{
		fmt.Sprintf("TCP4:%s:40025,bind=%s:25,connect-timeout=1", topology.ISP2Local, topology.Internet),
		fmt.Sprintf("TCP6:[%s]:40025,bind=[%s]:25,connect-timeout=1", topology.ISP2Local6, topology.Internet6),
	}
	for _, s := range spoof {
		if _, err := e.topo.Socat(e.topo.ISP2, "", "", s); err == nil || !strings.Contains(err.Error(), "Connection refused") {
			t.Fatalf("spoofed SYN %s: %v, want the router's RST", s, err)
		}
	}
	if out, err := runIn(t, 3*time.Second, []byte("spoof\n"), e.topo.ISP2, "socat", "-u", "STDIN",
		fmt.Sprintf("UDP4-SENDTO:%s:40053,bind=%s:53", topology.ISP2Local, topology.Internet)); err != nil {
		t.Fatalf("spoofed datagram: %v\n%s", err, out)
	}
	if fl, _ := e.mhbpf("flows"); strings.Count(fl, "inbound") < 3 {
		t.Fatalf("the spoofed packets were not seen as inbound on isp2:\n%s", fl)
	}

	for _, a := range []netip.Addr{topology.Internet, topology.Internet6} {
		got, err := e.topo.Dial(e.topo.LAN, "", a, 25)
		if name, peer := answer(got); err != nil || name != "isp1" || peer != map[bool]netip.Addr{false: topology.LANHost, true: topology.LANHost6}[a.Is6()] {
			t.Errorf("LAN mail to %s after a spoofed SYN from its port 25 on isp2: %q, %v; want isp1", a, got, err)
		}
	}
	got, err := e.topo.Socat(e.topo.LAN, "", "query\n", fmt.Sprintf("UDP4:%s:53", topology.Internet))
	if name, _ := answer(got); err != nil || name != "isp1" {
		t.Errorf("LAN DNS query after a spoofed datagram from the server's port 53 on isp2: %q, %v; want isp1", got, err)
	}
}
