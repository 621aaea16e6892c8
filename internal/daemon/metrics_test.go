package daemon

import (
	"errors"
	"io"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/mhbpf/mhbpf/internal/maps"
)

type fakeCounters map[int]maps.Counters

func (f fakeCounters) UplinkCounters(id int) (maps.Counters, error) {
	c, ok := f[id]
	if !ok {
		return maps.Counters{}, errors.New("no such slot")
	}
	return c, nil
}

func scrape(t *testing.T, c *collector) string {
	t.Helper()
	h, err := c.handler()
	if err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	b, _ := io.ReadAll(rec.Body)
	return string(b)
}

// The collector reads the status and the counters at scrape time, names
// and labels as they always were, and the library escapes label values.
func TestCollector(t *testing.T) {
	st := &Status{Uplinks: []UplinkStatus{
		{Name: "isp1", Interface: "ppp0", ID: 0, Usable: true, RTTms: 12.5, Loss: 0.05},
		{Name: `we"ird\name`, Interface: "ppp1", ID: 1},
		{Name: "gone", Interface: "tun0", ID: 7}, // its counters cannot be read
	}, PolicyKernelBytes: 45_600_000}
	counters := fakeCounters{0: {RxPackets: 10, TxBytes: 3000, NewFlows: 2}, 1: {InboundRefused: 5}}
	rss := uint64(23 << 20)
	c := newCollector(func() *Status { return st }, counters, func() (uint64, uint64) { return rss, 40 << 20 })
	got := scrape(t, c)
	for _, want := range []string{
		`mhbpf_uplink_up{interface="ppp0",uplink="isp1"} 1`,
		`mhbpf_uplink_up{interface="ppp1",uplink="we\"ird\\name"} 0`,
		`mhbpf_uplink_probe_rtt_seconds{uplink="isp1"} 0.0125`,
		`mhbpf_uplink_probe_loss_ratio{uplink="isp1"} 0.05`,
		`mhbpf_uplink_rx_packets_total{uplink="isp1"} 10`,
		`mhbpf_uplink_tx_bytes_total{uplink="isp1"} 3000`,
		`mhbpf_uplink_new_flows_total{uplink="isp1"} 2`,
		`mhbpf_uplink_inbound_refused_total{uplink="we\"ird\\name"} 5`,
		`mhbpf_uplink_rx_bytes_total{uplink="isp1"} 0`,
		`mhbpf_uplink_inbound_records_total{uplink="isp1"} 0`,
		`mhbpf_uplink_tx_packets_total{uplink="isp1"} 0`,
		`mhbpf_metrics_collection_errors_total 1`,
		`mhbpf_daemon_resident_bytes 2.4117248e+07`,
		`mhbpf_daemon_resident_peak_bytes 4.194304e+07`,
		`mhbpf_policy_kernel_bytes 4.56e+07`,
		"# TYPE mhbpf_daemon_resident_bytes gauge",
		"# TYPE mhbpf_uplink_rx_packets_total counter",
		"# TYPE mhbpf_uplink_up gauge",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("no %s in:\n%s", want, got)
		}
	}
	if strings.Contains(got, `mhbpf_uplink_rx_packets_total{uplink="gone"}`) {
		t.Errorf("counters of an unreadable slot served:\n%s", got)
	}
	// At scrape time: a counter that grew, and memory, are served as they
	// are now.
	counters[0] = maps.Counters{RxPackets: 11}
	rss = 30 << 20
	got = scrape(t, c)
	for _, want := range []string{`mhbpf_uplink_rx_packets_total{uplink="isp1"} 11`, `mhbpf_daemon_resident_bytes 3.145728e+07`} {
		if !strings.Contains(got, want) {
			t.Errorf("second scrape: no %s in:\n%s", want, got)
		}
	}
}

// The daemon's memory comes from its own /proc status lines, in bytes.
func TestStatusBytes(t *testing.T) {
	status := "Name:\tmhbpf\nVmHWM:\t   41000 kB\nVmRSS:\t   23552 kB\nThreads:\t9\n"
	if got := statusBytes(status, "VmRSS:"); got != 23552*1024 {
		t.Errorf("VmRSS %d, want %d", got, 23552*1024)
	}
	if got := statusBytes(status, "VmHWM:"); got != 41000*1024 {
		t.Errorf("VmHWM %d, want %d", got, 41000*1024)
	}
	if got := statusBytes(status, "VmSwap:"); got != 0 {
		t.Errorf("a missing field: %d, want 0", got)
	}
	if now, peak := residentBytes(); now == 0 || peak < now {
		t.Errorf("this process: resident %d, peak %d; want both, peak at least resident", now, peak)
	}
}

// walkingCounters is a datapath with a flow map as well as counters: a
// scrape that walked the flow maps (a flows-per-uplink gauge, say) would
// take about a second per million flows, per scrape. The collector reads
// the counters only.
type walkingCounters struct {
	fakeCounters
	walks int
}

func (w *walkingCounters) WalkFlows(func(maps.Flow) bool) error     { w.walks++; return nil }
func (w *walkingCounters) WalkLANFlows(func(maps.Flow) bool) error  { w.walks++; return nil }
func (w *walkingCounters) WalkLiveFlows(func(maps.Flow) bool) error { w.walks++; return nil }
func (w *walkingCounters) LookupFlow(maps.FlowKey) (maps.Flow, bool, error) {
	w.walks++
	return maps.Flow{}, false, nil
}

func TestScrapeNeverWalksTheFlowMaps(t *testing.T) {
	st := &Status{Uplinks: []UplinkStatus{{Name: "isp1", ID: 0, Usable: true}, {Name: "isp2", ID: 1}}}
	dp := &walkingCounters{fakeCounters: fakeCounters{0: {RxPackets: 1}, 1: {RxPackets: 2}}}
	c := newCollector(func() *Status { return st }, dp, residentBytes)
	for range 3 {
		if got := scrape(t, c); !strings.Contains(got, `mhbpf_uplink_rx_packets_total{uplink="isp2"} 2`) {
			t.Fatalf("scrape:\n%s", got)
		}
	}
	if dp.walks != 0 {
		t.Errorf("3 scrapes read the flow maps %d times", dp.walks)
	}
}
