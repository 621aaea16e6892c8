/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* Every map of mhbpf and the value layouts Go shares with the programs.
 * Each object includes this file; the loader creates the maps once and hands
 * the same maps to all objects, so the definitions here must stay identical
 * for all of them (they are: one header). Layouts are padded explicitly so
 * that the Go types bpf2go generates match byte for byte. */
#ifndef __MHBPF_MAPS_H
#define __MHBPF_MAPS_H

#include "common.h"

#define MAX_UPLINKS 16
#define MAX_RULES 64
#define MAX_POLICY_UPLINKS 8
#define MAX_PORT_RANGES 8
#define POLICY_GENERATIONS 2

/* Load-time settings (the loader rewrites them). */
volatile const __u32 mark_mask = 0x00ff0000;
/* The "no fallback" bit: fib rules send it to an unreachable route after the
 * uplink rules, so a policy whose uplinks are all down fails closed instead
 * of leaking out by main's default route. Inside mark_mask. */
volatile const __u32 mark_strict = 0x00800000;
/* The "answer" bit: set with the arrival uplink's bit on everything that
 * answers a remotely started flow (the inbound packets themselves, so that
 * tcp_fwmark_accept and fwmark_reflect hand it on, and a port-forwarded
 * host's replies). fib rules route it by the arrival uplink's table ahead of
 * main, while everything else lets main's routes more specific than default
 * win (the LAN, a VPN's routes, the router's own ICMP errors to LAN hosts).
 * Inside mark_mask. */
volatile const __u32 mark_reply = 0x00400000;
volatile const __u64 sticky_ns = 600ULL * 1000000000ULL;
/* New inbound records each CPU may make per uplink and second (0: no cap):
 * the internet's floods of SYNs, first datagrams and echo requests must not
 * crowd out the LAN's own flows, nor each other's uplinks'. */
volatile const __u32 inbound_rate_per_cpu = 0;

/* The limits above, for Go (bpf2go -type limits): the Go side's sizes come
 * from here, not from a copy. */
enum limits {
	LIMIT_UPLINKS = MAX_UPLINKS,
	LIMIT_RULES = MAX_RULES,
	LIMIT_POLICY_UPLINKS = MAX_POLICY_UPLINKS,
	LIMIT_PORT_RANGES = MAX_PORT_RANGES,
	LIMIT_POLICY_GENERATIONS = POLICY_GENERATIONS,
	LIMIT_IFACE_SLOTS = 4096, /* IFACE_SLOTS */
};

enum origin {
	ORIGIN_BALANCED = 1, /* default policy, weighted choice */
	ORIGIN_POLICY = 2,   /* an explicit policy rule matched */
	ORIGIN_INBOUND = 3,  /* started by a remote peer on an uplink */
};

enum sticky_mode {
	STICKY_DST = 0, /* default: one destination keeps its uplink */
	STICKY_FLOW = 1,
	STICKY_PAIR = 2, /* source + destination */
};

enum fallback {
	FALLBACK_MAIN = 0,
	FALLBACK_UNREACHABLE = 1,
};

enum iface_role {
	ROLE_UPLINK = 1,
	ROLE_LAN = 2,
};

/* Never set nor read: it puts the enums above into the objects' BTF, from
 * which bpf2go generates their Go constants (-type). */
struct shared_enums {
	enum limits limits;
	enum origin origin;
	enum sticky_mode sticky;
	enum fallback fallback;
	enum iface_role role;
};
const struct shared_enums *shared_enums_btf __attribute__((unused));

/* A connection (or UDP/ICMP exchange) as seen where it started: from a LAN
 * host (LAN ingress) or from a remote peer (uplink ingress). ICMP echo uses
 * sport for the identifier. Each family has its own key and maps: an IPv4
 * key is 16 bytes, hashed and compared in well under half the time of the
 * 40-byte IPv6 one. */
struct flow4_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct flow6_key {
	__u32 saddr[4];
	__u32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* A flow's record. Read-mostly: a packet of a known flow writes it at most
 * once a second (last_seen), so CPUs forwarding the same flow do not bounce
 * its cache line. Per-uplink traffic is counted per CPU in `counters`. */
struct flow {
	__u32 mark; /* mhbpf bits the flow's packets get */
	__u8 uplink;
	__u8 origin;
	/* The [[policy]] rule that chose the uplink (its policy id: rule i is
	 * i+1), written once when the LAN program creates the record. 0: the
	 * default balance, an inbound flow, or not known (a record converted
	 * from a layout that had padding here). */
	__u16 policy;
	/* jiffies (low 32 bits) when last_seen was last set: a packet compares
	 * it with jiffies, which the verifier inlines (one load), and reads
	 * the clock only when a second has passed. */
	__u32 seen_jiffies;
	/* Its uplink's generation when the record was made: an uplink that
	 * goes down gets a new one (struct uplink), which retires all its
	 * flows at once, however many there are. 0 in a record converted from
	 * a layout that had padding here, as in every uplink until its first
	 * failure. */
	__u32 gen;
	__u64 first_seen; /* CLOCK_MONOTONIC ns, coarse (a tick) */
	__u64 last_seen;  /* the same clock, refreshed about once a second at most */
};

/* Jiffies in a second (the kernel's HZ): the loader measures it. */
volatile const __u32 jiffies_per_second = 1000;

/* The kernel has bpf_ktime_get_coarse_ns (5.11): the loader clears it
 * where not, and the verifier drops the branch not taken. */
volatile const __u8 coarse_clock = 1;

/* CLOCK_MONOTONIC for flow and sticky times: a tick's resolution is
 * enough, and the coarse clock is the cheaper read. */
static __always_inline __u64 coarse_ns(void)
{
	return coarse_clock ? bpf_ktime_get_coarse_ns() : bpf_ktime_get_ns();
}

/* How often at most sticky entries are refreshed (ns). */
#define LAST_SEEN_STEP_NS 1000000000ULL

/* The remote end of a flow, which NAT on this box never rewrites: the key
 * that finds a port-forwarded (DNAT) flow from its reply on the LAN side, and
 * tells a UDP reply to one of our own flows from a new inbound exchange. */
struct remote_key {
	__u8 family;
	__u8 proto;
	__be16 port;
	__u32 addr[4];
};

struct remote {
	__u8 uplink;
	__u8 origin;
	__u16 pad;
};

struct uplink {
	__u32 mark; /* this uplink's bit */
	__u32 ifindex;
	__u16 weight;
	__u8 tier;
	__u8 up;
	/* The uplink's own addresses (network order; 0 if none). An unconnected
	 * UDP socket's first datagram is routed with the mark it had before the
	 * sendmsg hook ran, so the hook also picks this source address, which
	 * the uplink's "from" rule routes by. */
	__u32 addr4;
	__u32 addr6[4];
	/* Bumped by the daemon when the uplink goes down (or leaves its
	 * slot): a flow record of an older generation is as good as none. */
	__u32 gen;
};

struct iface {
	__u8 role;
	__u8 l3_off; /* 14 on Ethernet, 0 on ppp/tun */
	__u8 uplink; /* for ROLE_UPLINK */
	__u8 pad;
};

struct policy_entry {
	__u8 uplink;
	__u8 tier; /* lower is preferred; equal tiers balance by weight */
	__u16 weight;
};

struct policy {
	struct policy_entry entries[MAX_POLICY_UPLINKS];
	__u8 nentries;
	__u8 fallback;
	__u8 sticky;
	__u8 pad;
	__u32 id; /* namespace of the sticky map; 0 is the default policy */
};

struct port_range {
	__u16 lo; /* host byte order, inclusive */
	__u16 hi;
};

struct policy_rule {
	__u8 proto; /* 0: any */
	__u8 nports; /* 0: any port */
	__u16 pad;
	struct port_range ports[MAX_PORT_RANGES];
	struct policy policy;
};

/* One generation of the policy. The programs read policy_generation once per packet
 * and then only that generation's entries, so replacing the whole policy is
 * one 4-byte write after the new generation is complete. */
struct policy_set {
	__u64 any_dst; /* rules with no destination prefix */
	__u64 any_src; /* rules with no source prefix */
	__u32 nrules;
	__u32 pad;
	struct policy dflt;
};

/* Keys of the LPM tries: the policy's and the bypass prefixes. */
struct lpm4_key {
	__u32 prefixlen;
	__u32 addr;
};

struct lpm6_key {
	__u32 prefixlen;
	__u32 addr[4];
};

/* The policy's prefixes as address ranges: one table per generation,
 * direction and family, which the daemon creates at the size of the policy,
 * fills, and puts into its generation's slot of the outer array
 * (policy_ranges_dst4 and so on) before it switches policy_generation over.
 * A lookup costs about the same few array reads whatever the policy's size
 * (an LPM trie walks deeper the more prefixes it holds):
 *
 *   [0]  where the rule sets start
 *   a node (the root at 1): its span's ranges share the leading `from`
 *        bits of base; it indexes the 2^ib values of the bits after them
 *     IPv4: [n] from (bits 0-7), ib (8-15), above (32-63): the set above
 *              base's span; [n + 1] base << 32 | below: the set below it
 *     IPv6: [n] base in hi:lo, v: from (bits 0-7), ib (8-15), below
 *              (16-39), above (40-63)
 *     then (from [n + 2] or [n + 1]) index entry c: count << 32 | first (its ranges, sorted,
 *              the first at the entry's start), count 0: one set covers the
 *              entry (first is it), or RANGE_CHILD | the node of its bits
 *   ranges: a range's set holds up to the next one's start
 *   sets: the rule sets (bit i: rule i), 1-based (0: no rule)
 *
 * Go (internal/maps/ranges.go) builds it; a set is every rule whose prefix
 * contains the range (the longest match carries the shorter ones' rules).
 * IPv4 entries are one __u64: a range is start (host order) << 32 | set,
 * base start << 32 | below. IPv6 entries are struct range6. */
struct range6 {
	__u64 hi; /* address, host order: bits 0-63 */
	__u64 lo; /* bits 64-127 */
	__u64 v;  /* set, index entry, header, below, or a rule set's bits */
};

struct sticky_key {
	__u32 policy;
	__u8 family;
	__u8 mode;
	__u16 pad;
	__u32 saddr[4]; /* zero unless STICKY_PAIR */
	__u32 daddr[4];
};

struct sticky_entry {
	__u8 uplink;
	__u8 pad[7];
	__u64 last_used;
};

struct uplink_counters {
	__u64 rx_packets; /* arrived on the uplink */
	__u64 rx_bytes;
	__u64 tx_packets; /* forwarded from the LAN to the uplink */
	__u64 tx_bytes;
	__u64 new_flows; /* flows and sockets assigned to the uplink */
};

/* The LAN's flows (and the answers of port forwards: see `inbound`), one
 * map per family; the loader sizes both from flow_map_size. */
#define FLOW_MAP(name, keytype, size)                 \
	struct {                                      \
		__uint(type, BPF_MAP_TYPE_LRU_HASH);  \
		__uint(max_entries, size);            \
		__type(key, struct keytype);          \
		__type(value, struct flow);           \
	} name SEC(".maps")

FLOW_MAP(flows4, flow4_key, 262144);
FLOW_MAP(flows6, flow6_key, 262144);

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct remote_key);
	__type(value, struct remote);
} remotes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_UPLINKS);
	__type(key, __u32);
	__type(value, struct uplink);
} uplinks SEC(".maps");

/* The interfaces the tc programs serve, by ifindex: an array for the usual
 * small ifindexes, whose lookup the verifier inlines (a bounds check and an
 * add: a hash lookup was a sixth of a known flow's cost), a hash for
 * larger ones (a box that made many interfaces since boot). An array slot
 * without a role is no interface of ours. */
#define IFACE_SLOTS LIMIT_IFACE_SLOTS

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, IFACE_SLOTS);
	__type(key, __u32); /* ifindex */
	__type(value, struct iface);
} iface_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32); /* ifindex, IFACE_SLOTS or more */
	__type(value, struct iface);
} ifaces SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} policy_generation SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, POLICY_GENERATIONS);
	__type(key, __u32);
	__type(value, struct policy_set);
} policy_meta SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, POLICY_GENERATIONS * MAX_RULES);
	__type(key, __u32);
	__type(value, struct policy_rule);
} policy_rules SEC(".maps");

/* The inner tables' template: the daemon's tables have the policy's size
 * (BPF_F_INNER_MAP: an inner array's max_entries may differ from the
 * template's). Sizes, not types: clang emits a type reached only through
 * such a template as a forward declaration, which has no size. */
#define RANGE_GENERATIONS(name, valuetype)                             \
	struct {                                                       \
		__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);              \
		__uint(max_entries, POLICY_GENERATIONS);               \
		__type(key, __u32);                                    \
		__array(values, struct {                               \
			__uint(type, BPF_MAP_TYPE_ARRAY);              \
			__uint(max_entries, 1);                        \
			__uint(map_flags, BPF_F_INNER_MAP);            \
			__uint(key_size, sizeof(__u32));               \
			__uint(value_size, sizeof(valuetype));         \
		});                                                    \
	} name SEC(".maps")

RANGE_GENERATIONS(policy_ranges_dst4, __u64);
RANGE_GENERATIONS(policy_ranges_src4, __u64);
RANGE_GENERATIONS(policy_ranges_dst6, struct range6);
RANGE_GENERATIONS(policy_ranges_src6, struct range6);

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm4_key);
	__type(value, __u8);
} bypass4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm6_key);
	__type(value, __u8);
} bypass6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sticky_key);
	__type(value, struct sticky_entry);
} sticky SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_UPLINKS);
	__type(key, __u32);
	__type(value, struct uplink_counters);
} counters SEC(".maps");

/* A fragmented datagram's mark, from its first fragment (the one with the
 * ports, which the flow and the policy go by) for the fragments after it.
 * Where nothing reassembles before routing (no conntrack on the box: no
 * masquerade) each fragment is routed on its own, and the later ones, left
 * unmarked, would follow main, perhaps by another uplink than the first:
 * the datagram, split between two providers, never arrives. A later
 * fragment that overtakes the first passes unmarked. */
struct fragment_key {
	__u8 family;
	__u8 proto; /* IPv6: the fragment header's next header */
	__u16 pad;
	__be32 id;
	__u32 saddr[4];
	__u32 daddr[4];
};

struct fragment {
	__u32 mark;   /* the mhbpf bits of the first fragment's mark */
	__u8 uplink;  /* whose counters the fragments go to; NO_UPLINK: none */
	__u8 pad[3];
};

#define NO_UPLINK 0xff

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct fragment_key);
	__type(value, struct fragment);
} fragments SEC(".maps");

/* Flows a remote peer started on an uplink (uplink ingress records them),
 * in a map of their own: a flood from the internet evicts only its own kind,
 * never the LAN's flows in `flows4` and `flows6`. */
FLOW_MAP(inbound4, flow4_key, 65536);
FLOW_MAP(inbound6, flow6_key, 65536);

/* The per-CPU, per-uplink budget of new inbound records: a one-second
 * window and what it admitted and refused. */
struct inbound_guard {
	__u64 window; /* start of the current second, ns */
	__u64 in_window;
	__u64 admitted; /* records made, ever */
	__u64 refused;  /* openers left unrecorded by the budget, ever */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_UPLINKS);
	__type(key, __u32);
	__type(value, struct inbound_guard);
} inbound_guards SEC(".maps");

#endif
