// Package health probes each uplink through that uplink only (the socket is
// bound to its device and carries its mark) and turns the results into an
// up/down verdict with hysteresis: failures-before-down, successes-before-up.
package health

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
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
	config.Health
}

// Result is the verdict after one round of probes.
type Result struct {
	Uplink  int
	Healthy bool
	RTT     time.Duration // of the last success
	Loss    float64       // over the last 20 probes
	Reason  string        // why unhealthy
}

// Prober runs the probes of one uplink until its context ends.
type Prober struct {
	spec    Spec
	healthy bool
	fails   int
	oks     int
	history []bool
	seq     atomic.Uint32
}

func NewProber(s Spec) *Prober {
	// Start healthy: an uplink is not taken out before it has failed.
	return &Prober{spec: s, healthy: true}
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
		r := p.round(ctx)
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
func (p *Prober) round(ctx context.Context) Result {
	ok, rtt, lastErr := p.probeAll(ctx)
	p.history = append(p.history, ok)
	if len(p.history) > 20 {
		p.history = p.history[1:]
	}
	if ok {
		p.oks++
		p.fails = 0
		if !p.healthy && p.oks >= p.spec.Successes {
			p.healthy = true
		}
	} else {
		p.fails++
		p.oks = 0
		if p.healthy && p.fails >= p.spec.Failures {
			p.healthy = false
		}
	}
	lost := 0
	for _, h := range p.history {
		if !h {
			lost++
		}
	}
	r := Result{Uplink: p.spec.Uplink, Healthy: p.healthy, RTT: rtt, Loss: float64(lost) / float64(len(p.history))}
	if !p.healthy && lastErr != nil {
		r.Reason = fmt.Sprintf("%d probes failed, last: %s", p.fails, strings.ReplaceAll(lastErr.Error(), "\n", "; "))
	}
	return r
}

func (p *Prober) probeAll(ctx context.Context) (bool, time.Duration, error) {
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
	id := (os.Getpid() ^ p.spec.Uplink<<12) & 0xffff
	seq := int(p.seq.Add(1) & 0xffff)
	payload := make([]byte, 16)
	binary.BigEndian.PutUint64(payload, uint64(time.Now().UnixNano()))
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
		m, err := icmp.ParseMessage(proto, buf[:n])
		if err != nil || m.Type != reply {
			continue
		}
		if e, ok := m.Body.(*icmp.Echo); ok && e.ID == id && e.Seq == seq {
			return time.Since(start), nil
		}
	}
}
