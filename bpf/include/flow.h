/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* Flow records: shared by the uplink and LAN programs. */
#ifndef __MHBPF_FLOW_H
#define __MHBPF_FLOW_H

#include "maps.h"
#include "parse.h"

/* The interface entry of ifindex if it has role, else NULL. */
static __always_inline struct iface *iface_with_role(__u32 ifindex, __u8 role)
{
	struct iface *ifc = bpf_map_lookup_elem(&ifaces, &ifindex);
	return ifc && ifc->role == role ? ifc : 0;
}

static __always_inline void flow_key_of(const struct packet *p, struct flow_key *k)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->family = p->family;
	k->proto = p->proto;
	k->sport = p->sport;
	k->dport = p->dport;
	__builtin_memcpy(k->saddr, p->saddr, 16);
	__builtin_memcpy(k->daddr, p->daddr, 16);
}

/* The key of the packet that answers p (addresses and ports swapped). ICMP
 * echo keeps its identifier in sport either way. */
static __always_inline void flow_key_of_answer(const struct packet *p, struct flow_key *k)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->family = p->family;
	k->proto = p->proto;
	if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) {
		k->sport = p->sport;
		k->dport = p->dport;
	} else {
		k->sport = p->dport;
		k->dport = p->sport;
	}
	__builtin_memcpy(k->saddr, p->daddr, 16);
	__builtin_memcpy(k->daddr, p->saddr, 16);
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

static __always_inline void flow_seen(struct flow *f, __u64 len)
{
	f->last_seen = bpf_ktime_get_ns();
	__sync_fetch_and_add(&f->packets, 1);
	__sync_fetch_and_add(&f->bytes, len);
}

static __always_inline void flow_record_in(void *map, const struct flow_key *k, __u8 uplink, __u8 origin,
					   __u32 mark, __u64 len)
{
	__u64 now = bpf_ktime_get_ns();
	struct flow f = {
		.mark = mark,
		.uplink = uplink,
		.origin = origin,
		.first_seen = now,
		.last_seen = now,
		.packets = 1,
		.bytes = len,
	};
	bpf_map_update_elem(map, k, &f, BPF_ANY);
	count_new_flow(uplink);
}

static __always_inline void flow_record(const struct flow_key *k, __u8 uplink, __u8 origin, __u32 mark,
					__u64 len)
{
	flow_record_in(&flows, k, uplink, origin, mark, len);
}

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
