package test

// The datapath's uplink choice, computed here from the same inputs: tests
// that change weights use it to know, before they look, which uplink a
// fresh choice would take, so that "kept its uplink" cannot hold by
// coincidence (a recomputed choice that happens to be the old one). Each
// test also checks it against what the kernel chose (checkChoice), so a
// drift from bpf/include/policy.h fails loudly instead of weakening them.

import (
	"encoding/binary"
	"net/netip"
)

// mix64 and hashWords are bpf/include/policy.h's.
func mix64(h uint64) uint64 {
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	return h
}

func hashWords(w []uint32) uint64 {
	var h uint64
	for _, x := range w {
		h = mix64(h ^ uint64(x))
	}
	return h
}

// addrWords is an address as the programs hold it: network byte order in
// memory, read as native (little-endian) 32-bit words.
func addrWords(a netip.Addr) [4]uint32 {
	var w [4]uint32
	if a.Is4() {
		b := a.As4()
		w[0] = binary.LittleEndian.Uint32(b[:])
		return w
	}
	b := a.As16()
	for i := range w {
		w[i] = binary.LittleEndian.Uint32(b[4*i:])
	}
	return w
}

func family(a netip.Addr) uint32 {
	if a.Is4() {
		return 4
	}
	return 6
}

// Sticky modes of bpf/include/maps.h.
const (
	modeDestination = 0
	modeFlow        = 1
	modePair        = 2
)

// stickyHash is the hash of struct sticky_key {policy, family, mode, pad,
// saddr[4] (pair only), daddr[4]}: what a destination or pair choice picks by.
func stickyHash(policyID uint32, mode uint32, src, dst netip.Addr) uint64 {
	w := []uint32{policyID, family(dst) | mode<<8}
	var s [4]uint32
	if mode == modePair {
		s = addrWords(src)
	}
	d := addrWords(dst)
	w = append(append(w, s[:]...), d[:]...)
	return hashWords(w)
}

// flowHash is the per-flow pick of sticky = "flow": mix64 of the hash of
// the family's flow key, struct flow4_key {saddr, daddr, sport, dport,
// proto, pad[3]} or struct flow6_key {saddr[4], daddr[4], sport, dport,
// proto, pad[3]}.
func flowHash(proto uint8, src, dst netip.AddrPort) uint64 {
	var ports [4]byte
	binary.BigEndian.PutUint16(ports[0:], src.Port())
	binary.BigEndian.PutUint16(ports[2:], dst.Port())
	s, d := addrWords(src.Addr()), addrWords(dst.Addr())
	var w []uint32
	if src.Addr().Is4() {
		w = []uint32{s[0], d[0]}
	} else {
		w = append(append(w, s[:]...), d[:]...)
	}
	w = append(w, binary.LittleEndian.Uint32(ports[:]), uint32(proto))
	return mix64(hashWords(w))
}

// pick is pick_weighted over uplinks 0..n-1 of one tier, all up: the index
// of the uplink a hash selects with these weights.
func pick(hash uint64, weights ...uint64) int {
	var total uint64
	for _, w := range weights {
		total += w
	}
	r := hash % total
	for i, w := range weights {
		if r < w {
			return i
		}
		r -= w
	}
	return -1
}

// uplinkName is the test configuration's name of uplink index i.
func uplinkName(i int) string { return []string{"isp1", "isp2"}[i] }

// flipWeights finds weights for isp1 and isp2 (each 1..9) with which every
// hash in hashes picks another uplink than with 8 and 2: after a reload to
// them, a choice made afresh differs from the stored one for all of them.
func flipWeights(hashes ...uint64) (w1, w2 uint64, ok bool) {
	for w1 = 1; w1 <= 9; w1++ {
		for w2 = 1; w2 <= 9; w2++ {
			all := true
			for _, h := range hashes {
				if pick(h, w1, w2) == pick(h, 8, 2) {
					all = false
					break
				}
			}
			if all {
				return w1, w2, true
			}
		}
	}
	return 0, 0, false
}
