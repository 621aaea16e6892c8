package loader

import (
	"bufio"
	"compress/gzip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The measured HZ is a value Linux offers, and two measurements agree: the
// programs' "once a second" is a second.
func TestKernelHZIsMeasured(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (BPF_PROG_TEST_RUN)") // as testutil.RequireRoot, which imports this package
	}
	a, err := kernelHZ()
	if err != nil {
		t.Fatal(err)
	}
	b, err := measureHZ(300 * time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	switch a {
	case 100, 250, 300, 1000:
	default:
		t.Fatalf("HZ measured as %d: not a CONFIG_HZ value", a)
	}
	if a != b {
		t.Fatalf("HZ measured as %d, then %d", a, b)
	}
	// Where the kernel publishes its configuration, it must say the same.
	if f, err := os.Open("/proc/config.gz"); err == nil {
		defer f.Close()
		z, err := gzip.NewReader(f)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(z)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), "CONFIG_HZ="); ok && v != strconv.Itoa(int(a)) {
				t.Fatalf("HZ measured as %d, the kernel's config says %s", a, v)
			}
		}
	}
	t.Logf("HZ %d", a)
}
