#!/bin/bash
# make bench, end to end: new TCP conn/s, small-packet UDP pps over many
# flows and TCP throughput over parallel streams, from a LAN host through a
# router namespace to a server behind two ISPs, with the router set up as
# plain routing, mhbpf (the real daemon), nftables set + ct mark and the
# seed's iptables CONNMARK rules, at 10 and 100,000 policy prefixes;
# interleaved rounds (bench/e2e does the work). Writes the report's section
# to $1. As root; runs alone as `BENCH_PARTS=e2e make bench`, or
# `bash bench/parts/e2e.sh OUT.md`. E2E_FLAGS are passed on (e.g.
# E2E_FLAGS='-window 1s -prefixes 10'). About 5 minutes at ROUNDS=3.
set -euo pipefail
source "$(dirname "$0")/../lock.sh"
out=${1:?usage: e2e.sh OUTPUT.md}
cd "$(dirname "$0")/../.."
GO=${GO:-go}
ROUNDS=${ROUNDS:-3}
work=$(mktemp -d)
pid=

# What bench/e2e made is listed in $work/track; its own cleanup removes it
# on success, failure and Ctrl-C, this one if it was killed outright.
cleanup() {
	if [ -n "$pid" ]; then
		kill "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	fi
	if [ -f "$work/track" ]; then
		while read -r kind name; do
			case $kind in
			pid) kill -9 "$name" 2>/dev/null || true ;;
			esac
		done <"$work/track"
		while read -r kind name; do
			case $kind in
			netns) ip netns del "$name" 2>/dev/null || true ;;
			pins) rm -rf "$name" ;;
			cgroup) rmdir "$name" 2>/dev/null || true ;;
			esac
		done <"$work/track"
	fi
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

$GO build -o bin/mhbpf ./cmd/mhbpf
$GO build -o "$work/e2e" ./bench/e2e
# shellcheck disable=SC2086 # E2E_FLAGS is a list of flags
"$work/e2e" -bin bin/mhbpf -rounds "$ROUNDS" -track "$work/track" -out "$out" ${E2E_FLAGS:-} &
pid=$!
wait "$pid"
pid=
