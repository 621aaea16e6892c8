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
	}}
	counters := fakeCounters{0: {RxPackets: 10, TxBytes: 3000, NewFlows: 2}, 1: {InboundRefused: 5}}
	c := newCollector(func() *Status { return st }, counters)
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
	// At scrape time: a counter that grew is served grown.
	counters[0] = maps.Counters{RxPackets: 11}
	if got := scrape(t, c); !strings.Contains(got, `mhbpf_uplink_rx_packets_total{uplink="isp1"} 11`) {
		t.Errorf("second scrape:\n%s", got)
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
	c := newCollector(func() *Status { return st }, dp)
	for range 3 {
		if got := scrape(t, c); !strings.Contains(got, `mhbpf_uplink_rx_packets_total{uplink="isp2"} 2`) {
			t.Fatalf("scrape:\n%s", got)
		}
	}
	if dp.walks != 0 {
		t.Errorf("3 scrapes read the flow maps %d times", dp.walks)
	}
}
