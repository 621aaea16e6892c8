package explain

import (
	"fmt"
	"io"
	"strings"
	"time"
)

// Write prints the answer step by step, in the order the datapath and then
// the kernel take them.
func (r *Result) Write(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "a new %s connection %s -> %s\n", r.Proto, hostPort(r.Src, r.SrcPort), hostPort(r.Dst, r.DstPort))
	step := 0
	say := func(format string, args ...any) {
		step++
		fmt.Fprintf(&b, "%d. "+format+"\n", append([]any{step}, args...)...)
	}
	if r.Bypassed {
		say("bypass: yes: %s is never steered (a LAN subnet, the bypass list, loopback, link-local or multicast); no mark", r.Dst)
	} else {
		say("bypass: no")
		pol := fmt.Sprintf("%q (policy %d)", r.Policy, r.PolicyID)
		if r.PolicyID == 0 {
			pol = "none matched: the default balance"
		}
		say("policy: %s; sticky per %s; when none of its uplinks is up: %s", pol, r.Sticky, r.Fallback)
		say("its uplinks, in fib rule order:")
		for _, e := range r.Entries {
			state := "up"
			if !e.Up {
				state = "down (" + e.Reason + ")"
			}
			verdict := fmt.Sprintf("takes %.0f%% of new choices", e.Share*100)
			if !e.Eligible {
				verdict = "not chosen"
				if e.Up && e.Weight == 0 {
					verdict += ": weight 0"
				} else if e.Up {
					verdict += ": a better tier has an uplink up"
				}
			}
			fmt.Fprintf(&b, "     %-10s tier %d  weight %-3d %s, %s\n", e.Uplink, e.Tier, e.Weight, state, verdict)
		}
		switch {
		case r.Sticky == "flow":
			say("sticky entry: none (per flow): this connection's hash (its source port too) picks by weight")
		case r.StickyEntry == nil:
			say("sticky entry: none: the weighted choice by a hash of the %s picks, and is remembered", r.Sticky)
		default:
			e := r.StickyEntry
			ago := time.Duration(e.AgeSecs * float64(time.Second)).Truncate(time.Second)
			switch {
			case e.Kept:
				say("sticky entry: %s, last used %s ago: kept", e.Uplink, ago)
			case e.Expired:
				say("sticky entry: %s, last used %s ago: expired, chosen again by weight", e.Uplink, ago)
			case r.Uplink == "":
				say("sticky entry: %s, last used %s ago: not used, %s is not eligible now", e.Uplink, ago, e.Uplink)
			default:
				say("sticky entry: %s, last used %s ago: not eligible now, chosen again by weight", e.Uplink, ago)
			}
		}
		if r.Uplink != "" {
			say("chosen: %s", r.Uplink)
		} else {
			say("chosen: none (no uplink of the policy is up): %s", r.Fallback)
		}
	}
	say("mark: %#x%s", r.MhbpfMark, markMeaning(r.MarkBits))
	rt := r.Route
	rule := rt.Rule
	if rule == "" {
		rule = "(rule not identified)"
	}
	if rt.Error != "" {
		say("kernel: rule %s: %s", rule, rt.Error)
	} else {
		route := "table " + tableName(rt.Table) + ":"
		if rt.Gateway != "" {
			route += " via " + rt.Gateway
		}
		if rt.Device != "" {
			route += " dev " + rt.Device
		}
		if rt.Source != "" {
			route += " src " + rt.Source
		}
		say("kernel: rule %s -> %s", rule, route)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func hostPort(a string, port uint16) string {
	if strings.Contains(a, ":") {
		return fmt.Sprintf("[%s]:%d", a, port)
	}
	return fmt.Sprintf("%s:%d", a, port)
}

// markMeaning reads the mark's bits: the chosen uplink, the ones the kernel
// falls through to if its route goes, and fail closed.
func markMeaning(bits []string) string {
	var ups []string
	strict := false
	for _, b := range bits {
		if b == "strict" {
			strict = true
		} else {
			ups = append(ups, b)
		}
	}
	var parts []string
	if len(ups) > 0 {
		parts = append(parts, ups[0])
	}
	if len(ups) > 1 {
		parts = append(parts, "falling through to "+strings.Join(ups[1:], ", then ")+" if its route goes")
	}
	if strict {
		parts = append(parts, "fail closed (strict bit)")
	}
	if len(parts) == 0 {
		return " (none: main's routes)"
	}
	return " (" + strings.Join(parts, "; ") + ")"
}
