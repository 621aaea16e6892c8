// Package testutil holds what mhbpf's privileged tests share: a check that
// they run as root on a kernel with what they need (failing loudly, never
// skipping quietly), throwaway pin directories and network namespaces.
package testutil

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/mhbpf/mhbpf/internal/loader"
	"golang.org/x/sys/unix"
)

// RequireRoot fails the test unless it runs as root. mhbpf's tests need
// root for BPF and namespaces; CI runs them as root, and a developer who
// runs them otherwise must see that they did not run.
func RequireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("MHBPF_ALLOW_SKIP") != "" {
			tb.Skip("SKIPPED LOUDLY: needs root (MHBPF_ALLOW_SKIP is set)")
		}
		tb.Fatal("this test needs root (BPF, network namespaces); run 'make test' as root, or set MHBPF_ALLOW_SKIP=1 to skip it knowingly")
	}
}

// UniqueName is a short random name with a prefix, for namespaces, pins
// and interfaces that must not collide with a parallel run.
func UniqueName(prefix string) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

// PinDir is a fresh directory on bpffs, removed (with everything pinned in
// it) when the test ends.
func PinDir(tb testing.TB, remove func(string) error) string {
	tb.Helper()
	dir := filepath.Join("/sys/fs/bpf", UniqueName("mhbpf-test-"))
	tb.Cleanup(func() {
		if err := remove(dir); err != nil {
			tb.Errorf("remove pins %s: %v", dir, err)
		}
		_ = os.RemoveAll(dir)
	})
	return dir
}

// Run runs a command and fails the test with its output if it fails.
func Run(tb testing.TB, name string, args ...string) string {
	tb.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		tb.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// InNetNS runs fn on a locked OS thread switched into the named network
// namespace, so netlink and BPF attach calls made by fn act there.
func InNetNS(tb testing.TB, name string, fn func()) {
	tb.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		tb.Fatal(err)
	}
	defer orig.Close()
	target, err := netns.GetFromName(name)
	if err != nil {
		tb.Fatal(err)
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		tb.Fatal(err)
	}
	defer func() {
		if err := netns.Set(orig); err != nil {
			panic(err) // a thread left in a test namespace must not run anything else
		}
	}()
	fn()
}

// NetnsCookie is the cookie of the named network namespace, or of the
// calling thread's when name is empty: the loader's Options.NetnsCookie for
// a datapath whose socket hooks must steer the sockets made there.
func NetnsCookie(tb testing.TB, name string) uint64 {
	tb.Helper()
	var c uint64
	var err error
	if name == "" {
		c, err = loader.CurrentNetnsCookie()
	} else {
		InNetNS(tb, name, func() { c, err = loader.CurrentNetnsCookie() })
	}
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// Cgroup makes a child cgroup for the test and removes it afterwards.
func Cgroup(tb testing.TB) string {
	tb.Helper()
	root, err := loader.Cgroup2Root()
	if err != nil {
		tb.Fatalf("the socket hooks cannot be tested: %v", err)
	}
	dir := filepath.Join(root, UniqueName("mhbpf-test-"))
	if err := os.Mkdir(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		// Processes still in it (a stuck client) go back to the root first.
		if procs, err := os.ReadFile(filepath.Join(dir, "cgroup.procs")); err == nil {
			for _, pid := range strings.Fields(string(procs)) {
				_ = os.WriteFile(filepath.Join(filepath.Dir(dir), "cgroup.procs"), []byte(pid), 0)
			}
		}
		_ = os.Remove(dir)
	})
	return dir
}

// KernelAtLeast reports whether the running kernel is at least major.minor.
func KernelAtLeast(major, minor int) bool {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return false
	}
	var ma, mi int
	fmt.Sscanf(unix.ByteSliceToString(u.Release[:]), "%d.%d", &ma, &mi)
	return ma > major || ma == major && mi >= minor
}

// KernelRelease is uname -r.
func KernelRelease() string {
	var u unix.Utsname
	_ = unix.Uname(&u)
	return unix.ByteSliceToString(u.Release[:])
}

// RequireTCX skips, saying so, on a kernel older than 6.6, which has no
// tcx (the clsact tests cover it there); on 6.6 and later tcx must work.
func RequireTCX(tb testing.TB, err error) {
	tb.Helper()
	if err == nil {
		return
	}
	if !KernelAtLeast(6, 6) {
		tb.Skipf("SKIPPED LOUDLY: kernel %s has no tcx (needs 6.6); the clsact path is tested instead", KernelRelease())
	}
	tb.Fatalf("kernel %s should have tcx: %v", KernelRelease(), err)
}

// Deadline stretches a test's time limit under emulation: the VM suite runs
// under TCG, many times slower than the host, and sets MHBPF_TIME_SCALE.
// On the host the scale is 1 and the limits are the requirements' own.
func Deadline(d time.Duration) time.Duration {
	var scale int
	if _, err := fmt.Sscan(os.Getenv("MHBPF_TIME_SCALE"), &scale); err == nil && scale > 1 {
		return d * time.Duration(scale)
	}
	return d
}
