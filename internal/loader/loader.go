// Package loader loads mhbpf's BPF objects, attaches them (tcx where the
// kernel has it, else clsact + cls_bpf; cgroup socket hooks), pins maps and
// links so that a restarted daemon picks up the same datapath, and removes
// exactly what it added.
package loader

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/bpf"
	"github.com/mhbpf/mhbpf/internal/maps"
)

// Options are the load-time settings of the datapath.
type Options struct {
	PinDir string
	// MarkMask is the part of the fwmark mhbpf owns; every other bit is
	// preserved. MarkStrict is the "no fallback" bit inside it.
	MarkMask   uint32
	MarkStrict uint32
	// MarkReply is the "answer" bit inside it: set with the arrival
	// uplink's bit on what answers a remotely started flow.
	MarkReply uint32
	// StickyTimeout is how long a destination keeps its uplink while unused.
	StickyTimeout time.Duration
	// FlowMapSize is the capacity of the flow map (LRU).
	FlowMapSize uint32
	// FlowMapFlags are added to the flow maps' (flows4, flows6) flags at
	// creation. The product leaves it 0; the benchmarks compare
	// BPF_F_NO_COMMON_LRU (per-CPU LRU lists) with the default.
	FlowMapFlags uint32
	// InboundMapSize is the capacity of the map of flows remote peers
	// started (LRU); InboundRate the new ones each uplink may record per
	// second (0: no cap).
	InboundMapSize uint32
	InboundRate    uint32
	// TCMode forces an attach mechanism; empty means tcx where the kernel
	// has it, else clsact.
	TCMode Mode
	// NetnsCookie is the cookie of the network namespace whose sockets the
	// socket hooks steer (CurrentNetnsCookie gives the caller's). The hooks
	// attach to a cgroup and see the sockets of every process below it, in
	// every namespace; those of other namespaces (containers) they leave
	// alone. Required: no namespace has cookie 0.
	NetnsCookie uint64
}

// Defaults used for zero fields of Options.
const (
	DefaultMarkMask       = 0x00ff0000
	DefaultMarkStrict     = 0x00800000
	DefaultMarkReply      = 0x00400000
	DefaultStickyTimeout  = 10 * time.Minute
	DefaultFlowMapSize    = 262144
	DefaultInboundMapSize = 65536
)

func (o *Options) withDefaults() Options {
	r := *o
	if r.PinDir == "" {
		r.PinDir = DefaultPinDir
	}
	if r.MarkMask == 0 {
		r.MarkMask = DefaultMarkMask
	}
	if r.MarkStrict == 0 {
		r.MarkStrict = DefaultMarkStrict
	}
	if r.MarkReply == 0 {
		r.MarkReply = DefaultMarkReply
	}
	if r.StickyTimeout == 0 {
		r.StickyTimeout = DefaultStickyTimeout
	}
	if r.FlowMapSize == 0 {
		r.FlowMapSize = DefaultFlowMapSize
	}
	if r.InboundMapSize == 0 {
		r.InboundMapSize = DefaultInboundMapSize
	}
	return r
}

// Datapath is a loaded set of programs with their (pinned) maps. Closing it
// releases file descriptors only: attachments and maps stay pinned.
type Datapath struct {
	Maps *maps.Maps
	opts Options

	uplinkProg    *ebpf.Program
	lanProg       *ebpf.Program
	lanEgressProg *ebpf.Program
	sock          bpf.SockPrograms

	// What this datapath attached, for DriftTC and DriftCgroup to check.
	tcModes map[string]Mode // interface -> how its programs hang
	cgroup  string          // where the socket hooks were attached

	// What Load did with pinned maps of another size or layout, and the
	// old maps FinishUpgrade still copies from.
	upgrade Upgrade
	pending []*pendingUpgrade
	splits  []*pendingSplit
}

// Upgrade is what Load did with pinned maps that did not fit: for the log.
func (d *Datapath) Upgrade() Upgrade { return d.upgrade }

// Load loads the programs and creates, or reopens, the pinned maps.
func Load(o Options) (*Datapath, error) {
	opts := o.withDefaults()
	if opts.MarkStrict&opts.MarkMask == 0 || opts.MarkStrict&(opts.MarkStrict-1) != 0 {
		return nil, fmt.Errorf("strict mark %#x must be one bit inside the mask %#x", opts.MarkStrict, opts.MarkMask)
	}
	if opts.MarkReply&opts.MarkMask == 0 || opts.MarkReply&(opts.MarkReply-1) != 0 || opts.MarkReply == opts.MarkStrict {
		return nil, fmt.Errorf("reply mark %#x must be one bit inside the mask %#x other than the strict mark %#x", opts.MarkReply, opts.MarkMask, opts.MarkStrict)
	}
	if opts.NetnsCookie == 0 {
		return nil, errors.New("no network namespace cookie: the socket hooks must know which namespace's sockets to steer (loader.CurrentNetnsCookie)")
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("remove memlock limit: %w", err)
	}
	if err := preparePinDir(opts.PinDir); err != nil {
		return nil, err
	}

	feat, err := ProbeFeatures()
	if err != nil {
		return nil, err
	}
	specs, err := configuredSpecs(&opts, feat)
	if err != nil {
		return nil, err
	}
	uplinkSpec, lanSpec, sockSpec := specs[0], specs[1], specs[2]
	// Pinned maps of another size or layout (an upgrade, a new
	// flow_map_size) are replaced before the objects reuse the pins.
	all := mapSpecs(specs...)
	upgrade, pending, err := upgradePinned(opts.PinDir, all)
	if err != nil {
		return nil, err
	}
	d := &Datapath{opts: opts, upgrade: upgrade, pending: pending}
	// Maps of an older version that others replaced (flows: flows4 and
	// flows6) fill those before the objects create them empty.
	moved, splits, err := splitPinned(opts.PinDir, all)
	d.upgrade.Maps = append(d.upgrade.Maps, moved...)
	d.splits = splits
	if err != nil {
		d.Close()
		return nil, err
	}
	collOpts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: mapsDir(opts.PinDir)}}

	var up bpf.UplinkObjects
	if err := uplinkSpec.LoadAndAssign(&up, collOpts); err != nil {
		d.Close()
		return nil, loadError("uplink", err)
	}
	d.Maps = maps.FromObjects(&up.UplinkMaps)
	d.uplinkProg = up.UplinkIngress

	var lan bpf.LanPrograms
	if err := lanSpec.LoadAndAssign(&lan, collOpts); err != nil {
		d.Close()
		return nil, loadError("lan", err)
	}
	d.lanProg, d.lanEgressProg = lan.LanIngress, lan.LanEgress
	if err := sockSpec.LoadAndAssign(&d.sock, collOpts); err != nil {
		d.Close()
		return nil, loadError("sock", err)
	}
	return d, nil
}

// loadSpecs reads the objects made for this kernel's features: without
// bpf_loop, the *Compat builds of those that walk the policy, and every
// function verified as a static one.
func loadSpecs(f Features) (uplink, lan, sock *ebpf.CollectionSpec, err error) {
	loadSock := bpf.LoadSock
	if !f.BPFLoop {
		loadSock = bpf.LoadSockCompat
	}
	if uplink, err = bpf.LoadUplink(); err != nil {
		return nil, nil, nil, err
	}
	if lan, err = lanSpecFor(f); err != nil {
		return nil, nil, nil, err
	}
	if sock, err = loadSock(); err != nil {
		return nil, nil, nil, err
	}
	if !f.BPFLoop {
		useStaticFunctions(uplink)
		useStaticFunctions(sock)
	}
	return uplink, lan, sock, nil
}

// lanSpecFor is the LAN object for a kernel with features f.
func lanSpecFor(f Features) (*ebpf.CollectionSpec, error) {
	if f.BPFLoop {
		return bpf.LoadLan()
	}
	lan, err := bpf.LoadLanCompat()
	if err != nil {
		return nil, err
	}
	useStaticFunctions(lan)
	return lan, nil
}

// configuredSpecs are the three objects (uplink, lan, sock) for this
// kernel's features, with their load-time constants and map sizes set.
func configuredSpecs(opts *Options, f Features) ([]*ebpf.CollectionSpec, error) {
	uplink, lan, sock, err := loadSpecs(f)
	if err != nil {
		return nil, err
	}
	specs := []*ebpf.CollectionSpec{uplink, lan, sock}
	for _, s := range specs {
		if err := configure(s, opts); err != nil {
			return nil, err
		}
	}
	if err := setVariable(sock, "netns_cookie", opts.NetnsCookie); err != nil {
		return nil, err
	}
	if err := setFeatureVariables(specs, f); err != nil {
		return nil, err
	}
	return specs, nil
}

// setFeatureVariables tells the objects (uplink, lan, sock) what the
// kernel lacks: the verifier then drops the calls it would refuse.
func setFeatureVariables(specs []*ebpf.CollectionSpec, f Features) error {
	for _, s := range specs {
		if err := setVariable(s, "coarse_clock", f.CoarseClock); err != nil {
			return err
		}
	}
	return setVariable(specs[2], "sendmsg_setsockopt", f.SendmsgSetsockopt)
}

// LANSpec is the LAN object this kernel runs (the Compat build where it
// has no bpf_loop), unconfigured: for test runs of the live program's
// choice ('mhbpf explain'), which take its constants, feature switches
// included, from the live program's .rodata.
func LANSpec() (*ebpf.CollectionSpec, error) {
	feat, err := ProbeFeatures()
	if err != nil {
		return nil, err
	}
	return lanSpecFor(feat)
}

func loadError(obj string, err error) error {
	var ve *ebpf.VerifierError
	if errors.As(err, &ve) {
		return fmt.Errorf("load %s programs: %+v", obj, ve)
	}
	return fmt.Errorf("load %s programs: %w", obj, err)
}

// configure sets the load-time constants and map sizes of one object and
// makes every map pinned by name, so the three objects share one set.
func configure(s *ebpf.CollectionSpec, o *Options) error {
	perCPU, err := inboundRatePerCPU(o.InboundRate)
	if err != nil {
		return err
	}
	hz, err := kernelHZ()
	if err != nil {
		return err
	}
	for name, v := range map[string]any{
		"jiffies_per_second":   hz,
		"mark_mask":            o.MarkMask,
		"mark_strict":          o.MarkStrict,
		"mark_reply":           o.MarkReply,
		"sticky_ns":            uint64(o.StickyTimeout.Nanoseconds()),
		"inbound_rate_per_cpu": perCPU,
	} {
		if err := setVariable(s, name, v); err != nil {
			return err
		}
	}
	for name, m := range s.Maps {
		if name == ".rodata" || name == ".data" || name == ".bss" || len(name) > 0 && name[0] == '.' {
			continue
		}
		m.Pinning = ebpf.PinByName
		switch name {
		case "flows4", "flows6":
			m.MaxEntries = o.FlowMapSize
			m.Flags |= o.FlowMapFlags
		case "remotes":
			m.MaxEntries = o.FlowMapSize
		case "inbound4", "inbound6":
			m.MaxEntries = o.InboundMapSize
		}
	}
	return nil
}

// inboundRatePerCPU splits an uplink's budget of new inbound records per
// second over the CPUs, which count it each on their own (no shared cache
// line under a flood). Rounded up: never below what was asked.
func inboundRatePerCPU(rate uint32) (uint32, error) {
	if rate == 0 {
		return 0, nil
	}
	n, err := ebpf.PossibleCPU()
	if err != nil {
		return 0, fmt.Errorf("number of CPUs: %w", err)
	}
	return (rate + uint32(n) - 1) / uint32(n), nil
}

// setVariable sets a load-time constant of an object.
func setVariable(s *ebpf.CollectionSpec, name string, v any) error {
	vs, ok := s.Variables[name]
	if !ok {
		return fmt.Errorf("BPF object has no variable %s", name)
	}
	if err := vs.Set(v); err != nil {
		return fmt.Errorf("set %s: %w", name, err)
	}
	return nil
}

// CurrentNetnsCookie is the cookie of the calling thread's network
// namespace, as the kernel reports it for a socket made there
// (SO_NETNS_COOKIE, Linux 5.14; before that through a BPF program, see
// netnsCookieByProgram): the value Options.NetnsCookie wants for "this
// namespace". A kernel that cannot report it is an error, not a reason to
// steer every namespace.
func CurrentNetnsCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("network namespace cookie: socket: %w", err)
	}
	defer unix.Close(fd)
	v, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if errors.Is(err, unix.ENOPROTOOPT) {
		v, err := netnsCookieByProgram()
		if err != nil {
			return 0, fmt.Errorf("network namespace cookie: the kernel has no SO_NETNS_COOKIE (Linux 5.14) and "+
				"bpf_get_netns_cookie failed: %w: the socket hooks cannot be limited to this network namespace", err)
		}
		return v, nil
	}
	if err != nil {
		return 0, fmt.Errorf("network namespace cookie: getsockopt SO_NETNS_COOKIE: %w", err)
	}
	if v == 0 {
		return 0, errors.New("network namespace cookie: the kernel reported 0")
	}
	return v, nil
}

// Close releases file descriptors. What is attached and pinned stays.
func (d *Datapath) Close() error {
	var errs []error
	for _, p := range []*ebpf.Program{d.uplinkProg, d.lanProg, d.lanEgressProg, d.sock.SockConnect4, d.sock.SockConnect6,
		d.sock.SockSendmsg4, d.sock.SockSendmsg6} {
		if p != nil {
			errs = append(errs, p.Close())
		}
	}
	if d.Maps != nil {
		errs = append(errs, d.Maps.Close())
	}
	for _, p := range d.pending {
		p.close()
	}
	d.pending = nil
	for _, p := range d.splits {
		p.close()
	}
	d.splits = nil
	return errors.Join(errs...)
}

// Programs for tests and benchmarks that run them with BPF_PROG_TEST_RUN.
func (d *Datapath) UplinkProgram() *ebpf.Program { return d.uplinkProg }
func (d *Datapath) LANProgram() *ebpf.Program    { return d.lanProg }

// LANEgressProgram records port-forwarded flows on the LAN's egress.
func (d *Datapath) LANEgressProgram() *ebpf.Program { return d.lanEgressProg }

// NetnsCookie is the network namespace whose sockets the socket hooks steer.
func (d *Datapath) NetnsCookie() uint64 { return d.opts.NetnsCookie }

// PinDir is where this datapath's pins live.
func (d *Datapath) PinDir() string { return d.opts.PinDir }

// Mode is how a tc program is attached.
type Mode string

const (
	ModeTCX    Mode = "tcx"
	ModeClsact Mode = "clsact"
)

// direction is which side of an interface a tc program hangs on.
type direction int

const (
	ingress direction = iota
	egress
)

func (d direction) String() string {
	if d == egress {
		return "egress"
	}
	return "ingress"
}

func (d direction) tcxAttach() ebpf.AttachType {
	if d == egress {
		return ebpf.AttachTCXEgress
	}
	return ebpf.AttachTCXIngress
}

// AttachTC attaches the programs for role to ifname (ingress; a LAN
// interface also egress) and records the interface in the ifaces map. On an
// interface where mhbpf is attached already, it swaps the programs in place
// (no window without one).
func (d *Datapath) AttachTC(ifname string, role maps.Role, uplink int) (Mode, error) {
	l, err := netlink.LinkByName(ifname)
	if err != nil {
		return "", fmt.Errorf("interface %s: %w", ifname, err)
	}
	progs := map[direction]*ebpf.Program{ingress: d.uplinkProg}
	if role == maps.RoleLAN {
		progs = map[direction]*ebpf.Program{ingress: d.lanProg, egress: d.lanEgressProg}
	}
	// The interface entry goes first: a program that runs before it is
	// written lets the packet pass untouched.
	if err := d.Maps.SetIface(l.Attrs().Index, maps.Iface{Role: role, L3Offset: l3Offset(l), Uplink: uint8(uplink)}); err != nil {
		return "", fmt.Errorf("interface %s: %w", ifname, err)
	}
	ifindex := l.Attrs().Index
	mode, err := d.attachTC(ifname, ifindex, role, progs)
	if err == nil && role != maps.RoleLAN {
		// An interface that was a LAN interface before (a reload) keeps no
		// egress program.
		err = detachEgress(d.opts.PinDir, ifname, ifindex)
	}
	if mode != "" && err == nil {
		if d.tcModes == nil {
			d.tcModes = map[string]Mode{}
		}
		d.tcModes[ifname] = mode
	}
	return mode, err
}

func (d *Datapath) attachTC(ifname string, ifindex int, role maps.Role, progs map[direction]*ebpf.Program) (Mode, error) {
	if d.opts.TCMode != ModeClsact {
		err := d.attachAllTCX(ifname, ifindex, progs)
		if err == nil {
			// tcx won: a cls_bpf filter left by a run on an older kernel
			// (or in clsact mode) must go.
			if err := detachClsact(d.opts.PinDir, ifname, ifindex); err != nil {
				return ModeTCX, fmt.Errorf("remove old clsact filter on %s: %w", ifname, err)
			}
			return ModeTCX, nil
		}
		if !errors.Is(err, ebpf.ErrNotSupported) || d.opts.TCMode == ModeTCX {
			return "", err
		}
	}
	for dir, prog := range progs {
		if err := attachClsact(d.opts.PinDir, ifname, ifindex, prog, role, dir); err != nil {
			return "", err
		}
	}
	if err := detachTCX(d.opts.PinDir, ifname); err != nil {
		return ModeClsact, fmt.Errorf("remove old tcx link on %s: %w", ifname, err)
	}
	return ModeClsact, nil
}

func (d *Datapath) attachAllTCX(ifname string, ifindex int, progs map[direction]*ebpf.Program) error {
	for _, dir := range []direction{ingress, egress} {
		prog, ok := progs[dir]
		if !ok {
			continue
		}
		if err := attachTCX(d.opts.PinDir, ifname, ifindex, prog, dir); err != nil {
			if errors.Is(err, ebpf.ErrNotSupported) {
				return err
			}
			return fmt.Errorf("attach to %s %s: %w", ifname, dir, err)
		}
	}
	return nil
}

// DetachTC removes mhbpf's programs from ifname, if the interface still
// exists; the pins go either way.
func (d *Datapath) DetachTC(ifname string) error {
	delete(d.tcModes, ifname)
	var errs []error
	errs = append(errs, detachTCX(d.opts.PinDir, ifname))
	if l, err := netlink.LinkByName(ifname); err == nil {
		errs = append(errs, detachClsact(d.opts.PinDir, ifname, l.Attrs().Index))
		errs = append(errs, d.Maps.DeleteIface(l.Attrs().Index))
	} else {
		_ = os.Remove(qdiscMarker(d.opts.PinDir, ifname))
	}
	return errors.Join(errs...)
}

// l3Offset is where the IP header starts in a packet seen by tc on l.
func l3Offset(l netlink.Link) uint8 {
	if l.Attrs().EncapType == "ether" {
		return 14
	}
	return 0 // ppp, tun, none: no link-layer header
}

func attachTCX(pinDir, ifname string, ifindex int, prog *ebpf.Program, dir direction) error {
	pin := tcLinkPin(pinDir, ifname, dir)
	if old, err := link.LoadPinnedLink(pin, nil); err == nil {
		info, ierr := old.Info()
		if ierr == nil && info.TCX() != nil && int(info.TCX().Ifindex) == ifindex {
			err := old.Update(prog)
			old.Close()
			if err != nil {
				return fmt.Errorf("update pinned link: %w", err)
			}
			return nil
		}
		// The interface was recreated (pppd reconnected): the old link is
		// dead or points to a device that no longer is ifname.
		_ = old.Unpin()
		old.Close()
	}
	l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: dir.tcxAttach()})
	if err != nil {
		return err
	}
	defer l.Close()
	if err := l.Pin(pin); err != nil {
		return fmt.Errorf("pin link: %w", err)
	}
	return nil
}

// detachTCX removes both directions' tcx links of ifname.
func detachTCX(pinDir, ifname string) error {
	return errors.Join(detachTCXDir(pinDir, ifname, ingress), detachTCXDir(pinDir, ifname, egress))
}

func detachTCXDir(pinDir, ifname string, dir direction) error {
	pin := tcLinkPin(pinDir, ifname, dir)
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		// Not a link we can open any more: the pin is all that is left.
		return os.Remove(pin)
	}
	defer l.Close()
	return unpinAndDetach(l)
}

// detachEgress removes mhbpf's egress program from ifname, tcx or cls_bpf.
func detachEgress(pinDir, ifname string, ifindex int) error {
	if err := detachTCXDir(pinDir, ifname, egress); err != nil {
		return fmt.Errorf("remove egress tcx link of %s: %w", ifname, err)
	}
	return deleteOwnFilter(ifname, ifindex, egress)
}

// CgroupHooks are the socket hooks, by pin name.
func (d *Datapath) cgroupHooks() map[string]struct {
	prog   *ebpf.Program
	attach ebpf.AttachType
} {
	return map[string]struct {
		prog   *ebpf.Program
		attach ebpf.AttachType
	}{
		"connect4": {d.sock.SockConnect4, ebpf.AttachCGroupInet4Connect},
		"connect6": {d.sock.SockConnect6, ebpf.AttachCGroupInet6Connect},
		"sendmsg4": {d.sock.SockSendmsg4, ebpf.AttachCGroupUDP4Sendmsg},
		"sendmsg6": {d.sock.SockSendmsg6, ebpf.AttachCGroupUDP6Sendmsg},
	}
}

// AttachCgroup attaches the socket hooks to the cgroup v2 directory path
// (normally the root), or swaps the programs of an earlier attachment.
func (d *Datapath) AttachCgroup(path string) error {
	d.cgroup = path
	for name, h := range d.cgroupHooks() {
		pin := cgroupLinkPin(d.opts.PinDir, name)
		if old, err := link.LoadPinnedLink(pin, nil); err == nil && !cgroupLinkAttached(old) {
			// Detached (BPF_LINK_DETACH, or its cgroup went): a new one.
			_ = old.Unpin()
			old.Close()
		} else if err == nil {
			err = old.Update(h.prog)
			old.Close()
			if err == nil {
				continue
			}
			return fmt.Errorf("update cgroup hook %s: %w", name, err)
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: path, Attach: h.attach, Program: h.prog})
		if err != nil {
			return fmt.Errorf("attach %s to cgroup %s: %w", name, path, err)
		}
		err = l.Pin(pin)
		l.Close()
		if err != nil {
			return fmt.Errorf("pin cgroup hook %s: %w", name, err)
		}
	}
	return nil
}

// DetachCgroup removes the socket hooks.
func (d *Datapath) DetachCgroup() error {
	var errs []error
	for name := range d.cgroupHooks() {
		errs = append(errs, unpinLink(cgroupLinkPin(d.opts.PinDir, name)))
	}
	return errors.Join(errs...)
}

// unpinAndDetach removes a link's pin and detaches it at once. Without the
// detach its program stays attached until the pin's inode goes, after an
// RCU grace period and a workqueue run (BPF_LINK_DETACH: 5.9): seen on
// 5.10 in the VM as a socket hook still attached after 'mhbpf down'.
func unpinAndDetach(l link.Link) error {
	if err := l.Unpin(); err != nil {
		return err
	}
	if err := l.Detach(); err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
		return fmt.Errorf("detach: %w", err)
	}
	return nil
}

func unpinLink(pin string) error {
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return os.Remove(pin)
	}
	defer l.Close()
	return unpinAndDetach(l)
}
