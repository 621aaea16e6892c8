package config

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestScenarioConfig(t *testing.T) {
	c, err := Parse("scenario.toml", Scenario)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Uplinks) != 3 || c.Uplinks[0].Name != "isp1" || c.Uplinks[0].Weight != 8 || c.Uplinks[1].Weight != 2 {
		t.Fatalf("uplinks %+v", c.Uplinks)
	}
	if c.Uplinks[0].Mark != 0x10000 || c.Uplinks[1].Mark != 0x20000 || c.Uplinks[2].Mark != 0x40000 || c.Global.StrictMark != 0x800000 {
		t.Fatalf("marks %#x %#x %#x strict %#x", c.Uplinks[0].Mark, c.Uplinks[1].Mark, c.Uplinks[2].Mark, c.Global.StrictMark)
	}
	if c.Uplinks[2].Balance || !c.Uplinks[0].Balance {
		t.Fatal("vpn must be out of the balance, isp1 in it")
	}
	smtp := c.Policies[0]
	if smtp.Protocol != 6 || len(smtp.Ports) != 3 || !smtp.Unreachable || smtp.Uplinks[0] != 0 {
		t.Fatalf("smtp policy %+v", smtp)
	}
	if h := c.Uplinks[0].Health; h == nil || h.Timeout != 800*time.Millisecond || h.Failures != 3 {
		t.Fatalf("health %+v", h)
	}
}

const base = `[global]
mark_mask = 0x00ff0000

[[uplink]]
name = "isp1"
interface = "ppp0"
weight = 8

[[uplink]]
name = "isp2"
interface = "ppp1"
weight = 2
`

func TestBadConfigNamesKeyAndLine(t *testing.T) {
	for _, tc := range []struct {
		name, extra   string
		key, msg      string
		line          int
		replaceInBase [2]string
	}{
		{name: "unknown key", extra: "\n[[uplink]]\nname = \"vpn\"\ninterface = \"tun0\"\nweigth = 3\n",
			key: "uplink[2].weigth", msg: "unknown key", line: 17},
		{name: "unknown top-level key", extra: "\n[gloabl]\nx = 1\n", key: "gloabl", msg: "unknown key", line: 14},
		{name: "wrong type", extra: "", replaceInBase: [2]string{"weight = 8", `weight = "eight"`},
			key: "uplink[0].weight", msg: "type string", line: 7},
		{name: "duplicate uplink", extra: "\n[[uplink]]\nname = \"isp1\"\ninterface = \"ppp5\"\n",
			key: "uplink[2].name", msg: "defined twice", line: 15},
		{name: "interface twice", extra: "\n[[uplink]]\nname = \"vpn\"\ninterface = \"ppp0\"\n",
			key: "uplink[2].interface", msg: "used by uplink[0]", line: 16},
		{name: "table twice", replaceInBase: [2]string{"weight = 2", "weight = 2\ntable = 100"},
			extra: "\n[[uplink]]\nname = \"vpn\"\ninterface = \"tun0\"\ntable = 100\n",
			key:   "uplink[2].table", msg: "used by uplink[1]", line: 18},
		{name: "mark twice", replaceInBase: [2]string{"weight = 2", "weight = 2\nmark = 0x20000"},
			extra: "\n[[uplink]]\nname = \"vpn\"\ninterface = \"tun0\"\nmark = 0x20000\n",
			key:   "uplink[2].mark", msg: "used by uplink[1]", line: 18},
		{name: "more uplinks than tables", replaceInBase: [2]string{"mark_mask = 0x00ff0000", "mark_mask = 0x00ff0000\ntables = [100, 100]"},
			key: "global.tables", msg: "2 uplinks, but global.tables 100-100 has 1 tables", line: 3},
		{name: "mark outside mask", replaceInBase: [2]string{"weight = 8", "weight = 8\nmark = 0x1"},
			key: "uplink[0].mark", msg: "single bit of mark_mask", line: 8},
		{name: "weight 0 balanced", replaceInBase: [2]string{"weight = 2", "weight = 0"},
			key: "uplink[1].weight", msg: "weight 0 in a balanced tier", line: 12},
		{name: "lan is an uplink", extra: "\n[lan]\ninterfaces = [\"ppp1\"]\n",
			key: "lan.interfaces", msg: "uplink isp2's interface", line: 15},
		{name: "bad prefix", extra: "\n[lan]\nbypass = [\"100.64.2.1/24\"]\n",
			key: "lan.bypass", msg: "host bits", line: 15},
		{name: "policy unknown uplink", extra: "\n[[policy]]\nname = \"x\"\nuplinks = [\"isp3\"]\n",
			key: "policy[0].uplinks", msg: "no uplink named \"isp3\"", line: 16},
		{name: "ports without protocol", extra: "\n[[policy]]\nname = \"x\"\nports = [25]\nuplinks = [\"isp1\"]\n",
			key: "policy[0].ports", msg: "need protocol", line: 16},
		{name: "bad port range", extra: "\n[[policy]]\nname = \"x\"\nprotocol = \"tcp\"\nports = [\"90-80\"]\nuplinks = [\"isp1\"]\n",
			key: "policy[0].ports", msg: "bad port", line: 17},
		{name: "bad last resort", extra: "\n[[policy]]\nname = \"x\"\nuplinks = [\"isp1\"]\nlast_resort = \"drop\"\n",
			key: "policy[0].last_resort", msg: "want \"unreachable\"", line: 17},
		{name: "health tcp without port", extra: "", replaceInBase: [2]string{"weight = 2", "weight = 2\n[uplink.health]\nmethod = \"tcp\"\ntargets = [\"192.0.2.1\"]"},
			key: "uplink[1].health.port", msg: "needs a port", line: 13},
		{name: "bad duration", replaceInBase: [2]string{"mark_mask = 0x00ff0000", "mark_mask = 0x00ff0000\nup_delay = \"soon\""},
			key: "global.up_delay", msg: "not a duration", line: 3},
		{name: "syntax", extra: "\n[[uplink]\n", msg: "", line: 14},
		{name: "wrong type in an inline table", replaceInBase: [2]string{"weight = 2", "weight = 2\nhealth = {method = 3, targets = [\"192.0.2.1\"]}"},
			key: "uplink[1].health.method", msg: "value has type integer, want string", line: 13},
		{name: "unknown key in an inline table", replaceInBase: [2]string{"weight = 2", "weight = 2\nhealth = {metod = \"icmp\"}"},
			key: "uplink[1].health.metod", msg: "unknown key", line: 13},
		{name: "wrong element type", replaceInBase: [2]string{"mark_mask = 0x00ff0000", "mark_mask = 0x00ff0000\ntables = [100, \"x\"]"},
			key: "global.tables", msg: "element 1 has type string, want integer", line: 3},
		{name: "key twice", replaceInBase: [2]string{"weight = 8", "weight = 8\nweight = 9"},
			key: "uplink[0].weight", msg: "already defined", line: 8},
		{name: "table of the wrong type", replaceInBase: [2]string{"weight = 2", "weight = 2\ntable = 1.5"},
			key: "uplink[1].table", msg: "must be a number or a name", line: 13},
	} {
		t.Run(tc.name, func(t *testing.T) {
			text := base
			if tc.replaceInBase[0] != "" {
				text = strings.Replace(text, tc.replaceInBase[0], tc.replaceInBase[1], 1)
			}
			text += tc.extra
			_, err := Parse("test.toml", []byte(text))
			var ce *Error
			if !errors.As(err, &ce) {
				t.Fatalf("error %v (%T), want a config.Error", err, err)
			}
			if tc.key != "" && ce.Key != tc.key {
				t.Errorf("key %q, want %q (%v)", ce.Key, tc.key, err)
			}
			if ce.Line != tc.line {
				t.Errorf("line %d, want %d (%v)\n%s", ce.Line, tc.line, err, numbered(text))
			}
			if !strings.Contains(err.Error(), tc.msg) || !strings.HasPrefix(err.Error(), "test.toml:") {
				t.Errorf("message %q, want it to contain %q", err, tc.msg)
			}
		})
	}
}

func numbered(s string) string {
	var b strings.Builder
	for i, l := range strings.Split(s, "\n") {
		fmt.Fprintf(&b, "%3d %s\n", i+1, l)
	}
	return b.String()
}

// The periodic resync is the fallback for drift nothing announces: short
// by default.
func TestResyncDefault(t *testing.T) {
	c, err := Parse("base.toml", []byte(base))
	if err != nil {
		t.Fatal(err)
	}
	if c.Global.ResyncEvery != 10*time.Second {
		t.Fatalf("resync_every defaults to %v, want 10s", c.Global.ResyncEvery)
	}
}

// Prefix lists in files: one a line, comments and blank lines allowed,
// relative to the configuration's directory, added to the inline ones.
// Bad lines name the key, the file and its line; an emptied list is
// refused, because a policy without prefixes matches every address.
func TestPolicyPrefixFiles(t *testing.T) {
	dir := t.TempDir()
	write := func(name, text string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("country.txt", "# a country's prefixes\n198.51.100.0/24\n\n  203.0.113.0/25   # trailing comment\n2001:db8:1::/48\n203.0.113.200\n")
	write("sources.txt", "100.64.2.0/24\n")
	policy := func(files string) string {
		return base + `
[[policy]]
name = "country"
destinations = ["192.0.2.0/24"]
` + files + `
uplinks = ["isp2"]
`
	}
	path := filepath.Join(dir, "mhbpf.toml")
	write("mhbpf.toml", policy(`destination_files = ["country.txt"]
source_files = ["`+filepath.Join(dir, "sources.txt")+`"]`))
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	got := fmt.Sprint(c.Policies[0].Destinations, c.Policies[0].Sources)
	if want := "[192.0.2.0/24 198.51.100.0/24 203.0.113.0/25 2001:db8:1::/48 203.0.113.200/32] [100.64.2.0/24]"; got != want {
		t.Fatalf("prefixes %s, want %s", got, want)
	}

	for _, tc := range []struct{ name, file, files, msg string }{
		{"bad line", "bad.txt", `destination_files = ["bad.txt"]`, "bad.txt:3: \"198.51.100.300/24\" is not an address or prefix"},
		{"host bits", "host.txt", `destination_files = ["host.txt"]`, "host.txt:1: \"198.51.100.1/24\" has host bits set"},
		{"missing", "", `destination_files = ["nowhere.txt"]`, "nowhere.txt: no such file"},
		{"empty", "empty.txt", `source_files = ["empty.txt"]`, "the files list no prefix"},
	} {
		switch tc.file {
		case "bad.txt":
			write(tc.file, "198.51.100.0/25\n# fine so far\n198.51.100.300/24\n")
		case "host.txt":
			write(tc.file, "198.51.100.1/24\n")
		case "empty.txt":
			write(tc.file, "# nothing yet\n\n")
		}
		write("mhbpf.toml", policy(tc.files))
		_, err := Load(path)
		var ce *Error
		if !errors.As(err, &ce) || !strings.HasPrefix(ce.Key, "policy[0].") || !strings.HasSuffix(ce.Key, "_files") || ce.Line == 0 || !strings.Contains(ce.Msg, tc.msg) {
			t.Errorf("%s: error %v, want one naming policy[0]'s files key, its line, and %q", tc.name, err, tc.msg)
		}
	}
}
