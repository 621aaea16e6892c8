package bpf_test

import (
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/packet"
	"github.com/mhbpf/mhbpf/internal/testutil"
)

// Per-packet cost of the tc programs, measured by the kernel with
// BPF_PROG_TEST_RUN over many repeats:
//
//	go test -run '^$' -bench . -benchtime 20x ./bpf/
//
// Each b.N iteration is one test run of 100000 repeats; ns/op is reported
// per packet.
const benchRepeat = 100000

func benchProgram(b *testing.B, prog *ebpf.Program, data []byte) {
	b.Helper()
	var total float64
	for i := 0; i < b.N; i++ {
		_, d, err := prog.Benchmark(data, benchRepeat, nil)
		if err != nil {
			b.Fatal(err)
		}
		total += float64(d.Nanoseconds())
	}
	b.ReportMetric(total/float64(b.N), "ns/pkt")
	b.ReportMetric(0, "ns/op")
}

func benchEnv(b *testing.B) *env { return newEnvTB(b) }

// A packet of a known flow: one parse, one flow lookup, counters.
func BenchmarkLANKnownFlow(b *testing.B) {
	e := benchEnv(b)
	p := syn(ap(lanHost, 40000), ap(remote, 443))
	p.TCPFlags = packet.TCPAck
	run(b, e.d.LANProgram(), syn(ap(lanHost, 40000), ap(remote, 443)).Bytes(), 0)
	benchProgram(b, e.d.LANProgram(), p.Bytes())
}

// The new-flow path at its worst: 64 rules, the last one matching, and
// every uplink of its policy down, so each run walks the whole policy, tries
// the choice and records nothing (a recorded flow would turn the next run
// into a known flow).
func BenchmarkLANNewFlowFullPolicy(b *testing.B) {
	e := benchEnv(b)
	var rules []maps.Rule
	for i := 0; i < maps.MaxRules; i++ {
		rules = append(rules, maps.Rule{
			Dst:    []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 96, byte(i), 0}), 24)},
			Proto:  packet.ProtoTCP,
			Ports:  []maps.PortRange{{Lo: 1, Hi: 442}, {Lo: 444, Hi: 1000}},
			Action: maps.Action{Uplinks: []maps.Choice{{Uplink: isp2, Weight: 1}}},
		})
	}
	rules = append(rules[:maps.MaxRules-1], maps.Rule{Proto: packet.ProtoTCP, Ports: []maps.PortRange{{Lo: 443, Hi: 443}},
		Action: maps.Action{Uplinks: []maps.Choice{{Uplink: isp1, Weight: 1}, {Uplink: isp2, Tier: 1, Weight: 1}},
			Fallback: maps.FallbackUnreachable}})
	e.policy(maps.Policy{Default: balanced(), Rules: rules})
	// The flow's uplink is down and so is every uplink of its policy: each
	// run does the whole policy walk and choice and records nothing.
	if err := e.m.SetUplinkUp(isp1, false); err != nil {
		b.Fatal(err)
	}
	if err := e.m.SetUplinkUp(isp2, false); err != nil {
		b.Fatal(err)
	}
	p := syn(ap(lanHost, 40000), ap(netip.AddrFrom4([4]byte{100, 96, 63, 1}), 443))
	// The last rule decided (its fail-closed bit alone), and nothing was
	// recorded: every run takes the same whole path.
	if m := run(b, e.d.LANProgram(), p.Bytes(), 0); m != markStrict || e.flowCount() != 0 {
		b.Fatalf("mark %#x, %d flows; want the last rule's fail-closed bit alone and no flow", m, e.flowCount())
	}
	benchProgram(b, e.d.LANProgram(), p.Bytes())
}

func BenchmarkUplinkInboundKnownFlow(b *testing.B) {
	e := benchEnv(b)
	e.arrivesOn(isp2, true)
	p := syn(ap(remote, 50000), ap(netip.MustParseAddr("100.64.1.2"), 80))
	p.L3 = true
	run(b, e.d.UplinkProgram(), p.Bytes(), 0)
	p.TCPFlags = packet.TCPAck
	benchProgram(b, e.d.UplinkProgram(), p.Bytes())
}

// Replies to our own flows: the commonest packet on an uplink.
func BenchmarkUplinkReplyToOwnFlow(b *testing.B) {
	e := benchEnv(b)
	e.arrivesOn(isp1, true)
	p := packet.Packet{Src: ap(remote, 443), Dst: ap(netip.MustParseAddr("100.64.0.2"), 40000), Proto: packet.ProtoTCP,
		TCPFlags: packet.TCPAck, L3: true, Payload: 1400}
	benchProgram(b, e.d.UplinkProgram(), p.Bytes())
}

// The floor: a program that only returns TC_ACT_OK, run the same way. The
// difference to it is what mhbpf's work costs per packet.
func BenchmarkBaselinePass(b *testing.B) {
	testutil.RequireRoot(b)
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()}})
	if err != nil {
		b.Fatal(err)
	}
	defer prog.Close()
	p := syn(ap(lanHost, 40000), ap(remote, 443))
	p.TCPFlags = packet.TCPAck
	benchProgram(b, prog, p.Bytes())
}
