package lab

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/netip"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/top"
	"github.com/mhbpf/mhbpf/internal/topology"
)

// Demo drives traffic through the lab and prints, every second, what each
// uplink is doing. A third of the way in it takes isp1's line away (as
// pppd exiting does), two thirds in it brings it back.
func (l *Lab) Demo(ctx context.Context, out io.Writer, length time.Duration) error {
	m, err := loader.OpenPinned(l.PinDir)
	if err != nil {
		return err
	}
	defer m.Close()

	// The clients stop first, then the lab goes (the caller's Close).
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	l.driveTraffic(ctx, &wg)

	start := time.Now()
	type phase struct {
		at   time.Duration
		name string
		do   func() error
	}
	phases := []phase{
		{0, "both ADSL links up: new connections split 8:2, each destination sticks to its uplink; IPv6 (column IPv6) alike", nil},
		{length / 3, "isp1 DOWN (ppp0 removed, as when pppd exits): everything moves to isp2", func() error { return l.UplinkDown(1) }},
		{2 * length / 3, "isp1 BACK: new connections use it again after the hold-down", func() error { return l.UplinkUp(1) }},
	}
	current := ""
	view := top.NewSampler(m, l.Status) // the view of 'mhbpf top'
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		el := time.Since(start)
		for len(phases) > 0 && el >= phases[0].at {
			current = phases[0].name
			if phases[0].do != nil {
				if err := phases[0].do(); err != nil {
					return err
				}
			}
			fmt.Fprintf(out, "\n=== %s\n", current)
			phases = phases[1:]
		}
		if fr, err := view.Sample(); err == nil {
			_ = fr.Write(out)
		}
		if el >= length {
			fmt.Fprintln(out, "\ndone; removing the lab")
			return nil
		}
		select {
		case <-ctx.Done():
			fmt.Fprintln(out, "\ninterrupted; removing the lab")
			return nil
		case <-tick.C:
		}
	}
}

// driveTraffic starts the LAN's clients: browsing to ever new internet
// hosts, a few long downloads, a ping to the company through the VPN, and
// mail.
func (l *Lab) driveTraffic(ctx context.Context, wg *sync.WaitGroup) {
	loop := func(every time.Duration, f func()) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				f()
				select {
				case <-ctx.Done():
				case <-time.After(every):
				}
			}
		}()
	}
	host := func(i int) netip.Addr {
		b := topology.Hosts.Addr().As4()
		return netip.AddrFrom4([4]byte{b[0], b[1], byte(i >> 8), byte(i)})
	}
	loop(100*time.Millisecond, func() {
		_, _ = l.Dial(l.LAN, "", host(1+rand.IntN(60000)), 80)
	})
	// Bulk downloads of 6 s each, each to a destination not used before: a
	// destination keeps its uplink (sticky) and a connection too, so
	// downloads that ran for the whole demo, or always to the same hosts,
	// would stay on isp2 after isp1 came back, and the recovery would not
	// show as throughput.
	// Two of them are IPv6 (the same policy, balance and failover apply),
	// of 3 s each: one that is stuck on a dead uplink gives way sooner.
	var next atomic.Int32
	host6 := func(i int) netip.Addr {
		b := topology.Hosts6.Addr().As16()
		b[14], b[15] = byte(i>>8), byte(i)
		return netip.AddrFrom16(b)
	}
	for i := 0; i < 6; i++ {
		loop(500*time.Millisecond, func() {
			n := int(next.Add(1)) % 5000
			target, length := fmt.Sprintf("TCP4:%s:9000", host(60001+n)), 6*time.Second
			if i < 2 {
				target, length = fmt.Sprintf("TCP6:[%s]:9000", host6(1+n)), 3*time.Second
			}
			dl, cancel := context.WithTimeout(ctx, length)
			defer cancel()
			cmd := exec.CommandContext(dl, "ip", "netns", "exec", l.LAN, "socat", "-u", "-T5", target, "OPEN:/dev/null")
			_ = cmd.Run()
		})
	}
	loop(time.Second, func() {
		_ = exec.CommandContext(ctx, "ip", "netns", "exec", l.LAN, "ping", "-c1", "-W1", topology.CompanyHost.String()).Run()
	})
	loop(3*time.Second, func() {
		_, _ = l.Dial(l.LAN, "", topology.SMTPServer, 25)
	})
}

// Answer splits a lab server's "name peeraddr" answer.
func Answer(s string) (string, netip.Addr) {
	f := strings.Fields(s)
	if len(f) < 2 {
		return s, netip.Addr{}
	}
	a, _ := netip.ParseAddr(strings.Trim(f[len(f)-1], "[]"))
	return strings.Join(f[:len(f)-1], " "), a
}
