package explain

// The choice itself is made by the datapath's own code: the LAN program
// (bpf/lan.c, lan_ingress, the object the daemon attached) runs on a
// synthetic first packet through BPF_PROG_TEST_RUN. Not a second
// implementation in Go, which would drift from bpf/include/policy.h the day
// one of them changes; and not the attached program on the live maps,
// which would write: a flow record, a sticky entry (the choice's own
// "remember this destination"), counters, a remote endpoint. So the program
// is loaded once more, from the same embedded object with the same
// load-time constants (the live program's .rodata, copied byte for byte),
// on private maps that hold a copy of the live maps' contents: everything
// it writes goes into the copies, which go away with the process. The
// kernel's clock is the live one, so sticky entries age as they do for real
// packets.

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/cilium/ebpf"

	"github.com/mhbpf/mhbpf/bpf"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/packet"
)

// lanProgramName is lan_ingress as the kernel names it (at most 15 bytes).
const lanProgramName = "lan_ingress"

// loopbackIfindex is the device a test run's packet arrives on (the
// kernel's default for BPF_PROG_TEST_RUN): the sandbox's ifaces map makes
// it a LAN interface with an Ethernet header.
const loopbackIfindex = 1

// skbContext is struct __sk_buff (192 bytes in the UAPI): mark goes in and
// comes back out.
type skbContext struct {
	Len, PktType, Mark, QueueMapping, Protocol, VlanPresent, VlanTCI, VlanProto,
	Priority, IngressIfindex, Ifindex uint32
	_ [192 - 44]byte
}

// sandbox is a private instance of the LAN program on copies of the maps.
type sandbox struct {
	coll    *ebpf.Collection
	prog    *ebpf.Program
	rodata  []byte
	stickyN int // live sticky entries copied
}

// copied are the maps the program reads that carry the live state; the
// rest (flows, inbound, remotes, counters, inbound guards) start empty: a
// new connection has no flow yet, and counters are not an input.
func copied(live *maps.Maps) map[string]*ebpf.Map {
	return map[string]*ebpf.Map{
		"uplinks": live.Uplinks, "policy_generation": live.PolicyGeneration, "policy_meta": live.PolicyMeta,
		"policy_rules": live.PolicyRules, "bypass4": live.Bypass4,
		"bypass6": live.Bypass6, "sticky": live.Sticky,
	}
}

// shared are the live maps the program only reads and that are too big
// to copy (the policy's prefix tables, arrays of tables sized from the
// policy): the sandbox uses them as they are.
func shared(live *maps.Maps) map[string]*ebpf.Map {
	return map[string]*ebpf.Map{"policy_ranges_dst4": live.PolicyRangesDst4, "policy_ranges_src4": live.PolicyRangesSrc4,
		"policy_ranges_dst6": live.PolicyRangesDst6, "policy_ranges_src6": live.PolicyRangesSrc6}
}

// liveRodata finds the attached LAN program that uses these maps (the
// newest, if a restart left two for a moment) and reads its load-time
// constants.
func liveRodata(live *maps.Maps) ([]byte, error) {
	fi, err := live.Flows4.Info()
	if err != nil {
		return nil, err
	}
	flowsID, _ := fi.ID()
	var best []byte
	var bestID ebpf.ProgramID
	for id := ebpf.ProgramID(0); ; {
		next, err := ebpf.ProgramGetNextID(id)
		if errors.Is(err, os.ErrNotExist) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("listing BPF programs: %w", err)
		}
		id = next
		ro, ok := rodataOf(id, flowsID)
		if ok && id > bestID {
			best, bestID = ro, id
		}
	}
	if best == nil {
		return nil, errors.New("no LAN program of this datapath is loaded (is a LAN interface attached?)")
	}
	return best, nil
}

func rodataOf(id ebpf.ProgramID, flowsID ebpf.MapID) ([]byte, bool) {
	p, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return nil, false // gone meanwhile
	}
	defer p.Close()
	info, err := p.Info()
	if err != nil || info.Name != lanProgramName {
		return nil, false
	}
	ids, _ := info.MapIDs()
	uses := false
	for _, m := range ids {
		uses = uses || m == flowsID
	}
	if !uses {
		return nil, false // another datapath's (another pin directory, another namespace)
	}
	for _, mid := range ids {
		m, err := ebpf.NewMapFromID(mid)
		if err != nil {
			continue
		}
		mi, err := m.Info()
		if err != nil || !strings.HasSuffix(mi.Name, ".rodata") {
			m.Close()
			continue
		}
		v := make([]byte, m.ValueSize())
		err = m.Lookup(uint32(0), v)
		m.Close()
		if err == nil {
			return v, true
		}
	}
	return nil, false
}

// newSandbox loads the LAN program on fresh maps filled from live.
func newSandbox(live *maps.Maps) (*sandbox, error) { return load(live, false) }

// newIdentifier is a sandbox that tells which policy the program's own
// lookup picks for a packet, whatever the state of the uplinks: every
// uplink up, every policy entry weighted, every policy sticky per
// destination, no sticky entries. Then the one sticky entry the run writes
// names the policy (its key's policy id) -- the lookup itself (bypass, the
// rules' prefixes, protocol, ports, first match) is untouched.
func newIdentifier(live *maps.Maps) (*sandbox, error) {
	s, err := load(live, true)
	if err != nil {
		return nil, err
	}
	if err := s.forceChoosable(); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

func load(live *maps.Maps, identify bool) (*sandbox, error) {
	spec, err := loader.LANSpec()
	if err != nil {
		return nil, err
	}
	ro, err := liveRodata(live)
	if err != nil {
		return nil, err
	}
	rs, ok := spec.Maps[".rodata"]
	if !ok || len(rs.Contents) != 1 || int(rs.ValueSize) != len(ro) {
		return nil, fmt.Errorf("the attached LAN program's constants (%d bytes) do not fit this binary's object: is the daemon another version?", len(ro))
	}
	rs.Contents = []ebpf.MapKV{{Key: uint32(0), Value: ro}}
	// The variables are written over the section at load: they get the
	// live bytes too.
	for _, v := range spec.Variables {
		if v.SectionName == ".rodata" {
			v.Value = append([]byte(nil), ro[v.Offset:v.Offset+v.Size()]...)
		}
	}

	src := copied(live)
	if identify {
		delete(src, "sticky")
	}
	var stickyN int
	for name, ms := range spec.Maps {
		ms.Pinning = ebpf.PinNone
		switch name {
		case "flows4", "flows6", "inbound4", "inbound6", "remotes":
			ms.MaxEntries = 64 // one test packet writes one of each at most
		case "sticky":
			if identify {
				ms.MaxEntries = 64
				continue
			}
			n, err := count(live.Sticky)
			if err != nil {
				return nil, err
			}
			stickyN = n
			ms.MaxEntries = uint32(n + 64)
		}
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: shared(live)})
	if err != nil {
		return nil, fmt.Errorf("loading the LAN program for a test run: %w", err)
	}
	s := &sandbox{coll: coll, prog: coll.Programs[lanProgramName], rodata: ro, stickyN: stickyN}
	for name, from := range src {
		if err := copyMap(coll.Maps[name], from); err != nil {
			s.Close()
			return nil, fmt.Errorf("copying map %s: %w", name, err)
		}
	}
	one := bpf.UplinkIface{Role: uint8(maps.RoleLAN), L3Off: 14}
	if err := coll.Maps["iface_slots"].Put(uint32(loopbackIfindex), &one); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

func (s *sandbox) Close() { s.coll.Close() }

// variable reads a load-time constant of the live program.
func (s *sandbox) variable(name string, out any) error {
	spec, err := loader.LANSpec()
	if err != nil {
		return err
	}
	v, ok := spec.Variables[name]
	if !ok || v.SectionName != ".rodata" || int(v.Offset+v.Size()) > len(s.rodata) {
		return fmt.Errorf("BPF object has no constant %s", name)
	}
	v.Value = s.rodata[v.Offset : v.Offset+v.Size()]
	return v.Get(out)
}

func (s *sandbox) forceChoosable() error {
	up := s.coll.Maps["uplinks"]
	for id := uint32(0); id < uint32(maps.MaxUplinks); id++ {
		var u bpf.UplinkUplink
		if err := up.Lookup(id, &u); err != nil {
			return err
		}
		if u.Mark != 0 {
			u.Up = 1
			if err := up.Put(id, &u); err != nil {
				return err
			}
		}
	}
	choosable := func(p *bpf.UplinkPolicy) {
		p.Sticky = uint8(maps.StickyDestination)
		for i := range p.Entries {
			p.Entries[i].Weight = max(p.Entries[i].Weight, 1)
		}
	}
	meta := s.coll.Maps["policy_meta"]
	for gen := uint32(0); gen < 2; gen++ {
		var set bpf.UplinkPolicySet
		if err := meta.Lookup(gen, &set); err != nil {
			return err
		}
		choosable(&set.Dflt)
		if err := meta.Put(gen, &set); err != nil {
			return err
		}
	}
	rules := s.coll.Maps["policy_rules"]
	for i := uint32(0); i < rules.MaxEntries(); i++ {
		var r bpf.UplinkPolicyRule
		if err := rules.Lookup(i, &r); err != nil {
			return err
		}
		choosable(&r.Policy)
		if err := rules.Put(i, &r); err != nil {
			return err
		}
	}
	return nil
}

func count(m *ebpf.Map) (int, error) {
	k := make([]byte, m.KeySize())
	v := make([]byte, m.ValueSize())
	n := 0
	it := m.Iterate()
	for it.Next(k, v) {
		n++
	}
	return n, it.Err()
}

func copyMap(dst, src *ebpf.Map) error {
	k := make([]byte, src.KeySize())
	v := make([]byte, src.ValueSize())
	it := src.Iterate()
	for it.Next(k, v) {
		if err := dst.Put(k, v); err != nil {
			return err
		}
	}
	return it.Err()
}

// run sends one first packet of a connection through the program; it
// returns the mark the packet leaves with.
func (s *sandbox) run(p packet.Packet) (uint32, error) {
	var out skbContext
	ret, err := s.prog.Run(&ebpf.RunOptions{Data: p.Bytes(), Context: skbContext{}, ContextOut: &out})
	if err != nil {
		return 0, fmt.Errorf("test run of the LAN program: %w", err)
	}
	if ret != 0 { // TC_ACT_OK: lan_ingress never drops
		return 0, fmt.Errorf("the LAN program returned %d, not TC_ACT_OK", ret)
	}
	return out.Mark, nil
}

// flow is what the run recorded for the packet's flow, if anything.
func (s *sandbox) flow(p packet.Packet) (maps.Flow, bool, error) {
	m := &maps.Maps{Flows4: s.coll.Maps["flows4"], Flows6: s.coll.Maps["flows6"],
		Inbound4: s.coll.Maps["inbound4"], Inbound6: s.coll.Maps["inbound6"]}
	return m.LookupFlow(maps.FlowKey{Proto: p.Proto, Src: p.Src, Dst: p.Dst})
}

// stickyEntries lists the sandbox's sticky map.
func (s *sandbox) stickyEntries() (map[bpf.UplinkStickyKey]bpf.UplinkStickyEntry, error) {
	out := map[bpf.UplinkStickyKey]bpf.UplinkStickyEntry{}
	var k bpf.UplinkStickyKey
	var v bpf.UplinkStickyEntry
	it := s.coll.Maps["sticky"].Iterate()
	for it.Next(&k, &v) {
		out[k] = v
	}
	return out, it.Err()
}
