package bpf_test

import (
	"encoding/binary"
	"errors"
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
// ipv6 and PROTO tcp, udp or icmp (ICMP or ICMPv6 echo). Packets with IPv4
// options or IPv6 extension headers are pathHeaderCases, their FAMILY
// ipv4+options, ipv6+hopopts, ... BenchmarkPath/floor is the test-run floor
// in the same run (BaselinePass's program). Packets carry no payload. The
// policy's size is BenchmarkLANNewFlowPolicyPrefixes' matrix, not this
// one's: here it is the default balance.
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
			// At 1M the LAN's flow maps are made full for the new
			// flows that are recorded: each of their records evicts
			// one, as on a busy router.
			s := &pathSize{full: n == 1_000_000}
			// Fail closed when none of its uplinks is up, so that
			// lan-new's mark tells the choice was made (and found
			// nothing up) from a packet the program passed over.
			def := balanced()
			def.Fallback = maps.FallbackUnreachable
			shared.policy(maps.Policy{Default: def})
			fillPathFlows(b, shared, n)
			run := func(name string, bench pathBench, c pathCase) {
				b.Run(name+"/"+c.name(), func(b *testing.B) {
					e := *shared
					e.t = b // failures are the case's, on its goroutine
					bench(b, &e, c, s)
				})
			}
			for _, path := range pathKinds {
				for _, c := range pathCases {
					run(path.name, path.bench, c)
				}
			}
			for _, h := range pathHeaderCases {
				run(h.path, h.bench, h.c)
			}
		})
	}
}

// pathBench measures one path for one case, in a datapath of size s.
type pathBench func(b *testing.B, e *env, c pathCase, s *pathSize)

// pathSize is what the cases of one flows=N share beyond the datapath.
type pathSize struct {
	// full: the LAN's new flows that are recorded fill the flow maps
	// and then evict, instead of being deleted again after their run.
	full bool
	// fresh is the next new-flow destination no case has used yet.
	fresh uint32
}

// pathMapSlack is the flow maps' room above flows=N for the benchmark's own
// records (a few per case) and the LRU's per-CPU free lists, so that no
// record is evicted (but where lan-new-recorded fills the LAN's maps on
// purpose, at 1M).
const pathMapSlack = 1024

var pathKinds = []struct {
	name  string
	bench pathBench
}{
	{"lan-known", benchLANKnown},
	{"lan-new", benchLANNew},
	{"lan-new-recorded", benchLANNewRecorded},
	{"uplink-reply", benchUplinkReply},
	{"uplink-inbound-known", benchUplinkInboundKnown},
}

// pathCase is a family and a kind of flow, and the IP header's extras.
type pathCase struct {
	v6    bool
	proto uint8 // packet.ProtoTCP, packet.ProtoUDP or packet.ProtoICMP (ICMPv6 for v6)
	hdr   ipExtras
}

// ipExtras is what a packet carries between its IP header and its L4
// header.
type ipExtras struct {
	name      string
	v4Options []byte  // IPv4 options (a multiple of 4 bytes)
	v6Ext     []uint8 // IPv6 extension headers (packet.Packet's Ext)
}

// The parser (bpf/include/parse.h) steps over IPv4 options by the header
// length, and over the IPv6 hop-by-hop, routing, destination-options and
// AH headers and a fragment header at offset 0 to the L4 header: packets
// with them are ordinary flows, on every path, at the cost of a header
// read per extension header. A non-first fragment has no ports: it takes
// the mark its first fragment got (lan-known-fragment).
var (
	// Router alert (RFC 2113: type 148, length 4, value 0), as IGMP and
	// RSVP send it.
	ipv4RouterAlert = ipExtras{name: "options", v4Options: []byte{148, 4, 0, 0}}
	ipv6HopOpts     = ipExtras{name: "hopopts", v6Ext: []uint8{0}}
	ipv6DstOpts     = ipExtras{name: "dstopts", v6Ext: []uint8{60}}
	// An atomic fragment (offset 0, no more fragments: RFC 6946).
	ipv6Fragment = ipExtras{name: "fragment", v6Ext: []uint8{44}}
)

// pathHeaderCases: TCP with IP options or extension headers on the LAN's
// paths, and a non-first IPv4 fragment of a known UDP flow.
var pathHeaderCases = func() []struct {
	path  string
	bench pathBench
	c     pathCase
} {
	type hc = struct {
		path  string
		bench pathBench
		c     pathCase
	}
	var hs []hc
	for _, kind := range []struct {
		name  string
		bench pathBench
	}{{"lan-known", benchLANKnown}, {"lan-new", benchLANNew}, {"lan-new-recorded", benchLANNewRecorded}} {
		for _, c := range []pathCase{
			{proto: packet.ProtoTCP, hdr: ipv4RouterAlert},
			{v6: true, proto: packet.ProtoTCP, hdr: ipv6HopOpts},
			{v6: true, proto: packet.ProtoTCP, hdr: ipv6DstOpts},
			{v6: true, proto: packet.ProtoTCP, hdr: ipv6Fragment},
		} {
			hs = append(hs, hc{kind.name, kind.bench, c})
		}
	}
	return append(hs, hc{"lan-known-fragment", benchLANKnownFragment, pathCase{proto: packet.ProtoUDP}})
}()

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
	if c.hdr.name != "" {
		fam += "+" + c.hdr.name
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
	p := packet.Packet{Src: src, Dst: ap(dst.Addr(), c.port(dst.Port())), Proto: c.proto, TCPFlags: tcpFlags,
		IPv4Options: c.hdr.v4Options, Ext: c.hdr.v6Ext}
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
func benchLANKnown(b *testing.B, e *env, c pathCase, _ *pathSize) {
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
func benchLANNew(b *testing.B, e *env, c pathCase, _ *pathSize) {
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

// LAN ingress, a new flow that is recorded, the common new flow: flow
// misses, bypass check, policy lookup, a new destination's weighted choice
// and sticky entry, the flow record (an LRU insert), counters, mark. Each
// new flow is a test run of its own (repeat 1) to a destination of its
// own: a test run repeats one packet, and the second run of a flow's first
// packet is a known flow. The kernel times only the program, but a run of
// one repeat costs more than one of 100,000 (the clock reads, and caches
// the syscall between runs left cold), so two controls run the same way,
// interleaved: ns/floor-run, the program that only returns, and
// ns/known-run, the LAN program on a packet of a known flow (lan-known's
// path) in the same map. With s.full the LAN's flow map is made full first
// and every record evicts one, as on a busy router; otherwise each record
// is deleted after its run, outside the timed part, and the map keeps its
// flows=N. The sticky entry and (UDP) the remote a new destination writes
// are deleted after each run at both sizes: flows=N is the flow map's size
// alone, the sticky map and remotes stay nearly empty.
func benchLANNewRecorded(b *testing.B, e *env, c pathCase, s *pathSize) {
	const perIter = 500
	e.lan(false)
	prog := e.d.LANProgram()
	next := func() packet.Packet { return c.opener(ap(c.lanHost(), 43000), ap(s.freshDst(b, c.v6), 443)) }
	flowMap, entries := e.m.Flows4, mapEntries[bpf.UplinkFlow4Key]
	if c.v6 {
		flowMap, entries = e.m.Flows6, mapEntries[bpf.UplinkFlow6Key]
	}

	// Once: the record is there, of the mark's uplink and its current
	// generation, and counted as that uplink's new flow.
	newBefore := newFlows(b, e)
	p := next()
	m := e.lanRun(p, 0)
	f, ok := e.flow(p)
	gens, err := e.m.FlowGenerations()
	if err != nil {
		b.Fatal(err)
	}
	if !ok || f.Origin != maps.OriginBalanced || f.Mark != m || uplinkOf(m) != f.Uplink || !gens.Current(f) {
		b.Fatalf("new flow %v -> %v: mark %#x, record %+v (found %v); want a balanced record with the packet's mark, "+
			"of the mark's uplink and that uplink's current generation (%v)", p.Src, p.Dst, m, f, ok, gens)
	}
	if got := newFlows(b, e) - newBefore; got != 1 {
		b.Fatalf("new flow %v -> %v: counted as %d new flows, want 1", p.Src, p.Dst, got)
	}

	if s.full {
		// Past the map's slack and the CPUs' LRU free lists, so
		// that the map has no free entry left.
		for i := 0; i < 4*pathMapSlack; i++ {
			if _, _, err := prog.Benchmark(next().Bytes(), 1, nil); err != nil {
				b.Fatal(err)
			}
		}
		// A few nodes may stay on another CPU's free list.
		if n, max := entries(b, flowMap), int(flowMap.MaxEntries()); n < max-pathMapSlack/2 {
			b.Fatalf("%v holds %d of %d entries: not full, its inserts would not evict", flowMap, n, max)
		}
	}

	floor := baselineProgram(b)
	floorPkt := p.Bytes()
	known := c.later(p.Src, p.Dst).Bytes()
	runs := b.N * perIter
	newBefore = newFlows(b, e)
	var total, floorTotal, knownTotal float64
	timed := func(prog *ebpf.Program, data []byte, sum *float64) {
		_, d, err := prog.Benchmark(data, 1, nil)
		if err != nil {
			b.Fatal(err)
		}
		*sum += float64(d.Nanoseconds())
	}
	for i := 0; i < runs; i++ {
		q := next()
		timed(prog, q.Bytes(), &total)
		if !s.full {
			if err := e.m.DeleteFlow(maps.FlowKey{Proto: q.Proto, Src: q.Src, Dst: q.Dst}); err != nil {
				b.Fatal(err)
			}
		}
		forgetDestination(b, e, q)
		timed(floor, floorPkt, &floorTotal)
		timed(prog, known, &knownTotal)
	}
	// Every timed run of a new flow was one the program recorded, and
	// the known flow's record stayed (a run of it recorded anew would be
	// counted too).
	if got := newFlows(b, e) - newBefore; got != uint64(runs) {
		b.Fatalf("%d runs of new flows and %d of a known one counted %d new flows, want %d", runs, runs, got, runs)
	}
	b.ReportMetric(total/float64(runs), "ns/new-flow")
	b.ReportMetric(knownTotal/float64(runs), "ns/known-run")
	b.ReportMetric(floorTotal/float64(runs), "ns/floor-run")
	b.ReportMetric(0, "ns/op")
}

// freshDst is a destination no case of this size has sent a new flow to:
// in 100.112.0.0/12 or 2001:db8:97::/64, where nothing else of the
// benchmark goes (the filled records' peers are in 100.96.0.0/12 and
// 2001:db8:96::/48).
func (s *pathSize) freshDst(b *testing.B, v6 bool) netip.Addr {
	i := s.fresh
	s.fresh++
	if i >= 1<<20 {
		b.Fatalf("out of fresh destinations in 100.112.0.0/12 (%d used)", i)
	}
	if v6 {
		return netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0x97, 12: byte(i >> 24), 13: byte(i >> 16), 14: byte(i >> 8), 15: byte(i)})
	}
	return netip.AddrFrom4([4]byte{100, 112 | byte(i>>16), byte(i >> 8), byte(i)})
}

// forgetDestination deletes what the new flow q wrote besides its record:
// its destination's sticky entry of the default balance and, for UDP, the
// remote. The keys are the programs' (sticky_key and remote_key in
// bpf/include/maps.h): one missing fails, so a key that no longer matches
// cannot leave the maps filling unseen.
func forgetDestination(b *testing.B, e *env, q packet.Packet) {
	b.Helper()
	dst := q.Dst.Addr()
	fam, words := uint8(4), [4]uint32{addrWord(dst, 0)}
	if dst.Is6() {
		fam, words = 6, addrWords(dst)
	}
	sk := bpf.UplinkStickyKey{Policy: 0, Family: fam, Mode: uint8(maps.StickyDestination), Daddr: words}
	if err := e.m.Sticky.Delete(&sk); err != nil {
		b.Fatalf("the sticky entry of %v: %v", dst, err)
	}
	if q.Proto != packet.ProtoUDP {
		return
	}
	port := binary.NativeEndian.Uint16(binary.BigEndian.AppendUint16(nil, q.Dst.Port()))
	rk := bpf.UplinkRemoteKey{Family: fam, Proto: q.Proto, Port: port, Addr: words}
	if err := e.m.Remotes.Delete(&rk); err != nil {
		b.Fatalf("the remote %v: %v", q.Dst, err)
	}
}

// newFlows is the new flows isp1 and isp2 counted.
func newFlows(b *testing.B, e *env) uint64 {
	return uplinkCounters(b, e, isp1).NewFlows + uplinkCounters(b, e, isp2).NewFlows
}

// mapEntries counts the entries of m, a flow map with keys K, in batches.
func mapEntries[K any](b *testing.B, m *ebpf.Map) int {
	b.Helper()
	const chunk = 16384
	keys := make([]K, chunk)
	vals := make([]bpf.UplinkFlow, chunk)
	var cursor ebpf.MapBatchCursor
	n := 0
	for {
		got, err := m.BatchLookup(&cursor, keys, vals, nil)
		n += got
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return n
		}
		if err != nil {
			b.Fatal(err)
		}
	}
}

// LAN ingress, a non-first fragment of a known flow: it has no ports, so
// the program looks its datagram up (what the first fragment left in
// `fragments`) instead of a flow, and gives it the first fragment's mark
// and counts it to its uplink.
func benchLANKnownFragment(b *testing.B, e *env, c pathCase, _ *pathSize) {
	e.lan(false)
	src, dst := ap(c.lanHost(), 40500), ap(c.remote(), 4500)
	op := c.opener(src, dst)
	op.MoreFragments = true // the first fragment: an ordinary new flow
	first := e.lanRun(op, 0)
	f, ok := e.flow(op)
	if !ok || first == 0 {
		b.Fatalf("the first fragment recorded no flow for %v (mark %#x)", op.Src, first)
	}
	p := c.later(src, dst)
	p.FragOffset = 185 // 1480 bytes in, as after a 1500-byte first fragment
	before := uplinkCounters(b, e, f.Uplink)
	if m := e.lanRun(p, 0); m != first {
		b.Fatalf("non-first fragment of a known flow: mark %#x, want the first fragment's %#x", m, first)
	}
	if after := uplinkCounters(b, e, f.Uplink); after.TxPackets != before.TxPackets+1 {
		b.Fatalf("non-first fragment: uplink %d counted %d packets, want 1", f.Uplink, after.TxPackets-before.TxPackets)
	}
	benchProgram(b, e.d.LANProgram(), p.Bytes())
}

// Uplink ingress, the answer to a flow the LAN started (recorded first by
// the LAN program, with its remote for UDP): parse, inbound miss, not an
// opener (TCP flags, ICMP type, or for UDP the remote's record), left
// unmarked.
func benchUplinkReply(b *testing.B, e *env, c pathCase, _ *pathSize) {
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
func benchUplinkInboundKnown(b *testing.B, e *env, c pathCase, _ *pathSize) {
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
