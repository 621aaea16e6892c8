// Package conntrack makes the kernel forget the connections bound to an
// uplink's addresses when the uplink dies. Masquerade binds a connection to
// the address of the uplink its first packet left by; once that uplink is
// gone, its later packets (a SYN's retransmission, the next datagram of a
// UDP session) are steered to a live uplink but still bound to the dead
// one's address. The kernel drops the first of them that leaves by another
// interface, and only then forgets the binding; one that left with the dead
// address would be dropped by the live uplink's provider (BCP 38). Without
// its conntrack entry, the next packet is a new connection, NATed to the
// address of the uplink it now leaves by.
//
// Only the entries whose reply direction goes to one of the given addresses
// are deleted: what was masqueraded to them, and the box's own connections
// from them. Never a whole table.
package conntrack

import (
	"errors"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
)

// Filters are the conntrack filters for addrs, by family: one filter per
// address, matching the entries whose reply-direction destination it is.
// Invalid addresses are skipped.
func Filters(addrs []netip.Addr) (v4, v6 []netlink.CustomConntrackFilter) {
	seen := map[netip.Addr]bool{}
	for _, a := range addrs {
		if !a.IsValid() {
			continue
		}
		a = a.Unmap()
		if seen[a] {
			continue
		}
		seen[a] = true
		f := &netlink.ConntrackFilter{}
		if err := f.AddIP(netlink.ConntrackReplyDstIP, net.IP(a.AsSlice())); err != nil {
			continue // cannot happen: one attribute on a fresh filter
		}
		if a.Is4() {
			v4 = append(v4, f)
		} else {
			v6 = append(v6, f)
		}
	}
	return v4, v6
}

// attempts bounds the retries of a dump the kernel interrupted (the table
// changed while it was read).
const attempts = 3

// Forget deletes the conntrack entries whose reply-direction destination is
// one of addrs, IPv4 and IPv6, through h, and returns how many it deleted.
// No addresses, nothing deleted: it never flushes.
func Forget(h *netlink.Handle, addrs []netip.Addr) (int, error) {
	v4, v6 := Filters(addrs)
	total := 0
	var errs []error
	for _, fam := range []struct {
		family  netlink.InetFamily
		filters []netlink.CustomConntrackFilter
	}{{netlink.FAMILY_V4, v4}, {netlink.FAMILY_V6, v6}} {
		if len(fam.filters) == 0 {
			continue
		}
		for i := 0; i < attempts; i++ {
			n, err := h.ConntrackDeleteFilters(netlink.ConntrackTable, fam.family, fam.filters...)
			total += int(n)
			if err == nil {
				break
			}
			// An interrupted dump still deleted what it saw; read again
			// for the rest.
			if !errors.Is(err, netlink.ErrDumpInterrupted) || i == attempts-1 {
				errs = append(errs, err)
				break
			}
		}
	}
	return total, errors.Join(errs...)
}
