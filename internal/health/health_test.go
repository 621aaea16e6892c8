package health

import (
	"errors"
	"strings"
	"testing"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"

	"github.com/mhbpf/mhbpf/internal/config"
)

func newTestProber() *Prober {
	return NewProber(Spec{Uplink: 1, Gen: 7, Health: config.Health{Failures: 3, Successes: 2}})
}

var errLost = errors.New("i/o timeout")

// The first answer is a verdict; so are failures rounds in a row without
// one. Before either, there is none.
func TestFirstVerdict(t *testing.T) {
	p := newTestProber()
	r := p.record(false, 0, errLost)
	if r.Verdict || r.Healthy || r.Fails != 1 || r.Uplink != 1 || r.Gen != 7 {
		t.Fatalf("after one failure: %+v", r)
	}
	if r = p.record(true, 5, nil); !r.Verdict || !r.Healthy {
		t.Fatalf("after the first answer (one is enough for the first verdict): %+v", r)
	}

	p = newTestProber()
	for i := 1; i <= 2; i++ {
		if r = p.record(false, 0, errLost); r.Verdict {
			t.Fatalf("verdict after %d failures of 3: %+v", i, r)
		}
	}
	if r = p.record(false, 0, errLost); !r.Verdict || r.Healthy || !strings.Contains(r.Reason, "3 probes failed") {
		t.Fatalf("after 3 failures: %+v", r)
	}
	// Down: successes-before-up applies from now on.
	if r = p.record(true, 5, nil); r.Healthy {
		t.Fatalf("up after one success of 2: %+v", r)
	}
	if r = p.record(true, 5, nil); !r.Healthy {
		t.Fatalf("not up after 2 successes: %+v", r)
	}
	for i := 1; i <= 2; i++ {
		if r = p.record(false, 0, errLost); !r.Healthy {
			t.Fatalf("down after %d failures of 3: %+v", i, r)
		}
	}
	if r = p.record(false, 0, errLost); r.Healthy || r.Loss != 6.0/8 || r.RTT != 5 {
		t.Fatalf("after 3 more failures: %+v", r)
	}
}

// Only the reply with the request's identifier, sequence and payload is
// an answer.
func TestIsReply(t *testing.T) {
	payload := []byte("0123456789abcdef")
	for _, fam := range []struct {
		proto      int
		reply, req icmp.Type
	}{{1, ipv4.ICMPTypeEchoReply, ipv4.ICMPTypeEcho}, {58, ipv6.ICMPTypeEchoReply, ipv6.ICMPTypeEchoRequest}} {
		msg := func(typ icmp.Type, id, seq int, data []byte) []byte {
			b, err := (&icmp.Message{Type: typ, Body: &icmp.Echo{ID: id, Seq: seq, Data: data}}).Marshal(nil)
			if err != nil {
				t.Fatal(err)
			}
			return b
		}
		for name, c := range map[string]struct {
			b    []byte
			want bool
		}{
			"the reply":         {msg(fam.reply, 0x1234, 9, payload), true},
			"other identifier":  {msg(fam.reply, 0x1235, 9, payload), false},
			"other sequence":    {msg(fam.reply, 0x1234, 10, payload), false},
			"other payload":     {msg(fam.reply, 0x1234, 9, []byte("0123456789abcdeX")), false},
			"short payload":     {msg(fam.reply, 0x1234, 9, payload[:8]), false},
			"no payload":        {msg(fam.reply, 0x1234, 9, nil), false},
			"the request":       {msg(fam.req, 0x1234, 9, payload), false},
			"truncated message": {msg(fam.reply, 0x1234, 9, payload)[:3], false},
		} {
			if got := isReply(fam.proto, fam.reply, c.b, 0x1234, 9, payload); got != c.want {
				t.Errorf("proto %d, %s: %v, want %v", fam.proto, name, got, c.want)
			}
		}
	}
}
