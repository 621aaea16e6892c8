package daemonbench

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/daemontest"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/packet"
	"github.com/mhbpf/mhbpf/internal/topology"
)

// eventsPerRound: failovers timed per benchmark run; the run reports their
// median (the script takes the median over rounds of that).
const eventsPerRound = 3

const namePort = 8080

// Carrier loss: the line of the uplink that new LAN connections use now
// drops (the ISP's end of the veth goes down: the router's interface loses
// its carrier), and a new TCP connection from the LAN is tried every 5 ms
// (each given 1 s) until one succeeds through the other ISP (its server
// answers with its name). Reported: the time from just before the link
// change to that first success; with the flow map nearly empty (the
// tries' own flows), and full (flows4 filled to its capacity, half of the
// flows on each uplink: failover work must not grow with them).
func BenchmarkFailoverCarrierLoss(b *testing.B) {
	for _, full := range []bool{false, true} {
		name := map[bool]string{false: "flows=few", true: "flows=full"}[full]
		b.Run(name, func(b *testing.B) { benchCarrierLoss(b, full) })
	}
}

func benchCarrierLoss(b *testing.B, full bool) {
	e := newEnv(b, 2, "", "")
	e.serveName(e.topo.ISP1, "isp1", topology.Internet, namePort)
	e.serveName(e.topo.ISP2, "isp2", topology.Internet, namePort)
	lines := map[string]*line{
		"isp1": e.line(e.topo.ISP1, topology.ISP1Local, topology.ISP1Local6),
		"isp2": e.line(e.topo.ISP2, topology.ISP2Local, topology.ISP2Local6),
	}
	e.start()
	var took, outs []float64
	for i := 0; i < eventsPerRound; i++ {
		if full {
			e.fillFlows4() // again: the last failover retired half of them
		}
		from, err := e.dialName(topology.Internet, namePort, time.Second)
		if err != nil || lines[from] == nil {
			b.Fatalf("a LAN connection before the failure: %q, %v", from, err)
		}
		other := map[string]string{"isp1": "isp2", "isp2": "isp1"}[from]
		start := time.Now()
		if err := lines[from].set(false); err != nil {
			b.Fatal(err)
		}
		d, tries := e.firstConnVia(other, start, 10*time.Second)
		// The pass that took the uplink out ends with the status: what
		// it did after the routes (the flows' retirement, conntrack)
		// shows here, not in the connection.
		out := e.waitFrom(start, from+" out in the status", 30*time.Second, func() bool { return !e.usable(from) })
		b.Logf("%s lost its carrier: first new connection through %s after %v (%d tries); out in the status after %v",
			from, other, d.Round(time.Millisecond), tries, out.Round(time.Millisecond))
		took = append(took, ms(d))
		outs = append(outs, ms(out))
		if err := lines[from].set(true); err != nil {
			b.Fatal(err)
		}
		if err := lines[from].restoreRoutes(); err != nil {
			b.Fatal(err)
		}
		e.waitFor("every uplink back", 30*time.Second, e.allUpSince(time.Now()))
	}
	b.ReportMetric(median(took), "ms/first-conn")
	b.ReportMetric(median(outs), "ms/status-out")
	b.ReportMetric(0, "ns/op")
}

// firstConnVia tries a new connection every 5 ms until one is answered by
// the server named want; it returns the time from start and the tries.
func (e *env) firstConnVia(want string, start time.Time, limit time.Duration) (time.Duration, int) {
	e.b.Helper()
	got := make(chan time.Duration, 1)
	done := make(chan struct{})
	defer close(done)
	tries := 0
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for time.Since(start) < limit {
		tries++
		go func() {
			name, err := e.dialName(topology.Internet, namePort, time.Second)
			if err == nil && name == want {
				select {
				case got <- time.Since(start):
				default: // another try was first
				}
			}
		}()
		select {
		case d := <-got:
			return d, tries
		case <-tick.C:
		}
	}
	e.b.Fatalf("no connection through %s within %v\ndaemon log:\n%s", want, limit, e.log.String())
	return 0, 0
}

// Silent failure: isp1's provider drops everything from the router (the
// carrier stays up); the probes, at the product's defaults (ICMP to
// 203.0.113.10, interval 1 s, timeout 1 s, failures 3, successes 2), must
// find out. Reported: from just before the drop rule goes in until the
// daemon's status says isp1 is out, at a different probe phase each time.
func BenchmarkFailoverSilent(b *testing.B) {
	e := newEnv(b, 2, "", "")
	e.start()
	var took []float64
	for i := 0; i < eventsPerRound; i++ {
		time.Sleep(time.Second + time.Duration(i)*337*time.Millisecond)
		start := time.Now()
		if err := e.topo.NFT(e.topo.ISP1, silentRules); err != nil {
			b.Fatal(err)
		}
		d := e.waitFrom(start, "isp1 out after it went silent", 15*time.Second, func() bool { return !e.usable("isp1") })
		b.Logf("isp1 went silent: out after %v", d.Round(time.Millisecond))
		took = append(took, ms(d))
		if err := e.topo.NFT(e.topo.ISP1, "delete table inet mhbench-silent\n"); err != nil {
			b.Fatal(err)
		}
		e.waitFor("isp1 back", 30*time.Second, func() bool { return e.usable("isp1") })
	}
	b.ReportMetric(median(took), "ms/out")
	b.ReportMetric(0, "ns/op")
}

const silentRules = "table inet mhbench-silent {\n chain pre {\n  type filter hook prerouting priority -300; policy accept;\n  iifname \"wan\" drop\n }\n}\n"

// Convergence after a storm: 100 link events (the two lines' carriers
// down and up in turn, 1 ms apart, ending with both down for 200 ms, then
// both up), then the time
// from the last event until a pass after it says every uplink is in use
// and main's multipath route and both uplink tables are back. The
// product's defaults hold an uplink back for up_delay (1 s) and wait for
// its probes' verdict (successes 2 at interval 1 s) after its link
// returns: that is most of the figure. Also reported: the daemon's passes
// and CPU time from the first event until converged.
func BenchmarkConvergeAfterLinkEvents(b *testing.B) {
	e := newEnv(b, 2, "", "")
	ls := []*line{
		e.line(e.topo.ISP1, topology.ISP1Local, topology.ISP1Local6),
		e.line(e.topo.ISP2, topology.ISP2Local, topology.ISP2Local6),
	}
	e.start()
	var tables []int
	for _, u := range e.status().Uplinks {
		tables = append(tables, u.Table)
	}
	st0, p0 := e.status(), e.process()
	const events = 100
	for i := 0; i < events; i++ {
		// isp1 down, isp2 down, isp1 up, isp2 up, ...; the last two
		// (both up) after both lines were down for 200 ms: a pass sees
		// that, where flaps of a millisecond may fall between passes
		// (then nothing is held back, and a round took 16 ms instead
		// of up_delay: the median depended on chance).
		if i == events-2 {
			time.Sleep(200 * time.Millisecond)
		}
		if err := ls[i%2].set((i/2)%2 == 1); err != nil {
			b.Fatal(err)
		}
		time.Sleep(time.Millisecond)
	}
	last := time.Now()
	for _, l := range ls {
		if err := l.restoreRoutes(); err != nil {
			b.Fatal(err)
		}
	}
	d := e.waitFrom(last, "converged after the link events", 60*time.Second, func() bool {
		return e.allUpSince(last)() && e.routesRight([]string{"ppp0", "ppp1"}, tables)
	})
	st1, p1 := e.status(), e.process()
	b.Logf("converged %v after the last of %d link events; %d passes, %v CPU", d.Round(time.Millisecond), events, st1.Passes-st0.Passes, p1.cpu-p0.cpu)
	b.ReportMetric(ms(d), "ms/converge")
	b.ReportMetric(float64(st1.Passes-st0.Passes), "passes")
	b.ReportMetric(ms(p1.cpu-p0.cpu), "ms-cpu")
	b.ReportMetric(0, "ns/op")
}

// Idle: the daemon's CPU time (utime + stime, /proc/PID/stat) over the
// idle window (MHBPF_BENCH_IDLE, default 10 s), every uplink probed at the
// defaults, and its resident memory (VmRSS) and peak (VmHWM) at the end;
// with 2 or 16 uplinks, and empty or full: flows4 filled to its capacity
// (flow_map_size, default 262,144) and a policy of 1,000,000 IPv4 prefixes
// from a file.
func BenchmarkIdle(b *testing.B) {
	idle := 10 * time.Second
	if s := os.Getenv("MHBPF_BENCH_IDLE"); s != "" {
		var err error
		if idle, err = time.ParseDuration(s); err != nil {
			b.Fatalf("MHBPF_BENCH_IDLE: %v", err)
		}
	}
	for _, uplinks := range []int{2, 16} {
		for _, full := range []bool{false, true} {
			name := fmt.Sprintf("uplinks=%d/maps=empty", uplinks)
			if full {
				name = fmt.Sprintf("uplinks=%d/maps=full", uplinks)
			}
			b.Run(name, func(b *testing.B) { benchIdle(b, uplinks, full, idle) })
		}
	}
}

func benchIdle(b *testing.B, uplinks int, full bool, idle time.Duration) {
	policy := ""
	dir := b.TempDir()
	if full {
		file := filepath.Join(dir, "full-table.txt")
		writePrefixFile(b, file, 1_000_000)
		policy = fmt.Sprintf("[[policy]]\nname = \"full-table\"\ndestination_files = [%q]\nuplinks = [\"isp2\"]\n", file)
	}
	e := newEnv(b, uplinks, "", policy)
	e.start()
	flows := 0
	if full {
		flows = e.fillFlows4()
	}
	time.Sleep(2 * time.Second) // the start's passes and first probes behind
	p0, passes0 := e.process(), e.status().Passes
	time.Sleep(idle)
	p1, passes := e.process(), e.status().Passes-passes0
	cpu := float64(p1.cpu-p0.cpu) / float64(idle) * 100
	b.Logf("%d uplinks, %d flows, %s: CPU %.2f%% of a core over %v idle (%d passes), VmRSS %.1f MB, VmHWM %.1f MB",
		uplinks, flows, strings.TrimSpace(daemontest.Lines(e.log.String(), "policy installed")), cpu, idle, passes, float64(p1.rss)/1e6, float64(p1.peak)/1e6)
	if !e.allUp() {
		b.Fatalf("not every uplink up after the idle window:\n%s", e.log.String())
	}
	b.ReportMetric(cpu, "%cpu")
	b.ReportMetric(float64(passes), "passes")
	b.ReportMetric(float64(p1.rss)/1e6, "MB-rss")
	b.ReportMetric(float64(p1.peak)/1e6, "MB-peak")
	if full {
		b.ReportMetric(float64(flows), "flows")
	}
	b.ReportMetric(0, "ns/op")
}

// writePrefixFile writes n distinct IPv4 prefixes (/24 to /32, random in
// 100.64.0.0/10, a fixed seed), one a line, with a comment.
func writePrefixFile(b *testing.B, path string, n int) {
	b.Helper()
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	w := bufio.NewWriter(f)
	fmt.Fprintf(w, "# %d prefixes for the benchmark\n", n)
	rng := rand.New(rand.NewPCG(7, 1))
	seen := make(map[netip.Prefix]bool, n)
	for len(seen) < n {
		a := [4]byte{100, 64 | byte(rng.IntN(64)), byte(rng.IntN(256)), byte(rng.IntN(256))}
		p := netip.PrefixFrom(netip.AddrFrom4(a), 24+rng.IntN(9)).Masked()
		if !seen[p] {
			seen[p] = true
			w.WriteString(p.String())
			w.WriteByte('\n')
		}
	}
	if err := w.Flush(); err != nil {
		b.Fatal(err)
	}
}

// fillFlows4 fills the daemon's IPv4 flow map (through its pins) to its
// capacity with LAN flows of isp1 and isp2, as idle connections would,
// and returns how many it holds then.
func (e *env) fillFlows4() int {
	e.b.Helper()
	m, err := loader.OpenPinned(e.pinDir)
	if err != nil {
		e.b.Fatal(err)
	}
	defer m.Close()
	st := e.status()
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		e.b.Fatal(err)
	}
	now := time.Duration(ts.Nano())
	// Live records: of each uplink's generation now (after a failover the
	// failed one's has moved on, and a record of the old one is retired).
	gens, err := m.FlowGenerations()
	if err != nil {
		e.b.Fatal(err)
	}
	n := int(m.Flows4.MaxEntries())
	start := time.Now()
	for i := 0; i < n; i++ {
		u := st.Uplinks[i%2]
		src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{100, 64, 2, byte(10 + i%200)}), uint16(1024+i/200))
		dst := netip.AddrPortFrom(netip.AddrFrom4([4]byte{203, 0, 113, byte(1 + i%250)}), 443)
		f := maps.Flow{Key: maps.FlowKey{Proto: packet.ProtoTCP, Src: src, Dst: dst}, Uplink: u.ID, Mark: u.Mark, Gen: gens[u.ID], FirstSeen: now, LastSeen: now}
		if err := m.PutFlow(f); err != nil {
			e.b.Fatalf("flow %d of %d: %v", i, n, err)
		}
	}
	held := 0
	if err := m.WalkLANFlows(func(f maps.Flow) bool {
		if f.Key.Src.Addr().Is4() {
			held++
		}
		return true
	}); err != nil {
		e.b.Fatal(err)
	}
	e.b.Logf("flows4: %d puts in %v, %d held (capacity %d)", n, time.Since(start).Round(time.Millisecond), held, n)
	return held
}
