// Command mhbpf is the multi-homing router: the daemon and its CLI.
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/mhbpf/mhbpf/internal/config"
	"github.com/mhbpf/mhbpf/internal/loader"
)

func main() {
	root := &cobra.Command{
		Use:           "mhbpf",
		Short:         "Multi-uplink routing with eBPF: balance, stickiness, policy, symmetric answers",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	pinDir := root.PersistentFlags().String("pin-dir", loader.DefaultPinDir, "bpffs directory of mhbpf's pinned maps and links")
	stateDir := root.PersistentFlags().String("state-dir", config.DefaultStateDir, "directory of the daemon's state and status files")
	root.AddCommand(runCmd(), checkCmd(), labCmd(), downCmd(pinDir, stateDir), statusCmd(pinDir, stateDir),
		flowsCmd(pinDir, stateDir), uplinksCmd(pinDir), kernelCmd(), explainCmd(pinDir, stateDir),
		execCmd(pinDir, stateDir), topCmd(pinDir, stateDir), manCmd())
	if err := root.Execute(); err != nil {
		var ec *exitCode
		if errors.As(err, &ec) {
			if ec.msg != "" {
				fmt.Fprintln(os.Stderr, "mhbpf:", ec.msg)
			}
			os.Exit(ec.code)
		}
		fmt.Fprintln(os.Stderr, "mhbpf:", err)
		os.Exit(exitError)
	}
}
