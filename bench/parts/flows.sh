#!/bin/bash
# bench part: `mhbpf flows` over a full flow table. A datapath is loaded
# (nothing attached) on a private bpffs mounted in a temp directory, its
# flow maps sized 1,048,576 (flow_map_size) and filled with 900,000 IPv4 and
# 100,000 IPv6 flows (bench/flowfill); then, $ROUNDS rounds, the wall time
# and max RSS of the listing as text and as JSON, and of --sort --limit 20.
# Writes a Markdown section to $1. As root; unmounts and removes what it
# made, also when interrupted.
set -euo pipefail
source "$(dirname "$0")/../lock.sh"
cd "$(dirname "$0")/../.."
GO=${GO:-go}
ROUNDS=${ROUNDS:-3}
SIZE=${FLOWS_SIZE:-1048576}
V4=${FLOWS_V4:-900000}
V6=${FLOWS_V6:-100000}
out=$1

tmp=$(mktemp -d)
cleanup() {
	if mountpoint -q "$tmp/bpf"; then umount "$tmp/bpf"; fi
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM # through the EXIT trap: unmount, remove
mkdir "$tmp/bpf" "$tmp/state" "$tmp/bin"
mount -t bpf bpf "$tmp/bpf"
$GO build -o "$tmp/bin/mhbpf" ./cmd/mhbpf
$GO build -o "$tmp/bin/flowfill" ./bench/flowfill
fill=$("$tmp/bin/flowfill" -pin-dir "$tmp/bpf/mhbpf" -state-dir "$tmp/state" -size "$SIZE" -v4 "$V4" -v6 "$V6")
echo "$fill" >&2

mhbpf="$tmp/bin/mhbpf --pin-dir $tmp/bpf/mhbpf --state-dir $tmp/state"
# measure NAME CMD...: one run of CMD under /usr/bin/time, its seconds and
# max RSS (KB) appended to $tmp/NAME.
measure() {
	local name=$1
	shift
	/usr/bin/time -f '%e %M' -o "$tmp/time" "$@"
	cat "$tmp/time" >>"$tmp/$name"
}
for r in $(seq "$ROUNDS"); do
	echo "flows round $r/$ROUNDS" >&2
	measure text $mhbpf flows >"$tmp/text.out"
	lines=$(($(wc -l <"$tmp/text.out") - 1))
	measure json sh -c "$mhbpf flows --json | wc -c >$tmp/json.bytes"
	measure sorted $mhbpf flows --sort --limit 20 >/dev/null
done
rm -f "$tmp/text.out"
bytes=$(cat "$tmp/json.bytes")

# median COLUMN FILE
median() { awk -v c="$1" '{print $c}' "$2" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
all() { awk -v c="$1" '{printf "%s%s", sep, $c; sep=" / "}' "$2"; }
row() { # label file
	printf '| %s | %s | %s | %s | %s |\n' "$1" "$(median 1 "$tmp/$2")" "$(all 1 "$tmp/$2")" \
		"$(($(median 2 "$tmp/$2") / 1024))" "$(awk '{printf "%s%d", sep, $2/1024; sep=" / "}' "$tmp/$2")"
}
{
	echo "## \`mhbpf flows\` over a full flow table"
	echo
	echo "$V4 IPv4 + $V6 IPv6 flows in the flow maps (\`flow_map_size\` $SIZE;"
	echo "\`$fill\`), $ROUNDS rounds. The listing reads the maps in batches of 4,096 and prints as it"
	echo "reads (filters applied while reading); the text listing had $lines rows, the"
	echo "JSON $bytes bytes. Max RSS is the mhbpf process's (\`/usr/bin/time\`; for the"
	echo "JSON row, of the \`sh\` running the pipe, whichever of its processes is largest)."
	echo
	echo "| command | median s | s (rounds) | median max RSS MB | MB (rounds) |"
	echo "|---|---|---|---|---|"
	row '`mhbpf flows >FILE`' text
	row '`mhbpf flows --json \| wc -c`' json
	row '`mhbpf flows --sort --limit 20`' sorted
	echo
	echo "Reproduce: \`ROUNDS=$ROUNDS bash bench/parts/flows.sh OUT.md\` (as root), or \`BENCH_PARTS=flows make bench\`."
} >"$out"
