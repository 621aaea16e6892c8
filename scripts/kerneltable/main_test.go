package main

import (
	"strings"
	"testing"
)

// Rows come in version order (6.12 after 6.1, not before it), a kernel
// lacking nothing says so, and each missing feature names the kernel that
// brings it and the fallback.
func TestTable(t *testing.T) {
	got := table([]report{
		{Kernel: "6.12.117+deb12-amd64", TCMode: "tcx", Features: []feature{{Name: "tcx", Since: "6.6", Have: true}}},
		{Kernel: "5.10.0-46-amd64", TCMode: "clsact", Features: []feature{
			{Name: "bpf_loop", Since: "5.17", Without: "a bounded loop"},
			{Name: "tcx", Since: "6.6", Without: "clsact"},
		}},
		{Kernel: "6.1.0-56-amd64", TCMode: "clsact", Features: []feature{{Name: "tcx", Since: "6.6", Without: "clsact"}}},
	})
	lines := strings.Split(strings.TrimSpace(got), "\n")
	if len(lines) != 5 {
		t.Fatalf("table:\n%s", got)
	}
	want := []string{
		"| 5.10.0-46-amd64 | Debian 11 | clsact | bpf_loop (5.17): a bounded loop; tcx (6.6): clsact |",
		"| 6.1.0-56-amd64 | Debian 12 | clsact | tcx (6.6): clsact |",
		"| 6.12.117+deb12-amd64 | Debian 12 (bookworm-security) | tcx | nothing |",
	}
	for i, w := range want {
		if lines[2+i] != w {
			t.Errorf("row %d: %q\nwant %q", i, lines[2+i], w)
		}
	}
}
