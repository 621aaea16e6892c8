package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/mhbpf/mhbpf/internal/config"
	"github.com/mhbpf/mhbpf/internal/daemon"
	"github.com/mhbpf/mhbpf/internal/loader"
)

func runCmd() *cobra.Command {
	var cfgPath string
	var debug bool
	cmd := &cobra.Command{
		Use:   "run --config FILE",
		Short: "Run the daemon in the foreground (SIGHUP reloads, SIGTERM exits leaving the datapath)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			level := slog.LevelInfo
			if debug {
				level = slog.LevelDebug
			}
			log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
			d, err := daemon.New(cfgPath, log)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			hup := make(chan os.Signal, 1)
			signal.Notify(hup, syscall.SIGHUP)
			reload := make(chan struct{}, 1)
			go func() {
				for range hup {
					select {
					case reload <- struct{}{}:
					default:
					}
				}
			}()
			return d.Run(ctx, reload)
		},
	}
	cmd.Flags().StringVarP(&cfgPath, "config", "c", "/etc/mhbpf/mhbpf.toml", "configuration file")
	cmd.Flags().BoolVar(&debug, "debug", false, "log every routing change")
	return cmd
}

func checkCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "check FILE",
		Short: "Validate a configuration file without touching the system",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := config.Load(args[0])
			if err != nil {
				return err
			}
			fmt.Printf("%s: ok: %d uplinks, %d LAN interfaces, %d policies\n", args[0], len(c.Uplinks), len(c.LAN.Interfaces), len(c.Policies))
			warnUpgrade(&c.Global)
			return nil
		},
	}
}

// warnUpgrade says what starting with g would do to maps pinned by an
// earlier run of another size or layout. Reading them needs root; without
// it there is only a note.
func warnUpgrade(g *config.Global) {
	plan, err := loader.PlanUpgrade(loader.Options{PinDir: g.PinDir, FlowMapSize: g.FlowMapSize, InboundMapSize: g.InboundMapSize})
	if err != nil {
		fmt.Printf("note: cannot compare with the maps pinned at %s: %v\n", g.PinDir, err)
		return
	}
	for _, u := range plan {
		what := map[loader.MapAction]string{
			loader.ActionResize:  "its entries will be copied into a new map",
			loader.ActionConvert: "its entries will be converted to the new layout",
			loader.ActionRebuild: "no converter knows the old layout: it will be rebuilt empty, its entries lost",
			loader.ActionSplit:   "its entries will be moved into " + strings.Join(u.Into, ", "),
		}[u.Action]
		if u.Action == loader.ActionRebuild && len(u.Into) > 0 {
			what = "no split knows its layout: its entries are lost, " + strings.Join(u.Into, ", ") + " start empty"
		}
		fmt.Printf("warning: pinned map %s will be migrated (%s): %s -> %s: %s\n", u.Map, u.Action, u.Old, u.New, what)
	}
}

func downCmd(pinDir, stateDir *string) *cobra.Command {
	var stop bool
	var stopWait time.Duration
	cmd := &cobra.Command{
		Use:   "down [--stop]",
		Short: "Remove every rule, route, nftables table, attachment and pin of mhbpf, put back the routes it replaced and restore the sysctls (also after a crash)",
		Long: `Remove everything mhbpf installed and put back what it changed: the routes
it replaced (main's default route of pppd or a DHCP client) and the sysctls.
Works without a daemon, also after kill -9, and finds mhbpf's rules and
routes by its protocol even when the state directory is gone.

It refuses while a daemon runs with the state directory (the daemon would
put everything back); --stop sends that daemon SIGTERM first and waits for it.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var unlock func()
			var err error
			if stop {
				unlock, err = daemon.StopDaemon(*stateDir, stopWait)
			} else {
				unlock, err = daemon.LockForDown(*stateDir)
			}
			if err != nil {
				return err
			}
			defer unlock()
			s, err := daemon.LoadSettings(*stateDir)
			if err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
			if cmd.Flags().Changed("pin-dir") {
				s.PinDir = *pinDir
			}
			log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{
				ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
					if len(groups) == 0 && a.Key == slog.TimeKey {
						return slog.Attr{}
					}
					return a
				}}))
			return daemon.Down(*stateDir, s, log)
		},
	}
	cmd.Flags().BoolVar(&stop, "stop", false, "stop the running daemon (SIGTERM) first, then remove everything")
	cmd.Flags().DurationVar(&stopWait, "stop-timeout", 10*time.Second, "with --stop: how long to wait for the daemon to exit")
	return cmd
}
