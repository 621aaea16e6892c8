package routing

import (
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/mhbpf/mhbpf/internal/statefile"
	"github.com/mhbpf/mhbpf/internal/testutil"
)

// An uplink's rp_filter is loosened only where the kernel would filter it
// strictly as found, conf.all is never written (it would loosen the LAN's
// strict check too), a recorded rp_filter no longer wanted, or no longer
// strict as found, goes back, and RestoreSysctls leaves everything as
// found.
func TestApplySysctlsRPFilter(t *testing.T) {
	testutil.RequireRoot(t)
	ns := testutil.UniqueName("mhs")
	testutil.Run(t, "ip", "netns", "add", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	for _, c := range [][]string{
		{"link", "add", "up0", "type", "veth", "peer", "name", "p0"},
		{"link", "add", "up1", "type", "veth", "peer", "name", "p1"},
		{"link", "add", "lan0", "type", "veth", "peer", "name", "l0"},
	} {
		testutil.Run(t, "ip", append([]string{"-n", ns}, c...)...)
	}
	file := filepath.Join(t.TempDir(), "sysctls.json")
	testutil.InNetNS(t, ns, func() {
		set := func(kv map[string]string) {
			t.Helper()
			for n, v := range kv {
				if err := WriteSysctl(n, v); err != nil {
					t.Fatal(err)
				}
			}
		}
		expect := func(step string, kv map[string]string) {
			t.Helper()
			for n, v := range kv {
				if got, err := ReadSysctl(n); err != nil || got != v {
					t.Errorf("%s: %s = %q (%v), want %s", step, n, got, err, v)
				}
			}
		}
		const all, up0, up1, lan0 = "net.ipv4.conf.all.rp_filter", "net.ipv4.conf.up0.rp_filter", "net.ipv4.conf.up1.rp_filter", "net.ipv4.conf.lan0.rp_filter"
		want := DesiredSysctls([]string{"up0", "up1"}, false)
		if want[all] != "" {
			t.Fatalf("DesiredSysctls wants conf.all.rp_filter = %s", want[all])
		}

		// Off stays off; strict on the interface becomes loose.
		set(map[string]string{all: "0", up0: "0", up1: "1", lan0: "1"})
		if err := ApplySysctls(file, want); err != nil {
			t.Fatal(err)
		}
		expect("all off, up1 strict", map[string]string{all: "0", up0: "0", up1: "2", lan0: "1"})
		if s, _ := LoadSaved(file); s.Sysctls[up0] != "" || s.Sysctls[up1] != "1" {
			t.Errorf("recorded %v, want up1's 1 and not up0 (untouched)", s.Sysctls)
		}

		// Strict from conf.all: the uplink's own setting loosens it; the
		// LAN keeps the strict check.
		set(map[string]string{all: "1"})
		if err := ApplySysctls(file, want); err != nil {
			t.Fatal(err)
		}
		expect("all strict", map[string]string{all: "1", up0: "2", up1: "2", lan0: "1"})

		// An earlier version's conf.all, recorded, goes back before the
		// uplinks are judged: off as found, so is up0 (its own 0, now
		// not strict), which goes back too; so does the rp_filter of an
		// uplink no longer configured.
		s, _ := LoadSaved(file)
		s.Sysctls[all] = "0"
		set(map[string]string{all: "2"})
		if err := statefile.Write(file, s); err != nil {
			t.Fatal(err)
		}
		if err := ApplySysctls(file, DesiredSysctls([]string{"up0"}, false)); err != nil {
			t.Fatal(err)
		}
		expect("an earlier version's conf.all, up1 gone from the configuration", map[string]string{all: "0", up0: "0", up1: "1"})
		if s, _ := LoadSaved(file); len(s.Sysctls) != 4 || s.Sysctls[all] != "" || s.Sysctls[up0] != "" || s.Sysctls[up1] != "" {
			t.Errorf("recorded %v, want the four forwarding settings only", s.Sysctls)
		}

		// The admin makes conf.all strict again: up0 is loosened again.
		set(map[string]string{all: "1"})
		if err := ApplySysctls(file, DesiredSysctls([]string{"up0"}, false)); err != nil {
			t.Fatal(err)
		}
		expect("all strict again", map[string]string{all: "1", up0: "2"})
		set(map[string]string{all: "0"})

		if err := RestoreSysctls(file); err != nil {
			t.Fatal(err)
		}
		expect("restored", map[string]string{all: "0", up0: "0", up1: "1", lan0: "1"})
	})
}
