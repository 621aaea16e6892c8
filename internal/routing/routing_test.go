package routing

import (
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/mhbpf/mhbpf/internal/testutil"
)

var settings = Settings{RulePriority: 10000, RouteProtocol: 77, StrictMark: 0x800000}

func uplinks(ifindex0, ifindex1 int, usable1 bool) []Uplink {
	return []Uplink{
		{ID: 0, Interface: "up0", Table: 100, Mark: 0x10000, Weight: 8, Balance: true, Ifindex: ifindex0, LinkUp: true, Usable: true,
			Gateway: netip.MustParseAddr("100.64.0.1"), Addrs: []netip.Addr{netip.MustParseAddr("100.64.0.2")}},
		{ID: 1, Interface: "up1", Table: 101, Mark: 0x20000, Weight: 2, Balance: true, Ifindex: ifindex1, LinkUp: usable1, Usable: usable1,
			Gateway: netip.MustParseAddr("100.64.1.1"), Addrs: []netip.Addr{netip.MustParseAddr("100.64.1.2")}},
	}
}

func TestDesiredState(t *testing.T) {
	st := Desired(settings, uplinks(2, 3, true))
	// Per family: 2 iif + 2 mark + 1 strict; from rules only for the
	// family of each address (IPv4 here).
	if len(st.Rules) != 12 {
		t.Fatalf("%d rules, want 12", len(st.Rules))
	}
	// Two tables and main, IPv4 only (no IPv6 addresses).
	if len(st.Routes) != 3 {
		t.Fatalf("%d routes, want 3: %v", len(st.Routes), st.Routes)
	}
	main := st.Routes[2]
	if main.Table != 254 || len(main.MultiPath) != 2 || main.MultiPath[0].Hops != 7 || main.MultiPath[1].Hops != 1 {
		t.Fatalf("main route %+v", main)
	}
	// isp2 unusable: its table loses its route, main goes single-path.
	st = Desired(settings, uplinks(2, 3, false))
	if len(st.Routes) != 2 || len(st.Routes[1].MultiPath) != 0 || st.Routes[1].LinkIndex != 2 {
		t.Fatalf("routes with isp2 down: %v", st.Routes)
	}
}

// Apply is idempotent, Remove takes only mhbpf's own, and a foreign rule
// inside mhbpf's priority block (another protocol) is left alone.
func TestApplyTwiceRemoveTwice(t *testing.T) {
	testutil.RequireRoot(t)
	ns := testutil.UniqueName("mhr")
	testutil.Run(t, "ip", "netns", "add", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	for _, c := range [][]string{
		{"link", "add", "up0", "type", "veth", "peer", "name", "p0"},
		{"link", "add", "up1", "type", "veth", "peer", "name", "p1"},
		{"link", "set", "up0", "up"}, {"link", "set", "up1", "up"},
		{"addr", "add", "100.64.0.2/30", "dev", "up0"}, {"addr", "add", "100.64.1.2/30", "dev", "up1"},
		{"rule", "add", "pref", "10050", "fwmark", "0x1", "lookup", "main"}, // someone else's, in our block
	} {
		testutil.Run(t, "ip", append([]string{"-n", ns}, c...)...)
	}
	testutil.InNetNS(t, ns, func() {
		h, err := netlink.NewHandle()
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		l0, _ := h.LinkByName("up0")
		l1, _ := h.LinkByName("up1")
		want := Desired(settings, uplinks(l0.Attrs().Index, l1.Attrs().Index, true))
		changes, err := Apply(h, settings, want)
		if err != nil || len(changes) != 15 {
			t.Fatalf("first apply: %d changes, %v: %v", len(changes), err, changes)
		}
		changes, err = Apply(h, settings, want)
		if err != nil || len(changes) != 0 {
			t.Fatalf("second apply changed %v (%v)", changes, err)
		}
		for i := 0; i < 2; i++ {
			if err := Remove(h, settings); err != nil {
				t.Fatalf("remove %d: %v", i+1, err)
			}
		}
		cur, err := Current(h, settings)
		if err != nil || len(cur.Rules)+len(cur.Routes) != 0 {
			t.Fatalf("after remove: %+v %v", cur, err)
		}
	})
	out := testutil.Run(t, "ip", "-n", ns, "rule")
	if !strings.Contains(out, "10050:") {
		t.Fatalf("the foreign rule in mhbpf's block was removed:\n%s", out)
	}
	if out := testutil.Run(t, "ip", "-n", ns, "route", "show", "table", "all"); strings.Contains(out, "proto 77") {
		t.Fatalf("routes left:\n%s", out)
	}
}
