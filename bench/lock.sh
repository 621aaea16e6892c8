# Sourced first by bench/run.sh and by each part: the whole benchmark runs
# under /tmp/mhbpf-net.lock, the lock this project's developers take
# around network test runs on a shared machine (flock -o
# /tmp/mhbpf-net.lock make test-host ...), so that a benchmark's figures
# do not carry a namespace test run's load. Taken once: a part that run.sh
# runs inherits it. (Do not wrap `make bench` in that flock yourself: the
# inner one would wait for the outer one forever.)
if [ -z "${MHBPF_NET_LOCKED:-}" ]; then
	export MHBPF_NET_LOCKED=1
	if ! flock -n /tmp/mhbpf-net.lock true; then
		echo "waiting for /tmp/mhbpf-net.lock (a test or benchmark run holds it)" >&2
	fi
	exec flock -o /tmp/mhbpf-net.lock bash "$0" "$@"
fi
