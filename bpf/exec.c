//go:build ignore
/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* 'mhbpf exec --uplink NAME': every socket a command creates is born with
 * the uplink's mark and bound to its device. Attached (cgroup/sock_create)
 * to a cgroup of the command's own, made for it. Bound to the device, the
 * socket is left alone by the socket hooks (sock.c: foreign_socket), as the
 * health probes are; with the mark, the fib rules route it by the uplink's
 * table, and its source address is the uplink's. No maps: the uplink is a
 * load-time constant, one program per command. */
#include "include/common.h"

volatile const __u32 exec_mark = 0;    /* the uplink's mark bit */
volatile const __u32 exec_ifindex = 0; /* the uplink's device */

SEC("cgroup/sock_create")
int exec_sock_create(struct bpf_sock *sk)
{
	if (sk->family != 2 && sk->family != 10) /* AF_INET, AF_INET6 */
		return 1;
	sk->mark = exec_mark;
	sk->bound_dev_if = exec_ifindex;
	return 1;
}

char __license[] SEC("license") = "Dual BSD/GPL";
