package test

import (
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/packet"
	"github.com/mhbpf/mhbpf/internal/testutil"
	"github.com/mhbpf/mhbpf/internal/topology"
)

func (e *daemonEnv) serveEcho(ns, name string, addr netip.Addr, port uint16) {
	e.t.Helper()
	srv, err := e.topo.ServeSocat(ns, fmt.Sprintf("TCP4-LISTEN:%d,bind=%s,fork,reuseaddr", port, addr),
		"while read l; do echo "+name+" $SOCAT_PEERADDR; done", "-Hltn", port)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(srv.Close)
}

// synFlood sends SYNs with spoofed sources (all of 198.51.100.0/24, every
// port) from ns to dst, as fast as two senders can, for d. It returns how
// many it sent.
func synFlood(t *testing.T, ns string, dsts []netip.AddrPort, d time.Duration) int64 {
	t.Helper()
	var fd int
	testutil.InNetNS(t, ns, func() {
		var err error
		if fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_RAW); err != nil {
			t.Fatal(err)
		}
	})
	defer unix.Close(fd)
	var sent atomic.Int64
	var wg sync.WaitGroup
	stop := time.Now().Add(d)
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; time.Now().Before(stop); i += 2 {
				dst := dsts[i%len(dsts)]
				src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 51, 100, byte(i)}), uint16(1024+i>>8%60000))
				b := packet.Packet{Src: src, Dst: dst, Proto: packet.ProtoTCP, TCPFlags: packet.TCPSyn, L3: true}.Bytes()
				if unix.Sendto(fd, b, 0, &unix.SockaddrInet4{Addr: dst.Addr().As4()}) == nil {
					sent.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	return sent.Load()
}

// A sustained SYN flood on isp1 (spoofed sources, to the box and to a port
// forward) at the highest rate this host can send: idle LAN connections on
// each uplink and a port-forwarded connection keep working with their source
// addresses, a LAN destination keeps its sticky uplink, and the refused
// inbound records are counted. The maps are small here so that the flood
// overflows them many times.
func TestDaemonSurvivesInboundFlood(t *testing.T) {
	e := newDaemonEnv(t, "masquerade = true", `
[[policy]]
name = "to-isp1"
destinations = ["203.0.113.10/32"]
protocol = "tcp"
ports = [8050]
uplinks = ["isp1"]

[[policy]]
name = "to-isp2"
destinations = ["198.51.100.50/32"]
uplinks = ["isp2"]
`)
	// Weights 1:8, so that a LAN packet that lost its flow record and
	// falls back to main's multipath route most likely leaves by isp2,
	// whatever uplink its connection is bound to.
	cfg := strings.Replace(readFile(t, e.cfgPath), "weight = 8\n", "weight = 1\n", 1)
	cfg = strings.Replace(cfg, "weight = 2\n", "weight = 8\nmasquerade = true\n", 1)
	e.writeConfig(strings.Replace(cfg,
		"[global]\n", "[global]\nflow_map_size = 4096\ninbound_map_size = 1024\ninbound_rate = 1000\n", 1))
	nft := `table ip portfwd {
	chain pre { type nat hook prerouting priority dstnat; ip daddr 100.64.0.2 tcp dport 8052 dnat to 100.64.2.10:8053; }
}`
	cmd := e.inRouter("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(nft)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v\n%s", err, out)
	}
	e.serveEcho(e.topo.ISP1, "isp1", topology.Internet, 8050)
	e.serveEcho(e.topo.ISP1, "isp1", topology.Internet, 8051)
	e.serveEcho(e.topo.ISP2, "isp2", topology.Internet, 8051)
	e.serveEcho(e.topo.ISP2, "isp2", topology.ISP2Client, 8050)
	e.serveEcho(e.topo.LAN, "lan", topology.LANHost, 8053)
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })

	conns := map[string]*heldConn{
		"LAN by isp1":  holdConn(t, e.topo.LAN, fmt.Sprintf("TCP4:%s:8050", topology.Internet)),
		"LAN by isp2":  holdConn(t, e.topo.LAN, fmt.Sprintf("TCP4:%s:8050", topology.ISP2Client)),
		"port forward": holdConn(t, e.topo.ISP1, fmt.Sprintf("TCP4:%s:8052,bind=%s", topology.ISP1Local, topology.Internet)),
	}
	before := map[string]string{}
	for name, c := range conns {
		if before[name] = c.say("ping"); before[name] == "" {
			t.Fatalf("%s: no answer before the flood", name)
		}
	}
	if !strings.HasSuffix(before["LAN by isp1"], topology.ISP1Local.String()) || !strings.HasSuffix(before["LAN by isp2"], topology.ISP2Local.String()) ||
		!strings.HasSuffix(before["port forward"], topology.Internet.String()) {
		t.Fatalf("before the flood: %v", before)
	}
	sticky, err := e.topo.Dial(e.topo.LAN, "", topology.Internet, 8051)
	if err != nil {
		t.Fatal(err)
	}

	const d = 3 * time.Second
	n := synFlood(t, e.topo.ISP1, []netip.AddrPort{netip.AddrPortFrom(topology.ISP1Local, 8052),
		netip.AddrPortFrom(topology.ISP1Local, 80), netip.AddrPortFrom(topology.ISP1Local, 8052)}, d)
	t.Logf("flood: %d SYNs in %v (%.0f/s)", n, d, float64(n)/d.Seconds())
	if n < 50000 {
		t.Fatalf("only %d SYNs sent: not a flood", n)
	}

	for name, c := range conns {
		if got := c.say("ping"); got != before[name] {
			t.Errorf("%s after the flood: %q, was %q", name, got, before[name])
		}
	}
	if got, err := e.topo.Dial(e.topo.LAN, "", topology.Internet, 8051); err != nil || got != sticky {
		t.Errorf("balanced destination after the flood: %q (%v), was %q: its sticky uplink must hold", got, err, sticky)
	}
	m, err := loader.OpenPinned(e.pinDir)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	c, err := m.UplinkCounters(0)
	if err != nil {
		t.Fatal(err)
	}
	// The flood lives in the inbound map only: the LAN's map holds the
	// LAN's flows and nothing else.
	var lanFlows, other int
	if err := m.WalkLANFlows(func(f maps.Flow) bool {
		if f.Key.Src.Addr() == topology.LANHost {
			lanFlows++
		} else {
			other++
		}
		return true
	}); err != nil {
		t.Fatal(err)
	}
	if lanFlows < 4 || other != 0 {
		t.Errorf("the LAN's flow map after the flood: %d LAN flows, %d others; want the LAN's connections only", lanFlows, other)
	}
	t.Logf("isp1: %d inbound records, %d refused", c.InboundAdmitted, c.InboundRefused)
	if c.InboundRefused == 0 || c.InboundAdmitted > 2*uint64(d/time.Second+2)*1000 {
		t.Errorf("isp1's inbound budget: %d recorded, %d refused; want about 1000/s recorded, the rest refused", c.InboundAdmitted, c.InboundRefused)
	}
}
