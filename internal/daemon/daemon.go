// Package daemon is mhbpf's control loop. One goroutine owns all state and
// reconciles it: netlink events (links, addresses, routes), health results,
// reloads and a periodic resync all just wake it up, and each pass computes
// the whole desired state from the configuration and what it observes, then
// makes the kernel (routes, rules, sysctls, nftables) and the BPF maps match.
// That single owner is what replaces the lock files and sleeps of
// ip-up/ip-down scripts.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/config"
	"github.com/mhbpf/mhbpf/internal/conntrack"
	"github.com/mhbpf/mhbpf/internal/health"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/nat"
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
	tcMode  loader.Mode

	ctx      context.Context
	healthCh chan health.Result
	probers  map[int]*prober // running, by uplink id (probes.go)
	probeGen uint64
	kept     map[int]bool // in use before a restart: used until the first probe verdict
	fallback bool         // every probed uplink failing: using link state

	// Observed and derived per uplink, by id.
	upSince  map[int]time.Time // link usable since (for up_delay)
	usable   map[int]bool
	health   map[int]health.Result
	attached map[string]int // interface -> ifindex it is attached at
	natTable nat.Table
	natSet   bool
	seen     map[int]bool // uplinks usable at least once
	// lastAddrs: each uplink's addresses when last seen with any. A link
	// that just died may show none, but its connections are still bound
	// to them.
	lastAddrs map[int][]netip.Addr
	metrics   *metrics
	bypass    string // the bypass prefixes last written
}

// New validates the configuration and loads the datapath. Nothing in the
// routing state is changed yet.
func New(cfgPath string, log *slog.Logger) (*Daemon, error) {
	cfg, err := config.Load(cfgPath)
	if err != nil {
		return nil, err
	}
	d := &Daemon{cfgPath: cfgPath, cfg: cfg, log: log,
		healthCh: make(chan health.Result, 16),
		upSince:  map[int]time.Time{}, usable: map[int]bool{}, health: map[int]health.Result{}, attached: map[string]int{},
		lastAddrs: map[int][]netip.Addr{}}
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

	events, err := d.subscribe(ctx)
	if err != nil {
		return err
	}
	d.keepPinned()
	d.syncHealth(ctx)
	defer d.stopHealth()

	resync := time.NewTicker(g.ResyncEvery)
	defer resync.Stop()
	var holdTimer <-chan time.Time
	d.reconcile(&holdTimer)
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
			// Every result is a pass: a pass is cheap, idempotent, and
			// keeps the status (RTT, loss, reason) current.
			d.probeResult(r)
		case <-events:
			// Bursts (a link going away deletes addresses and routes too)
			// are folded into one pass.
			drain(events, 20*time.Millisecond)
		case <-holdTimer:
			holdTimer = nil
		case <-resync.C:
		}
		d.reconcile(&holdTimer)
	}
}

func drain(ch <-chan struct{}, quiet time.Duration) {
	t := time.NewTimer(quiet)
	defer t.Stop()
	for {
		select {
		case <-ch:
			if !t.Stop() {
				<-t.C
			}
			t.Reset(quiet)
		case <-t.C:
			return
		}
	}
}

// applyStatic writes what follows from the configuration alone: policy,
// stale uplink slots. (Bypass prefixes also depend on the LAN's addresses:
// each pass sets them.)
func (d *Daemon) applyStatic() error {
	stats, err := d.dp.Maps.InstallPolicy(policyOf(d.cfg))
	if err != nil {
		return fmt.Errorf("policy: %w", err)
	}
	d.log.Info("policy installed", "rules", len(d.cfg.Policies), "prefixes", stats.Prefixes,
		"kernel_bytes", stats.KernelBytes, "took", stats.Took.Round(time.Millisecond), "daemon_rss_bytes", residentBytes())
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
	d.bypass = ""
	return nil
}

// applyBypass sets the destinations never steered: the configured ones and
// the subnets of the LAN interfaces (the LAN is the LAN whatever the config
// says), when they changed.
func (d *Daemon) applyBypass(lan []netip.Prefix) {
	prefixes := append(append([]netip.Prefix(nil), d.cfg.LAN.Bypass...), lan...)
	key := fmt.Sprint(prefixes)
	if key == d.bypass {
		return
	}
	if err := d.dp.Maps.SetBypass(prefixes); err != nil {
		d.log.Error("bypass prefixes", "error", err)
		return
	}
	d.bypass = key
	d.log.Info("destinations not steered", "prefixes", key)
}

// lanSubnets are the subnets of the LAN interfaces' addresses.
func (d *Daemon) lanSubnets() []netip.Prefix {
	var prefixes []netip.Prefix
	for _, ifname := range d.cfg.LAN.Interfaces {
		l, err := d.nl.LinkByName(ifname)
		if err != nil {
			continue
		}
		addrs, err := d.nl.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			continue
		}
		for _, a := range addrs {
			ip, ok := netip.AddrFromSlice(a.IP)
			if !ok || ip.IsLinkLocalUnicast() {
				continue
			}
			ones, _ := a.Mask.Size()
			if ones == 0 {
				continue // not a subnet: no rule can say "to" it
			}
			prefixes = append(prefixes, netip.PrefixFrom(ip.Unmap(), ones).Masked())
		}
	}
	return prefixes
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
	// stand; changed ones start again without a verdict (probes.go).
	d.syncHealth(d.ctx)
	d.log.Info("configuration reloaded")
}

func (d *Daemon) detachRemoved(prev *config.Config) {
	keep := map[string]bool{}
	for _, u := range d.cfg.Uplinks {
		keep[u.Interface] = true
	}
	for _, i := range d.cfg.LAN.Interfaces {
		keep[i] = true
	}
	// An interface that now is another uplink's (another slot), or changed
	// role, is attached again by the next pass, which writes its new entry
	// in the interfaces map.
	was, is := ifaceRoles(prev), ifaceRoles(d.cfg)
	for ifname := range d.attached {
		if !keep[ifname] {
			_ = d.dp.DetachTC(ifname)
			delete(d.attached, ifname)
		} else if was[ifname] != is[ifname] {
			delete(d.attached, ifname)
		}
	}
}

// observation is what the kernel says about one uplink's interface.
type observation struct {
	ifindex int
	encap   string
	up      bool
	addrs   []netip.Addr
	reason  string
}

func (d *Daemon) observe(ifname string) observation {
	l, err := d.nl.LinkByName(ifname)
	if err != nil {
		return observation{reason: "interface " + ifname + " absent"}
	}
	a := l.Attrs()
	o := observation{ifindex: a.Index, encap: a.EncapType}
	// ppp and tun report operstate "unknown": up means administratively up
	// with a carrier.
	o.up = a.Flags&net.FlagUp != 0 && a.RawFlags&unix.IFF_RUNNING != 0 &&
		(a.OperState == netlink.OperUp || a.OperState == netlink.OperUnknown)
	if !o.up {
		o.reason = "link down"
		return o
	}
	addrs, err := d.nl.AddrList(l, netlink.FAMILY_ALL)
	if err == nil {
		for _, ad := range addrs {
			ip, ok := netip.AddrFromSlice(ad.IP)
			if !ok || ad.Scope != unix.RT_SCOPE_UNIVERSE || ip.IsLinkLocalUnicast() {
				continue
			}
			o.addrs = append(o.addrs, ip.Unmap())
		}
	}
	if len(o.addrs) == 0 {
		o.reason = "no address"
	}
	return o
}

// reconcile is one pass: observe, compute, apply. It is idempotent.
func (d *Daemon) reconcile(holdTimer *<-chan time.Time) {
	now := time.Now()
	g := &d.cfg.Global
	var routed []routing.Uplink
	var status Status
	status.PID = os.Getpid()
	status.Updated = now
	status.State = StateRunning
	status.TCMode = string(d.tcMode)
	var natTable nat.Table
	var nextHold time.Duration
	var wentDown []downUplink
	// Each interface is asked once per pass: the probe fallback needs
	// every uplink's link state before the first uplink is judged.
	obs := make([]observation, len(d.cfg.Uplinks))
	for pos, u := range d.cfg.Uplinks {
		obs[pos] = d.observe(u.Interface)
	}
	fallback := d.probeFallback(obs)
	status.ProbeFallback = fallback

	for pos, u := range d.cfg.Uplinks {
		id := u.ID // its slot; pos is its place in the preference order
		o := obs[pos]
		if len(o.addrs) > 0 {
			d.lastAddrs[id] = o.addrs
		}
		linkOK := o.reason == ""
		if !linkOK {
			delete(d.upSince, id)
		} else if _, ok := d.upSince[id]; !ok {
			d.upSince[id] = now
		}
		usable, reason := linkOK, o.reason
		// Hysteresis: a link that came (back) must stay up for up_delay,
		// unless it was already in use (a daemon restart does not hold
		// back a link that was fine).
		if usable && !d.usable[id] && d.everUsable(id) {
			if wait := g.UpDelay - now.Sub(d.upSince[id]); wait > 0 {
				usable, reason = false, fmt.Sprintf("up for %v, held until %v", now.Sub(d.upSince[id]).Round(time.Millisecond), g.UpDelay)
				if nextHold == 0 || wait < nextHold {
					nextHold = wait
				}
			}
		}
		hr, probed := d.health[id]
		usable, reason = d.judgeProbes(u, linkOK, usable, reason, fallback)

		// Datapath: interface program and uplink entry.
		if o.ifindex != 0 && d.attached[u.Interface] != o.ifindex {
			if old := d.attached[u.Interface]; old != 0 {
				_ = d.dp.Maps.DeleteIface(old) // the device that had this name is gone
			}
			mode, err := d.dp.AttachTC(u.Interface, maps.RoleUplink, id)
			if err != nil {
				d.log.Error("attach", "interface", u.Interface, "error", err)
			} else {
				d.attached[u.Interface] = o.ifindex
				d.tcMode = mode
				d.log.Info("attached", "interface", u.Interface, "uplink", u.Name, "mode", mode)
			}
		}
		mu := maps.Uplink{Mark: u.Mark, Ifindex: uint32(o.ifindex), Weight: u.Weight, Tier: u.Tier, Up: usable}
		for _, a := range o.addrs {
			if a.Is4() && !mu.Addr4.IsValid() {
				mu.Addr4 = a
			} else if a.Is6() && !mu.Addr6.IsValid() {
				mu.Addr6 = a
			}
		}
		if err := d.dp.Maps.SetUplink(id, mu); err != nil {
			d.log.Error("uplinks map", "uplink", u.Name, "error", err)
		}
		if d.usable[id] != usable {
			if usable {
				d.log.Info("uplink up", "uplink", u.Name, "interface", u.Interface)
				d.markEverUsable(id)
			} else {
				n, _ := d.dp.Maps.DeleteFlowsOfUplink(id)
				wentDown = append(wentDown, downUplink{id: id, name: u.Name, reason: reason, flows: n})
			}
			d.usable[id] = usable
		}

		routed = append(routed, routing.Uplink{Pos: pos, Interface: u.Interface, Table: u.Table, Mark: u.Mark,
			Weight: u.Weight, Balance: u.Balance, Tier: u.Tier, Gateway: u.Gateway, Gateway6: u.Gateway6,
			Ifindex: o.ifindex, LinkUp: linkOK, Usable: usable, Addrs: o.addrs})
		if u.Masquerade {
			natTable.Masquerade = append(natTable.Masquerade, u.Interface)
		}
		if u.ClampMSS {
			natTable.ClampMSS = append(natTable.ClampMSS, u.Interface)
		}
		st := UplinkStatus{Name: u.Name, Interface: u.Interface, ID: id, Usable: usable, Reason: reason,
			Weight: u.Weight, Mark: u.Mark, Table: u.Table, Probed: probed}
		for _, a := range o.addrs {
			st.Addresses = append(st.Addresses, a.String())
		}
		if probed {
			st.RTTms = float64(hr.RTT.Microseconds()) / 1000
			st.Loss = hr.Loss
		}
		status.Uplinks = append(status.Uplinks, st)
	}
	for _, ifname := range d.cfg.LAN.Interfaces {
		l, err := d.nl.LinkByName(ifname)
		if err != nil || d.attached[ifname] == l.Attrs().Index {
			continue
		}
		if _, err := d.dp.AttachTC(ifname, maps.RoleLAN, 0); err != nil {
			d.log.Error("attach", "interface", ifname, "error", err)
			continue
		}
		d.attached[ifname] = l.Attrs().Index
		d.log.Info("attached", "interface", ifname, "role", "lan")
	}

	d.repairAttachments()

	lan := d.lanSubnets()
	d.applyBypass(lan)

	rs := routing.Settings{RulePriority: g.RulePriority, RouteProtocol: g.RouteProtocol, StrictMark: g.StrictMark, ReplyMark: g.ReplyMark}
	want := routing.Desired(rs, routed, lan)
	// What mhbpf's routes replace (main's default of pppd or DHCP) is
	// recorded before they go in, for 'mhbpf down' to put back.
	changes, err := routing.ApplyRecording(d.nl, rs, want, func(toPut routing.State) {
		saved, err := routing.SaveReplaced(d.nl, d.stateFile(routesFile), rs, toPut)
		if err != nil {
			d.log.Error("recording the routes mhbpf replaces", "error", err)
		}
		for _, r := range saved {
			d.log.Info("replacing a route of another program; 'mhbpf down' puts it back", "route", r.String())
		}
	})
	if err != nil {
		d.log.Error("routing", "error", err)
	}
	for _, c := range changes {
		d.log.Debug("routing", "change", c)
	}
	if len(changes) > 0 {
		d.log.Info("routing converged", "changes", len(changes))
	}

	var ifaces []string
	ipv6 := false
	for _, u := range routed {
		ifaces = append(ifaces, u.Interface)
		for _, a := range u.Addrs {
			ipv6 = ipv6 || a.Is6()
		}
	}
	if err := routing.ApplySysctls(d.stateFile(sysctlFile), routing.DesiredSysctls(ifaces, ipv6)); err != nil {
		d.log.Error("sysctls", "error", err)
	}
	d.applyNAT(natTable)
	d.forgetConnections(wentDown)
	if err := statefile.Write(d.stateFile(statusFile), status); err != nil {
		d.log.Error("status", "error", err)
	}
	if d.metrics != nil {
		d.metrics.publish(status)
	}
	if nextHold > 0 {
		*holdTimer = time.After(nextHold)
	}
}

// downUplink is an uplink that stopped being usable in this pass.
type downUplink struct {
	id           int
	name, reason string
	flows        int // flows moved off it
}

// forgetConnections makes conntrack forget the connections bound to the
// addresses of the uplinks that went down: what was masqueraded to them,
// and the box's own connections from them. Their next packets are already
// steered to a live uplink (their flows went first) but still bound to the
// dead uplink's address: left alone, the kernel drops the first one that
// leaves by another interface and only then forgets the binding
// (nf_nat_oif_changed), which costs a SYN a whole retransmission timeout
// and a sparse UDP session (a VPN's keepalive) its next datagram; had it
// left, the live uplink's provider would drop it for its source (BCP 38).
// Forgotten, the next packet is a new connection, NATed to the live
// uplink's address. This runs after routing: a large conntrack table is
// walked whole, and the routes must not wait for it.
func (d *Daemon) forgetConnections(down []downUplink) {
	for _, w := range down {
		addrs := d.lastAddrs[w.id]
		n, err := conntrack.Forget(d.nl, addrs)
		if err != nil {
			d.log.Error("conntrack", "uplink", w.name, "addresses", fmt.Sprint(addrs), "error", err)
		}
		d.log.Warn("uplink down", "uplink", w.name, "reason", w.reason, "flows_moved", w.flows, "conntrack_forgotten", n)
	}
}

// everUsable: whether the uplink was usable before in this datapath's life.
// A freshly started daemon uses a link that is up right away; only a link
// that went away and came back is held for up_delay.
func (d *Daemon) everUsable(id int) bool { return d.seen[id] }

func (d *Daemon) markEverUsable(id int) {
	if d.seen == nil {
		d.seen = map[int]bool{}
	}
	d.seen[id] = true
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
				select {
				case _, ok := <-links:
					if !ok {
						return
					}
				case _, ok := <-addrs:
					if !ok {
						return
					}
				case _, ok := <-routes:
					if !ok {
						return
					}
				case <-done:
					return
				}
				notify()
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
