#!/bin/bash
# make bench: the benchmarks of bpf/ and internal/maps side by side in one
# run, interleaved rounds, and bench/REPORT.md with the medians, each
# per-packet figure's ratio to the test-run floor (BaselinePass), the
# kernel, the CPU and the commands. As root; not part of `make test` (which
# only builds the benchmarks, through go vet).
set -euo pipefail
source "$(dirname "$0")/lock.sh"
cd "$(dirname "$0")/.."
GO=${GO:-go}
ROUNDS=${ROUNDS:-3}
out=$(mktemp)
parts=$(mktemp -d)
trap 'rm -rf "$out" "$parts"' EXIT

cmd_pkt="$GO test -run '^\$' -bench '^Benchmark[^UP]|^BenchmarkUplink[^D]' -benchtime 20x -count 1 ./bpf/"
# Every path x family x protocol at 1k and 1M flows (bpf/paths_bench_test.go).
cmd_paths="$GO test -run '^\$' -bench '^BenchmarkPath' -benchtime 20x -count 1 ./bpf/"
cmd_down="$GO test -run '^\$' -bench '^BenchmarkUplinkDown' -benchtime 3x -count 1 ./bpf/"
cmd_fold="$GO test -run '^\$' -bench FoldPrefixes -benchtime 3x -count 1 ./internal/maps/"
# BENCH_PARTS picks what runs (default: all): "packet" is the per-packet
# and control-plane benchmarks below, the others are bench/parts/NAME.sh.
all_parts="packet $(ls bench/parts/*.sh 2>/dev/null | xargs -rn1 basename | sed 's/\.sh$//' | xargs)"
selected=" ${BENCH_PARTS:-$all_parts} "
for part in $selected; do
	[[ " $all_parts " == *" $part "* ]] || { echo "BENCH_PARTS: no part $part (parts: $all_parts)" >&2; exit 2; }
done
# Rounds interleaved: a noisy neighbour skews one round of every
# benchmark, not every round of one.
[[ $selected == *" packet "* ]] && for r in $(seq "$ROUNDS"); do
	echo "round $r/$ROUNDS" >&2
	eval "$cmd_pkt" | grep '^Benchmark' >>"$out"
	eval "$cmd_paths" | grep '^Benchmark' >>"$out"
	eval "$cmd_fold" | grep '^Benchmark' >>"$out"
	eval "$cmd_down" | grep '^Benchmark' >>"$out"
done

# The other benchmarks (end to end through namespaces, the daemon): each
# bench/parts/NAME.sh writes a Markdown section of the report to the file
# named by its first argument, runs its own rounds interleaved, and builds
# and cleans up its own namespaces.
for part in $selected; do
	[ "$part" != packet ] || continue
	echo "part $part" >&2
	GO=$GO ROUNDS=$ROUNDS bash "bench/parts/$part.sh" "$parts/$part.md"
done

# name -> the values of one unit over the rounds; the median of each.
report=$(awk '
function median(s,   a, n, i, j, t) {
	n = split(s, a, " ")
	for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
	return a[int((n + 1) / 2)]
}
{
	name = $1; sub(/-[0-9]+$/, "", name); sub(/^Benchmark/, "", name)
	for (i = 3; i < NF; i += 2) {
		unit = $(i + 1)
		if (unit == "ns/op" && $i == 0) continue
		key = name SUBSEP unit
		if (!(key in vals)) order[++n] = key
		vals[key] = vals[key] " " $i
	}
}
END {
	for (k in vals) { split(k, p, SUBSEP); if (p[1] == "BaselinePass") floor = median(vals[k]) }
	print "| benchmark | median | unit | × floor | rounds |"
	print "|---|---|---|---|---|"
	for (i = 1; i <= n; i++) {
		split(order[i], p, SUBSEP)
		m = median(vals[order[i]])
		ratio = (p[2] == "ns/pkt" && floor > 0) ? sprintf("%.2f", m / floor) : ""
		printf "| %s | %s | %s | %s | %s |\n", p[1], m, p[2], ratio, vals[order[i]]
	}
}' "$out")
[[ $selected == *" packet "* ]] || report="The per-packet benchmarks were not in this run (BENCH_PARTS=${BENCH_PARTS:-})."

{
	echo "# Benchmark report"
	echo
	echo "Written by \`make bench\` (bench/run.sh) on $(date -u +%Y-%m-%dT%H:%MZ): $ROUNDS rounds, interleaved."
	echo
	echo "- kernel: $(uname -r)"
	echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') ($(nproc) cores)"
	echo "- commands, each round:"
	echo "  - \`$cmd_pkt\`"
	echo "  - \`$cmd_paths\`"
	echo "  - \`$cmd_fold\`"
	echo "  - \`$cmd_down\`"
	echo
	echo "Per-packet figures (ns/pkt) are BPF_PROG_TEST_RUN over 100,000 repeats;"
	echo "\"× floor\" divides by BaselinePass, a program that only returns, in the"
	echo "same run. Compare within one report, not across machines."
	echo
	echo "$report"
	for f in "$parts"/*.md; do
		[ -e "$f" ] || continue
		echo
		cat "$f"
	done
} >bench/REPORT.md
cat bench/REPORT.md
