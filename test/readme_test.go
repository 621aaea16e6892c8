package test

// The README's commands run as written: the command lines of its
// "Running it" section and every "$ mhbpf ..." example, in README order,
// against a real daemon. A README that drifts from the CLI (a renamed
// flag or command, an exit code that changed) fails here.

import (
	"fmt"
	"os"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mhbpf/mhbpf/internal/topology"
)

// readmeStep is one thing the README shows: a command, or a change of the
// network a marker comment asks for (<!-- readme-test: isp1 down -->).
type readmeStep struct {
	line   int    // in README.md
	text   string // the command as written
	args   []string
	exit   int    // the README's "(exit code N)" after it; 0 without one
	marker string // instead of a command: "isp1 down", "isp1 up"
}

const readmeMarker = "<!-- readme-test: "

// readmeSteps reads the README's commands: in the section "## Running it",
// every indented line that starts with "mhbpf " (its "# ..." comment cut
// off); anywhere, every indented "$ mhbpf ..." line, with the exit code the
// README shows for it.
func readmeSteps(text string) ([]readmeStep, error) {
	lines := strings.Split(text, "\n")
	var steps []readmeStep
	section := ""
	for i, l := range lines {
		switch {
		case strings.HasPrefix(l, "## "):
			section = strings.TrimPrefix(l, "## ")
			continue
		case strings.HasPrefix(l, readmeMarker):
			steps = append(steps, readmeStep{line: i + 1, marker: strings.TrimSuffix(strings.TrimPrefix(l, readmeMarker), " -->")})
			continue
		case !strings.HasPrefix(l, "    "):
			continue
		}
		cmd := strings.TrimSpace(l)
		example := strings.HasPrefix(cmd, "$ mhbpf ")
		switch {
		case example:
			cmd = strings.TrimPrefix(cmd, "$ ")
		case section == "Running it" && strings.HasPrefix(cmd, "mhbpf "):
			if c, _, ok := strings.Cut(cmd, " #"); ok {
				cmd = strings.TrimSpace(c)
			}
		default:
			continue
		}
		args, err := shellWords(cmd)
		if err != nil {
			return nil, fmt.Errorf("README.md:%d: %v", i+1, err)
		}
		st := readmeStep{line: i + 1, text: cmd, args: args[1:]}
		// Its output runs to the next blank line; the last line may say
		// the exit code.
		for j := i + 1; example && j < len(lines) && strings.TrimSpace(lines[j]) != ""; j++ {
			if c, ok := strings.CutPrefix(strings.TrimSpace(lines[j]), "(exit code "); ok {
				if st.exit, err = strconv.Atoi(strings.TrimSuffix(c, ")")); err != nil {
					return nil, fmt.Errorf("README.md:%d: %q", j+1, lines[j])
				}
			}
		}
		steps = append(steps, st)
	}
	return steps, nil
}

// shellWords splits a command line as sh would one without expansions:
// words, and quoted strings ('...' or "...") as one.
func shellWords(s string) ([]string, error) {
	var words []string
	var w strings.Builder
	inWord := false
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case ' ', '\t':
			if inWord {
				words, inWord = append(words, w.String()), false
				w.Reset()
			}
		case '\'', '"':
			end := strings.IndexByte(s[i+1:], c)
			if end < 0 {
				return nil, fmt.Errorf("unclosed %c in %q", c, s)
			}
			w.WriteString(s[i+1 : i+1+end])
			i += end + 1
			inWord = true
		default:
			w.WriteByte(c)
			inWord = true
		}
	}
	if inWord {
		words = append(words, w.String())
	}
	return words, nil
}

// runsAgainstADaemon are the commands the test runs for real; the others
// (run, down, exec, top, lab: they start, stop or take over things) are
// checked as far as their command line: `--help` with the same flags
// fails on an unknown command or flag.
var runsAgainstADaemon = map[string]bool{"check": true, "status": true, "flows": true, "explain": true, "uplinks": true, "kernel": true}

// synopsis turns a usage line into a command: [--opt VALUE] is used, and
// the placeholders get the test network's values.
func synopsis(args []string, e *daemonEnv) []string {
	values := map[string]string{
		"DST": topology.Internet.String(), "HOST": topology.LANHost.String(), "N": "25", "NAME": "isp2",
		"/etc/mhbpf/mhbpf.toml": e.cfgPath,
	}
	var out []string
	for _, a := range args {
		a = strings.Trim(a, "[]")
		if v, ok := values[a]; ok {
			a = v
		}
		out = append(out, a)
	}
	return out
}

func TestReadmeCommandsRunAsWritten(t *testing.T) {
	text, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	steps, err := readmeSteps(string(text))
	if err != nil {
		t.Fatal(err)
	}
	e := newDaemonEnv(t, "", `
[[policy]]
name = "smtp"
protocol = "tcp"
ports = [25, 465, 587]
uplinks = ["isp1"]
last_resort = "unreachable"
`)
	e.start()
	e.waitFor("both uplinks up", 3*time.Second, func() bool { return e.mainVia("ppp0", "ppp1") })

	ran, parsed := map[string]int{}, 0
	for _, st := range steps {
		switch st.marker {
		case "":
		case "isp1 down":
			if err := e.topo.IP(e.topo.Router, "link", "set", "ppp0", "down"); err != nil {
				t.Fatal(err)
			}
			e.waitFor("isp1 out", 3*time.Second, func() bool { _, c := e.statusJSON(); return c == 3 })
			continue
		case "isp1 up":
			if err := e.topo.IP(e.topo.Router, "link", "set", "ppp0", "up"); err != nil {
				t.Fatal(err)
			}
			e.waitFor("isp1 back", 3*time.Second, func() bool { _, c := e.statusJSON(); return c == 0 })
			continue
		default:
			t.Fatalf("README.md:%d: unknown marker %q", st.line, st.marker)
		}
		args := synopsis(st.args, e)
		if !runsAgainstADaemon[args[0]] {
			out, err := e.mhbpf(append([]string{args[0], "--help"}, args[1:]...)...)
			if err != nil {
				t.Errorf("README.md:%d: %s: its command line does not parse: %v\n%s", st.line, st.text, err, out)
			}
			parsed++
			continue
		}
		out, err := e.mhbpf(args...)
		if code := exitCode(err); code != st.exit || strings.TrimSpace(out) == "" {
			t.Errorf("README.md:%d: %s (ran as mhbpf %s): exit %d, want %d\n%s", st.line, st.text, strings.Join(args, " "), code, st.exit, out)
		}
		ran[args[0]]++
	}
	t.Logf("README commands: ran %v, %d more checked as command lines", ran, parsed)
	// The README shows these: a parser that finds none has lost them.
	for _, c := range []string{"check", "status", "flows", "explain"} {
		if ran[c] == 0 {
			t.Errorf("no %q command found in README.md", c)
		}
	}
}

// The parser reads what the README's shapes are.
func TestReadmeSteps(t *testing.T) {
	steps, err := readmeSteps(`intro
    $ mhbpf status
    daemon running
    (exit code 3)

<!-- readme-test: isp1 up -->
    mhbpf check /etc/x.toml     # not this: not in Running it

## Running it

    mhbpf flows [--uplink NAME] [--json]  # the flow maps
    $ mhbpf exec --uplink isp2 -- sh -c 'echo via isp2'
    via isp2
`)
	if err != nil {
		t.Fatal(err)
	}
	want := []readmeStep{
		{line: 2, text: "mhbpf status", args: []string{"status"}, exit: 3},
		{line: 6, marker: "isp1 up"},
		{line: 11, text: "mhbpf flows [--uplink NAME] [--json]", args: []string{"flows", "[--uplink", "NAME]", "[--json]"}},
		{line: 12, text: "mhbpf exec --uplink isp2 -- sh -c 'echo via isp2'", args: []string{"exec", "--uplink", "isp2", "--", "sh", "-c", "echo via isp2"}},
	}
	if !reflect.DeepEqual(steps, want) {
		t.Fatalf("steps:\n%+v\nwant\n%+v", steps, want)
	}
	if _, err := shellWords(`mhbpf exec -- sh -c 'echo`); err == nil {
		t.Fatal("an unclosed quote parsed")
	}
}
