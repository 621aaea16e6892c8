package routing

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// RemoveAll deletes every rule and every route that carries mhbpf's
// protocol, wherever it is: rules outside the priority block s names too
// (an install with another rule_priority, whose settings are gone with
// the state directory). Only 'mhbpf down' uses it; the daemon's own
// passes keep to the block (Apply).
func RemoveAll(h *netlink.Handle, s Settings) error {
	errs := []error{Remove(h, s)}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rules, err := retryDump(func() ([]netlink.Rule, error) { return h.RuleList(fam) })
		if err != nil {
			errs = append(errs, fmt.Errorf("list rules: %w", err))
			continue
		}
		for _, r := range rules {
			if r.Protocol != uint8(s.RouteProtocol) {
				continue
			}
			r.Family = fam
			if err := h.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("delete rule %s: %w", RuleKey(&r), err))
			}
		}
	}
	return errors.Join(errs...)
}
