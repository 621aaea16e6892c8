package routing

import (
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/mhbpf/mhbpf/internal/testutil"
)

// The routes of others that mhbpf's replace: recorded once, put back
// exactly (IPv4 with a metric attribute, IPv6 multipath), a slot already
// recorded not overwritten, a route whose device is gone reported and
// skipped.
func TestSaveReplacedRestoresExactly(t *testing.T) {
	testutil.RequireRoot(t)
	ns := testutil.UniqueName("mhs")
	testutil.Run(t, "ip", "netns", "add", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	ip := func(args ...string) string { return testutil.Run(t, "ip", append([]string{"-n", ns}, args...)...) }
	for _, c := range [][]string{
		{"link", "add", "up0", "type", "veth", "peer", "name", "p0"},
		{"link", "add", "up1", "type", "veth", "peer", "name", "p1"},
		{"link", "add", "gone0", "type", "veth", "peer", "name", "g0"},
		{"link", "set", "up0", "up"}, {"link", "set", "up1", "up"}, {"link", "set", "gone0", "up"},
		{"link", "set", "p0", "up"}, {"link", "set", "p1", "up"}, {"link", "set", "g0", "up"},
		{"addr", "add", "100.64.0.2/30", "dev", "up0"}, {"addr", "add", "100.64.1.2/30", "dev", "up1"},
		{"addr", "add", "2001:db8:0:1::2/64", "dev", "up0", "nodad"}, {"addr", "add", "2001:db8:0:2::2/64", "dev", "up1", "nodad"},
		{"addr", "add", "192.0.2.2/24", "dev", "gone0"},
		{"route", "add", "default", "via", "100.64.0.1", "dev", "up0", "proto", "static", "mtu", "1400", "onlink"},
		{"-6", "route", "add", "default", "proto", "dhcp", "nexthop", "via", "2001:db8:0:1::1", "dev", "up0", "weight", "3",
			"nexthop", "via", "2001:db8:0:2::1", "dev", "up1"},
		{"route", "add", "default", "via", "192.0.2.1", "dev", "gone0", "table", "101", "proto", "boot"},
	} {
		ip(c...)
	}
	before4, before6 := ip("route", "show", "default"), ip("-6", "route", "show", "default")
	file := filepath.Join(t.TempDir(), "routes.json")
	var logBuf strings.Builder
	log := slog.New(slog.NewTextHandler(&logBuf, nil))
	testutil.InNetNS(t, ns, func() {
		h, err := netlink.NewHandle()
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		l0, _ := h.LinkByName("up0")
		l1, _ := h.LinkByName("up1")
		ups := uplinks(l0.Attrs().Index, l1.Attrs().Index, true)
		ups[0].Gateway6, ups[1].Gateway6 = netip.MustParseAddr("2001:db8:0:1::1"), netip.MustParseAddr("2001:db8:0:2::1")
		ups[0].Addrs = append(ups[0].Addrs, netip.MustParseAddr("2001:db8:0:1::2"))
		ups[1].Addrs = append(ups[1].Addrs, netip.MustParseAddr("2001:db8:0:2::2"))
		want := Desired(settings, ups, nil)
		saved, err := SaveReplaced(h, file, settings, want)
		if err != nil || len(saved) != 3 {
			t.Fatalf("recorded %d routes, want 3 (main IPv4 and IPv6, table 101): %v %v", len(saved), saved, err)
		}
		if _, err := Apply(h, settings, want); err != nil {
			t.Fatal(err)
		}
		// Replaced: mhbpf's are in the slots now, and recording again
		// (a restarted daemon) records nothing.
		if again, err := SaveReplaced(h, file, settings, want); err != nil || len(again) != 0 {
			t.Fatalf("second record: %v %v", again, err)
		}
		// Someone puts a route in a recorded slot while mhbpf's is out: it
		// is replaced again, but the original record stays.
		if err := Remove(h, settings); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("ip", "-n", ns, "route", "add", "default", "via", "100.64.1.1", "dev", "up1", "proto", "dhcp").CombinedOutput(); err != nil {
			t.Fatalf("%v %s", err, out)
		}
		if again, err := SaveReplaced(h, file, settings, want); err != nil || len(again) != 0 {
			t.Fatalf("a recorded slot was recorded again: %v %v", again, err)
		}
		if _, err := Apply(h, settings, want); err != nil {
			t.Fatal(err)
		}
		if out := testutil.Run(t, "ip", "-n", ns, "route", "show", "default"); !strings.Contains(out, "proto 77") {
			t.Fatalf("main's default is not mhbpf's: %s", out)
		}
		if out, err := exec.Command("ip", "-n", ns, "link", "del", "gone0").CombinedOutput(); err != nil {
			t.Fatalf("%v %s", err, out)
		}
		if err := Remove(h, settings); err != nil {
			t.Fatal(err)
		}
		if err := RestoreSaved(h, file, log); err != nil {
			t.Fatalf("restore: %v\n%s", err, logBuf.String())
		}
	})
	if got := ip("route", "show", "default"); got != before4 {
		t.Errorf("IPv4 default after restore:\n%q\nwant\n%q", got, before4)
	}
	if got := ip("-6", "route", "show", "default"); got != before6 {
		t.Errorf("IPv6 default after restore:\n%q\nwant\n%q", got, before6)
	}
	if !strings.Contains(logBuf.String(), "device=gone0") || !strings.Contains(logBuf.String(), "no longer exists") {
		t.Errorf("the route of a vanished device is not reported:\n%s", logBuf.String())
	}
	if _, err := os.Stat(file); !os.IsNotExist(err) {
		t.Errorf("state file left: %v", err)
	}
	t.Logf("%s", logBuf.String())
}
