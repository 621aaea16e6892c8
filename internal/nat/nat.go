// Package nat keeps mhbpf's nftables table: masquerade on the uplinks that
// ask for it, and TCP MSS clamping to the route MTU on the uplinks that ask
// for that. The table is mhbpf's alone and is replaced whole in one netlink
// transaction, so no packet sees half of it.
package nat

import (
	"errors"
	"fmt"
	"slices"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Table is what mhbpf's nftables table does, by interface name.
type Table struct {
	Masquerade []string // masquerade what leaves by these
	ClampMSS   []string // clamp the MSS of SYNs leaving by these to the route MTU
}

func (t Table) empty() bool { return len(t.Masquerade) == 0 && len(t.ClampMSS) == 0 }

// Equal reports whether two tables have the same content.
func (t Table) Equal(o Table) bool {
	return slices.Equal(t.Masquerade, o.Masquerade) && slices.Equal(t.ClampMSS, o.ClampMSS)
}

// Apply replaces mhbpf's table (family inet: IPv4 and IPv6) with want. An
// empty want removes the table.
func Apply(table string, want Table) error {
	c, err := nftables.New()
	if err != nil {
		return err
	}
	t := &nftables.Table{Name: table, Family: nftables.TableFamilyINet}
	// add + delete + add: the idiom that replaces a table whether or not
	// it exists, inside one transaction.
	c.AddTable(t)
	c.DelTable(t)
	if !want.empty() {
		c.AddTable(t)
	}
	if len(want.Masquerade) > 0 {
		ch := c.AddChain(&nftables.Chain{
			Name: "postrouting", Table: t, Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource,
		})
		for _, ifname := range want.Masquerade {
			c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
				&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifnameBytes(ifname)},
				&expr.Masq{},
			}})
		}
	}
	if len(want.ClampMSS) > 0 {
		// Forwarded traffic only: the box's own sockets already take their
		// MSS from the route.
		ch := c.AddChain(&nftables.Chain{
			Name: "forward", Table: t, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityMangle,
		})
		for _, ifname := range want.ClampMSS {
			// What leaves by the uplink: a LAN host's SYN, and a
			// port-forwarded host's SYN-ACK. (A SYN coming in is routed
			// to the LAN, whose MTU rt mtu would give.)
			c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: clampMSS(expr.MetaKeyOIFNAME, ifname)})
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables table %s: %w", table, err)
	}
	return nil
}

// clampMSS is `meta KEY IFNAME tcp flags syn tcp option maxseg size set rt
// mtu`, as nft compiles it. rt mtu is the MTU of the packet's route minus
// the headers, and the kernel only ever lowers an MSS with it.
func clampMSS(key expr.MetaKey, ifname string) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifnameBytes(ifname)},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{0x02}, Xor: []byte{0x00}},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0x00}},
		&expr.Rt{Register: 1, Key: expr.RtTCPMSS},
		&expr.Byteorder{SourceRegister: 1, DestRegister: 1, Op: expr.ByteorderHton, Len: 2, Size: 2},
		&expr.Exthdr{SourceRegister: 1, Type: 2, Offset: 2, Len: 2, Op: expr.ExthdrOpTcpopt},
	}
}

// Remove deletes mhbpf's table; a missing table is no error.
func Remove(table string) error {
	c, err := nftables.New()
	if err != nil {
		return err
	}
	c.DelTable(&nftables.Table{Name: table, Family: nftables.TableFamilyINet})
	if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("remove nftables table %s: %w", table, err)
	}
	return nil
}

func ifnameBytes(name string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return b
}
