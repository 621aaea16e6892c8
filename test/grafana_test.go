package test

// The Grafana dashboard in contrib/ queries only metrics a live daemon
// exports.

import (
	"encoding/json"
	"os"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"
)

// dashboardExprs collects every "expr" and label_values query of a
// dashboard, wherever it is nested.
func dashboardExprs(v any, out *[]string) {
	switch x := v.(type) {
	case map[string]any:
		for k, c := range x {
			if s, ok := c.(string); ok && (k == "expr" || k == "definition") {
				*out = append(*out, s)
			}
			dashboardExprs(c, out)
		}
	case []any:
		for _, c := range x {
			dashboardExprs(c, out)
		}
	}
}

func TestGrafanaDashboardUsesExportedMetrics(t *testing.T) {
	b, err := os.ReadFile("../contrib/grafana/mhbpf-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash any
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("dashboard is not JSON: %v", err)
	}
	var exprs []string
	dashboardExprs(dash, &exprs)
	used := map[string]bool{}
	for _, e := range exprs {
		for _, name := range regexp.MustCompile(`\bmhbpf_[a-z0-9_]+`).FindAllString(e, -1) {
			used[name] = true
		}
	}
	if len(used) < 5 {
		t.Fatalf("the dashboard queries only %v", used)
	}

	e := newDaemonEnv(t, "", "")
	e.withMetrics()
	e.start()
	var text string
	e.waitFor("metrics served", 3*time.Second, func() bool {
		text = e.metricsText()
		return strings.Contains(text, "# TYPE mhbpf_uplink_up ")
	})
	exported := map[string]bool{}
	for _, line := range strings.Split(text, "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[0] == "#" && f[1] == "TYPE" {
			exported[f[2]] = true
		}
	}
	var missing, unused []string
	for n := range used {
		if !exported[n] {
			missing = append(missing, n)
		}
	}
	for n := range exported {
		if !used[n] {
			unused = append(unused, n)
		}
	}
	sort.Strings(missing)
	sort.Strings(unused)
	if len(missing) > 0 {
		t.Fatalf("the dashboard queries metrics the daemon does not export: %v\n/metrics:\n%s", missing, text)
	}
	if len(unused) > 0 {
		t.Logf("exported but not on the dashboard: %v", unused)
	}
	t.Logf("the dashboard queries %d metrics, all exported", len(used))
}
