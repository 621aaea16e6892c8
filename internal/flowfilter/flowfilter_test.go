package flowfilter

import (
	"net/netip"
	"testing"

	"github.com/mhbpf/mhbpf/internal/maps"
)

func flow(proto uint8, src, dst string, uplink int, o maps.Origin) maps.Flow {
	return maps.Flow{Key: maps.FlowKey{Proto: proto, Src: netip.MustParseAddrPort(src), Dst: netip.MustParseAddrPort(dst)},
		Uplink: uplink, Origin: o}
}

func TestMatch(t *testing.T) {
	tcp := flow(6, "100.64.2.10:40000", "203.0.113.10:25", 1, maps.OriginPolicy)
	udp6 := flow(17, "[2001:db8:0:3::10]:5000", "[2001:db8:ff::10]:53", 0, maps.OriginBalanced)
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
	if _, err := ParseOrigin("mail"); err == nil {
		t.Error("mail parsed as an origin")
	}
}
