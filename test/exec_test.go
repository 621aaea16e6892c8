package test

// 'mhbpf exec --uplink NAME -- COMMAND': the command's real connections
// (TCP and unconnected UDP, IPv4 and IPv6) leave by that uplink with its
// address, against a policy that sends the same traffic elsewhere, from
// inside the cgroup the socket hooks steer; it refuses a down uplink
// without running the command, passes the exit code on and leaves no
// cgroup behind.

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mhbpf/mhbpf/internal/topology"
)

// inHookedCgroup runs argv in the router's namespace from inside the cgroup
// the daemon's socket hooks are attached to (as the box's own programs are).
func (e *daemonEnv) inHookedCgroup(argv ...string) (string, error) {
	cmd := exec.Command("sh", append([]string{"-c", `echo $$ > "$1/cgroup.procs" && ns=$2 && shift 2 && exec nsenter --net=/run/netns/"$ns" "$@"`,
		"sh", e.cgroup, e.topo.Router}, argv...)...)
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func (e *daemonEnv) execVia(uplink string, argv ...string) (string, error) {
	return e.inHookedCgroup(append([]string{e.bin, "--state-dir", e.stateDir, "--pin-dir", e.pinDir, "exec", "--uplink", uplink, "--"}, argv...)...)
}

func TestExecLeavesByTheUplink(t *testing.T) {
	// Everything to the internet server goes by isp1 and nowhere else, by
	// policy.
	e := newDaemonEnv(t, "", `
[[policy]]
name = "server-isp1"
destinations = ["203.0.113.10/32", "2001:db8:ff::10/128"]
uplinks = ["isp1"]
last_resort = "unreachable"
`)
	for ns, name := range map[string]string{e.topo.ISP1: "isp1", e.topo.ISP2: "isp2"} {
		for _, a := range []string{
			fmt.Sprintf("TCP4-LISTEN:8000,bind=%s,fork,reuseaddr", topology.Internet),
			fmt.Sprintf("TCP6-LISTEN:8000,bind=[%s],fork,reuseaddr", topology.Internet6),
		} {
			srv, err := e.topo.ServeSocat(ns, a, "echo "+name+" $SOCAT_PEERADDR", "-Hltn", 8000)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(srv.Close)
		}
		srv, err := e.topo.ServeSocat(ns, fmt.Sprintf("UDP4-RECVFROM:8000,bind=%s,fork,reuseaddr", topology.Internet),
			"echo "+name+" $SOCAT_PEERADDR", "-Hlun", 8000)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(srv.Close)
	}
	e.start()
	e.waitFor("both uplinks up", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })

	tcp4 := []string{"socat", "-T3", "-u", fmt.Sprintf("TCP4:%s:8000,connect-timeout=2", topology.Internet), "STDOUT"}
	tcp6 := []string{"socat", "-T3", "-u", fmt.Sprintf("TCP6:[%s]:8000,connect-timeout=2", topology.Internet6), "STDOUT"}
	udp4 := []string{"sh", "-c", fmt.Sprintf("echo hi | socat -T3 -t1 - UDP4-SENDTO:%s:8000", topology.Internet)}

	// Control: the box's own connection follows the policy.
	if got, err := e.inHookedCgroup(tcp4...); err != nil || got != "isp1 "+topology.ISP1Local.String() {
		t.Fatalf("without exec: %q, %v; want the policy's isp1", got, err)
	}
	for _, c := range []struct {
		name string
		argv []string
		want string
	}{
		{"tcp4", tcp4, "isp2 " + topology.ISP2Local.String()},
		{"udp4 unconnected", udp4, "isp2 " + topology.ISP2Local.String()},
		{"tcp6", tcp6, "isp2 [" + topology.ISP2Local6.StringExpanded() + "]"},
	} {
		got, err := e.execVia("isp2", c.argv...)
		if err != nil || got != c.want {
			t.Errorf("exec --uplink isp2, %s: %q, %v; want %q", c.name, got, err, c.want)
		}
	}
	if got, err := e.execVia("isp1", tcp4...); err != nil || got != "isp1 "+topology.ISP1Local.String() {
		t.Errorf("exec --uplink isp1: %q, %v", got, err)
	}

	// The command's exit code is exec's.
	if _, err := e.execVia("isp1", "sh", "-c", "exit 7"); exitCode(err) != 7 {
		t.Errorf("exit 7 came back as %d (%v)", exitCode(err), err)
	}
	if out, err := e.execVia("isp9", "true"); err == nil || !strings.Contains(out, `--uplink "isp9": no such uplink (uplinks: isp1, isp2)`) {
		t.Errorf("unknown uplink: %v\n%s", err, out)
	}

	// A down uplink: refused, and the command never ran.
	if err := e.topo.IP(e.topo.Router, "link", "set", "ppp1", "down"); err != nil {
		t.Fatal(err)
	}
	e.waitFor("isp2 out", 3*time.Second, func() bool { st, _ := e.statusJSON(); return st.Health == "degraded" })
	marker := filepath.Join(t.TempDir(), "ran")
	out, err := e.execVia("isp2", "touch", marker)
	if err == nil || !strings.Contains(out, "uplink isp2 is down (link down): not running the command") {
		t.Errorf("exec by a down uplink: %v\n%s", err, out)
	}
	if _, serr := os.Stat(marker); serr == nil {
		t.Error("the command ran although its uplink is down")
	}

	// No cgroup of exec's is left.
	left, _ := filepath.Glob(filepath.Join(e.cgroup, "mhbpf-exec-*"))
	if len(left) > 0 {
		t.Errorf("cgroups left: %v", left)
	}
}
