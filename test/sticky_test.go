package test

import (
	"fmt"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/mhbpf/mhbpf/internal/topology"
)

// The sticky map as stored state, through the configuration: after a
// weight change, a destination (sticky = "destination", the default) and
// a source and destination pair (sticky = "pair") keep the uplink they were
// given while they are used, for every new connection, until they have
// been unused for sticky_timeout; then they follow the new weights. With
// sticky = "flow" nothing but the connection itself is kept: it stays on
// its uplink, and every new connection follows the new weights at once.
// The new weights are chosen so that every fresh choice differs from the
// stored one (choice_test.go), so "kept" cannot hold by coincidence.
func TestDaemonStickinessIsStoredState(t *testing.T) {
	const timeout = 3 * time.Second
	e := newDaemonEnv(t, "", `
[[policy]]
name = "per-pair"
destinations = ["203.0.113.10/32"]
protocol = "tcp"
ports = [8041]
uplinks = ["isp1", "isp2"]
balance = true
sticky = "pair"

[[policy]]
name = "per-flow"
destinations = ["203.0.113.10/32"]
protocol = "tcp"
ports = [8042]
uplinks = ["isp1", "isp2"]
balance = true
sticky = "flow"
`)
	e.setGlobal(fmt.Sprintf("sticky_timeout = %q", timeout))
	// A second LAN host: a pair of its own, the same destination.
	other := netip.MustParseAddr("100.64.2.11")
	if err := e.topo.IP(e.topo.LAN, "addr", "add", other.String()+"/24", "dev", "eth0"); err != nil {
		t.Fatal(err)
	}
	for _, port := range []uint16{8040, 8041, 8042} {
		serveGreetEcho(t, e, port)
	}
	const (
		defaultID = 0 // the default policy: sticky per destination
		pairID    = 1 // policy[0] + 1
	)
	dst := topology.Internet
	destHash := stickyHash(defaultID, modeDestination, netip.Addr{}, dst)
	pairHash := stickyHash(pairID, modePair, topology.LANHost, dst)
	otherPairHash := stickyHash(pairID, modePair, other, dst)
	var w1, w2 uint64
	found := false
	// New weights that move the destination and the LAN host's pair, and
	// give the other host's new pair the other uplink than the stored pair.
	for a := uint64(1); a <= 9 && !found; a++ {
		for b := uint64(1); b <= 9 && !found; b++ {
			found = pick(destHash, a, b) != pick(destHash, 8, 2) && pick(pairHash, a, b) != pick(pairHash, 8, 2) &&
				pick(otherPairHash, a, b) != pick(pairHash, 8, 2)
			if found {
				w1, w2 = a, b
			}
		}
	}
	if !found {
		t.Fatal("no weights move both stored choices")
	}
	destOld, destNew := uplinkName(pick(destHash, 8, 2)), uplinkName(pick(destHash, w1, w2))
	pairOld, pairNew := uplinkName(pick(pairHash, 8, 2)), uplinkName(pick(pairHash, w1, w2))
	otherPairNew := uplinkName(pick(otherPairHash, w1, w2))
	t.Logf("weights 8:2 -> %d:%d: destination %s -> %s, pair %s -> %s, other host's pair -> %s",
		w1, w2, destOld, destNew, pairOld, pairNew, otherPairNew)

	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })

	// connect opens and closes one connection; it must leave by want.
	var lastUse time.Time // of the destination's and the pair's entries
	connect := func(what string, src netip.Addr, port uint16, want string) {
		t.Helper()
		h := lanConnectFrom(t, e, protoTCP, netip.AddrPortFrom(src, 0), port)
		h.c.Close()
		if h.uplink != want {
			since := "their first use: the datapath chose otherwise than the test's model of the choice (choice_test.go)"
			if !lastUse.IsZero() {
				since = fmt.Sprintf("%v since the entries were last used", time.Since(lastUse).Round(time.Millisecond))
			}
			t.Fatalf("%s: %v by %s, want %s (%s; sticky_timeout %v)", what, h, h.uplink, want, since, timeout)
		}
	}
	use := func(what string, wantDest, wantPair, wantOtherPair string) {
		t.Helper()
		connect(what+": destination", topology.LANHost, 8040, wantDest)
		connect(what+": destination, from the other host", other, 8040, wantDest)
		connect(what+": pair", topology.LANHost, 8041, wantPair)
		if wantOtherPair != "" {
			connect(what+": the other host's pair", other, 8041, wantOtherPair)
		}
		lastUse = time.Now()
	}
	use("weights 8:2", destOld, pairOld, "")

	// Per flow: one connection held open, on the uplink its flow hashes
	// to; the new weights would put it on the other one.
	flowPorts := flippingPorts(protoTCP, 8042, w1, w2, 44000, 4)
	held := lanConnect(t, e, protoTCP, flowPorts[0], 8042)
	if want := uplinkName(pick(flowHash(protoTCP, held.key.Src, held.key.Dst), 8, 2)); held.uplink != want {
		t.Fatalf("%v by %s, want %s: the test's model of the choice (choice_test.go) is wrong", held, held.uplink, want)
	}

	e.setWeights(w1, w2)
	if err := e.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	e.waitWeights(w1, w2)
	if since := time.Since(lastUse); since > timeout/2 {
		t.Fatalf("the reload took %v: too long to check what is kept within sticky_timeout %v", since, timeout)
	}
	// Within sticky_timeout of their last use, the stored choices hold for
	// every new connection; the other host's pair is new: new weights.
	use("new weights, in use", destOld, pairOld, otherPairNew)
	time.Sleep(timeout / 3)
	use("new weights, in use after a pause shorter than sticky_timeout", destOld, pairOld, otherPairNew)
	held.stillThere(t, "after the reload")
	for _, p := range flowPorts[1:] {
		h := lanConnect(t, e, protoTCP, p, 8042)
		h.c.Close()
		if want := uplinkName(pick(flowHash(protoTCP, h.key.Src, h.key.Dst), w1, w2)); h.uplink != want {
			t.Fatalf("per flow, after the reload: %v by %s, want %s by the new weights", h, h.uplink, want)
		}
	}

	// Unused for longer than sticky_timeout: fresh choices, new weights.
	time.Sleep(timeout + timeout/2)
	connect("unused for longer than sticky_timeout: destination", topology.LANHost, 8040, destNew)
	connect("unused for longer than sticky_timeout: pair", topology.LANHost, 8041, pairNew)
	// The connection itself outlives any sticky_timeout.
	held.stillThere(t, "after sticky_timeout")
}
