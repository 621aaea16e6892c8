package daemon

import (
	"context"
	"reflect"

	"github.com/mhbpf/mhbpf/internal/health"
)

// What the probes mean for using an uplink whose link is up:
//
//   - A prober starts without a verdict. Until its first one (an answer, or
//     failures failed rounds in a row) the uplink is not used: "waiting for
//     the first probe verdict". This is so at the first start and for an
//     uplink whose health check a reload changed (or added): the new check
//     has not said anything yet. A reload that leaves an uplink's check as
//     it was keeps its prober and its verdict.
//   - A restarted daemon keeps an uplink in use until its first verdict if
//     the pinned uplinks map says the datapath was using it (up, same mark,
//     same interface index): a restart does not take a working uplink out
//     for the time of a verdict; one that was out stays out until its
//     probes answer.
//   - When every uplink of the default balance whose link is up is probed
//     and failing, the LAN would have no way out; that is more likely one
//     shared target gone than every provider at once. Then the probes are
//     ignored and failing uplinks are used by their link state ("all probed
//     uplinks failing at once: using link state"), until one answers again.
const (
	reasonWaiting  = "waiting for the first probe verdict"
	reasonKept     = "in use before the restart; " + reasonWaiting
	reasonFallback = "all probed uplinks failing at once: using link state"
)

// prober is a running health.Prober.
type prober struct {
	spec   health.Spec
	cancel context.CancelFunc
}

// healthSpecs are the health checks the configuration asks for, by uplink.
func (d *Daemon) healthSpecs() map[int]health.Spec {
	want := map[int]health.Spec{}
	for _, u := range d.cfg.Uplinks {
		if u.Health != nil {
			want[u.ID] = health.Spec{Uplink: u.ID, Interface: u.Interface, Mark: u.Mark, Health: *u.Health}
		}
	}
	return want
}

// stopStaleProbers stops the probers of uplinks no longer probed or whose
// check changed, and forgets their verdicts: a changed check starts again
// without one. A prober whose spec is unchanged keeps running, and its
// verdict stands. Before the pass that follows a reload.
func (d *Daemon) stopStaleProbers() {
	want := d.healthSpecs()
	for id, p := range d.probers {
		if s, ok := want[id]; ok && sameSpec(s, p.spec) {
			continue
		}
		p.cancel()
		delete(d.probers, id)
		delete(d.probes, id)
		um := d.mem.Uplinks[id]
		um.Kept = false
		d.mem.Uplinks[id] = um
	}
}

// startProbers runs one prober per probed uplink that has none. After a
// pass: a probe goes out with its uplink's mark, and before the pass made
// the uplink's table the first round would fail for nothing (a loss in the
// status, and a verdict one round late).
func (d *Daemon) startProbers(parent context.Context) {
	if d.probers == nil {
		d.probers = map[int]*prober{}
	}
	for id, s := range d.healthSpecs() {
		if _, ok := d.probers[id]; ok {
			continue
		}
		d.probeGen++
		s.Gen = d.probeGen
		ctx, cancel := context.WithCancel(parent)
		d.probers[id] = &prober{spec: s, cancel: cancel}
		go health.NewProber(s).Run(ctx, d.healthCh)
	}
}

func sameSpec(a, b health.Spec) bool {
	a.Gen, b.Gen = 0, 0
	return reflect.DeepEqual(a, b)
}

func (d *Daemon) stopHealth() {
	for id, p := range d.probers {
		p.cancel()
		delete(d.probers, id)
	}
}

// probeResult takes a prober's result, unless it comes from a prober that
// was replaced since (its results may still be queued), and tells whether
// it changed the uplink's verdict: only a verdict (none, healthy,
// unhealthy) can change what the kernel is given; the rest (RTT, loss,
// the reason so far) is status.
func (d *Daemon) probeResult(r health.Result) (verdictChanged bool) {
	if p, ok := d.probers[r.Uplink]; !ok || p.spec.Gen != r.Gen {
		return false
	}
	prev, had := d.probes[r.Uplink]
	d.probes[r.Uplink] = r // a verdict ends Kept (plan)
	return !had || prev.Verdict != r.Verdict || prev.Healthy != r.Healthy
}

// probeResults is a copy of the latest results, for a snapshot.
func (d *Daemon) probeResults() map[int]health.Result {
	out := make(map[int]health.Result, len(d.probes))
	for id, r := range d.probes {
		out[id] = r
	}
	return out
}

// keepPinned notes, before the first pass writes the uplinks map, which
// probed uplinks the datapath was using: those stay in use until their
// first verdict.
func (d *Daemon) keepPinned() {
	for _, u := range d.cfg.Uplinks {
		id := u.ID
		if u.Health == nil {
			continue
		}
		m, err := d.dp.Maps.LookupUplink(id)
		if err != nil || !m.Up || m.Mark != u.Mark {
			continue
		}
		if l, err := d.nl.LinkByName(u.Interface); err != nil || uint32(l.Attrs().Index) != m.Ifindex {
			continue
		}
		um := d.mem.Uplinks[id]
		um.Kept = true
		d.mem.Uplinks[id] = um
		d.log.Info("uplink was in use before the restart: kept until the first probe verdict", "uplink", u.Name)
	}
}
