package daemon

import (
	"sort"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/mhbpf/mhbpf/internal/routing"
)

// Conflicts: a repair someone keeps undoing. Another routing daemon that
// owns main's default route, or a script that deletes mhbpf's rules, takes
// away what the last pass put in; the next pass puts it back, and they go
// round as fast as netlink carries their changes. A change is a repair when
// the last pass wanted the same (so it was in place, or put in) and it is
// missing again. conflictAfter repairs of the same thing within
// conflictWindow make it a conflict: it is logged once, naming what fights,
// and the repair is held back for a backoff that doubles with each further
// repair (up to backoffMax). A change of mhbpf's own mind (an uplink going
// down changes main's route) is no repair and never waits: failover does
// not depend on any of this.
const (
	conflictAfter  = 3
	conflictWindow = 10 * time.Second
	backoffFirst   = time.Second
	backoffMax     = time.Minute
)

// Repair is the recent history of one change.
type Repair struct {
	What   string    // the rule or route, as ip prints it
	Count  int       // repairs within conflictWindow of each other
	Last   time.Time // the last repair
	Until  time.Time // held back until then
	Logged bool      // reported as a conflict
}

// Conflict is a repair found to be undone again and again.
type Conflict struct {
	Key     string
	What    string
	Route   *netlink.Route // the route fought over (nil: a rule)
	Count   int
	Backoff time.Duration
}

// wantedKeys are the keys of everything a routing state holds.
func wantedKeys(st routing.State) map[string]bool {
	w := map[string]bool{}
	for i := range st.Rules {
		w["rule "+routing.RuleKey(&st.Rules[i])] = true
	}
	for i := range st.Routes {
		w["route "+routing.RouteKey(&st.Routes[i])] = true
		w["slot "+routing.RouteSlot(&st.Routes[i])] = true
	}
	return w
}

// planRepairs holds back the repairs in conflict from p.RoutingDiff and
// keeps the repair history in p.Memory.
func planRepairs(p *Plan, now time.Time, wake func(time.Duration)) {
	m := &p.Memory
	prev := m.Wanted
	touched := map[string]bool{}
	// keep decides over one change of the diff.
	keep := func(key, what string, repair bool, route *netlink.Route) bool {
		touched[key] = true
		r, seen := m.Repairs[key]
		if seen && now.Before(r.Until) {
			p.Held = append(p.Held, what)
			wake(r.Until.Sub(now))
			return false
		}
		if !repair {
			delete(m.Repairs, key)
			return true
		}
		if now.Sub(r.Last) > conflictWindow {
			r.Count = 0
		}
		r.What, r.Count, r.Last = what, r.Count+1, now
		if r.Count >= conflictAfter {
			backoff := min(backoffFirst<<min(r.Count-conflictAfter, 10), backoffMax)
			r.Until = now.Add(backoff)
			wake(backoff)
			if !r.Logged {
				r.Logged = true
				p.Conflicts = append(p.Conflicts, Conflict{Key: key, What: what, Route: route, Count: r.Count, Backoff: backoff})
			}
		}
		m.Repairs[key] = r
		return true
	}
	d := &p.RoutingDiff
	var out routing.Diff
	for i := range d.AddRules {
		r := &d.AddRules[i]
		k := "rule " + routing.RuleKey(r)
		if keep(k, routing.FormatRule(r), prev[k], nil) {
			out.AddRules = append(out.AddRules, *r)
		}
	}
	for i := range d.DelRules {
		r := &d.DelRules[i]
		k := "rule " + routing.RuleKey(r)
		if keep("delete "+k, "not "+routing.FormatRule(r), prev != nil && !prev[k], nil) {
			out.DelRules = append(out.DelRules, *r)
		}
	}
	for i := range d.PutRoutes {
		r := &d.PutRoutes[i]
		k := "route " + routing.RouteKey(r)
		if keep(k, routing.FormatRoute(r), prev[k], r) {
			out.PutRoutes = append(out.PutRoutes, *r)
		}
	}
	for i := range d.DelRoutes {
		r := &d.DelRoutes[i]
		k := "route " + routing.RouteKey(r)
		if keep("delete "+k, "not "+routing.FormatRoute(r), prev != nil && !prev["slot "+routing.RouteSlot(r)], r) {
			out.DelRoutes = append(out.DelRoutes, *r)
		}
	}
	*d = out
	for k, r := range m.Repairs {
		if touched[k] || now.Sub(r.Last) <= conflictWindow || now.Before(r.Until) {
			continue
		}
		delete(m.Repairs, k)
		if r.Logged {
			p.Resolved = append(p.Resolved, r.What)
		}
	}
	sort.Strings(p.Resolved)
	m.Wanted = wantedKeys(p.Routing)
}
