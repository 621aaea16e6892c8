package daemontest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// Binary is MHBPF_BIN, or cmd/mhbpf built once per test binary: the daemon
// runs as a real process, so that signals, crashes and restarts are real.
// A TestMain that lets Binary build calls RemoveBinary after its tests.
func Binary(tb testing.TB) string {
	tb.Helper()
	if bin := os.Getenv("MHBPF_BIN"); bin != "" {
		return bin // built outside, as for the VM suite (no compiler run under emulation)
	}
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "mhbpf-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "mhbpf")
		// By import path: the package's own directory does not matter.
		out, err := exec.Command("go", "build", "-o", binPath, "github.com/mhbpf/mhbpf/cmd/mhbpf").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		tb.Fatal(buildErr)
	}
	return binPath
}

// RemoveBinary removes what Binary built, if it built anything.
func RemoveBinary() {
	if binPath != "" {
		_ = os.RemoveAll(filepath.Dir(binPath))
	}
}
