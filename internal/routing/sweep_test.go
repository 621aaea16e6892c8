package routing

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/mhbpf/mhbpf/internal/testutil"
)

// RemoveAll finds mhbpf's rules by protocol outside the priority block,
// and leaves others' alone.
func TestRemoveAllFindsRulesAnywhere(t *testing.T) {
	testutil.RequireRoot(t)
	ns := testutil.UniqueName("mhs")
	testutil.Run(t, "ip", "netns", "add", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	for _, c := range [][]string{
		{"rule", "add", "pref", "20040", "fwmark", "0x10000/0x10000", "lookup", "100", "proto", "77"},
		{"-6", "rule", "add", "pref", "20060", "fwmark", "0x800000/0x800000", "unreachable", "proto", "77"},
		{"rule", "add", "pref", "20041", "fwmark", "0x1", "lookup", "main"}, // someone else's
		{"link", "set", "lo", "up"},
		{"route", "add", "198.51.100.0/24", "dev", "lo", "table", "150", "proto", "77"},
	} {
		testutil.Run(t, "ip", append([]string{"-n", ns}, c...)...)
	}
	testutil.InNetNS(t, ns, func() {
		h, err := netlink.NewHandle()
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		for i := 0; i < 2; i++ {
			if err := RemoveAll(h, settings); err != nil {
				t.Fatalf("remove %d: %v", i+1, err)
			}
		}
	})
	rules := testutil.Run(t, "ip", "-n", ns, "rule") + testutil.Run(t, "ip", "-n", ns, "-6", "rule")
	if strings.Contains(rules, "proto 77") || !strings.Contains(rules, "20041:") {
		t.Fatalf("rules after RemoveAll:\n%s", rules)
	}
	if out := testutil.Run(t, "ip", "-n", ns, "route", "show", "table", "all"); strings.Contains(out, "proto 77") {
		t.Fatalf("routes left:\n%s", out)
	}
}
