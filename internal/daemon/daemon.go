// Package daemon is mhbpf's control loop. One goroutine owns all state and
// reconciles it: netlink events (links, addresses, routes), health results,
// reloads and a periodic resync all just wake it up, and each pass is
// three steps: observe reads a Snapshot of the world (snapshot.go); plan,
// a pure function of the configuration, the snapshot and the Memory of
// earlier passes, computes everything the box should be (plan.go); apply
// makes the kernel (routes, rules, sysctls, nftables, attachments) and the
// BPF maps match, through one small interface per part (apply.go, the real
// ones in os.go). That single owner is what replaces the lock files and
// sleeps of ip-up/ip-down scripts.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"sort"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/mhbpf/mhbpf/internal/config"
	"github.com/mhbpf/mhbpf/internal/health"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/routing"
	"github.com/mhbpf/mhbpf/internal/statefile"
)

// Daemon is one running mhbpf.
type Daemon struct {
	cfgPath string
	cfg     *config.Config
	log     *slog.Logger
	dp      *loader.Datapath
	nl      *netlink.Handle

	ctx      context.Context
	healthCh chan health.Result
	probers  map[int]*prober       // running, by uplink id (probes.go)
	probes   map[int]health.Result // their latest results
	probeGen uint64
	// probersDue: a reload may have changed the health checks; the
	// missing probers start after the next pass.
	probersDue bool

	mem     Memory    // what plan remembers between passes
	last    *Snapshot // the last full pass's, for status passes
	ap      *applier  // applies plans, remembers what it made
	metrics *metrics
	filter  *eventFilter // which netlink events wake a pass (events.go)
	// policyBytes: the kernel memory of the installed policy's tables, for
	// the status and the metrics.
	policyBytes uint64
}

// New validates the configuration and loads the datapath. Nothing in the
// routing state is changed yet.
func New(cfgPath string, log *slog.Logger) (*Daemon, error) {
	cfg, err := config.Load(cfgPath)
	if err != nil {
		return nil, err
	}
	d := &Daemon{cfgPath: cfgPath, cfg: cfg, log: log,
		healthCh: make(chan health.Result, 16), probes: map[int]health.Result{}, mem: Memory{}.clone(),
		filter: newEventFilter()}
	return d, nil
}

func (d *Daemon) stateFile(name string) string { return filepath.Join(d.cfg.Global.StateDir, name) }

// Run starts the datapath and reconciles until ctx ends. reload receives a
// value for every SIGHUP.
func (d *Daemon) Run(ctx context.Context, reload <-chan struct{}) error {
	d.ctx = ctx
	g := &d.cfg.Global
	// One daemon per state directory: two would fight over every route.
	unlock, err := lockStateDir(g.StateDir)
	if err != nil {
		return err
	}
	defer unlock()
	// Record where everything will be before touching anything, so that a
	// crash at any later point leaves 'mhbpf down' able to clean up.
	if err := statefile.Write(d.stateFile(settingsFile), settingsOf(d.cfg)); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	// The socket hooks steer the sockets of the daemon's own network
	// namespace only (a container's, below the same cgroup, are not ours).
	netns, err := loader.CurrentNetnsCookie()
	if err != nil {
		return err
	}
	dp, err := loader.Load(loader.Options{PinDir: g.PinDir, MarkMask: g.MarkMask, MarkStrict: g.StrictMark, MarkReply: g.ReplyMark,
		StickyTimeout: g.StickyTimeout, FlowMapSize: g.FlowMapSize, NetnsCookie: netns,
		InboundMapSize: g.InboundMapSize, InboundRate: g.InboundRate})
	if err != nil {
		return err
	}
	dp.Upgrade().Log(d.log)
	d.dp = dp
	defer d.dp.Close()
	if d.nl, err = netlink.NewHandle(); err != nil {
		return err
	}
	defer d.nl.Close()

	// Slots, marks and tables stay with the uplinks' names (the flows in the
	// pinned maps name their uplink by slot and carry its mark).
	if err := d.takeIdentities(); err != nil {
		return err
	}
	if err := statefile.Write(d.stateFile(statusFile), d.convergingStatus()); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	if err := d.applyStatic(); err != nil {
		return err
	}
	if g.MetricsListen != "" {
		if d.metrics, err = startMetrics(g.MetricsListen, dp.Maps); err != nil {
			return err
		}
		defer d.metrics.close()
		d.log.Info("metrics", "listen", g.MetricsListen)
	}
	d.ap = newApplier(System{Datapath: dp.Maps, Attacher: kernelAttacher{dp},
		Router: kernelRouter{nl: d.nl, s: d.routingSettings(), savedFile: d.stateFile(routesFile), log: d.log},
		NAT:    kernelNAT{g.NFTable}, Sysctls: kernelSysctls{d.stateFile(sysctlFile)}, Conntrack: kernelConntrack{d.nl},
		Status: statusSinks{file: d.stateFile(statusFile), metrics: d.metrics}}, d.log)
	cg := g.CgroupPath
	if cg == "" {
		if cg, err = loader.Cgroup2Root(); err != nil {
			return err
		}
	}
	if err := dp.AttachCgroup(cg); err != nil {
		return err
	}
	d.log.Info("socket hooks attached", "cgroup", cg, "netns_cookie", dp.NetnsCookie())

	d.filter.set(d.cfg)
	events, err := d.subscribe(ctx)
	if err != nil {
		return err
	}
	d.keepPinned()
	defer d.stopHealth()

	resync := time.NewTicker(g.ResyncEvery)
	defer resync.Stop()
	var wake <-chan time.Time
	d.reconcile(&wake)
	d.startProbers(ctx) // once this pass made their uplinks' tables
	// The first pass swapped the programs in place: what the old ones
	// recorded in maps an upgrade replaced comes over now.
	if n, err := dp.FinishUpgrade(); err != nil {
		d.log.Error("upgrade of the pinned maps", "error", err)
	} else if n > 0 {
		d.log.Info("pinned maps: entries the old programs made during the upgrade copied", "entries", n)
	}
	// The first full pass is done: routes, rules and maps are in place for
	// everything observable. systemd (Type=notify) starts what is ordered
	// after mhbpf now.
	if err := sdNotify("READY=1"); err != nil {
		d.log.Error("telling systemd the daemon is ready", "error", err)
	}
	d.log.Info("ready: first pass done")
	for {
		select {
		case <-ctx.Done():
			if err := sdNotify("STOPPING=1"); err != nil {
				d.log.Warn("telling systemd the daemon stops", "error", err)
			}
			if g.TeardownOnExit {
				d.log.Info("tearing down on exit")
				return Down(g.StateDir, settingsOf(d.cfg), d.log)
			}
			d.log.Info("exiting; the datapath stays pinned and keeps forwarding")
			return nil
		case <-reload:
			d.reload()
		case r := <-d.healthCh:
			// A result that changes no verdict changes nothing in the
			// kernel: it updates the status only, without reading the
			// world again (with 16 probed uplinks, a full pass per
			// result was 6 % of a core while idle).
			// Not while a netlink event waits: the last snapshot is
			// older than it, and a status written now would describe a
			// world that has changed (a link that just went down, still
			// usable) as current.
			if !d.probeResult(r) && !eventPending(events) && d.statusPass(&wake) {
				continue
			}
		case <-events:
			// Bursts (a link going away deletes addresses and routes too)
			// are folded into one pass, but never wait longer than
			// debounceMax: a stream of events must not hold a failover.
			drain(events, debounceQuiet, debounceMax)
		case <-wake:
			wake = nil
		case <-resync.C:
		}
		d.reconcile(&wake)
		if d.probersDue {
			d.probersDue = false
			d.startProbers(d.ctx)
		}
	}
}

// Debouncing of netlink events: a pass follows debounceQuiet after the
// last event of a burst, and at most debounceMax after its first.
const (
	debounceQuiet = 10 * time.Millisecond
	debounceMax   = 50 * time.Millisecond
)

// eventPending takes an event waiting in ch, if there is one, and says so:
// the caller makes the full pass it asks for.
func eventPending(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// drain swallows events until quiet passes without one, or max since it
// was called.
func drain(ch <-chan struct{}, quiet, max time.Duration) {
	deadline := time.NewTimer(max)
	defer deadline.Stop()
	t := time.NewTimer(quiet)
	defer t.Stop()
	for {
		select {
		case <-ch:
			t.Reset(quiet)
		case <-t.C:
			return
		case <-deadline.C:
			return
		}
	}
}

// applyStatic writes what follows from the configuration alone: policy,
// stale uplink slots. (Bypass prefixes also depend on the LAN's addresses:
// each pass sets them.)
// largePolicy is the prefix count from which an install returns the
// garbage of its loading to the OS at once.
const largePolicy = 10_000

func (d *Daemon) applyStatic() error {
	stats, err := d.dp.Maps.InstallPolicy(policyOf(d.cfg))
	if err != nil {
		return fmt.Errorf("policy: %w", err)
	}
	d.policyBytes = stats.KernelBytes
	if stats.Prefixes >= largePolicy {
		// Reading, parsing and folding a large list leave hundreds of MB
		// of garbage (1M prefixes: about 200 MB resident), which the
		// runtime would give back only over minutes: give it back now,
		// once per install.
		debug.FreeOSMemory()
	}
	rss, _ := residentBytes()
	d.log.Info("policy installed", "rules", len(d.cfg.Policies), "prefixes", stats.Prefixes,
		"kernel_bytes", stats.KernelBytes, "took", stats.Took.Round(time.Millisecond), "daemon_rss_bytes", rss)
	// Slots of uplinks an earlier configuration had (the maps are pinned
	// and outlive the daemon) must not stay up.
	inUse := map[int]bool{}
	for _, u := range d.cfg.Uplinks {
		inUse[u.ID] = true
	}
	for id := 0; id < maps.MaxUplinks; id++ {
		if inUse[id] {
			continue
		}
		if err := d.dp.Maps.ClearUplink(id); err != nil {
			return err
		}
	}
	if d.ap != nil {
		d.ap.bypass = "" // rewritten by the next pass
	}
	return nil
}

// policyOf is the datapath's policy: uplinks by their slots (ID), each
// action's uplinks in fib rule order (the configuration's), as the
// programs' fallback bits want them.
func policyOf(c *config.Config) maps.Policy {
	var p maps.Policy
	for _, u := range c.Uplinks {
		if u.Balance {
			p.Default.Uplinks = append(p.Default.Uplinks, maps.Choice{Uplink: uint8(u.ID), Tier: u.Tier, Weight: u.Weight})
		}
	}
	for _, cp := range c.Policies {
		r := maps.Rule{Dst: cp.Destinations, Src: cp.Sources, Proto: cp.Protocol}
		for _, pr := range cp.Ports {
			r.Ports = append(r.Ports, maps.PortRange{Lo: pr.Lo, Hi: pr.Hi})
		}
		pos := make([]int, len(cp.Uplinks)) // fib rule order
		for i, idx := range cp.Uplinks {
			ch := maps.Choice{Uplink: uint8(c.Uplinks[idx].ID), Tier: uint8(i), Weight: max(c.Uplinks[idx].Weight, 1)}
			if cp.Balance {
				ch.Tier = 0
			}
			r.Action.Uplinks = append(r.Action.Uplinks, ch)
			pos[i] = idx
		}
		sort.Sort(byPos{pos, r.Action.Uplinks})
		if cp.Unreachable {
			r.Action.Fallback = maps.FallbackUnreachable
		}
		switch cp.Sticky {
		case "flow":
			r.Action.Sticky = maps.StickyFlow
		case "pair":
			r.Action.Sticky = maps.StickyPair
		}
		p.Rules = append(p.Rules, r)
	}
	return p
}

// reload applies a new configuration, or keeps the running one if the new
// one is bad or needs a restart.
func (d *Daemon) reload() {
	cfg, err := config.Load(d.cfgPath)
	if err != nil {
		d.log.Error("reload refused, keeping the running configuration", "error", err)
		return
	}
	old := d.cfg.Global
	g := cfg.Global
	if g.PinDir != old.PinDir || g.MarkMask != old.MarkMask || g.StrictMark != old.StrictMark || g.ReplyMark != old.ReplyMark ||
		g.FlowMapSize != old.FlowMapSize || g.InboundMapSize != old.InboundMapSize || g.InboundRate != old.InboundRate || g.RulePriority != old.RulePriority || g.RouteProtocol != old.RouteProtocol ||
		g.NFTable != old.NFTable || g.StateDir != old.StateDir || g.CgroupPath != old.CgroupPath || g.StickyTimeout != old.StickyTimeout {
		d.log.Error("reload refused: global settings changed that need a restart (mark_mask, strict_mark, reply_mark, pin_dir, flow_map_size, inbound_map_size, inbound_rate, rule_priority, route_protocol, nft_table, state_dir, cgroup, sticky_timeout); keeping the running configuration")
		return
	}
	prev := d.cfg
	// Uplinks keep their slots, marks and tables by name; removed ones
	// free theirs (identity.go).
	changes, err := cfg.AssignIdentities(prev.Identities())
	if err != nil {
		d.log.Error("reload refused, keeping the running configuration", "error", err)
		return
	}
	d.cfg = cfg
	d.last = nil // a snapshot of the previous configuration's interfaces
	d.logIdentities(changes)
	d.moveIdentities(prev.Identities())
	if err := d.applyStatic(); err != nil {
		d.log.Error("reload failed, going back to the running configuration", "error", err)
		d.cfg = prev
		d.moveIdentities(cfg.Identities())
		_ = d.applyStatic()
		return
	}
	if err := d.saveIdentities(); err != nil {
		d.log.Error("recording the uplink identities", "error", err)
	}
	// Interfaces gone from the configuration lose the program (their map
	// slots went in applyStatic).
	d.detachRemoved(prev)
	// Probers of unchanged health checks keep running, and their verdicts
	// stand; changed ones start again without a verdict (probes.go), once
	// the pass that follows made the tables of new uplinks.
	d.stopStaleProbers()
	d.probersDue = true
	d.filter.set(d.cfg)
	d.log.Info("configuration reloaded")
}

func (d *Daemon) detachRemoved(prev *config.Config) {
	forgetRemoved(d.ap.attached, prev, d.cfg, func(ifname string) { _ = d.dp.DetachTC(ifname) })
}

// forgetRemoved drops from attached the interfaces a new configuration
// removed (detaching them) or gave another role or slot: the next pass
// attaches those again, which writes their new entry in the interfaces
// map.
func forgetRemoved(attached map[string]int, prev, cfg *config.Config, detach func(ifname string)) {
	was, is := ifaceRoles(prev), ifaceRoles(cfg)
	for ifname := range attached {
		if _, ok := is[ifname]; !ok {
			detach(ifname)
			delete(attached, ifname)
		} else if was[ifname] != is[ifname] {
			delete(attached, ifname)
		}
	}
}

func (d *Daemon) routingSettings() routing.Settings { return routingSettingsOf(&d.cfg.Global) }

// reconcile is one pass: observe, plan, apply. It is idempotent. wake is
// set to the time the plan wants the next pass at, if any.
func (d *Daemon) reconcile(wake *<-chan time.Time) {
	s := d.observe()
	p := plan(d.cfg, s, d.mem)
	d.mem = p.Memory
	d.fillStatus(&p.Status)
	d.ap.apply(p, s)
	d.last = &s
	if p.Wake > 0 {
		*wake = time.After(p.Wake)
	}
}

// statusPass brings the status up to date after probe results that
// changed no verdict: the plan of the last pass's snapshot with the
// current results. It reports false, and does nothing, when that plan
// would change anything in the kernel (the last pass changed the world
// since its snapshot, a hold-down ran out, something is to be retried),
// or when the snapshot is older than fullPassEvery: then a full pass is
// due. The plan's memory is not kept: only full passes advance it.
func (d *Daemon) statusPass(wake *<-chan time.Time) bool {
	if d.last == nil || len(d.ap.unretired) > 0 || len(d.ap.failing) > 0 {
		return false // and what failed is tried again
	}
	if time.Since(d.last.Now) >= fullPassEvery {
		return false
	}
	s := *d.last
	s.Now = time.Now()
	s.Probes = d.probeResults()
	p := plan(d.cfg, s, d.mem)
	if p.touchesKernel(s) {
		return false
	}
	d.fillStatus(&p.Status)
	d.ap.status(p)
	if p.Wake > 0 {
		*wake = time.After(p.Wake)
	}
	return true
}

// fullPassEvery: while probes run, the world is read again at least this
// often, whatever their verdicts: what no event announces (fib rules and
// sysctls someone changed) is put back as soon as when each probe result
// was a pass, once a second, however many uplinks are probed.
const fullPassEvery = time.Second

// fillStatus adds what the plan does not know: the process's own figures.
func (d *Daemon) fillStatus(st *Status) {
	st.PID = os.Getpid()
	st.ResidentBytes, st.PeakResidentBytes = residentBytes()
	st.PolicyKernelBytes = d.policyBytes
}

// subscribe listens to links, addresses and routes. A subscription that
// fails (or overflows) is opened again and the next pass resyncs fully.
func (d *Daemon) subscribe(ctx context.Context) (<-chan struct{}, error) {
	out := make(chan struct{}, 1)
	notify := func() {
		select {
		case out <- struct{}{}:
		default:
		}
	}
	var start func() error
	start = func() error {
		sub, cancel := context.WithCancel(ctx)
		failed := func(err error) {
			d.log.Warn("netlink subscription failed; resubscribing and resyncing", "error", err)
			cancel()
			notify()
			go func() {
				for ctx.Err() == nil {
					if err := start(); err == nil {
						return
					}
					time.Sleep(time.Second)
				}
			}()
		}
		links := make(chan netlink.LinkUpdate, 256)
		addrs := make(chan netlink.AddrUpdate, 256)
		routes := make(chan netlink.RouteUpdate, 256)
		done := sub.Done()
		var once bool
		onErr := func(err error) {
			if !once {
				once = true
				failed(err)
			}
		}
		if err := netlink.LinkSubscribeWithOptions(links, done, netlink.LinkSubscribeOptions{ErrorCallback: onErr}); err != nil {
			cancel()
			return err
		}
		if err := netlink.AddrSubscribeWithOptions(addrs, done, netlink.AddrSubscribeOptions{ErrorCallback: onErr}); err != nil {
			cancel()
			return err
		}
		if err := netlink.RouteSubscribeWithOptions(routes, done, netlink.RouteSubscribeOptions{ErrorCallback: onErr}); err != nil {
			cancel()
			return err
		}
		go func() {
			for {
				relevant := true
				select {
				case u, ok := <-links:
					if !ok {
						return
					}
					relevant = d.filter.link(u)
				case _, ok := <-addrs:
					if !ok {
						return
					}
				case u, ok := <-routes:
					if !ok {
						return
					}
					relevant = d.filter.route(u)
				case <-done:
					return
				}
				if relevant {
					notify()
				}
			}
		}()
		return nil
	}
	if err := start(); err != nil {
		return nil, fmt.Errorf("netlink subscribe: %w", err)
	}
	d.watchDrift(ctx, notify)
	return out, nil
}

func removeIfExists(p string) error {
	err := os.Remove(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}
