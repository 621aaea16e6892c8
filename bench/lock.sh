# Sourced first by bench/run.sh and by each part: the whole benchmark runs
# under the lock the test suites take (/tmp/mhbpf-net.lock), so that it
# never shares the machine with a namespace test run, whose load would be
# in its figures. Taken once: a part that run.sh runs inherits it. (Do not
# wrap `make bench` in flock yourself: the second flock would wait for the
# first.)
if [ -z "${MHBPF_NET_LOCKED:-}" ]; then
	export MHBPF_NET_LOCKED=1
	exec flock -o /tmp/mhbpf-net.lock bash "$0" "$@"
fi
