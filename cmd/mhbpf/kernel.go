package main

import (
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/loader"
)

// kernelReport is what `mhbpf kernel --json` prints; the README's kernel
// table is made from one per kernel (scripts/kerneltable).
type kernelReport struct {
	Kernel   string                 `json:"kernel"`
	TCMode   loader.Mode            `json:"tc_mode"`
	Features []loader.FeatureReport `json:"features"`
	Verifier []verifierLine         `json:"verifier,omitempty"`
}

type verifierLine struct {
	Program string  `json:"program"`
	Insns   int     `json:"insns"`
	States  int     `json:"states"`
	Millis  float64 `json:"ms"`
}

func kernelCmd() *cobra.Command {
	var asJSON, verifier bool
	cmd := &cobra.Command{
		Use:   "kernel",
		Short: "What this kernel offers the datapath: attach mode, features and their fallbacks, verifier cost per program",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f, err := loader.ProbeFeatures()
			if err != nil {
				return err
			}
			r := kernelReport{Kernel: kernelRelease(), TCMode: f.TCMode(), Features: f.Report()}
			if verifier {
				stats, err := loader.VerifierStats()
				if err != nil {
					return err
				}
				for _, s := range stats {
					r.Verifier = append(r.Verifier, verifierLine{s.Object + "/" + s.Program, s.Insns, s.States,
						float64(s.Time.Microseconds()) / 1000})
				}
			}
			if asJSON {
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(r)
			}
			fmt.Printf("kernel %s: tc attach mode %s\n", r.Kernel, r.TCMode)
			for _, x := range r.Features {
				if x.Have {
					fmt.Printf("  %-32s yes (since %s)\n", x.Name, x.Since)
				} else {
					fmt.Printf("  %-32s no (needs %s): %s\n", x.Name, x.Since, x.Without)
				}
			}
			for _, v := range r.Verifier {
				fmt.Printf("  verifier %-22s %7d insns %6d states %9s\n", v.Program, v.Insns, v.States,
					time.Duration(v.Millis*float64(time.Millisecond)).Round(10*time.Microsecond))
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	cmd.Flags().BoolVar(&verifier, "verifier", false, "load each program alone and report the verifier's instruction count and time")
	return cmd
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}
