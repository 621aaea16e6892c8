package test

// The scenario suite: one test per numbered requirement of docs/scenario.md,
// run on the lab (the same code as 'mhbpf lab'), with real servers that
// report the address they saw. The router masquerades on both ADSL links,
// so that address tells which uplink a connection took; the ISPs drop what
// their customer sends from another ISP's address, so an answer that
// leaves by the wrong uplink is lost.

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mhbpf/mhbpf/internal/daemontest"
	"github.com/mhbpf/mhbpf/internal/lab"
	"github.com/mhbpf/mhbpf/internal/testutil"
	"github.com/mhbpf/mhbpf/internal/topology"
)

func startLab(t *testing.T) (*lab.Lab, *daemontest.Log) {
	t.Helper()
	testutil.RequireRoot(t)
	log := &daemontest.Log{}
	l, err := lab.Start(daemontest.Binary(t), log)
	if err != nil {
		t.Fatalf("lab: %v\ndaemon log:\n%s", err, log.String())
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("daemon log:\n%s", log.String())
		}
		l.Close()
	})
	return l, log
}

// uplinkOf names the uplink whose address a server saw.
func uplinkOf(a netip.Addr) string {
	switch a {
	case topology.ISP1Local:
		return "isp1"
	case topology.ISP2Local:
		return "isp2"
	}
	return "?" + a.String()
}

func host(i int) netip.Addr {
	b := topology.Hosts.Addr().As4()
	return netip.AddrFrom4([4]byte{b[0], b[1], byte(i >> 8), byte(i)})
}

// via connects from ns (inside the lab's cgroup when ns is the router) and
// returns the uplink the server saw.
func via(l *lab.Lab, ns string, dst netip.Addr, port uint16) (string, error) {
	cg := ""
	if ns == l.Router {
		cg = l.Cgroup
	}
	got, err := l.Dial(ns, cg, dst, port)
	if err != nil {
		return "", err
	}
	_, peer := lab.Answer(got)
	return uplinkOf(peer), nil
}

func waitUplinks(t *testing.T, l *lab.Lab, want map[string]bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		st, err := l.Status()
		ok := err == nil
		for _, u := range st.Uplinks {
			if w, listed := want[u.Name]; listed && w != u.Usable {
				ok = false
			}
		}
		if ok {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	st, _ := l.Status()
	t.Fatalf("uplinks not %v: %+v", want, st.Uplinks)
}

func TestScenario(t *testing.T) {
	l, log := startLab(t)
	defer func() {
		// Links went and came all along: the daemon handled it without
		// a single error.
		daemontest.CheckNoErrors(t, log.String())
	}()

	// 1. The server itself and every LAN host reach the internet whenever
	// at least one ADSL link is up.
	t.Run("1-one-link-is-enough", func(t *testing.T) {
		for _, down := range []int{2, 1} {
			up := 3 - down
			if err := l.UplinkDown(down); err != nil {
				t.Fatal(err)
			}
			waitUplinks(t, l, map[string]bool{fmt.Sprintf("isp%d", down): false})
			for i, ns := range []string{l.LAN, l.Router} {
				got, err := via(l, ns, host(100*down+i), 80)
				if err != nil || got != fmt.Sprintf("isp%d", up) {
					t.Fatalf("isp%d down, from %s: %q, %v", down, ns, got, err)
				}
			}
			if err := l.UplinkUp(down); err != nil {
				t.Fatal(err)
			}
			waitUplinks(t, l, map[string]bool{"isp1": true, "isp2": true})
		}
	})

	// 2. Balanced 8:2 over many destinations; a connection keeps its
	// uplink; a destination keeps its uplink.
	t.Run("2-balance-and-stickiness", func(t *testing.T) {
		// A long connection first: it must stay where it is while a
		// thousand others are made.
		stream := startStream(t, l, host(1500))
		// A thousand connections at once saturate the 2 Mbit/s line: a
		// lost SYN there is no routing error, so each destination gets
		// three tries (the same destination: the same choice).
		tally := dialMany(t, l, 2000, 1000, 80, 3)
		share := float64(tally["isp1"]) / 1000 * 100
		t.Logf("1000 destinations: isp1 %d, isp2 %d (%.1f%%), %d needed a second try", tally["isp1"], tally["isp2"], share, tally["retried"])
		// The same ±3 points as the datapath's own split tests (bpf/): the
		// choice is a hash of each destination, nothing random.
		if tally["isp1"]+tally["isp2"] != 1000 || share < 77 || share > 83 {
			t.Fatalf("split %v, want 80%% ± 3 on isp1", tally)
		}
		stream.check(t)
		first, err := via(l, l.LAN, host(2000), 80)
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 10; i++ {
			if got, err := via(l, l.LAN, host(2000), 80); err != nil || got != first {
				t.Fatalf("connection %d to one destination went by %q (%v), the first by %s", i, got, err, first)
			}
		}
	})

	// 3. The VPN's own packets go over isp1, over isp2 when isp1 is down;
	// tun0 carries traffic again after the switch.
	t.Run("3-vpn-over-adsl", func(t *testing.T) {
		pingCompany := func() error {
			return l.Exec(l.LAN, "ping", "-c1", "-W1", topology.CompanyHost.String()).Run()
		}
		if err := retry(5*time.Second, pingCompany); err != nil {
			t.Fatalf("no ping through the VPN: %v\n%s", err, l.VPNLog())
		}
		// Counted where the packets arrive, at each provider (a packet
		// that left by isp2 with isp1's address would be dropped by isp2
		// and never reach the internet's counters), from here on, with
		// both links up (and isp1 down and back in the first test).
		countVPNAtISPs(t, l)
		for i := 0; i < 5; i++ {
			if err := pingCompany(); err != nil {
				t.Fatalf("ping %d through the VPN with both links up: %v\n%s", i, err, l.VPNLog())
			}
		}
		if by1, by2 := vpnAtISP(t, l, l.ISP1), vpnAtISP(t, l, l.ISP2); by1 < 5 || by2 != 0 {
			t.Fatalf("VPN packets with both links up: %d reached isp1, %d reached isp2; want all (at least the 5 pings) by isp1, none by isp2", by1, by2)
		}
		if l.Counter("vpn-isp1") <= 0 {
			t.Fatalf("VPN packets by isp1: %d, by isp2: %d; want them by isp1", l.Counter("vpn-isp1"), l.Counter("vpn-isp2"))
		}
		before2 := l.Counter("vpn-isp2")
		if err := l.UplinkDown(1); err != nil {
			t.Fatal(err)
		}
		defer func() {
			_ = l.UplinkUp(1)
			waitUplinks(t, l, map[string]bool{"isp1": true})
		}()
		if err := retry(20*time.Second, pingCompany); err != nil {
			t.Fatalf("VPN not back over isp2: %v\n%s", err, l.VPNLog())
		}
		if l.Counter("vpn-isp2") <= before2 || vpnAtISP(t, l, l.ISP2) == 0 {
			t.Fatalf("VPN packets by isp2 did not grow (%d at the internet, %d at isp2)", l.Counter("vpn-isp2"), vpnAtISP(t, l, l.ISP2))
		}
		got, err := l.Dial(l.LAN, "", topology.CompanyHost, 80)
		if name, _ := lab.Answer(got); err != nil || name != "company" {
			t.Fatalf("company web through tun0 after the switch: %q, %v", got, err)
		}
	})

	// 4. Mail leaves by isp1 only, and fails closed without it.
	t.Run("4-smtp-by-isp1-only", func(t *testing.T) {
		for _, ns := range []string{l.LAN, l.Router} {
			got, err := via(l, ns, topology.SMTPServer, 25)
			if err != nil || got != "isp1" {
				t.Fatalf("SMTP from %s: %q, %v", ns, got, err)
			}
		}
		if err := l.UplinkDown(1); err != nil {
			t.Fatal(err)
		}
		defer func() {
			_ = l.UplinkUp(1)
			waitUplinks(t, l, map[string]bool{"isp1": true})
		}()
		waitUplinks(t, l, map[string]bool{"isp1": false})
		for _, ns := range []string{l.LAN, l.Router} {
			if got, err := via(l, ns, topology.SMTPServer, 25); err == nil {
				t.Fatalf("SMTP from %s with isp1 down went by %s", ns, got)
			}
		}
		if n := l.Counter("smtp-isp2"); n != 0 {
			t.Fatalf("%d SMTP packets leaked by isp2", n)
		}
	})

	// 5. isp2's panel is reached by isp2 only, whatever the balance says.
	t.Run("5-panel-by-isp2", func(t *testing.T) {
		for i := 0; i < 20; i++ {
			for _, ns := range []string{l.LAN, l.Router} {
				got, err := l.Dial(ns, cgroupFor(l, ns), topology.ISP2Panel, 80)
				name, peer := lab.Answer(got)
				if err != nil || name != "panel" || peer != topology.ISP2Local {
					t.Fatalf("panel from %s, try %d: %q, %v", ns, i, got, err)
				}
			}
		}
	})

	// 6. A connection is answered from the interface it came in on: a
	// visitor from isp2's network to the web server on isp1's address,
	// TCP and ICMP, and the same through the port forward to the LAN.
	t.Run("6-answer-by-arrival-uplink", func(t *testing.T) {
		visitor := func(port uint16) (string, error) {
			return l.Socat(l.ISP2, "", "", fmt.Sprintf("TCP4:%s:%d,bind=%s,connect-timeout=2", topology.ISP1Local, port, topology.ISP2Visitor))
		}
		got, err := visitor(80)
		if name, peer := lab.Answer(got); err != nil || name != "routerweb" || peer != topology.ISP2Visitor {
			t.Fatalf("web on isp1's address: %q, %v", got, err)
		}
		if out, err := l.Exec(l.ISP2, "ping", "-c2", "-W2", "-I", topology.ISP2Visitor.String(), topology.ISP1Local.String()).CombinedOutput(); err != nil {
			t.Fatalf("ping isp1's address from isp2's network: %v\n%s", err, out)
		}
		got, err = visitor(8080)
		if name, peer := lab.Answer(got); err != nil || name != "lanweb" || peer != topology.ISP2Visitor {
			t.Fatalf("port forward to the LAN: %q, %v", got, err)
		}
	})

	// 7. isp1 goes: new connections go by isp2 within a second; a long
	// stream on isp2 does not notice isp1 flapping; isp1 comes back: new
	// connections use it again.
	t.Run("7-failover-and-recovery", func(t *testing.T) {
		var onISP2 netip.Addr
		for i := 3000; i < 3100; i++ {
			if got, err := via(l, l.LAN, host(i), 80); err == nil && got == "isp2" {
				onISP2 = host(i)
				break
			}
		}
		if !onISP2.IsValid() {
			t.Fatal("no destination on isp2 among 100")
		}
		stream := startStream(t, l, onISP2)

		// Within a second of isp1 going, the daemon has taken it out;
		// from then on every new connection, at its first try, goes by
		// isp2. (A connection by isp2 alone would prove nothing: a fifth
		// of the destinations choose it anyway.)
		down := time.Now()
		if err := l.UplinkDown(1); err != nil {
			t.Fatal(err)
		}
		for {
			st, err := l.Status()
			if err == nil && len(st.Uplinks) > 0 && st.Uplinks[0].Name == "isp1" && !st.Uplinks[0].Usable {
				t.Logf("isp1 out of use %v after it went", time.Since(down).Round(time.Millisecond))
				break
			}
			if time.Since(down) > time.Second {
				t.Fatalf("isp1 still in use a second after it went: %+v, %v", st.Uplinks, err)
			}
			time.Sleep(10 * time.Millisecond)
		}
		next := 4000
		tally := dialMany(t, l, next, 50, 80, 1)
		if tally["isp2"] != 50 {
			t.Fatalf("after isp1 went: %v, want all 50 by isp2 at the first try", tally)
		}
		next += 50

		for i := 0; i < 5; i++ {
			if err := l.UplinkUp(1); err != nil {
				t.Fatal(err)
			}
			time.Sleep(300 * time.Millisecond)
			if err := l.UplinkDown(1); err != nil {
				t.Fatal(err)
			}
			time.Sleep(300 * time.Millisecond)
		}
		stream.check(t)

		if err := l.UplinkUp(1); err != nil {
			t.Fatal(err)
		}
		waitUplinks(t, l, map[string]bool{"isp1": true})
		tally = dialMany(t, l, next, 100, 80, 1)
		if tally["isp1"] < 50 || tally["isp1"]+tally["isp2"] != 100 {
			t.Fatalf("isp1 back, but new connections: %v", tally)
		}
		stream.check(t)
	})
}

// countVPNAtISPs counts, in each provider's namespace, the packets to the
// VPN server that arrive from the router, before anything there may drop
// them.
func countVPNAtISPs(t *testing.T, l *lab.Lab) {
	t.Helper()
	for _, ns := range []string{l.ISP1, l.ISP2} {
		cmd := l.Exec(ns, "nft", "-f", "-")
		cmd.Stdin = strings.NewReader(fmt.Sprintf(`table inet mhbpftest-vpn {
	chain pre {
		type filter hook prerouting priority -500; policy accept;
		iifname "cust" ip daddr %s udp dport 1194 counter
	}
}
`, topology.VPNServer))
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("nft in %s: %v\n%s", ns, err, out)
		}
	}
}

// vpnAtISP is how many packets to the VPN server reached provider ns from
// the router since countVPNAtISPs.
func vpnAtISP(t *testing.T, l *lab.Lab, ns string) int {
	t.Helper()
	n, err := l.NFTCounter(ns, "inet", "mhbpftest-vpn", "pre")
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func cgroupFor(l *lab.Lab, ns string) string {
	if ns == l.Router {
		return l.Cgroup
	}
	return ""
}

func retry(limit time.Duration, f func() error) error {
	var err error
	for start := time.Now(); time.Since(start) < limit; time.Sleep(200 * time.Millisecond) {
		if err = f(); err == nil {
			return nil
		}
	}
	return err
}

// stream is a long download from the internet to the LAN.
type stream struct {
	cmd  *exec.Cmd
	file string
	last int64
	done chan error
}

func startStream(t *testing.T, l *lab.Lab, dst netip.Addr) *stream {
	t.Helper()
	f := filepath.Join(t.TempDir(), "stream")
	s := &stream{file: f, done: make(chan error, 1)}
	s.cmd = l.Exec(l.LAN, "socat", "-u", fmt.Sprintf("TCP4:%s:9000", dst), "CREATE:"+f)
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.done <- s.cmd.Wait() }()
	t.Cleanup(func() { _ = s.cmd.Process.Kill() })
	time.Sleep(500 * time.Millisecond)
	s.check(t)
	return s
}

// check: the stream is alive and has grown since the last check.
func (s *stream) check(t *testing.T) {
	t.Helper()
	select {
	case err := <-s.done:
		t.Fatalf("the long stream ended: %v", err)
	default:
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		fi, err := os.Stat(s.file)
		if err == nil && fi.Size() > s.last {
			s.last = fi.Size()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the long stream stalled at %d bytes", s.last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// dialMany connects from the LAN to n distinct hosts from host(first) on,
// many at once, each up to tries times, and counts the uplinks the servers
// saw ("error": no answer in any try; "retried": answered after the first
// try, counted also under its uplink). The client is this test binary, run
// inside the LAN namespace.
func dialMany(t *testing.T, l *lab.Lab, first, n int, port uint16, tries int) map[string]int {
	t.Helper()
	exe, _ := os.Executable()
	cmd := l.Exec(l.LAN, exe) // TestMain runs helperDialMany
	cmd.Env = append(os.Environ(), fmt.Sprintf("MHBPF_DIAL_MANY=%d,%d,%d,%d", first, n, port, tries))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("dial many: %v\n%s", err, out)
	}
	i := strings.Index(string(out), "tally: ")
	if i < 0 {
		t.Fatalf("dial many: no tally\n%s", out)
	}
	var tally map[string]int
	if err := json.Unmarshal([]byte(strings.SplitN(string(out)[i+7:], "\n", 2)[0]), &tally); err != nil {
		t.Fatal(err)
	}
	return tally
}

// helperDialMany is the client of dialMany: TestMain runs it instead of
// the tests when MHBPF_DIAL_MANY is set (so it is no test that skips).
func helperDialMany(spec string) int {
	var first, n, tries int
	var port uint16
	fmt.Sscanf(spec, "%d,%d,%d,%d", &first, &n, &port, &tries)
	var mu sync.Mutex
	tally := map[string]int{}
	sem := make(chan struct{}, 8)
	var wg sync.WaitGroup
	for i := first; i < first+n; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func(dst netip.Addr) {
			defer wg.Done()
			defer func() { <-sem }()
			key, try := "error", 0
			for ; try < tries && key == "error"; try++ {
				c, err := net.DialTimeout("tcp4", netip.AddrPortFrom(dst, port).String(), 3*time.Second)
				if err != nil {
					continue
				}
				_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
				b, _ := io.ReadAll(c)
				c.Close()
				if name, peer := lab.Answer(string(b)); name == "web" {
					key = uplinkOf(peer)
				}
			}
			mu.Lock()
			tally[key]++
			if key != "error" && try > 1 {
				tally["retried"]++
			}
			mu.Unlock()
		}(host(i))
	}
	wg.Wait()
	b, _ := json.Marshal(tally)
	fmt.Printf("tally: %s\n", b)
	return 0
}

// The README's first command: the demo shows the failover and the recovery,
// ends by itself and leaves nothing behind.
func TestLabCommand(t *testing.T) {
	testutil.RequireRoot(t)
	out, err := exec.Command(daemontest.Binary(t), "lab", "--duration", "9s").CombinedOutput()
	text := string(out)
	if err != nil {
		t.Fatalf("mhbpf lab: %v\n%s", err, text)
	}
	for _, want := range []string{"=== both ADSL links up", "=== isp1 DOWN", "interface ppp0 absent", "=== isp1 BACK", "done; removing the lab"} {
		if !strings.Contains(text, want) {
			t.Fatalf("lab output lacks %q:\n%s", want, text)
		}
	}
	// The shaped lines show in the view: with both up, isp1 (8 Mbit/s)
	// carries more than isp2 (2 Mbit/s).
	down := viewDownMbits(t, text, "=== both ADSL links up", "=== isp1 DOWN")
	t.Logf("Mbit/s down while both were up: %v", down)
	if len(down["isp1"]) == 0 || len(down["isp2"]) == 0 {
		t.Fatalf("no live view of both uplinks up:\n%s", text)
	}
	if s1, s2 := sum(down["isp1"]), sum(down["isp2"]); s1 <= s2 {
		t.Fatalf("with both up, isp1 carried %.2f Mbit, isp2 %.2f: want more by isp1\n%s", s1, s2, text)
	}
	// IPv6 downloads run too, by the uplinks that are up: some while both
	// are, none on isp1 while it is out, and new ones on isp2 from then
	// on (one stuck on isp1 when it went ends within 3 s).
	if v6 := viewIPv6Flows(text, "=== both ADSL links up", "=== isp1 DOWN"); v6["isp1"]+v6["isp2"] == 0 {
		t.Fatalf("no IPv6 flows in the view while both uplinks were up:\n%s", text)
	}
	if v6 := viewIPv6Flows(text, "=== isp1 DOWN", "=== isp1 BACK"); v6["isp1"] != 0 {
		t.Fatalf("IPv6 flows on isp1 while it was out: %v\n%s", v6, text)
	}
	if v6 := viewIPv6Flows(text, "=== isp1 DOWN", "done; removing the lab"); v6["isp2"] == 0 {
		t.Fatalf("no IPv6 flows on isp2 after isp1 went: %v\n%s", v6, text)
	}
	var router string
	for _, line := range strings.Split(text, "\n") {
		if f := strings.Fields(line); len(f) > 2 && f[0] == "namespaces:" {
			router = strings.TrimSuffix(f[2], ",")
		}
	}
	prefix := strings.TrimSuffix(router, "-rt")
	if prefix == "" {
		t.Fatalf("no namespace names in the output:\n%s", text)
	}
	if ns, _ := exec.Command("ip", "netns", "list").CombinedOutput(); strings.Contains(string(ns), prefix) {
		t.Fatalf("lab namespaces left behind:\n%s", ns)
	}
}

// viewDownMbits reads the DOWN Mbit/s column of the lab's view between two
// phase headings, per uplink in state up, after the view's first second
// (its t=0 row counts from the daemon's start).
func viewDownMbits(t *testing.T, text, from, to string) map[string][]float64 {
	t.Helper()
	_, text, _ = strings.Cut(text, from)
	text, _, _ = strings.Cut(text, to)
	down := map[string][]float64{}
	first := true
	for _, line := range strings.Split(text, "\n") {
		f := strings.Fields(line)
		if len(f) > 0 && strings.HasPrefix(f[0], "t=") {
			first = f[0] == "t=" && len(f) > 1 && f[1] == "0s" || f[0] == "t=0s"
			continue
		}
		if first || len(f) < 4 || f[2] != "up" || (f[0] != "isp1" && f[0] != "isp2") {
			continue
		}
		v, err := strconv.ParseFloat(f[3], 64)
		if err != nil {
			t.Fatalf("view line %q: %v", line, err)
		}
		down[f[0]] = append(down[f[0]], v)
	}
	return down
}

// viewIPv6Flows adds up the IPv6 column of the lab's view between two
// phase headings, per uplink, after the first frame of the phase (the one
// that shows the change happen).
func viewIPv6Flows(text, from, to string) map[string]int {
	_, text, _ = strings.Cut(text, from)
	text, _, _ = strings.Cut(text, to)
	v6 := map[string]int{}
	frames := 0
	for _, line := range strings.Split(text, "\n") {
		f := strings.Fields(line)
		if len(f) > 0 && strings.HasPrefix(f[0], "t=") {
			frames++
			continue
		}
		if frames < 2 || len(f) < 7 || (f[0] != "isp1" && f[0] != "isp2") {
			continue
		}
		n, _ := strconv.Atoi(f[6])
		v6[f[0]] += n
	}
	return v6
}

func sum(xs []float64) float64 {
	var s float64
	for _, x := range xs {
		s += x
	}
	return s
}

// Ctrl-C in the middle of the demo removes everything too.
func TestLabInterrupted(t *testing.T) {
	testutil.RequireRoot(t)
	cmd := exec.Command(daemontest.Binary(t), "lab", "--duration", "60s")
	out := &daemontest.Log{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(out.String(), "t= 2s") {
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			t.Fatalf("the demo did not start:\n%s", out.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("mhbpf lab after Ctrl-C: %v\n%s", err, out.String())
		}
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatalf("mhbpf lab did not end after Ctrl-C:\n%s", out.String())
	}
	if !strings.Contains(out.String(), "interrupted; removing the lab") {
		t.Fatalf("no word of the interruption:\n%s", out.String())
	}
	var router string
	for _, line := range strings.Split(out.String(), "\n") {
		if f := strings.Fields(line); len(f) > 2 && f[0] == "namespaces:" {
			router = strings.TrimSuffix(f[2], ",")
		}
	}
	if ns, _ := exec.Command("ip", "netns", "list").CombinedOutput(); router == "" || strings.Contains(string(ns), strings.TrimSuffix(router, "-rt")) {
		t.Fatalf("namespaces left after Ctrl-C (router %q):\n%s", router, ns)
	}
	if pins, _ := os.ReadDir("/sys/fs/bpf"); len(pins) > 0 {
		for _, p := range pins {
			if strings.HasPrefix(p.Name(), "mhbpf-mhbpf-lab-") {
				t.Fatalf("pins left after Ctrl-C: %s", p.Name())
			}
		}
	}
}
