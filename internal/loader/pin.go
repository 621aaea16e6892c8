package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/maps"
)

// Everything mhbpf pins lives below one directory on bpffs:
//
//	PinDir/maps/<map name>        every map (the flows survive restarts here)
//	PinDir/links/tc-<ifname>      tcx ingress link of an interface
//	PinDir/links/tce-<ifname>     tcx egress link of a LAN interface
//	PinDir/links/cgroup-<hook>    cgroup socket hook links
//	PinDir/qdisc-<ifname>/        marker (empty dir): mhbpf created this clsact qdisc
const DefaultPinDir = "/sys/fs/bpf/mhbpf"

const bpffsRoot = "/sys/fs/bpf"

func mapsDir(pinDir string) string  { return filepath.Join(pinDir, "maps") }
func linksDir(pinDir string) string { return filepath.Join(pinDir, "links") }
func tcLinkPin(pinDir, ifname string, dir direction) string {
	if dir == egress {
		return filepath.Join(linksDir(pinDir), "tce-"+ifname)
	}
	return filepath.Join(linksDir(pinDir), "tc-"+ifname)
}
func cgroupLinkPin(pinDir, hook string) string {
	return filepath.Join(linksDir(pinDir), "cgroup-"+hook)
}
func qdiscMarker(pinDir, ifname string) string {
	return filepath.Join(pinDir, "qdisc-"+ifname)
}

// preparePinDir makes sure pinDir exists on a bpffs, mounting bpffs at
// /sys/fs/bpf when nothing is mounted there and pinDir is below it.
func preparePinDir(pinDir string) error {
	parent := filepath.Dir(filepath.Clean(pinDir))
	if !onBPFFS(parent) {
		if parent != bpffsRoot && !isBelow(parent, bpffsRoot) {
			return fmt.Errorf("pin directory %s: %s is not on a bpf filesystem", pinDir, parent)
		}
		if err := os.MkdirAll(bpffsRoot, 0o755); err != nil {
			return err
		}
		if !onBPFFS(bpffsRoot) {
			if err := unix.Mount("bpf", bpffsRoot, "bpf", 0, "mode=0700"); err != nil {
				return fmt.Errorf("mount bpffs at %s: %w", bpffsRoot, err)
			}
		}
		if !onBPFFS(parent) {
			return fmt.Errorf("pin directory %s: %s is not on a bpf filesystem", pinDir, parent)
		}
	}
	for _, d := range []string{pinDir, mapsDir(pinDir), linksDir(pinDir)} {
		if err := os.Mkdir(d, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return err
		}
	}
	return nil
}

func onBPFFS(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && st.Type == unix.BPF_FS_MAGIC
}

func isBelow(path, root string) bool {
	rel, err := filepath.Rel(root, path)
	return err == nil && rel != "." && !filepath.IsAbs(rel) && rel[:min(2, len(rel))] != ".."
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

// OpenPinned opens the pinned maps under pinDir without loading programs:
// what the CLI needs to show flows whether or not a daemon runs.
func OpenPinned(pinDir string) (*maps.Maps, error) {
	if !exists(mapsDir(pinDir)) {
		return nil, fmt.Errorf("no mhbpf datapath pinned at %s", pinDir)
	}
	m := &maps.Maps{}
	for name, dst := range map[string]**ebpf.Map{
		"flows4": &m.Flows4, "flows6": &m.Flows6, "remotes": &m.Remotes, "uplinks": &m.Uplinks, "iface_slots": &m.IfaceSlots, "ifaces": &m.Ifaces,
		"policy_generation": &m.PolicyGeneration, "policy_meta": &m.PolicyMeta, "policy_rules": &m.PolicyRules,
		"policy_ranges_dst4": &m.PolicyRangesDst4, "policy_ranges_src4": &m.PolicyRangesSrc4, "policy_ranges_dst6": &m.PolicyRangesDst6,
		"policy_ranges_src6": &m.PolicyRangesSrc6, "bypass4": &m.Bypass4, "bypass6": &m.Bypass6,
		"sticky": &m.Sticky, "counters": &m.Counters, "inbound4": &m.Inbound4, "inbound6": &m.Inbound6, "inbound_guards": &m.InboundGuards,
	} {
		mp, err := ebpf.LoadPinnedMap(filepath.Join(mapsDir(pinDir), name), nil)
		if err != nil {
			m.Close()
			if errors.Is(err, os.ErrNotExist) {
				return nil, fmt.Errorf("no mhbpf datapath pinned at %s (map %s missing)", pinDir, name)
			}
			return nil, fmt.Errorf("open pinned map %s: %w", name, err)
		}
		*dst = mp
	}
	return m, nil
}

// Cgroup2Root finds where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup
// on most systems, /sys/fs/cgroup/unified on hybrid ones.
func Cgroup2Root() (string, error) {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && f[2] == "cgroup2" {
			return f[1], nil
		}
	}
	return "", errors.New("no cgroup v2 mount found (set global.cgroup)")
}
