// Package uplinkexec runs a command whose connections all leave by one
// uplink, with that uplink's source address ('mhbpf exec', what mwan3's
// "use" does).
//
// How: the command starts in a cgroup of its own (clone3 with
// CLONE_INTO_CGROUP: it is inside from its first instruction, so no socket
// escapes), a child of the caller's cgroup, with a cgroup/sock_create
// program (bpf/exec.c) that gives every socket the uplink's mark and binds
// it to the uplink's device. The mark routes it by the uplink's table (the
// fib rules), the device picks the uplink's address as source, and a socket
// bound to a device is one the socket hooks leave alone (the health probes
// rely on the same). The program is attached only while this process waits
// for the command, and the cgroup is removed after it.
//
// Not through LD_PRELOAD (static binaries, Go programs ignore it) nor by
// editing the daemon's maps (nothing to clean up after a crash here: the
// link is an fd of this process).
package uplinkexec

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"github.com/vishvananda/netlink"

	"github.com/mhbpf/mhbpf/bpf"
	"github.com/mhbpf/mhbpf/internal/daemon"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
)

// Uplink is what the command is pinned to.
type Uplink struct {
	Name      string
	Interface string
	Mark      uint32
	Ifindex   int
}

// Resolve finds the uplink by name and checks that the datapath uses it
// now: a command sent by a dead uplink would only hang.
func Resolve(live *maps.Maps, st daemon.Status, name string) (Uplink, error) {
	var names []string
	for _, u := range st.Uplinks {
		names = append(names, u.Name)
		if u.Name != name {
			continue
		}
		m, err := live.LookupUplink(u.ID)
		if err != nil {
			return Uplink{}, fmt.Errorf("uplink %s: %w", name, err)
		}
		if !m.Up || m.Mark == 0 || m.Ifindex == 0 {
			reason := u.Reason
			if reason == "" {
				reason = "not in use"
			}
			return Uplink{}, fmt.Errorf("uplink %s is down (%s): not running the command", name, reason)
		}
		l, err := netlink.LinkByIndex(int(m.Ifindex))
		if err != nil || l.Attrs().Name != u.Interface {
			return Uplink{}, fmt.Errorf("uplink %s: interface %s (index %d) is not in this network namespace: run mhbpf exec in the daemon's", name, u.Interface, m.Ifindex)
		}
		return Uplink{Name: name, Interface: u.Interface, Mark: m.Mark, Ifindex: int(m.Ifindex)}, nil
	}
	return Uplink{}, fmt.Errorf("--uplink %q: no such uplink (uplinks: %s)", name, strings.Join(names, ", "))
}

// Run starts argv by uplink u, waits for it and returns its exit code.
// SIGINT, SIGTERM and SIGHUP are passed on to it.
func Run(u Uplink, argv []string) (int, error) {
	if len(argv) == 0 {
		return 0, errors.New("no command")
	}
	path, err := exec.LookPath(argv[0])
	if err != nil {
		return 0, err
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return 0, err
	}
	spec, err := bpf.LoadExec()
	if err != nil {
		return 0, err
	}
	for name, v := range map[string]uint32{"exec_mark": u.Mark, "exec_ifindex": uint32(u.Ifindex)} {
		if err := spec.Variables[name].Set(v); err != nil {
			return 0, fmt.Errorf("set %s: %w", name, err)
		}
	}
	var objs bpf.ExecObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		return 0, fmt.Errorf("load the exec program: %w", err)
	}
	defer objs.Close()

	dir, err := ownCgroup()
	if err != nil {
		return 0, err
	}
	dir = filepath.Join(dir, fmt.Sprintf("mhbpf-exec-%d", os.Getpid()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		return 0, fmt.Errorf("a cgroup for the command: %w", err)
	}
	defer removeCgroup(dir)
	l, err := link.AttachCgroup(link.CgroupOptions{Path: dir, Attach: ebpf.AttachCGroupInetSockCreate, Program: objs.ExecSockCreate})
	if err != nil {
		return 0, fmt.Errorf("attach to %s: %w", dir, err)
	}
	defer l.Close()
	cg, err := os.Open(dir)
	if err != nil {
		return 0, err
	}
	defer cg.Close()

	cmd := exec.Command(path, argv[1:]...)
	cmd.Args = argv
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start %s in %s: %w", argv[0], dir, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	for {
		select {
		case s := <-sigs:
			_ = cmd.Process.Signal(s)
		case err := <-done:
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
					return 128 + int(ws.Signal()), nil
				}
				return ee.ExitCode(), nil
			}
			return 0, err
		}
	}
}

// ownCgroup is the cgroup v2 directory of this process: the command's
// cgroup goes below it, where whoever started us (a shell, a unit) already
// accounts for it.
func ownCgroup() (string, error) {
	root, err := loader.Cgroup2Root()
	if err != nil {
		return "", err
	}
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "0::"); ok {
			return filepath.Join(root, rest), nil
		}
	}
	return "", errors.New("this process is in no cgroup v2")
}

// removeCgroup removes the command's cgroup; processes the command left
// running in the background keep it (and their sockets their uplink).
func removeCgroup(dir string) {
	for i := 0; i < 50; i++ { // the kernel empties it shortly after the last exit
		if err := os.Remove(dir); err == nil || errors.Is(err, os.ErrNotExist) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	fmt.Fprintf(os.Stderr, "mhbpf exec: %s still holds processes the command left running; not removed\n", dir)
}
