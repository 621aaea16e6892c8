package routing

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"reflect"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/statefile"
)

// Routes of other software that mhbpf replaces.
//
// Apply puts mhbpf's routes in with RouteReplace, and the kernel replaces a
// route in the same slot (table, destination, TOS, metric): main's default
// route of pppd, a DHCP client or the administrator is gone once mhbpf's
// weighted one is in. SaveReplaced records such a route before it is
// replaced, and RestoreSaved puts it back after mhbpf's are deleted.

// SavedRoute is one route as the kernel reported it, devices by name (an
// ifindex does not survive the device: pppd's next ppp0 has another).
type SavedRoute struct {
	Family   int        `json:"family"`
	Table    int        `json:"table"`
	Dst      string     `json:"dst"` // a prefix; "" is the default route
	Tos      int        `json:"tos,omitempty"`
	Metric   int        `json:"metric"`
	Protocol int        `json:"protocol"`
	Scope    int        `json:"scope"`
	Type     int        `json:"type"`
	Flags    int        `json:"flags,omitempty"` // RTNH_F_ONLINK only: the kernel sets the others
	Dev      string     `json:"dev,omitempty"`
	Gw       string     `json:"gw,omitempty"`
	PrefSrc  string     `json:"prefsrc,omitempty"`
	Realm    int        `json:"realm,omitempty"`
	Hops     []SavedHop `json:"multipath,omitempty"`

	MTU              int    `json:"mtu,omitempty"`
	MTULock          bool   `json:"mtu_lock,omitempty"`
	Window           int    `json:"window,omitempty"`
	Rtt              int    `json:"rtt,omitempty"`
	RttVar           int    `json:"rttvar,omitempty"`
	Ssthresh         int    `json:"ssthresh,omitempty"`
	Cwnd             int    `json:"cwnd,omitempty"`
	AdvMSS           int    `json:"advmss,omitempty"`
	Reordering       int    `json:"reordering,omitempty"`
	Hoplimit         int    `json:"hoplimit,omitempty"`
	InitCwnd         int    `json:"initcwnd,omitempty"`
	Features         int    `json:"features,omitempty"`
	RtoMin           int    `json:"rto_min,omitempty"`
	RtoMinLock       bool   `json:"rto_min_lock,omitempty"`
	InitRwnd         int    `json:"initrwnd,omitempty"`
	QuickACK         int    `json:"quickack,omitempty"`
	Congctl          string `json:"congctl,omitempty"`
	FastOpenNoCookie int    `json:"fastopen_no_cookie,omitempty"`
}

// SavedHop is one next hop of a multipath route.
type SavedHop struct {
	Dev    string `json:"dev"`
	Gw     string `json:"gw,omitempty"`
	Weight int    `json:"weight"` // rtnh_hops + 1, as ip shows it
	Flags  int    `json:"flags,omitempty"`
}

// SavedRoutes is the state file: the replaced routes by slot.
type SavedRoutes struct {
	Routes map[string]SavedRoute `json:"routes"`
}

// The next hop flags a route is added with; the kernel refuses DEAD and
// LINKDOWN and sets OFFLOAD, TRAP and the like itself.
const addableFlags = unix.RTNH_F_ONLINK

// replaceSlot is what the kernel matches on a replace: family, table,
// destination, TOS, metric (IPv6 gives metric 0 the default 1024).
func replaceSlot(r *netlink.Route) string {
	metric := r.Priority
	if r.Family == netlink.FAMILY_V6 && metric == 0 {
		metric = 1024
	}
	return fmt.Sprintf("%s tos%d metric%d", RouteSlot(r), r.Tos, metric)
}

// String is the route as an administrator reads it (close to ip route).
func (s SavedRoute) String() string {
	var b strings.Builder
	fam := "IPv4"
	if s.Family == netlink.FAMILY_V6 {
		fam = "IPv6"
	}
	dst := s.Dst
	if dst == "" {
		dst = "default"
	}
	if s.Type != 0 && s.Type != unix.RTN_UNICAST {
		fmt.Fprintf(&b, "type %d ", s.Type)
	}
	b.WriteString(dst)
	if s.Gw != "" {
		fmt.Fprintf(&b, " via %s", s.Gw)
	}
	if s.Dev != "" {
		fmt.Fprintf(&b, " dev %s", s.Dev)
	}
	for _, h := range s.Hops {
		b.WriteString(" nexthop")
		if h.Gw != "" {
			fmt.Fprintf(&b, " via %s", h.Gw)
		}
		fmt.Fprintf(&b, " dev %s weight %d", h.Dev, h.Weight)
	}
	fmt.Fprintf(&b, " proto %s metric %d table %d (%s)", netlink.RouteProtocol(s.Protocol), s.Metric, s.Table, fam)
	return b.String()
}

// saveRoute records r, devices by name.
func saveRoute(h *netlink.Handle, r *netlink.Route) (SavedRoute, error) {
	name := func(idx int) (string, error) {
		if idx == 0 {
			return "", nil
		}
		l, err := h.LinkByIndex(idx)
		if err != nil {
			return "", fmt.Errorf("device %d: %w", idx, err)
		}
		return l.Attrs().Name, nil
	}
	ipString := func(ip net.IP) string {
		if ip == nil {
			return ""
		}
		return ip.String()
	}
	s := SavedRoute{Family: r.Family, Table: r.Table, Tos: r.Tos, Metric: r.Priority, Protocol: int(r.Protocol),
		Scope: int(r.Scope), Type: r.Type, Flags: r.Flags & addableFlags, Gw: ipString(r.Gw), PrefSrc: ipString(r.Src), Realm: r.Realm,
		MTU: r.MTU, MTULock: r.MTULock, Window: r.Window, Rtt: r.Rtt, RttVar: r.RttVar, Ssthresh: r.Ssthresh, Cwnd: r.Cwnd,
		AdvMSS: r.AdvMSS, Reordering: r.Reordering, Hoplimit: r.Hoplimit, InitCwnd: r.InitCwnd, Features: r.Features,
		RtoMin: r.RtoMin, RtoMinLock: r.RtoMinLock, InitRwnd: r.InitRwnd, QuickACK: r.QuickACK, Congctl: r.Congctl,
		FastOpenNoCookie: r.FastOpenNoCookie}
	if r.Dst != nil {
		if ones, _ := r.Dst.Mask.Size(); ones != 0 || !r.Dst.IP.IsUnspecified() {
			s.Dst = r.Dst.String()
		}
	}
	var err error
	if s.Dev, err = name(r.LinkIndex); err != nil {
		return s, err
	}
	for _, nh := range r.MultiPath {
		dev, err := name(nh.LinkIndex)
		if err != nil {
			return s, err
		}
		s.Hops = append(s.Hops, SavedHop{Dev: dev, Gw: ipString(nh.Gw), Weight: nh.Hops + 1, Flags: nh.Flags & addableFlags})
	}
	return s, nil
}

// route is the saved route for the kernel, devices resolved by ifindex().
func (s SavedRoute) route(ifindex func(string) (int, error)) (netlink.Route, error) {
	r := netlink.Route{Family: s.Family, Table: s.Table, Tos: s.Tos, Priority: s.Metric, Protocol: netlink.RouteProtocol(s.Protocol),
		Scope: netlink.Scope(s.Scope), Type: s.Type, Flags: s.Flags, Realm: s.Realm,
		MTU: s.MTU, MTULock: s.MTULock, Window: s.Window, Rtt: s.Rtt, RttVar: s.RttVar, Ssthresh: s.Ssthresh, Cwnd: s.Cwnd,
		AdvMSS: s.AdvMSS, Reordering: s.Reordering, Hoplimit: s.Hoplimit, InitCwnd: s.InitCwnd, Features: s.Features,
		RtoMin: s.RtoMin, RtoMinLock: s.RtoMinLock, InitRwnd: s.InitRwnd, QuickACK: s.QuickACK, Congctl: s.Congctl,
		FastOpenNoCookie: s.FastOpenNoCookie}
	r.Dst = defaultDst(s.Family)
	if s.Dst != "" {
		_, n, err := net.ParseCIDR(s.Dst)
		if err != nil {
			return r, fmt.Errorf("destination %q: %w", s.Dst, err)
		}
		r.Dst = n
	}
	r.Gw = net.ParseIP(s.Gw)
	r.Src = net.ParseIP(s.PrefSrc)
	if s.Family == netlink.FAMILY_V4 {
		r.Gw, r.Src = r.Gw.To4(), r.Src.To4()
	}
	var err error
	if s.Dev != "" {
		if r.LinkIndex, err = ifindex(s.Dev); err != nil {
			return r, err
		}
	}
	for _, h := range s.Hops {
		nh := &netlink.NexthopInfo{Hops: h.Weight - 1, Flags: h.Flags, Gw: net.ParseIP(h.Gw)}
		if s.Family == netlink.FAMILY_V4 {
			nh.Gw = nh.Gw.To4()
		}
		if h.Dev != "" {
			if nh.LinkIndex, err = ifindex(h.Dev); err != nil {
				return r, err
			}
		}
		r.MultiPath = append(r.MultiPath, nh)
	}
	return r, nil
}

// LoadSavedRoutes reads the state file; a missing file is an empty one.
func LoadSavedRoutes(stateFile string) (*SavedRoutes, error) {
	s := &SavedRoutes{Routes: map[string]SavedRoute{}}
	err := statefile.Read(stateFile, s)
	if errors.Is(err, os.ErrNotExist) {
		return s, nil
	}
	if err != nil {
		return nil, fmt.Errorf("state file %s: %w", stateFile, err)
	}
	if s.Routes == nil {
		s.Routes = map[string]SavedRoute{}
	}
	return s, nil
}

// SaveReplaced records in stateFile each route of other software that
// applying want would replace, before it is replaced. A slot already
// recorded keeps its first record: the route there now may be one mhbpf
// put in (a restarted daemon), and what goes back at 'mhbpf down' is what
// the system had before mhbpf. It reports what it recorded.
func SaveReplaced(h *netlink.Handle, stateFile string, s Settings, want State) ([]SavedRoute, error) {
	saved, err := LoadSavedRoutes(stateFile)
	if err != nil {
		return nil, err
	}
	type ft struct{ fam, table int }
	dumps := map[ft][]netlink.Route{}
	var added []SavedRoute
	var errs []error
	for i := range want.Routes {
		w := &want.Routes[i]
		slot := replaceSlot(w)
		if _, ok := saved.Routes[slot]; ok {
			continue
		}
		k := ft{w.Family, w.Table}
		routes, ok := dumps[k]
		if !ok {
			routes, err = retryDump(func() ([]netlink.Route, error) {
				return h.RouteListFiltered(w.Family, &netlink.Route{Table: w.Table}, netlink.RT_FILTER_TABLE)
			})
			if err != nil {
				errs = append(errs, fmt.Errorf("list routes of table %d: %w", w.Table, err))
				continue
			}
			for j := range routes {
				routes[j].Family = w.Family
			}
			dumps[k] = routes
		}
		// The kernel replaces the first route of the slot, in the order it
		// lists them: when that is mhbpf's, nothing foreign goes.
		for j := range routes {
			r := &routes[j]
			if r.Table != w.Table || replaceSlot(r) != slot {
				continue
			}
			if int(r.Protocol) != s.RouteProtocol {
				sr, err := saveRoute(h, r)
				if err != nil {
					errs = append(errs, fmt.Errorf("record route in slot %s: %w", slot, err))
					break
				}
				saved.Routes[slot] = sr
				added = append(added, sr)
			}
			break
		}
	}
	if len(added) > 0 {
		if err := statefile.Write(stateFile, saved); err != nil {
			errs = append(errs, err)
		}
	}
	return added, errors.Join(errs...)
}

// RestoreSaved adds back the routes stateFile recorded (call it after
// mhbpf's own are deleted), each device found by its name now. A route
// whose device is gone, or whose slot someone else filled meanwhile, is
// reported and dropped; a route the kernel refuses for another reason is
// an error and stays recorded for the next try. The file goes when nothing
// is left in it.
func RestoreSaved(h *netlink.Handle, stateFile string, log *slog.Logger) error {
	saved, err := LoadSavedRoutes(stateFile)
	if err != nil {
		return err
	}
	var errs []error
	for slot, sr := range saved.Routes {
		var missing string
		r, err := sr.route(func(name string) (int, error) {
			l, err := h.LinkByName(name)
			if err != nil {
				if errors.As(err, &netlink.LinkNotFoundError{}) {
					missing = name
				}
				return 0, fmt.Errorf("device %s: %w", name, err)
			}
			return l.Attrs().Index, nil
		})
		if missing != "" {
			log.Warn("route mhbpf replaced NOT restored: its device no longer exists", "device", missing, "route", sr.String())
			delete(saved.Routes, slot)
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("saved route %s: %w", sr, err))
			continue
		}
		err = h.RouteAdd(&r)
		switch {
		case err == nil:
			log.Info("restored the route mhbpf replaced", "route", sr.String())
			delete(saved.Routes, slot)
		case errors.Is(err, unix.EEXIST) && inPlace(h, &r, sr):
			log.Info("the route mhbpf replaced is in place already", "route", sr.String())
			delete(saved.Routes, slot)
		case errors.Is(err, unix.EEXIST):
			log.Warn("route mhbpf replaced NOT restored: another route took its place since", "route", sr.String())
			delete(saved.Routes, slot)
		default:
			errs = append(errs, fmt.Errorf("restore route %s: %w", sr, err))
		}
	}
	if len(saved.Routes) == 0 {
		if err := os.Remove(stateFile); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	} else if err := statefile.Write(stateFile, saved); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// inPlace: the slot of r holds exactly the saved route.
func inPlace(h *netlink.Handle, r *netlink.Route, sr SavedRoute) bool {
	routes, err := retryDump(func() ([]netlink.Route, error) {
		return h.RouteListFiltered(r.Family, &netlink.Route{Table: r.Table}, netlink.RT_FILTER_TABLE)
	})
	if err != nil {
		return false
	}
	for i := range routes {
		routes[i].Family = r.Family
		if routes[i].Table != r.Table || replaceSlot(&routes[i]) != replaceSlot(r) {
			continue
		}
		if have, err := saveRoute(h, &routes[i]); err == nil && reflect.DeepEqual(have, sr) {
			return true
		}
	}
	return false
}
