package nat_test

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/mhbpf/mhbpf/internal/nat"
	"github.com/mhbpf/mhbpf/internal/testutil"
)

// What Apply writes, Drift reads back as intact; whatever someone else
// does to the table, Drift names.
func TestDriftSeesWhatOthersDid(t *testing.T) {
	testutil.RequireRoot(t)
	ns := testutil.UniqueName("mhn")
	testutil.Run(t, "ip", "netns", "add", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	const table = "mhbpf"
	want := nat.Table{Masquerade: []string{"ppp0"}, ClampMSS: []string{"ppp0", "ppp1"}}
	testutil.InNetNS(t, ns, func() {
		drift := func() string {
			t.Helper()
			d, err := nat.Drift(table, want)
			if err != nil {
				t.Fatal(err)
			}
			return d
		}
		if d, err := nat.Drift(table, nat.Table{}); err != nil || d != "" {
			t.Fatalf("nothing wanted, nothing there: %q, %v", d, err)
		}
		if d := drift(); d != "gone" {
			t.Fatalf("before Apply: %q, want gone", d)
		}
		for _, c := range []struct {
			nft  string // what someone else does ("" for nothing)
			want string // what Drift says then
		}{
			{"", ""},
			{"flush ruleset", "gone"},
			{"flush chain inet mhbpf postrouting", "chain postrouting has 0 rules instead of 1"},
			{"add rule inet mhbpf forward counter", "chain forward has 3 rules instead of 2"},
			{"delete chain inet mhbpf postrouting", "1 chains instead of 2"},
			{"add chain inet mhbpf extra", "3 chains instead of 2"},
			{"add table inet mhbpf { flags dormant; }", "dormant"},
			{"chain inet mhbpf forward { policy drop; }", "chain forward changed"},
		} {
			if err := nat.Apply(table, want); err != nil {
				t.Fatal(err)
			}
			if c.nft != "" {
				testutil.Run(t, "nft", strings.Fields(c.nft)...)
			}
			if d := drift(); d != c.want {
				out, _ := exec.Command("nft", "list", "table", "inet", table).CombinedOutput()
				t.Fatalf("after %q: drift %q, want %q\n%s", c.nft, d, c.want, out)
			}
		}
		// Another configuration's table is not this one's.
		if err := nat.Apply(table, nat.Table{Masquerade: []string{"ppp1"}, ClampMSS: want.ClampMSS}); err != nil {
			t.Fatal(err)
		}
		if d := drift(); d != "rule 1 of chain postrouting changed" {
			t.Fatalf("table for ppp1: drift %q", d)
		}
		if err := nat.Remove(table); err != nil {
			t.Fatal(err)
		}
	})
}
