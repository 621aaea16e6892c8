package test

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/mhbpf/mhbpf/internal/topology"
)

// A UDP datagram larger than the LAN's MTU leaves the LAN host in
// fragments, and only the first carries the ports a policy steers by.
// Without masquerade nothing on the router reassembles before routing
// (no conntrack), so each fragment is routed on its own: the later ones
// must follow the first, or the datagram, split between the two ISPs,
// never arrives. One policy per uplink: whichever uplink main's multipath
// route picks for the fragments (by addresses alone), one of the two
// policies wants the other. IPv4 and IPv6.
func TestFragmentsFollowTheirFirst(t *testing.T) {
	e := newDaemonEnv(t, "", `
[[policy]]
name = "udp-by-isp1"
protocol = "udp"
ports = [8071]
uplinks = ["isp1"]

[[policy]]
name = "udp-by-isp2"
protocol = "udp"
ports = [8072]
uplinks = ["isp2"]
`)
	for ns, name := range map[string]string{e.topo.ISP1: "isp1", e.topo.ISP2: "isp2"} {
		for _, port := range []uint16{8071, 8072} {
			for _, addr := range []netip.Addr{topology.Internet, topology.Internet6} {
				serveUDPAnswers(t, ns, name, addr, port)
			}
		}
	}
	e.start()
	e.waitFor("both uplinks up", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	if out, _ := e.inRouter("nft", "list", "ruleset").CombinedOutput(); strings.Contains(string(out), "masquerade") || strings.Contains(string(out), " ct ") {
		t.Fatalf("the router has conntrack in use, which reassembles before routing: the test proves nothing\n%s", out)
	}
	payload := strings.Repeat("f", 3000) + "\n" // three fragments at an MTU of 1500
	for _, c := range []struct {
		addr netip.Addr
		peer netip.Addr
	}{{topology.Internet, topology.LANHost}, {topology.Internet6, topology.LANHost6}} {
		for port, want := range map[uint16]string{8071: "isp1", 8072: "isp2"} {
			addr := fmt.Sprintf("UDP4:%s:%d", c.addr, port)
			if c.addr.Is6() {
				addr = fmt.Sprintf("UDP6:[%s]:%d", c.addr, port)
			}
			got, err := e.topo.Socat(e.topo.LAN, "", payload, addr)
			if name, peer := answer(got); err != nil || name != want || peer != c.peer {
				t.Errorf("a fragmented datagram to %s: answer %q, %v; want %s's, to %s", addr, got, err, want, c.peer)
			}
		}
	}
}
