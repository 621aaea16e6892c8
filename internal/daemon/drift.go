package daemon

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	mnl "github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/nat"
)

// Drift: what mhbpf installed, taken away by someone else. 'nft flush
// ruleset' (restarting nftables.service on Debian) removes its nftables
// table, a QoS script deletes the clsact qdisc and its filters with it,
// 'bpftool link detach' or a cleanup of /sys/fs/bpf kills a tcx or cgroup
// link. Every pass checks these against the kernel and puts back what is
// missing, with one WARN line naming it; watchDrift makes such a pass
// happen at once instead of at the next resync.

// linkPoll is how often the pinned links are looked at: no netlink group
// announces that a BPF link went.
const linkPoll = time.Second

// applyNAT writes mhbpf's nftables table when what it should hold changed,
// and rewrites it when the kernel's differs from what was written.
func (d *Daemon) applyNAT(want nat.Table) {
	table := d.cfg.Global.NFTable
	drift := ""
	if d.natSet && want.Equal(d.natTable) {
		var err error
		if drift, err = nat.Drift(table, want); err != nil {
			d.log.Error("nat: reading the nftables table back", "table", "inet "+table, "error", err)
			return
		}
		if drift == "" {
			return
		}
	}
	if err := nat.Apply(table, want); err != nil {
		d.log.Error("nat", "error", err)
		return
	}
	d.natTable, d.natSet = want, true
	switch drift {
	case "":
	case "gone":
		d.log.Warn(fmt.Sprintf("nft table inet %s was gone (someone flushed the ruleset?); restored", table))
	default:
		d.log.Warn(fmt.Sprintf("nft table inet %s had been changed (%s); rewritten", table, drift))
	}
}

// repairAttachments puts back the tc programs of every configured
// interface the daemon attached and the socket hooks, where they went.
func (d *Daemon) repairAttachments() {
	for _, u := range d.cfg.Uplinks {
		d.repairTC(u.Interface, maps.RoleUplink, u.ID)
	}
	for _, ifname := range d.cfg.LAN.Interfaces {
		d.repairTC(ifname, maps.RoleLAN, 0)
	}
	if gone := d.dp.DriftCgroup(); len(gone) > 0 {
		cg := d.dp.CgroupPath()
		if err := d.dp.AttachCgroup(cg); err != nil {
			d.log.Error("reattaching the socket hooks", "cgroup", cg, "error", err)
			return
		}
		d.log.Warn(fmt.Sprintf("socket hook links were gone (%s); reattached", strings.Join(gone, ", ")), "cgroup", cg)
	}
}

func (d *Daemon) repairTC(ifname string, role maps.Role, uplink int) {
	if _, ok := d.attached[ifname]; !ok {
		return // not attached yet: the pass attaches it
	}
	what, err := d.dp.DriftTC(ifname, role)
	if err != nil {
		d.log.Error("checking the tc programs", "interface", ifname, "error", err)
		return
	}
	if what == "" {
		return
	}
	mode, err := d.dp.AttachTC(ifname, role, uplink)
	if err != nil {
		if _, lerr := d.nl.LinkByName(ifname); lerr != nil {
			// The device itself went (pppd exited) between the check and
			// the attach: its qdisc went with it. Nothing to repair; the
			// pass that sees it absent takes it out.
			d.log.Debug("tc programs gone with their interface", "interface", ifname, "gone", what)
			return
		}
		d.log.Error("reattaching the tc programs", "interface", ifname, "gone", what, "error", err)
		return
	}
	d.tcMode = mode
	d.log.Warn(fmt.Sprintf("tc programs on %s were gone (%s); reattached", ifname, what), "interface", ifname, "mode", mode)
}

// watchDrift wakes the reconciler when something of mhbpf's may have been
// taken away: a change to its nftables table (NFNLGRP_NFTABLES), a tc
// qdisc, filter or chain deleted (RTNLGRP_TC), a change of its pinned links
// (polled). mhbpf's own changes wake it too, once: the pass that follows
// finds everything in place and changes nothing, so nothing follows it.
func (d *Daemon) watchDrift(ctx context.Context, notify func()) {
	table, pinDir := d.cfg.Global.NFTable, d.cfg.Global.PinDir
	go d.watchGroup(ctx, "nftables", unix.NETLINK_NETFILTER, unix.NFNLGRP_NFTABLES, func(m mnl.Message) bool {
		return nftMessageAbout(m, table)
	}, notify)
	go d.watchGroup(ctx, "tc", unix.NETLINK_ROUTE, unix.RTNLGRP_TC, func(m mnl.Message) bool {
		switch m.Header.Type {
		case unix.RTM_DELQDISC, unix.RTM_DELTFILTER, unix.RTM_DELCHAIN:
			return true
		}
		return false
	}, notify)
	go func() {
		t := time.NewTicker(linkPoll)
		defer t.Stop()
		last := loader.LinksState(pinDir)
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if s := loader.LinksState(pinDir); s != last {
				last = s
				notify()
			}
		}
	}()
}

// nftMessageAbout: an nftables change (table, chain, rule, set, element,
// object) in mhbpf's table, family inet.
func nftMessageAbout(m mnl.Message, table string) bool {
	if m.Header.Type>>8 != unix.NFNL_SUBSYS_NFTABLES || len(m.Data) < 4 || m.Data[0] != unix.NFPROTO_INET {
		return false
	}
	if t := m.Header.Type & 0xff; t == unix.NFT_MSG_NEWGEN || t >= unix.NFT_MSG_MAX {
		return false
	}
	ad, err := mnl.NewAttributeDecoder(m.Data[4:])
	if err != nil {
		return true // cannot tell: look
	}
	for ad.Next() {
		// The table's name is attribute 1 of every kind of object:
		// NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_TABLE...
		if ad.Type() == unix.NFTA_TABLE_NAME {
			return ad.String() == table
		}
	}
	return true
}

// watchGroup calls notify for every message of a netlink multicast group
// that match accepts, until ctx ends. Lost messages (the socket's buffer
// overflowed) and a failed subscription also notify: the pass that follows
// looks at everything.
func (d *Daemon) watchGroup(ctx context.Context, what string, family int, group uint32, match func(mnl.Message) bool, notify func()) {
	backoff := time.Second
	for {
		started := time.Now()
		err := readGroup(ctx, family, group, match, notify)
		if ctx.Err() != nil {
			return
		}
		if time.Since(started) > time.Minute {
			backoff = time.Second // it worked for a while: not a lasting failure
		}
		d.log.Warn(what+" subscription failed; resubscribing and resyncing", "error", err)
		notify()
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, time.Minute)
	}
}

func readGroup(ctx context.Context, family int, group uint32, match func(mnl.Message) bool, notify func()) error {
	c, err := mnl.Dial(family, nil)
	if err != nil {
		return err
	}
	// Closing the socket is what ends a blocked Receive.
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer func() {
		if stop() {
			c.Close()
		}
	}()
	if err := c.JoinGroup(group); err != nil {
		return err
	}
	for {
		msgs, err := c.Receive()
		if errors.Is(err, unix.ENOBUFS) {
			notify()
			continue
		}
		if err != nil {
			return err
		}
		for _, m := range msgs {
			if match(m) {
				notify()
				break
			}
		}
	}
}
