#!/usr/bin/env bash
# Installs what building and testing mhbpf needs on Debian 12, idempotently:
# the pinned BPF compiler, the programs the tests run as real peers, and the
# Go modules. Run as root.
set -euo pipefail

packages=(
	clang-19 llvm-19      # the pinned BPF compiler (make generate) and its llvm-strip
	iproute2              # ip netns / ip link / tc for the test topology
	nftables              # masquerade in the scenario tests
	iptables              # make bench (bench/parts/e2e.sh): the seed's CONNMARK setup, in legacy iptables
	openvpn               # the real tun0 of the scenario
	socat procps          # real servers and clients; sysctl
	iputils-ping util-linux # ping for ICMP tests, nsenter to run the daemon in a namespace, setpriv for the unit's capabilities
	systemd               # systemd-analyze verify of dist/mhbpf.service (TestUnitFileVerifies)
	strace                # counts the CLI's bpf(2) calls (TestStatusSkipsAndFlowsBatchesTheFlowMaps)
	time                  # /usr/bin/time: max RSS in bench/parts/flows.sh
	ppp                   # real pppd (runs in the VM suite: the host kernel has no PPP)
	qemu-system-x86 busybox-static cpio xz-utils  # the VM suite (test/vm)
	git make ca-certificates
)

missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cd "$(dirname "$0")/.."
go mod download
