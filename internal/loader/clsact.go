package loader

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/cilium/ebpf"
	tc "github.com/florianl/go-tc"
	"github.com/florianl/go-tc/core"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/maps"
)

// On kernels without tcx (Debian 12's 6.1) the programs hang off a clsact
// qdisc as direct-action cls_bpf filters. mhbpf's filter is the one with
// this priority and handle whose name starts with filterPrefix; any other
// filter on the interface is someone else's and is never touched.
const (
	filterPrio   = 0x4d48 // "MH"
	filterHandle = 1
	filterPrefix = "mhbpf_"
	ethPAll      = 0x0003
)

func filterName(role maps.Role, dir direction) string {
	if role == maps.RoleLAN {
		if dir == egress {
			return filterPrefix + "lan_egress"
		}
		return filterPrefix + "lan"
	}
	return filterPrefix + "uplink"
}

func (d direction) clsactParent() uint32 {
	if d == egress {
		return core.BuildHandle(tc.HandleRoot, tc.HandleMinEgress)
	}
	return core.BuildHandle(tc.HandleRoot, tc.HandleMinIngress)
}

func filterMsg(ifindex int, dir direction) tc.Msg {
	return tc.Msg{
		Family:  unix.AF_UNSPEC,
		Ifindex: uint32(ifindex),
		Handle:  filterHandle,
		Parent:  dir.clsactParent(),
		Info:    filterPrio<<16 | uint32(htons(ethPAll)),
	}
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func attachClsact(pinDir, ifname string, ifindex int, prog *ebpf.Program, role maps.Role, dir direction) error {
	nl, err := tc.Open(&tc.Config{})
	if err != nil {
		return fmt.Errorf("open rtnetlink: %w", err)
	}
	defer nl.Close()

	qdisc := tc.Object{
		Msg: tc.Msg{
			Family:  unix.AF_UNSPEC,
			Ifindex: uint32(ifindex),
			Handle:  core.BuildHandle(tc.HandleRoot, 0),
			Parent:  tc.HandleIngress,
		},
		Attribute: tc.Attribute{Kind: "clsact"},
	}
	switch err := nl.Qdisc().Add(&qdisc); {
	case err == nil:
		// Ours to remove again when mhbpf goes. bpffs holds no regular
		// files: the marker is an empty directory.
		if err := os.Mkdir(qdiscMarker(pinDir, ifname), 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("record clsact qdisc of %s: %w", ifname, err)
		}
	case errors.Is(err, unix.EEXIST):
	default:
		return fmt.Errorf("add clsact qdisc to %s: %w", ifname, err)
	}

	fd := uint32(prog.FD())
	name := filterName(role, dir)
	flags := uint32(tc.BpfActDirect)
	filter := tc.Object{
		Msg: filterMsg(ifindex, dir),
		Attribute: tc.Attribute{
			Kind: "bpf",
			BPF:  &tc.Bpf{FD: &fd, Name: &name, Flags: &flags},
		},
	}
	// Replace swaps the program of an existing filter atomically.
	if err := nl.Filter().Replace(&filter); err != nil {
		return fmt.Errorf("add cls_bpf filter to %s: %w", ifname, err)
	}
	return nil
}

// ourFilter: mhbpf's cls_bpf filter, by priority, handle and name.
func ourFilter(f tc.Object) bool {
	return f.Kind == "bpf" && f.BPF != nil && f.BPF.Name != nil && strings.HasPrefix(*f.BPF.Name, filterPrefix) &&
		f.Info>>16 == filterPrio && f.Handle == filterHandle
}

// detachClsact deletes mhbpf's filters (ingress and egress) from ifindex,
// and the clsact qdisc if mhbpf created it and nothing else uses it.
func detachClsact(pinDir, ifname string, ifindex int) error {
	nl, err := tc.Open(&tc.Config{})
	if err != nil {
		return fmt.Errorf("open rtnetlink: %w", err)
	}
	defer nl.Close()

	others := 0
	for _, dir := range []direction{ingress, egress} {
		filters, err := nl.Filter().Get(&tc.Msg{
			Family:  unix.AF_UNSPEC,
			Ifindex: uint32(ifindex),
			Parent:  dir.clsactParent(),
		})
		if err != nil {
			// No clsact qdisc: nothing of ours can be there.
			if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
				_ = os.Remove(qdiscMarker(pinDir, ifname))
				return nil
			}
			return fmt.Errorf("list filters of %s: %w", ifname, err)
		}
		for _, f := range filters {
			if ourFilter(f) {
				del := tc.Object{Msg: filterMsg(ifindex, dir), Attribute: tc.Attribute{Kind: "bpf"}}
				if err := nl.Filter().Delete(&del); err != nil && !errors.Is(err, unix.ENOENT) {
					return fmt.Errorf("delete filter of %s: %w", ifname, err)
				}
				continue
			}
			if f.Handle != 0 { // chain/prio placeholders come back with handle 0
				others++
			}
		}
	}

	marker := qdiscMarker(pinDir, ifname)
	if !exists(marker) {
		return nil
	}
	if others == 0 {
		qdisc := tc.Object{
			Msg: tc.Msg{
				Family:  unix.AF_UNSPEC,
				Ifindex: uint32(ifindex),
				Handle:  core.BuildHandle(tc.HandleRoot, 0),
				Parent:  tc.HandleIngress,
			},
			Attribute: tc.Attribute{Kind: "clsact"},
		}
		if err := nl.Qdisc().Delete(&qdisc); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("delete clsact qdisc of %s: %w", ifname, err)
		}
	}
	return os.Remove(marker)
}

// deleteOwnFilter deletes mhbpf's cls_bpf filter on one side of ifindex,
// if there is one; the qdisc stays.
func deleteOwnFilter(ifname string, ifindex int, dir direction) error {
	nl, err := tc.Open(&tc.Config{})
	if err != nil {
		return fmt.Errorf("open rtnetlink: %w", err)
	}
	defer nl.Close()
	filters, err := nl.Filter().Get(&tc.Msg{Family: unix.AF_UNSPEC, Ifindex: uint32(ifindex), Parent: dir.clsactParent()})
	if err != nil {
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			return nil // no clsact qdisc
		}
		return fmt.Errorf("list %s filters of %s: %w", dir, ifname, err)
	}
	for _, f := range filters {
		if ourFilter(f) {
			del := tc.Object{Msg: filterMsg(ifindex, dir), Attribute: tc.Attribute{Kind: "bpf"}}
			if err := nl.Filter().Delete(&del); err != nil && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("delete %s filter of %s: %w", dir, ifname, err)
			}
		}
	}
	return nil
}
