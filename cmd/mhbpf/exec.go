package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/mhbpf/mhbpf/internal/daemon"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/uplinkexec"
)

func execCmd(pinDir, stateDir *string) *cobra.Command {
	var uplink string
	cmd := &cobra.Command{
		Use:   "exec --uplink NAME -- COMMAND [ARG...]",
		Short: "Run a command whose connections all leave by one uplink, with its address",
		Long: `Run COMMAND so that every socket it (and what it starts) creates leaves by
uplink NAME with that uplink's source address, whatever the policies say;
refuse if the uplink is down. The sockets are bound to the uplink's device:
destinations only reachable otherwise (the LAN, loopback, a VPN) are not
reachable from them. Run it in the daemon's network namespace. The exit code
is the command's.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if uplink == "" {
				return fmt.Errorf("--uplink is required")
			}
			st, err := daemon.LoadStatus(*stateDir)
			if err != nil {
				return fmt.Errorf("no daemon status in %s (needed to find the uplink): %w", *stateDir, err)
			}
			m, err := loader.OpenPinned(*pinDir)
			if err != nil {
				return err
			}
			u, err := uplinkexec.Resolve(m, st, uplink)
			m.Close()
			if err != nil {
				return err
			}
			code, err := uplinkexec.Run(u, args)
			if err != nil {
				return err
			}
			if code != 0 {
				return exitWith(code, "")
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&uplink, "uplink", "", "the uplink's name, as in 'mhbpf status'")
	cmd.Flags().SetInterspersed(false)
	return cmd
}
