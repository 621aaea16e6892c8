package flowfilter

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/mhbpf/mhbpf/internal/maps"
)

func flow(proto uint8, src, dst string, uplink int, o maps.Origin, policy int) maps.Flow {
	return maps.Flow{Key: maps.FlowKey{Proto: proto, Src: netip.MustParseAddrPort(src), Dst: netip.MustParseAddrPort(dst)},
		Uplink: uplink, Origin: o, Policy: policy}
}

func TestMatch(t *testing.T) {
	tcp := flow(6, "100.64.2.10:40000", "203.0.113.10:25", 1, maps.OriginPolicy, 2)
	udp6 := flow(17, "[2001:db8:0:3::10]:5000", "[2001:db8:ff::10]:53", 0, maps.OriginBalanced, 0)
	mustPrefix := func(flag, s string) netip.Prefix {
		p, err := ParsePrefix(flag, s)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, c := range []struct {
		name      string
		f         Filter
		tcp, udp6 bool
	}{
		{"any", Any(), true, true},
		{"uplink 1", Filter{Uplink: 1}, true, false},
		{"uplink 0", Filter{Uplink: 0}, false, true},
		{"src host", Filter{Uplink: -1, Src: mustPrefix("src", "100.64.2.10")}, true, false},
		{"src other host", Filter{Uplink: -1, Src: mustPrefix("src", "100.64.2.11")}, false, false},
		{"dst v6 prefix", Filter{Uplink: -1, Dst: mustPrefix("dst", "2001:db8:ff::/48")}, false, true},
		{"dst v4 prefix", Filter{Uplink: -1, Dst: mustPrefix("dst", "203.0.113.0/24")}, true, false},
		{"origin policy", Filter{Uplink: -1, Origin: maps.OriginPolicy}, true, false},
		{"proto udp", Filter{Uplink: -1, Proto: 17}, false, true},
		{"policy id 2", Filter{Uplink: -1, Origin: maps.OriginPolicy, Policy: 2}, true, false},
		{"policy id 1", Filter{Uplink: -1, Origin: maps.OriginPolicy, Policy: 1}, false, false},
		{"all of them", Filter{Uplink: 1, Src: mustPrefix("src", "100.64.2.0/24"), Proto: 6, Origin: maps.OriginPolicy}, true, false},
	} {
		if got := c.f.Match(tcp); got != c.tcp {
			t.Errorf("%s: tcp flow: %v, want %v", c.name, got, c.tcp)
		}
		if got := c.f.Match(udp6); got != c.udp6 {
			t.Errorf("%s: udp6 flow: %v, want %v", c.name, got, c.udp6)
		}
	}
}

func TestParseErrorsNameTheFlag(t *testing.T) {
	if _, err := ParsePrefix("dst", "203.0.113.300"); err == nil || err.Error() != `--dst "203.0.113.300": not an address or prefix` {
		t.Errorf("bad dst: %v", err)
	}
	if _, err := ParseProto("sctpx"); err == nil {
		t.Error("sctpx parsed as a protocol")
	}
	if p, err := ParseProto("132"); err != nil || p != 132 {
		t.Errorf("132: %d, %v", p, err)
	}
}

func TestParsePolicy(t *testing.T) {
	names := []string{"mail-via-isp1", "panel-via-isp2", "inbound-ish"}
	for _, c := range []struct {
		in     string
		origin maps.Origin
		id     int
	}{
		{"", 0, 0},
		{"balanced", maps.OriginBalanced, 0},
		{"default", maps.OriginBalanced, 0},
		{"policy", maps.OriginPolicy, 0},
		{"inbound", maps.OriginInbound, 0},
		{"mail-via-isp1", maps.OriginPolicy, 1},
		{"panel-via-isp2", maps.OriginPolicy, 2},
		{"inbound-ish", maps.OriginPolicy, 3},
	} {
		x := Any()
		if err := x.ParsePolicy(c.in, names); err != nil || x.Origin != c.origin || x.Policy != c.id {
			t.Errorf("%q: origin %v id %d (%v), want origin %v id %d", c.in, x.Origin, x.Policy, err, c.origin, c.id)
		}
	}
	x := Any()
	err := x.ParsePolicy("mail", names)
	if err == nil || err.Error() != `--policy "mail": want balanced, policy, inbound or a [[policy]] name (policies: mail-via-isp1, panel-via-isp2, inbound-ish)` {
		t.Errorf("unknown name: %v", err)
	}
	if err := x.ParsePolicy("mail", nil); err == nil || !strings.Contains(err.Error(), "the daemon's status names none") {
		t.Errorf("no names: %v", err)
	}
	for id, want := range map[int]string{0: "", 1: "mail-via-isp1", 3: "inbound-ish", 4: "policy 4"} {
		if got := PolicyName(id, names); got != want {
			t.Errorf("PolicyName(%d) = %q, want %q", id, got, want)
		}
	}
}
