package routing

import (
	"fmt"
	"math/bits"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/mhbpf/mhbpf/internal/testutil"
)

var settings = Settings{RulePriority: 10000, RouteProtocol: 77, StrictMark: 0x800000, ReplyMark: 0x400000}

var lan = []netip.Prefix{netip.MustParsePrefix("100.64.2.0/24"), netip.MustParsePrefix("2001:db8:0:3::/64")}

func uplinks(ifindex0, ifindex1 int, usable1 bool) []Uplink {
	return []Uplink{
		{Pos: 0, Interface: "up0", Table: 100, Mark: 0x10000, Weight: 8, Balance: true, Ifindex: ifindex0, LinkUp: true, Usable: true,
			Gateway: netip.MustParseAddr("100.64.0.1"), Addrs: []netip.Addr{netip.MustParseAddr("100.64.0.2")}},
		{Pos: 1, Interface: "up1", Table: 101, Mark: 0x20000, Weight: 2, Balance: true, Ifindex: ifindex1, LinkUp: usable1, Usable: usable1,
			Gateway: netip.MustParseAddr("100.64.1.1"), Addrs: []netip.Addr{netip.MustParseAddr("100.64.1.2")}},
	}
}

// The whole state, in the order the kernel tries the rules: arrival
// interface, the LAN, answers by arrival uplink, main's specific routes,
// source addresses, the marks, fail closed.
const wantBothUp = `10000: from all iif up0 lookup main
10001: from all iif up1 lookup main
10016: from all to 100.64.2.0/24 lookup main
10020: from all fwmark 0x410000/0x410000 lookup 100
10021: from all fwmark 0x420000/0x420000 lookup 101
10036: from all lookup main suppress_prefixlength 1
10040: from 100.64.0.2/32 lookup 100
10041: from 100.64.1.2/32 lookup 101
10060: from all fwmark 0x10000/0x10000 lookup 100
10061: from all fwmark 0x20000/0x20000 lookup 101
10080: from all fwmark 0x800000/0x800000 unreachable
-6 10000: from all iif up0 lookup main
-6 10001: from all iif up1 lookup main
-6 10016: from all to 2001:db8:0:3::/64 lookup main
-6 10020: from all fwmark 0x410000/0x410000 lookup 100
-6 10021: from all fwmark 0x420000/0x420000 lookup 101
-6 10036: from all lookup main suppress_prefixlength 1
-6 10060: from all fwmark 0x10000/0x10000 lookup 100
-6 10061: from all fwmark 0x20000/0x20000 lookup 101
-6 10080: from all fwmark 0x800000/0x800000 unreachable
default table 100 via 100.64.0.1 dev #2
default table 101 via 100.64.1.1 dev #3
default table 254 nexthop via 100.64.0.1 dev #2 weight 8 nexthop via 100.64.1.1 dev #3 weight 2
`

// isp2 unusable: its table loses its route, main goes single-path; the
// rules stay (the kernel falls through them by itself).
const wantRoutesIsp2Down = `default table 100 via 100.64.0.1 dev #2
default table 254 via 100.64.0.1 dev #2
`

func TestDesiredState(t *testing.T) {
	st := Desired(settings, uplinks(2, 3, true), lan)
	sortRules(st.Rules)
	if got := st.String(); got != wantBothUp {
		t.Fatalf("desired state:\n%s\nwant:\n%s", got, wantBothUp)
	}
	st = Desired(settings, uplinks(2, 3, false), lan)
	if got := (State{Routes: st.Routes}).String(); got != wantRoutesIsp2Down {
		t.Fatalf("routes with isp2 down:\n%s\nwant:\n%s", got, wantRoutesIsp2Down)
	}
}

// The rules follow the uplinks' positions (the preference order), whatever
// their tables and marks; with the most uplinks there can be (16), every
// kind of rule keeps to its own priorities, inside the block.
func TestDesiredPrioritiesFollowPosition(t *testing.T) {
	var ups []Uplink
	for pos := 0; pos < 16; pos++ {
		// Tables and marks deliberately not in position order.
		ups = append(ups, Uplink{Pos: pos, Interface: fmt.Sprintf("up%d", pos), Table: 115 - pos, Mark: 1 << (15 - pos),
			Weight: 1, Balance: true, Ifindex: 2 + pos, LinkUp: true, Usable: true,
			Addrs: []netip.Addr{netip.AddrFrom4([4]byte{100, 64, byte(pos), 2})}})
	}
	st := Desired(settings, ups, lan)
	kinds := map[int]string{}
	for _, r := range st.Rules {
		if r.Priority < settings.RulePriority || r.Priority >= settings.RulePriority+BlockSize {
			t.Fatalf("rule %s outside the block", RuleKey(&r))
		}
		kind := "other"
		switch {
		case r.IifName != "":
			kind = "iif"
		case r.Src != nil:
			kind = "from"
		case r.Mask != nil && *r.Mask&settings.ReplyMark != 0:
			kind = "reply"
		case r.Mask != nil && *r.Mask == settings.StrictMark:
			kind = "strict"
		case r.Mask != nil:
			kind = "mark"
		}
		if k, ok := kinds[r.Priority]; ok && k != kind {
			t.Fatalf("priority %d has %s and %s rules", r.Priority, k, kind)
		}
		kinds[r.Priority] = kind
		if kind == "mark" {
			pos := 15 - bits.TrailingZeros32(r.Mark)
			if r.Priority != settings.RulePriority+prioMark+pos || r.Table != 115-pos {
				t.Fatalf("mark rule %s: want priority %d (position %d)", RuleKey(&r), settings.RulePriority+prioMark+pos, pos)
			}
		}
	}
}

func sortRules(rules []netlink.Rule) {
	slices.SortStableFunc(rules, func(a, b netlink.Rule) int {
		if a.Family != b.Family {
			return a.Family - b.Family
		}
		return a.Priority - b.Priority
	})
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
		want := Desired(settings, uplinks(l0.Attrs().Index, l1.Attrs().Index, true), lan)
		changes, err := Apply(h, settings, want)
		if err != nil || len(changes) != len(want.Rules)+len(want.Routes) {
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
