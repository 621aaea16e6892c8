package test

// 'mhbpf status' reads the status file and the per-uplink counters, never
// the flow maps: its bpf(2) calls, counted by strace, are as many with
// 20,000 flows in the maps as with none. 'mhbpf flows' over the same maps
// reads them in batches, a few calls for the lot, and lists every flow.

import (
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mhbpf/mhbpf/internal/daemon"
	"github.com/mhbpf/mhbpf/internal/daemontest"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/statefile"
	"github.com/mhbpf/mhbpf/internal/testutil"
)

// bpfCalls runs the mhbpf binary with args under strace and returns how
// many bpf(2) calls it made, and its output.
func bpfCalls(t *testing.T, args ...string) (int, string) {
	t.Helper()
	trace := filepath.Join(t.TempDir(), "strace")
	cmd := exec.Command("strace", append([]string{"-f", "-c", "-e", "trace=bpf", "-o", trace, daemontest.Binary(t)}, args...)...)
	out, _ := cmd.Output() // status exits 4: no uplink is up
	summary, err := os.ReadFile(trace)
	if err != nil {
		t.Fatalf("strace %v: %v\n%s", args, err, out)
	}
	for _, line := range strings.Split(string(summary), "\n") {
		f := strings.Fields(line)
		if len(f) >= 5 && f[len(f)-1] == "bpf" {
			n, err := strconv.Atoi(f[3])
			if err != nil {
				t.Fatalf("strace summary line %q: %v", line, err)
			}
			return n, string(out)
		}
	}
	t.Fatalf("no bpf line in the strace summary of %v:\n%s", args, summary)
	return 0, ""
}

func TestStatusSkipsAndFlowsBatchesTheFlowMaps(t *testing.T) {
	testutil.RequireRoot(t)
	pinDir := testutil.PinDir(t, loader.Remove)
	dp, err := loader.Load(loader.Options{PinDir: pinDir, NetnsCookie: testutil.NetnsCookie(t, "")})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	stateDir := t.TempDir()
	st := daemon.Status{Updated: time.Now(), PID: os.Getpid(), State: daemon.StateRunning,
		Uplinks: []daemon.UplinkStatus{{Name: "isp1", Interface: "ppp0", ID: 0}, {Name: "isp2", Interface: "ppp1", ID: 1}}}
	if err := statefile.Write(filepath.Join(stateDir, "status.json"), st); err != nil {
		t.Fatal(err)
	}
	args := []string{"--pin-dir", pinDir, "--state-dir", stateDir}

	empty, out := bpfCalls(t, append(args, "status")...)
	if !strings.Contains(out, "isp2") {
		t.Fatalf("mhbpf status:\n%s", out)
	}
	const n = 20_000
	for i := range n {
		src := netip.AddrFrom4([4]byte{100, 64, byte(i >> 8), byte(i)})
		if err := dp.Maps.PutFlow(maps.Flow{Key: maps.FlowKey{Proto: 6, Src: netip.AddrPortFrom(src, 40000),
			Dst: netip.MustParseAddrPort("198.51.100.1:443")}, Uplink: i % 2, Mark: 1 << (16 + i%2)}); err != nil {
			t.Fatal(err)
		}
	}
	full, out := bpfCalls(t, append(args, "status")...)
	t.Logf("mhbpf status: %d bpf calls with no flows, %d with %d flows", empty, full, n)
	if full != empty {
		t.Errorf("mhbpf status made %d bpf calls with %d flows in the maps, %d with none: it reads the flow maps\n%s", full, n, empty, out)
	}

	listed, out := bpfCalls(t, append(args, "flows")...)
	t.Logf("mhbpf flows: %d bpf calls for %d flows", listed, n)
	if rows := strings.Count(out, "\n") - 1; rows != n {
		t.Errorf("mhbpf flows listed %d flows, want %d", rows, n)
	}
	// Batches of maps.WalkBatch: a handful of calls more than status
	// (which opens the same pins), not one or two a flow.
	if batches := n/maps.WalkBatch + 4; listed > empty+2*batches {
		t.Errorf("mhbpf flows made %d bpf calls for %d flows (status: %d): not batched", listed, n, empty)
	}
}
