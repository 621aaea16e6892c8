// Package daemonbench measures the daemon as a running process: failover
// (carrier loss, silent failure), convergence after a storm of link
// events, and idle CPU and memory with 2 and 16 uplinks, empty or with a
// full flow map and a million-prefix policy. It is a set of Go benchmarks
// (bench/parts/daemon.sh runs them, `make bench` runs that) that build the
// scenario's namespaces (internal/topology, test addresses only) and run
// the real binary; everything they make is removed when each ends.
//
//	go test -run '^$' -bench . -benchtime 1x ./bench/daemon/
//
// MHBPF_BIN names a built cmd/mhbpf (else the benchmarks build one);
// MHBPF_BENCH_IDLE the idle window (default 10s).
package daemonbench
