// Package top is the live per-uplink view of 'mhbpf top' and the lab: state
// and reason, down and up rate, flows, new flows per second, probe RTT and
// loss, and a short history per uplink, so that a failover and a recovery
// show at a glance. It reads the daemon's status and the pinned maps; the
// rates are differences between two samples. The flows per uplink are
// counted by walking the flow maps, which takes a while when they are full
// (about 0.2 s a million flows): a frame reuses the last count while
// walking again would take more than FlowWalkShare of the time, and says
// how old its count is.
package top

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/mhbpf/mhbpf/internal/daemon"
	"github.com/mhbpf/mhbpf/internal/maps"
)

// HistoryLen is how many samples the history column shows.
const HistoryLen = 30

// Uplink is one uplink in one frame.
type Uplink struct {
	Name, Interface string
	Up              bool
	Reason          string
	DownBps, UpBps  float64 // bits per second since the previous sample
	Flows           int     // in the flow maps now
	Flows6          int     // of those, IPv6: they follow the same policy and failover
	NewPerSec       float64
	Probed          bool
	RTTms, Loss     float64
	// History is the down rate of the last samples, oldest first; a
	// negative value is a sample when the uplink was out.
	History []float64
}

// Frame is one sample of every uplink, in preference order.
type Frame struct {
	At    time.Duration // since the first sample
	State string        // the daemon's: running, converging
	// FlowsAge is how old the flow counts are: 0 when the flow maps were
	// walked for this frame.
	FlowsAge time.Duration
	Uplinks  []Uplink
}

// Source is what a Sampler reads: *maps.Maps.
type Source interface {
	WalkLiveFlows(fn func(maps.Flow) bool) error
	UplinkCounters(id int) (maps.Counters, error)
}

// FlowWalkShare is the share of the time the view may spend walking the
// flow maps: after a walk that took d, the next is at least d/FlowWalkShare
// later (every frame while the maps hold some thousands of flows; about
// every 2 s at a million).
const FlowWalkShare = 0.1

// flowCount is the flows per uplink from one walk of the flow maps.
type flowCount struct {
	all, v6 map[int]int
	at      time.Time // when the walk began
	took    time.Duration
}

// Sampler turns successive reads of the status and maps into frames.
type Sampler struct {
	m      Source
	status func() (daemon.Status, error)
	clock  func() time.Time
	start  time.Time
	last   time.Time
	prev   map[string]maps.Counters // by name: slots may move across restarts
	hist   map[string][]float64
	flows  flowCount
}

func NewSampler(m Source, status func() (daemon.Status, error)) *Sampler {
	return &Sampler{m: m, status: status, clock: time.Now, prev: map[string]maps.Counters{}, hist: map[string][]float64{}}
}

// countFlows walks the flow maps unless the last walk is recent compared
// with how long it took.
func (s *Sampler) countFlows(now time.Time) error {
	if !s.flows.at.IsZero() && now.Sub(s.flows.at) < time.Duration(float64(s.flows.took)/FlowWalkShare) {
		return nil
	}
	c := flowCount{all: map[int]int{}, v6: map[int]int{}, at: now}
	if err := s.m.WalkLiveFlows(func(f maps.Flow) bool {
		c.all[f.Uplink]++
		if f.Key.Dst.Addr().Is6() {
			c.v6[f.Uplink]++
		}
		return true
	}); err != nil {
		return err
	}
	c.took = s.clock().Sub(now)
	s.flows = c
	return nil
}

// Sample reads everything once. The first frame has no rates (nothing to
// compare with).
func (s *Sampler) Sample() (Frame, error) {
	st, err := s.status()
	if err != nil {
		return Frame{}, fmt.Errorf("daemon status: %w", err)
	}
	now := s.clock()
	if s.start.IsZero() {
		s.start = now
	}
	dt := now.Sub(s.last).Seconds()
	first := s.last.IsZero()
	s.last = now
	if err := s.countFlows(now); err != nil {
		return Frame{}, err
	}
	flows, flows6 := s.flows.all, s.flows.v6
	fr := Frame{At: now.Sub(s.start), State: st.State, FlowsAge: now.Sub(s.flows.at)}
	for _, u := range st.Uplinks {
		c, err := s.m.UplinkCounters(u.ID)
		if err != nil {
			return Frame{}, err
		}
		x := Uplink{Name: u.Name, Interface: u.Interface, Up: u.Usable, Reason: u.Reason, Flows: flows[u.ID], Flows6: flows6[u.ID],
			Probed: u.Probed, RTTms: u.RTTms, Loss: u.Loss}
		if p, ok := s.prev[u.Name]; ok && !first && dt > 0 && c.RxBytes >= p.RxBytes && c.TxBytes >= p.TxBytes {
			x.DownBps = float64(c.RxBytes-p.RxBytes) * 8 / dt
			x.UpBps = float64(c.TxBytes-p.TxBytes) * 8 / dt
			x.NewPerSec = float64(c.NewFlows-p.NewFlows) / dt
		}
		s.prev[u.Name] = c
		point := x.DownBps
		if !x.Up {
			point = -1
		}
		if !first {
			h := append(s.hist[u.Name], point)
			if len(h) > HistoryLen {
				h = h[len(h)-HistoryLen:]
			}
			s.hist[u.Name] = h
		}
		x.History = append([]float64(nil), s.hist[u.Name]...)
		fr.Uplinks = append(fr.Uplinks, x)
	}
	return fr, nil
}

var bars = []rune("▁▂▃▄▅▆▇█")

// Sparkline draws a history: one bar per sample scaled to the largest, and
// "×" where the uplink was out.
func Sparkline(h []float64) string {
	max := 0.0
	for _, v := range h {
		if v > max {
			max = v
		}
	}
	var b strings.Builder
	for _, v := range h {
		switch {
		case v < 0:
			b.WriteRune('×')
		case max == 0:
			b.WriteRune(bars[0])
		default:
			b.WriteRune(bars[int(v/max*float64(len(bars)-1)+0.5)])
		}
	}
	return b.String()
}

// Write prints the frame as a table.
func (f Frame) Write(out io.Writer) error {
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	flows := "FLOWS"
	if f.FlowsAge > 0 {
		flows = fmt.Sprintf("FLOWS (%v ago)", f.FlowsAge.Round(100*time.Millisecond))
	}
	fmt.Fprintf(w, "t=%2ds\tSTATE\tDOWN Mbit/s\tUP Mbit/s\t%s\tIPv6\tNEW/s\tRTT\tLOSS\tDOWN RATE HISTORY\tREASON\n", int(f.At.Seconds()), flows)
	for _, u := range f.Uplinks {
		state := "down"
		if u.Up {
			state = "up"
		}
		rtt, loss := "-", "-"
		if u.Probed {
			rtt, loss = fmt.Sprintf("%.1fms", u.RTTms), fmt.Sprintf("%.0f%%", u.Loss*100)
		}
		fmt.Fprintf(w, "%s (%s)\t%s\t%.2f\t%.2f\t%d\t%d\t%.0f\t%s\t%s\t%s\t%s\n", u.Name, u.Interface, state,
			u.DownBps/1e6, u.UpBps/1e6, u.Flows, u.Flows6, u.NewPerSec, rtt, loss, Sparkline(u.History), u.Reason)
	}
	return w.Flush()
}
