package loader_test

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/maps"
	"github.com/mhbpf/mhbpf/internal/testutil"
)

// Whatever takes mhbpf's tc programs away, DriftTC names it, and AttachTC
// puts them back; in both modes.
func TestDriftTCSeenAndRepaired(t *testing.T) {
	for _, mode := range []loader.Mode{loader.ModeTCX, loader.ModeClsact} {
		t.Run(string(mode), func(t *testing.T) {
			ns := netnsWithVeth(t)
			dir := pinDirIn(t, ns)
			testutil.InNetNS(t, ns, func() {
				d, err := loader.Load(loader.Options{NetnsCookie: testutil.NetnsCookie(t, ""), PinDir: dir, TCMode: mode})
				if err != nil {
					t.Fatal(err)
				}
				defer d.Close()
				if what, err := d.DriftTC("up0", maps.RoleLAN); err != nil || what != "" {
					t.Fatalf("before attaching: %q, %v (nothing to check yet)", what, err)
				}
				if got, err := d.AttachTC("up0", maps.RoleLAN, 0); err != nil {
					testutil.RequireTCX(t, err)
				} else if got != mode {
					t.Fatalf("attached with %s, want %s", got, mode)
				}
				pin := func(name string) string { return filepath.Join(dir, "links", name) }
				withLink := func(name string, f func(link.Link) error) func() {
					return func() {
						l, err := link.LoadPinnedLink(pin(name), nil)
						if err != nil {
							t.Fatal(err)
						}
						defer l.Close()
						if err := f(l); err != nil {
							t.Fatal(err)
						}
					}
				}
				type breakage struct {
					what, want string
					do         func()
				}
				var cases []breakage
				if mode == loader.ModeTCX {
					cases = []breakage{
						{"ingress unpinned", "tcx ingress link unpinned", withLink("tc-up0", link.Link.Unpin)},
						{"egress detached", "tcx egress link detached", withLink("tce-up0", link.Link.Detach)},
						// Someone's clsact qdisc coming and going does not touch tcx.
						{"a clsact qdisc deleted", "", func() {
							testutil.Run(t, "tc", "qdisc", "add", "dev", "up0", "clsact")
							testutil.Run(t, "tc", "qdisc", "del", "dev", "up0", "clsact")
						}},
					}
				} else {
					cases = []breakage{
						{"qdisc deleted", "clsact qdisc gone", func() { testutil.Run(t, "tc", "qdisc", "del", "dev", "up0", "clsact") }},
						{"egress filters flushed", "cls_bpf filter mhbpf_lan_egress gone from egress", func() {
							testutil.Run(t, "tc", "filter", "del", "dev", "up0", "egress")
						}},
					}
				}
				for _, c := range cases {
					c.do()
					what, err := d.DriftTC("up0", maps.RoleLAN)
					if err != nil || what != c.want {
						t.Fatalf("%s: drift %q, %v; want %q", c.what, what, err, c.want)
					}
					if _, err := d.AttachTC("up0", maps.RoleLAN, 0); err != nil {
						t.Fatalf("%s: reattach: %v", c.what, err)
					}
					if what, err := d.DriftTC("up0", maps.RoleLAN); err != nil || what != "" {
						t.Fatalf("%s: after reattaching: %q, %v", c.what, what, err)
					}
					// Only the mode's own listing: a kernel without tcx
					// (Debian 12's 6.1) cannot even be asked.
					var names []string
					ours := "lan_ingress"
					if mode == loader.ModeClsact {
						names, ours = clsactFilters(t, "up0"), "mhbpf_lan"
					} else {
						names = tcxPrograms(t, "up0")
					}
					if n := count(names, ours); n != 1 {
						t.Fatalf("%s: %d LAN programs after reattaching, want 1", c.what, n)
					}
				}
				if err := d.DetachTC("up0"); err != nil {
					t.Fatal(err)
				}
				if what, err := d.DriftTC("up0", maps.RoleLAN); err != nil || what != "" {
					t.Fatalf("after detaching on purpose: %q, %v", what, err)
				}
			})
		})
	}
}

// A socket hook's link unpinned or detached: DriftCgroup names it and
// AttachCgroup puts a new one in its place.
func TestDriftCgroupSeenAndRepaired(t *testing.T) {
	testutil.RequireRoot(t)
	dir := testutil.PinDir(t, loader.Remove)
	cg := testutil.Cgroup(t)
	d, err := loader.Load(loader.Options{PinDir: dir, NetnsCookie: testutil.NetnsCookie(t, "")})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if gone := d.DriftCgroup(); len(gone) != 0 {
		t.Fatalf("before attaching: %v", gone)
	}
	if err := d.AttachCgroup(cg); err != nil {
		t.Fatal(err)
	}
	before := loader.LinksState(dir)
	for _, c := range []struct {
		hook, want string
		do         func(link.Link) error
	}{
		{"connect4", "connect4 unpinned", link.Link.Unpin},
		{"sendmsg6", "sendmsg6 detached", link.Link.Detach},
	} {
		l, err := link.LoadPinnedLink(filepath.Join(dir, "links", "cgroup-"+c.hook), nil)
		if err != nil {
			t.Fatal(err)
		}
		err = c.do(l)
		l.Close()
		if err != nil {
			t.Fatal(err)
		}
		if gone := d.DriftCgroup(); strings.Join(gone, ",") != c.want {
			t.Fatalf("%s: drift %v, want %q", c.hook, gone, c.want)
		}
		if s := loader.LinksState(dir); s == before {
			t.Fatalf("%s: the links' state did not change: %s", c.hook, s)
		}
		if err := d.AttachCgroup(cg); err != nil {
			t.Fatalf("%s: reattach: %v", c.hook, err)
		}
		if gone := d.DriftCgroup(); len(gone) != 0 {
			t.Fatalf("%s: after reattaching: %v", c.hook, gone)
		}
		// The unpinned link's program goes when the kernel frees the pin's
		// inode, after an RCU grace period: on 5.10 under emulation it is
		// still attached for a moment beside the new one.
		var got map[ebpf.AttachType][]uint64
		once := func() bool {
			got = netnsCookiesAttached(t, cg)
			if len(got) != 4 {
				return false
			}
			for _, cookies := range got {
				if len(cookies) != 1 {
					return false
				}
			}
			return true
		}
		deadline := time.Now().Add(testutil.Deadline(2 * time.Second))
		for !once() && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if !once() {
			t.Fatalf("%s: hooks attached after reattaching: %v, want all 4 once", c.hook, got)
		}
		before = loader.LinksState(dir)
	}
}
