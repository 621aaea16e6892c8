package loader

import (
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/rlimit"
)

// ProgramStats is the verifier's view of one program on this kernel.
type ProgramStats struct {
	Object, Program string
	// Insns is the instructions the verifier processed (its limit is a
	// million); States the states it kept.
	Insns, States int
	// Time is how long the load took, verification most of it.
	Time time.Duration
}

var (
	processedRE = regexp.MustCompile(`processed (\d+) insns`)
	statesRE    = regexp.MustCompile(`total_states (\d+)`)
)

// VerifierStats loads the objects this kernel gets (as Load picks them),
// each program on its own with unpinned maps, and reports what the
// verifier says of each: the programs nearest a limit show here before a
// change breaks an old kernel.
func VerifierStats() ([]ProgramStats, error) {
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("remove memlock limit: %w", err)
	}
	feat, err := ProbeFeatures()
	if err != nil {
		return nil, err
	}
	uplink, lan, sock, err := loadSpecs(feat)
	if err != nil {
		return nil, err
	}
	if err := setFeatureVariables([]*ebpf.CollectionSpec{uplink, lan, sock}, feat); err != nil {
		return nil, err
	}
	var out []ProgramStats
	for _, o := range []struct {
		name string
		spec *ebpf.CollectionSpec
	}{{"uplink", uplink}, {"lan", lan}, {"sock", sock}} {
		names := make([]string, 0, len(o.spec.Programs))
		for n := range o.spec.Programs {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			one := o.spec.Copy()
			for other := range one.Programs {
				if other != n {
					delete(one.Programs, other)
				}
			}
			start := time.Now()
			coll, err := ebpf.NewCollectionWithOptions(one, ebpf.CollectionOptions{Programs: ebpf.ProgramOptions{LogLevel: ebpf.LogLevelStats}})
			took := time.Since(start)
			if err != nil {
				return out, loadError(o.name, err)
			}
			log := coll.Programs[n].VerifierLog
			coll.Close()
			s := ProgramStats{Object: o.name, Program: n, Time: took}
			if m := processedRE.FindStringSubmatch(log); m != nil {
				s.Insns, _ = strconv.Atoi(m[1])
			}
			if m := statesRE.FindStringSubmatch(log); m != nil {
				s.States, _ = strconv.Atoi(m[1])
			}
			if s.Insns == 0 {
				return out, fmt.Errorf("program %s: no instruction count in the verifier log", n)
			}
			out = append(out, s)
		}
	}
	return out, nil
}
