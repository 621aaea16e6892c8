// Command testsum runs a `go test -json` command and makes its result
// impossible to misread. It shows what a plain `go test` shows (a line per
// package, the output of every failed test), and also every skipped test
// with its reason, then ends with one line of counts. It fails when:
//
//   - a test failed, or did not finish (panic, timeout), or the command failed;
//   - a test skipped and the allow-list has no entry for that skip where the
//     suite runs (-where host, -where vm): a skip is a claim left unchecked,
//     so each one must be a known kernel-feature gap of that kernel;
//   - a test named with -expect did not run (renamed or removed: a -run
//     pattern would drop it silently), or, with -require-tests, a package
//     named to be run has no tests;
//   - no test ran at all.
//
// Usage:
//
//	testsum -where host [-allow FILE] [-expect "TestA TestB"] [-require-tests] [-record FILE] -- go test -json ./...
//	testsum -total FILE...   # one line over the runs recorded in the files
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sort"
	"strings"
	"time"
)

// event is one line of `go test -json` (cmd/test2json).
type event struct {
	Action     string
	Package    string
	Test       string
	Output     string
	Elapsed    float64
	ImportPath string // build-output, build-fail
}

// allowed is one entry of the allow-list: a skip of test in pkg, where the
// suite runs, whose message contains reason.
type allowed struct {
	where, pkg, test, reason string
	line                     int
}

// parseAllowList reads entries "WHERE PACKAGE TEST REASON...", one a line;
// '#' starts a comment. PACKAGE is an import path, or its end after a '/'
// ("test", "internal/loader").
func parseAllowList(r io.Reader) ([]allowed, error) {
	var out []allowed
	s := bufio.NewScanner(r)
	for n := 1; s.Scan(); n++ {
		line := s.Text()
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if len(f) < 4 {
			return nil, fmt.Errorf("line %d: want WHERE PACKAGE TEST REASON, got %q", n, s.Text())
		}
		out = append(out, allowed{where: f[0], pkg: f[1], test: f[2], reason: strings.Join(f[3:], " "), line: n})
	}
	return out, s.Err()
}

func (a allowed) matches(where, pkg, test, msg string) bool {
	return a.where == where && (pkg == a.pkg || strings.HasSuffix(pkg, "/"+a.pkg)) && test == a.test &&
		strings.Contains(strings.Join(strings.Fields(msg), " "), a.reason)
}

type testState struct {
	pkg, name string
	action    string // "" while running
	output    strings.Builder
	elapsed   float64
}

// message is a test's own output, without the framing lines go test adds.
func (t *testState) message() string {
	var keep []string
	for _, l := range strings.Split(t.output.String(), "\n") {
		tl := strings.TrimSpace(l)
		if tl == "" || strings.HasPrefix(tl, "=== ") || strings.HasPrefix(tl, "--- ") {
			continue
		}
		keep = append(keep, tl)
	}
	return strings.Join(keep, " | ")
}

// Summary is the outcome of one run, as recorded for -total.
type Summary struct {
	Where                  string
	Tests, Passed, Failed  int
	Skipped, SkipsAllowed  int
	Packages, PackagesFail int
	NoTests                int
	Problems               []string
	Seconds                float64
}

func (s Summary) OK() bool { return len(s.Problems) == 0 }

func (s Summary) Line() string {
	verdict := "OK"
	if !s.OK() {
		verdict = "FAILED"
	}
	return fmt.Sprintf("DONE %s: %s: %d tests: %d passed, %d failed, %d skipped (%d allowed, %d not allowed); %d packages (%d failed, %d without tests) in %s",
		s.Where, verdict, s.Tests, s.Passed, s.Failed, s.Skipped, s.SkipsAllowed, s.Skipped-s.SkipsAllowed,
		s.Packages, s.PackagesFail, s.NoTests, (time.Duration(s.Seconds * float64(time.Second))).Round(time.Second))
}

type summarizer struct {
	where        string
	requireTests bool // a package without tests is a failure
	allow        []allowed
	expect       []string
	out          io.Writer

	tests    map[string]*testState // pkg + "\x00" + name
	order    []string
	pkgOut   map[string]*strings.Builder
	pkgs     map[string]string // pkg -> pass, fail, skip
	build    map[string]*strings.Builder
	sum      Summary
	notAllow []string
}

func newSummarizer(where string, allow []allowed, expect []string, out io.Writer) *summarizer {
	return &summarizer{where: where, allow: allow, expect: expect, out: out, tests: map[string]*testState{},
		pkgOut: map[string]*strings.Builder{}, pkgs: map[string]string{}, build: map[string]*strings.Builder{},
		sum: Summary{Where: where}}
}

// line takes one line of the command's output: an event, or anything else
// (printed as it is).
func (s *summarizer) line(raw string) {
	var e event
	if !strings.HasPrefix(raw, "{") || json.Unmarshal([]byte(raw), &e) != nil || e.Action == "" {
		fmt.Fprintln(s.out, raw)
		return
	}
	switch e.Action {
	case "build-output":
		b := s.build[e.ImportPath]
		if b == nil {
			b = &strings.Builder{}
			s.build[e.ImportPath] = b
		}
		b.WriteString(e.Output)
		return
	case "build-fail":
		if b := s.build[e.ImportPath]; b != nil {
			fmt.Fprint(s.out, b.String())
		}
		return
	}
	if e.Test == "" {
		s.packageEvent(e)
		return
	}
	key := e.Package + "\x00" + e.Test
	t := s.tests[key]
	if t == nil {
		t = &testState{pkg: e.Package, name: e.Test}
		s.tests[key] = t
		s.order = append(s.order, key)
	}
	switch e.Action {
	case "output":
		t.output.WriteString(e.Output)
	case "pass", "fail", "skip":
		t.action, t.elapsed = e.Action, e.Elapsed
		s.testDone(t)
	}
}

func (s *summarizer) testDone(t *testState) {
	s.sum.Tests++
	switch t.action {
	case "pass":
		s.sum.Passed++
	case "fail":
		s.sum.Failed++
		fmt.Fprintf(s.out, "--- FAIL: %s %s (%.2fs)\n%s", short(t.pkg), t.name, t.elapsed, indentOutput(t.output.String()))
	case "skip":
		s.sum.Skipped++
		msg := t.message()
		for _, a := range s.allow {
			if a.matches(s.where, t.pkg, t.name, msg) {
				s.sum.SkipsAllowed++
				fmt.Fprintf(s.out, "--- SKIP: %s %s: %s\n    allowed on %s (allow-list line %d)\n", short(t.pkg), t.name, msg, s.where, a.line)
				return
			}
		}
		fmt.Fprintf(s.out, "--- SKIP: %s %s: %s\n    NOT ALLOWED on %s: no allow-list entry for this skip\n", short(t.pkg), t.name, msg, s.where)
		s.notAllow = append(s.notAllow, short(t.pkg)+" "+t.name)
	}
}

func (s *summarizer) packageEvent(e event) {
	switch e.Action {
	case "output":
		b := s.pkgOut[e.Package]
		if b == nil {
			b = &strings.Builder{}
			s.pkgOut[e.Package] = b
		}
		b.WriteString(e.Output)
	case "pass", "fail", "skip":
		s.pkgs[e.Package] = e.Action
		s.sum.Packages++
		// Tests still running when their package ended: a panic, a
		// timeout, os.Exit. Their output is all there is to see.
		unfinished := 0
		for _, k := range s.order {
			if t := s.tests[k]; t.pkg == e.Package && t.action == "" {
				t.action = "fail"
				unfinished++
				fmt.Fprintf(s.out, "--- DID NOT FINISH: %s %s\n%s", short(t.pkg), t.name, indentOutput(t.output.String()))
				s.sum.Tests++
				s.sum.Failed++
			}
		}
		switch {
		case e.Action == "skip":
			s.sum.NoTests++
			fmt.Fprintf(s.out, "?    %s [no test files]\n", e.Package)
			if s.requireTests {
				s.sum.Problems = append(s.sum.Problems, "package "+short(e.Package)+" has no tests")
			}
		case e.Action == "pass":
			fmt.Fprintf(s.out, "ok   %s %.1fs\n", e.Package, e.Elapsed)
		default:
			s.sum.PackagesFail++
			if b := s.pkgOut[e.Package]; b != nil && (unfinished > 0 || !s.anyFailed(e.Package)) {
				fmt.Fprint(s.out, indentOutput(b.String()))
			}
			fmt.Fprintf(s.out, "FAIL %s %.1fs\n", e.Package, e.Elapsed)
		}
	}
}

func (s *summarizer) anyFailed(pkg string) bool {
	for _, t := range s.tests {
		if t.pkg == pkg && t.action == "fail" {
			return true
		}
	}
	return false
}

// finish judges the run; cmdErr is how the command ended.
func (s *summarizer) finish(cmdErr error, took time.Duration) Summary {
	s.sum.Seconds = took.Seconds()
	p := &s.sum.Problems
	if s.sum.Failed > 0 {
		*p = append(*p, fmt.Sprintf("%d tests failed", s.sum.Failed))
	}
	if s.sum.PackagesFail > 0 {
		*p = append(*p, fmt.Sprintf("%d packages failed", s.sum.PackagesFail))
	}
	for _, n := range s.notAllow {
		*p = append(*p, "skip not on the allow-list for "+s.where+": "+n)
	}
	ran := map[string]bool{}
	for _, t := range s.tests {
		if t.action != "" {
			ran[t.name] = true
		}
	}
	for _, name := range s.expect {
		if !ran[name] {
			*p = append(*p, "named test "+name+" did not run: no such test (renamed or removed?)")
		}
	}
	if s.sum.Tests == 0 {
		*p = append(*p, "no test ran")
	}
	if cmdErr != nil {
		*p = append(*p, "the test command failed: "+cmdErr.Error())
	}
	return s.sum
}

func short(pkg string) string { return strings.TrimPrefix(pkg, "github.com/mhbpf/mhbpf/") }

func indentOutput(s string) string {
	if s == "" {
		return ""
	}
	if !strings.HasSuffix(s, "\n") {
		s += "\n"
	}
	return s
}

func main() {
	where := flag.String("where", "", "where the suite runs (host, vm): selects the allow-list entries")
	allowFile := flag.String("allow", ".ci/allowed-skips", "the allow-list of skips")
	expect := flag.String("expect", "", "test names (space separated) that must run")
	requireTests := flag.Bool("require-tests", false, "fail on a package without tests (for a list of packages named to be run)")
	record := flag.String("record", "", "append this run's summary (JSON) to this file")
	jsonFile := flag.String("jsonfile", "", "also write the command's raw output here")
	total := flag.Bool("total", false, "print one line over the runs recorded in the files given, and fail if any failed")
	flag.Parse()
	if *total {
		os.Exit(printTotal(flag.Args()))
	}
	if *where == "" || flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: testsum -where WHERE [-allow FILE] [-expect NAMES] [-record FILE] -- COMMAND...")
		os.Exit(2)
	}
	f, err := os.Open(*allowFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, "testsum:", err)
		os.Exit(2)
	}
	allow, err := parseAllowList(f)
	f.Close()
	if err != nil {
		fmt.Fprintf(os.Stderr, "testsum: %s: %v\n", *allowFile, err)
		os.Exit(2)
	}
	s := newSummarizer(*where, allow, strings.Fields(*expect), os.Stdout)
	s.requireTests = *requireTests

	cmd := exec.Command(flag.Arg(0), flag.Args()[1:]...)
	cmd.Stderr = os.Stderr
	cmd.Stdin = os.Stdin
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		fmt.Fprintln(os.Stderr, "testsum:", err)
		os.Exit(2)
	}
	var raw io.Writer = io.Discard
	if *jsonFile != "" {
		jf, err := os.Create(*jsonFile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "testsum:", err)
			os.Exit(2)
		}
		defer jf.Close()
		raw = jf
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "testsum:", err)
		os.Exit(2)
	}
	r := bufio.NewReader(io.TeeReader(stdout, raw))
	for {
		l, err := r.ReadString('\n')
		if l != "" {
			s.line(strings.TrimRight(l, "\n"))
		}
		if err != nil {
			break
		}
	}
	sum := s.finish(cmd.Wait(), time.Since(start))
	if *record != "" {
		if err := appendRecord(*record, sum); err != nil {
			fmt.Fprintln(os.Stderr, "testsum:", err)
			os.Exit(2)
		}
	}
	for _, p := range sum.Problems {
		fmt.Println("PROBLEM:", p)
	}
	fmt.Println(sum.Line())
	if !sum.OK() {
		os.Exit(1)
	}
}

func appendRecord(path string, s Summary) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	b, _ := json.Marshal(s)
	_, err = f.Write(append(b, '\n'))
	return errors.Join(err, f.Close())
}

// printTotal adds up the recorded runs: the last line of `make test`.
func printTotal(paths []string) int {
	var b []byte
	for _, p := range paths {
		c, err := os.ReadFile(p)
		if err != nil {
			fmt.Fprintln(os.Stderr, "testsum:", err)
			return 2
		}
		b = append(append(b, c...), '\n')
	}
	path := strings.Join(paths, " ")
	var all Summary
	var parts []string
	ok := true
	byWhere := map[string]*Summary{}
	var wheres []string
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if l == "" {
			continue
		}
		var s Summary
		if err := json.Unmarshal([]byte(l), &s); err != nil {
			fmt.Fprintf(os.Stderr, "testsum: %s: %v\n", path, err)
			return 2
		}
		ok = ok && s.OK()
		w := byWhere[s.Where]
		if w == nil {
			w = &Summary{Where: s.Where}
			byWhere[s.Where] = w
			wheres = append(wheres, s.Where)
		}
		for _, x := range []*Summary{w, &all} {
			x.Tests += s.Tests
			x.Passed += s.Passed
			x.Failed += s.Failed
			x.Skipped += s.Skipped
			x.SkipsAllowed += s.SkipsAllowed
			x.Seconds += s.Seconds
		}
	}
	if len(wheres) == 0 {
		fmt.Fprintf(os.Stderr, "testsum: %s records no run\n", path)
		return 1
	}
	sort.Strings(wheres)
	for _, w := range wheres {
		s := byWhere[w]
		parts = append(parts, fmt.Sprintf("%s %d passed, %d failed, %d skipped (%d allowed)", w, s.Passed, s.Failed, s.Skipped, s.SkipsAllowed))
	}
	verdict := "OK"
	if !ok {
		verdict = "FAILED"
	}
	fmt.Printf("TOTAL: %s: %d tests: %d passed, %d failed, %d skipped (%d allowed, %d not allowed) [%s] in %s\n",
		verdict, all.Tests, all.Passed, all.Failed, all.Skipped, all.SkipsAllowed, all.Skipped-all.SkipsAllowed,
		strings.Join(parts, "; "), (time.Duration(all.Seconds * float64(time.Second))).Round(time.Second))
	if !ok {
		return 1
	}
	return 0
}
