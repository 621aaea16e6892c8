package main

import (
	"fmt"
	"net/netip"
	"os"

	"github.com/spf13/cobra"

	"github.com/mhbpf/mhbpf/internal/daemon"
	"github.com/mhbpf/mhbpf/internal/explain"
	"github.com/mhbpf/mhbpf/internal/flowfilter"
	"github.com/mhbpf/mhbpf/internal/loader"
)

func explainCmd(pinDir, stateDir *string) *cobra.Command {
	var src, proto string
	var port, sport uint16
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "explain DST [--src ADDR] [--proto tcp --port 443] [--sport N] [--json]",
		Short: "Say which uplink a new connection to DST would take now, and why, step by step",
		Long: `Say which uplink a new connection from a LAN host (--src) to DST would take
right now, and why: bypass, the policy that matches, its uplinks with their
tiers, weights and state, the sticky entry, the mark, and the fib rule, table
and route the kernel then uses.

The choice is the datapath's own: the attached LAN program's object, with its
load-time constants, runs on a synthetic first packet (BPF_PROG_TEST_RUN) on a
private copy of the live maps, so nothing is written to the live datapath (no
flow, no sticky entry, no counter). The route is the kernel's answer to a
route lookup with that mark. Run it in the daemon's network namespace.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			dst, err := netip.ParseAddr(args[0])
			if err != nil {
				return fmt.Errorf("destination %q: not an IP address", args[0])
			}
			q := explain.Query{Dst: dst, DstPort: port, SrcPort: sport}
			if src != "" {
				if q.Src, err = netip.ParseAddr(src); err != nil {
					return fmt.Errorf("--src %q: not an IP address", src)
				}
			}
			if q.Proto, err = flowfilter.ParseProto(proto); err != nil {
				return err
			}
			if q.Proto == 0 {
				return fmt.Errorf("--proto is required")
			}
			st, err := daemon.LoadStatus(*stateDir)
			if err != nil {
				return fmt.Errorf("no daemon status in %s (needed to name uplinks and policies): %w", *stateDir, err)
			}
			m, err := loader.OpenPinned(*pinDir)
			if err != nil {
				return err
			}
			defer m.Close()
			r, err := explain.Explain(m, st, q)
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(r)
			}
			return r.Write(os.Stdout)
		},
	}
	cmd.Flags().StringVar(&src, "src", "", "the LAN host the connection comes from (default: none, as from an address no source-restricted policy names)")
	cmd.Flags().StringVar(&proto, "proto", "tcp", "tcp, udp, icmp, icmpv6 or a protocol number")
	cmd.Flags().Uint16Var(&port, "port", 443, "destination port")
	cmd.Flags().Uint16Var(&sport, "sport", explain.DefaultSrcPort, "source port (only per-flow stickiness depends on it)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the answer as JSON (schema: docs/cli.md)")
	return cmd
}
