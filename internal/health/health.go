// Package health probes each uplink through that uplink only (the socket is
// bound to its device and carries its mark) and turns the results into an
// up/down verdict with hysteresis: failures-before-down, successes-before-up.
// A prober starts without a verdict; its first answer, or failures failed
// rounds in a row, give it one.
package health

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/config"
)

// Spec is how to probe one uplink: the configured checks plus the
// uplink's interface and mark.
type Spec struct {
	Uplink    int
	Interface string
	Mark      uint32
	Gen       uint64 // copied into every Result: tells a restarted prober's results from its predecessor's
	config.Health
}

// Result is the state after one round of probes.
type Result struct {
	Uplink int
	Gen    uint64 // Spec.Gen of the prober that sent it
	// Verdict: the prober has judged the uplink. It starts without one: a
	// success gives one (healthy), as do Failures failed rounds in a row
	// (unhealthy). Until then Healthy is false and means nothing.
	Verdict bool
	Healthy bool
	Fails   int           // failed rounds in a row
	RTT     time.Duration // of the last success
	Loss    float64       // over the last 20 rounds
	Reason  string        // why unhealthy (or, without a verdict, what failed so far)
}

// Prober runs the probes of one uplink until its context ends.
type Prober struct {
	spec    Spec
	verdict bool
	healthy bool
	fails   int
	oks     int
	history []bool
	rtt     time.Duration // of the last success
	seq     atomic.Uint32
}

// NewProber makes a prober without a verdict: whether the uplink is used
// meanwhile is the daemon's decision (a link it does not know yet is not; a
// link the datapath was using when the daemon restarted is).
func NewProber(s Spec) *Prober {
	return &Prober{spec: s}
}

// Run probes every interval and sends a Result after each round. A round
// probes all targets at once and ends by its timeout, which is at most the
// interval: rounds start on the interval's schedule whatever the probes do,
// so a silent uplink is judged down failures × interval + timeout after
// the last answer at the latest.
func (p *Prober) Run(ctx context.Context, out chan<- Result) {
	t := time.NewTicker(p.spec.Interval)
	defer t.Stop()
	for {
		ok, rtt, err := p.round(ctx)
		if ctx.Err() != nil {
			return
		}
		r := p.record(ok, rtt, err)
		select {
		case out <- r:
		case <-ctx.Done():
			return
		}
		select {
		case <-t.C:
		case <-ctx.Done():
			return
		}
	}
}

// round probes every target in parallel: the first answer ends it with a
// success; without one it ends when the last probe has timed out (each
// probe has the timeout). Serial probes would make a failed round last
// targets × timeout, and a silent uplink wait that much per round.
func (p *Prober) round(ctx context.Context) (bool, time.Duration, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // the first success stops the others
	type answer struct {
		i   int
		rtt time.Duration
		err error
	}
	answers := make(chan answer, len(p.spec.Targets))
	for i, target := range p.spec.Targets {
		go func() {
			d, err := p.probe(ctx, target)
			answers <- answer{i, d, err}
		}()
	}
	errs := make([]error, len(p.spec.Targets))
	for range p.spec.Targets {
		a := <-answers
		if a.err == nil {
			return true, a.rtt, nil
		}
		errs[a.i] = fmt.Errorf("%v: %w", p.spec.Targets[a.i], a.err)
	}
	return false, 0, errors.Join(errs...)
}

// record applies one round's outcome: failures-before-down and
// successes-before-up once there is a verdict, and the first verdict
// (one success, or failures in a row) before.
func (p *Prober) record(ok bool, rtt time.Duration, err error) Result {
	p.history = append(p.history, ok)
	if len(p.history) > 20 {
		p.history = p.history[1:]
	}
	if ok {
		p.rtt = rtt
		p.oks++
		p.fails = 0
		if !p.verdict || (!p.healthy && p.oks >= p.spec.Successes) {
			p.verdict, p.healthy = true, true
		}
	} else {
		p.fails++
		p.oks = 0
		if (!p.verdict || p.healthy) && p.fails >= p.spec.Failures {
			p.verdict, p.healthy = true, false
		}
	}
	lost := 0
	for _, h := range p.history {
		if !h {
			lost++
		}
	}
	r := Result{Uplink: p.spec.Uplink, Gen: p.spec.Gen, Verdict: p.verdict, Healthy: p.verdict && p.healthy, Fails: p.fails,
		RTT: p.rtt, Loss: float64(lost) / float64(len(p.history))}
	if !r.Healthy && err != nil {
		r.Reason = fmt.Sprintf("%d probes failed, last: %s", p.fails, strings.ReplaceAll(err.Error(), "\n", "; "))
	}
	return r
}

func (p *Prober) probe(ctx context.Context, target netip.Addr) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, p.spec.Timeout)
	defer cancel()
	var d time.Duration
	var err error
	if p.spec.Method == "tcp" {
		d, err = p.probeTCP(ctx, target)
	} else {
		d, err = p.probeICMP(ctx, target)
	}
	if err != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
		err = fmt.Errorf("no answer within %v", p.spec.Timeout)
	}
	return d, err
}

// control binds a probe socket to the uplink's device and gives it the
// uplink's mark: a probe never leaves by another uplink, and the socket
// hooks leave device-bound sockets alone.
func (p *Prober) control(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		if serr = unix.SetsockoptString(int(fd), unix.SOL_SOCKET, unix.SO_BINDTODEVICE, p.spec.Interface); serr != nil {
			return
		}
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(p.spec.Mark))
	})
	return errors.Join(err, serr)
}

func (p *Prober) probeTCP(ctx context.Context, target netip.Addr) (time.Duration, error) {
	d := net.Dialer{Control: p.control}
	start := time.Now()
	c, err := d.DialContext(ctx, "tcp", netip.AddrPortFrom(target, p.spec.Port).String())
	if err != nil {
		return 0, err
	}
	c.Close()
	return time.Since(start), nil
}

func (p *Prober) probeICMP(ctx context.Context, target netip.Addr) (time.Duration, error) {
	network, typ, reply, proto := "ip4:icmp", icmp.Type(ipv4.ICMPTypeEcho), icmp.Type(ipv4.ICMPTypeEchoReply), 1
	if target.Is6() {
		network, typ, reply, proto = "ip6:ipv6-icmp", ipv6.ICMPTypeEchoRequest, ipv6.ICMPTypeEchoReply, 58
	}
	lc := net.ListenConfig{Control: p.control}
	conn, err := lc.ListenPacket(ctx, network, "")
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() }) // the round ended: another target answered
	defer stop()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	// A random identifier and a random payload per probe, both checked in
	// the reply: a forged echo reply (a guessed identifier, or a copy of an
	// earlier request) does not count as an answer.
	var nonce [2 + payloadLen]byte
	_, _ = rand.Read(nonce[:]) // never fails (crypto/rand)
	id := int(binary.BigEndian.Uint16(nonce[:2]))
	seq := int(p.seq.Add(1) & 0xffff)
	payload := nonce[2:]
	msg := icmp.Message{Type: typ, Body: &icmp.Echo{ID: id, Seq: seq, Data: payload}}
	b, err := msg.Marshal(nil)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	if _, err := conn.WriteTo(b, &net.IPAddr{IP: target.AsSlice()}); err != nil {
		return 0, err
	}
	buf := make([]byte, 1500)
	for {
		n, from, err := conn.ReadFrom(buf)
		if err != nil {
			return 0, err
		}
		ip, _ := from.(*net.IPAddr)
		if ip == nil || !ip.IP.Equal(target.AsSlice()) {
			continue
		}
		if isReply(proto, reply, buf[:n], id, seq, payload) {
			return time.Since(start), nil
		}
	}
}

// payloadLen is the size of the random payload of an ICMP probe.
const payloadLen = 16

// isReply tells whether b (an ICMP message of protocol proto) is the echo
// reply to the request with id, seq and payload: all three must match.
func isReply(proto int, reply icmp.Type, b []byte, id, seq int, payload []byte) bool {
	m, err := icmp.ParseMessage(proto, b)
	if err != nil || m.Type != reply {
		return false
	}
	e, ok := m.Body.(*icmp.Echo)
	return ok && e.ID == id && e.Seq == seq && bytes.Equal(e.Data, payload)
}
