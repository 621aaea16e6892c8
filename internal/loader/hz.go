package loader

import (
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// The programs tell a second from jiffies (bpf_jiffies64, which the
// verifier inlines to one load: reading a clock per packet cost a tenth of
// a known flow), so they need the kernel's HZ, which user space cannot ask
// for. It is measured: a program that returns jiffies runs twice, a tenth
// of a second apart, once per process.
var hz struct {
	once sync.Once
	v    uint32
	err  error
}

// kernelHZ is the kernel's CONFIG_HZ: the measured rate, snapped to the
// nearest value Linux offers when it is within 10% of one.
func kernelHZ() (uint32, error) {
	hz.once.Do(func() { hz.v, hz.err = measureHZ(100 * time.Millisecond) })
	return hz.v, hz.err
}

func measureHZ(span time.Duration) (uint32, error) {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.FnJiffies64.Call(), asm.Return()}})
	if err != nil {
		return 0, fmt.Errorf("measure HZ: %w", err)
	}
	defer prog.Close()
	pkt := make([]byte, 14)
	jiffies := func() (uint32, time.Time, error) {
		t := time.Now()
		j, err := prog.Run(&ebpf.RunOptions{Data: pkt})
		return j, t, err
	}
	j0, t0, err := jiffies()
	if err != nil {
		return 0, fmt.Errorf("measure HZ: %w", err)
	}
	time.Sleep(span)
	j1, t1, err := jiffies()
	if err != nil {
		return 0, fmt.Errorf("measure HZ: %w", err)
	}
	rate := float64(j1-j0) / t1.Sub(t0).Seconds()
	for _, v := range []float64{100, 250, 300, 1000} {
		if math.Abs(rate-v) <= v/10 {
			return uint32(v), nil
		}
	}
	if rate < 1 {
		return 0, fmt.Errorf("measure HZ: jiffies moved %d in %v", j1-j0, t1.Sub(t0))
	}
	return uint32(math.Round(rate)), nil
}
