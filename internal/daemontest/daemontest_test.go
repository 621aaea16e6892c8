package daemontest

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

func TestUntil(t *testing.T) {
	polls := 0
	took, err := Until(time.Now(), time.Second, time.Millisecond, nil, func() bool { polls++; return polls == 3 })
	if err != nil || took <= 0 || polls != 3 {
		t.Errorf("Until a condition that holds at the third poll: %v, %v after %d polls", took, err, polls)
	}
	if _, err := Until(time.Now(), 20*time.Millisecond, time.Millisecond, nil, func() bool { return false }); err == nil || err.Error() != "not within 20ms" {
		t.Errorf("Until a condition that never holds: %v, want not within 20ms", err)
	}
	ended := make(chan struct{})
	close(ended)
	if _, err := Until(time.Now(), time.Minute, time.Millisecond, ended, func() bool { return false }); !errors.Is(err, ErrEnded) {
		t.Errorf("Until with the daemon ended: %v, want %v", err, ErrEnded)
	}
}

// errorsSeen records what CheckNoErrors reports.
type errorsSeen struct {
	testing.TB
	got []string
}

func (e *errorsSeen) Helper() {}

func (e *errorsSeen) Errorf(format string, args ...any) {
	e.got = append(e.got, fmt.Sprintf(format, args...))
}

func TestCheckNoErrors(t *testing.T) {
	log := "time=1 level=INFO msg=start\ntime=2 level=ERROR msg=\"route add\"\ntime=3 level=WARN msg=repair\ntime=4 level=ERROR msg=again\n"
	seen := &errorsSeen{TB: t}
	CheckNoErrors(seen, log)
	want := "the daemon logged errors:\ntime=2 level=ERROR msg=\"route add\"\ntime=4 level=ERROR msg=again"
	if len(seen.got) != 1 || seen.got[0] != want {
		t.Errorf("CheckNoErrors reported %q, want %q", seen.got, want)
	}
	seen = &errorsSeen{TB: t}
	CheckNoErrors(seen, strings.ReplaceAll(log, "ERROR", "INFO"))
	if len(seen.got) != 0 {
		t.Errorf("CheckNoErrors on a log without errors reported %q", seen.got)
	}
}
