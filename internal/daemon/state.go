package daemon

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mhbpf/mhbpf/internal/config"
	"github.com/mhbpf/mhbpf/internal/statefile"
)

// Files in the state directory.
const (
	sysctlFile   = "sysctls.json"  // what the system had before mhbpf
	settingsFile = "settings.json" // what 'mhbpf down' needs without a config
	statusFile   = "status.json"   // what 'mhbpf status' shows
	routesFile   = "routes.json"   // routes of others that mhbpf replaced
	// identitiesFile (identity.go) holds the uplinks' slots, marks, tables.
)

// Settings are the parts of the configuration that locate everything mhbpf
// installed. The daemon writes them before it changes anything, so that
// 'mhbpf down' after a crash finds exactly what to remove.
type Settings struct {
	PinDir        string `json:"pin_dir"`
	RulePriority  int    `json:"rule_priority"`
	RouteProtocol int    `json:"route_protocol"`
	NFTable       string `json:"nft_table"`
}

func settingsOf(c *config.Config) Settings {
	return Settings{PinDir: c.Global.PinDir, RulePriority: c.Global.RulePriority,
		RouteProtocol: c.Global.RouteProtocol, NFTable: c.Global.NFTable}
}

// DefaultSettings are used by 'mhbpf down' when there is neither a state
// file nor a config.
func DefaultSettings() Settings {
	return Settings{PinDir: config.DefaultPinDir, RulePriority: config.DefaultRulePriority,
		RouteProtocol: config.DefaultRouteProtocol, NFTable: config.DefaultNFTable}
}

// Status is the daemon's view for the CLI.
type Status struct {
	Updated time.Time `json:"updated"`
	PID     int       `json:"pid"`
	// State is StateConverging until the first full pass is done (then
	// the daemon tells systemd it is ready), StateRunning from then on.
	State  string `json:"state"`
	TCMode string `json:"tc_mode"`
	// ProbeFallback: every probed uplink is failing at once; uplinks are
	// used by their link state.
	ProbeFallback bool `json:"probe_fallback,omitempty"`
	// Passes: reconciliation passes since the daemon started.
	Passes  uint64         `json:"passes,omitempty"`
	Uplinks []UplinkStatus `json:"uplinks"` // in preference order
	// Policies names the [[policy]] rules in order: the datapath knows
	// rule i as policy id i+1 (0 is the default balance).
	Policies []string `json:"policies,omitempty"`
	// The daemon's resident memory (VmRSS) and its peak (VmHWM) at this
	// pass, and the kernel memory of the installed policy's tables.
	ResidentBytes     uint64 `json:"resident_bytes,omitempty"`
	PeakResidentBytes uint64 `json:"peak_resident_bytes,omitempty"`
	PolicyKernelBytes uint64 `json:"policy_kernel_bytes,omitempty"`
}

func policyNames(c *config.Config) []string {
	var names []string
	for _, p := range c.Policies {
		names = append(names, p.Name)
	}
	return names
}

// Status.State values. A status without one is of a daemon that wrote its
// status only after a pass: running.
const (
	StateConverging = "converging"
	StateRunning    = "running"
)

type UplinkStatus struct {
	Name      string   `json:"name"`
	Interface string   `json:"interface"`
	ID        int      `json:"id"` // its slot in the datapath's maps (flows name it by this)
	Usable    bool     `json:"usable"`
	Reason    string   `json:"reason,omitempty"`
	Addresses []string `json:"addresses,omitempty"`
	Probed    bool     `json:"probed"` // health checks configured and run
	RTTms     float64  `json:"rtt_ms,omitempty"`
	Loss      float64  `json:"loss,omitempty"`
	Weight    uint16   `json:"weight"`
	Mark      uint32   `json:"mark"`
	Table     int      `json:"table"`
	// StateChanges: times it went in or out of use since the daemon
	// started.
	StateChanges uint64 `json:"state_changes"`
}

// LoadSettings reads the settings a daemon left in stateDir.
func LoadSettings(stateDir string) (Settings, error) {
	s := DefaultSettings()
	err := statefile.Read(filepath.Join(stateDir, settingsFile), &s)
	if errors.Is(err, os.ErrNotExist) {
		return DefaultSettings(), err
	}
	return s, err
}

// LoadStatus reads the status the daemon last wrote.
func LoadStatus(stateDir string) (Status, error) {
	var s Status
	err := statefile.Read(filepath.Join(stateDir, statusFile), &s)
	if err == nil && s.State == "" {
		s.State = StateRunning
	}
	return s, err
}

// convergingStatus is the status before the first pass: the uplinks as
// configured, nothing observed yet.
func (d *Daemon) convergingStatus() Status {
	st := Status{Updated: time.Now(), PID: os.Getpid(), State: StateConverging}
	for _, u := range d.cfg.Uplinks {
		st.Uplinks = append(st.Uplinks, UplinkStatus{Name: u.Name, Interface: u.Interface, ID: u.ID,
			Reason: "not observed yet (first pass)", Weight: u.Weight, Mark: u.Mark, Table: u.Table})
	}
	return st
}

// lockStateDir takes the state directory's lock (released when the process
// ends, however it ends), or says which process holds it.
func lockStateDir(dir string) (func(), error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	path := filepath.Join(dir, "lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		b, _ := os.ReadFile(path)
		f.Close()
		return nil, fmt.Errorf("another mhbpf daemon (pid %s) runs with state directory %s", strings.TrimSpace(string(b)), dir)
	}
	_ = f.Truncate(0)
	_, _ = f.WriteAt([]byte(fmt.Sprintf("%d\n", os.Getpid())), 0)
	return func() { f.Close() }, nil
}

// RunningError says that a daemon holds the state directory's lock.
type RunningError struct {
	PID      int // 0: unknown (the holder has not written it yet)
	StateDir string
}

func (e *RunningError) Error() string {
	pid := "unknown"
	if e.PID > 0 {
		pid = strconv.Itoa(e.PID)
	}
	return fmt.Sprintf("a daemon (pid %s) is running with state directory %s; stop it first or use --stop", pid, e.StateDir)
}

// LockForDown takes the state directory's lock for 'mhbpf down', so that
// no daemon puts back what it removes, nor starts while it runs. A daemon
// holding the lock is a *RunningError. A state directory that does not
// exist has no daemon (and is not created): the returned func is a no-op.
func LockForDown(dir string) (func(), error) {
	f, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_RDWR|os.O_CREATE, 0o644)
	if errors.Is(err, os.ErrNotExist) {
		return func() {}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if !errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("lock %s: %w", f.Name(), err)
		}
		return nil, &RunningError{PID: holderPID(dir), StateDir: dir}
	}
	// The pid in the file names the holder, for a daemon refused meanwhile.
	_ = f.Truncate(0)
	_, _ = f.WriteAt([]byte(fmt.Sprintf("%d\n", os.Getpid())), 0)
	return func() { f.Close() }, nil
}

// holderPID reads the pid the lock's holder wrote (it writes it right
// after taking the lock: a moment is allowed for that).
func holderPID(dir string) int {
	for range 20 {
		b, _ := os.ReadFile(filepath.Join(dir, "lock"))
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 {
			return pid
		}
		time.Sleep(10 * time.Millisecond)
	}
	return 0
}

// StopDaemon sends SIGTERM to the daemon that holds dir's lock and waits,
// up to wait, for the lock to be free; then it holds it, as LockForDown.
func StopDaemon(dir string, wait time.Duration) (func(), error) {
	unlock, err := LockForDown(dir)
	var running *RunningError
	if !errors.As(err, &running) {
		return unlock, err // nothing to stop, or another failure
	}
	if running.PID <= 0 {
		return nil, fmt.Errorf("a daemon holds the lock of state directory %s but wrote no pid: cannot stop it", dir)
	}
	if err := syscall.Kill(running.PID, syscall.SIGTERM); err != nil {
		return nil, fmt.Errorf("stop the daemon (pid %d): %w", running.PID, err)
	}
	deadline := time.Now().Add(wait)
	for {
		unlock, err = LockForDown(dir)
		if !errors.As(err, &running) {
			return unlock, err
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("the daemon (pid %d) did not stop within %v after SIGTERM; state directory %s is still locked", running.PID, wait, dir)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
