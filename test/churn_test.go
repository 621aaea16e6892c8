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

	"github.com/mhbpf/mhbpf/internal/daemon"
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
			round := i / 256                                                               // even rounds add 256 routes, odd ones delete them
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
