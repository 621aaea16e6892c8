package daemon

import (
	"fmt"
	"log/slog"
	"net/netip"

	"github.com/vishvananda/netlink"

	"github.com/mhbpf/mhbpf/internal/conntrack"
	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/nat"
	"github.com/mhbpf/mhbpf/internal/routing"
	"github.com/mhbpf/mhbpf/internal/statefile"
)

// The real System: netlink and bpf(2), through the packages that own each
// part. The datapath's maps are *maps.Maps itself.

type kernelAttacher struct{ dp *loader.Datapath }

func (k kernelAttacher) AttachTC(ifname string, role maps.Role, uplink int) (loader.Mode, error) {
	mode, err := k.dp.AttachTC(ifname, role, uplink)
	if err != nil {
		if _, lerr := netlink.LinkByName(ifname); lerr != nil {
			// The device itself went (pppd exited) between the
			// observation and the attach, its qdisc with it.
			return mode, fmt.Errorf("%w: %v", errInterfaceGone, err)
		}
	}
	return mode, err
}

func (k kernelAttacher) ReattachCgroup() (string, error) {
	cg := k.dp.CgroupPath()
	return cg, k.dp.AttachCgroup(cg)
}

type kernelRouter struct {
	nl        *netlink.Handle
	s         routing.Settings
	savedFile string // the routes of others mhbpf replaced
	log       *slog.Logger
}

func (k kernelRouter) Apply(d routing.Diff) ([]string, error) {
	// What mhbpf's routes replace (main's default of pppd or DHCP) is
	// recorded before they go in, for 'mhbpf down' to put back.
	return routing.ApplyDiff(k.nl, d, func(toPut routing.State) {
		saved, err := routing.SaveReplaced(k.nl, k.savedFile, k.s, toPut)
		if err != nil {
			k.log.Error("recording the routes mhbpf replaces", "error", err)
		}
		for _, r := range saved {
			k.log.Info("replacing a route of another program; 'mhbpf down' puts it back", "route", r.String())
		}
	})
}

// Holder: the routes of other protocols in r's slot, by protocol and
// device, as ip prints them.
func (k kernelRouter) Holder(r netlink.Route) string {
	routes, err := k.nl.RouteListFiltered(r.Family, &netlink.Route{Table: r.Table}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return ""
	}
	slot := routing.RouteSlot(&r)
	for i := range routes {
		o := &routes[i]
		o.Family = r.Family
		if routing.RouteSlot(o) != slot || int(o.Protocol) == k.s.RouteProtocol {
			continue
		}
		dev := fmt.Sprintf("#%d", o.LinkIndex)
		if l, err := k.nl.LinkByIndex(o.LinkIndex); err == nil {
			dev = l.Attrs().Name
		}
		return fmt.Sprintf("route of proto %s dev %s (%s)", o.Protocol, dev, routing.FormatRoute(o))
	}
	return ""
}

type kernelNAT struct{ table string }

func (k kernelNAT) Apply(t nat.Table) error { return nat.Apply(k.table, t) }

type kernelSysctls struct{ savedFile string }

func (k kernelSysctls) Apply(want routing.Sysctls) error {
	return routing.ApplySysctls(k.savedFile, want)
}

type kernelConntrack struct{ nl *netlink.Handle }

func (k kernelConntrack) Forget(addrs []netip.Addr) (int, error) {
	return conntrack.Forget(k.nl, addrs)
}

// statusSinks writes the status file and hands the status to the metrics.
type statusSinks struct {
	file    string
	metrics *metrics
}

func (s statusSinks) Status(st Status) error {
	if s.metrics != nil {
		s.metrics.publish(st)
	}
	return statefile.Write(s.file, st)
}
