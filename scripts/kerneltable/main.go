// Command kerneltable writes the README's table of supported kernels from
// what `mhbpf kernel --json` probed on each VM kernel (test-vm leaves one
// report per kernel in bin/test-results/kernel-vm-*.json), or with -check
// fails if the committed table differs from the one the probes make.
//
//	go run ./scripts/kerneltable [-check] -readme README.md bin/test-results/kernel-vm-*.json
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
)

const (
	begin = "<!-- kernel table: made by scripts/kerneltable from `mhbpf kernel --json` on each VM kernel; do not edit -->"
	end   = "<!-- end of kernel table -->"
)

type feature struct {
	Name    string `json:"name"`
	Since   string `json:"since"`
	Have    bool   `json:"have"`
	Without string `json:"without"`
}

type report struct {
	Kernel   string    `json:"kernel"`
	TCMode   string    `json:"tc_mode"`
	Features []feature `json:"features"`
}

// Where the VM suite's kernels come from.
var origin = map[string]string{
	"5.10": "Debian 11",
	"6.1":  "Debian 12",
	"6.12": "Debian 12 (bookworm-security)",
}

func majorMinor(release string) (string, [2]int) {
	f := strings.SplitN(release, ".", 3)
	if len(f) < 2 {
		return release, [2]int{}
	}
	a, _ := strconv.Atoi(f[0])
	b, _ := strconv.Atoi(f[1])
	return f[0] + "." + f[1], [2]int{a, b}
}

func table(reports []report) string {
	sort.Slice(reports, func(i, j int) bool {
		_, a := majorMinor(reports[i].Kernel)
		_, b := majorMinor(reports[j].Kernel)
		return a[0] < b[0] || a[0] == b[0] && a[1] < b[1]
	})
	var b strings.Builder
	b.WriteString("| kernel (tested in the VM suite) | from | tc attach | lacks, and what mhbpf does instead |\n|---|---|---|---|\n")
	for _, r := range reports {
		mm, _ := majorMinor(r.Kernel)
		var lacks []string
		for _, f := range r.Features {
			if !f.Have {
				lacks = append(lacks, fmt.Sprintf("%s (%s): %s", f.Name, f.Since, f.Without))
			}
		}
		l := "nothing"
		if len(lacks) > 0 {
			l = strings.Join(lacks, "; ")
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", r.Kernel, origin[mm], r.TCMode, l)
	}
	return b.String()
}

func main() {
	check := flag.Bool("check", false, "fail if the README's table differs from the generated one")
	readme := flag.String("readme", "README.md", "the README to write or check")
	flag.Parse()
	if flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "kerneltable: no kernel reports (run make test-vm first)")
		os.Exit(2)
	}
	var reports []report
	for _, p := range flag.Args() {
		b, err := os.ReadFile(p)
		if err != nil {
			fmt.Fprintln(os.Stderr, "kerneltable:", err)
			os.Exit(2)
		}
		var r report
		if err := json.Unmarshal(b, &r); err != nil || r.Kernel == "" {
			fmt.Fprintf(os.Stderr, "kerneltable: %s: not a kernel report: %v\n", p, err)
			os.Exit(2)
		}
		reports = append(reports, r)
	}
	want := table(reports)

	doc, err := os.ReadFile(*readme)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kerneltable:", err)
		os.Exit(2)
	}
	i, j := bytes.Index(doc, []byte(begin)), bytes.Index(doc, []byte(end))
	if i < 0 || j < i {
		fmt.Fprintf(os.Stderr, "kerneltable: %s has no kernel table markers\n", *readme)
		os.Exit(2)
	}
	have := string(doc[i+len(begin)+1 : j])
	if *check {
		if have != want {
			fmt.Fprintf(os.Stderr, "kerneltable: the kernel table in %s is not what the probes say: run 'make kernel-table' and commit\n--- committed\n%s--- probed\n%s", *readme, have, want)
			os.Exit(1)
		}
		fmt.Printf("kerneltable: %s's kernel table matches the probes of %d kernels\n", *readme, len(reports))
		return
	}
	out := append(append(append([]byte{}, doc[:i+len(begin)+1]...), want...), doc[j:]...)
	if err := os.WriteFile(*readme, out, 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "kerneltable:", err)
		os.Exit(2)
	}
}
