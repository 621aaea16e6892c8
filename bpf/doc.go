// Package bpf holds mhbpf's BPF programs and the Go bindings bpf2go
// generates for them. One object per attach point; all three are built from
// the same headers and share their maps at load time (see internal/loader).
package bpf

//go:generate go tool bpf2go -go-package bpf -target bpfel -tags linux -type flow4_key -type flow6_key -type flow -type remote_key -type remote -type uplink -type iface -type policy -type policy_entry -type policy_rule -type policy_set -type port_range -type lpm4_key -type lpm6_key -type sticky_key -type sticky_entry -type uplink_counters -type limits -type origin -type sticky_mode -type fallback -type iface_role Uplink uplink.c -- -I./include
//go:generate go tool bpf2go -go-package bpf -target bpfel -tags linux Lan lan.c -- -I./include
//go:generate go tool bpf2go -go-package bpf -target bpfel -tags linux Sock sock.c -- -I./include
//
// For kernels without bpf_loop (before 5.17: Debian 11's 5.10, Ubuntu
// 22.04's 5.15), the objects that walk the policy are built a second time
// with the walk as a bounded loop; the loader picks them by a probe.
//go:generate go tool bpf2go -go-package bpf -target bpfel -tags linux LanCompat lan.c -- -I./include -DMHBPF_NO_BPF_LOOP
//go:generate go tool bpf2go -go-package bpf -target bpfel -tags linux SockCompat sock.c -- -I./include -DMHBPF_NO_BPF_LOOP
//go:generate go tool bpf2go -go-package bpf -target bpfel -tags linux Exec exec.c -- -I./include
