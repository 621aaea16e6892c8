package test

// The Debian package, installed for real on this machine with dpkg and
// purged again: files in place, the unit enabled but not started, the
// example configuration a conffile that 'mhbpf check' accepts, man pages
// and completions generated from the commands; remove keeps only the
// edited conffile (and a reinstall keeps the edit), purge removes that too
// and the unit's enablement; the machine is left as found.

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mhbpf/mhbpf/internal/daemontest"
	"github.com/mhbpf/mhbpf/internal/testutil"
)

// debFiles are paths the package must install (and purge must remove).
var debFiles = []string{
	"/usr/bin/mhbpf",
	"/lib/systemd/system/mhbpf.service",
	"/usr/share/bash-completion/completions/mhbpf",
	"/usr/share/zsh/vendor-completions/_mhbpf",
	"/usr/share/man/man1/mhbpf.1.gz",
	"/usr/share/man/man1/mhbpf-explain.1.gz",
	"/usr/share/man/man1/mhbpf-flows-flush.1.gz",
	"/usr/share/doc/mhbpf/README.md",
	"/usr/share/doc/mhbpf/cli.md",
}

const enabledLink = "/etc/systemd/system/multi-user.target.wants/mhbpf.service"

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestDebianPackageInstallsAndPurges(t *testing.T) {
	testutil.RequireRoot(t)
	// Never over someone's installation.
	if out, err := exec.Command("dpkg-query", "-W", "-f=${Status}", "mhbpf").CombinedOutput(); err == nil && strings.Contains(string(out), "installed") {
		t.Fatalf("package mhbpf is installed on this machine (%s): this test installs and purges it, and will not touch that one", out)
	}
	for _, p := range append(append([]string{}, debFiles...), "/etc/mhbpf", enabledLink) {
		if _, err := os.Lstat(p); err == nil {
			t.Fatalf("%s exists before the test: not touching this machine's mhbpf", p)
		}
	}
	outDir := t.TempDir()
	deb := strings.TrimSpace(run(t, "../scripts/mkdeb.sh", daemontest.Binary(t), outDir))
	t.Cleanup(func() {
		// Whatever happened, the machine goes back as it was.
		_ = exec.Command("dpkg", "--purge", "mhbpf").Run()
		_ = os.RemoveAll("/etc/mhbpf")
	})
	wantsBefore, _ := os.ReadDir(filepath.Dir(enabledLink))
	run(t, "dpkg", "-i", deb)

	for _, p := range debFiles {
		if fi, err := os.Stat(p); err != nil || fi.Size() == 0 {
			t.Errorf("installed: %s: %v", p, err)
		}
	}
	if unit := run(t, "cat", "/lib/systemd/system/mhbpf.service"); !strings.Contains(unit, "ExecStart=/usr/bin/mhbpf run --config /etc/mhbpf/mhbpf.toml") {
		t.Errorf("the packaged unit does not run /usr/bin/mhbpf:\n%s", unit)
	}
	if dst, err := os.Readlink(enabledLink); err != nil || dst != "/lib/systemd/system/mhbpf.service" {
		t.Errorf("unit not enabled: %s -> %q, %v", enabledLink, dst, err)
	}
	// Enabled, not started: no daemon, no status.
	if out, err := exec.Command("pgrep", "-x", "-f", "/usr/bin/mhbpf run --config /etc/mhbpf/mhbpf.toml").CombinedOutput(); err == nil {
		t.Errorf("the daemon was started on install: %s", out)
	}
	if conf := run(t, "dpkg-query", "-W", "-f=${Conffiles}", "mhbpf"); !strings.Contains(conf, "/etc/mhbpf/mhbpf.toml") {
		t.Errorf("not a conffile: %q", conf)
	}
	if out := run(t, "/usr/bin/mhbpf", "check", "/etc/mhbpf/mhbpf.toml"); !strings.Contains(out, "ok: 3 uplinks, 1 LAN interfaces, 4 policies") {
		t.Errorf("mhbpf check of the example: %s", out)
	}
	if out := run(t, "sh", "-c", "zcat /usr/share/man/man1/mhbpf-explain.1.gz"); !strings.Contains(out, "BPF_PROG_TEST_RUN") || !strings.Contains(out, "--src") {
		t.Errorf("man page of explain is not the command's help:\n%s", out)
	}
	if b, _ := os.ReadFile("/usr/share/bash-completion/completions/mhbpf"); !strings.Contains(string(b), "__start_mhbpf") {
		t.Error("bash completion is not cobra's")
	}
	if b, _ := os.ReadFile("/usr/share/zsh/vendor-completions/_mhbpf"); !strings.HasPrefix(string(b), "#compdef mhbpf") {
		t.Error("zsh completion is not cobra's")
	}

	// The administrator edits the configuration, then removes the
	// package: everything goes but the edited conffile.
	const edit = "# edited by the administrator\n"
	f, err := os.OpenFile("/etc/mhbpf/mhbpf.toml", os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = f.WriteString(edit)
	f.Close()
	t.Logf("dpkg -r mhbpf:\n%s", run(t, "dpkg", "-r", "mhbpf"))
	for _, p := range debFiles {
		if _, err := os.Lstat(p); err == nil {
			t.Errorf("remove left %s", p)
		}
	}
	if b, err := os.ReadFile("/etc/mhbpf/mhbpf.toml"); err != nil || !strings.HasSuffix(string(b), edit) {
		t.Errorf("remove took the edited conffile: %v", err)
	}
	// Installed again, the administrator's version stays.
	run(t, "dpkg", "-i", deb)
	if b, err := os.ReadFile("/etc/mhbpf/mhbpf.toml"); err != nil || !strings.HasSuffix(string(b), edit) {
		t.Errorf("reinstalling replaced the edited conffile: %v", err)
	}

	// Purge removes everything, the conffile too (dpkg's rule, edited or
	// not), and the unit's enablement and mask.
	t.Logf("dpkg --purge mhbpf:\n%s", run(t, "dpkg", "--purge", "mhbpf"))
	for _, p := range append(append([]string{}, debFiles...), enabledLink, "/etc/systemd/system/mhbpf.service", "/usr/share/doc/mhbpf", "/etc/mhbpf") {
		if _, err := os.Lstat(p); err == nil {
			t.Errorf("purge left %s", p)
		}
	}
	if out, err := exec.Command("dpkg-query", "-W", "mhbpf").CombinedOutput(); err == nil {
		t.Errorf("dpkg still knows the package: %s", out)
	}
	wantsAfter, _ := os.ReadDir(filepath.Dir(enabledLink))
	if len(wantsAfter) != len(wantsBefore) {
		t.Errorf("multi-user.target.wants: %d entries before, %d after", len(wantsBefore), len(wantsAfter))
	}
}
