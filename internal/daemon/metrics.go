package daemon

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/mhbpf/mhbpf/internal/maps"
)

// metrics serves the last status and the datapath's counters in the
// Prometheus format, through a Collector that reads them at scrape time
// (as cloudflare/tubular's does): the reconciler publishes a copy of its
// status after each pass; the collector reads that copy and the (pinned,
// shared) maps, never the reconciler's own state. The library writes the
// text format, label escaping included.
type metrics struct {
	status atomic.Pointer[Status]
	srv    *http.Server
}

func (m *metrics) publish(s Status) { m.status.Store(&s) }

// counterSource is where the per-uplink counters are read (*maps.Maps).
type counterSource interface {
	UplinkCounters(id int) (maps.Counters, error)
}

type counterMetric struct {
	desc *prometheus.Desc
	get  func(maps.Counters) uint64
}

// collector is the prometheus.Collector of mhbpf's metrics. The names and
// labels are an interface (dashboards, alerts): they stay as they are.
type collector struct {
	status   func() *Status
	counters counterSource
	// resident is the daemon's memory now and at its peak (residentBytes),
	// read at scrape time.
	resident func() (now, peak uint64)
	up       *prometheus.Desc
	rtt      *prometheus.Desc
	loss     *prometheus.Desc
	changes  *prometheus.Desc
	rss      *prometheus.Desc
	rssPeak  *prometheus.Desc
	policy   *prometheus.Desc
	perCount []counterMetric
	// errors: scrapes that could not read a counter (the uplink's series
	// are left out of that scrape).
	errors prometheus.Counter
}

var _ prometheus.Collector = (*collector)(nil)

func newCollector(status func() *Status, counters counterSource, resident func() (now, peak uint64)) *collector {
	uplink := []string{"uplink"}
	c := &collector{status: status, counters: counters, resident: resident,
		up:      prometheus.NewDesc("mhbpf_uplink_up", "Whether the uplink is in use (link, address, probes, hold-down).", []string{"uplink", "interface"}, nil),
		rtt:     prometheus.NewDesc("mhbpf_uplink_probe_rtt_seconds", "RTT of the last successful probe.", uplink, nil),
		loss:    prometheus.NewDesc("mhbpf_uplink_probe_loss_ratio", "Share of the last 20 probes lost.", uplink, nil),
		changes: prometheus.NewDesc("mhbpf_uplink_state_changes_total", "Times the uplink went in or out of use since the daemon started.", uplink, nil),
		rss:     prometheus.NewDesc("mhbpf_daemon_resident_bytes", "The daemon's resident memory (VmRSS).", nil, nil),
		rssPeak: prometheus.NewDesc("mhbpf_daemon_resident_peak_bytes", "The daemon's peak resident memory (VmHWM): a large policy's load is where it peaks.", nil, nil),
		policy:  prometheus.NewDesc("mhbpf_policy_kernel_bytes", "Kernel memory of the installed policy's prefix tables.", nil, nil),
		errors: prometheus.NewCounter(prometheus.CounterOpts{Name: "mhbpf_metrics_collection_errors_total",
			Help: "Counter reads from the datapath's maps that failed while serving metrics."}),
	}
	for _, m := range []struct {
		name, help string
		get        func(maps.Counters) uint64
	}{
		{"mhbpf_uplink_rx_packets_total", "Packets that arrived on the uplink.", func(c maps.Counters) uint64 { return c.RxPackets }},
		{"mhbpf_uplink_rx_bytes_total", "Bytes that arrived on the uplink.", func(c maps.Counters) uint64 { return c.RxBytes }},
		{"mhbpf_uplink_tx_packets_total", "LAN packets steered to the uplink.", func(c maps.Counters) uint64 { return c.TxPackets }},
		{"mhbpf_uplink_tx_bytes_total", "LAN bytes steered to the uplink.", func(c maps.Counters) uint64 { return c.TxBytes }},
		{"mhbpf_uplink_new_flows_total", "Flows and sockets assigned to the uplink.", func(c maps.Counters) uint64 { return c.NewFlows }},
		{"mhbpf_uplink_inbound_records_total", "Flows remote peers started on the uplink that were recorded.", func(c maps.Counters) uint64 { return c.InboundAdmitted }},
		{"mhbpf_uplink_inbound_refused_total", "Flow openers from the uplink left unrecorded by its inbound_rate budget (a flood).", func(c maps.Counters) uint64 { return c.InboundRefused }},
	} {
		c.perCount = append(c.perCount, counterMetric{prometheus.NewDesc(m.name, m.help, uplink, nil), m.get})
	}
	return c
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	c.errors.Describe(ch)
	ch <- c.up
	ch <- c.rtt
	ch <- c.loss
	ch <- c.changes
	ch <- c.rss
	ch <- c.rssPeak
	ch <- c.policy
	for _, m := range c.perCount {
		ch <- m.desc
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	defer c.errors.Collect(ch) // last: this scrape's errors count
	if now, peak := c.resident(); now > 0 {
		ch <- prometheus.MustNewConstMetric(c.rss, prometheus.GaugeValue, float64(now))
		ch <- prometheus.MustNewConstMetric(c.rssPeak, prometheus.GaugeValue, float64(peak))
	}
	st := c.status()
	if st == nil {
		return // before the first pass
	}
	ch <- prometheus.MustNewConstMetric(c.policy, prometheus.GaugeValue, float64(st.PolicyKernelBytes))
	for _, u := range st.Uplinks {
		ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, float64(b2i(u.Usable)), u.Name, u.Interface)
		ch <- prometheus.MustNewConstMetric(c.rtt, prometheus.GaugeValue, u.RTTms/1000, u.Name)
		ch <- prometheus.MustNewConstMetric(c.loss, prometheus.GaugeValue, u.Loss, u.Name)
		ch <- prometheus.MustNewConstMetric(c.changes, prometheus.CounterValue, float64(u.StateChanges), u.Name)
		cs, err := c.counters.UplinkCounters(u.ID)
		if err != nil {
			c.errors.Inc()
			continue
		}
		for _, m := range c.perCount {
			ch <- prometheus.MustNewConstMetric(m.desc, prometheus.CounterValue, float64(m.get(cs)), u.Name)
		}
	}
}

// handler serves the collector's metrics (and nothing else: no process or
// Go runtime metrics the daemon did not serve before).
func (c *collector) handler() (http.Handler, error) {
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(c); err != nil {
		return nil, err
	}
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}), nil
}

func startMetrics(addr string, mp *maps.Maps) (*metrics, error) {
	m := &metrics{}
	h, err := newCollector(m.status.Load, mp, residentBytes).handler()
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics listen %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", h)
	m.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := m.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			_ = err // the listener is gone; nothing else depends on it
		}
	}()
	return m, nil
}

func (m *metrics) close() {
	if m != nil && m.srv != nil {
		_ = m.srv.Close()
	}
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}
