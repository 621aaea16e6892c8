package loader_test

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	tc "github.com/florianl/go-tc"
	"github.com/florianl/go-tc/core"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/bpf"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/testutil"
)

// netnsWithVeth makes a namespace holding a veth pair "up0"/"up1" and
// returns its name.
func netnsWithVeth(t *testing.T) string {
	t.Helper()
	testutil.RequireRoot(t)
	ns := testutil.UniqueName("mhl")
	testutil.Run(t, "ip", "netns", "add", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	testutil.Run(t, "ip", "-n", ns, "link", "add", "up0", "type", "veth", "peer", "name", "up1")
	testutil.Run(t, "ip", "-n", ns, "link", "set", "up0", "up")
	return ns
}

// pinDirIn is a test pin directory whose cleanup runs loader.Remove inside
// ns, where the tc attachments are.
func pinDirIn(t *testing.T, ns string) string {
	return testutil.PinDir(t, func(dir string) error {
		var err error
		testutil.InNetNS(t, ns, func() { err = loader.Remove(dir) })
		return err
	})
}

func passProgram(t *testing.T, typ ebpf.ProgramType, name string) *ebpf.Program {
	t.Helper()
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: name, Type: typ, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func ifindex(t *testing.T, name string) int {
	t.Helper()
	l, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	return l.Attrs().Index
}

// tcxPrograms lists the names of the programs attached with tcx at ingress.
func tcxPrograms(t *testing.T, ifname string) []string {
	t.Helper()
	return tcxProgramsAt(t, ifname, ebpf.AttachTCXIngress)
}

func tcxProgramsAt(t *testing.T, ifname string, attach ebpf.AttachType) []string {
	t.Helper()
	res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex(t, ifname), Attach: attach})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, p := range res.Programs {
		prog, err := ebpf.NewProgramFromID(p.ID)
		if err != nil {
			t.Fatal(err)
		}
		info, _ := prog.Info()
		prog.Close()
		names = append(names, info.Name)
	}
	return names
}

// clsactFilters lists the names of the cls_bpf filters at ingress.
func clsactFilters(t *testing.T, ifname string) []string {
	t.Helper()
	return clsactFiltersAt(t, ifname, tc.HandleMinIngress)
}

func clsactFiltersAt(t *testing.T, ifname string, side uint32) []string {
	t.Helper()
	nl, err := tc.Open(&tc.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	fs, err := nl.Filter().Get(&tc.Msg{Family: unix.AF_UNSPEC, Ifindex: uint32(ifindex(t, ifname)),
		Parent: core.BuildHandle(tc.HandleRoot, side)})
	if err != nil {
		return nil // no clsact qdisc
	}
	var names []string
	for _, f := range fs {
		if f.BPF != nil && f.BPF.Name != nil {
			names = append(names, *f.BPF.Name)
		}
	}
	return names
}

// attached lists mhbpf's and others' ingress programs on ifname, by tcx
// program name or cls_bpf filter name, whichever mechanism the kernel has.
func attached(t *testing.T, ifname string) []string {
	t.Helper()
	if testutil.KernelAtLeast(6, 6) {
		return tcxPrograms(t, ifname)
	}
	return clsactFilters(t, ifname)
}

// lanName is the name the LAN program is listed under.
func lanName() string {
	if testutil.KernelAtLeast(6, 6) {
		return "lan_ingress"
	}
	return "mhbpf_lan"
}

func count(names []string, prefix string) int {
	n := 0
	for _, s := range names {
		if strings.HasPrefix(s, prefix) {
			n++
		}
	}
	return n
}

func TestLoadVerifies(t *testing.T) {
	testutil.RequireRoot(t)
	d, err := loader.Load(loader.Options{NetnsCookie: testutil.NetnsCookie(t, ""), PinDir: testutil.PinDir(t, loader.Remove)})
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
}

func TestBadOptionsAreRefused(t *testing.T) {
	testutil.RequireRoot(t)
	_, err := loader.Load(loader.Options{NetnsCookie: testutil.NetnsCookie(t, ""), PinDir: testutil.PinDir(t, loader.Remove), MarkMask: 0xff, MarkStrict: 0x100})
	if err == nil || !strings.Contains(err.Error(), "strict mark") {
		t.Fatalf("strict bit outside the mask: err %v", err)
	}
	_, err = loader.Load(loader.Options{NetnsCookie: testutil.NetnsCookie(t, ""), PinDir: "/tmp/not-bpffs/mhbpf"})
	if err == nil || !strings.Contains(err.Error(), "bpf filesystem") {
		t.Fatalf("pin dir off bpffs: err %v", err)
	}
}

func TestLoadWithoutNetnsCookieIsRefused(t *testing.T) {
	testutil.RequireRoot(t)
	_, err := loader.Load(loader.Options{PinDir: testutil.PinDir(t, loader.Remove)})
	if err == nil || !strings.Contains(err.Error(), "network namespace cookie") {
		t.Fatalf("no netns cookie: err %v", err)
	}
}

func TestCurrentNetnsCookieIsPerNamespace(t *testing.T) {
	testutil.RequireRoot(t)
	host, err := loader.CurrentNetnsCookie()
	if err != nil {
		t.Fatal(err)
	}
	ns := netnsWithVeth(t)
	var other uint64
	testutil.InNetNS(t, ns, func() { other, err = loader.CurrentNetnsCookie() })
	if err != nil {
		t.Fatal(err)
	}
	if host == 0 || other == 0 || host == other {
		t.Fatalf("cookies: this namespace %d, another %d", host, other)
	}
}

// netnsCookiesAttached reads the netns_cookie constant of each socket hook
// attached to cgroup dir, straight from the attached programs' .rodata.
func netnsCookiesAttached(t *testing.T, dir string) map[ebpf.AttachType][]uint64 {
	t.Helper()
	spec, err := bpf.LoadSock()
	if err != nil {
		t.Fatal(err)
	}
	v := spec.Variables["netns_cookie"]
	cg, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer cg.Close()
	got := map[ebpf.AttachType][]uint64{}
	for _, at := range []ebpf.AttachType{ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupInet6Connect,
		ebpf.AttachCGroupUDP4Sendmsg, ebpf.AttachCGroupUDP6Sendmsg} {
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(cg.Fd()), Attach: at})
		if err != nil {
			t.Fatal(err)
		}
		for _, ap := range res.Programs {
			prog, err := ebpf.NewProgramFromID(ap.ID)
			if err != nil {
				t.Fatal(err)
			}
			info, err := prog.Info()
			prog.Close()
			if err != nil {
				t.Fatal(err)
			}
			ids, _ := info.MapIDs()
			var cookie uint64
			found := false
			for _, id := range ids {
				m, err := ebpf.NewMapFromID(id)
				if err != nil {
					t.Fatal(err)
				}
				mi, err := m.Info()
				if err == nil && strings.HasSuffix(mi.Name, ".rodata") {
					val := make([]byte, m.ValueSize())
					if err := m.Lookup(uint32(0), &val); err != nil {
						t.Fatal(err)
					}
					cookie = binary.NativeEndian.Uint64(val[v.Offset : v.Offset+8])
					found = true
				}
				m.Close()
			}
			if !found {
				t.Fatalf("program %s on %s has no .rodata", info.Name, at)
			}
			got[at] = append(got[at], cookie)
		}
	}
	return got
}

// The restart path swaps the socket hooks' programs in place: each load's
// netns cookie must be the one the attached programs then compare with.
func TestCgroupHooksTakeEachLoadsNetnsCookie(t *testing.T) {
	testutil.RequireRoot(t)
	dir := testutil.PinDir(t, loader.Remove)
	cg := testutil.Cgroup(t)
	first := testutil.NetnsCookie(t, "")
	second := testutil.NetnsCookie(t, netnsWithVeth(t))
	for i, cookie := range []uint64{first, second} {
		d, err := loader.Load(loader.Options{PinDir: dir, NetnsCookie: cookie})
		if err != nil {
			t.Fatal(err)
		}
		err = d.AttachCgroup(cg)
		d.Close()
		if err != nil {
			t.Fatal(err)
		}
		got := netnsCookiesAttached(t, cg)
		if len(got) != 4 {
			t.Fatalf("load %d: hooks attached %v, want 4", i+1, got)
		}
		for at, cookies := range got {
			if len(cookies) != 1 || cookies[0] != cookie {
				t.Fatalf("load %d: %s has netns cookies %v, want [%d]", i+1, at, cookies, cookie)
			}
		}
	}
	if err := loader.Remove(dir); err != nil {
		t.Fatal(err)
	}
	if got := netnsCookiesAttached(t, cg); len(got) != 0 {
		t.Fatalf("after remove: %v", got)
	}
}

// Attaching twice leaves one program; a foreign program on the same hook
// survives attach and removal; the mechanism in use is reported.
func TestAttachTwiceAndForeignProgramsSurvive(t *testing.T) {
	for _, mode := range []loader.Mode{loader.ModeTCX, loader.ModeClsact} {
		t.Run(string(mode), func(t *testing.T) {
			ns := netnsWithVeth(t)
			dir := pinDirIn(t, ns)
			testutil.InNetNS(t, ns, func() {
				// Someone else's program first.
				foreign := passProgram(t, ebpf.SchedCLS, "foreign")
				var foreignLink link.Link
				if mode == loader.ModeTCX {
					l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex(t, "up0"), Program: foreign, Attach: ebpf.AttachTCXIngress})
					testutil.RequireTCX(t, err)
					foreignLink = l
					defer l.Close()
				} else {
					testutil.Run(t, "tc", "qdisc", "add", "dev", "up0", "clsact")
					fd := uint32(foreign.FD())
					name, flags := "foreign", uint32(tc.BpfActDirect)
					nl, err := tc.Open(&tc.Config{})
					if err != nil {
						t.Fatal(err)
					}
					defer nl.Close()
					if err := nl.Filter().Add(&tc.Object{
						Msg: tc.Msg{Family: unix.AF_UNSPEC, Ifindex: uint32(ifindex(t, "up0")), Handle: 1,
							Parent: core.BuildHandle(tc.HandleRoot, tc.HandleMinIngress), Info: 1<<16 | 0x0300},
						Attribute: tc.Attribute{Kind: "bpf", BPF: &tc.Bpf{FD: &fd, Name: &name, Flags: &flags}},
					}); err != nil {
						t.Fatal(err)
					}
				}
				list := func() []string {
					if mode == loader.ModeTCX {
						return tcxPrograms(t, "up0")
					}
					return clsactFilters(t, "up0")
				}
				ours := "uplink_ingress"
				if mode == loader.ModeClsact {
					ours = "mhbpf_uplink"
				}

				d, err := loader.Load(loader.Options{NetnsCookie: testutil.NetnsCookie(t, ""), PinDir: dir, TCMode: mode})
				if err != nil {
					t.Fatal(err)
				}
				defer d.Close()
				for i := 0; i < 2; i++ {
					got, err := d.AttachTC("up0", maps.RoleUplink, 0)
					if err != nil {
						t.Fatalf("attach %d: %v", i+1, err)
					}
					if got != mode {
						t.Fatalf("attach reported %s, want %s", got, mode)
					}
					names := list()
					if count(names, ours) != 1 || count(names, "foreign") != 1 {
						t.Fatalf("after attach %d: programs %v, want one of ours and the foreign one", i+1, names)
					}
				}
				// A reload (the restart path) swaps in place.
				d2, err := loader.Load(loader.Options{NetnsCookie: testutil.NetnsCookie(t, ""), PinDir: dir, TCMode: mode})
				if err != nil {
					t.Fatal(err)
				}
				defer d2.Close()
				if _, err := d2.AttachTC("up0", maps.RoleUplink, 0); err != nil {
					t.Fatal(err)
				}
				if names := list(); count(names, ours) != 1 {
					t.Fatalf("after reload: %v", names)
				}

				if err := loader.Remove(dir); err != nil {
					t.Fatal(err)
				}
				names := list()
				if count(names, ours) != 0 || count(names, "foreign") != 1 {
					t.Fatalf("after remove: programs %v, want only the foreign one", names)
				}
				if err := loader.Remove(dir); err != nil {
					t.Fatalf("second remove: %v", err)
				}
				_ = foreignLink
			})
		})
	}
}

// The clsact qdisc mhbpf created goes with it; one it found stays.
func TestClsactQdiscOwnership(t *testing.T) {
	ns := netnsWithVeth(t)
	dir := pinDirIn(t, ns)
	testutil.InNetNS(t, ns, func() {
		d, err := loader.Load(loader.Options{NetnsCookie: testutil.NetnsCookie(t, ""), PinDir: dir, TCMode: loader.ModeClsact})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		if _, err := d.AttachTC("up0", maps.RoleLAN, 0); err != nil {
			t.Fatal(err)
		}
		if out := testutil.Run(t, "tc", "qdisc", "show", "dev", "up0"); !strings.Contains(out, "clsact") {
			t.Fatalf("no clsact qdisc after attach: %s", out)
		}
		if err := d.DetachTC("up0"); err != nil {
			t.Fatal(err)
		}
		if out := testutil.Run(t, "tc", "qdisc", "show", "dev", "up0"); strings.Contains(out, "clsact") {
			t.Fatalf("clsact qdisc mhbpf created is still there: %s", out)
		}
	})
}

// A second process with the same pin directory finds the maps, with the
// flows in them, and swaps the programs without detaching.
func TestRestartKeepsFlows(t *testing.T) {
	ns := netnsWithVeth(t)
	dir := pinDirIn(t, ns)
	flow := maps.Flow{
		Key:    maps.FlowKey{Proto: 6, Src: netip.MustParseAddrPort("100.64.2.10:40000"), Dst: netip.MustParseAddrPort("203.0.113.7:443")},
		Uplink: 1, Origin: maps.OriginBalanced, Mark: 0x20000, FirstSeen: 7 * time.Second, LastSeen: 9 * time.Second,
	}
	testutil.InNetNS(t, ns, func() {
		d, err := loader.Load(loader.Options{NetnsCookie: testutil.NetnsCookie(t, ""), PinDir: dir})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := d.AttachTC("up0", maps.RoleLAN, 0); err != nil {
			t.Fatal(err)
		}
		if err := d.Maps.PutFlow(flow); err != nil {
			t.Fatal(err)
		}
		d.Close() // the first "daemon" is gone: only pins hold the datapath
		if n := count(attached(t, "up0"), lanName()); n != 1 {
			t.Fatalf("program detached when the loader closed: %d attached", n)
		}
	})

	// Not through 'ip netns exec': it mounts a fresh /sys, and with it an
	// empty bpffs. The helper enters the namespace itself.
	exe, _ := os.Executable()
	cmd := exec.Command(exe) // TestMain runs restartHelper
	cmd.Env = append(os.Environ(), "MHBPF_RESTART_HELPER="+dir, "MHBPF_RESTART_NETNS="+ns)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "flow found: uplink 1 origin balanced first seen 7s last seen 9s") {
		t.Fatalf("second process: %v\n%s", err, out)
	}
	testutil.InNetNS(t, ns, func() {
		if n := count(attached(t, "up0"), lanName()); n != 1 {
			t.Fatalf("after the second process attached: %d programs, want 1", n)
		}
	})
}

// TestMain runs the second process of TestRestartKeepsFlows when this
// binary is run again as that process (it is no test: a helper test would
// show as a skip in every ordinary run).
func TestMain(m *testing.M) {
	if dir := os.Getenv("MHBPF_RESTART_HELPER"); dir != "" {
		if err := restartHelper(dir, os.Getenv("MHBPF_RESTART_NETNS")); err != nil {
			fmt.Println("restart helper:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// restartHelper is the second process of TestRestartKeepsFlows: it loads
// the pinned datapath, finds the flow the first left, and attaches again.
func restartHelper(dir, ns string) error {
	cookie, err := loader.CurrentNetnsCookie()
	if err != nil {
		return err
	}
	d, err := loader.Load(loader.Options{NetnsCookie: cookie, PinDir: dir})
	if err != nil {
		return err
	}
	defer d.Close()
	f, ok, err := d.Maps.LookupFlow(maps.FlowKey{Proto: 6, Src: netip.MustParseAddrPort("100.64.2.10:40000"),
		Dst: netip.MustParseAddrPort("203.0.113.7:443")})
	if err != nil || !ok {
		return fmt.Errorf("flow lost across restart: ok=%v err=%v", ok, err)
	}
	// The process ends right after: its thread may stay in the namespace.
	runtime.LockOSThread()
	target, err := netns.GetFromName(ns)
	if err != nil {
		return err
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		return err
	}
	if _, err := d.AttachTC("up0", maps.RoleLAN, 0); err != nil {
		return err
	}
	fmt.Printf("flow found: uplink %d origin %v first seen %v last seen %v\n", f.Uplink, f.Origin, f.FirstSeen, f.LastSeen)
	return nil
}

// egressPrograms lists the egress programs on ifname: tcx program names,
// or cls_bpf filter names.
func egressPrograms(t *testing.T, ifname string, mode loader.Mode) []string {
	t.Helper()
	if mode == loader.ModeTCX {
		return tcxProgramsAt(t, ifname, ebpf.AttachTCXEgress)
	}
	return clsactFiltersAt(t, ifname, tc.HandleMinEgress)
}

// A LAN interface has an egress program (port-forward records); when a
// reload makes it an uplink, the egress program goes.
func TestRoleChangeLeavesNoEgressProgram(t *testing.T) {
	for _, mode := range []loader.Mode{loader.ModeTCX, loader.ModeClsact} {
		t.Run(string(mode), func(t *testing.T) {
			if mode == loader.ModeTCX && !testutil.KernelAtLeast(6, 6) {
				t.Skipf("SKIPPED LOUDLY: kernel %s has no tcx (needs 6.6); the clsact case runs", testutil.KernelRelease())
			}
			ns := netnsWithVeth(t)
			dir := pinDirIn(t, ns)
			testutil.InNetNS(t, ns, func() {
				d, err := loader.Load(loader.Options{NetnsCookie: testutil.NetnsCookie(t, ""), PinDir: dir, TCMode: mode})
				if err != nil {
					t.Fatal(err)
				}
				defer d.Close()
				defer func() { _ = loader.Remove(dir) }()
				if _, err := d.AttachTC("up0", maps.RoleLAN, 0); err != nil {
					t.Fatal(err)
				}
				if got := egressPrograms(t, "up0", mode); len(got) != 1 {
					t.Fatalf("LAN interface: egress programs %v, want mhbpf's", got)
				}
				if _, err := d.AttachTC("up0", maps.RoleUplink, 0); err != nil {
					t.Fatal(err)
				}
				if got := egressPrograms(t, "up0", mode); len(got) != 0 {
					t.Fatalf("after it became an uplink: egress programs %v, want none", got)
				}
			})
		})
	}
}
