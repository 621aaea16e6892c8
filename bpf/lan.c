//go:build ignore
/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* tc on each LAN interface. Ingress steers forwarded traffic: a known flow
 * keeps its uplink (an answer from a port-forwarded host is one: egress
 * recorded it), a new flow gets a policy and an uplink. The mark set here is
 * what the fib rules route by. Egress records the exact flow of what a
 * remote peer sent in through a port forward, as the LAN host will answer
 * it, among the inbound records. */
#include "include/common.h"
#include "include/maps.h"
#include "include/parse.h"
#include "include/policy.h"
#include "include/flow.h"

SEC("tc")
int lan_ingress(struct __sk_buff *skb)
{
	struct iface *ifc = iface_with_role(skb->ifindex, ROLE_LAN);
	if (!ifc)
		return TC_ACT_OK;

	struct packet p = {};
	if (parse_packet(skb, ifc->l3_off, &p) < 0)
		return TC_ACT_OK;
	if (p.fragment) {
		/* No ports: the mark its datagram's first fragment got. */
		struct fragment *fr = fragment_of(&p);
		if (fr && fr->mark) {
			skb->mark = apply_mark(skb->mark, fr->mark);
			if (fr->uplink != NO_UPLINK)
				count_packet(fr->uplink, skb->len, false);
		}
		return TC_ACT_OK;
	}

	/* Known flows first: they are most packets, and a bypassed destination
	 * never gets a flow, so the bypass check is only needed on a miss. A
	 * hit writes nothing shared but, once a second, last_seen. */
	union flow_key k;
	flow_key_of(&p, &k, false);
	struct flow *f = flow_find(flows4, flows6, p.family, &k);
	struct uplink *l = f ? flow_uplink(f) : 0;
	if (!l) {
		/* No live flow of the LAN's: the answer of a port forward
		 * (lan_egress recorded it), also where the LAN once had a flow
		 * of the same tuple by an uplink that failed since. */
		struct flow *in = flow_find(inbound4, inbound6, p.family, &k);
		struct uplink *il = in ? flow_uplink(in) : 0;
		if (il || !f) {
			f = in;
			l = il;
		}
	}
	if (l && l->up) {
		flow_seen(f);
		count_packet(f->uplink, skb->len, false);
		skb->mark = apply_mark(skb->mark, f->mark);
		if (p.first_fragment)
			fragment_remember(&p, f->mark, f->uplink);
		return TC_ACT_OK;
	}
	if (is_bypassed(p.family, p.daddr))
		goto unmarked;

	/* A TCP segment of a connection we never saw open (it predates mhbpf,
	 * or its record was evicted) already has a NAT binding on some uplink;
	 * choosing one now could send it out with another uplink's address.
	 * One whose record its uplink's failure retired chooses again: that
	 * binding is gone with the uplink (the daemon makes conntrack forget
	 * it). */
	if (!f && p.proto == IPPROTO_TCP && !(p.tcp_flags & TCP_FLAG_SYN))
		goto unmarked;

	struct target t = {
		.family = p.family,
		.proto = p.proto,
		.has_saddr = 1,
		.dport = bpf_ntohs(p.dport),
	};
	__builtin_memcpy(t.saddr, p.saddr, 16);
	__builtin_memcpy(t.daddr, p.daddr, 16);
	t.flow_hash = flow_key_hash(p.family, &k);

	struct choice c;
	if (choose(&t, &c) < 0)
		goto unmarked;
	skb->mark = apply_mark(skb->mark, c.mark);
	fragment_remember(&p, c.mark, c.uplink);
	if (c.uplink < 0)
		return TC_ACT_OK; /* nothing up: main or unreachable, and ask again next packet */

	flow_record(flows4, flows6, p.family, &k, c.uplink, c.origin, c.policy, c.mark);
	count_packet(c.uplink, skb->len, false);
	/* Where uplink_ingress cannot tell an answer from an opener by the
	 * packet itself (UDP and the like, not TCP or ICMP echo), it asks for
	 * the remote end we sent to. Written only when it changes: the next
	 * flows to the same remote find it in place. (A remote's address and
	 * port never steer a LAN packet: a port forward's answers are flows
	 * lan_egress recorded from the forwarded packets.) */
	if (p.proto != IPPROTO_TCP && p.proto != IPPROTO_ICMP && p.proto != IPPROTO_ICMPV6) {
		struct remote_key rk;
		remote_key_of(p.family, p.proto, p.daddr, p.dport, &rk);
		struct remote *old = bpf_map_lookup_elem(&remotes, &rk);
		if (!old || old->uplink != c.uplink || old->origin != c.origin) {
			struct remote rv = { .uplink = c.uplink, .origin = c.origin };
			bpf_map_update_elem(&remotes, &rk, &rv, BPF_ANY);
		}
	}
	return TC_ACT_OK;

unmarked:
	/* A first fragment left unmarked leaves no mark for its datagram's
	 * later fragments, nor an earlier datagram's of the same id. */
	fragment_remember(&p, 0, -1);
	return TC_ACT_OK;
}

/* What leaves towards the LAN with the answer bit came in on an uplink as
 * part of a remotely started flow (uplink_ingress set the bit; the mark
 * survives forwarding): a port forward. Its answer is the reversed tuple of
 * exactly this packet, after DNAT, and must leave by the arrival uplink.
 * Nothing else is written here: the check of the mark makes everything but
 * port-forwarded traffic one load and a branch. */
SEC("tc")
int lan_egress(struct __sk_buff *skb)
{
	if (!(skb->mark & mark_reply))
		return TC_ACT_OK;
	struct iface *from = iface_with_role(skb->ingress_ifindex, ROLE_UPLINK);
	if (!from)
		return TC_ACT_OK; /* the box's own packet (reflected mark), not a forward */
	struct iface *ifc = iface_with_role(skb->ifindex, ROLE_LAN);
	if (!ifc)
		return TC_ACT_OK;

	struct packet p = {};
	if (parse_packet(skb, ifc->l3_off, &p) < 0 || p.fragment)
		return TC_ACT_OK;
	/* Only the packet that opens the forwarded exchange makes a record
	 * (a later one may be forged to look like an answer to a LAN host's
	 * own flow: an ICMP echo request's key is its reply's), and a record
	 * the LAN started is never overwritten. */
	switch (p.proto) {
	case IPPROTO_TCP:
		if ((p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN)
			return TC_ACT_OK;
		break;
	case IPPROTO_ICMP:
		if (p.icmp_type != ICMP_ECHO)
			return TC_ACT_OK;
		break;
	case IPPROTO_ICMPV6:
		if (p.icmp_type != ICMPV6_ECHO_REQUEST)
			return TC_ACT_OK;
		break;
	}
	union flow_key k;
	flow_key_of(&p, &k, true);
	struct flow *own = flow_find(flows4, flows6, p.family, &k);
	if (own && flow_uplink(own))
		return TC_ACT_OK; /* the LAN's own flow */
	/* With the inbound records: what remote peers start, however many,
	 * never evicts the LAN's own flows. */
	struct flow *f = flow_find(inbound4, inbound6, p.family, &k);
	if (f && f->uplink == from->uplink && flow_uplink(f))
		return TC_ACT_OK;
	flow_record(inbound4, inbound6, p.family, &k, from->uplink, ORIGIN_INBOUND, 0,
		    (uplink_mark(from->uplink) | mark_reply) & mark_mask);
	return TC_ACT_OK;
}

char __license[] SEC("license") = "Dual BSD/GPL";
