package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/daemon"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/top"
)

func topCmd(pinDir, stateDir *string) *cobra.Command {
	var interval time.Duration
	var iterations int
	cmd := &cobra.Command{
		Use:   "top [--interval 1s] [--iterations N]",
		Short: "Live per-uplink view: state and reason, rates, flows, new flows/s, RTT, loss, a short history",
		Long: `Show each uplink live, as the lab does: up or down and why, down and up rate
(Mbit/s: what arrived on the uplink, what the LAN sent out by it), the flows
on it, new flows per second, probe RTT and loss, and the down rate of the
last ` + fmt.Sprint(top.HistoryLen) + ` samples (× where the uplink was out). On a terminal it
redraws in place; otherwise it prints one table per sample. Ctrl-C ends it.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if interval <= 0 {
				return fmt.Errorf("--interval %v: must be positive", interval)
			}
			m, err := loader.OpenPinned(*pinDir)
			if err != nil {
				return err
			}
			defer m.Close()
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			s := top.NewSampler(m, func() (daemon.Status, error) { return daemon.LoadStatus(*stateDir) })
			_, ttyErr := unix.IoctlGetTermios(int(os.Stdout.Fd()), unix.TCGETS)
			tty := ttyErr == nil
			tick := time.NewTicker(interval)
			defer tick.Stop()
			for n := 0; iterations == 0 || n < iterations; n++ {
				fr, err := s.Sample()
				if err != nil {
					return err
				}
				if tty {
					fmt.Print("\x1b[H\x1b[2J") // home, clear
				} else if n > 0 {
					fmt.Println()
				}
				if err := fr.Write(os.Stdout); err != nil {
					return err
				}
				if iterations != 0 && n == iterations-1 {
					break
				}
				select {
				case <-ctx.Done():
					return nil
				case <-tick.C:
				}
			}
			return nil
		},
	}
	cmd.Flags().DurationVar(&interval, "interval", time.Second, "time between samples")
	cmd.Flags().IntVar(&iterations, "iterations", 0, "stop after this many samples (0: until Ctrl-C)")
	return cmd
}
