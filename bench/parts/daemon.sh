#!/bin/bash
# The daemon as a process (bench/daemon): failover on carrier loss and on
# a silent failure, convergence after 100 link events, idle CPU and memory
# with 2 and 16 uplinks, empty or with a full flow map and a 1M-prefix
# policy. Writes a Markdown section of bench/REPORT.md to $1. ROUNDS
# rounds, each one run of every benchmark (fresh namespaces and daemon
# each), under the network lock; the medians over the rounds. As root.
set -euo pipefail
source "$(dirname "$0")/../lock.sh"
cd "$(dirname "$0")/../.."
GO=${GO:-go}
ROUNDS=${ROUNDS:-3}
out=$1
tmp=$(mktemp -d)
# What a round makes it lists in the ledger (bench/daemon's record); a
# round that ends early (a failure, ^C) may leave some of it behind:
# daemons of this script's binary, namespaces, pins, cgroups.
export MHBPF_BENCH_LEDGER=$tmp/ledger
cleanup() {
	if [ -s "$MHBPF_BENCH_LEDGER" ]; then
		while read -r kind what _; do
			[ "$kind" != daemon ] || ! grep -qs "$tmp/mhbpf" "/proc/$what/cmdline" || kill "$what" || true
		done <"$MHBPF_BENCH_LEDGER"
		sleep 1
		while read -r kind what _; do
			case $kind in
			netns) ip netns del "$what" 2>/dev/null || true ;;
			pins) rm -rf "$what" ;;
			cgroup) rmdir "$what" 2>/dev/null || true ;;
			esac
		done <"$MHBPF_BENCH_LEDGER"
	fi
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

$GO build -o "$tmp/mhbpf" ./cmd/mhbpf
$GO test -c -o "$tmp/daemon.test" ./bench/daemon/
cmd="$GO test -run '^\$' -bench . -benchtime 1x -count 1 ./bench/daemon/"
for r in $(seq "$ROUNDS"); do
	echo "daemon round $r/$ROUNDS" >&2
	MHBPF_BIN="$tmp/mhbpf" \
		"$tmp/daemon.test" -test.run '^$' -test.bench . -test.benchtime 1x -test.count 1 >"$tmp/round" 2>&1 ||
		{ cat "$tmp/round" >&2; exit 1; }
	grep '^Benchmark' "$tmp/round" >>"$tmp/all"
	: >"$MHBPF_BENCH_LEDGER" # the round's cleanups ran
done

table=$(awk '
function median(s,   a, n, i, j, t) {
	n = split(s, a, " ")
	for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
	return a[int((n + 1) / 2)]
}
{
	name = $1; sub(/-[0-9]+$/, "", name); sub(/^Benchmark/, "", name)
	for (i = 3; i < NF; i += 2) {
		unit = $(i + 1)
		if (unit == "ns/op") continue
		key = name SUBSEP unit
		if (!(key in vals)) order[++n] = key
		vals[key] = vals[key] " " $i
	}
}
END {
	print "| benchmark | median | unit | rounds |"
	print "|---|---|---|---|"
	for (i = 1; i <= n; i++) {
		split(order[i], p, SUBSEP)
		printf "| %s | %s | %s | %s |\n", p[1], median(vals[order[i]]), p[2], vals[order[i]]
	}
}' "$tmp/all")

cat >"$out" <<MD
## The daemon: failover, convergence, idle cost

\`bench/parts/daemon.sh\` ($ROUNDS rounds; each round one run of every
benchmark, each in fresh namespaces with its own daemon; the medians over
the rounds, and for the failovers each round's value is itself the median
of 3 events):

    $cmd

(run alone, the benchmarks build cmd/mhbpf themselves; the script builds
it and the test binary once and runs that.)

The scenario's namespaces (internal/topology: router, isp1, isp2, a LAN
host; test addresses), the real \`mhbpf run\` at the product's defaults:
every uplink probed by ICMP (interval 1 s, timeout 1 s, failures 3,
successes 2), up_delay 1 s, resync_every 10 s, flow_map_size 262,144.

- **FailoverCarrierLoss** \`ms/first-conn\`: the line of the uplink new LAN
  connections use drops (the ISP's end of its veth goes down: the router's
  interface loses its carrier); new TCP connections from the LAN host are
  tried every 5 ms; the time from the link change to the first one
  answered through the other ISP (5 ms resolution), and \`ms/status-out\`
  until the daemon's status says the uplink is out (its pass ends with the
  status: what it does after the routes shows there). \`flows=few\`: the
  flow map holds the tries' own flows; \`flows=full\`: flows4 filled to its
  capacity before each event, half on each uplink.
- **FailoverSilent** \`ms/out\`: isp1's provider drops everything (nftables in
  its namespace; the carrier stays up); the time until the daemon's status
  says isp1 is out. The probes' own bound is interval × failures +
  timeout = 4 s.
- **ConvergeAfterLinkEvents**: 100 carrier changes 1 ms apart (isp1 down,
  isp2 down, isp1 up, isp2 up, ...; both down for 200 ms before the last
  two, which bring both up: flaps of a millisecond may all fall between
  the daemon's passes, and then nothing is held back); \`ms/converge\` from
  the last one until a status written after it says every uplink is in use
  and main's multipath route and both uplink tables have their default
  routes (up_delay, 1 s, is most of it); \`passes\` and \`ms-cpu\`: the
  daemon's passes and CPU time over the storm and the convergence.
- **Idle** (\`uplinks=2\` or \`16\`; \`maps=empty\`, or \`full\`: flows4 filled to its
  capacity through the pins, and a policy of 1,000,000 IPv4 prefixes from a
  destination_files list): the daemon's CPU (utime + stime) over 10 s
  idle as \`%cpu\` of one core, its passes in that window, VmRSS
  (\`MB-rss\`) and VmHWM (\`MB-peak\`) after it; \`flows\` held in flows4. The 14
  extra uplinks are veth pairs to a third namespace that answers the
  probes; the default balance takes 8 of the 16 (its limit), the others
  have \`balance = false\`.

$table
MD
