package main

// The four ways the router is set up. All of them masquerade alike (one
// nftables rule per uplink, `oifname ... masquerade`: mhbpf's own table
// has exactly that, so the others get the same by hand) and balance new
// connections 8:2 over the two uplinks; the prefixes steer to isp1, and
// the server's address is in none of them: every new connection takes the
// policy's miss path, the one whose cost grows with the prefix count, and
// is balanced.

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/mhbpf/mhbpf/internal/daemon"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/topology"
)

// setup is one router configuration, made on a fresh bed.
type setup interface {
	start(b *bed, prefixes []netip.Prefix) error
	stop() error // leaves the router as it found it (the bed goes anyway)
}

// benchPrefixes are n distinct /29s of 100.96.0.0/11, every other one
// (no two adjacent, so neither nftables nor mhbpf's folding merges them):
// a policy list that does not hold the server's address.
func benchPrefixes(n int) []netip.Prefix {
	if n > 1<<17 {
		panic("at most 131072 prefixes")
	}
	out := make([]netip.Prefix, n)
	for i := range out {
		a := uint32(100)<<24 | uint32(96)<<16 + uint32(i)*16
		out[i] = netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(a >> 24), byte(a >> 16), byte(a >> 8), byte(a)}), 29)
	}
	return out
}

const masquerade = `table inet benchnat {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "ppp0" masquerade
		oifname "ppp1" masquerade
	}
}
`

// plainRouting: what the router does with no policy at all: a weighted
// multipath default route (8:2, hashed on the five-tuple, so connections
// spread as mhbpf's do) and masquerade.
func plainRouting(b *bed) error {
	if err := runIn(b.Router, "", "sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=1"); err != nil {
		return err
	}
	if err := b.IP(b.Router, "route", "add", "default",
		"nexthop", "via", topology.ISP1Peer.String(), "dev", "ppp0", "weight", "8",
		"nexthop", "via", topology.ISP2Peer.String(), "dev", "ppp1", "weight", "2"); err != nil {
		return err
	}
	return runIn(b.Router, masquerade, "nft", "-f", "-")
}

type plain struct{}

func (plain) start(b *bed, _ []netip.Prefix) error { return plainRouting(b) }
func (plain) stop() error                          { return nil }

// markRouting is the classic part both hand-written setups share: a table
// per uplink, fwmark rules (0x1 isp1, 0x2 isp2) and the LAN through main
// whatever the mark (else a reply to a marked connection would leave by
// the uplink's table).
func markRouting(b *bed) error {
	for _, s := range [][]string{
		{"route", "add", "default", "via", topology.ISP1Peer.String(), "dev", "ppp0", "table", "101"},
		{"route", "add", "default", "via", topology.ISP2Peer.String(), "dev", "ppp1", "table", "102"},
		{"rule", "add", "to", topology.LANPrefix.String(), "lookup", "main", "pref", "900"},
		{"rule", "add", "fwmark", "0x1/0x1", "lookup", "101", "pref", "1000"},
		{"rule", "add", "fwmark", "0x2/0x2", "lookup", "102", "pref", "1001"},
	} {
		if err := b.IP(b.Router, s...); err != nil {
			return err
		}
	}
	return plainRouting(b)
}

// policyRules: plain routing plus the fib rules and tables the
// hand-written setups use, and no marking: what turning policy routing on
// costs by itself (the kernel leaves its fast path of main and default
// lookups once any rule of one's own exists), apart from the marking.
type policyRules struct{}

func (policyRules) start(b *bed, _ []netip.Prefix) error { return markRouting(b) }
func (policyRules) stop() error                          { return nil }

// nftSet: what a careful administrator writes today: the prefixes in an
// interval set, looked up once per new connection, the choice kept in the
// conntrack mark and copied to every packet's mark.
type nftSet struct{}

func (nftSet) start(b *bed, prefixes []netip.Prefix) error {
	if err := markRouting(b); err != nil {
		return err
	}
	var r strings.Builder
	r.WriteString("table inet pbr {\n\tset isp1_dst {\n\t\ttype ipv4_addr; flags interval;\n\t\telements = { ")
	for i, p := range prefixes {
		if i > 0 {
			r.WriteString(", ")
		}
		r.WriteString(p.String())
	}
	r.WriteString(` }
	}
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		iifname "eth2" ct state new ip daddr @isp1_dst ct mark set 0x1
		meta mark set ct mark
	}
}
`)
	return runIn(b.Router, r.String(), "nft", "-f", "-")
}
func (nftSet) stop() error { return nil }

// iptablesConnmark: the seed's setup (docs/scenario.md, "Why not the
// classic setup"), in legacy iptables (x_tables, what it was written
// for): restore the connection's mark; a marked packet skips every
// marking rule; a new connection from the LAN walks one MARK rule per
// prefix, gets the LAN's "route by main" value if none matched, and the
// mark is saved to the connection. Connections arriving on an uplink are
// stamped with its mark.
type iptablesConnmark struct{}

func (iptablesConnmark) start(b *bed, prefixes []netip.Prefix) error {
	if err := markRouting(b); err != nil {
		return err
	}
	var r strings.Builder
	r.WriteString(`*mangle
:classify - [0:0]
-A PREROUTING -j CONNMARK --restore-mark
-A PREROUTING -m mark ! --mark 0 -j ACCEPT
-A PREROUTING -i ppp0 -m conntrack --ctstate NEW -j MARK --set-mark 0x1
-A PREROUTING -i ppp1 -m conntrack --ctstate NEW -j MARK --set-mark 0x2
-A PREROUTING -i eth2 -j classify
-A PREROUTING -j CONNMARK --save-mark
`)
	for _, p := range prefixes {
		fmt.Fprintf(&r, "-A classify -d %s -j MARK --set-mark 0x1\n", p)
	}
	r.WriteString("-A classify -m mark --mark 0 -j MARK --set-mark 0x8\nCOMMIT\n")
	return runIn(b.Router, r.String(), "iptables-legacy-restore")
}
func (iptablesConnmark) stop() error { return nil }

// mhbpfDaemon: the real daemon (bin/mhbpf run), run as the project's tests
// run it, with a policy of the prefixes (a prefix file) to isp1, the
// default balance 8:2 and masquerade on both uplinks. clamp_mss is off (it
// is on by default for ppp* names): no other setup clamps.
type mhbpfDaemon struct {
	bin, dir, pinDir, stateDir, cgroup string
	router                             string
	track                              *tracker
	cmd                                *exec.Cmd
	done                               chan struct{} // closed when the daemon has exited
}

const daemonConfig = `[global]
pin_dir = %q
state_dir = %q
cgroup = %q

[[uplink]]
name = "isp1"
interface = "ppp0"
gateway = %q
gateway6 = %q
weight = 8
masquerade = true
clamp_mss = false

[[uplink]]
name = "isp2"
interface = "ppp1"
gateway = %q
gateway6 = %q
weight = 2
masquerade = true
clamp_mss = false

[lan]
interfaces = ["eth2"]

[[policy]]
name = "listed"
destination_files = ["prefixes.txt"]
uplinks = ["isp1"]
`

func (m *mhbpfDaemon) start(b *bed, prefixes []netip.Prefix) error {
	var err error
	if m.dir, err = os.MkdirTemp("", "mhbpf-e2e-daemon-"); err != nil {
		return err
	}
	root, err := loader.Cgroup2Root()
	if err != nil {
		return err
	}
	if m.cgroup, err = os.MkdirTemp(root, "mhbpf-e2e-"); err != nil {
		return err
	}
	m.track.add("cgroup", m.cgroup)
	m.router = b.Router
	m.pinDir = filepath.Join("/sys/fs/bpf", "mhbpf-e2e-"+filepath.Base(m.dir))
	m.track.add("pins", m.pinDir)
	m.stateDir = filepath.Join(m.dir, "state")
	var list strings.Builder
	for _, p := range prefixes {
		list.WriteString(p.String() + "\n")
	}
	if err := os.WriteFile(filepath.Join(m.dir, "prefixes.txt"), []byte(list.String()), 0o644); err != nil {
		return err
	}
	cfg := filepath.Join(m.dir, "mhbpf.toml")
	text := fmt.Sprintf(daemonConfig, m.pinDir, m.stateDir, m.cgroup,
		topology.ISP1Peer, topology.ISP1Peer6, topology.ISP2Peer, topology.ISP2Peer6)
	if err := os.WriteFile(cfg, []byte(text), 0o644); err != nil {
		return err
	}
	logf, err := os.Create(filepath.Join(m.dir, "daemon.log"))
	if err != nil {
		return err
	}
	defer logf.Close()
	m.cmd = nsenter(b.Router, m.bin, "run", "--config", cfg)
	m.cmd.Stdout, m.cmd.Stderr = logf, logf
	// Its own process group: a Ctrl-C reaches this driver, which stops
	// the daemon in order (SIGTERM, then 'mhbpf down').
	m.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := m.cmd.Start(); err != nil {
		return err
	}
	m.done = make(chan struct{})
	go func() { _ = m.cmd.Wait(); close(m.done) }()
	m.track.add("pid", fmt.Sprint(m.cmd.Process.Pid))
	// Ready: the first pass done and both uplinks in use.
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		st, err := daemon.LoadStatus(m.stateDir)
		if err == nil && st.State == daemon.StateRunning && st.PID == m.cmd.Process.Pid &&
			len(st.Uplinks) == 2 && st.Uplinks[0].Usable && st.Uplinks[1].Usable {
			return m.logErrors()
		}
		select {
		case <-m.done:
			return fmt.Errorf("the daemon exited:\n%s", m.log())
		case <-time.After(50 * time.Millisecond):
		}
	}
	return fmt.Errorf("the daemon was not running with both uplinks usable within 30s:\n%s", m.log())
}

func (m *mhbpfDaemon) log() string {
	b, _ := os.ReadFile(filepath.Join(m.dir, "daemon.log"))
	return string(b)
}

// logErrors fails on an ERROR line in the daemon's log, as the daemon
// tests do: a figure from a daemon that is failing is no figure.
func (m *mhbpfDaemon) logErrors() error {
	var bad []string
	for _, line := range strings.Split(m.log(), "\n") {
		if strings.Contains(line, "level=ERROR") {
			bad = append(bad, line)
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("the daemon logged errors:\n%s", strings.Join(bad, "\n"))
	}
	return nil
}

// cpuSeconds is the CPU time the daemon has used so far (user + system).
func (m *mhbpfDaemon) cpuSeconds() float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", m.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	// The fields after the command name, which is in parentheses.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	var utime, stime float64
	fmt.Sscan(f[11], &utime)
	fmt.Sscan(f[12], &stime)
	return (utime + stime) / 100 // USER_HZ
}

// stop ends the daemon (SIGTERM), removes what it left with 'mhbpf down'
// and the pins, the cgroup and the files.
func (m *mhbpfDaemon) stop() error {
	var errs []string
	if m.cmd != nil {
		_ = m.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-m.done:
		case <-time.After(5 * time.Second):
			_ = m.cmd.Process.Kill()
			<-m.done
		}
		if err := m.logErrors(); err != nil {
			errs = append(errs, err.Error())
		}
		if out, err := nsenter(m.router, m.bin, "--state-dir", m.stateDir, "--pin-dir", m.pinDir, "down").CombinedOutput(); err != nil {
			errs = append(errs, fmt.Sprintf("mhbpf down: %v: %s", err, out))
		}
	}
	if m.pinDir != "" {
		_ = os.RemoveAll(m.pinDir)
	}
	if m.cgroup != "" {
		if err := os.Remove(m.cgroup); err != nil && !os.IsNotExist(err) {
			errs = append(errs, err.Error())
		}
	}
	if m.dir != "" {
		_ = os.RemoveAll(m.dir)
	}
	if len(errs) > 0 {
		return fmt.Errorf("%s", strings.Join(errs, "\n"))
	}
	return nil
}

// nsenter prepares a command in ns's network namespace that keeps the
// host's mount namespace, and so its bpffs (ip netns exec would remount
// /sys), as the daemon tests run it.
func nsenter(ns string, args ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"--net=/run/netns/" + ns}, args...)...)
}
