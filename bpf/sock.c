//go:build ignore
/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* cgroup socket hooks: the box's own traffic. The route of a local socket is
 * looked up before any egress hook runs, so the choice must be on the socket
 * itself (SO_MARK) when it connects or sends to an address. */
#include "include/common.h"
#include "include/maps.h"
#include "include/policy.h"

/* The network namespace the daemon manages (the loader rewrites it with the
 * cookie of its namespace). The hooks sit on a cgroup, normally the root, and
 * so see the sockets of every process below it in every network namespace:
 * a container's sockets are in its own namespace, whose routes and addresses
 * are not the router's, and must be left alone. No namespace has cookie 0,
 * so an object loaded without it steers nothing. */
volatile const __u64 netns_cookie = 0;

/* Whether the sendmsg hooks may call bpf_setsockopt: Linux 5.10 allows it
 * only in the connect hooks, and the loader clears this there (the dead
 * call is then never verified); the source address still steers. */
volatile const __u8 sendmsg_setsockopt = 1;

static __always_inline bool other_netns(struct bpf_sock_addr *ctx)
{
	return bpf_get_netns_cookie(ctx) != netns_cookie;
}

/* The socket is someone else's to steer: it carries a mark bit outside our
 * mask (WireGuard, Tailscale, a firewall), or it is bound to a device (our
 * health probes, ping -I). */
static __always_inline bool foreign_socket(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return true;
	return (sk->mark & ~mark_mask) || sk->bound_dev_if;
}

enum hook { CONNECT = 0, SENDMSG4 = 4, SENDMSG6 = 6 };

/* The source address sendmsg should use for uplink id, if the application
 * chose none: the kernel has already taken the socket's mark for this
 * datagram's route lookup when the hook runs (udp_sendmsg reads it first),
 * so only the source address can steer the first datagram. */
static __always_inline void set_sendmsg_source(struct bpf_sock_addr *ctx, __s32 id, int hook)
{
	__u32 key = id;
	struct uplink *u = bpf_map_lookup_elem(&uplinks, &key);
	if (!u)
		return;
	/* hook is a constant at each call site: the verifier only allows the
	 * msg_src field of the hook's own family. */
	if (hook == SENDMSG4) {
		if (!ctx->msg_src_ip4 && u->addr4)
			ctx->msg_src_ip4 = u->addr4;
		return;
	}
	if (!(ctx->msg_src_ip6[0] | ctx->msg_src_ip6[1] | ctx->msg_src_ip6[2] | ctx->msg_src_ip6[3]) &&
	    (u->addr6[0] | u->addr6[1] | u->addr6[2] | u->addr6[3])) {
		ctx->msg_src_ip6[0] = u->addr6[0];
		ctx->msg_src_ip6[1] = u->addr6[1];
		ctx->msg_src_ip6[2] = u->addr6[2];
		ctx->msg_src_ip6[3] = u->addr6[3];
	}
}

static __always_inline int steer(struct bpf_sock_addr *ctx, struct target *t, int hook)
{
	struct choice c;

	if (is_bypassed(t->family, t->daddr))
		return 1;
	t->proto = ctx->protocol;
	t->dport = bpf_ntohs(ctx->user_port);
	t->flow_hash = bpf_get_socket_cookie(ctx);
	if (choose(t, &c) < 0)
		return 1;

	__u32 mark = apply_mark(ctx->sk->mark, c.mark);
	if (hook == CONNECT || sendmsg_setsockopt)
		bpf_setsockopt(ctx, SOL_SOCKET, SO_MARK, &mark, sizeof(mark));
	if (c.uplink >= 0) {
		count_new_flow(c.uplink);
		/* Only for a native-family destination: a mapped IPv4 address on
		 * an IPv6 socket has no IPv6 source to pick. */
		if ((hook == SENDMSG4 && t->family == 4) || (hook == SENDMSG6 && t->family == 6))
			set_sendmsg_source(ctx, c.uplink, hook);
	}
	return 1;
}

static __always_inline int steer4(struct bpf_sock_addr *ctx, __u32 src, int hook)
{
	if (other_netns(ctx))
		return 1;
	if (foreign_socket(ctx))
		return 1;
	struct target t = { .family = 4 };
	t.daddr[0] = ctx->user_ip4;
	if (src) {
		t.saddr[0] = src;
		t.has_saddr = 1;
	}
	return steer(ctx, &t, hook);
}

static __always_inline int steer6(struct bpf_sock_addr *ctx, int hook)
{
	if (other_netns(ctx))
		return 1;
	if (foreign_socket(ctx))
		return 1;
	struct target t = { .family = 6 };
	t.daddr[0] = ctx->user_ip6[0];
	t.daddr[1] = ctx->user_ip6[1];
	t.daddr[2] = ctx->user_ip6[2];
	t.daddr[3] = ctx->user_ip6[3];
	/* An IPv4-mapped address on a dual-stack socket is IPv4 traffic. */
	if (!t.daddr[0] && !t.daddr[1] && t.daddr[2] == bpf_htonl(0xffff)) {
		t.family = 4;
		t.daddr[0] = t.daddr[3];
		t.daddr[2] = t.daddr[3] = 0;
	}
	if (hook == SENDMSG6) {
		t.saddr[0] = ctx->msg_src_ip6[0];
		t.saddr[1] = ctx->msg_src_ip6[1];
		t.saddr[2] = ctx->msg_src_ip6[2];
		t.saddr[3] = ctx->msg_src_ip6[3];
		t.has_saddr = t.saddr[0] | t.saddr[1] | t.saddr[2] | t.saddr[3] ? 1 : 0;
	}
	return steer(ctx, &t, hook);
}

SEC("cgroup/connect4")
int sock_connect4(struct bpf_sock_addr *ctx)
{
	return steer4(ctx, 0, CONNECT);
}

SEC("cgroup/sendmsg4")
int sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return steer4(ctx, ctx->msg_src_ip4, SENDMSG4);
}

SEC("cgroup/connect6")
int sock_connect6(struct bpf_sock_addr *ctx)
{
	return steer6(ctx, CONNECT);
}

SEC("cgroup/sendmsg6")
int sock_sendmsg6(struct bpf_sock_addr *ctx)
{
	return steer6(ctx, SENDMSG6);
}

char __license[] SEC("license") = "Dual BSD/GPL";
