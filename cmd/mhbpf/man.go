package main

import (
	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
)

// manCmd writes one man page per command (mhbpf(1), mhbpf-status(1), ...)
// from the commands' own help: the Debian package ships them, so they
// cannot drift from the binary.
func manCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "man DIR",
		Short:  "Write the man pages of every command into DIR",
		Hidden: true,
		Args:   cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			root := cmd.Root()
			root.DisableAutoGenTag = true // reproducible: no build date
			return doc.GenManTree(root, &doc.GenManHeader{Title: "MHBPF", Section: "1", Source: "mhbpf", Manual: "mhbpf manual"}, args[0])
		},
	}
}
