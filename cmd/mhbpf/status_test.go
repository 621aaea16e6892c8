package main

import (
	"testing"

	"github.com/mhbpf/mhbpf/internal/daemon"
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
