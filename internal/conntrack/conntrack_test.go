package conntrack

import (
	"net"
	"net/netip"
	"os/exec"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/testutil"
)

func flow(family uint8, proto uint8, fwdSrc, fwdDst, revSrc, revDst string) *netlink.ConntrackFlow {
	return &netlink.ConntrackFlow{FamilyType: family,
		Forward: netlink.IPTuple{Protocol: proto, SrcIP: net.ParseIP(fwdSrc), DstIP: net.ParseIP(fwdDst), SrcPort: 40000, DstPort: 443},
		Reverse: netlink.IPTuple{Protocol: proto, SrcIP: net.ParseIP(revSrc), DstIP: net.ParseIP(revDst), SrcPort: 443, DstPort: 40000},
	}
}

func matches(filters []netlink.CustomConntrackFilter, f *netlink.ConntrackFlow) bool {
	for _, x := range filters {
		if x.MatchConntrackFlow(f) {
			return true
		}
	}
	return false
}

// The dead uplink has 100.64.0.2 and 2001:db8:0:1::2; the live one
// 100.64.1.2. A LAN host is 100.64.2.10, a server 203.0.113.10.
func TestFiltersMatchOnlyWhatIsBoundToTheAddresses(t *testing.T) {
	v4, v6 := Filters([]netip.Addr{
		netip.MustParseAddr("100.64.0.2"), netip.MustParseAddr("2001:db8:0:1::2"),
		netip.MustParseAddr("::ffff:100.64.0.2"), // the same IPv4 address, mapped: no second filter
		{},                                       // no address: skipped
	})
	if len(v4) != 1 || len(v6) != 1 {
		t.Fatalf("%d IPv4 and %d IPv6 filters, want one each", len(v4), len(v6))
	}
	for _, c := range []struct {
		what string
		f    *netlink.ConntrackFlow
		want bool
	}{
		{"LAN host masqueraded to the dead uplink's address",
			flow(unix.AF_INET, unix.IPPROTO_TCP, "100.64.2.10", "203.0.113.10", "203.0.113.10", "100.64.0.2"), true},
		{"UDP, the same",
			flow(unix.AF_INET, unix.IPPROTO_UDP, "100.64.2.10", "203.0.113.10", "203.0.113.10", "100.64.0.2"), true},
		{"the box's own connection from the dead uplink's address",
			flow(unix.AF_INET, unix.IPPROTO_TCP, "100.64.0.2", "203.0.113.10", "203.0.113.10", "100.64.0.2"), true},
		{"IPv6 masqueraded to the dead uplink's address",
			flow(unix.AF_INET6, unix.IPPROTO_TCP, "2001:db8:0:3::10", "2001:db8:ff::10", "2001:db8:ff::10", "2001:db8:0:1::2"), true},
		{"LAN host masqueraded to the live uplink's address",
			flow(unix.AF_INET, unix.IPPROTO_TCP, "100.64.2.10", "203.0.113.10", "203.0.113.10", "100.64.1.2"), false},
		{"not NATed (the LAN host's own address)",
			flow(unix.AF_INET, unix.IPPROTO_TCP, "100.64.2.10", "203.0.113.10", "203.0.113.10", "100.64.2.10"), false},
		{"a visitor's connection to the box on the dead uplink's address",
			flow(unix.AF_INET, unix.IPPROTO_TCP, "198.51.100.50", "100.64.0.2", "100.64.0.2", "198.51.100.50"), false},
		{"a visitor's connection forwarded to the LAN through the dead uplink's address",
			flow(unix.AF_INET, unix.IPPROTO_TCP, "198.51.100.50", "100.64.0.2", "100.64.2.10", "198.51.100.50"), false},
		{"a server on the dead uplink's address in the original direction only",
			flow(unix.AF_INET, unix.IPPROTO_TCP, "100.64.2.10", "100.64.0.2", "100.64.0.2", "100.64.2.10"), false},
	} {
		got := matches(v4, c.f) || matches(v6, c.f)
		if got != c.want {
			t.Errorf("%s: matched %v, want %v", c.what, got, c.want)
		}
	}
}

// No address, no filter: Forget must never turn into a flush.
func TestNoAddressesNoFilters(t *testing.T) {
	v4, v6 := Filters(nil)
	if len(v4) != 0 || len(v6) != 0 {
		t.Fatalf("filters for no addresses: %d, %d", len(v4), len(v6))
	}
	n, err := Forget(nil, nil) // a nil handle: not even touched
	if n != 0 || err != nil {
		t.Fatalf("Forget(nil addresses) = %d, %v", n, err)
	}
}

// On the kernel: in a namespace of its own, entries bound to the dead
// uplink's addresses go, every other entry stays. (Runs under the network
// tests' lock, like every test that makes a namespace.)
func TestForgetOnTheKernel(t *testing.T) {
	testutil.RequireRoot(t)
	name := testutil.UniqueName("mhct-")
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	ns, err := netns.GetFromName(name)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()

	ip := func(s string) net.IP {
		a := net.ParseIP(s)
		if v4 := a.To4(); v4 != nil {
			return v4
		}
		return a
	}
	entry := func(sport uint16, fwdSrc, fwdDst, revSrc, revDst string) *netlink.ConntrackFlow {
		fam := uint8(unix.AF_INET)
		if ip(fwdSrc).To4() == nil {
			fam = unix.AF_INET6
		}
		return &netlink.ConntrackFlow{FamilyType: fam, TimeOut: 120,
			Forward: netlink.IPTuple{Protocol: unix.IPPROTO_UDP, SrcIP: ip(fwdSrc), DstIP: ip(fwdDst), SrcPort: sport, DstPort: 9000},
			Reverse: netlink.IPTuple{Protocol: unix.IPPROTO_UDP, SrcIP: ip(revSrc), DstIP: ip(revDst), SrcPort: 9000, DstPort: sport},
		}
	}
	gone := []*netlink.ConntrackFlow{
		entry(40001, "100.64.2.10", "203.0.113.10", "203.0.113.10", "100.64.0.2"),
		entry(40002, "100.64.0.2", "203.0.113.10", "203.0.113.10", "100.64.0.2"),
		entry(40003, "2001:db8:0:3::10", "2001:db8:ff::10", "2001:db8:ff::10", "2001:db8:0:1::2"),
	}
	kept := []*netlink.ConntrackFlow{
		entry(40011, "100.64.2.10", "203.0.113.10", "203.0.113.10", "100.64.1.2"),
		entry(40012, "198.51.100.50", "100.64.0.2", "100.64.0.2", "198.51.100.50"),
		entry(40013, "2001:db8:0:3::10", "2001:db8:ff::10", "2001:db8:ff::10", "2001:db8:0:2::2"),
		entry(40014, "100.64.2.10", "203.0.113.10", "203.0.113.10", "100.64.2.10"),
	}
	for _, f := range append(append([]*netlink.ConntrackFlow{}, gone...), kept...) {
		if err := h.ConntrackCreate(netlink.ConntrackTable, netlink.InetFamily(f.FamilyType), f); err != nil {
			t.Fatalf("create %s: %v", f, err)
		}
	}
	n, err := Forget(h, []netip.Addr{netip.MustParseAddr("100.64.0.2"), netip.MustParseAddr("2001:db8:0:1::2")})
	if err != nil || n != len(gone) {
		t.Fatalf("Forget: %d, %v; want %d deleted", n, err, len(gone))
	}
	left := map[uint16]bool{}
	for _, fam := range []netlink.InetFamily{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		flows, err := h.ConntrackTableList(netlink.ConntrackTable, fam)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range flows {
			left[f.Forward.SrcPort] = true
		}
	}
	for _, f := range gone {
		if left[f.Forward.SrcPort] {
			t.Errorf("still there: %s", f)
		}
	}
	for _, f := range kept {
		if !left[f.Forward.SrcPort] {
			t.Errorf("deleted, but not bound to the addresses: %s", f)
		}
	}
}
