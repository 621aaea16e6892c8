package main

import (
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
)

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
