package main

import (
	"fmt"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/mhbpf/mhbpf/internal/daemon"
	"github.com/mhbpf/mhbpf/internal/flowfilter"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
)

// flowJSON is one element of 'mhbpf flows --json' (docs/cli.md).
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
	var asJSON bool
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
		Use:   "flows [--uplink NAME] [--src ADDR[/BITS]] [--dst ADDR[/BITS]] [--policy NAME|balanced|policy|inbound] [--proto P] [--json]",
		Short: "List the flow map, newest activity first (works without the daemon)",
		Long: `List the flows the datapath remembers: the LAN's (and the router's own
connections are not here: they carry their mark on the socket) and those
remote peers started on an uplink. Each keeps its uplink until it is idle
or its uplink goes out. Uplinks are named after the daemon's last status.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
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
			var flows []maps.Flow
			if err := m.WalkFlows(func(fl maps.Flow) bool {
				if f.Match(fl) {
					flows = append(flows, fl)
				}
				return true
			}); err != nil {
				return err
			}
			sort.Slice(flows, func(i, j int) bool { return flows[i].LastSeen > flows[j].LastSeen })
			now := monotonicNow()
			if asJSON {
				out := make([]flowJSON, 0, len(flows))
				for _, fl := range flows {
					out = append(out, flowJSON{Proto: maps.ProtoName(fl.Key.Proto),
						Src: fl.Key.Src.Addr().String(), SrcPort: fl.Key.Src.Port(),
						Dst: fl.Key.Dst.Addr().String(), DstPort: fl.Key.Dst.Port(),
						Uplink: slots.name(fl.Uplink), UplinkID: fl.Uplink, Origin: fl.Origin.String(),
						Policy: flowfilter.PolicyName(fl.Policy, policies), PolicyID: fl.Policy, Mark: fl.Mark,
						AgeSeconds: seconds(now, fl.FirstSeen), IdleSeconds: seconds(now, fl.LastSeen)})
				}
				return printJSON(out)
			}
			w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			// IDLE is to the second: a flow's record is refreshed at
			// most once a second (per-flow traffic is not counted; the
			// uplinks' counters are in 'mhbpf status').
			fmt.Fprintln(w, "PROTO\tSOURCE\tDESTINATION\tUPLINK\tORIGIN\tPOLICY\tAGE\tIDLE")
			for _, fl := range flows {
				policy := flowfilter.PolicyName(fl.Policy, policies)
				if policy == "" {
					policy = "-"
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", maps.ProtoName(fl.Key.Proto), fl.Key.Src, fl.Key.Dst,
					slots.name(fl.Uplink), fl.Origin, policy, ago(now, fl.FirstSeen), ago(now, fl.LastSeen))
			}
			return w.Flush()
		},
	}
	cmd.Flags().StringVar(&uplink, "uplink", "", "only flows on this uplink (its name, as in 'mhbpf status')")
	cmd.Flags().StringVar(&src, "src", "", "only flows from this address or prefix (the LAN host, or the remote peer of an inbound flow)")
	cmd.Flags().StringVar(&dst, "dst", "", "only flows to this address or prefix")
	cmd.Flags().StringVar(&origin, "policy", "", "only flows whose uplink came from: a [[policy]] rule by its name, balanced (the default policy), policy (any [[policy]] rule), inbound (a remote peer started it)")
	cmd.Flags().StringVar(&proto, "proto", "", "only this protocol: tcp, udp, icmp, icmpv6 or a number")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print a JSON array (schema: docs/cli.md)")
	cmd.AddCommand(flowsFlushCmd(pinDir, stateDir))
	return cmd
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
			ids := []int{id}
			if id < 0 {
				ids = ids[:0]
				for i := 0; i < maps.MaxUplinks; i++ {
					ids = append(ids, i)
				}
			}
			total := 0
			for _, i := range ids {
				n, err := m.DeleteFlowsOfUplink(i)
				total += n
				if err != nil {
					return fmt.Errorf("flushing uplink %s: %w (%d flows forgotten so far)", slots.name(i), err, total)
				}
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
