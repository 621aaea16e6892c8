package main

import (
	"fmt"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/daemon"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
)

// uplinkNames names uplink ids (slots) after the daemon's last status,
// when there is one; the flow map itself knows only ids.
func uplinkNames(stateDir string) func(int) string {
	names := map[int]string{}
	if st, err := daemon.LoadStatus(stateDir); err == nil {
		for _, u := range st.Uplinks {
			names[u.ID] = u.Name
		}
	}
	return func(id int) string {
		if n, ok := names[id]; ok {
			return n
		}
		return fmt.Sprint(id)
	}
}

func flowsCmd(pinDir, stateDir *string) *cobra.Command {
	var uplink int
	cmd := &cobra.Command{
		Use:   "flows",
		Short: "List the flow map (works without the daemon)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, err := loader.OpenPinned(*pinDir)
			if err != nil {
				return err
			}
			defer m.Close()
			var flows []maps.Flow
			err = m.WalkFlows(func(f maps.Flow) bool {
				if uplink < 0 || f.Uplink == uplink {
					flows = append(flows, f)
				}
				return true
			})
			if err != nil {
				return err
			}
			sort.Slice(flows, func(i, j int) bool { return flows[i].LastSeen > flows[j].LastSeen })
			names := uplinkNames(*stateDir)
			now := monotonicNow()
			w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			// IDLE is to the second: a flow's record is refreshed at
			// most once a second (per-flow traffic is not counted; the
			// uplinks' counters are in 'mhbpf status').
			fmt.Fprintln(w, "PROTO\tSOURCE\tDESTINATION\tUPLINK\tORIGIN\tAGE\tIDLE")
			for _, f := range flows {
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", maps.ProtoName(f.Key.Proto), f.Key.Src, f.Key.Dst,
					names(f.Uplink), f.Origin, ago(now, f.FirstSeen), ago(now, f.LastSeen))
			}
			return w.Flush()
		},
	}
	cmd.Flags().IntVar(&uplink, "uplink", -1, "only flows on this uplink id (the ID column of 'mhbpf status')")
	return cmd
}

func uplinksCmd(pinDir *string) *cobra.Command {
	return &cobra.Command{
		Use:   "uplinks",
		Short: "Show each uplink's state and counters from the pinned maps",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, err := loader.OpenPinned(*pinDir)
			if err != nil {
				return err
			}
			defer m.Close()
			w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "ID\tMARK\tIFINDEX\tWEIGHT\tSTATE\tRX PKTS\tRX BYTES\tTX PKTS\tTX BYTES\tNEW FLOWS")
			for id := 0; id < maps.MaxUplinks; id++ {
				u, err := m.LookupUplink(id)
				if err != nil {
					return err
				}
				if u.Mark == 0 {
					continue // unused slot
				}
				c, err := m.UplinkCounters(id)
				if err != nil {
					return err
				}
				state := "down"
				if u.Up {
					state = "up"
				}
				fmt.Fprintf(w, "%d\t%#x\t%d\t%d\t%s\t%d\t%d\t%d\t%d\t%d\n", id, u.Mark, u.Ifindex, u.Weight, state,
					c.RxPackets, c.RxBytes, c.TxPackets, c.TxBytes, c.NewFlows)
			}
			return w.Flush()
		},
	}
}

func statusCmd(pinDir, stateDir *string) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Show each uplink's state, the reason, probes and counters",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := daemon.LoadStatus(*stateDir)
			if err != nil {
				return fmt.Errorf("no daemon status in %s: %w", *stateDir, err)
			}
			alive := "running"
			if st.State == daemon.StateConverging {
				alive = "converging (first pass not done yet)"
			}
			if unix.Kill(st.PID, 0) != nil {
				alive = "NOT RUNNING (datapath may still be pinned)"
			}
			mode := st.TCMode
			if mode == "" {
				mode = "-"
			}
			fmt.Printf("daemon pid %d %s, tc mode %s, updated %s ago\n", st.PID, alive, mode,
				time.Since(st.Updated).Truncate(time.Millisecond))
			if st.ProbeFallback {
				fmt.Println("all probed uplinks failing at once: using link state")
			}
			m, _ := loader.OpenPinned(*pinDir)
			w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "UPLINK\tIFACE\tID\tMARK\tSTATE\tWEIGHT\tTABLE\tADDRESSES\tRTT\tLOSS\tRX BYTES\tTX BYTES\tNEW FLOWS\tREASON")
			for _, u := range st.Uplinks {
				id := u.ID
				state := "down"
				if u.Usable {
					state = "up"
				}
				var c maps.Counters
				if m != nil {
					c, _ = m.UplinkCounters(id)
				}
				rtt, loss := "-", "-"
				if u.Probed {
					rtt, loss = fmt.Sprintf("%.1fms", u.RTTms), fmt.Sprintf("%.0f%%", u.Loss*100)
				}
				fmt.Fprintf(w, "%s\t%s\t%d\t%#x\t%s\t%d\t%d\t%s\t%s\t%s\t%d\t%d\t%d\t%s\n", u.Name, u.Interface, id, u.Mark, state, u.Weight, u.Table,
					strings.Join(u.Addresses, ","), rtt, loss, c.RxBytes, c.TxBytes, c.NewFlows, u.Reason)
			}
			if m != nil {
				m.Close()
			}
			return w.Flush()
		},
	}
}

// The flow map's times are CLOCK_MONOTONIC (bpf_ktime_get_ns).
func monotonicNow() time.Duration {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return time.Duration(ts.Nano())
}

func ago(now, t time.Duration) string {
	if t == 0 || t > now {
		return "-"
	}
	return (now - t).Truncate(time.Second).String()
}
