package bpf_test

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/mhbpf/mhbpf/bpf"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/packet"
)

// The per-packet cost of every path of the tc programs, for both families
// and the three kinds of flow, with the flow maps nearly empty and full:
//
//	go test -run '^$' -bench 'BenchmarkPath' -benchtime 20x -count 1 ./bpf/
//
// BenchmarkPath/flows=N/PATH/FAMILY/PROTO, where flows=N is how many live
// records each of the four flow maps (flows4, flows6, inbound4, inbound6)
// holds besides the benchmark's own, PATH one of pathKinds, FAMILY ipv4 or
// ipv6 and PROTO tcp, udp or icmp (ICMP or ICMPv6 echo). BenchmarkPath/floor
// is the test-run floor in the same run (BaselinePass's program). Packets
// carry no payload. The policy's size is BenchmarkLANNewFlowPolicyPrefixes'
// matrix, not this one's: here it is the default balance.
//
// The datapath and its filled maps are built once per flows=N and shared by
// that size's cases (filling a million records per map is most of the run
// time); each case sets up the state it needs and checks, by the mark of
// one run, that its packet takes its path before it is measured.
func BenchmarkPath(b *testing.B) {
	b.Run("floor", func(b *testing.B) {
		p := syn(ap(lanHost, 40000), ap(remote, 443))
		p.TCPFlags = packet.TCPAck
		benchProgram(b, baselineProgram(b), p.Bytes())
	})
	for _, n := range []int{1_000, 1_000_000} {
		b.Run(fmt.Sprintf("flows=%d", n), func(b *testing.B) {
			size := uint32(n + pathMapSlack)
			shared := newEnvWith(b, loader.Options{FlowMapSize: size, InboundMapSize: size})
			// Fail closed when none of its uplinks is up, so that
			// lan-new's mark tells the choice was made (and found
			// nothing up) from a packet the program passed over.
			def := balanced()
			def.Fallback = maps.FallbackUnreachable
			shared.policy(maps.Policy{Default: def})
			fillPathFlows(b, shared, n)
			for _, path := range pathKinds {
				for _, c := range pathCases {
					b.Run(path.name+"/"+c.name(), func(b *testing.B) {
						e := *shared
						e.t = b // failures are the case's, on its goroutine
						path.bench(b, &e, c)
					})
				}
			}
		})
	}
}

// pathMapSlack is the flow maps' room above flows=N for the benchmark's own
// records (a few per case) and the LRU's per-CPU free lists, so that no
// record is evicted.
const pathMapSlack = 1024

var pathKinds = []struct {
	name  string
	bench func(b *testing.B, e *env, c pathCase)
}{
	{"lan-known", benchLANKnown},
	{"lan-new", benchLANNew},
	{"uplink-reply", benchUplinkReply},
	{"uplink-inbound-known", benchUplinkInboundKnown},
}

// pathCase is a family and a kind of flow.
type pathCase struct {
	v6    bool
	proto uint8 // packet.ProtoTCP, packet.ProtoUDP or packet.ProtoICMP (ICMPv6 for v6)
}

var pathCases = func() []pathCase {
	var cs []pathCase
	for _, v6 := range []bool{false, true} {
		for _, proto := range []uint8{packet.ProtoTCP, packet.ProtoUDP, packet.ProtoICMP} {
			cs = append(cs, pathCase{v6: v6, proto: proto})
		}
	}
	return cs
}()

func (c pathCase) name() string {
	fam := "ipv4"
	if c.v6 {
		fam = "ipv6"
	}
	return fam + "/" + map[uint8]string{packet.ProtoTCP: "tcp", packet.ProtoUDP: "udp", packet.ProtoICMP: "icmp"}[c.proto]
}

func (c pathCase) lanHost() netip.Addr { return pick(c.v6, lanHost, lanHost6) }
func (c pathCase) remote() netip.Addr  { return pick(c.v6, remote, remote6) }

// uplinkAddr is uplink id's own address (what a reply to a NATed flow is
// sent to).
func (c pathCase) uplinkAddr(id int) netip.Addr {
	if id == isp1 {
		return pick(c.v6, netip.MustParseAddr("100.64.0.2"), netip.MustParseAddr("2001:db8:10::2"))
	}
	return pick(c.v6, netip.MustParseAddr("100.64.1.2"), netip.MustParseAddr("2001:db8:11::2"))
}

func pick(v6 bool, a4, a6 netip.Addr) netip.Addr {
	if v6 {
		return a6
	}
	return a4
}

// port is port for TCP and UDP; an ICMP echo has no destination port (its
// identifier is the source's).
func (c pathCase) port(port uint16) uint16 {
	if c.proto == packet.ProtoICMP {
		return 0
	}
	return port
}

// packet is c's packet from src to dst: a TCP segment with tcpFlags, a
// UDP datagram, or an ICMP echo request (an echo reply if reply) whose
// identifier is src's port.
func (c pathCase) packet(src, dst netip.AddrPort, tcpFlags uint8, reply bool) packet.Packet {
	p := packet.Packet{Src: src, Dst: ap(dst.Addr(), c.port(dst.Port())), Proto: c.proto, TCPFlags: tcpFlags}
	if c.proto == packet.ProtoICMP {
		p.TCPFlags = 0
		p.ICMPType = 8 // echo request
		if reply {
			p.ICMPType = 0
		}
		if c.v6 {
			p.Proto, p.ICMPType = packet.ProtoICMPv6, 128
			if reply {
				p.ICMPType = 129
			}
		}
	}
	return p
}

// opener is the first packet of c's flow from src to dst (a TCP SYN), later
// one of its next packets (an ACK; the same datagram or echo request).
func (c pathCase) opener(src, dst netip.AddrPort) packet.Packet {
	return c.packet(src, dst, packet.TCPSyn, false)
}
func (c pathCase) later(src, dst netip.AddrPort) packet.Packet {
	return c.packet(src, dst, packet.TCPAck, false)
}

// LAN ingress, a packet of a known flow: parse, flow hit, uplink check,
// counters, mark.
func benchLANKnown(b *testing.B, e *env, c pathCase) {
	e.lan(false)
	src, dst := ap(c.lanHost(), 40000), ap(c.remote(), 443)
	e.lanRun(c.opener(src, dst), 0) // records the flow (a hit if a previous run did)
	p := c.later(src, dst)
	f, ok := e.flow(p)
	if !ok || f.Origin != maps.OriginBalanced {
		b.Fatalf("no balanced flow recorded for %v (%+v, %v)", p.Src, f, ok)
	}
	before := uplinkCounters(b, e, f.Uplink)
	if m := e.lanRun(p, 0); m != f.Mark || uplinkOf(m) != f.Uplink {
		b.Fatalf("known flow: mark %#x, want its record's %#x (uplink %d)", m, f.Mark, f.Uplink)
	}
	// A re-choice of the same uplink (a retired record) gives the same
	// mark: what tells a hit is a packet counted and no new flow.
	if after := uplinkCounters(b, e, f.Uplink); after.TxPackets != before.TxPackets+1 || after.NewFlows != before.NewFlows {
		b.Fatalf("known flow: uplink %d counted %d packets and %d new flows, want 1 and 0",
			f.Uplink, after.TxPackets-before.TxPackets, after.NewFlows-before.NewFlows)
	}
	benchProgram(b, e.d.LANProgram(), p.Bytes())
}

// LAN ingress, a new flow with the default balance and both its uplinks
// down (as BenchmarkLANNewFlowFullPolicy): flow misses, bypass check, the
// choice, nothing recorded, so every run takes this path.
func benchLANNew(b *testing.B, e *env, c pathCase) {
	e.lan(false)
	for _, id := range []int{isp1, isp2} {
		if err := e.m.SetUplinkUp(id, false); err != nil {
			b.Fatal(err)
		}
		defer func() {
			if err := e.m.SetUplinkUp(id, true); err != nil {
				b.Error(err)
			}
		}()
	}
	p := c.opener(ap(c.lanHost(), 42000), ap(c.remote(), 443))
	if m := e.lanRun(p, 0); m != markStrict {
		b.Fatalf("new flow, its uplinks down: mark %#x, want the fail-closed bit alone", m)
	}
	if f, ok := e.flow(p); ok {
		b.Fatalf("a new flow with no uplink up was recorded: %+v", f)
	}
	benchProgram(b, e.d.LANProgram(), p.Bytes())
}

// Uplink ingress, the answer to a flow the LAN started (recorded first by
// the LAN program, with its remote for UDP): parse, inbound miss, not an
// opener (TCP flags, ICMP type, or for UDP the remote's record), left
// unmarked.
func benchUplinkReply(b *testing.B, e *env, c pathCase) {
	e.lan(false)
	out := c.opener(ap(c.lanHost(), 41000), ap(c.remote(), 443))
	if c.proto == packet.ProtoUDP {
		out.Dst = ap(c.remote(), 53)
	}
	e.lanRun(out, 0)
	f, ok := e.flow(out)
	if !ok {
		b.Fatalf("the LAN's flow %v was not recorded", out.Src)
	}
	e.arrivesOn(f.Uplink, true)
	p := c.packet(out.Dst, ap(c.uplinkAddr(f.Uplink), 41000), packet.TCPAck, true)
	if c.proto == packet.ProtoICMP {
		p.Src = ap(c.remote(), 41000) // the echo's identifier
	}
	p.L3 = true
	before := uplinkCounters(b, e, f.Uplink)
	if m := e.uplinkRun(p, 0); m != 0 {
		b.Fatalf("reply to the LAN's own flow: mark %#x, want none (taken for a new inbound flow)", m)
	}
	if got := uplinkCounters(b, e, f.Uplink).RxPackets - before.RxPackets; got != 1 {
		b.Fatalf("uplink %d counted %d packets, want 1: the program did not see the reply as arriving on it", f.Uplink, got)
	}
	if g, ok := e.flow(p); ok {
		b.Fatalf("the reply was recorded as an inbound flow: %+v", g)
	}
	benchProgram(b, e.d.UplinkProgram(), p.Bytes())
}

func uplinkCounters(b *testing.B, e *env, id int) maps.Counters {
	b.Helper()
	c, err := e.m.UplinkCounters(id)
	if err != nil {
		b.Fatal(err)
	}
	return c
}

// Uplink ingress, a packet of a flow a remote peer started: parse,
// inbound hit, counters, mark.
func benchUplinkInboundKnown(b *testing.B, e *env, c pathCase) {
	e.arrivesOn(isp2, true)
	src, dst := ap(c.remote(), 50000), ap(c.uplinkAddr(isp2), 80)
	op := c.opener(src, dst)
	op.L3 = true
	e.uplinkRun(op, 0)
	f, ok := e.flow(op)
	if !ok || f.Origin != maps.OriginInbound || f.Mark != markISP2|markReply {
		b.Fatalf("inbound flow %v: record %+v (%v), want inbound on isp2", op.Src, f, ok)
	}
	p := c.later(src, dst)
	p.L3 = true
	before := uplinkCounters(b, e, isp2)
	if m := e.uplinkRun(p, 0); m != f.Mark {
		b.Fatalf("known inbound flow: mark %#x, want its record's %#x", m, f.Mark)
	}
	// A UDP datagram recorded anew would get the same mark.
	if after := uplinkCounters(b, e, isp2); after.RxPackets != before.RxPackets+1 || after.NewFlows != before.NewFlows {
		b.Fatalf("known inbound flow: isp2 counted %d packets and %d new flows, want 1 and 0",
			after.RxPackets-before.RxPackets, after.NewFlows-before.NewFlows)
	}
	benchProgram(b, e.d.UplinkProgram(), p.Bytes())
}

// fillPathFlows puts n live records in each flow map: the LAN's flows
// (flows4, flows6) from the LAN host to n destinations' ports, the
// inbound ones (inbound4, inbound6) from n remote ports to isp1's address,
// every other one on isp1, the rest on isp2, each of its uplink's current
// generation. None has a tuple of the benchmark's packets (their peers are
// in 100.96.0.0/12 and 2001:db8:96::/48).
func fillPathFlows(b *testing.B, e *env, n int) {
	b.Helper()
	gens, err := e.m.FlowGenerations()
	if err != nil {
		b.Fatal(err)
	}
	record := func(i int, origin maps.Origin, reply uint32) bpf.UplinkFlow {
		id := i % 2
		return bpf.UplinkFlow{Mark: markISP1<<uint(id) | reply, Uplink: uint8(id), Origin: uint8(origin), Gen: gens[id]}
	}
	lan := func(i int) bpf.UplinkFlow { return record(i, maps.OriginBalanced, 0) }
	inbound := func(i int) bpf.UplinkFlow { return record(i, maps.OriginInbound, markReply) }
	peer4 := func(i int) uint32 { return addrWord(netip.AddrFrom4([4]byte{100, 96 | byte(i>>16), 0, 0}), 0) }
	peer6 := func(i int) [4]uint32 {
		return addrWords(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0x96, 0, byte(i >> 16), 15: 1}))
	}
	us4, us6 := addrWord(netip.MustParseAddr("100.64.0.2"), 0), addrWords(netip.MustParseAddr("2001:db8:10::2"))
	fillFlowMap(b, e.m.Flows4, n, func(i int) bpf.UplinkFlow4Key {
		return bpf.UplinkFlow4Key{Saddr: addrWord(lanHost, 0), Daddr: peer4(i), Sport: uint16(i), Dport: 443, Proto: packet.ProtoTCP}
	}, lan)
	fillFlowMap(b, e.m.Flows6, n, func(i int) bpf.UplinkFlow6Key {
		return bpf.UplinkFlow6Key{Saddr: addrWords(lanHost6), Daddr: peer6(i), Sport: uint16(i), Dport: 443, Proto: packet.ProtoTCP}
	}, lan)
	fillFlowMap(b, e.m.Inbound4, n, func(i int) bpf.UplinkFlow4Key {
		return bpf.UplinkFlow4Key{Saddr: peer4(i), Daddr: us4, Sport: uint16(i), Dport: 80, Proto: packet.ProtoTCP}
	}, inbound)
	fillFlowMap(b, e.m.Inbound6, n, func(i int) bpf.UplinkFlow6Key {
		return bpf.UplinkFlow6Key{Saddr: peer6(i), Daddr: us6, Sport: uint16(i), Dport: 80, Proto: packet.ProtoTCP}
	}, inbound)
}

// fillFlowMap writes n records into m in batches.
func fillFlowMap[K any](b *testing.B, m *ebpf.Map, n int, key func(int) K, val func(int) bpf.UplinkFlow) {
	b.Helper()
	const chunk = 16384
	keys := make([]K, 0, chunk)
	vals := make([]bpf.UplinkFlow, 0, chunk)
	for i := 0; i < n; i++ {
		keys, vals = append(keys, key(i)), append(vals, val(i))
		if len(keys) == chunk || i == n-1 {
			if _, err := m.BatchUpdate(keys, vals, nil); err != nil {
				b.Fatal(err)
			}
			keys, vals = keys[:0], vals[:0]
		}
	}
}

// addrWord is 4 bytes of a, from byte off, as the kernel's __be32 holds
// them (network order in memory).
func addrWord(a netip.Addr, off int) uint32 {
	s := a.AsSlice()
	return binary.NativeEndian.Uint32(s[off:])
}

func addrWords(a netip.Addr) [4]uint32 {
	return [4]uint32{addrWord(a, 0), addrWord(a, 4), addrWord(a, 8), addrWord(a, 12)}
}
