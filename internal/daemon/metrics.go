package daemon

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/mhbpf/mhbpf/internal/maps"
)

// metrics serves the last status and the datapath's counters in the
// Prometheus text format. The reconciler publishes a copy of its status
// after each pass; the handler reads that copy and the (pinned, shared)
// maps, never the reconciler's own state.
type metrics struct {
	mu     sync.Mutex
	status Status
	maps   *maps.Maps
	srv    *http.Server
}

func (m *metrics) publish(s Status) {
	m.mu.Lock()
	m.status = s
	m.mu.Unlock()
}

func startMetrics(addr string, mp *maps.Maps) (*metrics, error) {
	m := &metrics{maps: mp}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics listen %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/metrics", m.serve)
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

func (m *metrics) serve(w http.ResponseWriter, _ *http.Request) {
	m.mu.Lock()
	st := m.status
	m.mu.Unlock()
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	fmt.Fprintln(w, "# HELP mhbpf_uplink_up Whether the uplink is in use (link, address, probes, hold-down).")
	fmt.Fprintln(w, "# TYPE mhbpf_uplink_up gauge")
	for _, u := range st.Uplinks {
		fmt.Fprintf(w, "mhbpf_uplink_up{uplink=%q,interface=%q} %d\n", u.Name, u.Interface, b2i(u.Usable))
	}
	fmt.Fprintln(w, "# HELP mhbpf_uplink_probe_rtt_seconds RTT of the last successful probe.")
	fmt.Fprintln(w, "# TYPE mhbpf_uplink_probe_rtt_seconds gauge")
	for _, u := range st.Uplinks {
		fmt.Fprintf(w, "mhbpf_uplink_probe_rtt_seconds{uplink=%q} %g\n", u.Name, u.RTTms/1000)
	}
	fmt.Fprintln(w, "# HELP mhbpf_uplink_probe_loss_ratio Share of the last 20 probes lost.")
	fmt.Fprintln(w, "# TYPE mhbpf_uplink_probe_loss_ratio gauge")
	for _, u := range st.Uplinks {
		fmt.Fprintf(w, "mhbpf_uplink_probe_loss_ratio{uplink=%q} %g\n", u.Name, u.Loss)
	}
	type counter struct {
		name, help string
		get        func(maps.Counters) uint64
	}
	for _, c := range []counter{
		{"mhbpf_uplink_rx_packets_total", "Packets that arrived on the uplink.", func(c maps.Counters) uint64 { return c.RxPackets }},
		{"mhbpf_uplink_rx_bytes_total", "Bytes that arrived on the uplink.", func(c maps.Counters) uint64 { return c.RxBytes }},
		{"mhbpf_uplink_tx_packets_total", "LAN packets steered to the uplink.", func(c maps.Counters) uint64 { return c.TxPackets }},
		{"mhbpf_uplink_tx_bytes_total", "LAN bytes steered to the uplink.", func(c maps.Counters) uint64 { return c.TxBytes }},
		{"mhbpf_uplink_new_flows_total", "Flows and sockets assigned to the uplink.", func(c maps.Counters) uint64 { return c.NewFlows }},
		{"mhbpf_uplink_inbound_records_total", "Flows remote peers started on the uplink that were recorded.", func(c maps.Counters) uint64 { return c.InboundAdmitted }},
		{"mhbpf_uplink_inbound_refused_total", "Flow openers from the uplink left unrecorded by its inbound_rate budget (a flood).", func(c maps.Counters) uint64 { return c.InboundRefused }},
	} {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s counter\n", c.name, c.help, c.name)
		for _, u := range st.Uplinks {
			cs, err := m.maps.UplinkCounters(u.ID)
			if err != nil {
				continue
			}
			fmt.Fprintf(w, "%s{uplink=%q} %d\n", c.name, u.Name, c.get(cs))
		}
	}
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}
