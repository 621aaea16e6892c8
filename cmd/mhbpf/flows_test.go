package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/mhbpf/mhbpf/internal/flowfilter"
	"github.com/mhbpf/mhbpf/internal/maps"
)

func testNames() *flowNames {
	slots := uplinkSlots{byName: map[string]int{"isp1": 0, `we"ird<&>\name`: 1, "ünï": 2},
		byID: map[int]string{0: "isp1", 1: `we"ird<&>\name`, 2: "ünï"}}
	return newFlowNames(slots, []string{"mail", "panel \"x\""})
}

// The hand-made JSON of the listing is byte for byte what encoding/json
// makes of flowJSON: names that need escaping, unknown slots and policy
// ids, both families, times unknown, tiny, ordinary and in the future.
func TestFlowJSONIsEncodingJSONs(t *testing.T) {
	now := 100 * time.Hour
	names := testNames()
	p := newJSONFlows(nil, names, now)
	v4 := netip.MustParseAddrPort("100.64.2.10:40000")
	v6 := netip.MustParseAddrPort("[2001:db8::7]:443")
	for i, fl := range []maps.Flow{
		{Key: maps.FlowKey{Proto: 6, Src: v4, Dst: netip.MustParseAddrPort("203.0.113.25:25")}, Uplink: 0, Origin: maps.OriginPolicy, Policy: 1, Mark: 0x810000,
			FirstSeen: now - 90*time.Second, LastSeen: now - 1500*time.Millisecond},
		{Key: maps.FlowKey{Proto: 17, Src: v6, Dst: v6}, Uplink: 1, Origin: maps.OriginBalanced, Policy: 2, Mark: 0x30000,
			FirstSeen: now - time.Nanosecond, LastSeen: now - 999*time.Nanosecond},
		{Key: maps.FlowKey{Proto: 58, Src: v6, Dst: v6}, Uplink: 2, Origin: maps.OriginInbound, FirstSeen: 0, LastSeen: now + time.Second},
		{Key: maps.FlowKey{Proto: 47, Src: v4, Dst: v4}, Uplink: 9, Origin: maps.Origin(7), Policy: 40, Mark: 1 << 31,
			FirstSeen: time.Nanosecond, LastSeen: now - time.Microsecond},
	} {
		want, err := json.Marshal(newFlowJSON(fl, names, now))
		if err != nil {
			t.Fatal(err)
		}
		if got := p.appendFlow(nil, fl); !bytes.Equal(got, want) {
			t.Errorf("flow %d:\n got %s\nwant %s", i, got, want)
		}
	}
}

// The streamed array is JSON: empty, one flow, many.
func TestJSONFlowsIsAnArray(t *testing.T) {
	for _, n := range []int{0, 1, 3} {
		var out bytes.Buffer
		p := newJSONFlows(&out, testNames(), time.Hour)
		for i := range n {
			if err := p.flow(maps.Flow{Key: maps.FlowKey{Proto: 6, Src: netip.MustParseAddrPort("100.64.2.10:40000"),
				Dst: netip.AddrPortFrom(netip.MustParseAddr("198.51.100.1"), uint16(i+1))}}); err != nil {
				t.Fatal(err)
			}
		}
		if err := p.end(); err != nil {
			t.Fatal(err)
		}
		var got []flowJSON
		if err := json.Unmarshal(out.Bytes(), &got); err != nil || len(got) != n {
			t.Errorf("%d flows: %d elements, %v:\n%s", n, len(got), err, out.String())
		}
		if n > 0 && strings.Count(out.String(), "\n") != n+2 {
			t.Errorf("%d flows: want one a line:\n%s", n, out.String())
		}
	}
}

func tabwritten(rows [][]string) string {
	var b bytes.Buffer
	w := tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
	for _, r := range rows {
		fmt.Fprintln(w, strings.Join(r, "\t"))
	}
	w.Flush()
	return b.String()
}

// A table shorter than the look-ahead is exactly what tabwriter prints;
// past it, the rows already out keep their widths and a wider cell widens
// its column from its own row on.
func TestStreamTableAlignsAsTabwriter(t *testing.T) {
	rows := [][]string{{"PROTO", "SOURCE", "UPLINK", "IDLE"}, {"tcp", "100.64.2.10:1", "isp1", "0s"},
		{"udp", "[2001:db8::1]:53", "ünï", "12s"}, {"icmp", "", "x", ""}}
	var out bytes.Buffer
	st := newStreamTable(&out, 10)
	for _, r := range rows {
		if err := st.Row(r...); err != nil {
			t.Fatal(err)
		}
	}
	if out.Len() != 0 {
		t.Errorf("written before the look-ahead was full: %q", out.String())
	}
	if err := st.Flush(); err != nil {
		t.Fatal(err)
	}
	if want := tabwritten(rows); out.String() != want {
		t.Errorf("got\n%s\nwant (tabwriter)\n%s", out.String(), want)
	}

	out.Reset()
	st = newStreamTable(&out, 2)
	wide := []string{"tcp", "[2001:db8:ffff:ffff::1]:65535", "isp1", "1s"}
	for _, r := range append(append([][]string{}, rows[:3]...), wide, rows[1]) {
		if err := st.Row(r...); err != nil {
			t.Fatal(err)
		}
	}
	if err := st.Flush(); err != nil {
		t.Fatal(err)
	}
	lines := strings.SplitAfter(out.String(), "\n")
	first := tabwritten(rows[:2])
	if got := strings.Join(lines[:2], ""); got != first {
		t.Errorf("the look-ahead rows:\n%s\nwant\n%s", got, first)
	}
	if want := "tcp    [2001:db8:ffff:ffff::1]:65535  isp1    1s\n"; lines[3] != want {
		t.Errorf("the wider row: %q, want %q", lines[3], want)
	}
	if want := "tcp    100.64.2.10:1                  isp1    0s\n"; lines[4] != want {
		t.Errorf("after it: %q, want %q", lines[4], want)
	}
}

// --sort: most recently active first; with a limit, only the limit most
// recent, whatever order they come in.
func TestRecentFlows(t *testing.T) {
	var in []maps.Flow
	for i := range 1000 {
		in = append(in, maps.Flow{Uplink: i, LastSeen: time.Duration(i) * time.Millisecond})
	}
	rand.Shuffle(len(in), func(i, j int) { in[i], in[j] = in[j], in[i] })
	for _, limit := range []int{0, 1, 7, 1000, 5000} {
		r := newRecentFlows(limit)
		for _, f := range in {
			r.add(f)
		}
		got := r.sorted()
		want := min(len(in), limit)
		if limit == 0 {
			want = len(in)
		}
		if len(got) != want {
			t.Fatalf("limit %d: %d flows, want %d", limit, len(got), want)
		}
		for i, f := range got {
			if f.Uplink != 999-i {
				t.Fatalf("limit %d: flow %d is %d, want %d", limit, i, f.Uplink, 999-i)
			}
		}
	}
}

// fakeWalker walks flows 0..n-1 (LastSeen i ms, on uplink i%3) and counts
// the flows it handed out.
type fakeWalker struct {
	n, walked int
	err       error // what the walk ends with after its n flows
}

func (w *fakeWalker) WalkLiveFlows(fn func(maps.Flow) bool) error {
	for i := range w.n {
		w.walked++
		if !fn(maps.Flow{Uplink: i % 3, LastSeen: time.Duration(i) * time.Millisecond}) {
			break
		}
	}
	return w.err
}

// A walk that fails part-way (a map read error) still ends the JSON array
// it began, and says it failed.
func TestFlowsJSONEndsWhenTheWalkFails(t *testing.T) {
	for _, sorted := range []bool{false, true} {
		var out bytes.Buffer
		w := &fakeWalker{n: 3, err: errors.New("batch lookup in flows4: bad address")}
		err := listFlows(w, flowfilter.Any(), sorted, 0, newJSONFlows(&out, newFlowNames(uplinkSlots{}, nil), 0))
		if err == nil || !strings.Contains(err.Error(), "bad address") {
			t.Fatalf("sorted %v: error %v, want the walk's", sorted, err)
		}
		var flows []flowJSON
		if jerr := json.Unmarshal(out.Bytes(), &flows); jerr != nil || len(flows) != 3 {
			t.Fatalf("sorted %v: %d flows, %v, in:\n%s", sorted, len(flows), jerr, out.String())
		}
	}
}

type recordingPrinter struct {
	flows []maps.Flow
	ended bool
}

func (p *recordingPrinter) flow(f maps.Flow) error { p.flows = append(p.flows, f); return nil }
func (p *recordingPrinter) end() error             { p.ended = true; return nil }

// The filter holds while reading; --limit alone stops the walk at the
// limit; --sort reads everything and prints the most recent first.
func TestListFlowsFiltersLimitsAndSorts(t *testing.T) {
	onTwo := flowfilter.Any()
	onTwo.Uplink = 2
	for _, c := range []struct {
		name          string
		f             flowfilter.Filter
		sorted        bool
		limit         int
		walked, first int // flows the walk handed out; the first printed's uplink-independent index
		printed       int
	}{
		{"all", flowfilter.Any(), false, 0, 1000, 0, 1000},
		{"uplink 2", onTwo, false, 0, 1000, 2, 333},
		{"uplink 2, limit 5", onTwo, false, 5, 3*4 + 3, 2, 5},
		{"sorted", flowfilter.Any(), true, 0, 1000, 999, 1000},
		{"sorted, uplink 2, limit 5", onTwo, true, 5, 1000, 998, 5},
	} {
		w := &fakeWalker{n: 1000}
		p := &recordingPrinter{}
		if err := listFlows(w, c.f, c.sorted, c.limit, p); err != nil {
			t.Fatal(err)
		}
		if w.walked != c.walked || len(p.flows) != c.printed || !p.ended {
			t.Errorf("%s: walked %d, printed %d, ended %v; want %d, %d, true", c.name, w.walked, len(p.flows), p.ended, c.walked, c.printed)
			continue
		}
		if got := int(p.flows[0].LastSeen / time.Millisecond); got != c.first {
			t.Errorf("%s: first printed is flow %d, want %d", c.name, got, c.first)
		}
		for _, f := range p.flows {
			if !c.f.Match(f) {
				t.Errorf("%s: printed %+v", c.name, f)
			}
		}
	}
}
