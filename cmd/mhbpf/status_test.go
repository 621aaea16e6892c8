package main

import (
	"testing"

	"github.com/mhbpf/mhbpf/internal/daemon"
	"github.com/mhbpf/mhbpf/internal/maps"
)

func TestHealth(t *testing.T) {
	up := daemon.UplinkStatus{Name: "isp1", Usable: true}
	down := daemon.UplinkStatus{Name: "isp2"}
	for _, c := range []struct {
		name  string
		st    daemon.Status
		alive bool
		word  string
		code  int
	}{
		{"all up", daemon.Status{State: daemon.StateRunning, Uplinks: []daemon.UplinkStatus{up, up}}, true, "healthy", 0},
		{"one down", daemon.Status{State: daemon.StateRunning, Uplinks: []daemon.UplinkStatus{up, down}}, true, "degraded", 3},
		{"probes ignored", daemon.Status{State: daemon.StateRunning, ProbeFallback: true, Uplinks: []daemon.UplinkStatus{up}}, true, "degraded", 3},
		{"all down", daemon.Status{State: daemon.StateRunning, Uplinks: []daemon.UplinkStatus{down, down}}, true, "down", 4},
		{"converging", daemon.Status{State: daemon.StateConverging, Uplinks: []daemon.UplinkStatus{down}}, true, "degraded", 3},
		{"gone", daemon.Status{State: daemon.StateRunning, Uplinks: []daemon.UplinkStatus{up}}, false, "not-running", 5},
	} {
		if w, code := health(c.st, c.alive); w != c.word || code != c.code {
			t.Errorf("%s: %s %d, want %s %d", c.name, w, code, c.word, c.code)
		}
	}
}

// The daemon's memory, as its status has it, in both forms of the output.
func TestStatusMemory(t *testing.T) {
	st := daemon.Status{State: daemon.StateRunning, ResidentBytes: 23_500_000, PeakResidentBytes: 161_200_000, PolicyKernelBytes: 45_600_000}
	if got, want := memoryLine(st), "memory: daemon 23.5 MB resident (peak 161.2 MB), policy 45.6 MB in the kernel"; got != want {
		t.Errorf("text: %q, want %q", got, want)
	}
	small := daemon.Status{ResidentBytes: 2_000_000_000, PeakResidentBytes: 2_500, PolicyKernelBytes: 120}
	if got, want := memoryLine(small), "memory: daemon 2.0 GB resident (peak 2.5 kB), policy 120 B in the kernel"; got != want {
		t.Errorf("text: %q, want %q", got, want)
	}
	j := statusAsJSON(st, true, "healthy", 0, func(int) maps.Counters { return maps.Counters{} })
	if j.ResidentBytes != 23_500_000 || j.PeakResidentBytes != 161_200_000 || j.PolicyKernelBytes != 45_600_000 {
		t.Errorf("json: resident %d, peak %d, policy %d", j.ResidentBytes, j.PeakResidentBytes, j.PolicyKernelBytes)
	}
}
