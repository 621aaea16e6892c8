package test

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/mhbpf/mhbpf/internal/testutil"
	"github.com/mhbpf/mhbpf/internal/topology"
)

// The ISPs of the test topology filter what the router sends by source
// address (BCP 38): its address on their line passes, the other ISP's is
// dropped before the ISP's own stack sees it, and counted, IPv4 and IPv6.
// Tests rely on it: a packet that leaves by one uplink with the other's
// address is lost, as with real providers.
func TestISPsDropForeignSources(t *testing.T) {
	testutil.RequireRoot(t)
	topo, err := topology.Build()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(topo.Close)
	for i, c := range []struct {
		isp          string
		peer         netip.Addr
		own, foreign netip.Addr
	}{
		{topo.ISP1, topology.ISP1Peer, topology.ISP1Local, topology.ISP2Local},
		{topo.ISP1, topology.ISP1Peer6, topology.ISP1Local6, topology.ISP2Local6},
		{topo.ISP2, topology.ISP2Peer, topology.ISP2Local, topology.ISP1Local},
		{topo.ISP2, topology.ISP2Peer6, topology.ISP2Local6, topology.ISP1Local6},
	} {
		// What reaches the ISP's own stack, by source.
		ipv := "ip"
		if c.peer.Is6() {
			ipv = "ip6"
		}
		table := fmt.Sprintf("seen%d", i)
		if err := topo.NFT(c.isp, fmt.Sprintf(`table inet %[1]s {
	chain own { type filter hook input priority 0; %[2]s saddr %[3]s counter; }
	chain foreign { type filter hook input priority 0; %[2]s saddr %[4]s counter; }
}
`, table, ipv, c.own, c.foreign)); err != nil {
			t.Fatal(err)
		}
		count := func(chain string) int {
			n, err := topo.NFTCounter(c.isp, "inet", table, chain)
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
		ping := func(src netip.Addr) error {
			return topo.Exec(topo.Router, "ping", "-c1", "-W1", "-I", src.String(), c.peer.String()).Run()
		}
		before, err := topo.SpoofedDrops(c.isp)
		if err != nil {
			t.Fatal(err)
		}
		if err := ping(c.own); err != nil || count("own") == 0 {
			t.Errorf("ping %s from the router's address on that line %s: %v, %d packets seen", c.peer, c.own, err, count("own"))
		}
		if n, _ := topo.SpoofedDrops(c.isp); n != before {
			t.Errorf("%s: %d packets from %s dropped as foreign", c.isp, n-before, c.own)
		}
		_ = ping(c.foreign) // no answer either way: the ISP has no route to it
		if n := count("foreign"); n != 0 {
			t.Errorf("%s: %d packets from the other ISP's address %s reached its stack", c.isp, n, c.foreign)
		}
		if n, _ := topo.SpoofedDrops(c.isp); n <= before {
			t.Errorf("%s: the packet from %s was not counted by the source filter", c.isp, c.foreign)
		}
	}
}
