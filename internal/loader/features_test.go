package loader_test

import (
	"testing"

	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/testutil"
)

// The probes answer as the kernel's version says they must: a probe that
// says "no" on a kernel that has the feature would put a new kernel on the
// fallbacks, one that says "yes" on an old one would fail the load.
func TestProbedFeaturesMatchTheKernel(t *testing.T) {
	testutil.RequireRoot(t)
	f, err := loader.ProbeFeatures()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kernel %s: %+v", testutil.KernelRelease(), f)
	for _, c := range []struct {
		name         string
		have         bool
		major, minor int
	}{
		{"bpf_loop", f.BPFLoop, 5, 17},
		{"tcx", f.TCX, 6, 6},
		{"SO_NETNS_COOKIE", f.NetnsCookieSockopt, 5, 14},
		// 5.10 lacks it, 6.1 has it: the VM suite's kernels on either side.
		{"bpf_setsockopt in sendmsg hooks", f.SendmsgSetsockopt, 6, 1},
	} {
		if want := testutil.KernelAtLeast(c.major, c.minor); c.have != want && (c.name != "bpf_setsockopt in sendmsg hooks" || !testutil.KernelAtLeast(5, 11) || testutil.KernelAtLeast(6, 1)) {
			t.Errorf("%s: probed %v on %s, want %v (it came with %d.%d)", c.name, c.have, testutil.KernelRelease(), want, c.major, c.minor)
		}
	}
	if want := loader.ModeClsact; !f.TCX && f.TCMode() != want {
		t.Errorf("tc mode %s without tcx, want %s", f.TCMode(), want)
	}
}
