/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* Packet parsing shared by the tc programs. Headers in the skb's linear part
 * are read in place (direct packet access: no helper call, which is most of
 * a known flow's cost); a header that is not (a non-linear skb: GRO, paged
 * data) is copied with bpf_skb_load_bytes, so every skb parses the same.
 * Any header that cannot be read whole makes the packet unparseable, and
 * unparseable packets pass unchanged. */
#ifndef __MHBPF_PARSE_H
#define __MHBPF_PARSE_H

#include "common.h"

struct packet {
	__u8 family; /* 4 or 6 */
	__u8 proto;
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 fragment; /* a non-first fragment: no L4 header, no flow identity */
	__u8 first_fragment; /* the first of several: the L4 header, more follow */
	__u8 frag_proto; /* what follows the fragment header (IPv4: proto) */
	__u8 pad;
	__be16 sport; /* ICMP echo: the identifier */
	__be16 dport;
	__u32 saddr[4];
	__u32 daddr[4];
	__be32 frag_id; /* a fragment's datagram (IPv4: 16 bits), when fragment or first_fragment */
};

#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10

/* IPv6 extension headers followed before giving up. */
#define MAX_EXT_HEADERS 8

/* Headers further in than this are copied, not read in place: the bound
 * lets the verifier check a pointer at a variable offset. Far beyond what
 * the parser reaches on real traffic (Ethernet + IPv4 with options + TCP is
 * at most 14 + 60 + 20). */
#define MAX_DIRECT_OFF 1024

/* len bytes at off: a pointer into the packet when they are in its linear
 * part, else a copy in buf; NULL when the packet is shorter. */
static __always_inline const void *header(struct __sk_buff *skb, __u32 off, void *buf, __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	if (off <= MAX_DIRECT_OFF) {
		const __u8 *h = data + off;
		if ((const void *)(h + len) <= end)
			return h;
	}
	if (bpf_skb_load_bytes(skb, off, buf, len) < 0)
		return NULL;
	return buf;
}

static __always_inline int parse_l4(struct __sk_buff *skb, __u32 off, struct packet *p)
{
	__u8 buf[20];
	const __u8 *h;

	switch (p->proto) {
	case IPPROTO_TCP:
		/* The whole fixed header: a cut one is not a TCP segment. */
		h = header(skb, off, buf, 20);
		if (!h)
			return -1;
		__builtin_memcpy(&p->sport, &h[0], 2);
		__builtin_memcpy(&p->dport, &h[2], 2);
		p->tcp_flags = h[13];
		return 0;
	case IPPROTO_UDP:
		h = header(skb, off, buf, 8);
		if (!h)
			return -1;
		__builtin_memcpy(&p->sport, &h[0], 2);
		__builtin_memcpy(&p->dport, &h[2], 2);
		return 0;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		h = header(skb, off, buf, 8);
		if (!h)
			return -1;
		p->icmp_type = h[0];
		__builtin_memcpy(&p->sport, &h[4], 2);
		return 0;
	}
	return 0; /* other protocols: identified by addresses and protocol */
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, __u32 off, struct packet *p)
{
	struct iphdr4 buf;
	const struct iphdr4 *ip = header(skb, off, &buf, sizeof(buf));

	if (!ip)
		return -1;
	__u8 ver_ihl = ip->ver_ihl;
	if ((ver_ihl >> 4) != 4 || (ver_ihl & 0xf) < 5)
		return -1;
	p->family = 4;
	p->proto = ip->protocol;
	p->saddr[0] = ip->saddr;
	p->daddr[0] = ip->daddr;
	__u16 frag = bpf_ntohs(ip->frag_off);
	if (frag & (IP_OFFSET | IP_MF)) {
		p->frag_id = ip->id;
		p->frag_proto = p->proto;
	}
	if (frag & IP_OFFSET) {
		p->fragment = 1;
		return 0;
	}
	p->first_fragment = !!(frag & IP_MF);
	return parse_l4(skb, off + (ver_ihl & 0xf) * 4, p);
}

static __always_inline int parse_ipv6(struct __sk_buff *skb, __u32 off, struct packet *p)
{
	struct iphdr6 buf;
	const struct iphdr6 *ip = header(skb, off, &buf, sizeof(buf));
	__u8 nh;

	if (!ip)
		return -1;
	if ((ip->ver_tc >> 4) != 6)
		return -1;
	p->family = 6;
	__builtin_memcpy(p->saddr, ip->saddr, 16);
	__builtin_memcpy(p->daddr, ip->daddr, 16);
	nh = ip->nexthdr;
	off += sizeof(buf);

	/* A fragment header right after the IPv6 one, where a source that
	 * fragments puts it: read here, before the loop (in the loop, the
	 * verifier's states multiply with what it writes). Its next header is
	 * never 0 (hop-by-hop comes first or not at all), so a fragment whose
	 * header the loop finds deeper, with frag_proto 0, matches no first
	 * fragment: it passes as it came. */
	if (nh == IPPROTO_FRAGMENT) {
		__u8 fbuf[8];
		const __u8 *fh = header(skb, off, fbuf, 8);

		if (!fh)
			return -1;
		nh = fh[0];
		off += 8;
		p->frag_proto = nh;
		__builtin_memcpy(&p->frag_id, &fh[4], 4);
		if (((fh[2] << 8) | fh[3]) & 0xfff8) {
			p->proto = nh;
			p->fragment = 1;
			return 0;
		}
		/* An atomic fragment (offset 0, no M flag) is whole. */
		p->first_fragment = fh[3] & 1;
	}

	for (int i = 0; i < MAX_EXT_HEADERS; i++) {
		__u8 ebuf[8];
		const __u8 *ext;

		switch (nh) {
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
			ext = header(skb, off, ebuf, 2);
			if (!ext)
				return -1;
			nh = ext[0];
			off += (ext[1] + 1) * 8;
			continue;
		case IPPROTO_AH:
			ext = header(skb, off, ebuf, 2);
			if (!ext)
				return -1;
			nh = ext[0];
			off += (ext[1] + 2) * 4;
			continue;
		case IPPROTO_FRAGMENT:
			ext = header(skb, off, ebuf, 8);
			if (!ext)
				return -1;
			nh = ext[0];
			off += 8;
			if (((ext[2] << 8) | ext[3]) & 0xfff8) {
				p->proto = nh;
				p->fragment = 1; /* frag_proto 0: no datagram to join */
				return 0;
			}
			continue;
		}
		p->proto = nh;
		return parse_l4(skb, off, p);
	}
	return -1; /* chain longer than we follow: leave the packet alone */
}

/* l3_off is where the IP header starts: 14 behind an Ethernet header, 0 on
 * ppp and tun devices. Global, so the verifier checks it once on its own. */
__attribute__((noinline)) int parse_packet(struct __sk_buff *skb, __u32 l3_off, struct packet *p)
{
	if (!p)
		return -1;
	if (l3_off) {
		__be16 pbuf;
		const __be16 *proto = header(skb, 12, &pbuf, 2);

		if (!proto)
			return -1;
		if (*proto == bpf_htons(ETH_P_IP))
			return parse_ipv4(skb, ETH_HLEN, p);
		if (*proto == bpf_htons(ETH_P_IPV6))
			return parse_ipv6(skb, ETH_HLEN, p);
		return -1;
	}

	__u8 vbuf;
	const __u8 *ver = header(skb, 0, &vbuf, 1);
	if (!ver)
		return -1;
	if ((*ver >> 4) == 4)
		return parse_ipv4(skb, 0, p);
	if ((*ver >> 4) == 6)
		return parse_ipv6(skb, 0, p);
	return -1;
}

#endif
