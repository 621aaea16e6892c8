package bpf_test

import (
	"net/netip"
	"runtime"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/packet"
)

// The flow maps with BPF_F_NO_COMMON_LRU (per-CPU LRU lists) side by side
// with the default (one LRU shared by the CPUs), set at load for these
// benchmarks only:
//
//	go test -run '^$' -bench LRU -benchtime 20x ./bpf/
//
// lru=common is the product's flow map, lru=percpu the same with the flag.
var lruKinds = []struct {
	name  string
	flags uint32
}{{"common", 0}, {"percpu", unix.BPF_F_NO_COMMON_LRU}}

// lruFlowMapSize: small enough to fill quickly, far larger than a CPU's
// cache of LRU nodes.
const lruFlowMapSize = 65536

func lruEnv(b *testing.B, flags uint32) *env {
	return newEnvWith(b, loader.Options{FlowMapSize: lruFlowMapSize, FlowMapFlags: flags})
}

// newFlowPacket is LAN flow i: a SYN from the LAN host, a port and a
// destination of its own (in 100.96.0.0/16), so that every i is a new
// flow.
func newFlowPacket(i int) []byte {
	dst := netip.AddrFrom4([4]byte{100, 96, byte(i / 60000 >> 8), byte(i / 60000)})
	return syn(ap(lanHost, uint16(1024+i%60000)), ap(dst, 443)).Bytes()
}

// A packet of a known flow (as BenchmarkLANKnownFlow): an LRU hit.
func BenchmarkLANKnownFlowLRU(b *testing.B) {
	for _, k := range lruKinds {
		b.Run("lru="+k.name, func(b *testing.B) {
			e := lruEnv(b, k.flags)
			p := syn(ap(lanHost, 40000), ap(remote, 443))
			run(b, e.d.LANProgram(), p.Bytes(), 0)
			p.TCPFlags = packet.TCPAck
			benchProgram(b, e.d.LANProgram(), p.Bytes())
		})
	}
}

// A new flow that is recorded, in a full flow map: every record evicts
// one (the steady state of a busy router). A test run repeats one packet
// (the second run of a SYN is a known flow), so each new flow is a test
// run of its own (repeat 1), timed by the kernel; ns/new-flow includes
// the test run's own per-run cost, measured the same way on the program
// that only returns (ns/floor-run).
func BenchmarkLANNewFlowRecordedLRU(b *testing.B) {
	const perIter = 5000
	for _, k := range lruKinds {
		b.Run("lru="+k.name, func(b *testing.B) {
			e := lruEnv(b, k.flags)
			prog := e.d.LANProgram()
			next := 0
			for ; next < lruFlowMapSize; next++ { // full
				if _, _, err := prog.Benchmark(newFlowPacket(next), 1, nil); err != nil {
					b.Fatal(err)
				}
			}
			floor := baselineProgram(b)
			floorPkt := newFlowPacket(0)
			var total, floorTotal float64
			for i := 0; i < b.N; i++ {
				for j := 0; j < perIter; j++ {
					_, d, err := prog.Benchmark(newFlowPacket(next), 1, nil)
					if err != nil {
						b.Fatal(err)
					}
					next++
					total += float64(d.Nanoseconds())
					_, d, err = floor.Benchmark(floorPkt, 1, nil)
					if err != nil {
						b.Fatal(err)
					}
					floorTotal += float64(d.Nanoseconds())
				}
			}
			b.ReportMetric(total/float64(b.N*perIter), "ns/new-flow")
			b.ReportMetric(floorTotal/float64(b.N*perIter), "ns/floor-run")
			b.ReportMetric(0, "ns/op")
		})
	}
}

// How many of capacity new flows, all recorded on one CPU, the flow map
// still holds afterwards (%held). With per-CPU LRU lists a CPU evicts from
// its own share of the nodes (capacity / CPUs) while the other CPUs' stay
// free: a flow map of N entries holds about N / CPUs of one CPU's flows.
func BenchmarkFlowMapHeldLRU(b *testing.B) {
	for _, k := range lruKinds {
		b.Run("lru="+k.name, func(b *testing.B) {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			var one, all unix.CPUSet
			if err := unix.SchedGetaffinity(0, &all); err != nil {
				b.Fatal(err)
			}
			one.Set(firstCPU(&all))
			if err := unix.SchedSetaffinity(0, &one); err != nil {
				b.Fatal(err)
			}
			defer func() { _ = unix.SchedSetaffinity(0, &all) }()
			var held float64
			rounds := min(b.N, 3) // the same every time: a count, not a time
			for i := 0; i < rounds; i++ {
				e := lruEnv(b, k.flags)
				prog := e.d.LANProgram()
				for j := 0; j < lruFlowMapSize; j++ {
					if _, _, err := prog.Benchmark(newFlowPacket(j), 1, nil); err != nil {
						b.Fatal(err)
					}
				}
				n := 0
				if err := e.m.WalkLANFlows(func(maps.Flow) bool { n++; return true }); err != nil {
					b.Fatal(err)
				}
				held += float64(n) / lruFlowMapSize * 100
			}
			b.ReportMetric(held/float64(rounds), "%held")
			b.ReportMetric(float64(runtime.NumCPU()), "cpus")
			b.ReportMetric(0, "ns/op")
		})
	}
}

func firstCPU(s *unix.CPUSet) int {
	for i := 0; i < 1024; i++ {
		if s.IsSet(i) {
			return i
		}
	}
	return 0
}

// baselineProgram only returns TC_ACT_OK (BenchmarkBaselinePass's).
func baselineProgram(b *testing.B) *ebpf.Program {
	b.Helper()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { prog.Close() })
	return prog
}
