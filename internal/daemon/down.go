package daemon

import (
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"

	"github.com/vishvananda/netlink"

	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/nat"
	"github.com/mhbpf/mhbpf/internal/routing"
)

// Down removes everything mhbpf installed, as recorded in stateDir (or
// per s when given), puts back the routes of others it replaced and
// restores the sysctls it changed. Idempotent; needs no running daemon,
// and must not race one: the caller holds the state directory's lock
// (LockForDown) or is the daemon itself. Rules and routes are found by
// mhbpf's protocol wherever they are, so an install whose settings are
// lost with the state directory is removed too.
func Down(stateDir string, s Settings, log *slog.Logger) error {
	var errs []error
	h, err := netlink.NewHandle()
	if err != nil {
		return err
	}
	defer h.Close()
	if err := routing.RemoveAll(h, routing.Settings{RulePriority: s.RulePriority, RouteProtocol: s.RouteProtocol}); err != nil {
		errs = append(errs, fmt.Errorf("routes and rules: %w", err))
	}
	// Only once mhbpf's routes are gone is the slot of each free again.
	if err := routing.RestoreSaved(h, filepath.Join(stateDir, routesFile), log); err != nil {
		errs = append(errs, fmt.Errorf("replaced routes: %w", err))
	}
	if err := nat.Remove(s.NFTable); err != nil {
		errs = append(errs, err)
	}
	if err := loader.Remove(s.PinDir); err != nil {
		errs = append(errs, fmt.Errorf("datapath: %w", err))
	}
	if err := routing.RestoreSysctls(filepath.Join(stateDir, sysctlFile)); err != nil {
		errs = append(errs, fmt.Errorf("sysctls: %w", err))
	}
	if len(errs) == 0 {
		for _, f := range []string{settingsFile, statusFile, identitiesFile} {
			_ = removeIfExists(filepath.Join(stateDir, f))
		}
	}
	return errors.Join(errs...)
}
