package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/daemon"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
)

// statusJSON is 'mhbpf status --json'; docs/cli.md documents it field by
// field. Fields are only ever added, never renamed or retyped.
type statusJSON struct {
	Health        string    `json:"health"` // healthy, degraded, down, not-running
	ExitCode      int       `json:"exit_code"`
	Running       bool      `json:"running"`
	PID           int       `json:"pid"`
	State         string    `json:"state"` // converging, running (as the daemon last wrote it)
	TCMode        string    `json:"tc_mode"`
	Updated       time.Time `json:"updated"`
	AgeSeconds    float64   `json:"age_seconds"`
	ProbeFallback bool      `json:"probe_fallback"`
	// Memory as of the daemon's last pass (0: not known).
	ResidentBytes     uint64             `json:"resident_bytes"`
	PeakResidentBytes uint64             `json:"peak_resident_bytes"`
	PolicyKernelBytes uint64             `json:"policy_kernel_bytes"`
	Uplinks           []uplinkStatusJSON `json:"uplinks"`
}

type uplinkStatusJSON struct {
	Name      string       `json:"name"`
	Interface string       `json:"interface"`
	ID        int          `json:"id"`
	Mark      uint32       `json:"mark"`
	Table     int          `json:"table"`
	Weight    uint16       `json:"weight"`
	Usable    bool         `json:"usable"`
	Reason    string       `json:"reason"`
	Addresses []string     `json:"addresses"`
	Probed    bool         `json:"probed"`
	RTTms     *float64     `json:"rtt_ms"` // null when not probed
	Loss      *float64     `json:"loss"`   // 0..1, null when not probed
	Counters  countersJSON `json:"counters"`
}

type countersJSON struct {
	RxPackets uint64 `json:"rx_packets"`
	RxBytes   uint64 `json:"rx_bytes"`
	TxPackets uint64 `json:"tx_packets"`
	TxBytes   uint64 `json:"tx_bytes"`
	NewFlows  uint64 `json:"new_flows"`
}

// health is the verdict a monitoring system wants from the status: the
// word and the exit code.
func health(st daemon.Status, alive bool) (string, int) {
	if !alive {
		return "not-running", exitNotRunning
	}
	usable := 0
	for _, u := range st.Uplinks {
		if u.Usable {
			usable++
		}
	}
	// Before its first pass the daemon has observed nothing: not "down".
	switch {
	case st.State == daemon.StateConverging:
		return "degraded", exitDegraded
	case usable == 0:
		return "down", exitAllDown
	case usable < len(st.Uplinks) || st.ProbeFallback:
		return "degraded", exitDegraded
	}
	return "healthy", exitHealthy
}

func statusCmd(pinDir, stateDir *string) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status [--json]",
		Short: "Show each uplink's state, the reason, probes and counters; the exit code says whether all are up",
		Long: `Show the daemon's last status: each uplink's state and why, addresses, probes
and counters.

Exit code: 0 every uplink usable, 3 degraded (an uplink is out, the first pass
is not done, or every probe fails and link state is used), 4 no uplink usable,
5 the daemon is not running (no status, or its process is gone), 1 an error.
--json prints the same as one JSON object (schema in docs/cli.md).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := daemon.LoadStatus(*stateDir)
			if errors.Is(err, fs.ErrNotExist) {
				if asJSON {
					_ = printJSON(statusJSON{Health: "not-running", ExitCode: exitNotRunning, Uplinks: []uplinkStatusJSON{}})
				}
				return exitWith(exitNotRunning, "no daemon status in %s: is the daemon running?", *stateDir)
			}
			if err != nil {
				return fmt.Errorf("daemon status in %s: %w", *stateDir, err)
			}
			alive := unix.Kill(st.PID, 0) == nil
			word, code := health(st, alive)
			m, _ := loader.OpenPinned(*pinDir) // without pins, counters are zero
			if m != nil {
				defer m.Close()
			}
			counters := func(id int) maps.Counters {
				var c maps.Counters
				if m != nil {
					c, _ = m.UplinkCounters(id)
				}
				return c
			}
			if asJSON {
				err = printJSON(statusAsJSON(st, alive, word, code, counters))
			} else {
				err = printStatus(st, alive, counters)
			}
			if err != nil {
				return err
			}
			if code != exitHealthy {
				return exitWith(code, "")
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object (schema: docs/cli.md)")
	return cmd
}

func statusAsJSON(st daemon.Status, alive bool, word string, code int, counters func(int) maps.Counters) statusJSON {
	out := statusJSON{Health: word, ExitCode: code, Running: alive, PID: st.PID, State: st.State, TCMode: st.TCMode,
		Updated: st.Updated, AgeSeconds: time.Since(st.Updated).Seconds(), ProbeFallback: st.ProbeFallback,
		ResidentBytes: st.ResidentBytes, PeakResidentBytes: st.PeakResidentBytes, PolicyKernelBytes: st.PolicyKernelBytes,
		Uplinks: []uplinkStatusJSON{}}
	for _, u := range st.Uplinks {
		c := counters(u.ID)
		j := uplinkStatusJSON{Name: u.Name, Interface: u.Interface, ID: u.ID, Mark: u.Mark, Table: u.Table,
			Weight: u.Weight, Usable: u.Usable, Reason: u.Reason, Addresses: u.Addresses, Probed: u.Probed,
			Counters: countersJSON{RxPackets: c.RxPackets, RxBytes: c.RxBytes, TxPackets: c.TxPackets,
				TxBytes: c.TxBytes, NewFlows: c.NewFlows}}
		if j.Addresses == nil {
			j.Addresses = []string{}
		}
		if u.Probed {
			rtt, loss := u.RTTms, u.Loss
			j.RTTms, j.Loss = &rtt, &loss
		}
		out.Uplinks = append(out.Uplinks, j)
	}
	return out
}

func printStatus(st daemon.Status, alive bool, counters func(int) maps.Counters) error {
	state := "running"
	if st.State == daemon.StateConverging {
		state = "converging (first pass not done yet)"
	}
	if !alive {
		state = "NOT RUNNING (datapath may still be pinned)"
	}
	mode := st.TCMode
	if mode == "" {
		mode = "-"
	}
	fmt.Printf("daemon pid %d %s, tc mode %s, updated %s ago\n", st.PID, state, mode,
		time.Since(st.Updated).Truncate(time.Millisecond))
	if st.ProbeFallback {
		fmt.Println("all probed uplinks failing at once: using link state")
	}
	if st.ResidentBytes > 0 {
		fmt.Println(memoryLine(st))
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "UPLINK\tIFACE\tID\tMARK\tSTATE\tWEIGHT\tTABLE\tADDRESSES\tRTT\tLOSS\tRX BYTES\tTX BYTES\tNEW FLOWS\tREASON")
	for _, u := range st.Uplinks {
		state := "down"
		if u.Usable {
			state = "up"
		}
		c := counters(u.ID)
		rtt, loss := "-", "-"
		if u.Probed {
			rtt, loss = fmt.Sprintf("%.1fms", u.RTTms), fmt.Sprintf("%.0f%%", u.Loss*100)
		}
		fmt.Fprintf(w, "%s\t%s\t%d\t%#x\t%s\t%d\t%d\t%s\t%s\t%s\t%d\t%d\t%d\t%s\n", u.Name, u.Interface, u.ID, u.Mark, state, u.Weight, u.Table,
			strings.Join(u.Addresses, ","), rtt, loss, c.RxBytes, c.TxBytes, c.NewFlows, u.Reason)
	}
	return w.Flush()
}

// memoryLine is the status's memory figures in decimal units, as the
// policy install logs them in bytes.
func memoryLine(st daemon.Status) string {
	return fmt.Sprintf("memory: daemon %s resident (peak %s), policy %s in the kernel",
		sizeText(st.ResidentBytes), sizeText(st.PeakResidentBytes), sizeText(st.PolicyKernelBytes))
}

func sizeText(b uint64) string {
	switch {
	case b >= 1e9:
		return fmt.Sprintf("%.1f GB", float64(b)/1e9)
	case b >= 1e6:
		return fmt.Sprintf("%.1f MB", float64(b)/1e6)
	case b >= 1e3:
		return fmt.Sprintf("%.1f kB", float64(b)/1e3)
	}
	return fmt.Sprintf("%d B", b)
}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
