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
	"text/tabwriter"
	"time"

	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
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
		{0, "both ADSL links up: new connections split 8:2, each destination sticks to its uplink", nil},
		{length / 3, "isp1 DOWN (ppp0 removed, as when pppd exits): everything moves to isp2", func() error { return l.UplinkDown(1) }},
		{2 * length / 3, "isp1 BACK: new connections use it again after the hold-down", func() error { return l.UplinkUp(1) }},
	}
	current := ""
	prev := map[int]maps.Counters{}
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
		l.show(out, m, el, prev)
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

func (l *Lab) show(out io.Writer, m *maps.Maps, el time.Duration, prev map[int]maps.Counters) {
	st, _ := l.Status()
	flows := map[int]int{}
	_ = m.WalkFlows(func(f maps.Flow) bool { flows[f.Uplink]++; return true })
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "t=%2ds\tSTATE\tDOWN Mbit/s\tUP Mbit/s\tFLOWS\tNEW/s\tREASON\n", int(el.Seconds()))
	for _, u := range st.Uplinks {
		id := u.ID
		c, _ := m.UplinkCounters(id)
		p := prev[id]
		state := "down"
		if u.Usable {
			state = "up"
		}
		fmt.Fprintf(w, "%s (%s)\t%s\t%.2f\t%.2f\t%d\t%d\t%s\n", u.Name, u.Interface, state,
			float64(c.RxBytes-p.RxBytes)*8/1e6, float64(c.TxBytes-p.TxBytes)*8/1e6, flows[id], c.NewFlows-p.NewFlows, u.Reason)
		prev[id] = c
	}
	_ = w.Flush()
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
	for i := 0; i < 6; i++ {
		dst := host(60001 + i)
		loop(time.Second, func() {
			cmd := exec.CommandContext(ctx, "ip", "netns", "exec", l.LAN, "socat", "-u", "-T5",
				fmt.Sprintf("TCP4:%s:9000", dst), "OPEN:/dev/null")
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
