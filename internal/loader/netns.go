package loader

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// netnsCookieByProgram asks the kernel for the calling thread's network
// namespace cookie the way the socket hooks will see it: through
// bpf_get_netns_cookie in a cgroup connect4 program (Linux 5.7), for
// kernels before 5.14, which cannot report it with SO_NETNS_COOKIE.
//
// The program is attached for the time of one connect(2) of a UDP socket
// (which sends nothing) to the caller's own cgroup, and records the cookie
// only for that socket (by its socket cookie, SO_COOKIE), so a connect of
// another process meanwhile records nothing.
func netnsCookieByProgram() (uint64, error) {
	if err := rlimit.RemoveMemlock(); err != nil {
		return 0, fmt.Errorf("remove memlock limit: %w", err)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	sockCookie, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("getsockopt SO_COOKIE: %w", err)
	}

	result, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		return 0, fmt.Errorf("result map: %w", err)
	}
	defer result.Close()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:       "mhbpf_netns",
		Type:       ebpf.CGroupSockAddr,
		AttachType: ebpf.AttachCGroupInet4Connect,
		License:    "Dual BSD/GPL",
		Instructions: asm.Instructions{
			asm.Mov.Reg(asm.R6, asm.R1),
			asm.FnGetSocketCookie.Call(),
			asm.LoadImm(asm.R1, int64(sockCookie), asm.DWord),
			asm.JNE.Reg(asm.R0, asm.R1, "out"),
			asm.Mov.Reg(asm.R1, asm.R6),
			asm.FnGetNetnsCookie.Call(),
			asm.StoreMem(asm.RFP, -8, asm.R0, asm.DWord),
			asm.StoreImm(asm.RFP, -16, 0, asm.Word),
			asm.LoadMapPtr(asm.R1, result.FD()),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, -16),
			asm.Mov.Reg(asm.R3, asm.RFP),
			asm.Add.Imm(asm.R3, -8),
			asm.Mov.Imm(asm.R4, 0),
			asm.FnMapUpdateElem.Call(),
			asm.Mov.Imm(asm.R0, 1).WithSymbol("out"),
			asm.Return(),
		},
	})
	if err != nil {
		return 0, fmt.Errorf("load the cookie program (bpf_get_netns_cookie in cgroup programs needs Linux 5.7): %w", err)
	}
	defer prog.Close()

	cg, err := ownCgroup()
	if err != nil {
		return 0, err
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cg, Attach: ebpf.AttachCGroupInet4Connect, Program: prog})
	if err != nil {
		return 0, fmt.Errorf("attach the cookie program to %s: %w", cg, err)
	}
	// The hook runs before the route lookup: connect may still fail (a
	// namespace whose loopback is down), the cookie is recorded.
	cerr := unix.Connect(fd, &unix.SockaddrInet4{Port: 9, Addr: [4]byte{127, 0, 0, 1}})
	l.Close()
	var v uint64
	if err := result.Lookup(uint32(0), &v); err != nil {
		return 0, fmt.Errorf("read the cookie: %w", err)
	}
	if v == 0 {
		return 0, fmt.Errorf("the cookie program did not run for this socket (connect: %v)", cerr)
	}
	return v, nil
}

// ownCgroup is the cgroup v2 directory of the calling process.
func ownCgroup() (string, error) {
	mnt, err := cgroup2Mount()
	if err != nil {
		return "", err
	}
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "0::"); ok {
			return filepath.Join(mnt, rest), nil
		}
	}
	return "", errors.New("/proc/self/cgroup names no cgroup v2")
}

// cgroup2Mount is where the cgroup v2 hierarchy is mounted.
func cgroup2Mount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
		pre, post, ok := strings.Cut(s.Text(), " - ")
		if !ok || !strings.HasPrefix(post, "cgroup2 ") {
			continue
		}
		if f := strings.Fields(pre); len(f) >= 5 {
			return f[4], nil
		}
	}
	return "", errors.New("no cgroup2 file system mounted")
}
