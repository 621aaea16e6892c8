package loader

import (
	"errors"
	"fmt"
	"math"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// Features is what the running kernel offers of what the datapath uses
// beyond its oldest supported kernel (5.10), probed once: each has a
// fallback, used without it.
type Features struct {
	// BPFLoop (Linux 5.17): the policy walk calls bpf_loop. Without it the
	// *Compat objects walk the rules in a bounded loop, and their
	// functions are verified as static ones, at each call (global
	// functions with pointer arguments need 5.12).
	BPFLoop bool
	// TCX (Linux 6.6): tc programs hang on tcx links. Without it, on a
	// clsact qdisc as cls_bpf filters.
	TCX bool
	// NetnsCookieSockopt (Linux 5.14): the daemon's namespace cookie by
	// SO_NETNS_COOKIE. Without it, through bpf_get_netns_cookie in a
	// one-connect cgroup program (netnsCookieByProgram).
	NetnsCookieSockopt bool
	// SendmsgSetsockopt (after 5.10, 6.1 or earlier: the exact version is not established): the sendmsg hooks set
	// the socket's mark. Without it they choose only the datagram's source
	// address (which the uplink's "from" rule routes by).
	SendmsgSetsockopt bool
	// CoarseClock (Linux 5.11): flow and sticky times from
	// bpf_ktime_get_coarse_ns. Without it from bpf_ktime_get_ns.
	CoarseClock bool
}

var (
	probeOnce sync.Once
	probed    Features
	probeErr  error
)

// ProbeFeatures probes the running kernel once per process.
func ProbeFeatures() (Features, error) {
	probeOnce.Do(func() { probed, probeErr = probeFeatures() })
	return probed, probeErr
}

func probeFeatures() (Features, error) {
	var f Features
	// Before 5.11 BPF memory counts against RLIMIT_MEMLOCK.
	if err := rlimit.RemoveMemlock(); err != nil {
		return f, fmt.Errorf("remove memlock limit: %w", err)
	}
	var err error
	if f.BPFLoop, err = have(features.HaveProgramHelper(ebpf.SchedCLS, asm.FnLoop)); err != nil {
		return f, fmt.Errorf("probe bpf_loop: %w", err)
	}
	if f.TCX, err = have(features.HaveProgramType(ebpf.SchedCLS)); err != nil {
		return f, fmt.Errorf("probe sched_cls: %w", err)
	}
	f.TCX = f.TCX && haveTCX()
	f.NetnsCookieSockopt = haveNetnsCookieSockopt()
	if f.SendmsgSetsockopt, err = haveSendmsgSetsockopt(); err != nil {
		return f, fmt.Errorf("probe bpf_setsockopt in sendmsg hooks: %w", err)
	}
	if f.CoarseClock, err = have(features.HaveProgramHelper(ebpf.SchedCLS, asm.FnKtimeGetCoarseNs)); err != nil {
		return f, fmt.Errorf("probe bpf_ktime_get_coarse_ns: %w", err)
	}
	return f, nil
}

// have turns a features probe's answer into yes/no; an error that is not
// ErrNotSupported is the probe failing, not an answer.
func have(err error) (bool, error) {
	if err == nil {
		return true, nil
	}
	if errors.Is(err, ebpf.ErrNotSupported) {
		return false, nil
	}
	return false, err
}

// useStaticFunctions marks every function of the programs of s static in
// their BTF, so that the verifier checks each at its calls with what the
// caller passes, as kernels before 5.12 must: they refuse global functions
// with pointer arguments ("Arg#2 type PTR in parse_packet() is not
// supported yet"). The code is the same; only its verification differs.
func useStaticFunctions(s *ebpf.CollectionSpec) {
	for _, p := range s.Programs {
		for i := range p.Instructions {
			if fn := btf.FuncMetadata(&p.Instructions[i]); fn != nil && fn.Linkage == btf.GlobalFunc && i > 0 {
				fn.Linkage = btf.StaticFunc
			}
		}
	}
}

// haveTCX attaches a trivial program with tcx to an interface that does not
// exist: a kernel with tcx says so (no such device), one without it has no
// such link type.
func haveTCX() bool {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.SchedCLS,
		License:      "Dual BSD/GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err != nil {
		return false
	}
	defer prog.Close()
	l, err := link.AttachTCX(link.TCXOptions{Interface: math.MaxInt32, Program: prog, Attach: ebpf.AttachTCXIngress})
	if err == nil {
		l.Close()
		return true
	}
	return !errors.Is(err, ebpf.ErrNotSupported)
}

func haveNetnsCookieSockopt() bool {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	_, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	return err == nil
}

// haveSendmsgSetsockopt loads a sendmsg4 hook that sets SO_MARK: the
// kernel refuses the helper (EINVAL) where it does not have it there.
func haveSendmsgSetsockopt() (bool, error) {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:       ebpf.CGroupSockAddr,
		AttachType: ebpf.AttachCGroupUDP4Sendmsg,
		License:    "Dual BSD/GPL",
		Instructions: asm.Instructions{
			asm.StoreImm(asm.RFP, -8, 0, asm.Word),
			asm.Mov.Imm(asm.R2, unix.SOL_SOCKET),
			asm.Mov.Imm(asm.R3, unix.SO_MARK),
			asm.Mov.Reg(asm.R4, asm.RFP),
			asm.Add.Imm(asm.R4, -8),
			asm.Mov.Imm(asm.R5, 4),
			asm.FnSetsockopt.Call(),
			asm.Mov.Imm(asm.R0, 1),
			asm.Return(),
		},
	})
	if errors.Is(err, unix.EINVAL) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	prog.Close()
	return true, nil
}

// FeatureReport is one feature as `mhbpf kernel` and the README's kernel
// table show it.
type FeatureReport struct {
	Name    string `json:"name"`
	Since   string `json:"since"`
	Have    bool   `json:"have"`
	Without string `json:"without"`
}

// Report lists the features with the kernel that brings each and what the
// datapath does without it.
func (f Features) Report() []FeatureReport {
	return []FeatureReport{
		{"bpf_loop", "5.17", f.BPFLoop, "policy rules walked in a bounded loop, functions verified at each call (the Compat objects)"},
		{"tcx", "6.6", f.TCX, "tc programs on a clsact qdisc as cls_bpf filters"},
		{"SO_NETNS_COOKIE", "5.14", f.NetnsCookieSockopt, "the daemon's namespace cookie read by a one-connect cgroup program"},
		{"bpf_setsockopt in sendmsg hooks", "6.1 or earlier (not 5.10)", f.SendmsgSetsockopt, "unconnected UDP steered by its source address only, its socket not marked"},
		{"bpf_ktime_get_coarse_ns", "5.11", f.CoarseClock, "flow and sticky times from bpf_ktime_get_ns (finer, a little dearer)"},
	}
}

// TCMode is how tc programs attach on this kernel.
func (f Features) TCMode() Mode {
	if f.TCX {
		return ModeTCX
	}
	return ModeClsact
}
