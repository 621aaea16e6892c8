package loader_test

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/testutil"
)

// The cookie a BPF program reads (the way before Linux 5.14) is the one the
// socket hooks compare against: stable, per namespace, and where the kernel
// has SO_NETNS_COOKIE the same number it reports.
func TestNetnsCookieByProgram(t *testing.T) {
	testutil.RequireRoot(t)
	first, err := loader.NetnsCookieByProgram()
	if err != nil {
		t.Fatal(err)
	}
	again, err := loader.NetnsCookieByProgram()
	if err != nil {
		t.Fatal(err)
	}
	if first == 0 || first != again {
		t.Fatalf("cookie by program: %d, then %d", first, again)
	}
	var other uint64
	testutil.InNetNS(t, netnsWithVeth(t), func() { other, err = loader.NetnsCookieByProgram() })
	if err != nil {
		t.Fatal(err)
	}
	if other == 0 || other == first {
		t.Fatalf("cookie by program: this namespace %d, another %d", first, other)
	}

	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	want, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if errors.Is(err, unix.ENOPROTOOPT) {
		t.Logf("kernel %s has no SO_NETNS_COOKIE: compared with nothing", testutil.KernelRelease())
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	if first != want {
		t.Fatalf("cookie by program %d, SO_NETNS_COOKIE %d", first, want)
	}
}
