package test

// Connections from the LAN host that a test holds open while it restarts
// the daemon or changes its configuration, and what the flow map says of
// them.

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/testutil"
	"github.com/mhbpf/mhbpf/internal/topology"
)

const (
	protoTCP = 6
	protoUDP = 17
)

// serveEcho starts, in each ISP, a TCP server on the internet address that
// says its name and the peer it sees, then echoes every line: a connection
// that left by the other uplink meets a server without it (a reset).
func serveGreetEcho(t *testing.T, e *daemonEnv, port uint16) {
	t.Helper()
	for ns, name := range map[string]string{e.topo.ISP1: "isp1", e.topo.ISP2: "isp2"} {
		srv, err := e.topo.ServeSocat(ns, fmt.Sprintf("TCP4-LISTEN:%d,bind=%s,fork,reuseaddr", port, topology.Internet),
			"echo "+name+" $SOCAT_PEERADDR; exec cat", "-Hltn", port)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(srv.Close)
	}
}

// serveUDP starts, in each ISP, a UDP server on the internet address that
// answers every datagram with its name and the peer it sees: each answer
// tells the uplink that datagram left by.
func serveUDP(t *testing.T, e *daemonEnv, port uint16) {
	t.Helper()
	for ns, name := range map[string]string{e.topo.ISP1: "isp1", e.topo.ISP2: "isp2"} {
		serveUDPAnswers(t, ns, name, topology.Internet, port)
	}
}

// serveUDPAnswers starts a UDP server in namespace ns on addr:port that
// answers every datagram with its name and the peer it sees. It is a
// socket of this process, made in that namespace: socat's forking UDP
// server (topology.ServeUDP) loses a few answers in a hundred, which would
// read as a routing failure.
func serveUDPAnswers(t *testing.T, ns, name string, addr netip.Addr, port uint16) {
	t.Helper()
	var pc net.PacketConn
	var err error
	testutil.InNetNS(t, ns, func() {
		pc, err = net.ListenPacket("udp", netip.AddrPortFrom(addr, port).String())
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		b := make([]byte, 1500)
		for {
			_, from, err := pc.ReadFrom(b)
			if err != nil {
				return // closed
			}
			peer := netip.MustParseAddrPort(from.String())
			_, _ = pc.WriteTo([]byte(name+" "+peer.Addr().String()+"\n"), from)
		}
	}()
}

// lanConn is a TCP connection or a connected UDP socket of the LAN host,
// made in its namespace (the socket stays there) and used from the test.
type lanConn struct {
	c      net.Conn
	r      *bufio.Reader
	key    maps.FlowKey
	uplink string // the server that answered first: the uplink it left by
}

// lanConnect connects from the LAN host to the internet address's port,
// from local port src (0: the kernel's choice), and returns once the server
// answered.
func lanConnect(t *testing.T, e *daemonEnv, proto uint8, src, port uint16) *lanConn {
	t.Helper()
	return lanConnectFrom(t, e, proto, netip.AddrPortFrom(topology.LANHost, src), port)
}

// lanConnectFrom is lanConnect from another address of the LAN namespace.
func lanConnectFrom(t *testing.T, e *daemonEnv, proto uint8, src netip.AddrPort, port uint16) *lanConn {
	t.Helper()
	dst := netip.AddrPortFrom(topology.Internet, port)
	var c net.Conn
	var err error
	testutil.InNetNS(t, e.topo.LAN, func() {
		d := net.Dialer{Timeout: testutil.Deadline(3 * time.Second)}
		if proto == protoTCP {
			d.LocalAddr = &net.TCPAddr{IP: src.Addr().AsSlice(), Port: int(src.Port())}
			c, err = d.Dial("tcp4", dst.String())
		} else {
			d.LocalAddr = &net.UDPAddr{IP: src.Addr().AsSlice(), Port: int(src.Port())}
			c, err = d.Dial("udp4", dst.String())
		}
	})
	if err != nil {
		t.Fatalf("%s from %s to %s: %v", maps.ProtoName(proto), src, dst, err)
	}
	t.Cleanup(func() { c.Close() })
	local := netip.MustParseAddrPort(c.LocalAddr().String())
	h := &lanConn{c: c, r: bufio.NewReader(c), key: maps.FlowKey{Proto: proto, Src: local, Dst: dst}}
	if proto == protoUDP {
		h.uplink = h.udpAnswer(t)
	} else {
		h.uplink = h.readName(t)
	}
	return h
}

func (h *lanConn) String() string { return h.key.String() }

// readName reads the TCP server's greeting, "name peer", and checks that
// it saw the LAN host itself.
func (h *lanConn) readName(t *testing.T) string {
	t.Helper()
	_ = h.c.SetReadDeadline(time.Now().Add(testutil.Deadline(3 * time.Second)))
	line, err := h.r.ReadString('\n')
	if err != nil {
		t.Fatalf("%v: no greeting: %v", h, err)
	}
	name, peer, _ := strings.Cut(strings.TrimSpace(line), " ")
	if peer != h.key.Src.Addr().String() {
		t.Fatalf("%v: server %s saw %q, want the LAN host's %s", h, name, peer, h.key.Src.Addr())
	}
	return name
}

// udpAnswer sends one datagram and returns the name of the server that
// answered it.
func (h *lanConn) udpAnswer(t *testing.T) string {
	t.Helper()
	if _, err := h.c.Write([]byte("ping\n")); err != nil {
		t.Fatalf("%v: %v", h, err)
	}
	_ = h.c.SetReadDeadline(time.Now().Add(testutil.Deadline(3 * time.Second)))
	b := make([]byte, 256)
	n, err := h.c.Read(b)
	if err != nil {
		t.Fatalf("%v: no answer: %v", h, err)
	}
	name, peer, _ := strings.Cut(strings.TrimSpace(string(b[:n])), " ")
	if peer != h.key.Src.Addr().String() {
		t.Fatalf("%v: server %s saw %q, want the LAN host's %s", h, name, peer, h.key.Src.Addr())
	}
	return name
}

// stillThere checks that the connection still works by the uplink it
// started on: a TCP line comes back from the same server (a packet by the
// other uplink would meet a server without the connection: a reset), a
// datagram is answered by the same uplink's server.
func (h *lanConn) stillThere(t *testing.T, when string) {
	t.Helper()
	if h.key.Proto == protoUDP {
		if got := h.udpAnswer(t); got != h.uplink {
			t.Fatalf("%s: %v left by %s, it started on %s", when, h, got, h.uplink)
		}
		return
	}
	msg := fmt.Sprintf("still there %s\n", when)
	if _, err := h.c.Write([]byte(msg)); err != nil {
		t.Fatalf("%s: %v: %v", when, h, err)
	}
	_ = h.c.SetReadDeadline(time.Now().Add(testutil.Deadline(3 * time.Second)))
	got, err := h.r.ReadString('\n')
	if err != nil || got != msg {
		t.Fatalf("%s: %v (on %s) broke: %q, %v", when, h, h.uplink, got, err)
	}
}

// flowsOf reads the records of the connections from the pinned flow map
// (it needs no daemon); each must be there, on the uplink its server says.
func flowsOf(t *testing.T, e *daemonEnv, conns []*lanConn) map[maps.FlowKey]maps.Flow {
	t.Helper()
	m, err := loader.OpenPinned(e.pinDir)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	out := map[maps.FlowKey]maps.Flow{}
	for _, h := range conns {
		f, ok, err := m.LookupFlow(h.key)
		if err != nil {
			t.Fatalf("flow map: %v", err)
		}
		if !ok {
			t.Fatalf("no flow record of %v", h)
		}
		if uplinkName(f.Uplink) != h.uplink {
			t.Fatalf("%v: recorded on uplink %d, its server is %s's", h, f.Uplink, h.uplink)
		}
		out[h.key] = f
	}
	return out
}

// setGlobal adds a line to the configuration's [global] table.
func (e *daemonEnv) setGlobal(line string) {
	e.t.Helper()
	raw, err := os.ReadFile(e.cfgPath)
	if err != nil {
		e.t.Fatal(err)
	}
	if !strings.Contains(string(raw), "[global]\n") {
		e.t.Fatalf("no [global] in the configuration:\n%s", raw)
	}
	e.writeConfig(strings.Replace(string(raw), "[global]\n", "[global]\n"+line+"\n", 1))
}

// setWeights rewrites the configuration's weights of isp1 and isp2.
func (e *daemonEnv) setWeights(w1, w2 uint64) {
	e.t.Helper()
	raw, err := os.ReadFile(e.cfgPath)
	if err != nil {
		e.t.Fatal(err)
	}
	b := string(raw)
	text := strings.Replace(strings.Replace(b, "weight = 8\n", "weight = @1\n", 1), "weight = 2\n", "weight = @2\n", 1)
	if !strings.Contains(text, "@1") || !strings.Contains(text, "@2") {
		e.t.Fatalf("no weights 8 and 2 in the configuration:\n%s", b)
	}
	e.writeConfig(strings.NewReplacer("@1", fmt.Sprint(w1), "@2", fmt.Sprint(w2)).Replace(text))
}

// waitWeights waits until the datapath has these weights, both uplinks up.
func (e *daemonEnv) waitWeights(w1, w2 uint64) {
	e.t.Helper()
	e.waitFor(fmt.Sprintf("weights %d and %d in the datapath", w1, w2), 5*time.Second, func() bool {
		m, err := loader.OpenPinned(e.pinDir)
		if err != nil {
			return false
		}
		defer m.Close()
		u1, err1 := m.LookupUplink(0)
		u2, err2 := m.LookupUplink(1)
		return err1 == nil && err2 == nil && u1.Up && u2.Up && uint64(u1.Weight) == w1 && uint64(u2.Weight) == w2
	})
}

// flippingPorts are n local ports from first on whose flows to the
// internet address's port a per-flow choice puts on another uplink with
// weights w1, w2 than with 8 and 2.
func flippingPorts(proto uint8, port uint16, w1, w2 uint64, first uint16, n int) []uint16 {
	var out []uint16
	dst := netip.AddrPortFrom(topology.Internet, port)
	for p := first; len(out) < n; p++ {
		h := flowHash(proto, netip.AddrPortFrom(topology.LANHost, p), dst)
		if pick(h, 8, 2) != pick(h, w1, w2) {
			out = append(out, p)
		}
	}
	return out
}

// heldConn is a TCP connection a real client keeps open: each line sent
// is answered by the server (a line server: its name and the line; an
// echo server: its name and the peer address it sees).
type heldConn struct {
	cmd   *exec.Cmd
	in    io.WriteCloser
	lines chan string
}

// holdConn connects socat in ns to address and keeps it open.
func holdConn(t *testing.T, ns, address string) *heldConn {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", ns, "socat", "STDIO", address)
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := &heldConn{cmd: cmd, in: in, lines: make(chan string, 16)}
	go func() {
		s := bufio.NewScanner(out)
		for s.Scan() {
			c.lines <- s.Text()
		}
		close(c.lines)
	}()
	t.Cleanup(func() {
		in.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return c
}

// say sends word and returns the answer ("" if none within 3 s or the
// connection ended).
func (c *heldConn) say(word string) string {
	if _, err := fmt.Fprintln(c.in, word); err != nil {
		return ""
	}
	select {
	case l := <-c.lines:
		return l
	case <-time.After(3 * time.Second):
		return ""
	}
}

// perFlowPolicies balance TCP port 8031 and UDP port 8032 to the internet
// host per flow: each connection's uplink is its own, so a lost record
// shows as a connection on the other uplink (the restart and upgrade
// tests).
const perFlowPolicies = `
[[policy]]
name = "per-flow-tcp"
destinations = ["203.0.113.10/32"]
protocol = "tcp"
ports = [8031]
uplinks = ["isp1", "isp2"]
balance = true
sticky = "flow"

[[policy]]
name = "per-flow-udp"
destinations = ["203.0.113.10/32"]
protocol = "udp"
ports = [8032]
uplinks = ["isp1", "isp2"]
balance = true
sticky = "flow"
`
