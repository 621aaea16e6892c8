// Package nat keeps mhbpf's nftables table: masquerade on the uplinks that
// ask for it. The table is mhbpf's alone and is replaced whole in one
// netlink transaction, so no packet sees half of it.
package nat

import (
	"errors"
	"fmt"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Apply replaces mhbpf's table (family inet: IPv4 and IPv6) with one that
// masquerades what leaves by each of ifaces. No ifaces: the table goes.
func Apply(table string, ifaces []string) error {
	c, err := nftables.New()
	if err != nil {
		return err
	}
	t := &nftables.Table{Name: table, Family: nftables.TableFamilyINet}
	// add + delete + add: the idiom that replaces a table whether or not
	// it exists, inside one transaction.
	c.AddTable(t)
	c.DelTable(t)
	if len(ifaces) > 0 {
		c.AddTable(t)
		prio := nftables.ChainPriorityNATSource
		ch := c.AddChain(&nftables.Chain{
			Name: "postrouting", Table: t, Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookPostrouting, Priority: prio,
		})
		for _, ifname := range ifaces {
			c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
				&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifnameBytes(ifname)},
				&expr.Masq{},
			}})
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables table %s: %w", table, err)
	}
	return nil
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
