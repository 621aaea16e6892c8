package test

import (
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/daemon"
	"github.com/mhbpf/mhbpf/internal/daemontest"
)

// churn changes routes in the router's namespace as fast as a routing
// daemon with a full table would (bird, FRR: hundreds a second), in tables
// mhbpf does not own (200) and in main, never a default route, until stop
// is closed. It reports the number of changes made.
func (e *daemonEnv) churn(stop <-chan struct{}) *atomic.Int64 {
	e.t.Helper()
	ns, err := netns.GetFromName(e.topo.Router)
	if err != nil {
		e.t.Fatal(err)
	}
	h, err := netlink.NewHandleAt(ns)
	ns.Close()
	if err != nil {
		e.t.Fatal(err)
	}
	eth2, err := h.LinkByName("eth2")
	if err != nil {
		e.t.Fatal(err)
	}
	var n atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer h.Close()
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			if i%2 == 0 { // two changes a tick
				select {
				case <-stop:
					return
				case <-tick.C:
				}
			}
			// 256 routes a round, added, then deleted: in table 200 and main
			table := 200
			if i%2 == 1 {
				table = 254
			}
			// Even rounds add 256 routes, odd ones delete them.
			round := i / 256
			r := &netlink.Route{LinkIndex: eth2.Attrs().Index, Table: table, Protocol: 12, // zebra
				Dst: &net.IPNet{IP: net.IPv4(100, 127, byte(round/2%256), byte(i%256)), Mask: net.CIDRMask(32, 32)}}
			var err error
			if round%2 == 0 {
				err = h.RouteReplace(r)
			} else {
				err = h.RouteDel(r)
			}
			if err == nil {
				n.Add(1)
			}
		}
	}()
	e.t.Cleanup(wg.Wait)
	return &n
}

// cpuTime is the process's user+system time.
func cpuTime(t *testing.T, pid int) time.Duration {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		t.Fatal(err)
	}
	// After the command name in parentheses: state is field 3, utime 14, stime 15.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	ut, _ := strconv.Atoi(f[11])
	st, _ := strconv.Atoi(f[12])
	return time.Duration(ut+st) * 10 * time.Millisecond // USER_HZ 100
}

func (e *daemonEnv) passes() uint64 {
	st, err := daemon.LoadStatus(e.stateDir)
	if err != nil {
		e.t.Fatal(err)
	}
	return st.Passes
}

// A routing daemon changing hundreds of routes a second in tables mhbpf
// does not own neither keeps the reconciler busy nor delays a failover.
// Before: every route event woke a pass, and the debounce waited for 20 ms
// without an event, which under churn never came: no pass ran at all, and
// the failover waited for the churn to pause.
func TestDaemonFailoverUnderRouteChurn(t *testing.T) {
	e := newDaemonEnv(t, "", "")
	e.start()
	// The status of the first pass names the tc mode it attached with
	// (it used to be empty until the second pass).
	if st, err := daemon.LoadStatus(e.stateDir); err != nil || st.TCMode != "tcx" && st.TCMode != "clsact" {
		t.Fatalf("status after the first pass: tc_mode %q, %v", st.TCMode, err)
	}
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })

	stop := make(chan struct{})
	defer close(stop)
	changes := e.churn(stop)
	pid := e.cmd.Process.Pid
	time.Sleep(200 * time.Millisecond) // the churn under way
	passes0, cpu0, start, changes0 := e.passes(), cpuTime(t, pid), time.Now(), changes.Load()
	time.Sleep(3 * time.Second)
	passes, cpu, wall, made := e.passes()-passes0, cpuTime(t, pid)-cpu0, time.Since(start), changes.Load()-changes0
	rate := float64(made) / wall.Seconds()
	t.Logf("churn: %d route changes in %v (%.0f/s); the daemon made %d passes and used %v of CPU", made, wall.Round(time.Millisecond), rate, passes, cpu)
	if rate < 200 {
		t.Fatalf("the churn made only %.0f route changes a second: not the load this test is about", rate)
	}
	// resync_every is 2s: one or two resyncs, nothing for the churn.
	if passes > 4 {
		t.Errorf("%d passes in %v of churn in tables mhbpf does not own; want at most 4 (the resyncs)", passes, wall)
	}
	if cpu > wall/4 {
		t.Errorf("the daemon used %v of CPU in %v of churn", cpu, wall)
	}

	if err := e.topo.IP(e.topo.Router, "link", "set", "ppp0", "down"); err != nil {
		t.Fatal(err)
	}
	took := e.waitFor("main's default route via ppp1 alone, during the churn", 2*time.Second, func() bool { return e.mainVia("ppp1") })
	t.Logf("failover during the churn: main via ppp1 alone %v after ppp0 went down", took)
	// A correctness bound, generous for a loaded CI box; the measurement is the log line.
	if took > time.Second {
		t.Errorf("failover took %v during the churn", took)
	}
}

// fight puts a default route of bird's (via ppp1) in main whenever mhbpf's
// is there, as a routing daemon that owns main's default would, until the
// returned func is called (at the latest when the test ends). It reports
// how many times it did.
func (e *daemonEnv) fight() (*atomic.Int64, func()) {
	e.t.Helper()
	ns, err := netns.GetFromName(e.topo.Router)
	if err != nil {
		e.t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		e.t.Fatal(err)
	}
	ppp1, err := h.LinkByName("ppp1")
	if err != nil {
		e.t.Fatal(err)
	}
	updates := make(chan netlink.RouteUpdate, 1024)
	stop := make(chan struct{})
	var once sync.Once
	end := func() { once.Do(func() { close(stop) }) }
	if err := netlink.RouteSubscribeAt(ns, updates, stop); err != nil {
		e.t.Fatal(err)
	}
	theirs := &netlink.Route{LinkIndex: ppp1.Attrs().Index, Table: 254, Protocol: netlink.RouteProtocol(unix.RTPROT_BIRD),
		Dst: &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}, Gw: net.ParseIP("100.64.1.1").To4()}
	var n atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer h.Close()
		for u := range updates {
			r := u.Route
			if u.Type == unix.RTM_NEWROUTE && r.Table == 254 && r.Protocol == 77 && (r.Dst == nil || r.Dst.IP.IsUnspecified()) {
				if err := h.RouteReplace(theirs); err == nil {
					n.Add(1)
				}
			}
		}
	}()
	e.t.Cleanup(wg.Wait)
	e.t.Cleanup(end) // first: the subscription's end ends the goroutine
	return &n, end
}

// Another routing daemon that keeps replacing main's default route with
// its own: mhbpf repairs it a few times, then logs one conflict naming the
// route that fights it, backs off (no ERROR, no spinning), and has its
// route back once the other gives up.
func TestDaemonBacksOffWhenARepairKeepsBeingUndone(t *testing.T) {
	e := newDaemonEnv(t, "", "")
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	passes0 := e.passes()
	fights, stop := e.fight()
	// The fight starts with the next route event of mhbpf's own main route.
	if err := e.topo.IP(e.topo.Router, "route", "del", "default"); err != nil {
		t.Fatal(err)
	}
	e.waitFor("the conflict reported", 5*time.Second, func() bool {
		return strings.Contains(e.log.String(), "conflict: a repair keeps being undone")
	})
	time.Sleep(5 * time.Second)
	passes := e.passes() - passes0
	stop()
	conflicts := daemontest.Lines(e.log.String(), "conflict: a repair")
	t.Logf("over about 5 s of fighting: %d replacements of mhbpf's route by the other, %d passes\n%s", fights.Load(), passes, conflicts)
	if n := len(strings.Split(strings.TrimSpace(conflicts), "\n")); conflicts == "" || n != 1 || !strings.Contains(conflicts, "proto bird dev ppp1") {
		t.Fatalf("%d conflict lines, want 1 naming proto bird dev ppp1:\n%s", n, conflicts)
	}
	// 3 repairs, then 1 s, 2 s (and 4 s) of backoff: a handful, plus the resyncs.
	if f := fights.Load(); f > 8 || passes > 20 {
		t.Fatalf("%d repairs undone, %d passes in the fight: not backing off", f, passes)
	}
	took := e.waitFor("mhbpf's multipath route back after the fight", 15*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	t.Logf("main's route back %v after the other gave up", took)
}
