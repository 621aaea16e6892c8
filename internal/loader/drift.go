package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/cilium/ebpf/link"
	tc "github.com/florianl/go-tc"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/maps"
)

// Other software can take away what mhbpf attached: a QoS script deletes
// the clsact qdisc (and mhbpf's cls_bpf filters with it) or flushes the
// filters, 'bpftool link detach' detaches a tcx or cgroup link, a script
// that cleans /sys/fs/bpf unpins one (the daemon keeps no descriptor of its
// links: the pin is what holds each alive). These checks find that out
// cheaply (a few syscalls per interface), so that every pass of the daemon
// can run them and put back what is gone.

// DriftTC says what of mhbpf's programs on ifname is missing: "" when they
// are attached as this datapath attached them (or it did not attach
// ifname, or ifname no longer exists: a new device is attached anew).
func (d *Datapath) DriftTC(ifname string, role maps.Role) (string, error) {
	mode, ok := d.tcModes[ifname]
	if !ok {
		return "", nil
	}
	l, err := netlink.LinkByName(ifname)
	if err != nil {
		return "", nil
	}
	ifindex := l.Attrs().Index
	dirs := []direction{ingress}
	if role == maps.RoleLAN {
		dirs = append(dirs, egress)
	}
	if mode == ModeTCX {
		for _, dir := range dirs {
			if what := tcxDrift(d.opts.PinDir, ifname, ifindex, dir); what != "" {
				return what, nil
			}
		}
		return "", nil
	}
	nl, err := tc.Open(&tc.Config{})
	if err != nil {
		return "", fmt.Errorf("open rtnetlink: %w", err)
	}
	defer nl.Close()
	for _, dir := range dirs {
		filters, err := nl.Filter().Get(&tc.Msg{Family: unix.AF_UNSPEC, Ifindex: uint32(ifindex), Parent: dir.clsactParent()})
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			return "clsact qdisc gone", nil
		}
		if err != nil {
			return "", fmt.Errorf("list filters of %s: %w", ifname, err)
		}
		found := false
		for _, f := range filters {
			found = found || ourFilter(f)
		}
		if !found {
			if !hasClsact(nl, ifindex) {
				return "clsact qdisc gone", nil
			}
			return fmt.Sprintf("cls_bpf filter %s gone from %s", filterName(role, dir), dir), nil
		}
	}
	return "", nil
}

func hasClsact(nl *tc.Tc, ifindex int) bool {
	qdiscs, err := nl.Qdisc().Get()
	if err != nil {
		return true // cannot tell
	}
	for _, q := range qdiscs {
		if q.Ifindex == uint32(ifindex) && q.Kind == "clsact" {
			return true
		}
	}
	return false
}

func tcxDrift(pinDir, ifname string, ifindex int, dir direction) string {
	l, err := link.LoadPinnedLink(tcLinkPin(pinDir, ifname, dir), nil)
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Sprintf("tcx %s link unpinned", dir)
	}
	if err != nil {
		return fmt.Sprintf("tcx %s link unusable: %v", dir, err)
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return fmt.Sprintf("tcx %s link unusable: %v", dir, err)
	}
	if info.TCX() == nil || int(info.TCX().Ifindex) != ifindex {
		return fmt.Sprintf("tcx %s link detached", dir)
	}
	return ""
}

// DriftCgroup names the socket hooks whose link is unpinned or detached
// (nothing when AttachCgroup has not run). AttachCgroup puts them back.
func (d *Datapath) DriftCgroup() []string {
	if d.cgroup == "" {
		return nil
	}
	var gone []string
	for name := range d.cgroupHooks() {
		l, err := link.LoadPinnedLink(cgroupLinkPin(d.opts.PinDir, name), nil)
		switch {
		case errors.Is(err, os.ErrNotExist):
			gone = append(gone, name+" unpinned")
		case err != nil:
			gone = append(gone, fmt.Sprintf("%s unusable: %v", name, err))
		default:
			if !cgroupLinkAttached(l) {
				gone = append(gone, name+" detached")
			}
			l.Close()
		}
	}
	sort.Strings(gone)
	return gone
}

// CgroupPath is where AttachCgroup last attached the socket hooks.
func (d *Datapath) CgroupPath() string { return d.cgroup }

// cgroupLinkAttached: a detached cgroup link reports cgroup id 0.
func cgroupLinkAttached(l link.Link) bool {
	info, err := l.Info()
	return err == nil && info.Cgroup() != nil && info.Cgroup().CgroupId != 0
}

// LinksState describes mhbpf's pinned links under pinDir as they are now:
// each pin with its link's id and what it is attached to. Polled, it
// changes when a link is unpinned, detached or replaced, which no netlink
// group announces.
func LinksState(pinDir string) string {
	entries, err := os.ReadDir(linksDir(pinDir))
	if err != nil {
		return "no links: " + err.Error()
	}
	var b strings.Builder
	for _, e := range entries {
		fmt.Fprintf(&b, "%s=", e.Name())
		l, err := link.LoadPinnedLink(filepath.Join(linksDir(pinDir), e.Name()), nil)
		if err != nil {
			b.WriteString("? ")
			continue
		}
		info, err := l.Info()
		l.Close()
		switch {
		case err != nil:
			b.WriteString("? ")
		case info.TCX() != nil:
			fmt.Fprintf(&b, "%d@if%d ", info.ID, info.TCX().Ifindex)
		case info.Cgroup() != nil:
			fmt.Fprintf(&b, "%d@cg%d ", info.ID, info.Cgroup().CgroupId)
		default:
			fmt.Fprintf(&b, "%d ", info.ID)
		}
	}
	return b.String()
}
