/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* Flow records: shared by the uplink and LAN programs. */
#ifndef __MHBPF_FLOW_H
#define __MHBPF_FLOW_H

#include "maps.h"
#include "parse.h"

/* The interface entry of ifindex if it has role, else NULL. */
static __always_inline struct iface *iface_with_role(__u32 ifindex, __u8 role)
{
	struct iface *ifc = ifindex < IFACE_SLOTS ? bpf_map_lookup_elem(&iface_slots, &ifindex)
						   : bpf_map_lookup_elem(&ifaces, &ifindex);
	return ifc && ifc->role == role ? ifc : 0;
}

/* The key of the datagram p is a fragment of. */
static __always_inline void fragment_key_of(const struct packet *p, struct fragment_key *k)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->family = p->family;
	k->proto = p->frag_proto;
	k->id = p->frag_id;
	__builtin_memcpy(k->saddr, p->saddr, 16);
	__builtin_memcpy(k->daddr, p->daddr, 16);
}

/* A first fragment (p: any packet) hands the mark it got, and its uplink,
 * to the fragments after it (mark 0, uplink -1: nothing to hand on, and no
 * earlier datagram's entry of the same key left to take). Written only
 * when it changes: a pair's datagrams of one flow mostly repeat it. */
__attribute__((noinline)) int fragment_remember(struct packet *p, __u32 mark, int uplink)
{
	/* Global, and the test for a first fragment in here: the verifier
	 * checks it once on its own, and a caller's paths do not split on
	 * it (after the policy lookup, they are many). */
	if (!p || !p->first_fragment)
		return 0;
	struct fragment_key k;
	fragment_key_of(p, &k);
	struct fragment v = { .mark = mark, .uplink = uplink < 0 ? NO_UPLINK : uplink };
	struct fragment *old = bpf_map_lookup_elem(&fragments, &k);
	if (!old || old->mark != v.mark || old->uplink != v.uplink)
		bpf_map_update_elem(&fragments, &k, &v, BPF_ANY);
	return 0;
}

static __always_inline struct fragment *fragment_of(const struct packet *p)
{
	struct fragment_key k;
	fragment_key_of(p, &k);
	return bpf_map_lookup_elem(&fragments, &k);
}

/* A flow's key in the layout of its family. */
union flow_key {
	struct flow4_key v4;
	struct flow6_key v6;
};

/* The key of p's flow, or (answer) of the packet that answers p: addresses
 * and ports swapped, except an ICMP echo's identifier, which stays in
 * sport either way. */
static __always_inline void flow_key_of(const struct packet *p, union flow_key *k, bool answer)
{
	__be16 sport = p->sport, dport = p->dport;

	if (answer && p->proto != IPPROTO_ICMP && p->proto != IPPROTO_ICMPV6) {
		sport = p->dport;
		dport = p->sport;
	}
	if (p->family == 4) {
		__builtin_memset(&k->v4, 0, sizeof(k->v4));
		k->v4.saddr = answer ? p->daddr[0] : p->saddr[0];
		k->v4.daddr = answer ? p->saddr[0] : p->daddr[0];
		k->v4.sport = sport;
		k->v4.dport = dport;
		k->v4.proto = p->proto;
		return;
	}
	__builtin_memset(&k->v6, 0, sizeof(k->v6));
	__builtin_memcpy(k->v6.saddr, answer ? p->daddr : p->saddr, 16);
	__builtin_memcpy(k->v6.daddr, answer ? p->saddr : p->daddr, 16);
	k->v6.sport = sport;
	k->v6.dport = dport;
	k->v6.proto = p->proto;
}

/* The flow of key k in a pair of family maps (flows4/6 or inbound4/6).
 * Macros, not functions: each map gets a lookup call of its own, which the
 * verifier inlines (one call site for two maps would go through the
 * helper). */
#define flow_find(map4, map6, family, k)                                  \
	({                                                               \
		struct flow *__f;                                        \
		if ((family) == 4) {                                     \
			__f = bpf_map_lookup_elem(&map4, &(k)->v4);      \
			asm volatile("/* v4 */" ::: "memory");           \
		} else {                                                 \
			__f = bpf_map_lookup_elem(&map6, &(k)->v6);      \
			asm volatile("/* v6 */" ::: "memory");           \
		}                                                        \
		__f;                                                     \
	})

#define flow_put(map4, map6, family, k, f)                                       \
	((family) == 4 ? bpf_map_update_elem(&map4, &(k)->v4, (f), BPF_ANY) \
		       : bpf_map_update_elem(&map6, &(k)->v6, (f), BPF_ANY))

/* Hash of a key for STICKY_FLOW (a new flow only). */
static __always_inline __u64 flow_key_hash(__u8 family, const union flow_key *k)
{
	if (family == 4)
		return hash_words((const __u32 *)&k->v4, sizeof(k->v4) / 4, 0);
	return hash_words((const __u32 *)&k->v6, sizeof(k->v6) / 4, 0);
}

static __always_inline void remote_key_of(__u8 family, __u8 proto, const __u32 *addr, __be16 port,
					  struct remote_key *k)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->family = family;
	k->proto = proto;
	k->port = port;
	__builtin_memcpy(k->addr, addr, 16);
}

/* f's uplink if f is of its current generation, else NULL: the uplink has
 * been down since f was recorded, and f is retired. A retired record steers
 * nothing and hides nothing (lan_ingress looks further, among the inbound
 * records); what it still says is that the flow was seen, so that its next
 * packet, even a mid-stream TCP segment, chooses an uplink again and
 * overwrites it. The LRU reclaims the others. */
static __always_inline struct uplink *flow_uplink(const struct flow *f)
{
	__u32 id = f->uplink;
	struct uplink *l = bpf_map_lookup_elem(&uplinks, &id);
	return l && l->gen == f->gen ? l : 0;
}

static __always_inline __u32 uplink_gen(__u32 id)
{
	struct uplink *l = bpf_map_lookup_elem(&uplinks, &id);
	return l ? l->gen : 0;
}

/* A packet of a known flow. The record is written about once a second at
 * most: a steady flow only reads it. */
static __always_inline void flow_seen(struct flow *f)
{
	__u32 j = bpf_jiffies64();

	if (j - f->seen_jiffies >= jiffies_per_second) {
		f->seen_jiffies = j;
		f->last_seen = coarse_ns();
	}
}

/* A new flow's record. */
static __always_inline struct flow flow_new(__u8 uplink, __u8 origin, __u16 policy, __u32 mark)
{
	__u64 now = coarse_ns();
	struct flow f = {
		.mark = mark,
		.uplink = uplink,
		.origin = origin,
		.policy = policy,
		.seen_jiffies = bpf_jiffies64(),
		.gen = uplink_gen(uplink),
		.first_seen = now,
		.last_seen = now,
	};
	return f;
}

/* Records a new flow of key k in the family's map of the pair, counted as
 * a new flow of its uplink. */
#define flow_record(map4, map6, family, k, uplink, origin, policy, mark)      \
	({                                                                   \
		struct flow __nf = flow_new((uplink), (origin), (policy), (mark)); \
		flow_put(map4, map6, family, k, &__nf);                      \
		count_new_flow(uplink);                                      \
	})

static __always_inline void count_packet(__u32 uplink, __u64 len, bool rx)
{
	struct uplink_counters *c = bpf_map_lookup_elem(&counters, &uplink);
	if (!c)
		return;
	if (rx) {
		c->rx_packets++;
		c->rx_bytes += len;
	} else {
		c->tx_packets++;
		c->tx_bytes += len;
	}
}

#endif
