// Package testutil holds what mhbpf's privileged tests share: a check that
// they run as root on a kernel with what they need (failing loudly, never
// skipping quietly), throwaway pin directories and network namespaces.
package testutil

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
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
