/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* Policy lookup and uplink choice: the one implementation used by the LAN
 * program and the socket hooks. */
#ifndef __MHBPF_POLICY_H
#define __MHBPF_POLICY_H

#include "maps.h"

/* What a new flow is about, as far as policy is concerned. */
struct target {
	__u8 family;
	__u8 proto;
	__u8 has_saddr; /* false for a socket before it is bound */
	__u8 pad;
	__u16 dport; /* host byte order */
	__u16 pad2;
	__u32 saddr[4];
	__u32 daddr[4];
	__u64 flow_hash; /* identity of the single flow, for STICKY_FLOW */
};

struct choice {
	__u32 mark; /* mhbpf bits to set; 0 routes by main */
	__s32 uplink; /* -1: none chosen */
	__u8 origin;
	__u8 pad;
	__u16 policy; /* the chosen policy's id: rule i is i+1, 0 the default */
};

static __always_inline __u64 mix64(__u64 h)
{
	/* MurmurHash3 fmix64: a full avalanche, so h % total splits evenly. */
	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdULL;
	h ^= h >> 33;
	h *= 0xc4ceb9fe1a85ec53ULL;
	h ^= h >> 33;
	return h;
}

static __always_inline __u64 hash_words(const __u32 *w, int n, __u64 seed)
{
	__u64 h = seed;
	for (int i = 0; i < n; i++)
		h = mix64(h ^ w[i]);
	return h;
}

static __always_inline bool is_bypassed(__u8 family, const __u32 *daddr)
{
	if (family == 4) {
		__u32 a = bpf_ntohl(daddr[0]);
		/* loopback, link-local, multicast, broadcast */
		if ((a >> 24) == 127 || (a >> 16) == 0xa9fe || (a >> 28) == 0xe || a == 0xffffffff)
			return true;
		struct lpm4_key k = { .prefixlen = 32, .addr = daddr[0] };
		return bpf_map_lookup_elem(&bypass4, &k) != NULL;
	}
	__u32 a0 = bpf_ntohl(daddr[0]);
	/* ::1, fe80::/10, ff00::/8 */
	if ((a0 >> 22) == (0xfe80 >> 6) || (a0 >> 24) == 0xff)
		return true;
	if (!daddr[0] && !daddr[1] && !daddr[2] && daddr[3] == bpf_htonl(1))
		return true;
	struct lpm6_key k = { .prefixlen = 128 };
	__builtin_memcpy(k.addr, daddr, 16);
	return bpf_map_lookup_elem(&bypass6, &k) != NULL;
}

/* The tables (maps.h) have fewer than 2^31 entries: a binary search ends
 * within 32 halvings. RANGE_LEVELS is how deep Go builds nodes
 * (internal/maps/ranges.go rangeLevels). */
#define RANGE_SEARCH_STEPS 32
#define RANGE_LEVELS 4
#define RANGE_CHILD (1ULL << 63)

/* The rules whose prefixes contain a (host order), from the IPv4 table
 * tbl (maps.h has its layout; internal/maps/ranges_test.go lookup4 is this
 * function in Go, held to a longest-prefix match). */
static __always_inline __u64 range_rules4(void *tbl, __u64 a)
{
	__u32 k = 0;
	__u64 *g = bpf_map_lookup_elem(tbl, &k);
	if (!g)
		return 0;
	__u32 sets = *g, node = 1, set = 0, lo = 0, hi = 0;
	bool search = false;
	for (int level = 0; level < RANGE_LEVELS; level++) {
		k = node;
		__u64 *h0 = bpf_map_lookup_elem(tbl, &k);
		if (!h0)
			return 0;
		__u32 from = *h0 & 0xff, ib = (*h0 >> 8) & 0xff;
		if (from) {
			k = node + 1;
			__u64 *h1 = bpf_map_lookup_elem(tbl, &k);
			if (!h1)
				return 0;
			/* from < 32 and ib >= 1 (Go sees to both): every shift
			 * below is 1-31 */
			__u64 top = a >> ((32 - from) & 63), btop = (*h1 >> 32) >> ((32 - from) & 63);
			if (top != btop) {
				set = top < btop ? (__u32)*h1 : (__u32)(*h0 >> 32);
				goto found;
			}
		}
		k = node + 2 + (((a << from) & 0xffffffff) >> ((32 - ib) & 63));
		__u64 *e = bpf_map_lookup_elem(tbl, &k);
		if (!e)
			return 0;
		if (*e & RANGE_CHILD) {
			node = (__u32)*e;
			continue;
		}
		if (!(*e >> 32)) {
			set = (__u32)*e;
			goto found;
		}
		lo = (__u32)*e;
		hi = lo + (__u32)(*e >> 32) - 1;
		search = true;
		break;
	}
	if (!search)
		return 0;
	for (int i = 0; i < RANGE_SEARCH_STEPS && lo < hi; i++) {
		__u32 mid = lo + (hi - lo + 1) / 2;
		__u64 *r = bpf_map_lookup_elem(tbl, &mid);
		if (!r)
			return 0;
		if ((*r >> 32) <= a)
			lo = mid;
		else
			hi = mid - 1;
	}
	__u64 *r = bpf_map_lookup_elem(tbl, &lo);
	if (!r)
		return 0;
	set = (__u32)*r;
found:
	if (!set)
		return 0;
	k = sets + set - 1;
	__u64 *bits = bpf_map_lookup_elem(tbl, &k);
	return bits ? *bits : 0;
}

/* bits [from, from + n) of the 128-bit hi:lo, 1 <= n <= 32 and
 * from + n <= 128: no shift by 64 or more (the JIT masks shift counts). */
static __always_inline __u64 bits128(__u64 hi, __u64 lo, __u32 from, __u32 n)
{
	__u64 x;
	if (from >= 64)
		x = lo << ((from - 64) & 63);
	else if (from == 0)
		x = hi;
	else
		x = (hi << (from & 63)) | (lo >> ((64 - from) & 63));
	return x >> ((64 - n) & 63);
}

/* -1, 0, 1: where the top from bits of a stand against b's (0 < from < 128). */
static __always_inline int cmp_top128(__u64 ahi, __u64 alo, __u64 bhi, __u64 blo, __u32 from)
{
	__u64 x, y;
	if (from <= 64) {
		x = ahi >> ((64 - from) & 63);
		y = bhi >> ((64 - from) & 63);
	} else if (ahi != bhi) {
		x = ahi;
		y = bhi;
	} else {
		x = alo >> ((128 - from) & 63);
		y = blo >> ((128 - from) & 63);
	}
	return x < y ? -1 : x > y;
}

/* The IPv6 counterpart of range_rules4 (lookup6 in Go): a is the address,
 * host order. */
static __always_inline __u64 range_rules6(void *tbl, __u64 ahi, __u64 alo)
{
	__u32 k = 0;
	struct range6 *g = bpf_map_lookup_elem(tbl, &k);
	if (!g)
		return 0;
	__u32 sets = g->v, node = 1, set = 0, lo = 0, hi = 0;
	bool search = false;
	for (int level = 0; level < RANGE_LEVELS; level++) {
		k = node;
		struct range6 *h = bpf_map_lookup_elem(tbl, &k);
		if (!h)
			return 0;
		__u32 from = h->v & 0xff, ib = (h->v >> 8) & 0xff;
		if (from) {
			int c = cmp_top128(ahi, alo, h->hi, h->lo, from);
			if (c) {
				set = c < 0 ? (h->v >> 16) & 0xffffff : h->v >> 40;
				goto found;
			}
		}
		k = node + 1 + bits128(ahi, alo, from, ib);
		struct range6 *e = bpf_map_lookup_elem(tbl, &k);
		if (!e)
			return 0;
		if (e->v & RANGE_CHILD) {
			node = (__u32)e->v;
			continue;
		}
		if (!(e->v >> 32)) {
			set = (__u32)e->v;
			goto found;
		}
		lo = (__u32)e->v;
		hi = lo + (__u32)(e->v >> 32) - 1;
		search = true;
		break;
	}
	if (!search)
		return 0;
	for (int i = 0; i < RANGE_SEARCH_STEPS && lo < hi; i++) {
		__u32 mid = lo + (hi - lo + 1) / 2;
		struct range6 *r = bpf_map_lookup_elem(tbl, &mid);
		if (!r)
			return 0;
		if (r->hi < ahi || (r->hi == ahi && r->lo <= alo))
			lo = mid;
		else
			hi = mid - 1;
	}
	struct range6 *r = bpf_map_lookup_elem(tbl, &lo);
	if (!r)
		return 0;
	set = (__u32)r->v;
found:
	if (!set)
		return 0;
	k = sets + set - 1;
	struct range6 *bits = bpf_map_lookup_elem(tbl, &k);
	return bits ? bits->v : 0;
}

/* The rules whose prefixes contain addr, from generation gen's table
 * (none while that generation has no table: a policy without such
 * prefixes). */
static __always_inline __u64 policy_rules_of(void *gens4, void *gens6, __u32 gen, __u8 family, const __u32 *addr)
{
	if (family == 4) {
		void *tbl = bpf_map_lookup_elem(gens4, &gen);
		return tbl ? range_rules4(tbl, bpf_ntohl(addr[0])) : 0;
	}
	void *tbl = bpf_map_lookup_elem(gens6, &gen);
	if (!tbl)
		return 0;
	__u64 hi = ((__u64)bpf_ntohl(addr[0]) << 32) | bpf_ntohl(addr[1]);
	__u64 lo = ((__u64)bpf_ntohl(addr[2]) << 32) | bpf_ntohl(addr[3]);
	return range_rules6(tbl, hi, lo);
}

struct match_ctx {
	const struct target *t;
	__u64 candidates;
	__u32 gen;
	__s32 found;
};

static long match_rule(__u32 i, void *data)
{
	struct match_ctx *m = data;
	const struct target *t = m->t;

	if (i >= MAX_RULES)
		return 1;
	if (!(m->candidates & (1ULL << i)))
		return 0;
	__u32 idx = m->gen * MAX_RULES + i;
	struct policy_rule *r = bpf_map_lookup_elem(&policy_rules, &idx);
	if (!r)
		return 1;
	if (r->proto && r->proto != t->proto)
		return 0;
	if (r->nports) {
		bool hit = false;
		for (int j = 0; j < MAX_PORT_RANGES; j++) {
			if (j >= r->nports)
				break;
			if (t->dport >= r->ports[j].lo && t->dport <= r->ports[j].hi) {
				hit = true;
				break;
			}
		}
		if (!hit)
			return 0;
	}
	m->found = i;
	return 1;
}

/* The policy for t: the first rule (in config order) whose every condition
 * holds, else the default policy. Always non-NULL once the maps are loaded. */
static __always_inline struct policy *policy_lookup(const struct target *t, __u8 *origin)
{
	__u32 zero = 0;
	__u32 *genp = bpf_map_lookup_elem(&policy_generation, &zero);
	if (!genp)
		return NULL;
	__u32 gen = *genp & 1;
	struct policy_set *meta = bpf_map_lookup_elem(&policy_meta, &gen);
	if (!meta)
		return NULL;

	*origin = ORIGIN_BALANCED;
	if (!meta->nrules)
		return &meta->dflt;

	struct match_ctx m = { .t = t, .gen = gen, .found = -1 };
	__u32 nrules = meta->nrules < MAX_RULES ? meta->nrules : MAX_RULES;
	__u64 all = nrules >= 64 ? ~0ULL : (1ULL << nrules) - 1;
	/* A direction in which no rule lists prefixes needs no lookup, nor
	 * does the source when no rule holds for the destination. */
	__u64 dst = meta->any_dst;
	if ((dst & all) != all)
		dst |= policy_rules_of(&policy_ranges_dst4, &policy_ranges_dst6, gen, t->family, t->daddr);
	if (!dst)
		return &meta->dflt;
	__u64 src = meta->any_src;
	if ((src & all) != all && t->has_saddr)
		src |= policy_rules_of(&policy_ranges_src4, &policy_ranges_src6, gen, t->family, t->saddr);
	m.candidates = dst & src;
	if (!m.candidates)
		return &meta->dflt;

#ifdef MHBPF_NO_BPF_LOOP
	/* Kernels before 5.17 have no bpf_loop: the same walk as a bounded loop
	 * (the *Compat objects, which the loader picks there). */
	for (__u32 i = 0; i < MAX_RULES; i++)
		if (i >= nrules || match_rule(i, &m))
			break;
#else
	bpf_loop(nrules, match_rule, &m, 0);
#endif
	if (m.found < 0)
		return &meta->dflt;
	__u32 idx = gen * MAX_RULES + (m.found & (MAX_RULES - 1));
	struct policy_rule *r = bpf_map_lookup_elem(&policy_rules, &idx);
	if (!r)
		return &meta->dflt;
	*origin = ORIGIN_POLICY;
	return &r->policy;
}

/* Which of a policy's entries are usable now: the up ones of the best tier. */
struct usable {
	__u8 tier;
	__u8 ok[MAX_POLICY_UPLINKS];
	__u32 total;
};

/* 1 if v is not 0, 0 if it is, computed without a branch (the empty asm
 * keeps clang from turning it back into one): the verifier sees one state
 * with an unknown 0 or 1 instead of one per combination of up and down
 * uplinks. Verified at each call, as the functions below are on kernels
 * before 5.12 (see loader.useStaticFunctions), those combinations
 * multiplied past the verifier's limit of a million instructions. */
static __always_inline __u32 nonzero(__u32 v)
{
	__u64 x = v;

	asm volatile("" : "+r"(x));
	return (x + 0xffffffffULL) >> 32;
}

/* The smaller of a and b, without a branch (as nonzero). */
static __always_inline __u32 min_nobranch(__u32 a, __u32 b)
{
	__s64 d = (__s64)a - (__s64)b;

	asm volatile("" : "+r"(d));
	return b + (d & (d >> 63));
}

/* The helpers below are global functions: each is verified once, alone,
 * which keeps the verifier's path count linear instead of multiplying the
 * branches of every loop. */
__attribute__((noinline)) int usable_entries(const struct policy *p, struct usable *u)
{
	if (!p || !u)
		return -1;
	__u8 up[MAX_POLICY_UPLINKS] = {};
	__u32 tier = 255, total = 0;

	for (int i = 0; i < MAX_POLICY_UPLINKS; i++) {
		if (i >= p->nentries)
			break;
		__u32 id = p->entries[i].uplink;
		struct uplink *l = bpf_map_lookup_elem(&uplinks, &id);
		if (!l)
			continue;
		up[i] = nonzero(l->up) & nonzero(p->entries[i].weight);
		/* an entry that is down counts as tier 255 */
		tier = min_nobranch(tier, 255 - up[i] * (255 - p->entries[i].tier));
	}
	for (int i = 0; i < MAX_POLICY_UPLINKS; i++) {
		__u32 ok = up[i] & (1 - nonzero(p->entries[i].tier ^ tier));

		u->ok[i] = ok;
		total += ok * p->entries[i].weight;
	}
	u->tier = tier;
	u->total = total;
	return total ? 0 : -1;
}

__attribute__((noinline)) int pick_weighted(const struct policy *p, const struct usable *u, __u64 hash)
{
	if (!p || !u || !u->total)
		return -1;
	__u32 r = hash % u->total;

	for (int i = 0; i < MAX_POLICY_UPLINKS; i++) {
		if (!u->ok[i])
			continue;
		__u32 w = p->entries[i].weight;
		if (r < w)
			return p->entries[i].uplink;
		r -= w;
	}
	return -1;
}

__attribute__((noinline)) int is_usable(const struct policy *p, const struct usable *u, __u32 uplink)
{
	if (!p || !u)
		return false;
	for (int i = 0; i < MAX_POLICY_UPLINKS; i++)
		if (u->ok[i] && p->entries[i].uplink == uplink)
			return true;
	return false;
}

static __always_inline __u32 uplink_mark(__u32 id)
{
	struct uplink *l = bpf_map_lookup_elem(&uplinks, &id);
	return l ? l->mark : 0;
}

/* The chosen uplink's bit, plus the bits of the policy's other uplinks that
 * come later in fib rule order, so that the kernel falls through to them by
 * itself if the chosen uplink's route vanishes before the daemon reacts.
 * The entries are listed in fib rule order (the daemon sorts them: the rules
 * follow the configuration's order, while the uplink ids are slots that stay
 * with an uplink's name), so "later" is "after the chosen one's entry". */
__attribute__((noinline)) __u32 policy_mark(const struct policy *p, __s32 chosen)
{
	if (!p)
		return 0;
	__u32 mark = 0;

	if (chosen >= 0) {
		bool after = false;

		mark = uplink_mark(chosen);
		for (int i = 0; i < MAX_POLICY_UPLINKS; i++) {
			if (i >= p->nentries)
				break;
			if (after)
				mark |= uplink_mark(p->entries[i].uplink);
			else if (p->entries[i].uplink == chosen)
				after = true;
		}
	}
	if (p->fallback == FALLBACK_UNREACHABLE)
		mark |= mark_strict;
	return mark & mark_mask;
}

__attribute__((noinline)) int choose_sticky(const struct policy *p, const struct usable *u, const struct target *t)
{
	if (!p || !u || !t)
		return -1;
	struct sticky_key k = {
		.policy = p->id,
		.family = t->family,
		.mode = p->sticky,
	};
	__u64 now = coarse_ns();

	__builtin_memcpy(k.daddr, t->daddr, 16);
	if (p->sticky == STICKY_PAIR)
		__builtin_memcpy(k.saddr, t->saddr, 16);

	struct sticky_entry *s = bpf_map_lookup_elem(&sticky, &k);
	if (s && now - s->last_used < sticky_ns && is_usable(p, u, s->uplink)) {
		/* Refreshed at most once a second: new flows to a busy
		 * destination from several CPUs mostly only read it. */
		if (now - s->last_used >= LAST_SEEN_STEP_NS)
			s->last_used = now;
		return s->uplink;
	}

	__s32 chosen = pick_weighted(p, u, hash_words((const __u32 *)&k, sizeof(k) / 4, 0));
	if (chosen >= 0) {
		struct sticky_entry v = { .uplink = chosen, .last_used = now };
		bpf_map_update_elem(&sticky, &k, &v, BPF_ANY);
	}
	return chosen;
}

/* Policy lookup and uplink choice for a new flow. Deterministic for a given
 * map state (and, for sticky entries, clock). A global function: the
 * verifier checks it once on its own instead of once per path of the
 * caller's parsing, which keeps the programs far below the complexity limit. */
__attribute__((noinline)) int choose(const struct target *t, struct choice *c)
{
	if (!t || !c)
		return -1;
	struct usable u;
	__u8 origin = ORIGIN_BALANCED;

	c->uplink = -1;
	c->mark = 0;
	struct policy *p = policy_lookup(t, &origin);
	if (!p)
		return -1;
	c->origin = origin;
	c->policy = p->id;

	if (usable_entries(p, &u) == 0) {
		if (p->sticky == STICKY_FLOW)
			c->uplink = pick_weighted(p, &u, mix64(t->flow_hash));
		else
			c->uplink = choose_sticky(p, &u, t);
	}
	c->mark = policy_mark(p, c->uplink);
	return 0;
}

static __always_inline void count_new_flow(__u32 uplink)
{
	struct uplink_counters *c = bpf_map_lookup_elem(&counters, &uplink);
	if (c)
		c->new_flows++;
}

static __always_inline __u32 apply_mark(__u32 old, __u32 bits)
{
	return (old & ~mark_mask) | (bits & mark_mask);
}

#endif
