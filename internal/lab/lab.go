// Package lab runs the scenario of docs/scenario.md in network namespaces with
// mhbpf on its example configuration: the README's first command, and the
// fixture of the scenario suite. It never touches the host's own network:
// everything lives in namespaces it makes and removes.
package lab

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/mhbpf/mhbpf/internal/config"
	"github.com/mhbpf/mhbpf/internal/daemon"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/topology"
)

// Lab is a running scenario with its daemon and services.
type Lab struct {
	*topology.Scenario
	Bin      string // the mhbpf binary
	Dir      string
	Cgroup   string
	PinDir   string
	StateDir string
	CfgPath  string

	daemon   *exec.Cmd
	daemonIO io.Writer
	servers  []*topology.Server
}

// Config is the scenario's embedded configuration with what the lab needs
// on top: its own pin, state and cgroup paths, and next hops (IPv4 and
// IPv6) for ppp0/ppp1, which are Ethernet veth pairs here rather than
// point-to-point ppp links.
func Config(pinDir, stateDir, cgroup string) string {
	text := string(config.Scenario)
	text = strings.Replace(text, "[global]\n", fmt.Sprintf("[global]\npin_dir = %q\nstate_dir = %q\ncgroup = %q\n",
		pinDir, stateDir, cgroup), 1)
	for dev, gw := range map[string][2]netip.Addr{"ppp0": {topology.ISP1Peer, topology.ISP1Peer6}, "ppp1": {topology.ISP2Peer, topology.ISP2Peer6}} {
		re := regexp.MustCompile(`(?m)^interface = "` + dev + `".*$`)
		text = re.ReplaceAllString(text, fmt.Sprintf("$0\ngateway = %q\ngateway6 = %q", gw[0], gw[1]))
	}
	return text
}

// Start builds the scenario, starts the services, the daemon (its log goes
// to daemonLog) and the VPN, and waits until the VPN is up.
func Start(bin string, daemonLog io.Writer) (l *Lab, err error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("the lab builds network namespaces and loads BPF: run it as root")
	}
	for _, tool := range []string{"ip", "tc", "nft", "socat", "openvpn", "nsenter", "ping"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("the lab needs %s (make deps installs it)", tool)
		}
	}
	l = &Lab{Bin: bin, daemonIO: daemonLog}
	defer func() {
		if err != nil {
			l.Close()
			l = nil
		}
	}()
	if l.Dir, err = os.MkdirTemp("", "mhbpf-lab-"); err != nil {
		return l, err
	}
	if l.Scenario, err = topology.BuildScenario(); err != nil {
		return l, err
	}
	if l.Cgroup, err = makeCgroup(); err != nil {
		return l, err
	}
	l.PinDir = filepath.Join("/sys/fs/bpf", "mhbpf-"+filepath.Base(l.Dir))
	l.StateDir = filepath.Join(l.Dir, "state")
	l.CfgPath = filepath.Join(l.Dir, "mhbpf.toml")
	if err := os.WriteFile(l.CfgPath, []byte(Config(l.PinDir, l.StateDir, l.Cgroup)), 0o644); err != nil {
		return l, err
	}
	if err := l.startServices(); err != nil {
		return l, err
	}
	if err := l.startDaemon(); err != nil {
		return l, err
	}
	if err := l.StartVPN(l.Cgroup); err != nil {
		return l, err
	}
	if err := l.waitFor(15*time.Second, func() bool { return l.Has(l.Router, "tun0") && l.Has(l.Company, "tun0") }); err != nil {
		return l, fmt.Errorf("the VPN did not come up: %v\n%s", err, l.VPNLog())
	}
	if err := l.CompanyRoutes(); err != nil {
		return l, err
	}
	if err := l.waitFor(10*time.Second, func() bool {
		st, err := l.Status()
		return err == nil && len(st.Uplinks) == 3 && st.Uplinks[0].Usable && st.Uplinks[1].Usable && st.Uplinks[2].Usable
	}); err != nil {
		st, _ := l.Status()
		return l, fmt.Errorf("uplinks not all up: %+v", st.Uplinks)
	}
	return l, nil
}

func makeCgroup() (string, error) {
	root, err := loader.Cgroup2Root()
	if err != nil {
		return "", err
	}
	return os.MkdirTemp(root, "mhbpf-lab-")
}

func (l *Lab) waitFor(limit time.Duration, ok func() bool) error {
	for start := time.Now(); time.Since(start) < limit; time.Sleep(50 * time.Millisecond) {
		if ok() {
			return nil
		}
	}
	return fmt.Errorf("not within %v", limit)
}

// The services of the scenario. Each answers with its name and the peer
// address it saw, which tells a client which uplink its packets took (the
// router masquerades on both ADSL links).
func (l *Lab) startServices() error {
	s := l.Scenario
	type svc struct {
		ns, listen, cmd string
		port            uint16
	}
	for _, v := range []svc{
		{s.Inet, "TCP4-LISTEN:80,fork,reuseaddr", "echo web $SOCAT_PEERADDR", 80},
		{s.Inet, "TCP4-LISTEN:9000,fork,reuseaddr", "head -c 200000000 /dev/zero", 9000},
		// The same download over IPv6, from every address of Hosts6.
		{s.Inet, "TCP6-LISTEN:9000,fork,reuseaddr,ipv6only=1", "head -c 200000000 /dev/zero", 9000},
		{s.Inet, "TCP4-LISTEN:25,bind=" + topology.SMTPServer.String() + ",fork,reuseaddr", "echo 220 smtp $SOCAT_PEERADDR", 25},
		// isp2's panel answers only isp2's own customers.
		{s.ISP2, "TCP4-LISTEN:80,bind=" + topology.ISP2Panel.String() + ",fork,reuseaddr,range=100.64.1.0/30",
			"echo panel $SOCAT_PEERADDR", 80},
		{s.Router, "TCP4-LISTEN:80,bind=" + topology.ISP1Local.String() + ",fork,reuseaddr", "echo routerweb $SOCAT_PEERADDR", 80},
		{s.LAN, "TCP4-LISTEN:80,bind=" + topology.LANServer.String() + ",fork,reuseaddr", "echo lanweb $SOCAT_PEERADDR", 80},
		{s.Company, "TCP4-LISTEN:80,bind=" + topology.CompanyHost.String() + ",fork,reuseaddr", "echo company $SOCAT_PEERADDR", 80},
	} {
		ss := "-Hltn"
		if strings.HasPrefix(v.listen, "TCP6") {
			ss = "-Hltn6" // the IPv4 server of the same port must not count
		}
		srv, err := s.ServeSocat(v.ns, v.listen, v.cmd, ss, v.port)
		if err != nil {
			return err
		}
		l.servers = append(l.servers, srv)
	}
	// The port forward: isp1's address, port 8080, to the LAN web server.
	portForward := fmt.Sprintf(`table ip lab {
	chain pre { type nat hook prerouting priority dstnat; iifname "ppp0" tcp dport 8080 dnat to %s:80; }
}
`, topology.LANServer)
	// The internet counts, by source address, what reaches the VPN server
	// and the mail server: which uplink the router used.
	counters := fmt.Sprintf(`table ip count {
	chain forward_count {
		type filter hook forward priority 0;
		udp dport 1194 ip saddr %[1]s counter comment "vpn-isp1"
		udp dport 1194 ip saddr %[2]s counter comment "vpn-isp2"
		tcp dport 25 ip saddr %[1]s counter comment "smtp-isp1"
		tcp dport 25 ip saddr %[2]s counter comment "smtp-isp2"
	}
}
`, topology.ISP1Local, topology.ISP2Local)
	for ns, rules := range map[string]string{s.Router: portForward, s.Inet: counters} {
		cmd := s.Exec(ns, "nft", "-f", "-")
		cmd.Stdin = strings.NewReader(rules)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("nft in %s: %v: %s", ns, err, out)
		}
	}
	return nil
}

// Counter reads a packet counter of the internet's forward chain by its
// comment (vpn-isp1, vpn-isp2, smtp-isp1, smtp-isp2).
func (l *Lab) Counter(name string) int {
	out, _ := l.Exec(l.Inet, "nft", "list", "table", "ip", "count").CombinedOutput()
	re := regexp.MustCompile(`counter packets (\d+) bytes \d+ comment "` + regexp.QuoteMeta(name) + `"`)
	m := re.FindStringSubmatch(string(out))
	if m == nil {
		return -1
	}
	var n int
	fmt.Sscan(m[1], &n)
	return n
}

// InRouter prepares a command in the router's network namespace that keeps
// the host's mount namespace (and so its bpffs).
func (l *Lab) InRouter(args ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"--net=/run/netns/" + l.Router}, args...)...)
}

func (l *Lab) startDaemon() error {
	l.daemon = l.InRouter(l.Bin, "run", "--config", l.CfgPath)
	l.daemon.Stdout, l.daemon.Stderr = l.daemonIO, l.daemonIO
	if err := l.daemon.Start(); err != nil {
		return err
	}
	return l.waitFor(10*time.Second, func() bool {
		_, err := l.Status()
		return err == nil
	})
}

// Status is the daemon's last status.
func (l *Lab) Status() (daemon.Status, error) {
	return daemon.LoadStatus(l.StateDir)
}

// Close stops everything and removes what the lab made: the daemon goes
// with 'mhbpf down', then services, VPN, namespaces, cgroup, files.
func (l *Lab) Close() {
	topology.Stop(l.daemon, 5*time.Second)
	if l.Scenario != nil && l.PinDir != "" {
		_ = l.InRouter(l.Bin, "--state-dir", l.StateDir, "--pin-dir", l.PinDir, "down").Run()
	}
	for _, s := range l.servers {
		s.Close()
	}
	if l.Scenario != nil {
		l.Scenario.Close()
	}
	if l.Cgroup != "" {
		if procs, err := os.ReadFile(filepath.Join(l.Cgroup, "cgroup.procs")); err == nil {
			for _, pid := range strings.Fields(string(procs)) {
				_ = os.WriteFile(filepath.Join(filepath.Dir(l.Cgroup), "cgroup.procs"), []byte(pid), 0)
			}
		}
		_ = os.Remove(l.Cgroup)
	}
	if l.PinDir != "" {
		_ = os.RemoveAll(l.PinDir)
	}
	if l.Dir != "" {
		_ = os.RemoveAll(l.Dir)
	}
}
