// Command e2e is the end-to-end part of `make bench` (bench/parts/e2e.sh):
// new TCP connections a second, small-packet UDP datagrams a second over
// many flows, and TCP throughput over parallel streams, from a LAN host
// through a router namespace and two ISPs to a server, with the router set
// up four ways: plain routing, mhbpf (the real daemon), nftables set + ct
// mark, and the seed's iptables CONNMARK rules; the policy at several
// prefix counts. Rounds are interleaved, each setup on fresh namespaces;
// it writes a Markdown section of bench/REPORT.md. As root.
//
// It is also its own server and load client ("serve", "load"), run again
// inside the server's and the LAN's namespaces.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	var err error
	if len(os.Args) > 1 && (os.Args[1] == "serve" || os.Args[1] == "load") {
		err = helper(os.Args[1], os.Args[2:])
	} else {
		err = drive(os.Args[1:])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		os.Exit(1)
	}
}

// helper is the server or the load client.
func helper(mode string, args []string) error {
	fs := flag.NewFlagSet(mode, flag.ExitOnError)
	dests := fs.Int("dests", 254, "destinations: the first addresses of "+Servers.String())
	ctl := fs.String("ctl", "", "the server's control socket")
	var spec loadSpec
	fs.StringVar(&spec.Kind, "kind", "conn", "conn, udp or stream")
	fs.DurationVar(&spec.Warmup, "warmup", 500*time.Millisecond, "traffic before the window")
	fs.DurationVar(&spec.Window, "window", 2*time.Second, "the measured window")
	fs.IntVar(&spec.Workers, "workers", 16, "conn: connections in parallel; udp: flows; stream: streams")
	fs.IntVar(&spec.Payload, "payload", 18, "udp payload bytes")
	fs.DurationVar(&spec.Deadline, "deadline", time.Second, "conn: a connection's time limit")
	_ = fs.Parse(args)
	if mode == "serve" {
		return serve(*ctl)
	}
	spec.Servers, spec.Ctl = destinations(*dests), *ctl
	return loadMain(spec)
}

// options of one run.
type options struct {
	bin                   string
	rounds                int
	prefixes              []int
	window, warmup        time.Duration
	conns, flows, streams int
	dests                 int
	payload               int
	out                   string
	self                  string
	track                 *tracker
	setups                []string
}

// A case is one setup at one prefix count (plain has none).
type benchCase struct {
	setup    string
	prefixes int
}

// prefixFree are the setups without a policy: measured once a round.
var prefixFree = map[string]bool{"plain": true, "rules": true}

func (c benchCase) String() string {
	if prefixFree[c.setup] {
		return c.setup
	}
	return fmt.Sprintf("%s/%d", c.setup, c.prefixes)
}

// sample is one case's figures in one round.
type sample struct {
	conns, udp, stream float64
	connErrors         uint64
	firstError         string
	udpSent            float64 // datagrams a second the client sent
	isp1Share          float64 // of the window's connections
	drops              int     // BCP 38 drops at the ISPs over the whole case
	daemonCPU          float64 // seconds of CPU the daemon used while measured (mhbpf only)
	setupSeconds       float64 // from a fresh bed to the setup in place (the daemon: running, both uplinks usable)
}

func drive(args []string) error {
	fs := flag.NewFlagSet("e2e", flag.ExitOnError)
	var o options
	var prefixes, track, setups string
	fs.StringVar(&o.bin, "bin", "bin/mhbpf", "the mhbpf binary")
	fs.IntVar(&o.rounds, "rounds", 3, "interleaved rounds")
	fs.StringVar(&prefixes, "prefixes", "10,100000", "policy prefix counts, comma-separated")
	fs.StringVar(&setups, "setups", "plain,rules,mhbpf,nft,iptables", "setups to run, in round order")
	fs.DurationVar(&o.window, "window", 3*time.Second, "each measurement's window")
	fs.DurationVar(&o.warmup, "warmup", 500*time.Millisecond, "traffic before each window")
	fs.IntVar(&o.dests, "dests", 254, "destinations: the first addresses of "+Servers.String())
	fs.IntVar(&o.conns, "conns", 16, "connections in parallel (conn/s)")
	fs.IntVar(&o.flows, "flows", 256, "UDP flows")
	fs.IntVar(&o.streams, "streams", 4, "TCP streams (throughput)")
	fs.IntVar(&o.payload, "payload", 18, "UDP payload bytes (18: a 64-byte Ethernet frame)")
	fs.StringVar(&o.out, "out", "", "Markdown section to write (default: stdout)")
	fs.StringVar(&track, "track", "", "file to note what is made in, for the script's trap")
	_ = fs.Parse(args)
	if os.Geteuid() != 0 {
		return fmt.Errorf("builds network namespaces and loads BPF: run as root")
	}
	for _, tool := range []string{"ip", "nft", "iptables-legacy-restore", "nsenter", "sysctl"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("needs %s (make deps installs it)", tool)
		}
	}
	for _, s := range strings.Split(prefixes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 {
			return fmt.Errorf("-prefixes: %q is not a positive count", s)
		}
		o.prefixes = append(o.prefixes, n)
	}
	o.setups = strings.Split(setups, ",")
	for _, s := range o.setups {
		if newSetup(s, &o) == nil {
			return fmt.Errorf("-setups: unknown setup %q", s)
		}
	}
	var err error
	if o.self, err = os.Executable(); err != nil {
		return err
	}
	if _, err := os.Stat(o.bin); err != nil {
		return fmt.Errorf("the daemon binary: %w (make build)", err)
	}
	o.track = &tracker{}
	if track != "" {
		if o.track.f, err = os.OpenFile(track, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644); err != nil {
			return err
		}
	}

	var cases []benchCase
	for _, s := range o.setups {
		if prefixFree[s] {
			cases = append(cases, benchCase{setup: s})
		}
	}
	for _, n := range o.prefixes {
		for _, s := range o.setups {
			if !prefixFree[s] {
				cases = append(cases, benchCase{setup: s, prefixes: n})
			}
		}
	}
	lists := map[int][]netip.Prefix{}
	for _, n := range o.prefixes {
		lists[n] = benchPrefixes(n)
	}

	// Ctrl-C or SIGTERM: undo the case in progress, then exit.
	var mu sync.Mutex
	var undo func()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-sig
		mu.Lock()
		if undo != nil {
			undo()
		}
		fmt.Fprintf(os.Stderr, "e2e: %v: cleaned up\n", s)
		os.Exit(130)
	}()

	results := map[benchCase][]sample{}
	start := time.Now()
	for r := 1; r <= o.rounds; r++ {
		// Each round starts one case later: no setup is always the
		// first on a cold machine or always after the same neighbour.
		for i := range cases {
			c := cases[(i+r-1)%len(cases)]
			fmt.Fprintf(os.Stderr, "e2e: round %d/%d %s\n", r, o.rounds, c)
			s, err := runCase(&o, c, lists[c.prefixes], func(f func()) { mu.Lock(); undo = f; mu.Unlock() })
			if err != nil {
				return fmt.Errorf("round %d, %s: %w", r, c, err)
			}
			fmt.Fprintf(os.Stderr, "e2e:   %.0f conn/s (%d failed, isp1 %.0f%%), %.0f pps (of %.0f sent), %.0f Mbit/s, %d BCP 38 drops, setup %.2fs, daemon CPU %.2fs\n",
				s.conns, s.connErrors, 100*s.isp1Share, s.udp, s.udpSent, s.stream, s.drops, s.setupSeconds, s.daemonCPU)
			results[c] = append(results[c], s)
		}
	}
	report := writeReport(&o, cases, results, time.Since(start))
	if o.out == "" {
		_, err = os.Stdout.WriteString(report)
	} else {
		err = os.WriteFile(o.out, []byte(report), 0o644)
	}
	if err != nil {
		return err
	}
	// A failed connection or a packet an ISP dropped for its source means
	// a setup sent something the wrong way (or not at all): its figures
	// measure a broken router. The section is written, and the run fails.
	var broken []string
	for _, c := range cases {
		for _, s := range results[c] {
			if s.connErrors > 0 || s.drops > 0 {
				broken = append(broken, c.String())
				break
			}
		}
	}
	if len(broken) > 0 {
		return fmt.Errorf("failed connections or BCP 38 drops in %s (see the report)", strings.Join(broken, ", "))
	}
	return nil
}

func newSetup(name string, o *options) setup {
	switch name {
	case "plain":
		return plain{}
	case "mhbpf":
		return &mhbpfDaemon{bin: o.bin, track: o.track}
	case "rules":
		return policyRules{}
	case "nft":
		return nftSet{}
	case "iptables":
		return iptablesConnmark{}
	}
	return nil
}

// runCase measures one case on a fresh bed. setUndo registers what a
// signal must undo while it runs.
func runCase(o *options, c benchCase, prefixes []netip.Prefix, setUndo func(func())) (s sample, err error) {
	b, err := newBed(o.self, o.track)
	if b != nil {
		setUndo(b.Close)
	}
	if err != nil {
		return s, err
	}
	st := newSetup(c.setup, o)
	undo := func() {
		if err := st.stop(); err != nil {
			fmt.Fprintln(os.Stderr, "e2e:", err)
		}
		b.Close()
	}
	setUndo(undo)
	defer func() {
		setUndo(nil)
		if e := st.stop(); e != nil && err == nil {
			err = e
		}
		b.Close()
	}()
	t0 := time.Now()
	if err := st.start(b, prefixes); err != nil {
		return s, err
	}
	s.setupSeconds = time.Since(t0).Seconds()
	type cpuUser interface{ cpuSeconds() float64 }
	if d, ok := st.(cpuUser); ok {
		cpu0 := d.cpuSeconds()
		defer func() { s.daemonCPU = d.cpuSeconds() - cpu0 }()
	}

	measure := func(kind string, workers int) (loadResult, error) {
		var r loadResult
		cmd := exec.Command("ip", "netns", "exec", b.LAN, o.self, "load", "-kind", kind,
			"-dests", strconv.Itoa(o.dests), "-ctl", b.ctl(), "-warmup", o.warmup.String(), "-window", o.window.String(),
			"-workers", strconv.Itoa(workers), "-payload", strconv.Itoa(o.payload))
		// Killed with this driver, whatever kills it (ip netns exec execs
		// the client: the same process).
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		out, err := cmd.Output()
		if err != nil {
			if ee, ok := err.(*exec.ExitError); ok {
				return r, fmt.Errorf("load %s: %v: %s", kind, err, ee.Stderr)
			}
			return r, fmt.Errorf("load %s: %w", kind, err)
		}
		return r, json.Unmarshal(out, &r)
	}
	conn, err := measure("conn", o.conns)
	if err != nil {
		return s, err
	}
	s.conns, s.connErrors, s.firstError = conn.Rate, conn.Errors, conn.FirstError
	var total uint64
	for _, n := range conn.ByPeer {
		total += n
	}
	if total == 0 {
		return s, fmt.Errorf("no connection completed (%d failed: %s)", conn.Errors, conn.FirstError)
	}
	s.isp1Share = float64(conn.ByPeer[ispAddr(1)]) / float64(total)
	if other := total - conn.ByPeer[ispAddr(1)] - conn.ByPeer[ispAddr(2)]; other > 0 {
		return s, fmt.Errorf("%d connections reached the server from neither uplink's address: %v", other, conn.ByPeer)
	}
	udp, err := measure("udp", o.flows)
	if err != nil {
		return s, err
	}
	s.udp, s.udpSent = udp.Rate, float64(udp.Sent)/udp.Seconds
	stream, err := measure("stream", o.streams)
	if err != nil {
		return s, err
	}
	s.stream = stream.Rate
	if s.drops, err = b.spoofedDrops(); err != nil {
		return s, err
	}
	return s, nil
}
