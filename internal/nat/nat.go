// Package nat keeps mhbpf's nftables table: masquerade on the uplinks that
// ask for it, and TCP MSS clamping to the route MTU on the uplinks that ask
// for that. The table is mhbpf's alone and is replaced whole in one netlink
// transaction, so no packet sees half of it.
package nat

import (
	"encoding/binary"
	"errors"
	"fmt"
	"reflect"
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

// chainSpec is one chain of mhbpf's table and its rules, in order.
type chainSpec struct {
	chain nftables.Chain
	rules [][]expr.Any
}

// layout is what Apply writes for want: the chains of the table, each with
// its rules.
func layout(t *nftables.Table, want Table) []chainSpec {
	var chains []chainSpec
	if len(want.Masquerade) > 0 {
		cs := chainSpec{chain: nftables.Chain{
			Name: "postrouting", Table: t, Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource,
		}}
		for _, ifname := range want.Masquerade {
			cs.rules = append(cs.rules, []expr.Any{
				&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifnameBytes(ifname)},
				&expr.Masq{},
			})
		}
		chains = append(chains, cs)
	}
	if len(want.ClampMSS) > 0 {
		// Forwarded traffic only: the box's own sockets already take their
		// MSS from the route.
		cs := chainSpec{chain: nftables.Chain{
			Name: "forward", Table: t, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityMangle,
		}}
		for _, ifname := range want.ClampMSS {
			// What leaves by the uplink: a LAN host's SYN, and a
			// port-forwarded host's SYN-ACK. (A SYN coming in is routed
			// to the LAN, whose MTU rt mtu would give.)
			cs.rules = append(cs.rules, clampMSS(expr.MetaKeyOIFNAME, ifname))
		}
		chains = append(chains, cs)
	}
	return chains
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
	for _, cs := range layout(t, want) {
		ch := c.AddChain(&cs.chain)
		for _, r := range cs.rules {
			c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: r})
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables table %s: %w", table, err)
	}
	return nil
}

// Drift compares mhbpf's table in the kernel with what Apply writes for
// want, and says how it differs: "" when it is as written, else what is
// wrong ("gone", "chain forward missing", ...). Someone else's doing:
// 'nft flush ruleset' (what restarting nftables.service does) removes it,
// a script may edit it. With nothing wanted there is nothing to check.
func Drift(table string, want Table) (string, error) {
	if want.empty() {
		return "", nil
	}
	c, err := nftables.New()
	if err != nil {
		return "", err
	}
	t, err := c.ListTableOfFamily(table, nftables.TableFamilyINet)
	if errors.Is(err, unix.ENOENT) {
		return "gone", nil
	}
	if err != nil {
		return "", fmt.Errorf("nftables table %s: %w", table, err)
	}
	// google/nftables v0.3.0 reads the flags in host byte order; the
	// kernel sends them in network order.
	var flags [4]byte
	binary.NativeEndian.PutUint32(flags[:], t.Flags)
	if binary.BigEndian.Uint32(flags[:])&unix.NFT_TABLE_F_DORMANT != 0 {
		return "dormant", nil
	}
	all, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return "", fmt.Errorf("nftables chains of %s: %w", table, err)
	}
	have := map[string]*nftables.Chain{}
	for _, ch := range all {
		if ch.Table != nil && ch.Table.Name == table {
			have[ch.Name] = ch
		}
	}
	specs := layout(t, want)
	if len(have) != len(specs) {
		return fmt.Sprintf("%d chains instead of %d", len(have), len(specs)), nil
	}
	for _, cs := range specs {
		ch, ok := have[cs.chain.Name]
		if !ok {
			return "chain " + cs.chain.Name + " missing", nil
		}
		if ch.Type != cs.chain.Type || !equalPtr(ch.Hooknum, cs.chain.Hooknum) || !equalPtr(ch.Priority, cs.chain.Priority) ||
			ch.Policy != nil && *ch.Policy != nftables.ChainPolicyAccept {
			return "chain " + cs.chain.Name + " changed", nil
		}
		rules, err := c.GetRules(t, ch)
		if err != nil {
			return "", fmt.Errorf("nftables rules of %s %s: %w", table, ch.Name, err)
		}
		if len(rules) != len(cs.rules) {
			return fmt.Sprintf("chain %s has %d rules instead of %d", ch.Name, len(rules), len(cs.rules)), nil
		}
		for i, r := range rules {
			if !reflect.DeepEqual(r.Exprs, readable(cs.rules[i])) {
				return fmt.Sprintf("rule %d of chain %s changed", i+1, ch.Name), nil
			}
		}
	}
	return "", nil
}

// readable is what google/nftables reads back of a rule's expressions:
// v0.3.0 skips the types it has no parser for (rt and byteorder, of the
// ones mhbpf writes). The rest is compared exactly.
func readable(exprs []expr.Any) []expr.Any {
	var out []expr.Any
	for _, e := range exprs {
		switch e.(type) {
		case *expr.Rt, *expr.Byteorder:
			continue
		}
		out = append(out, e)
	}
	return out
}

func equalPtr[T comparable](a, b *T) bool {
	return a == nil && b == nil || a != nil && b != nil && *a == *b
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
