package daemon

import (
	"sync/atomic"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/config"
)

// eventFilter says which netlink events can change a pass's outcome. A
// routing daemon in the same box (bird, FRR) may change hundreds of routes
// a second in tables mhbpf does not own: a pass for each would keep the
// reconciler busy (and, with a debounce that waited for quiet, keep it from
// ever running). What matters: the configured interfaces (links), any
// address (cheap, and rare), mhbpf's own routes (its protocol: the kernel
// deletes them with their device) and whatever is put in the slots mhbpf
// owns, the default routes of main and the uplink tables.
type eventFilter struct {
	cur atomic.Pointer[filterState]
}

type filterState struct {
	ifaces   map[string]bool
	tables   map[int]bool
	protocol int
}

func newEventFilter() *eventFilter { return &eventFilter{} }

// set follows a configuration (at start and on each reload).
func (f *eventFilter) set(c *config.Config) {
	st := &filterState{ifaces: map[string]bool{}, tables: map[int]bool{unix.RT_TABLE_MAIN: true}, protocol: c.Global.RouteProtocol}
	for _, u := range c.Uplinks {
		st.ifaces[u.Interface] = true
		st.tables[u.Table] = true
	}
	for _, i := range c.LAN.Interfaces {
		st.ifaces[i] = true
	}
	f.cur.Store(st)
}

func (f *eventFilter) link(u netlink.LinkUpdate) bool {
	st := f.cur.Load()
	if st == nil || u.Link == nil {
		return true
	}
	return st.ifaces[u.Link.Attrs().Name]
}

func (f *eventFilter) route(u netlink.RouteUpdate) bool {
	st := f.cur.Load()
	if st == nil {
		return true
	}
	if int(u.Route.Protocol) == st.protocol {
		return true
	}
	if !st.tables[u.Route.Table] {
		return false
	}
	return isDefault(u.Route)
}

func isDefault(r netlink.Route) bool {
	if r.Dst == nil {
		return true
	}
	ones, _ := r.Dst.Mask.Size()
	return ones == 0
}
