package loader

import (
	"errors"
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
)

// Remove takes away everything mhbpf attached and pinned under pinDir, in
// the current network namespace: tcx and cgroup links, cls_bpf filters (and
// the clsact qdiscs mhbpf created), maps. It needs no running daemon and no
// loaded Datapath, so it works after a crash; removing nothing is no error.
func Remove(pinDir string) error {
	if !exists(pinDir) {
		return nil
	}
	var errs []error
	entries, _ := os.ReadDir(linksDir(pinDir))
	for _, e := range entries {
		errs = append(errs, unpinLink(filepath.Join(linksDir(pinDir), e.Name())))
	}

	// cls_bpf filters have no pin: find them on every interface that has
	// one (a marker says mhbpf created its qdisc), plus every interface
	// whose filter carries mhbpf's name.
	links, err := netlink.LinkList()
	if err != nil {
		errs = append(errs, err)
	}
	for _, l := range links {
		errs = append(errs, detachClsact(pinDir, l.Attrs().Name, l.Attrs().Index))
	}
	// Markers of interfaces that are gone.
	top, _ := os.ReadDir(pinDir)
	for _, e := range top {
		if strings.HasPrefix(e.Name(), "qdisc-") {
			_ = os.Remove(filepath.Join(pinDir, e.Name()))
		}
	}
	if err := os.RemoveAll(pinDir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
