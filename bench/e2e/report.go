package main

import (
	"fmt"
	"os"
	"runtime"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/topology"
)

// ispAddr is the router's address on uplink n: what the server sees of a
// connection masqueraded to it.
func ispAddr(n int) string {
	if n == 1 {
		return topology.ISP1Local.String()
	}
	return topology.ISP2Local.String()
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func of(ss []sample, f func(sample) float64) []float64 {
	out := make([]float64, len(ss))
	for i, s := range ss {
		out[i] = f(s)
	}
	return out
}

func ratio(v, plain float64) string {
	if plain == 0 {
		return ""
	}
	return fmt.Sprintf("%.2f", v/plain)
}

func join(v []float64, format string) string {
	parts := make([]string, len(v))
	for i, x := range v {
		parts[i] = fmt.Sprintf(format, x)
	}
	return strings.Join(parts, " / ")
}

func kernelRelease() string {
	var u unix.Utsname
	_ = unix.Uname(&u)
	return unix.ByteSliceToString(u.Release[:])
}

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

var setupText = map[string]string{
	"plain":    "routing only: a weighted multipath default route (8:2, `fib_multipath_hash_policy=1`: hashed on the five-tuple) and masquerade",
	"rules":    "plain, plus the fib rules and tables of the hand-written setups (`to LAN lookup main`, `fwmark 0x1/0x1` and `0x2/0x2` to a table per uplink) and no marking: what policy routing costs by itself (with a rule of one's own the kernel no longer looks up one merged local+main table but walks the rules, local, then main)",
	"mhbpf":    "the real daemon (`bin/mhbpf run`): default balance 8:2, a `[[policy]]` of the prefixes (`destination_files`) to isp1, `masquerade = true` and `clamp_mss = false` on both uplinks",
	"nft":      "nftables: the prefixes in an interval set, `ct state new ip daddr @set ct mark set 0x1`, `meta mark set ct mark` on every packet, `ip rule fwmark` to a table per uplink; the rest by the multipath route",
	"iptables": "the seed's setup in legacy iptables (mangle PREROUTING): `CONNMARK --restore-mark`, marked packets `ACCEPT`, uplink arrivals stamped, one `-d PREFIX -j MARK` rule per prefix for a new LAN connection, else the LAN's \"main\" mark 0x8, `CONNMARK --save-mark`; fwmark rules as nftables'; the rest by the multipath route",
}

func writeReport(o *options, cases []benchCase, results map[benchCase][]sample, took time.Duration) string {
	var b strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	w("## End to end through a router namespace\n\n")
	w("Written by bench/parts/e2e.sh (`bench/e2e`) on %s: %d rounds, interleaved (the cases %s in turn, each round starting one case later), every case on fresh namespaces; %s in all.\n\n",
		time.Now().UTC().Format("2006-01-02T15:04Z"), o.rounds, caseList(cases), took.Round(time.Second))
	w("- kernel: %s\n- CPU: %s (%d cores); the LAN host's client, the router and the server all run on these cores: veth forwarding is done in softirq on the sending CPU, so every figure is CPU-bound and the setups differ by what the router spends per packet and per connection\n", kernelRelease(), cpuModel(), runtime.NumCPU())
	w("- command: `bench/e2e %s`\n", strings.Join(flagLine(o), " "))
	w("- path: LAN host (100.64.2.10) → router (eth2; ppp0, ppp1: veth) → isp1 / isp2, which drop what does not carry their customer's address (BCP 38) → a server that owns %s (%d of its addresses are the destinations, in turn); masquerade on both uplinks in every setup (nftables `oifname ... masquerade`, the rule mhbpf's own table has); reverse-path filtering off in the router (the kernel's default, which mhbpf leaves as it is)\n", Servers, o.dests)
	w("- policy: the prefixes are distinct /29s of 100.96.0.0/11 steered to isp1; the servers' addresses are in none of them, so each new connection takes the policy's miss path (every prefix rule for iptables, one set or trie lookup for nftables and mhbpf) and is balanced 8:2\n")
	w("- new TCP conn/s: %d connections in parallel, each connect, the server's answer (the address it saw: which uplink), the server closes; counted at the client, failures apart\n", o.conns)
	w("- UDP: %d flows (a socket each), %d-byte payloads (64-byte frames), one sender in batches of 8 (sendmmsg); datagrams the server received a second\n", o.flows, o.payload)
	w("- TCP throughput: %d streams, what the server received; each window %v after %v of warm-up\n\n", o.streams, o.window, o.warmup)
	for _, s := range o.setups {
		w("- **%s**: %s\n", s, setupText[s])
	}
	w("\n")

	plain := results[benchCase{setup: "plain"}]
	pc, pu, ps := median(of(plain, func(s sample) float64 { return s.conns })),
		median(of(plain, func(s sample) float64 { return s.udp })),
		median(of(plain, func(s sample) float64 { return s.stream }))
	w("Medians over the rounds; × plain divides by plain routing's median. setup s: from fresh namespaces to the setup in place (mhbpf: the daemon running, both uplinks usable); daemon CPU s: what the daemon used over the three measurements (%s).\n\n",
		time.Duration(3*int64(o.warmup+o.window)).Round(time.Second))
	w("| setup | prefixes | new TCP conn/s | × plain | UDP pps received | × plain | TCP Mbit/s | × plain | isp1 share | failed conns | BCP 38 drops | setup s | daemon CPU s |\n")
	w("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, c := range cases {
		ss := results[c]
		cn, u, st := median(of(ss, func(s sample) float64 { return s.conns })),
			median(of(ss, func(s sample) float64 { return s.udp })),
			median(of(ss, func(s sample) float64 { return s.stream }))
		var failed uint64
		drops := 0
		for _, s := range ss {
			failed += s.connErrors
			drops += s.drops
		}
		prefixes, cpu := "—", ""
		if !prefixFree[c.setup] {
			prefixes = fmt.Sprint(c.prefixes)
		}
		if c.setup == "mhbpf" {
			cpu = fmt.Sprintf("%.2f", median(of(ss, func(s sample) float64 { return s.daemonCPU })))
		}
		w("| %s | %s | %.0f | %s | %.0f | %s | %.0f | %s | %.0f%% | %d | %d | %.2f | %s |\n", c.setup, prefixes,
			cn, ratio(cn, pc), u, ratio(u, pu), st, ratio(st, ps),
			100*median(of(ss, func(s sample) float64 { return s.isp1Share })), failed, drops,
			median(of(ss, func(s sample) float64 { return s.setupSeconds })), cpu)
	}
	w("\nEach round's figures (conn/s; UDP pps received, of pps sent; Mbit/s):\n\n")
	w("| case | conn/s | UDP pps | UDP pps sent | Mbit/s |\n|---|---|---|---|---|\n")
	for _, c := range cases {
		ss := results[c]
		w("| %s | %s | %s | %s | %s |\n", c, join(of(ss, func(s sample) float64 { return s.conns }), "%.0f"),
			join(of(ss, func(s sample) float64 { return s.udp }), "%.0f"),
			join(of(ss, func(s sample) float64 { return s.udpSent }), "%.0f"),
			join(of(ss, func(s sample) float64 { return s.stream }), "%.0f"))
	}
	// Issue 9's goal for the datapath.
	var goal []string
	for _, n := range o.prefixes {
		ss, ok := results[benchCase{setup: "mhbpf", prefixes: n}]
		if !ok || len(plain) == 0 {
			continue
		}
		cn, u := median(of(ss, func(s sample) float64 { return s.conns })), median(of(ss, func(s sample) float64 { return s.udp }))
		met := "met"
		if cn < 0.98*pc || u < 0.98*pu {
			met = "not met"
		}
		goal = append(goal, fmt.Sprintf("%d prefixes: conn/s %s, pps %s × plain: %s", n, ratio(cn, pc), ratio(u, pu), met))
	}
	if len(goal) > 0 {
		w("\nGoal (issue 9): mhbpf ≥ 0.98× plain in conn/s and in small-packet pps. %s.\n", strings.Join(goal, "; "))
	}
	for _, c := range cases {
		for _, s := range results[c] {
			if s.firstError != "" {
				w("\nFirst failed connection of %s: %s\n", c, s.firstError)
				break
			}
		}
	}
	return b.String()
}

func caseList(cases []benchCase) string {
	var s []string
	for _, c := range cases {
		s = append(s, c.String())
	}
	return strings.Join(s, ", ")
}

func flagLine(o *options) []string {
	var p []string
	for _, n := range o.prefixes {
		p = append(p, fmt.Sprint(n))
	}
	return []string{"-bin", o.bin, "-rounds", fmt.Sprint(o.rounds), "-prefixes", strings.Join(p, ","), "-setups", strings.Join(o.setups, ","),
		"-dests", fmt.Sprint(o.dests), "-window", o.window.String(), "-warmup", o.warmup.String(), "-conns", fmt.Sprint(o.conns), "-flows", fmt.Sprint(o.flows),
		"-streams", fmt.Sprint(o.streams), "-payload", fmt.Sprint(o.payload)}
}
