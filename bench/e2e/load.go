package main

// The traffic: a server (in the server namespace) and a load client (in the
// LAN namespace), both this program run again inside the namespace. The
// client measures one window itself and asks the server, over a unix
// socket (a file: namespaces do not separate it), what arrived in it, so a
// rate is what the far end received, not what the client sent.

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/ipv4"
)

// The server's ports.
const (
	portConn   = 5001 // answers every connection with the peer address it saw, then closes
	portUDP    = 5002 // counts datagrams
	portStream = 5003 // counts bytes
)

// serverStats is what the server has received since it started.
type serverStats struct {
	Datagrams uint64 `json:"datagrams"`
	Bytes     uint64 `json:"bytes"`
	Accepted  uint64 `json:"accepted"`
}

// serve runs the server on every local address until killed; ctl is its
// unix socket.
func serve(ctl string) error {
	addr := netip.IPv4Unspecified()
	var st struct{ datagrams, bytes, accepted atomic.Uint64 }
	conns, err := net.Listen("tcp4", netip.AddrPortFrom(addr, portConn).String())
	if err != nil {
		return err
	}
	stream, err := net.Listen("tcp4", netip.AddrPortFrom(addr, portStream).String())
	if err != nil {
		return err
	}
	udp, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(addr, portUDP)))
	if err != nil {
		return err
	}
	// Room for a burst while the reader is off the CPU (both cores are
	// shared by sender, router and receiver); FORCE: rmem_max does not cap
	// root.
	if raw, err := udp.SyscallConn(); err == nil {
		_ = raw.Control(func(fd uintptr) {
			_ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUFFORCE, 8<<20)
		})
	}
	control, err := net.Listen("unix", ctl)
	if err != nil {
		return err
	}
	// Connections: the answer is the peer's address (which uplink's
	// address it was masqueraded to), written at once; the server closes
	// first, so TIME_WAIT is on its side and the client's ports are free
	// again at once.
	for range 2 {
		go func() {
			for {
				c, err := conns.Accept()
				if err != nil {
					return
				}
				st.accepted.Add(1)
				peer := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
				_, _ = c.Write([]byte(peer.String()))
				_ = c.Close()
			}
		}()
	}
	go func() {
		for {
			c, err := stream.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 256<<10)
				for {
					n, err := c.Read(buf)
					st.bytes.Add(uint64(n))
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	go func() {
		pc := ipv4.NewPacketConn(udp)
		msgs := make([]ipv4.Message, 64)
		for i := range msgs {
			msgs[i].Buffers = [][]byte{make([]byte, 2048)}
		}
		for {
			n, err := pc.ReadBatch(msgs, 0)
			if err != nil {
				return
			}
			st.datagrams.Add(uint64(n))
		}
	}()
	fmt.Println("ready")
	for {
		c, err := control.Accept()
		if err != nil {
			return err
		}
		_ = json.NewEncoder(c).Encode(serverStats{Datagrams: st.datagrams.Load(), Bytes: st.bytes.Load(), Accepted: st.accepted.Load()})
		_ = c.Close()
	}
}

func askServer(ctl string) (serverStats, error) {
	var s serverStats
	c, err := net.Dial("unix", ctl)
	if err != nil {
		return s, err
	}
	defer c.Close()
	err = json.NewDecoder(c).Decode(&s)
	return s, err
}

// loadSpec is one measurement.
type loadSpec struct {
	Kind     string       // conn, udp or stream
	Servers  []netip.Addr // destinations, in turn
	Ctl      string
	Warmup   time.Duration
	Window   time.Duration
	Workers  int // conn: connections in parallel; udp: flows (sockets); stream: streams
	Payload  int // udp: bytes of payload
	Deadline time.Duration
}

// loadResult is what one window measured.
type loadResult struct {
	Seconds float64 `json:"seconds"`
	// Rate: completed connections a second (conn), datagrams the server
	// received a second (udp), Mbit/s the server received (stream).
	Rate   float64 `json:"rate"`
	Sent   uint64  `json:"sent,omitempty"` // udp: datagrams sent in the window
	Errors uint64  `json:"errors"`         // conn: failed connections in the window
	// ByPeer: conn: completed connections by the address the server saw
	// (the uplink they were masqueraded to).
	ByPeer map[string]uint64 `json:"by_peer,omitempty"`
	// FirstError: the first failure, to say what went wrong.
	FirstError string `json:"first_error,omitempty"`
}

// load runs spec's traffic from this namespace and prints its result.
func load(spec loadSpec) (loadResult, error) {
	var (
		stop     atomic.Bool
		ok, errs atomic.Uint64
		sent     atomic.Uint64
		wg       sync.WaitGroup
		mu       sync.Mutex
		byPeer   = map[string]uint64{}
		window   atomic.Bool // counting by peer only inside the window
		firstErr atomic.Value
	)
	fail := func(err error) {
		if window.Load() {
			errs.Add(1)
			firstErr.CompareAndSwap(nil, err.Error())
		}
	}
	switch spec.Kind {
	case "conn":
		var next atomic.Uint64
		for range spec.Workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				d := net.Dialer{Timeout: spec.Deadline}
				for !stop.Load() {
					to := spec.Servers[next.Add(1)%uint64(len(spec.Servers))]
					c, err := d.Dial("tcp4", netip.AddrPortFrom(to, portConn).String())
					if err != nil {
						fail(err)
						continue
					}
					_ = c.SetDeadline(time.Now().Add(spec.Deadline))
					b, err := io.ReadAll(c)
					_ = c.Close()
					if err == nil && len(b) == 0 {
						err = errors.New("no answer")
					}
					if err != nil {
						fail(err)
						continue
					}
					ok.Add(1)
					if window.Load() {
						mu.Lock()
						byPeer[string(b)]++
						mu.Unlock()
					}
				}
			}()
		}
	case "udp":
		// Many flows: one connected socket per flow (its own source
		// port), written in batches of a few datagrams (sendmmsg) in
		// turn by one sender.
		var socks []*ipv4.PacketConn
		for i := range spec.Workers {
			to := spec.Servers[i%len(spec.Servers)]
			c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(to, portUDP)))
			if err != nil {
				return loadResult{}, err
			}
			defer c.Close()
			socks = append(socks, ipv4.NewPacketConn(c))
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			msgs := make([]ipv4.Message, 8)
			for i := range msgs {
				msgs[i].Buffers = [][]byte{make([]byte, spec.Payload)}
			}
			for i := 0; !stop.Load(); i++ {
				// A full socket buffer (ENOBUFS) is a loss like any other:
				// the server's count says what arrived.
				n, _ := socks[i%len(socks)].WriteBatch(msgs, 0)
				if n > 0 {
					sent.Add(uint64(n))
				}
			}
		}()
	case "stream":
		for i := range spec.Workers {
			to := spec.Servers[i%len(spec.Servers)]
			c, err := net.DialTimeout("tcp4", netip.AddrPortFrom(to, portStream).String(), spec.Deadline)
			if err != nil {
				return loadResult{}, err
			}
			defer c.Close()
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := make([]byte, 128<<10)
				for !stop.Load() {
					if _, err := c.Write(buf); err != nil {
						fail(err)
						return
					}
				}
			}()
		}
	default:
		return loadResult{}, fmt.Errorf("unknown kind %q", spec.Kind)
	}
	defer func() {
		stop.Store(true)
		wg.Wait()
	}()

	time.Sleep(spec.Warmup)
	s0, err := askServer(spec.Ctl)
	if err != nil {
		return loadResult{}, err
	}
	ok0, sent0, t0 := ok.Load(), sent.Load(), time.Now()
	window.Store(true)
	time.Sleep(spec.Window)
	window.Store(false)
	ok1, sent1, t1 := ok.Load(), sent.Load(), time.Now()
	s1, err := askServer(spec.Ctl)
	if err != nil {
		return loadResult{}, err
	}
	r := loadResult{Seconds: t1.Sub(t0).Seconds(), Errors: errs.Load()}
	if e, ok := firstErr.Load().(string); ok {
		r.FirstError = e
	}
	switch spec.Kind {
	case "conn":
		r.Rate = float64(ok1-ok0) / r.Seconds
		mu.Lock()
		r.ByPeer = byPeer
		mu.Unlock()
	case "udp":
		r.Rate = float64(s1.Datagrams-s0.Datagrams) / r.Seconds
		r.Sent = sent1 - sent0
	case "stream":
		r.Rate = float64(s1.Bytes-s0.Bytes) * 8 / 1e6 / r.Seconds
	}
	return r, nil
}

// loadMain is the client's command: one measurement, its result as JSON.
func loadMain(spec loadSpec) error {
	r, err := load(spec)
	if err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(r)
}
