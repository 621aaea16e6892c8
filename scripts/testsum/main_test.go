package main

import (
	"strings"
	"testing"
)

const allowList = `
# a comment
host  test  TestPPP  has no PPP   # why
vm    internal/loader  TestTCX/tcx  has no tcx
`

func run(t *testing.T, where string, expect []string, lines ...string) (Summary, string) {
	t.Helper()
	allow, err := parseAllowList(strings.NewReader(allowList))
	if err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	s := newSummarizer(where, allow, expect, &out)
	for _, l := range lines {
		s.line(l)
	}
	return s.finish(nil, 0), out.String()
}

const pkg = `"Package":"github.com/mhbpf/mhbpf/test"`

func ev(action, test, output string) string {
	l := `{"Action":"` + action + `",` + pkg
	if test != "" {
		l += `,"Test":"` + test + `"`
	}
	if output != "" {
		l += `,"Output":"` + output + `\n"`
	}
	return l + "}"
}

func TestAllowedSkipOnlyWhereAndWhyListed(t *testing.T) {
	skip := []string{
		ev("run", "TestPPP", ""), ev("output", "TestPPP", "    ppp_test.go:52: SKIPPED LOUDLY: kernel 6.18 has no PPP (/dev/ppp)"),
		ev("skip", "TestPPP", ""), ev("run", "TestOther", ""), ev("pass", "TestOther", ""), ev("pass", "", ""),
	}
	s, out := run(t, "host", nil, skip...)
	if !s.OK() || s.Skipped != 1 || s.SkipsAllowed != 1 || s.Passed != 1 || s.Tests != 2 {
		t.Fatalf("host: %+v\n%s", s, out)
	}
	if !strings.Contains(out, "--- SKIP: test TestPPP: ppp_test.go:52: SKIPPED LOUDLY: kernel 6.18 has no PPP (/dev/ppp)") {
		t.Fatalf("the skip and its reason are not shown:\n%s", out)
	}
	if s, out := run(t, "vm", nil, skip...); s.OK() || !strings.Contains(out, "NOT ALLOWED on vm") {
		t.Fatalf("vm: the same skip must fail: %+v\n%s", s, out)
	}
	// Another reason for the same test is not allowed either.
	other := append([]string{}, skip...)
	other[1] = ev("output", "TestPPP", "    ppp_test.go:55: no pppd")
	if s, _ := run(t, "host", nil, other...); s.OK() {
		t.Fatalf("a skip for another reason passed: %+v", s)
	}
}

func TestFailuresAndUnfinishedTestsFail(t *testing.T) {
	s, out := run(t, "host", nil, ev("run", "TestA", ""), ev("output", "TestA", "    a_test.go:1: boom"), ev("fail", "TestA", ""),
		ev("run", "TestB", ""), ev("output", "TestB", "panic: x"), ev("fail", "", ""))
	if s.OK() || s.Failed != 2 || s.PackagesFail != 1 {
		t.Fatalf("%+v\n%s", s, out)
	}
	if !strings.Contains(out, "boom") || !strings.Contains(out, "--- DID NOT FINISH: test TestB") || !strings.Contains(out, "panic: x") {
		t.Fatalf("output:\n%s", out)
	}
}

func TestExpectedTestsMustRun(t *testing.T) {
	lines := []string{ev("run", "TestA", ""), ev("pass", "TestA", ""), ev("pass", "", "")}
	if s, _ := run(t, "vm", []string{"TestA"}, lines...); !s.OK() {
		t.Fatalf("%+v", s)
	}
	s, _ := run(t, "vm", []string{"TestA", "TestRenamed"}, lines...)
	if s.OK() || !strings.Contains(strings.Join(s.Problems, "\n"), "named test TestRenamed did not run") {
		t.Fatalf("%+v", s)
	}
	if s, _ := run(t, "vm", nil, ev("skip", "", "")); s.OK() {
		t.Fatalf("a run without tests passed: %+v", s)
	}
}

func TestRequireTests(t *testing.T) {
	lines := []string{ev("run", "TestA", ""), ev("pass", "TestA", ""), ev("pass", "", ""),
		`{"Action":"skip","Package":"github.com/mhbpf/mhbpf/internal/empty"}`}
	if s, _ := run(t, "vm", nil, lines...); !s.OK() || s.NoTests != 1 {
		t.Fatalf("%+v", s)
	}
	allow, _ := parseAllowList(strings.NewReader(allowList))
	var out strings.Builder
	sm := newSummarizer("vm", allow, nil, &out)
	sm.requireTests = true
	for _, l := range lines {
		sm.line(l)
	}
	if s := sm.finish(nil, 0); s.OK() || !strings.Contains(strings.Join(s.Problems, "\n"), "package internal/empty has no tests") {
		t.Fatalf("%+v", s)
	}
}
