/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
#ifndef __MHBPF_COMMON_H
#define __MHBPF_COMMON_H

#include <linux/types.h>
#include <linux/bpf.h>
#include "libbpf/bpf_helpers.h"
#include "libbpf/bpf_endian.h"

typedef _Bool bool;
#define true 1
#define false 0

#define TC_ACT_OK 0

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD

#define IPPROTO_HOPOPTS 0
#define IPPROTO_ICMP 1
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define IPPROTO_ROUTING 43
#define IPPROTO_FRAGMENT 44
#define IPPROTO_ESP 50
#define IPPROTO_AH 51
#define IPPROTO_ICMPV6 58
#define IPPROTO_NONE 59
#define IPPROTO_DSTOPTS 60

#define ICMP_ECHO 8
#define ICMPV6_ECHO_REQUEST 128

#define AF_INET 2
#define AF_INET6 10
#define SOL_SOCKET 1
#define SO_MARK 36

/* Header layouts, only the fields read here. Own definitions instead of the
 * kernel's UAPI headers keep the objects independent of the build host. */
struct iphdr4 {
	__u8 ver_ihl;
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__sum16 check;
	__be32 saddr;
	__be32 daddr;
};

struct iphdr6 {
	__u8 ver_tc;
	__u8 tc_flow;
	__be16 flow_lbl;
	__be16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u32 saddr[4];
	__u32 daddr[4];
};

#define IP_MF 0x2000
#define IP_OFFSET 0x1FFF

#endif
