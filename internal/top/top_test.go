package top

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/mhbpf/mhbpf/internal/daemon"
	"github.com/mhbpf/mhbpf/internal/maps"
)

func TestSparkline(t *testing.T) {
	for _, c := range []struct {
		h    []float64
		want string
	}{
		{nil, ""},
		{[]float64{0, 0}, "▁▁"},
		{[]float64{0, 4, 8}, "▁▅█"},
		{[]float64{8, -1, -1, 2, 8}, "█××▃█"},
	} {
		if got := Sparkline(c.h); got != c.want {
			t.Errorf("%v: %q, want %q", c.h, got, c.want)
		}
	}
}

// fakeMaps holds flows on uplink 0; each walk moves the clock on by
// walkTakes, as a walk of a full flow map takes time.
type fakeMaps struct {
	now       *time.Time
	walkTakes time.Duration
	flows     int
	walks     int
}

func (f *fakeMaps) WalkLiveFlows(fn func(maps.Flow) bool) error {
	f.walks++
	*f.now = f.now.Add(f.walkTakes)
	for range f.flows {
		if !fn(maps.Flow{Key: maps.FlowKey{Dst: netip.MustParseAddrPort("198.51.100.1:443")}}) {
			break
		}
	}
	return nil
}

func (f *fakeMaps) UplinkCounters(int) (maps.Counters, error) { return maps.Counters{}, nil }

// A quick walk is done every frame; a slow one (a full flow map) at most
// FlowWalkShare of the time, the frames in between showing the last count
// and its age.
func TestFlowsAreCountedWithinTheWalkShare(t *testing.T) {
	for _, c := range []struct {
		name      string
		walkTakes time.Duration
		walks     int
	}{
		{"quick walk", time.Millisecond, 20},
		// A walk of 0.3 s is due again 3 s after it began: frames a
		// second apart (plus the walks' own time) walk at frames 0, 3,
		// 6, ..., 18, the others 1.3 s and 2.3 s after the last walk.
		{"slow walk", 300 * time.Millisecond, 7},
	} {
		now := time.Unix(1e9, 0)
		fm := &fakeMaps{now: &now, walkTakes: c.walkTakes, flows: 7}
		s := NewSampler(fm, func() (daemon.Status, error) {
			return daemon.Status{State: "running", Uplinks: []daemon.UplinkStatus{{Name: "isp1", ID: 0, Usable: true}}}, nil
		})
		s.clock = func() time.Time { return now }
		var ages []time.Duration
		for range 20 {
			fr, err := s.Sample()
			if err != nil {
				t.Fatal(err)
			}
			if fr.Uplinks[0].Flows != 7 {
				t.Fatalf("%s: %d flows, want 7 (the last count)", c.name, fr.Uplinks[0].Flows)
			}
			ages = append(ages, fr.FlowsAge)
			now = now.Add(time.Second)
		}
		if fm.walks != c.walks {
			t.Errorf("%s: %d walks in 20 frames, want %d (ages %v)", c.name, fm.walks, c.walks, ages)
		}
		var walkTime time.Duration = time.Duration(fm.walks) * c.walkTakes
		if share := walkTime.Seconds() / (20*time.Second + walkTime).Seconds(); share > FlowWalkShare {
			t.Errorf("%s: %.2f of the time walking, over %.2f", c.name, share, FlowWalkShare)
		}
		var out strings.Builder
		fr := Frame{FlowsAge: ages[1], Uplinks: []Uplink{{Name: "isp1", Flows: 7}}}
		if err := fr.Write(&out); err != nil {
			t.Fatal(err)
		}
		if stale := ages[1] > 0; stale != strings.Contains(out.String(), "FLOWS (1.3s ago)") || !stale && !strings.Contains(out.String(), "FLOWS  ") {
			t.Errorf("%s: age %v, header:\n%s", c.name, ages[1], out.String())
		}
	}
}
