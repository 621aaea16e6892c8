package daemon

import (
	"os"
	"strconv"
	"strings"
)

// residentBytes is the daemon's resident memory now (VmRSS) and its peak
// (VmHWM), 0 if unknown: a policy of a million prefixes passes through it
// on every load, so the peak is the figure to size a box by.
func residentBytes() (now, peak uint64) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0, 0
	}
	return statusBytes(string(b), "VmRSS:"), statusBytes(string(b), "VmHWM:")
}

// statusBytes is the value of a "Field:  123 kB" line of a
// /proc/PID/status text in bytes, 0 if it has none.
func statusBytes(status, field string) uint64 {
	for _, line := range strings.Split(status, "\n") {
		if v, ok := strings.CutPrefix(line, field); ok {
			kb, err := strconv.ParseUint(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				return 0
			}
			return kb * 1024
		}
	}
	return 0
}
