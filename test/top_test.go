package test

// 'mhbpf top' on a real daemon: a download through isp1 shows as isp1's
// down rate, isp2 taken out shows as down with its reason and × in its
// history, and each sample is one table.

import (
	"context"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mhbpf/mhbpf/internal/topology"
)

func TestTopShowsRatesStateAndHistory(t *testing.T) {
	e := newDaemonEnv(t, "", "")
	// About 1.6 Mbit/s for as long as the client reads.
	srv, err := e.topo.ServeSocat(e.topo.ISP1, fmt.Sprintf("TCP4-LISTEN:9000,bind=%s,fork,reuseaddr", topology.Internet),
		"while head -c 10000 /dev/zero; do sleep 0.05; done", "-Hltn", 9000)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	e.start()
	e.waitFor("both uplinks up", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	if err := e.topo.IP(e.topo.Router, "link", "set", "ppp1", "down"); err != nil {
		t.Fatal(err)
	}
	e.waitFor("isp2 out", 3*time.Second, func() bool { st, _ := e.statusJSON(); return st.Health == "degraded" })

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dl := exec.CommandContext(ctx, "ip", "netns", "exec", e.topo.LAN, "socat", "-u", "-T5",
		fmt.Sprintf("TCP4:%s:9000", topology.Internet), "OPEN:/dev/null")
	if err := dl.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cancel(); _ = dl.Wait() }()
	time.Sleep(300 * time.Millisecond)

	out, err := e.mhbpf("top", "--iterations", "5", "--interval", "400ms")
	if err != nil {
		t.Fatalf("top: %v\n%s", err, out)
	}
	t.Logf("mhbpf top --iterations 5 --interval 400ms:\n%s", out)
	if n := strings.Count(out, "STATE"); n != 5 {
		t.Fatalf("%d tables, want 5", n)
	}
	var lastISP1, lastISP2 []string
	peak := 0.0
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) > 2 && f[0] == "isp1":
			lastISP1 = f
			if r, err := strconv.ParseFloat(f[3], 64); err == nil && r > peak {
				peak = r
			}
		case len(f) > 2 && f[0] == "isp2":
			lastISP2 = f
		}
	}
	if lastISP1 == nil || lastISP1[2] != "up" {
		t.Fatalf("isp1's last line: %q", lastISP1)
	}
	// The download is about 1.6 Mbit/s; shaped nowhere, so allow slack.
	if peak < 0.5 {
		t.Errorf("isp1's down rate peaked at %.2f Mbit/s during a ~1.6 Mbit/s download", peak)
	}
	if lastISP2 == nil || lastISP2[2] != "down" || !strings.Contains(strings.Join(lastISP2, " "), "link down") ||
		strings.Count(strings.Join(lastISP2, " "), "×") != 4 {
		t.Errorf("isp2's last line (down, its reason, out in the 4 samples after the first): %q", lastISP2)
	}
	if !strings.ContainsAny(strings.Join(lastISP1, " "), "▂▃▄▅▆▇█") {
		t.Errorf("isp1's history shows no traffic: %q", lastISP1)
	}
}
