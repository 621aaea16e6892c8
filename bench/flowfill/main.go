// Command flowfill loads mhbpf's datapath under a scratch pin directory
// (nothing attached) with flow maps of -size entries, fills them with
// -v4 IPv4 and -v6 IPv6 flows on three uplinks, and writes a daemon status
// naming those uplinks into -state-dir, so that 'mhbpf flows --pin-dir
// DIR --state-dir DIR' lists a full table. bench/parts/flows.sh uses it;
// it removes nothing (the part unmounts its scratch bpffs).
package main

import (
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/daemon"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/statefile"
)

func main() {
	pinDir := flag.String("pin-dir", "", "pin directory on a bpffs (required)")
	stateDir := flag.String("state-dir", "", "where to write status.json (required)")
	size := flag.Uint("size", 1<<20, "flow_map_size: entries of flows4 and flows6 each")
	v4 := flag.Int("v4", 900_000, "IPv4 flows to put")
	v6 := flag.Int("v6", 100_000, "IPv6 flows to put")
	flag.Parse()
	if *pinDir == "" || *stateDir == "" {
		fmt.Fprintln(os.Stderr, "flowfill: -pin-dir and -state-dir are required")
		os.Exit(2)
	}
	if err := run(*pinDir, *stateDir, uint32(*size), *v4, *v6); err != nil {
		fmt.Fprintln(os.Stderr, "flowfill:", err)
		os.Exit(1)
	}
}

func run(pinDir, stateDir string, size uint32, v4, v6 int) error {
	cookie, err := loader.CurrentNetnsCookie()
	if err != nil {
		return err
	}
	dp, err := loader.Load(loader.Options{PinDir: pinDir, FlowMapSize: size, NetnsCookie: cookie})
	if err != nil {
		return err
	}
	defer dp.Close()
	start := time.Now()
	now := monotonicNow()
	// Addresses of the test ranges only (100.64/10 LAN hosts, 198.51.100/24
	// and 203.0.113/24 destinations, 2001:db8::/32).
	for i := range v4 + v6 {
		var src, dst netip.Addr
		if i < v4 {
			src = netip.AddrFrom4([4]byte{100, 64 + byte(i>>16&0x3f), byte(i >> 8), byte(i)})
			dst = netip.AddrFrom4([4]byte{198, 51, 100, byte(i % 251)})
			if i%2 == 1 {
				dst = netip.AddrFrom4([4]byte{203, 0, 113, byte(i % 251)})
			}
		} else {
			src = netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 2, 12: byte(i >> 24), byte(i >> 16), byte(i >> 8), byte(i)})
			dst = netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 9, 15: byte(i % 251)})
		}
		proto := uint8(6)
		if i%4 == 3 {
			proto = 17
		}
		age := time.Duration(i%3600) * time.Second
		f := maps.Flow{Key: maps.FlowKey{Proto: proto, Src: netip.AddrPortFrom(src, uint16(1024+i%60000)), Dst: netip.AddrPortFrom(dst, 443)},
			Uplink: i % 3, Origin: maps.OriginBalanced, Mark: 1 << (16 + i%3),
			FirstSeen: now - age, LastSeen: now - age/2}
		if i%10 == 0 {
			f.Origin, f.Policy = maps.OriginPolicy, 1
		}
		if err := dp.Maps.PutFlow(f); err != nil {
			return fmt.Errorf("flow %d: %w", i, err)
		}
	}
	n := 0
	if err := dp.Maps.WalkFlows(func(maps.Flow) bool { n++; return true }); err != nil {
		return err
	}
	fmt.Printf("flowfill: %d flows in the maps (%d put, flow_map_size %d) in %v\n", n, v4+v6, size, time.Since(start).Round(time.Millisecond))
	st := daemon.Status{Updated: time.Now(), PID: os.Getpid(), State: daemon.StateRunning, Policies: []string{"mail"},
		Uplinks: []daemon.UplinkStatus{{Name: "isp1", Interface: "ppp0", ID: 0}, {Name: "isp2", Interface: "ppp1", ID: 1}, {Name: "vpn", Interface: "tun0", ID: 2}}}
	return statefile.Write(filepath.Join(stateDir, "status.json"), st)
}

// The flow maps' times are CLOCK_MONOTONIC.
func monotonicNow() time.Duration {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return time.Duration(ts.Nano())
}
