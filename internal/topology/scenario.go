package topology

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// The full scenario of docs/scenario.md, for the lab and the scenario suite:
//
//	lan ──eth2── router ──ppp0 (8 Mbit/s)── isp1 ──┐
//	                    ──ppp1 (2 Mbit/s)── isp2 ──┼── inet (internet hosts, SMTP)
//	                    ──tun0 (OpenVPN over ppp0/ppp1)┘   └── company (VPN server)
//
// ppp0 and ppp1 are veth pairs here (Ethernet framing; the VM suite has real
// pppd). The ISPs filter what their customers send by source address, as
// real ISPs do, so a packet that leaves by the wrong uplink is lost and a
// test sees it.
var (
	ISP1Up      = netip.MustParseAddr("100.64.10.1") // isp1's side to the internet
	ISP2Up      = netip.MustParseAddr("100.64.11.1")
	CompanyUp   = netip.MustParseAddr("100.64.12.1")
	LANServer   = netip.MustParseAddr("100.64.2.20") // the port-forward's target
	VPNServer   = netip.MustParseAddr("192.0.2.1")   // the company's OpenVPN server
	VPNLocal    = netip.MustParseAddr("100.64.9.2")  // router's tun0
	VPNPeer     = netip.MustParseAddr("100.64.9.1")
	CompanyHost = netip.MustParseAddr("100.100.0.1") // inside the company, only via the VPN
	SMTPServer  = netip.MustParseAddr("203.0.113.25")
	ISP2Panel   = netip.MustParseAddr("198.51.100.80") // answers only isp2's own network
	ISP2Visitor = netip.MustParseAddr("198.51.100.50") // a host in isp2's network
	ProbeISP1   = netip.MustParseAddr("192.0.2.53")    // health check targets
	ProbeISP2   = netip.MustParseAddr("198.51.100.53")
	// Hosts is a whole /16 of internet hosts: every address answers.
	Hosts = netip.MustParsePrefix("100.96.0.0/16")

	// IPv6: the router's uplinks, the LAN and Internet6 are Topology's
	// addresses; the ISPs reach the internet over links of their own.
	ISP1Up6 = netip.MustParseAddr("2001:db8:10::1")
	ISP2Up6 = netip.MustParseAddr("2001:db8:11::1")
	// Hosts6 is a /64 of internet hosts: every address answers (a local
	// route, as Hosts' address on lo is for IPv4).
	Hosts6 = netip.MustParsePrefix("2001:db8:ff::/64")
)

// Rates of the two ADSL lines.
const (
	ISP1Rate = "8mbit"
	ISP2Rate = "2mbit"
)

// Scenario is a built scenario. All namespace names are unique per build.
type Scenario struct {
	Topology
	Inet, Company string
	dir           string // OpenVPN key and logs
	vpn           []*exec.Cmd
}

// BuildScenario builds the namespaces, links, addresses, routes and
// shaping. Services and the VPN are started separately.
func BuildScenario() (*Scenario, error) {
	var b [3]byte
	_, _ = rand.Read(b[:])
	id := "ms" + hex.EncodeToString(b[:])
	s := &Scenario{Topology: Topology{Router: id + "-rt", ISP1: id + "-isp1", ISP2: id + "-isp2", LAN: id + "-lan"},
		Inet: id + "-inet", Company: id + "-co"}
	if err := s.build(); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

func (s *Scenario) namespaces() []string {
	return []string{s.Router, s.ISP1, s.ISP2, s.LAN, s.Inet, s.Company}
}

func (s *Scenario) build() error {
	for _, ns := range s.namespaces() {
		if err := ip("netns", "add", ns); err != nil {
			return err
		}
		// IPv6 forwarding everywhere but on the router, where it is the
		// daemon's to set (it does, once an uplink has an IPv6 address).
		sysctls := []string{"net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0", "net.ipv4.ip_forward=1"}
		if ns != s.Router {
			sysctls = append(sysctls, "net.ipv6.conf.all.forwarding=1")
		}
		for _, kv := range sysctls {
			if err := s.Exec(ns, "sysctl", "-qw", kv).Run(); err != nil {
				return fmt.Errorf("sysctl %s in %s: %w", kv, ns, err)
			}
		}
		if err := ip("-n", ns, "link", "set", "lo", "up"); err != nil {
			return err
		}
	}
	r, i1, i2, lan, inet, co := s.Router, s.ISP1, s.ISP2, s.LAN, s.Inet, s.Company
	steps := [][]string{
		{"-n", r, "link", "add", "eth2", "type", "veth", "peer", "name", "eth0", "netns", lan},
		{"-n", i1, "link", "add", "wan", "type", "veth", "peer", "name", "isp1", "netns", inet},
		{"-n", i2, "link", "add", "wan", "type", "veth", "peer", "name", "isp2", "netns", inet},
		{"-n", co, "link", "add", "wan", "type", "veth", "peer", "name", "company", "netns", inet},

		{"-n", r, "addr", "add", RouterLAN.String() + "/24", "dev", "eth2"},
		{"-n", lan, "addr", "add", LANHost.String() + "/24", "dev", "eth0"},
		{"-n", lan, "addr", "add", LANServer.String() + "/24", "dev", "eth0"},
		{"-n", i1, "addr", "add", ISP1Up.String() + "/30", "dev", "wan"},
		{"-n", inet, "addr", "add", "100.64.10.2/30", "dev", "isp1"},
		{"-n", i2, "addr", "add", ISP2Up.String() + "/30", "dev", "wan"},
		{"-n", inet, "addr", "add", "100.64.11.2/30", "dev", "isp2"},
		{"-n", co, "addr", "add", CompanyUp.String() + "/30", "dev", "wan"},
		{"-n", inet, "addr", "add", "100.64.12.2/30", "dev", "company"},

		{"-n", r, "addr", "add", RouterLAN6.String() + "/64", "dev", "eth2", "nodad"},
		{"-n", lan, "addr", "add", LANHost6.String() + "/64", "dev", "eth0", "nodad"},
		{"-n", i1, "addr", "add", ISP1Up6.String() + "/64", "dev", "wan", "nodad"},
		{"-n", inet, "addr", "add", "2001:db8:10::2/64", "dev", "isp1", "nodad"},
		{"-n", i2, "addr", "add", ISP2Up6.String() + "/64", "dev", "wan", "nodad"},
		{"-n", inet, "addr", "add", "2001:db8:11::2/64", "dev", "isp2", "nodad"},

		// Who lives where.
		{"-n", inet, "addr", "add", "203.0.113.0/24", "dev", "lo"},
		{"-n", inet, "addr", "add", Hosts.String(), "dev", "lo"},
		{"-n", inet, "addr", "add", ProbeISP1.String() + "/32", "dev", "lo"},
		{"-n", i2, "addr", "add", "198.51.100.0/24", "dev", "lo"},
		{"-n", co, "addr", "add", VPNServer.String() + "/32", "dev", "lo"},
		{"-n", co, "addr", "add", CompanyHost.String() + "/24", "dev", "lo"},
	}
	for _, l := range [][2]string{{r, "eth2"}, {lan, "eth0"}, {i1, "wan"}, {i2, "wan"}, {co, "wan"}, {inet, "isp1"}, {inet, "isp2"}, {inet, "company"}} {
		steps = append(steps, []string{"-n", l[0], "link", "set", l[1], "up"})
	}
	steps = append(steps,
		[]string{"-n", lan, "route", "add", "default", "via", RouterLAN.String()},
		[]string{"-n", i1, "route", "add", "default", "via", "100.64.10.2"},
		[]string{"-n", i2, "route", "add", "default", "via", "100.64.11.2"},
		[]string{"-n", co, "route", "add", "default", "via", "100.64.12.2"},
		[]string{"-n", inet, "route", "add", "100.64.0.0/30", "via", ISP1Up.String()},
		[]string{"-n", inet, "route", "add", "100.64.1.0/30", "via", ISP2Up.String()},
		[]string{"-n", inet, "route", "add", "198.51.100.0/24", "via", ISP2Up.String()},
		[]string{"-n", inet, "route", "add", VPNServer.String() + "/32", "via", CompanyUp.String()},

		// IPv6: the LAN's hosts are masqueraded to the uplink's address,
		// as in IPv4, so the internet knows only the uplinks' networks.
		[]string{"-n", lan, "route", "add", "default", "via", RouterLAN6.String()},
		[]string{"-n", i1, "route", "add", "default", "via", "2001:db8:10::2"},
		[]string{"-n", i2, "route", "add", "default", "via", "2001:db8:11::2"},
		[]string{"-n", inet, "route", "add", netip.PrefixFrom(ISP1Local6, 64).Masked().String(), "via", ISP1Up6.String()},
		[]string{"-n", inet, "route", "add", netip.PrefixFrom(ISP2Local6, 64).Masked().String(), "via", ISP2Up6.String()},
		[]string{"-n", inet, "route", "add", "local", Hosts6.String(), "dev", "lo"},
	)
	for _, st := range steps {
		if err := ip(st...); err != nil {
			return err
		}
	}
	for _, isp := range []int{1, 2} {
		if err := s.UplinkUp(isp); err != nil {
			return err
		}
	}
	// The "better" route to isp2's network: straight through ppp1. An
	// answer from isp1's address must not take it (requirement 6).
	return ip("-n", r, "route", "add", "198.51.100.0/24", "via", ISP2Peer.String(), "dev", "ppp1")
}

// uplinkLink is the router side of ISP n's line.
func (s *Scenario) uplinkLink(n int) (dev, ns string, local, peer, local6, peer6 netip.Addr, rate string) {
	if n == 1 {
		return "ppp0", s.ISP1, ISP1Local, ISP1Peer, ISP1Local6, ISP1Peer6, ISP1Rate
	}
	return "ppp1", s.ISP2, ISP2Local, ISP2Peer, ISP2Local6, ISP2Peer6, ISP2Rate
}

// UplinkDown takes ISP n's line away the way pppd does when it exits: the
// router's device disappears.
func (s *Scenario) UplinkDown(n int) error {
	dev, _, _, _, _, _, _ := s.uplinkLink(n)
	return ip("-n", s.Router, "link", "del", dev)
}

// UplinkUp brings ISP n's line (back): device, addresses, the ISP's
// customer filtering and the line's rate in both directions.
func (s *Scenario) UplinkUp(n int) error {
	dev, ns, local, peer, local6, peer6, rate := s.uplinkLink(n)
	steps := [][]string{
		{"-n", s.Router, "link", "add", dev, "type", "veth", "peer", "name", "cust", "netns", ns},
		{"-n", s.Router, "addr", "add", local.String() + "/30", "dev", dev},
		{"-n", ns, "addr", "add", peer.String() + "/30", "dev", "cust"},
		{"-n", s.Router, "addr", "add", local6.String() + "/64", "dev", dev, "nodad"},
		{"-n", ns, "addr", "add", peer6.String() + "/64", "dev", "cust", "nodad"},
		{"-n", s.Router, "link", "set", dev, "up"},
		{"-n", ns, "link", "set", "cust", "up"},
	}
	for _, st := range steps {
		if err := ip(st...); err != nil {
			return err
		}
	}
	// Ingress filtering: the ISP drops what its customer sends from an
	// address that is not the customer's (strict reverse path).
	if err := s.Exec(ns, "sysctl", "-qw", "net.ipv4.conf.cust.rp_filter=1", "net.ipv4.conf.all.rp_filter=1").Run(); err != nil {
		return fmt.Errorf("rp_filter in %s: %w", ns, err)
	}
	for _, side := range [][2]string{{s.Router, dev}, {ns, "cust"}} {
		if err := s.Exec(side[0], "tc", "qdisc", "replace", "dev", side[1], "root", "tbf", "rate", rate, "burst", "16kb", "latency", "100ms").Run(); err != nil {
			return fmt.Errorf("shape %s in %s: %w", side[1], side[0], err)
		}
	}
	return nil
}

// StartVPN starts the OpenVPN server in the company and the client on the
// router (inside cgroup, where mhbpf's socket hooks see it), static key,
// UDP 1194. tun0 appears on the router once the tunnel is up.
func (s *Scenario) StartVPN(cgroup string) error {
	dir, err := os.MkdirTemp("", "mhbpf-lab-vpn-")
	if err != nil {
		return err
	}
	s.dir = dir
	key := filepath.Join(dir, "static.key")
	if out, err := exec.Command("openvpn", "--genkey", "secret", key).CombinedOutput(); err != nil {
		return fmt.Errorf("openvpn --genkey: %v: %s", err, out)
	}
	common := []string{"--dev", "tun0", "--dev-type", "tun", "--proto", "udp", "--cipher", "AES-256-CBC",
		"--ping", "1", "--ping-restart", "10", "--verb", "3"}
	server := s.Exec(s.Company, "openvpn", append([]string{"--secret", key, "0", "--local", VPNServer.String(), "--lport", "1194",
		"--float", "--ifconfig", VPNPeer.String(), VPNLocal.String(), "--log", filepath.Join(dir, "server.log")}, common...)...)
	client := exec.Command("sh", "-c", `[ -z "$1" ] || echo $$ > "$1/cgroup.procs" || exit 1; shift; exec "$@"`, "sh", cgroup,
		"ip", "netns", "exec", s.Router, "openvpn")
	client.Args = append(client.Args, append([]string{"--secret", key, "1", "--remote", VPNServer.String(), "1194", "--nobind",
		"--ifconfig", VPNLocal.String(), VPNPeer.String(), "--log", filepath.Join(dir, "client.log")}, common...)...)
	for _, c := range []*exec.Cmd{server, client} {
		if err := c.Start(); err != nil {
			return err
		}
		s.vpn = append(s.vpn, c)
	}
	return nil
}

// CompanyRoutes adds the company's route back to the LAN once its tun0 is up.
func (s *Scenario) CompanyRoutes() error {
	return ip("-n", s.Company, "route", "replace", LANPrefix.String(), "via", VPNLocal.String(), "dev", "tun0")
}

// VPNLog is what the OpenVPN client logged.
func (s *Scenario) VPNLog() string {
	b, _ := os.ReadFile(filepath.Join(s.dir, "client.log"))
	c, _ := os.ReadFile(filepath.Join(s.dir, "server.log"))
	return "client:\n" + string(b) + "\nserver:\n" + string(c)
}

// Close stops the VPN and removes every namespace.
func (s *Scenario) Close() {
	for _, c := range s.vpn {
		if c.Process != nil {
			_ = c.Process.Kill()
			_ = c.Wait()
		}
	}
	for _, ns := range s.namespaces() {
		_ = exec.Command("ip", "netns", "del", ns).Run()
	}
	if s.dir != "" {
		_ = os.RemoveAll(s.dir)
	}
}

// Has reports whether ns has an interface named dev.
func (s *Scenario) Has(ns, dev string) bool {
	out, err := exec.Command("ip", "-n", ns, "-br", "link", "show", "dev", dev).CombinedOutput()
	return err == nil && strings.HasPrefix(string(out), dev)
}
