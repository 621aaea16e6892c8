package maps

import (
	"errors"

	"github.com/cilium/ebpf"

	"github.com/mhbpf/mhbpf/bpf"
)

// Remark says which mark a flow gets from now on (its own when nothing
// changes).
type Remark func(f Flow) uint32

// RetireUplinks forgets every slot that gone says is no longer its
// uplink's: its flows, the remote endpoints and sticky choices that name
// it, its counters; and it gives the remaining flows the mark remark
// says, in one walk of the flow map. (The slot's entry in the uplinks map
// is the caller's: ClearUplink.) A flow the programs update meanwhile may
// lose those few packets from its counters; a flow that ends meanwhile is
// not brought back.
func (m *Maps) RetireUplinks(gone func(id int) bool, remark Remark) (deleted, remarked int, err error) {
	var errs []error
	var drop []FlowKey
	var changes []Flow
	_, err = m.lanFlows().walk(func(f Flow) bool {
		if gone(f.Uplink) {
			drop = append(drop, f.Key)
		} else if mark := remark(f); mark != f.Mark {
			f.Mark = mark
			changes = append(changes, f)
		}
		return true
	})
	errs = append(errs, err)
	for _, k := range drop {
		if err := m.lanFlows().delete(k); err == nil {
			deleted++
		} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, err)
		}
	}
	for _, f := range changes {
		mp, bk := m.lanFlows().mapAndKey(f.Key)
		if err := mp.Update(bk, encodeFlow(f), ebpf.UpdateExist); err == nil {
			remarked++
		} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, err)
		}
	}

	// Inbound records (remote peers' flows, port-forward answers) carry no
	// fallback bits: only those of a gone slot go.
	var idrop []FlowKey
	_, err = m.inboundFlows().walk(func(f Flow) bool {
		if gone(f.Uplink) {
			idrop = append(idrop, f.Key)
		}
		return true
	})
	errs = append(errs, err)
	for _, k := range idrop {
		if err := m.inboundFlows().delete(k); err == nil {
			deleted++
		} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, err)
		}
	}

	_, err = m.deleteRemotesOf(gone)
	errs = append(errs, err)

	var sk bpf.UplinkStickyKey
	var sv bpf.UplinkStickyEntry
	var skeys []bpf.UplinkStickyKey
	for sit := m.Sticky.Iterate(); sit.Next(&sk, &sv); {
		if gone(int(sv.Uplink)) {
			skeys = append(skeys, sk)
		}
	}
	for i := range skeys {
		errs = append(errs, ignoreNotExist(m.Sticky.Delete(&skeys[i])))
	}

	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		errs = append(errs, err)
	} else {
		zero := make([]bpf.UplinkUplinkCounters, ncpu)
		for id := 0; id < MaxUplinks; id++ {
			if gone(id) {
				errs = append(errs, m.Counters.Put(uint32(id), zero))
			}
		}
	}
	return deleted, remarked, errors.Join(errs...)
}
