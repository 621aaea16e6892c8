package test

// The metrics endpoint by value: what the test sends through each uplink
// shows in that uplink's counters, the flows it opens in new_flows, the
// probes' round trip in the RTT and their losses in the loss ratio.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mhbpf/mhbpf/internal/daemontest"
	"github.com/mhbpf/mhbpf/internal/testutil"
	"github.com/mhbpf/mhbpf/internal/topology"
)

const metricsListen = "127.0.0.1:9477"

// withMetrics puts metrics_listen into [global] of the configuration.
func (e *daemonEnv) withMetrics() {
	e.t.Helper()
	cfg, err := os.ReadFile(e.cfgPath)
	if err != nil {
		e.t.Fatal(err)
	}
	e.writeConfig(strings.Replace(string(cfg), "[global]\n", fmt.Sprintf("[global]\nmetrics_listen = %q\n", metricsListen), 1))
}

// metricsText is one scrape of the daemon's endpoint (in the router's
// namespace), headers and all.
func (e *daemonEnv) metricsText() string {
	cmd := e.inRouter("sh", "-c", `printf 'GET /metrics HTTP/1.0\r\n\r\n' | socat -T2 - TCP:`+metricsListen)
	b, _ := cmd.CombinedOutput()
	return string(b)
}

// metrics is one scrape as sample → value, a sample named as exposed
// (mhbpf_uplink_tx_bytes_total{uplink="isp1"}).
func (e *daemonEnv) metrics() map[string]float64 {
	e.t.Helper()
	text := e.metricsText()
	_, body, ok := strings.Cut(text, "\r\n\r\n")
	if !ok {
		e.t.Fatalf("metrics: no HTTP answer:\n%s", text)
	}
	m := map[string]float64{}
	for _, line := range strings.Split(body, "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if i < 0 || err != nil {
			e.t.Fatalf("metrics: bad sample %q", line)
		}
		m[line[:i]] = v
	}
	return m
}

// sample is the value of name{uplink="uplink"}; a missing sample fails.
func sample(t *testing.T, m map[string]float64, name, uplink string) float64 {
	t.Helper()
	k := fmt.Sprintf("%s{uplink=%q}", name, uplink)
	if name == "mhbpf_uplink_up" {
		k = fmt.Sprintf("%s{interface=%q,uplink=%q}", name, map[string]string{"isp1": "ppp0", "isp2": "ppp1"}[uplink], uplink)
	}
	v, ok := m[k]
	if !ok {
		t.Fatalf("no sample %s in the metrics: %v", k, m)
	}
	return v
}

// serveUDPEchoBoth starts, in each ISP, a UDP server on the internet
// address that sends every datagram back as it came (sockets of this
// process: socat's forking server loses answers).
func serveUDPEchoBoth(t *testing.T, e *daemonEnv, port uint16) {
	t.Helper()
	for _, ns := range []string{e.topo.ISP1, e.topo.ISP2} {
		var pc net.PacketConn
		var err error
		testutil.InNetNS(t, ns, func() {
			pc, err = net.ListenPacket("udp4", netip.AddrPortFrom(topology.Internet, port).String())
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pc.Close() })
		go func() {
			b := make([]byte, 2048)
			for {
				n, from, err := pc.ReadFrom(b)
				if err != nil {
					return // closed
				}
				_, _ = pc.WriteTo(b[:n], from)
			}
		}()
	}
}

// udpTraffic is what sendUDP sent and got back.
type udpTraffic struct {
	sent, answered int // datagrams
	payload        int // bytes of each
}

// IP bytes: the counters count what the programs see, the IP packet and,
// on Ethernet, its 14-byte header: within 2% at this payload.
func (u udpTraffic) sentBytes() float64     { return float64(u.sent * (u.payload + 28)) }
func (u udpTraffic) answeredBytes() float64 { return float64(u.answered * (u.payload + 28)) }

// sendUDP sends n datagrams of payload bytes from the LAN host, from one
// connected socket per flow, to the internet address's port, in windows
// of 50, and counts the echoes.
func sendUDP(t *testing.T, e *daemonEnv, port uint16, flows, n, payload int) udpTraffic {
	t.Helper()
	conns := make([]net.Conn, flows)
	for i := range conns {
		var err error
		testutil.InNetNS(t, e.topo.LAN, func() {
			conns[i], err = net.Dial("udp4", netip.AddrPortFrom(topology.Internet, port).String())
		})
		if err != nil {
			t.Fatal(err)
		}
		defer conns[i].Close()
	}
	out := udpTraffic{payload: payload}
	msg := bytes.Repeat([]byte{'x'}, payload)
	buf := make([]byte, 2048)
	for out.sent < n {
		c := conns[(out.sent/50)%flows]
		window := min(50, n-out.sent)
		for i := 0; i < window; i++ {
			if _, err := c.Write(msg); err != nil {
				t.Fatal(err)
			}
			out.sent++
		}
		for i := 0; i < window; i++ {
			_ = c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
			if k, err := c.Read(buf); err != nil {
				break
			} else if k == payload {
				out.answered++
			}
		}
	}
	return out
}

func within10(got, want float64) bool { return got >= 0.9*want && got <= 1.1*want }

// Bytes and packets per uplink within 10% of what went through each, new
// flows exactly, the probe RTT above 0 and below the timeout, the loss
// ratio 0 while every probe is answered and above 0 once they are dropped,
// and the uplink's state following.
func TestMetricsValues(t *testing.T) {
	const probe = "198.51.100.53"
	e := newDaemonEnv(t, probeConfig([]string{probe}, 100*time.Millisecond, 80*time.Millisecond, 3, 2), `
[[policy]]
name = "udp-isp1"
protocol = "udp"
ports = [9301]
uplinks = ["isp1"]
last_resort = "unreachable"

[[policy]]
name = "udp-isp2"
protocol = "udp"
ports = [9302]
uplinks = ["isp2"]
last_resort = "unreachable"
`)
	e.withMetrics()
	if err := e.topo.IP(e.topo.ISP1, "addr", "add", probe+"/32", "dev", "lo"); err != nil {
		t.Fatal(err)
	}
	serveUDPEchoBoth(t, e, 9301)
	serveUDPEchoBoth(t, e, 9302)
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	// The first round goes out before the pass that installs isp1's table
	// and is lost (unreachable): wait until it has left the ratio's window
	// of 20 rounds.
	e.waitFor("the start's lost probe out of the loss window", 3*time.Second, func() bool {
		return sample(t, e.metrics(), "mhbpf_uplink_probe_loss_ratio", "isp1") == 0
	})

	before := e.metrics()
	isp1 := sendUDP(t, e, 9301, 3, 1000, 1000)
	isp2 := sendUDP(t, e, 9302, 2, 400, 1000)
	after := e.metrics()
	t.Logf("sent by isp1 %d (%d answered), by isp2 %d (%d answered)", isp1.sent, isp1.answered, isp2.sent, isp2.answered)
	if isp1.answered < isp1.sent*9/10 || isp2.answered < isp2.sent*9/10 {
		t.Fatalf("the echo servers answered too little to compare: %+v %+v", isp1, isp2)
	}
	delta := func(name, uplink string) float64 {
		return sample(t, after, name, uplink) - sample(t, before, name, uplink)
	}
	for _, c := range []struct {
		uplink  string
		traffic udpTraffic
		flows   float64
	}{{"isp1", isp1, 3}, {"isp2", isp2, 2}} {
		for _, m := range []struct {
			name string
			want float64
		}{
			{"mhbpf_uplink_tx_packets_total", float64(c.traffic.sent)},
			{"mhbpf_uplink_tx_bytes_total", c.traffic.sentBytes()},
			{"mhbpf_uplink_rx_packets_total", float64(c.traffic.answered)},
			{"mhbpf_uplink_rx_bytes_total", c.traffic.answeredBytes()},
		} {
			got := delta(m.name, c.uplink)
			t.Logf("%s{uplink=%q}: %.0f, sent %.0f", m.name, c.uplink, got, m.want)
			if !within10(got, m.want) {
				t.Errorf("%s{uplink=%q} grew by %.0f, the test sent %.0f through it (±10%%)", m.name, c.uplink, got, m.want)
			}
		}
		// Each connected socket is one flow; the probes are the
		// daemon's own sockets, outside the hooked cgroup.
		if got := delta("mhbpf_uplink_new_flows_total", c.uplink); got != c.flows {
			t.Errorf("mhbpf_uplink_new_flows_total{uplink=%q} grew by %.0f, the test opened %.0f flows", c.uplink, got, c.flows)
		}
	}

	// Probes: an answered probe took more than nothing and less than the
	// timeout (an answer after it is a loss). (No netem in CI's kernel to
	// add a known delay.) Every probe answered.
	rtt := time.Duration(sample(t, after, "mhbpf_uplink_probe_rtt_seconds", "isp1") * float64(time.Second))
	t.Logf("probe RTT %v", rtt)
	if rtt <= 0 || rtt >= 80*time.Millisecond {
		t.Errorf("mhbpf_uplink_probe_rtt_seconds{uplink=\"isp1\"} = %v, want more than 0 and less than the 80ms timeout", rtt)
	}
	if l := sample(t, after, "mhbpf_uplink_probe_loss_ratio", "isp1"); l != 0 {
		t.Errorf("mhbpf_uplink_probe_loss_ratio{uplink=\"isp1\"} = %g with every probe answered, want 0", l)
	}
	if u := sample(t, after, "mhbpf_uplink_up", "isp1"); u != 1 {
		t.Errorf("mhbpf_uplink_up{uplink=\"isp1\"} = %g, want 1", u)
	}

	// The target stops answering: losses show, and the uplink goes out.
	e.deafTarget(e.topo.ISP1, probe, true)
	var m map[string]float64
	e.waitFor("probe losses and isp1 down in the metrics", 3*time.Second, func() bool {
		m = e.metrics()
		return sample(t, m, "mhbpf_uplink_probe_loss_ratio", "isp1") > 0 && sample(t, m, "mhbpf_uplink_up", "isp1") == 0
	})
	t.Logf("after the target went deaf: loss %g, up %g", sample(t, m, "mhbpf_uplink_probe_loss_ratio", "isp1"), sample(t, m, "mhbpf_uplink_up", "isp1"))
	if u := sample(t, m, "mhbpf_uplink_up", "isp2"); u != 1 {
		t.Errorf("mhbpf_uplink_up{uplink=\"isp2\"} = %g with isp2 untouched, want 1", u)
	}
	e.deafTarget(e.topo.ISP1, probe, false)
	e.waitFor("isp1 up again in the metrics", 3*time.Second, func() bool {
		m = e.metrics()
		return sample(t, m, "mhbpf_uplink_up", "isp1") == 1
	})
	// Out and back in: two changes of isp1, none of isp2.
	changes := func(u string) float64 {
		return sample(t, m, "mhbpf_uplink_state_changes_total", u) - sample(t, before, "mhbpf_uplink_state_changes_total", u)
	}
	if c1, c2 := changes("isp1"), changes("isp2"); c1 != 2 || c2 != 0 {
		t.Errorf("state changes: isp1 %g, isp2 %g; want 2 and 0 (out and back in)", c1, c2)
	}
}

// The daemon's memory in the metrics and in 'mhbpf status': its resident
// memory as the kernel accounts it (VmRSS of the daemon's process, read
// here right after the scrape; the two differ by what the daemon touched
// in between), and the policy's kernel memory as the install logged it.
func TestMetricsMemory(t *testing.T) {
	e := newDaemonEnv(t, "", `
[[policy]]
name = "listed"
destinations = ["198.51.100.0/24", "203.0.113.0/25", "2001:db8:ff::/48"]
uplinks = ["isp2"]
`)
	e.withMetrics()
	e.start()
	e.waitFor("multipath", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })
	m := e.metrics()
	proc, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", e.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	var vmRSS float64
	for _, line := range strings.Split(string(proc), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseFloat(strings.Fields(v)[0], 64)
			vmRSS = kb * 1024
		}
	}
	rss, peak := m["mhbpf_daemon_resident_bytes"], m["mhbpf_daemon_resident_peak_bytes"]
	t.Logf("metrics: resident %.0f, peak %.0f; /proc: VmRSS %.0f", rss, peak, vmRSS)
	if rss < vmRSS*0.75 || rss > vmRSS*1.25 || peak < rss {
		t.Errorf("mhbpf_daemon_resident_bytes %.0f, peak %.0f; the daemon's VmRSS is %.0f (want within 25%%, peak at least resident)", rss, peak, vmRSS)
	}
	logged := daemontest.Lines(e.log.String(), "policy installed")
	i := strings.Index(logged, "kernel_bytes=")
	if i < 0 {
		t.Fatalf("no kernel_bytes in the policy's log line:\n%s", logged)
	}
	want, err := strconv.ParseFloat(strings.Fields(logged[i+len("kernel_bytes="):])[0], 64)
	if err != nil || want <= 0 {
		t.Fatalf("kernel_bytes in %q: %v", logged, err)
	}
	if got := m["mhbpf_policy_kernel_bytes"]; got != want {
		t.Errorf("mhbpf_policy_kernel_bytes %.0f, the install logged kernel_bytes=%.0f", got, want)
	}

	out, err := e.mhbpf("status", "--json")
	if err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	var st struct {
		Resident uint64 `json:"resident_bytes"`
		Peak     uint64 `json:"peak_resident_bytes"`
		Policy   uint64 `json:"policy_kernel_bytes"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	if float64(st.Policy) != want || st.Resident == 0 || st.Peak < st.Resident {
		t.Errorf("status --json: resident %d, peak %d, policy %d; want policy %.0f, peak at least resident > 0", st.Resident, st.Peak, st.Policy, want)
	}
	text, _ := e.mhbpf("status")
	// The figures' formatting is cmd/mhbpf's unit test's; here: the line is there.
	if !regexp.MustCompile(`memory: daemon [0-9.]+ [kMG]?B resident \(peak [0-9.]+ [kMG]?B\), policy [0-9.]+ [kMG]?B in the kernel`).MatchString(text) {
		t.Errorf("text status without the memory line:\n%s", text)
	}
}
