package daemon

import (
	"net"
	"net/netip"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/health"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/nat"
	"github.com/mhbpf/mhbpf/internal/routing"
)

// Snapshot is the world as one pass sees it: everything plan decides from
// besides the configuration and its own memory. observe reads it from the
// kernel; the tests build it from a fake.
type Snapshot struct {
	Now time.Time
	// Links by interface name: every configured uplink and LAN interface.
	Links map[string]Link
	// Probes: the latest result of each running prober, by uplink slot.
	Probes map[int]health.Result
	// Routing: mhbpf's rules and routes (its protocol, its priority block).
	Routing routing.State
	// TC: the programs on each interface the daemon attached (by name).
	TC map[string]TCState
	// NAT: mhbpf's nftables table against what was last written.
	NAT NATState
	// CgroupGone: the socket hook links that are gone.
	CgroupGone []string
	// Errors: what could not be read; the plan leaves those parts alone.
	Errors []ObserveError
}

// Link is one interface as the kernel reports it.
type Link struct {
	Exists  bool
	Ifindex int
	// Up: administratively up, with a carrier (ppp and tun report
	// operstate "unknown").
	Up bool
	// Addrs: its global addresses (read only when up): an uplink's.
	Addrs []netip.Addr
	// Subnets: the subnets of its addresses: a LAN interface's.
	Subnets []netip.Prefix
}

// TCState is what the daemon attached to an interface and what of it is
// still there.
type TCState struct {
	At    int    // the ifindex the daemon attached at; 0: not attached
	Drift string // what of it is gone ("" all there)
}

// NATState is mhbpf's nftables table as last written, and the kernel's
// differences from it.
type NATState struct {
	Written bool
	Table   nat.Table
	Drift   string // "" the same, "gone", or what differs
}

// ObserveError is a part of the world that could not be read.
type ObserveError struct {
	What string // a stable key: the same failure is logged once
	Err  error
}

// observe reads the snapshot for one pass.
func (d *Daemon) observe() Snapshot {
	s := Snapshot{Now: time.Now(), Links: map[string]Link{}, TC: map[string]TCState{}}
	for _, u := range d.cfg.Uplinks {
		s.Links[u.Interface] = d.observeLink(u.Interface)
	}
	for _, ifname := range d.cfg.LAN.Interfaces {
		s.Links[ifname] = d.observeLink(ifname)
	}
	s.Probes = d.probeResults()
	var err error
	if s.Routing, err = routing.Current(d.nl, d.routingSettings()); err != nil {
		s.Errors = append(s.Errors, ObserveError{"routing", err})
	}
	roles := ifaceRoles(d.cfg)
	for ifname, at := range d.ap.attached {
		st := TCState{At: at}
		if id, ok := roles[ifname]; ok {
			role := maps.RoleUplink
			if id < 0 {
				role = maps.RoleLAN
			}
			if st.Drift, err = d.dp.DriftTC(ifname, role); err != nil {
				s.Errors = append(s.Errors, ObserveError{"checking the tc programs on " + ifname, err})
				st.Drift = ""
			}
		}
		s.TC[ifname] = st
	}
	s.NAT = NATState{Written: d.ap.natSet, Table: d.ap.natTable}
	if d.ap.natSet {
		if s.NAT.Drift, err = nat.Drift(d.cfg.Global.NFTable, d.ap.natTable); err != nil {
			s.Errors = append(s.Errors, ObserveError{"nat: reading the nftables table inet " + d.cfg.Global.NFTable + " back", err})
			s.NAT.Drift = ""
		}
	}
	s.CgroupGone = d.dp.DriftCgroup()
	return s
}

func (d *Daemon) observeLink(ifname string) Link {
	l, err := d.nl.LinkByName(ifname)
	if err != nil {
		return Link{}
	}
	a := l.Attrs()
	o := Link{Exists: true, Ifindex: a.Index}
	o.Up = a.Flags&net.FlagUp != 0 && a.RawFlags&unix.IFF_RUNNING != 0 &&
		(a.OperState == netlink.OperUp || a.OperState == netlink.OperUnknown)
	addrs, err := d.nl.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		return o
	}
	for _, ad := range addrs {
		ip, ok := netip.AddrFromSlice(ad.IP)
		if !ok || ip.IsLinkLocalUnicast() {
			continue
		}
		ip = ip.Unmap()
		if o.Up && ad.Scope == unix.RT_SCOPE_UNIVERSE {
			o.Addrs = append(o.Addrs, ip)
		}
		// A /0 is not a subnet: no rule can say "to" it.
		if ones, _ := ad.Mask.Size(); ones != 0 {
			o.Subnets = append(o.Subnets, netip.PrefixFrom(ip, ones).Masked())
		}
	}
	return o
}
