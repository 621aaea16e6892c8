//go:build ignore
/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* tc ingress on each uplink (ppp0, ppp1, tun0): remember which uplink a
 * remotely started flow arrived on, and mark its packets with that uplink,
 * so that answers (sockets via tcp_fwmark_accept, kernel replies via
 * fwmark_reflect, port-forwarded hosts via the LAN program) leave by it. */
#include "include/common.h"
#include "include/maps.h"
#include "include/parse.h"
#include "include/policy.h"
#include "include/flow.h"

/* Does this packet open a new exchange from the remote side? Replies to our
 * own outbound flows must not: their NATed tuple is unknown here, so TCP
 * answers are told by their flags and UDP answers by the remote endpoint we
 * sent to. */
static __always_inline bool opens_inbound(const struct packet *p)
{
	switch (p->proto) {
	case IPPROTO_TCP:
		return (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
	case IPPROTO_ICMP:
		return p->icmp_type == ICMP_ECHO;
	case IPPROTO_ICMPV6:
		return p->icmp_type == ICMPV6_ECHO_REQUEST;
	}
	struct remote_key rk;
	remote_key_of(p->family, p->proto, p->saddr, p->sport, &rk);
	return !bpf_map_lookup_elem(&remotes, &rk);
}

/* Whether uplink may record one more inbound flow this second on this CPU.
 * Katran's flood guard, per uplink: past the budget, openers pass through
 * unrecorded, so a flood costs a counter update, not an LRU insert. */
static __always_inline bool inbound_admit(__u32 uplink)
{
	struct inbound_guard *g = bpf_map_lookup_elem(&inbound_guards, &uplink);
	if (!g)
		return false;
	if (inbound_rate_per_cpu) {
		__u64 now = bpf_ktime_get_ns();
		if (now - g->window >= 1000000000ULL) {
			g->window = now;
			g->in_window = 0;
		}
		if (g->in_window >= inbound_rate_per_cpu) {
			g->refused++;
			return false;
		}
		g->in_window++;
	}
	g->admitted++;
	return true;
}

SEC("tc")
int uplink_ingress(struct __sk_buff *skb)
{
	struct iface *ifc = iface_with_role(skb->ifindex, ROLE_UPLINK);
	if (!ifc)
		return TC_ACT_OK;

	count_packet(ifc->uplink, skb->len, true);

	struct packet p = {};
	if (parse_packet(skb, ifc->l3_off, &p) < 0 || p.fragment)
		return TC_ACT_OK;

	union flow_key k;
	flow_key_of(&p, &k, false);
	struct flow *f = flow_find(inbound4, inbound6, p.family, &k);
	/* Not whether the uplink is up: what arrives on it is answered by it
	 * (probes may have failed while inbound traffic still flows). */
	if (f && flow_uplink(f)) {
		flow_seen(f);
		skb->mark = apply_mark(skb->mark, f->mark);
		return TC_ACT_OK;
	}
	if (!opens_inbound(&p))
		return TC_ACT_OK;

	if (!inbound_admit(ifc->uplink))
		return TC_ACT_OK; /* over budget: delivered, but neither recorded nor marked */
	__u32 mark = (uplink_mark(ifc->uplink) | mark_reply) & mark_mask;
	flow_record(inbound4, inbound6, p.family, &k, ifc->uplink, ORIGIN_INBOUND, 0, mark);

	skb->mark = apply_mark(skb->mark, mark);
	return TC_ACT_OK;
}

char __license[] SEC("license") = "Dual BSD/GPL";
