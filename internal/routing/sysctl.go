package routing

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/mhbpf/mhbpf/internal/statefile"
)

// Sysctls are settings under /proc/sys, by dotted name.
type Sysctls map[string]string

// RPFilterNotStrict is what DesiredSysctls wants of an uplink's rp_filter:
// loose (2) where the interface would otherwise filter strictly (1, from its
// own setting or from conf.all: the kernel uses the greater), else left as
// found. An answer may arrive on another uplink than main's route back, which
// strict filtering drops; but filtering the admin turned off stays off: the
// loose check is one more FIB lookup, through every rule, on each packet.
// conf.all is never touched: it would change every other interface too (the
// LAN's strict check, a container's veth).
const RPFilterNotStrict = "not strict"

// DesiredSysctls are what the mark scheme needs: forwarding, sockets that
// inherit the mark of the SYN that opened them, kernel replies (ICMP, RST)
// with the mark of what they answer, and uplinks that do not filter
// strictly by reverse path.
func DesiredSysctls(uplinkIfaces []string, ipv6 bool) Sysctls {
	s := Sysctls{
		"net.ipv4.ip_forward":        "1",
		"net.ipv4.tcp_fwmark_accept": "1",
		"net.ipv4.fwmark_reflect":    "1",
		"net.ipv6.fwmark_reflect":    "1",
	}
	for _, i := range uplinkIfaces {
		s["net.ipv4.conf."+i+".rp_filter"] = RPFilterNotStrict
	}
	if ipv6 {
		s["net.ipv6.conf.all.forwarding"] = "1"
	}
	return s
}

func sysctlPath(name string) string {
	// Interface names may hold dots; only the known prefix is split.
	parts := strings.SplitN(name, ".", 4)
	if len(parts) == 4 && parts[2] == "conf" {
		rest := parts[3]
		last := strings.LastIndex(rest, ".")
		return filepath.Join("/proc/sys", parts[0], parts[1], "conf", rest[:last], rest[last+1:])
	}
	return filepath.Join("/proc/sys", strings.ReplaceAll(name, ".", "/"))
}

// ReadSysctl reads one setting.
func ReadSysctl(name string) (string, error) {
	b, err := os.ReadFile(sysctlPath(name))
	return strings.TrimSpace(string(b)), err
}

// WriteSysctl writes one setting.
func WriteSysctl(name, value string) error {
	return os.WriteFile(sysctlPath(name), []byte(value), 0o644)
}

// Saved is what mhbpf found before it changed anything, kept in a state
// file so that 'mhbpf down' restores it even after a crash.
type Saved struct {
	Sysctls Sysctls `json:"sysctls"`
}

// ApplySysctls sets want, first recording in the state file the value each
// setting had before mhbpf first touched it (recorded before written: a
// crash in between leaves nothing 'mhbpf down' would not put back).
// Interfaces that do not exist yet are skipped and tried again on the next
// pass. An rp_filter goes back to its recorded value, and is forgotten, once
// it is not wanted (an uplink taken out of the configuration, the conf.all
// an earlier version set) or would not be strict as found (the admin turned
// conf.all off); the others stay until 'mhbpf down': whether IPv6
// forwarding is wanted follows the uplinks' addresses of the moment, and
// turning it off and on again resets every interface's router behaviour.
func ApplySysctls(stateFile string, want Sysctls) error {
	saved, err := LoadSaved(stateFile)
	if err != nil {
		return err
	}
	changed := false
	var errs []error
	restore := func(n string) {
		if err := WriteSysctl(n, saved.Sysctls[n]); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("restore %s: %w", n, err))
			return
		}
		delete(saved.Sysctls, n)
		changed = true
	}
	// What is no longer wanted first: an earlier version's conf.all is
	// back before the uplinks are judged by it.
	for _, n := range slices.Sorted(maps.Keys(saved.Sysctls)) {
		if _, ok := want[n]; !ok && strings.HasSuffix(n, ".rp_filter") {
			restore(n)
		}
	}
	type write struct{ name, value string }
	var writes []write
	for _, n := range slices.Sorted(maps.Keys(want)) {
		cur, err := ReadSysctl(n)
		if errors.Is(err, os.ErrNotExist) {
			continue // an interface that is not there yet
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		found, recorded := saved.Sysctls[n]
		value := want[n]
		if value == RPFilterNotStrict {
			if !recorded {
				found = cur
			}
			strict, err := rpFilterStrict(found)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			if !strict {
				if recorded {
					restore(n) // as found is not strict (any more)
				}
				continue // as the admin has it: not ours
			}
			value = "2"
		}
		if !recorded {
			saved.Sysctls[n] = cur
			changed = true
		}
		if cur != value {
			writes = append(writes, write{n, value})
		}
	}
	if changed {
		if err := statefile.Write(stateFile, saved); err != nil {
			// Nothing written that is not recorded.
			return errors.Join(append(errs, fmt.Errorf("record the sysctls as found: %w", err))...)
		}
	}
	for _, w := range writes {
		if err := WriteSysctl(w.name, w.value); err != nil {
			errs = append(errs, fmt.Errorf("set %s: %w", w.name, err))
		}
	}
	return errors.Join(errs...)
}

// rpFilterStrict tells whether an interface whose own rp_filter is value
// filters strictly: the kernel applies the greater of its own value and
// conf.all's.
func rpFilterStrict(value string) (bool, error) {
	all, err := ReadSysctl("net.ipv4.conf.all.rp_filter")
	if err != nil {
		return false, err
	}
	return max(value, all) == "1", nil // single digits 0-2: compare as text
}

// RestoreSysctls puts back what the state file recorded and removes it.
func RestoreSysctls(stateFile string) error {
	saved, err := LoadSaved(stateFile)
	if err != nil {
		return err
	}
	var errs []error
	for n, v := range saved.Sysctls {
		if err := WriteSysctl(n, v); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("restore %s: %w", n, err))
		}
	}
	if len(errs) == 0 {
		if err := os.Remove(stateFile); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// LoadSaved reads the state file; a missing file is an empty state.
func LoadSaved(stateFile string) (*Saved, error) {
	s := &Saved{Sysctls: Sysctls{}}
	err := statefile.Read(stateFile, s)
	if errors.Is(err, os.ErrNotExist) {
		return s, nil
	}
	if err != nil {
		return nil, fmt.Errorf("state file %s: %w", stateFile, err)
	}
	if s.Sysctls == nil {
		s.Sysctls = Sysctls{}
	}
	return s, nil
}
