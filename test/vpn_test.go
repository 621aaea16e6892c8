package test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mhbpf/mhbpf/internal/daemontest"
	"github.com/mhbpf/mhbpf/internal/testutil"
	"github.com/mhbpf/mhbpf/internal/topology"
)

// A real OpenVPN tunnel (tun0, UDP, static key) over the real pppd links,
// its transport by the VPN policy: isp1 first, isp2 if isp1 is gone. Both
// ISPs host a server at the same internet address, each with the tunnel's
// far end and a TCP service on it that says which ISP it is, so what comes
// back through tun0 names the ppp link the tunnel took. When isp1's pppd
// exits (ppp0 unregistered), the client's next datagrams choose isp2 (the
// sendmsg hook: mark and source address, or where the kernel lets the hook
// set no mark, as on 5.10, the source address alone), the server there
// takes the tunnel over (--float), and tun0 carries traffic again.
func TestOpenVPNOverPPPFollowsPolicy(t *testing.T) {
	topo, isp1, _ := pppUplinks(t)
	rt := topo.Router
	if _, err := exec.LookPath("openvpn"); err != nil {
		t.Fatal("openvpn is not installed (make deps installs it)")
	}
	e := &daemonEnv{t: t, topo: topo, bin: daemontest.Binary(t), cfgPath: filepath.Join(t.TempDir(), "mhbpf.toml"),
		stateDir: filepath.Join(t.TempDir(), "state"), pinDir: filepath.Join("/sys/fs/bpf", testutil.UniqueName("mhbpf-test-")),
		cgroup: testutil.Cgroup(t)}
	e.writeConfig(fmt.Sprintf(`
[global]
pin_dir = %q
state_dir = %q
cgroup = %q
up_delay = "300ms"

[[uplink]]
name = "isp1"
interface = "ppp0"
weight = 8

[[uplink]]
name = "isp2"
interface = "ppp1"
weight = 2

[[uplink]]
name = "vpn"
interface = "tun0"
balance = false

[lan]
interfaces = ["eth2"]

[[policy]]
name = "vpn-transport"
destinations = ["%s/32"]
protocol = "udp"
ports = [1194]
uplinks = ["isp1", "isp2"]
`, e.pinDir, e.stateDir, e.cgroup, topology.Internet))
	t.Cleanup(func() {
		e.stop()
		if out, err := e.mhbpf("down"); err != nil {
			t.Errorf("mhbpf down: %v\n%s", err, out)
		}
		_ = os.RemoveAll(e.pinDir)
	})
	e.start()
	e.waitFor("multipath over the ppp links", 10*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })

	dir := t.TempDir()
	key := filepath.Join(dir, "static.key")
	if out, err := exec.Command("openvpn", "--genkey", "secret", key).CombinedOutput(); err != nil {
		t.Fatalf("openvpn --genkey: %v: %s", err, out)
	}
	common := []string{"--dev", "tun0", "--dev-type", "tun", "--proto", "udp", "--cipher", "AES-256-CBC",
		"--ping", "1", "--ping-restart", "30", "--verb", "3"}
	logs := map[string]string{}
	start := func(name string, cmd *exec.Cmd) {
		t.Helper()
		if err := cmd.Start(); err != nil {
			t.Fatalf("start %s: %v", name, err)
		}
		t.Cleanup(func() { topology.Stop(cmd, 5*time.Second) })
	}
	for name, ns := range map[string]string{"isp1": topo.ISP1, "isp2": topo.ISP2} {
		logs[name] = filepath.Join(dir, name+".log")
		start(name, topo.Exec(ns, "openvpn", append([]string{"--secret", key, "0", "--local", topology.Internet.String(),
			"--lport", "1194", "--float", "--ifconfig", topology.VPNPeer.String(), topology.VPNLocal.String(),
			"--log", logs[name]}, common...)...))
	}
	// The client runs on the router inside the hooked cgroup, as a VPN
	// client of the box itself does.
	logs["client"] = filepath.Join(dir, "client.log")
	client := exec.Command("sh", "-c", `echo $$ > "$1/cgroup.procs" || exit 1; shift; exec "$@"`, "sh", e.cgroup,
		"ip", "netns", "exec", rt, "openvpn")
	client.Args = append(client.Args, append([]string{"--secret", key, "1", "--remote", topology.Internet.String(), "1194",
		"--nobind", "--ifconfig", topology.VPNLocal.String(), topology.VPNPeer.String(), "--log", logs["client"]}, common...)...)
	start("client", client)
	vpnLogs := func() string {
		var b strings.Builder
		for _, n := range []string{"client", "isp1", "isp2"} {
			l, _ := os.ReadFile(logs[n])
			fmt.Fprintf(&b, "--- openvpn %s:\n%s\n", n, l)
		}
		return b.String()
	}

	// Each ISP's tunnel end serves a line naming it once its tun0 is up.
	for name, ns := range map[string]string{"isp1": topo.ISP1, "isp2": topo.ISP2} {
		e.waitFor("tun0 of the server in "+name, 20*time.Second, func() bool {
			out, _ := exec.Command("ip", "-n", ns, "-br", "addr", "show", "dev", "tun0").CombinedOutput()
			return strings.Contains(string(out), topology.VPNPeer.String())
		})
		srv, err := topo.Serve(ns, name+"-vpn", topology.VPNPeer, 8002)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(srv.Close)
	}
	through := func(want string) func() bool {
		return func() bool {
			got, _ := topo.Dial(rt, e.cgroup, topology.VPNPeer, 8002)
			return got == want+" "+topology.VPNLocal.String()
		}
	}
	if !waitQuiet(30*time.Second, through("isp1-vpn")) {
		t.Fatalf("no answer through tun0 from isp1's end (the policy's first uplink)\n%s", vpnLogs())
	}

	// isp1's pppd exits: ppp0 is gone; the tunnel moves to ppp1.
	isp1.stop()
	e.waitFor("main's route over ppp1 alone", 10*time.Second, func() bool { return e.mainVia("ppp1") })
	began := time.Now()
	if !waitQuiet(60*time.Second, through("isp2-vpn")) {
		t.Fatalf("the tunnel did not move to isp2 after ppp0 went\n%s", vpnLogs())
	}
	t.Logf("tun0 answered through isp2 %v after main's route left ppp0", time.Since(began).Round(time.Millisecond))
	if l, _ := os.ReadFile(logs["isp2"]); !strings.Contains(string(l), topology.ISP2Local.String()) {
		t.Fatalf("isp2's server never saw the router's isp2 address %s\n%s", topology.ISP2Local, vpnLogs())
	}
}

// waitQuiet polls ok for up to limit (stretched under emulation), without
// failing: the caller says what did not happen.
func waitQuiet(limit time.Duration, ok func() bool) bool {
	limit = testutil.Deadline(limit)
	for start := time.Now(); time.Since(start) < limit; time.Sleep(200 * time.Millisecond) {
		if ok() {
			return true
		}
	}
	return false
}
