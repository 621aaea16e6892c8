package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/mhbpf/mhbpf/internal/lab"
)

func labCmd() *cobra.Command {
	var length time.Duration
	cmd := &cobra.Command{
		Use:   "lab",
		Short: "Build the reference scenario in network namespaces, run mhbpf on it, show failover and recovery",
		Long: `lab builds docs/scenario.md in network namespaces (router, two ISPs shaped to 8 and
2 Mbit/s, an internet, a company reached by a real OpenVPN tunnel, a LAN),
runs the daemon on the embedded example configuration, drives traffic and
shows each uplink live. It takes isp1 down and back up on the way. Ctrl-C, or
the end, removes everything it made; the host's own network is never touched.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			bin, err := os.Executable()
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			log, err := os.CreateTemp("", "mhbpf-lab-daemon-*.log")
			if err != nil {
				return err
			}
			defer log.Close()
			fmt.Printf("building the scenario (daemon log: %s) ...\n", log.Name())
			l, err := lab.Start(bin, log)
			if err != nil {
				return fmt.Errorf("%w (daemon log kept: %s)", err, log.Name())
			}
			defer l.Close()
			fmt.Printf("namespaces: router %s, isp1 %s, isp2 %s, internet %s, company %s, lan %s\n",
				l.Router, l.ISP1, l.ISP2, l.Inet, l.Company, l.LAN)
			fmt.Printf("try in another shell: %s --pin-dir %s --state-dir %s status\n", bin, l.PinDir, l.StateDir)
			if err := l.Demo(ctx, os.Stdout, length); err != nil {
				return fmt.Errorf("%w (daemon log kept: %s)", err, log.Name())
			}
			_ = os.Remove(log.Name()) // everything the lab made goes
			return nil
		},
	}
	cmd.Flags().DurationVar(&length, "duration", 30*time.Second, "how long the demo runs")
	return cmd
}
