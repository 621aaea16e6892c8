// Package topology builds the scenario's network in namespaces: a router
// with two uplinks (ppp0, ppp1: veth here, Ethernet framing) to two ISPs,
// a LAN behind eth2, and "internet" hosts inside the ISPs. The ISPs drop
// what the router sends from an address not routed back by its line to
// them (BCP 38), as real providers do. Tests and the lab share it. It runs
// iproute2 and nft (tests may; the daemon never does) and uses only
// 100.64.0.0/10 and the documentation ranges.
package topology

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// Addresses of the scenario.
var (
	ISP1Local  = netip.MustParseAddr("100.64.0.2") // router's ppp0 (isp1, "static")
	ISP1Peer   = netip.MustParseAddr("100.64.0.1")
	ISP2Local  = netip.MustParseAddr("100.64.1.2") // router's ppp1 (isp2)
	ISP2Peer   = netip.MustParseAddr("100.64.1.1")
	RouterLAN  = netip.MustParseAddr("100.64.2.1")
	LANHost    = netip.MustParseAddr("100.64.2.10")
	LANPrefix  = netip.MustParsePrefix("100.64.2.0/24")
	Internet   = netip.MustParseAddr("203.0.113.10")  // answers in both ISPs
	ISP2Client = netip.MustParseAddr("198.51.100.50") // a host in isp2's network

	// IPv6: the documentation prefix 2001:db8::/32 only.
	ISP1Local6 = netip.MustParseAddr("2001:db8:0:1::2")
	ISP1Peer6  = netip.MustParseAddr("2001:db8:0:1::1")
	ISP2Local6 = netip.MustParseAddr("2001:db8:0:2::2")
	ISP2Peer6  = netip.MustParseAddr("2001:db8:0:2::1")
	RouterLAN6 = netip.MustParseAddr("2001:db8:0:3::1")
	LANHost6   = netip.MustParseAddr("2001:db8:0:3::10")
	LANPrefix6 = netip.MustParsePrefix("2001:db8:0:3::/64")
	Internet6  = netip.MustParseAddr("2001:db8:ff::10") // answers in both ISPs
)

// Topology is one built scenario. Namespace names are unique per build.
type Topology struct {
	Router, ISP1, ISP2, LAN string
}

// Build makes the namespaces and links. On error, whatever was made is
// removed again.
func Build() (*Topology, error) {
	var b [3]byte
	_, _ = rand.Read(b[:])
	id := hex.EncodeToString(b[:])
	t := &Topology{Router: "mh" + id + "-rt", ISP1: "mh" + id + "-isp1", ISP2: "mh" + id + "-isp2", LAN: "mh" + id + "-lan"}
	if err := t.build(); err != nil {
		t.Close()
		return nil, err
	}
	return t, nil
}

func (t *Topology) build() error {
	for _, ns := range []string{t.Router, t.ISP1, t.ISP2, t.LAN} {
		if err := ip("netns", "add", ns); err != nil {
			return err
		}
		// No duplicate address detection: link-local addresses that stay
		// tentative for a second or two make the first IPv6 exchanges of a
		// test wait for neighbour discovery retries.
		for _, kv := range []string{"net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"} {
			if err := t.Exec(ns, "sysctl", "-qw", kv).Run(); err != nil {
				return fmt.Errorf("sysctl %s in %s: %w", kv, ns, err)
			}
		}
	}
	// The router's ends get ifindexes of their own. A veth whose peer has
	// the same ifindex (both the first link of a fresh namespace) is, for
	// the kernel, a device like a physical NIC, whose carrier changes
	// linkwatch reports at most once a second: the router would hear of a
	// line's carrier loss up to a second late, at random. With distinct
	// ifindexes it hears at once, and tests time what mhbpf does from the
	// moment the carrier goes.
	steps := [][]string{
		{"-n", t.Router, "link", "add", "ppp0", "index", "10", "type", "veth", "peer", "name", "wan", "netns", t.ISP1},
		{"-n", t.Router, "link", "add", "ppp1", "index", "11", "type", "veth", "peer", "name", "wan", "netns", t.ISP2},
		{"-n", t.Router, "link", "add", "eth2", "index", "12", "type", "veth", "peer", "name", "eth0", "netns", t.LAN},

		{"-n", t.Router, "addr", "add", ISP1Local.String() + "/30", "dev", "ppp0"},
		{"-n", t.Router, "addr", "add", ISP2Local.String() + "/30", "dev", "ppp1"},
		{"-n", t.Router, "addr", "add", RouterLAN.String() + "/24", "dev", "eth2"},
		{"-n", t.ISP1, "addr", "add", ISP1Peer.String() + "/30", "dev", "wan"},
		{"-n", t.ISP1, "addr", "add", Internet.String() + "/32", "dev", "lo"},
		{"-n", t.ISP2, "addr", "add", ISP2Peer.String() + "/30", "dev", "wan"},
		{"-n", t.ISP2, "addr", "add", Internet.String() + "/32", "dev", "lo"},
		{"-n", t.ISP2, "addr", "add", ISP2Client.String() + "/32", "dev", "lo"},
		{"-n", t.LAN, "addr", "add", LANHost.String() + "/24", "dev", "eth0"},

		{"-n", t.Router, "addr", "add", ISP1Local6.String() + "/64", "dev", "ppp0", "nodad"},
		{"-n", t.Router, "addr", "add", ISP2Local6.String() + "/64", "dev", "ppp1", "nodad"},
		{"-n", t.Router, "addr", "add", RouterLAN6.String() + "/64", "dev", "eth2", "nodad"},
		{"-n", t.ISP1, "addr", "add", ISP1Peer6.String() + "/64", "dev", "wan", "nodad"},
		{"-n", t.ISP1, "addr", "add", Internet6.String() + "/128", "dev", "lo"},
		{"-n", t.ISP2, "addr", "add", ISP2Peer6.String() + "/64", "dev", "wan", "nodad"},
		{"-n", t.ISP2, "addr", "add", Internet6.String() + "/128", "dev", "lo"},
		{"-n", t.LAN, "addr", "add", LANHost6.String() + "/64", "dev", "eth0", "nodad"},
	}
	for _, ns := range []string{t.Router, t.ISP1, t.ISP2, t.LAN} {
		steps = append(steps, []string{"-n", ns, "link", "set", "lo", "up"})
	}
	steps = append(steps,
		[]string{"-n", t.Router, "link", "set", "ppp0", "up"},
		[]string{"-n", t.Router, "link", "set", "ppp1", "up"},
		[]string{"-n", t.Router, "link", "set", "eth2", "up"},
		[]string{"-n", t.ISP1, "link", "set", "wan", "up"},
		[]string{"-n", t.ISP2, "link", "set", "wan", "up"},
		[]string{"-n", t.LAN, "link", "set", "eth0", "up"},
		// The ISPs know the LAN only behind the router (no NAT in this
		// topology: the far end sees the LAN host's own address, which is
		// what tells a test the path a packet took).
		[]string{"-n", t.ISP1, "route", "add", LANPrefix.String(), "via", ISP1Local.String()},
		[]string{"-n", t.ISP2, "route", "add", LANPrefix.String(), "via", ISP2Local.String()},
		[]string{"-n", t.LAN, "route", "add", "default", "via", RouterLAN.String()},
		[]string{"-n", t.ISP1, "route", "add", LANPrefix6.String(), "via", ISP1Local6.String()},
		[]string{"-n", t.ISP2, "route", "add", LANPrefix6.String(), "via", ISP2Local6.String()},
		[]string{"-n", t.LAN, "route", "add", "default", "via", RouterLAN6.String()},
	)
	for _, s := range steps {
		if err := ip(s...); err != nil {
			return err
		}
	}
	for _, ns := range []string{t.ISP1, t.ISP2} {
		if err := t.NFT(ns, bcp38); err != nil {
			return err
		}
	}
	for _, kv := range []string{
		"net.ipv4.ip_forward=1",
		"net.ipv4.tcp_fwmark_accept=1",
		"net.ipv4.fwmark_reflect=1",
		// Strict reverse-path filtering, as many routers are set up (the
		// scenario's lab has it off): mhbpf must loosen its uplinks, an
		// answer may come back by the other one, and nothing else.
		"net.ipv4.conf.all.rp_filter=1",
		"net.ipv4.conf.default.rp_filter=1",
		"net.ipv6.conf.all.forwarding=1",
		// A link that goes down keeps its IPv6 addresses, as pppd's and
		// IPv4's do; otherwise a flap loses them for good here.
		"net.ipv6.conf.all.keep_addr_on_down=1",
	} {
		if err := t.Exec(t.Router, "sysctl", "-qw", kv).Run(); err != nil {
			return fmt.Errorf("sysctl %s: %w", kv, err)
		}
	}
	return nil
}

// bcp38 is each ISP's filtering of what its customer (the router) sends,
// as real providers do (BCP 38): a packet whose source is not routed back
// by the link it came in on is dropped, IPv4 and IPv6. The router's own
// address on that ISP's line and the LAN (routed there, for the tests
// without NAT) pass; the other ISP's address does not, so a packet that
// leaves by one uplink with the other's address is lost, and counted.
const bcp38 = `table inet bcp38 {
	chain prerouting {
		type filter hook prerouting priority -300; policy accept;
		iifname "wan" fib saddr . iif oif missing counter drop
	}
}
`

// SpoofedDrops is how many packets the ISP in ns dropped for their source
// address (its BCP 38 filter).
func (t *Topology) SpoofedDrops(ns string) (int, error) {
	return t.NFTCounter(ns, "inet", "bcp38", "prerouting")
}

// NFT loads an nftables ruleset into ns.
func (t *Topology) NFT(ns, ruleset string) error {
	cmd := t.Exec(ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(ruleset)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft in %s: %v: %s", ns, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// NFTCounter is the sum of the packet counters in one chain in ns.
func (t *Topology) NFTCounter(ns, family, table, chain string) (int, error) {
	out, err := t.Exec(ns, "nft", "list", "chain", family, table, chain).CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("nft list chain %s %s %s in %s: %v: %s", family, table, chain, ns, err, out)
	}
	sum := 0
	for _, line := range strings.Split(string(out), "\n") {
		if i := strings.Index(line, "counter packets "); i >= 0 {
			var n int
			if _, err := fmt.Sscanf(line[i:], "counter packets %d", &n); err != nil {
				return 0, fmt.Errorf("counter in %q: %w", line, err)
			}
			sum += n
		}
	}
	return sum, nil
}

// Close removes the namespaces (and with them every link in them).
func (t *Topology) Close() {
	for _, ns := range []string{t.Router, t.ISP1, t.ISP2, t.LAN} {
		_ = exec.Command("ip", "netns", "del", ns).Run()
	}
}

// Exec prepares a command inside namespace ns.
func (t *Topology) Exec(ns string, name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", ns, name}, args...)...)
}

// IP runs an iproute2 command inside namespace ns.
func (t *Topology) IP(ns string, args ...string) error {
	return ip(append([]string{"-n", ns}, args...)...)
}

func ip(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Server is a TCP server that answers every connection with its name and the
// peer address it saw, then closes.
type Server struct {
	cmd *exec.Cmd
}

// Serve starts a TCP Server in ns on addr:port, answering "name peeraddr".
func (t *Topology) Serve(ns, name string, addr netip.Addr, port uint16) (*Server, error) {
	if addr.Is6() {
		return t.serve(ns, name, fmt.Sprintf("TCP6-LISTEN:%d,bind=[%s],fork,reuseaddr", port, addr), "-Hltn", port)
	}
	return t.serve(ns, name, fmt.Sprintf("TCP4-LISTEN:%d,bind=%s,fork,reuseaddr", port, addr), "-Hltn", port)
}

// ServeUDP starts a UDP server in ns that answers every datagram with its
// name and the peer address it saw.
func (t *Topology) ServeUDP(ns, name string, addr netip.Addr, port uint16) (*Server, error) {
	return t.serve(ns, name, fmt.Sprintf("UDP4-RECVFROM:%d,bind=%s,fork,reuseaddr", port, addr), "-Hlun", port)
}

func (t *Topology) serve(ns, name, listen, ssFlags string, port uint16) (*Server, error) {
	return t.ServeSocat(ns, listen, "echo "+name+" $SOCAT_PEERADDR", ssFlags, port)
}

// ServeSocat runs socat in ns between a listening address and a shell
// command (SYSTEM), and waits until it listens on port (ssFlags: -Hltn for
// TCP, -Hlun for UDP).
func (t *Topology) ServeSocat(ns, listen, command, ssFlags string, port uint16) (*Server, error) {
	cmd := t.Exec(ns, "socat", listen, "SYSTEM:"+command)
	// A process group of its own: socat forks a child per connection, and
	// Close must end those too (a child left running keeps the test's
	// connections, and whatever file descriptors it inherited, alive).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	s := &Server{cmd: cmd}
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		out, _ := t.Exec(ns, "ss", ssFlags, fmt.Sprintf("sport = :%d", port)).Output()
		if strings.Contains(string(out), fmt.Sprintf(":%d", port)) {
			return s, nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.Close()
	return nil, fmt.Errorf("server %s in %s did not start", listen, ns)
}

func (s *Server) Close() {
	_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	_ = s.cmd.Wait()
}

// Stop ends a process politely (SIGTERM), and by force after grace.
func Stop(cmd *exec.Cmd, grace time.Duration) {
	if cmd == nil || cmd.Process == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(grace):
		_ = cmd.Process.Kill()
		<-done
	}
}

// Dial connects from ns (optionally from inside cgroup dir) to addr:port
// and returns what the server said, trimmed.
func (t *Topology) Dial(ns, cgroup string, addr netip.Addr, port uint16) (string, error) {
	if addr.Is6() {
		return t.Socat(ns, cgroup, "", fmt.Sprintf("TCP6:[%s]:%d,connect-timeout=2", addr, port))
	}
	return t.Socat(ns, cgroup, "", fmt.Sprintf("TCP4:%s:%d,connect-timeout=2", addr, port))
}

// Socat runs a socat client in ns (and, if cgroup is set, inside that
// cgroup v2 directory) between its stdin/stdout and address, feeding it
// input; it returns the trimmed output.
func (t *Topology) Socat(ns, cgroup, input, address string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	mode := "-u" // read only: the server speaks first and last
	if input != "" {
		mode = "-t1" // send input, then wait a second for the answer
	}
	// Join the cgroup first, then enter the namespace: membership is
	// inherited by what the shell execs.
	cmd := exec.CommandContext(ctx, "sh", "-c",
		`[ -z "$1" ] || echo $$ > "$1/cgroup.procs" || exit 1; exec ip netns exec "$2" socat -T3 "$3" "$4" STDIO`,
		"sh", cgroup, ns, mode, address)
	cmd.Stdin = strings.NewReader(input)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("socat %s from %s: %v: %s", address, ns, err, strings.TrimSpace(string(out)))
	}
	return strings.TrimSpace(string(out)), nil
}
