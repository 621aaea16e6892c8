package daemontest

import (
	"bytes"
	"strings"
	"sync"
	"testing"
)

// Log is a daemon's standard output and error: it writes while the test
// reads.
type Log struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *Log) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *Log) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Lines is the lines of text that hold word.
func Lines(text, word string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, word) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// CheckNoErrors fails tb, listing them, if the daemon's log has ERROR
// lines: a daemon test fails on them unless it provokes them.
func CheckNoErrors(tb testing.TB, log string) {
	tb.Helper()
	if strings.Contains(log, "level=ERROR") {
		tb.Errorf("the daemon logged errors:\n%s", Lines(log, "level=ERROR"))
	}
}
