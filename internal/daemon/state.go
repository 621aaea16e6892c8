package daemon

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
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
	Updated time.Time      `json:"updated"`
	PID     int            `json:"pid"`
	TCMode  string         `json:"tc_mode"`
	Uplinks []UplinkStatus `json:"uplinks"`
}

type UplinkStatus struct {
	Name      string   `json:"name"`
	Interface string   `json:"interface"`
	Usable    bool     `json:"usable"`
	Reason    string   `json:"reason,omitempty"`
	Addresses []string `json:"addresses,omitempty"`
	Probed    bool     `json:"probed"` // health checks configured and run
	RTTms     float64  `json:"rtt_ms,omitempty"`
	Loss      float64  `json:"loss,omitempty"`
	Weight    uint16   `json:"weight"`
	Mark      uint32   `json:"mark"`
	Table     int      `json:"table"`
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
	return s, err
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
