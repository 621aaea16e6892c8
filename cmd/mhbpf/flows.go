package main

import (
	"bufio"
	"container/heap"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/mhbpf/mhbpf/internal/daemon"
	"github.com/mhbpf/mhbpf/internal/flowfilter"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
)

// flowJSON is one element of 'mhbpf flows --json' (docs/cli.md); the
// listing appends the same bytes without reflection (jsonFlows).
type flowJSON struct {
	Proto       string  `json:"proto"`
	Src         string  `json:"src"`
	SrcPort     uint16  `json:"src_port"`
	Dst         string  `json:"dst"`
	DstPort     uint16  `json:"dst_port"`
	Uplink      string  `json:"uplink"` // name; the slot number when no status names it
	UplinkID    int     `json:"uplink_id"`
	Origin      string  `json:"origin"`    // balanced, policy, inbound
	Policy      string  `json:"policy"`    // the [[policy]] rule's name; "" if none or not known
	PolicyID    int     `json:"policy_id"` // rule i is i+1; 0: none or not known
	Mark        uint32  `json:"mark"`
	AgeSeconds  float64 `json:"age_seconds"`
	IdleSeconds float64 `json:"idle_seconds"`
}

func newFlowJSON(fl maps.Flow, names *flowNames, now time.Duration) flowJSON {
	return flowJSON{Proto: maps.ProtoName(fl.Key.Proto),
		Src: fl.Key.Src.Addr().String(), SrcPort: fl.Key.Src.Port(),
		Dst: fl.Key.Dst.Addr().String(), DstPort: fl.Key.Dst.Port(),
		Uplink: names.uplinkName(fl.Uplink), UplinkID: fl.Uplink, Origin: fl.Origin.String(),
		Policy: names.policyName(fl.Policy), PolicyID: fl.Policy, Mark: fl.Mark,
		AgeSeconds: seconds(now, fl.FirstSeen), IdleSeconds: seconds(now, fl.LastSeen)}
}

// uplinkSlots maps names to slots and back, from the daemon's last status:
// the flow map itself knows only slots.
type uplinkSlots struct {
	byName map[string]int
	byID   map[int]string
}

func loadUplinkSlots(stateDir string) uplinkSlots {
	s := uplinkSlots{byName: map[string]int{}, byID: map[int]string{}}
	if st, err := daemon.LoadStatus(stateDir); err == nil {
		for _, u := range st.Uplinks {
			s.byName[u.Name] = u.ID
			s.byID[u.ID] = u.Name
		}
	}
	return s
}

// loadPolicyNames are the [[policy]] rules' names in config order, from
// the daemon's last status (none without one): the flow map knows ids.
func loadPolicyNames(stateDir string) []string {
	st, err := daemon.LoadStatus(stateDir)
	if err != nil {
		return nil
	}
	return st.Policies
}

func (s uplinkSlots) name(id int) string {
	if n, ok := s.byID[id]; ok {
		return n
	}
	return fmt.Sprint(id)
}

// slot finds an uplink by name (-1 for ""), or says which names there are.
func (s uplinkSlots) slot(name string) (int, error) {
	if name == "" {
		return -1, nil
	}
	if id, ok := s.byName[name]; ok {
		return id, nil
	}
	if len(s.byName) == 0 {
		return 0, fmt.Errorf("--uplink %q: no daemon status to name the uplinks by", name)
	}
	var known []string
	for n := range s.byName {
		known = append(known, n)
	}
	sort.Strings(known)
	return 0, fmt.Errorf("--uplink %q: no such uplink (uplinks: %s)", name, strings.Join(known, ", "))
}

func flowsCmd(pinDir, stateDir *string) *cobra.Command {
	var uplink, src, dst, origin, proto string
	var asJSON, sorted bool
	var limit int
	filter := func(slots uplinkSlots, policies []string) (flowfilter.Filter, error) {
		f := flowfilter.Any()
		var err error
		if f.Uplink, err = slots.slot(uplink); err != nil {
			return f, err
		}
		if f.Src, err = flowfilter.ParsePrefix("src", src); err != nil {
			return f, err
		}
		if f.Dst, err = flowfilter.ParsePrefix("dst", dst); err != nil {
			return f, err
		}
		if err = f.ParsePolicy(origin, policies); err != nil {
			return f, err
		}
		f.Proto, err = flowfilter.ParseProto(proto)
		return f, err
	}
	cmd := &cobra.Command{
		Use:   "flows [--uplink NAME] [--src ADDR[/BITS]] [--dst ADDR[/BITS]] [--policy NAME|balanced|policy|inbound] [--proto P] [--sort] [--limit N] [--json]",
		Short: "List the flow maps as they are read, or the most recently active first (works without the daemon)",
		Long: `List the flows the datapath remembers: the LAN's (and the router's own
connections are not here: they carry their mark on the socket) and those
remote peers started on an uplink. Each keeps its uplink until it is idle
or its uplink goes out. Uplinks are named after the daemon's last status.

The flows are printed as they are read, in the maps' order (as conntrack -L
does), filters applied while reading: a million flows list in under a
second, in constant memory. --sort prints the most recently active first:
it reads every matching flow before printing (a million: about 470 MB),
or, with --limit N, keeps only the N most recent.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if limit < 0 {
				return fmt.Errorf("--limit %d: must be 0 (no limit) or more", limit)
			}
			slots := loadUplinkSlots(*stateDir)
			policies := loadPolicyNames(*stateDir)
			f, err := filter(slots, policies)
			if err != nil {
				return err
			}
			m, err := loader.OpenPinned(*pinDir)
			if err != nil {
				return err
			}
			defer m.Close()
			out := bufio.NewWriterSize(os.Stdout, 64<<10)
			names := newFlowNames(slots, policies)
			var p flowPrinter = newTextFlows(out, names, monotonicNow())
			if asJSON {
				p = newJSONFlows(out, names, monotonicNow())
			}
			if err := listFlows(m, f, sorted, limit, p); err != nil {
				_ = out.Flush()
				return err
			}
			return out.Flush()
		},
	}
	cmd.Flags().StringVar(&uplink, "uplink", "", "only flows on this uplink (its name, as in 'mhbpf status')")
	cmd.Flags().StringVar(&src, "src", "", "only flows from this address or prefix (the LAN host, or the remote peer of an inbound flow)")
	cmd.Flags().StringVar(&dst, "dst", "", "only flows to this address or prefix")
	cmd.Flags().StringVar(&origin, "policy", "", "only flows whose uplink came from: a [[policy]] rule by its name, balanced (the default policy), policy (any [[policy]] rule), inbound (a remote peer started it)")
	cmd.Flags().StringVar(&proto, "proto", "", "only this protocol: tcp, udp, icmp, icmpv6 or a number")
	cmd.Flags().BoolVar(&sorted, "sort", false, "most recently active first (reads every matching flow before printing; with --limit, keeps only that many)")
	cmd.Flags().IntVar(&limit, "limit", 0, "print at most this many flows (0: all); with --sort, the most recently active")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print a JSON array, one flow a line (schema: docs/cli.md)")
	cmd.AddCommand(flowsFlushCmd(pinDir, stateDir))
	return cmd
}

// flowWalker is where flows are listed from: *maps.Maps.
type flowWalker interface {
	WalkLiveFlows(fn func(maps.Flow) bool) error
}

// listFlows prints the flows that pass f: as the walk reads them, or
// sorted (most recently active first: all of them held, or with a limit
// only the limit most recent). limit 0 is no limit.
func listFlows(m flowWalker, f flowfilter.Filter, sorted bool, limit int, p flowPrinter) error {
	if !sorted {
		var werr error
		n := 0
		err := m.WalkLiveFlows(func(fl maps.Flow) bool {
			if !f.Match(fl) {
				return true
			}
			if werr = p.flow(fl); werr != nil {
				return false
			}
			n++
			return limit == 0 || n < limit
		})
		if werr != nil {
			return werr // the output is gone (a closed pipe): nothing to end
		}
		// A walk that failed part-way still ends what it printed (a
		// valid JSON array, the table's held rows); the error says the
		// listing is short, and the exit status too.
		return errors.Join(err, p.end())
	}
	recent := newRecentFlows(limit)
	err := m.WalkLiveFlows(func(fl maps.Flow) bool {
		if f.Match(fl) {
			recent.add(fl)
		}
		return true
	})
	for _, fl := range recent.sorted() {
		if werr := p.flow(fl); werr != nil {
			return werr
		}
	}
	return errors.Join(err, p.end())
}

// recentFlows keeps flows to print most recently active first: all of
// them, or (limit > 0) the limit most recent, in a heap whose root is the
// least recent kept.
type recentFlows struct {
	limit int
	flows []maps.Flow
}

func newRecentFlows(limit int) *recentFlows { return &recentFlows{limit: limit} }

func (r *recentFlows) Len() int           { return len(r.flows) }
func (r *recentFlows) Less(i, j int) bool { return r.flows[i].LastSeen < r.flows[j].LastSeen }
func (r *recentFlows) Swap(i, j int)      { r.flows[i], r.flows[j] = r.flows[j], r.flows[i] }
func (r *recentFlows) Push(x any)         { r.flows = append(r.flows, x.(maps.Flow)) }
func (r *recentFlows) Pop() any {
	x := r.flows[len(r.flows)-1]
	r.flows = r.flows[:len(r.flows)-1]
	return x
}

func (r *recentFlows) add(f maps.Flow) {
	switch {
	case r.limit == 0:
		r.flows = append(r.flows, f)
	case len(r.flows) < r.limit:
		heap.Push(r, f)
	case f.LastSeen > r.flows[0].LastSeen:
		r.flows[0] = f
		heap.Fix(r, 0)
	}
}

func (r *recentFlows) sorted() []maps.Flow {
	sort.SliceStable(r.flows, func(i, j int) bool { return r.flows[i].LastSeen > r.flows[j].LastSeen })
	return r.flows
}

// flowNames names the slots and policy ids of the flows, from the
// daemon's status, each name made once (a million flows share a few).
type flowNames struct {
	slots    uplinkSlots
	policies []string
	uplink   map[int]string
	policy   map[int]string
}

func newFlowNames(slots uplinkSlots, policies []string) *flowNames {
	return &flowNames{slots: slots, policies: policies, uplink: map[int]string{}, policy: map[int]string{}}
}

func (n *flowNames) uplinkName(id int) string {
	s, ok := n.uplink[id]
	if !ok {
		s = n.slots.name(id)
		n.uplink[id] = s
	}
	return s
}

func (n *flowNames) policyName(id int) string {
	s, ok := n.policy[id]
	if !ok {
		s = flowfilter.PolicyName(id, n.policies)
		n.policy[id] = s
	}
	return s
}

// flowPrinter writes flows as they come.
type flowPrinter interface {
	flow(maps.Flow) error
	end() error
}

// textFlows is the table of 'mhbpf flows'.
type textFlows struct {
	t     *streamTable
	names *flowNames
	now   time.Duration
}

// flowTableAhead is how many rows set the columns' widths.
const flowTableAhead = 1000

func newTextFlows(w io.Writer, names *flowNames, now time.Duration) *textFlows {
	t := newStreamTable(w, flowTableAhead)
	// IDLE is to the second: a flow's record is refreshed at most once a
	// second (per-flow traffic is not counted; the uplinks' counters are
	// in 'mhbpf status').
	_ = t.Row("PROTO", "SOURCE", "DESTINATION", "UPLINK", "ORIGIN", "POLICY", "AGE", "IDLE")
	return &textFlows{t: t, names: names, now: now}
}

func (p *textFlows) flow(fl maps.Flow) error {
	policy := p.names.policyName(fl.Policy)
	if policy == "" {
		policy = "-"
	}
	return p.t.Row(maps.ProtoName(fl.Key.Proto), fl.Key.Src.String(), fl.Key.Dst.String(),
		p.names.uplinkName(fl.Uplink), fl.Origin.String(), policy, ago(p.now, fl.FirstSeen), ago(p.now, fl.LastSeen))
}

func (p *textFlows) end() error { return p.t.Flush() }

// jsonFlows is the JSON array of 'mhbpf flows --json', one element a
// line, written as the flows come. Each element is flowJSON, appended by
// hand: encoding/json's reflection took most of the time of listing a
// million flows (TestFlowJSONIsEncodingJSONs holds the two the same).
type jsonFlows struct {
	w     io.Writer
	names *flowNames
	now   time.Duration
	n     int
	buf   []byte
	// quoted are names as JSON strings, each quoted once.
	quoted map[string][]byte
}

func newJSONFlows(w io.Writer, names *flowNames, now time.Duration) *jsonFlows {
	return &jsonFlows{w: w, names: names, now: now, quoted: map[string][]byte{}}
}

func (p *jsonFlows) flow(fl maps.Flow) error {
	b := p.buf[:0]
	if p.n == 0 {
		b = append(b, "[\n"...)
	} else {
		b = append(b, ",\n"...)
	}
	p.n++
	p.buf = p.appendFlow(b, fl)
	_, err := p.w.Write(p.buf)
	return err
}

// appendFlow appends fl as flowJSON encodes it.
func (p *jsonFlows) appendFlow(b []byte, fl maps.Flow) []byte {
	b = append(b, `{"proto":`...)
	b = p.appendString(b, maps.ProtoName(fl.Key.Proto))
	b = append(b, `,"src":"`...)
	b = fl.Key.Src.Addr().AppendTo(b) // addresses need no escaping
	b = append(b, `","src_port":`...)
	b = strconv.AppendUint(b, uint64(fl.Key.Src.Port()), 10)
	b = append(b, `,"dst":"`...)
	b = fl.Key.Dst.Addr().AppendTo(b)
	b = append(b, `","dst_port":`...)
	b = strconv.AppendUint(b, uint64(fl.Key.Dst.Port()), 10)
	b = append(b, `,"uplink":`...)
	b = p.appendString(b, p.names.uplinkName(fl.Uplink))
	b = append(b, `,"uplink_id":`...)
	b = strconv.AppendInt(b, int64(fl.Uplink), 10)
	b = append(b, `,"origin":`...)
	b = p.appendString(b, fl.Origin.String())
	b = append(b, `,"policy":`...)
	b = p.appendString(b, p.names.policyName(fl.Policy))
	b = append(b, `,"policy_id":`...)
	b = strconv.AppendInt(b, int64(fl.Policy), 10)
	b = append(b, `,"mark":`...)
	b = strconv.AppendUint(b, uint64(fl.Mark), 10)
	b = append(b, `,"age_seconds":`...)
	b = appendJSONFloat(b, seconds(p.now, fl.FirstSeen))
	b = append(b, `,"idle_seconds":`...)
	b = appendJSONFloat(b, seconds(p.now, fl.LastSeen))
	return append(b, '}')
}

func (p *jsonFlows) appendString(b []byte, s string) []byte {
	q, ok := p.quoted[s]
	if !ok {
		q, _ = json.Marshal(s) // a string always encodes
		p.quoted[s] = q
	}
	return append(b, q...)
}

// appendJSONFloat appends f as encoding/json writes a float64: plain
// decimal digits, the exponent form only for tiny or huge values (left to
// encoding/json itself).
func appendJSONFloat(b []byte, f float64) []byte {
	if f == 0 || math.Abs(f) >= 1e-6 && math.Abs(f) < 1e21 {
		return strconv.AppendFloat(b, f, 'f', -1, 64)
	}
	q, _ := json.Marshal(f) // ages are finite
	return append(b, q...)
}

func (p *jsonFlows) end() error {
	end := "\n]\n"
	if p.n == 0 {
		end = "[]\n"
	}
	_, err := io.WriteString(p.w, end)
	return err
}

func flowsFlushCmd(pinDir, stateDir *string) *cobra.Command {
	var uplink string
	cmd := &cobra.Command{
		Use:   "flush [--uplink NAME]",
		Short: "Forget the flows (all, or one uplink's): their next packets choose an uplink again",
		Long: `Forget flow records, all of them or those of one uplink, with the remote
endpoints that point to that uplink. The next packet of a forgotten UDP or
ICMP flow, and every new connection, choose an uplink afresh (sticky
destinations still hold: see sticky_timeout). A TCP connection already open
is not re-steered: its NAT binding ties it to its uplink, and its later
packets follow main's routes.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			slots := loadUplinkSlots(*stateDir)
			id, err := slots.slot(uplink)
			if err != nil {
				return err
			}
			m, err := loader.OpenPinned(*pinDir)
			if err != nil {
				return err
			}
			defer m.Close()
			// One walk, whichever uplinks: --uplink or all of them.
			total, err := m.DeleteFlowsOf(func(u int) bool { return id < 0 || u == id })
			if err != nil {
				return fmt.Errorf("flushing flows: %w (%d flows forgotten so far)", err, total)
			}
			what := "all uplinks"
			if id >= 0 {
				what = "uplink " + uplink
			}
			fmt.Printf("%d flows forgotten (%s)\n", total, what)
			return nil
		},
	}
	cmd.Flags().StringVar(&uplink, "uplink", "", "only this uplink's flows (its name)")
	return cmd
}

// seconds is how long ago monotonic time t was; 0 when unknown.
func seconds(now, t time.Duration) float64 {
	if t == 0 || t > now {
		return 0
	}
	return (now - t).Seconds()
}
