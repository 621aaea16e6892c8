package maps

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/bpf"
)

// flowMaps makes the four flow maps as the objects declare them (LRU
// hashes, their key and value layout), unpinned, of size entries each.
func flowMaps(t testing.TB, size uint32) *Maps {
	t.Helper()
	if err := rlimit.RemoveMemlock(); err != nil {
		t.Fatal(err)
	}
	spec, err := bpf.LoadUplink()
	if err != nil {
		t.Fatal(err)
	}
	m := &Maps{}
	for name, dst := range map[string]**ebpf.Map{"flows4": &m.Flows4, "flows6": &m.Flows6, "inbound4": &m.Inbound4, "inbound6": &m.Inbound6} {
		ms := spec.Maps[name].Copy()
		ms.Pinning = ebpf.PinNone
		ms.MaxEntries = size
		mp, err := ebpf.NewMap(ms)
		if err != nil {
			t.Fatalf("map %s: %v", name, err)
		}
		*dst = mp
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// testFlow is flow i of a family: distinct keys, and fields that tell
// whether a walk decoded the value that goes with the key.
func testFlow(i int, v6 bool) Flow {
	src := netip.AddrFrom4([4]byte{100, 64, byte(i >> 8), byte(i)})
	dst := netip.AddrFrom4([4]byte{198, 51, 100, byte(i >> 16)})
	if v6 {
		src = netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 14: byte(i >> 8), 15: byte(i)})
		dst = netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 1, 15: byte(i >> 16)})
	}
	return Flow{Key: FlowKey{Proto: 6, Src: netip.AddrPortFrom(src, uint16(1024+i%60000)), Dst: netip.AddrPortFrom(dst, 443)},
		Uplink: i % 3, Origin: OriginBalanced, Policy: i % 5, Mark: 1 << (16 + i%3),
		FirstSeen: time.Duration(i) * time.Second, LastSeen: time.Duration(i)*time.Second + time.Millisecond}
}

// Every flow once, with its own value, IPv4 and IPv6, LAN and inbound;
// fn may stop the walk; and the key-by-key walk (the fallback) sees the
// same. More flows than one batch, so the cursor is followed.
func TestWalkFlowsBatchedAndKeyByKey(t *testing.T) {
	const n4, n6, nIn = 3*WalkBatch + 17, WalkBatch + 5, 300
	m := flowMaps(t, 4*WalkBatch)
	for _, batched := range []bool{true, false} {
		batchLookups = batched
		if err := m.WalkFlows(func(f Flow) bool { t.Errorf("empty maps: walked %+v", f); return true }); err != nil {
			t.Fatalf("empty maps, batched %v: %v", batched, err)
		}
	}
	want := map[FlowKey]Flow{}
	for i := range n4 {
		f := testFlow(i, false)
		want[f.Key] = f
		if err := m.PutFlow(f); err != nil {
			t.Fatal(err)
		}
	}
	for i := range n6 {
		f := testFlow(i, true)
		want[f.Key] = f
		if err := m.PutFlow(f); err != nil {
			t.Fatal(err)
		}
	}
	for i := range nIn {
		f := testFlow(n4+i, i%2 == 1)
		f.Origin, f.Policy = OriginInbound, 0
		want[f.Key] = f
		if err := m.inboundFlows().put(f); err != nil {
			t.Fatal(err)
		}
	}

	// Every supported kernel (5.10 on) has batch lookups for LRU hashes
	// (5.6): the batched walk is the one taken, not the fallback.
	if _, batched, err := walkBatched(m.Flows4, key4, func(Flow) bool { return false }); !batched || err != nil {
		t.Fatalf("batch lookup of flows4: batched %v, %v", batched, err)
	}
	for _, batched := range []bool{true, false} {
		batchLookups = batched
		seen := map[FlowKey]int{}
		if err := m.WalkFlows(func(f Flow) bool {
			seen[f.Key]++
			if w, ok := want[f.Key]; !ok {
				t.Errorf("batched %v: walked a flow never put: %+v", batched, f)
			} else if f != w {
				t.Errorf("batched %v: %+v, want %+v", batched, f, w)
			}
			return true
		}); err != nil {
			t.Fatalf("batched %v: %v", batched, err)
		}
		for k := range want {
			if seen[k] != 1 {
				t.Errorf("batched %v: %v seen %d times", batched, k, seen[k])
			}
		}
		if len(seen) != len(want) {
			t.Errorf("batched %v: %d flows walked, want %d", batched, len(seen), len(want))
		}

		calls := 0
		if err := m.WalkFlows(func(Flow) bool { calls++; return calls < WalkBatch+3 }); err != nil {
			t.Fatal(err)
		}
		if calls != WalkBatch+3 {
			t.Errorf("batched %v: fn called %d times after asking to stop at %d", batched, calls, WalkBatch+3)
		}
	}
	batchLookups = true

	// DeleteFlowsOfUplink finds its flows through the same walk.
	m.Remotes = newRemotes(t)
	onOne := 0
	for _, f := range want {
		if f.Uplink == 1 {
			onOne++
		}
	}
	n, err := m.DeleteFlowsOfUplink(1)
	if err != nil || n != onOne {
		t.Fatalf("DeleteFlowsOfUplink(1): %d, %v; want %d", n, err, onOne)
	}
	if err := m.WalkFlows(func(f Flow) bool {
		if f.Uplink == 1 {
			t.Errorf("left on uplink 1: %+v", f)
			return false
		}
		return true
	}); err != nil {
		t.Fatal(err)
	}
}

func newRemotes(t *testing.T) *ebpf.Map {
	t.Helper()
	spec, err := bpf.LoadUplink()
	if err != nil {
		t.Fatal(err)
	}
	ms := spec.Maps["remotes"].Copy()
	ms.Pinning = ebpf.PinNone
	ms.MaxEntries = 1024
	mp, err := ebpf.NewMap(ms)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mp.Close() })
	return mp
}

// What the kernel says when it has no batch lookups (ENOTSUPP before 5.6,
// as cilium/ebpf reports it; EINVAL) makes the walk go key by key; any
// other error is the walk's error. (No map type the flow walk can read
// refuses batch lookups on the kernels here, so the refusal itself is
// not reproduced; the key-by-key walk is tested above.)
func TestBatchRefusedIsOnlyTheKernelsNo(t *testing.T) {
	for _, c := range []struct {
		err  error
		want bool
	}{
		{fmt.Errorf("map batch lookup: %w", ebpf.ErrNotSupported), true},
		{fmt.Errorf("map batch lookup: %w", unix.EINVAL), true},
		{fmt.Errorf("map batch lookup: %w", unix.EPERM), false},
		{fmt.Errorf("map batch lookup: %w", unix.ENOSPC), false},
		{ebpf.ErrKeyNotExist, false},
	} {
		if got := batchRefused(c.err); got != c.want {
			t.Errorf("batchRefused(%v) = %v, want %v", c.err, got, c.want)
		}
	}
}

// The walk over 100,000 IPv4 flows, batched and key by key:
// go test -run '^$' -bench WalkFlows -benchtime 5x ./internal/maps/
func BenchmarkWalkFlows(b *testing.B) {
	const n = 100_000
	m := flowMaps(b, n+n/4)
	for i := range n {
		if err := m.PutFlow(testFlow(i, false)); err != nil {
			b.Fatal(err)
		}
	}
	for _, batched := range []bool{true, false} {
		name := "batched"
		if !batched {
			name = "keybykey"
		}
		b.Run(name, func(b *testing.B) {
			batchLookups = batched
			defer func() { batchLookups = true }()
			for b.Loop() {
				seen := 0
				if err := m.WalkFlows(func(Flow) bool { seen++; return true }); err != nil || seen != n {
					b.Fatalf("%d flows, %v", seen, err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/n, "ns/flow")
		})
	}
}
