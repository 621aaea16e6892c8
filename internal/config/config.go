// Package config reads mhbpf's TOML configuration into a validated model.
// Every error names the file, the line and the key; nothing here touches
// the system.
package config

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"math/bits"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"
)

// Config is a validated configuration.
type Config struct {
	Global Global
	// Uplinks in preference order: the index is the uplink's position, its
	// fib rules' order. Uplink.ID (its slot in the datapath) is another
	// thing: it stays with the name across reloads and restarts.
	Uplinks  []Uplink
	LAN      LAN
	Policies []Policy
}

type Global struct {
	MarkMask      uint32
	StrictMark    uint32 // the "no fallback" bit, inside MarkMask
	ReplyMark     uint32 // the "answer by the arrival uplink" bit, inside MarkMask
	TableMin      int
	TableMax      int
	RulePriority  int // first priority of mhbpf's block of fib rules
	RouteProtocol int // the routes mhbpf installs carry it
	PinDir        string
	CgroupPath    string // empty: detect
	FlowMapSize   uint32
	// InboundMapSize bounds the flows remote peers start (their own LRU);
	// InboundRate the new ones each uplink may record per second.
	InboundMapSize uint32
	InboundRate    uint32
	StickyTimeout  time.Duration
	UpDelay        time.Duration // a link must stay up this long before use
	MetricsListen  string
	ResyncEvery    time.Duration
	// TeardownOnExit removes the datapath on SIGTERM instead of leaving it.
	TeardownOnExit bool
	// NFTable is the name of mhbpf's nftables table (family inet).
	NFTable string
	// StateDir keeps what mhbpf must remember across a crash (the sysctls
	// it changed, its settings for 'mhbpf down') and the status for the CLI.
	StateDir string
}

type Uplink struct {
	Name      string
	Interface string
	// ID is the uplink's slot in the datapath's maps: every flow, sticky
	// entry and policy entry names its uplink by it. Parse numbers the
	// uplinks in order; AssignIdentities gives each the slot, and the
	// automatic mark and table, its name had before.
	ID    int
	Table int
	Mark  uint32
	// TableSet and MarkSet: the configuration gives them (else they are
	// assigned, and kept by name).
	TableSet   bool
	MarkSet    bool
	Weight     uint16
	Tier       uint8
	Balance    bool       // part of the default balance
	Gateway    netip.Addr // Ethernet uplinks; invalid for ppp/tun
	Gateway6   netip.Addr // the IPv6 router of an Ethernet uplink
	Masquerade bool
	// ClampMSS rewrites the MSS of TCP SYNs leaving by this uplink to its
	// route MTU (PPPoE's 1492 breaks PMTU discovery behind
	// ICMP filters).
	ClampMSS bool
	Health   *Health
}

type Health struct {
	Method    string // "icmp" or "tcp"
	Targets   []netip.Addr
	Port      uint16
	Interval  time.Duration
	Timeout   time.Duration
	Failures  int
	Successes int
}

type LAN struct {
	Interfaces []string
	Bypass     []netip.Prefix
}

type PortRange struct{ Lo, Hi uint16 }

type Policy struct {
	Name         string
	Protocol     uint8 // 0: any
	Ports        []PortRange
	Destinations []netip.Prefix
	Sources      []netip.Prefix
	Uplinks      []int // indices into Config.Uplinks, in the policy's preference order
	Balance      bool  // the uplinks share one tier by weight
	Unreachable  bool  // last resort: fail closed (else route by main)
	Sticky       string
}

// Defaults.
const (
	DefaultMarkMask = 0x00ff0000
	// DefaultInboundMapSize and DefaultInboundRate: far more inbound flows
	// than an ADSL line carries, far fewer than a flood.
	DefaultInboundMapSize = 65536
	DefaultInboundRate    = 2000
	DefaultTableMin       = 100
	DefaultTableMax       = 199
	DefaultRulePriority   = 10000
	DefaultRouteProtocol  = 77
	DefaultPinDir         = "/sys/fs/bpf/mhbpf"
	DefaultNFTable        = "mhbpf"
	DefaultStateDir       = "/run/mhbpf"
)

// Raw file layout.
type rawFile struct {
	Global rawGlobal   `toml:"global"`
	Uplink []rawUplink `toml:"uplink"`
	LAN    rawLAN      `toml:"lan"`
	Policy []rawPolicy `toml:"policy"`
}

type rawGlobal struct {
	MarkMask       *uint32 `toml:"mark_mask"`
	StrictMark     *uint32 `toml:"strict_mark"`
	ReplyMark      *uint32 `toml:"reply_mark"`
	Tables         []int   `toml:"tables"`
	RulePriority   *int    `toml:"rule_priority"`
	RouteProtocol  *int    `toml:"route_protocol"`
	PinDir         string  `toml:"pin_dir"`
	Cgroup         string  `toml:"cgroup"`
	FlowMapSize    *uint32 `toml:"flow_map_size"`
	InboundMapSize *uint32 `toml:"inbound_map_size"`
	InboundRate    *uint32 `toml:"inbound_rate"`
	StickyTimeout  *string `toml:"sticky_timeout"`
	UpDelay        *string `toml:"up_delay"`
	ResyncEvery    *string `toml:"resync_every"`
	MetricsListen  string  `toml:"metrics_listen"`
	TeardownOnExit bool    `toml:"teardown_on_exit"`
	NFTable        string  `toml:"nft_table"`
	StateDir       string  `toml:"state_dir"`
}

type rawUplink struct {
	Name       string     `toml:"name"`
	Interface  string     `toml:"interface"`
	Table      any        `toml:"table"` // a number or a name: checked by the validator
	Mark       *uint32    `toml:"mark"`
	Weight     *int       `toml:"weight"`
	Tier       int        `toml:"tier"`
	Balance    *bool      `toml:"balance"`
	Gateway    string     `toml:"gateway"`
	Gateway6   string     `toml:"gateway6"`
	Masquerade bool       `toml:"masquerade"`
	ClampMSS   *bool      `toml:"clamp_mss"`
	Health     *rawHealth `toml:"health"`
}

type rawHealth struct {
	Method    string   `toml:"method"`
	Targets   []string `toml:"targets"`
	Port      int      `toml:"port"`
	Interval  *string  `toml:"interval"`
	Timeout   *string  `toml:"timeout"`
	Failures  int      `toml:"failures"`
	Successes int      `toml:"successes"`
}

type rawLAN struct {
	Interfaces []string `toml:"interfaces"`
	Bypass     []string `toml:"bypass"`
}

type rawPolicy struct {
	Name         string   `toml:"name"`
	Protocol     string   `toml:"protocol"`
	Ports        []any    `toml:"ports"` // 25 or "1000-2000": checked by the validator
	Destinations []string `toml:"destinations"`
	Sources      []string `toml:"sources"`
	// Prefix lists in files (one a line, # comments): a country's list,
	// a provider's announced prefixes. Read again at every reload.
	DestinationFiles []string `toml:"destination_files"`
	SourceFiles      []string `toml:"source_files"`
	Uplinks          []string `toml:"uplinks"`
	Balance          bool     `toml:"balance"`
	LastResort       string   `toml:"last_resort"`
	Sticky           string   `toml:"sticky"`
}

// duration reads a duration such as "1s" or "500ms"; def if unset.
func (v *validator) duration(key string, s *string, def time.Duration) (time.Duration, error) {
	if s == nil {
		return def, nil
	}
	d, err := time.ParseDuration(*s)
	if err != nil {
		return 0, v.err(key, "not a duration (like \"1s\", \"500ms\"): %q", *s)
	}
	if d < 0 {
		return 0, v.err(key, "negative duration %q", *s)
	}
	return d, nil
}

// portRange reads 25, "25" or "1000-2000".
func portRange(x any) (PortRange, error) {
	switch x := x.(type) {
	case int64:
		if x < 1 || x > 65535 {
			return PortRange{}, fmt.Errorf("port %d out of range 1-65535", x)
		}
		return PortRange{uint16(x), uint16(x)}, nil
	case string:
		lo, hi, isRange := strings.Cut(x, "-")
		a, err1 := strconv.ParseUint(strings.TrimSpace(lo), 10, 16)
		b := a
		var err2 error
		if isRange {
			b, err2 = strconv.ParseUint(strings.TrimSpace(hi), 10, 16)
		}
		if err1 != nil || err2 != nil || a == 0 || b < a {
			return PortRange{}, fmt.Errorf("bad port or range %q (want 25 or \"1000-2000\")", x)
		}
		return PortRange{uint16(a), uint16(b)}, nil
	}
	return PortRange{}, fmt.Errorf("bad port %v: want a number or a string like \"1000-2000\"", x)
}

// Error is a configuration error at a place in the file.
type Error struct {
	File string
	Line int
	Key  string
	Msg  string
}

func (e *Error) Error() string {
	where := e.File
	if e.Line > 0 {
		where = fmt.Sprintf("%s:%d", e.File, e.Line)
	}
	if e.Key != "" {
		return fmt.Sprintf("%s: %s: %s", where, e.Key, e.Msg)
	}
	return fmt.Sprintf("%s: %s", where, e.Msg)
}

// Load reads and validates the file.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return Parse(path, data)
}

// Parse validates data; name is used in errors.
func Parse(name string, data []byte) (*Config, error) {
	var raw rawFile
	pos := locate(data)
	if err := toml.NewDecoder(bytes.NewReader(data)).DisallowUnknownFields().Decode(&raw); err != nil {
		return nil, decodeError(name, pos, err)
	}
	v := &validator{file: name, pos: pos}
	return v.build(&raw)
}

// decodeError places the decoder's error at its key and line: an unknown
// key, a value of the wrong type, a syntax error.
func decodeError(name string, pos positions, err error) error {
	var strict *toml.StrictMissingError
	if errors.As(err, &strict) && len(strict.Errors) > 0 {
		e := &strict.Errors[0]
		line, _ := e.Position()
		return &Error{File: name, Line: line, Key: pos.at(line, e.Key()), Msg: "unknown key"}
	}
	var de *toml.DecodeError
	if !errors.As(err, &de) {
		return &Error{File: name, Msg: err.Error()}
	}
	line, _ := de.Position()
	ce := &Error{File: name, Line: line, Msg: strings.TrimPrefix(de.Error(), "toml: ")}
	if len(de.Key()) == 0 {
		return ce // a syntax error: at no key
	}
	ce.Key = pos.at(line, de.Key())
	// A value of the wrong type: said in TOML's words, not in those of the
	// Go field it was meant for. In an inline table the decoder names the
	// table: the key inside it on the same line is the one.
	for _, path := range append([]string{ce.Key}, pos.byLine[line]...) {
		if path != ce.Key && !strings.HasPrefix(path, ce.Key+".") {
			continue
		}
		if msg := typeMismatch(pos, path, strings.Split(unindexed(path), ".")); msg != "" {
			ce.Key, ce.Msg = path, msg
			break
		}
	}
	return ce
}

// typeMismatch says how the value at path differs from what key takes
// ("" when its kinds fit, and the decoder's error is another one).
func typeMismatch(pos positions, path string, key []string) string {
	want := reflect.TypeFor[rawFile]()
	for _, part := range key {
		want = fieldType(want, part)
		if want == nil {
			return ""
		}
	}
	kind, ok := pos.kinds[path]
	if !ok {
		return ""
	}
	have := kindName(kind)
	if w := goKind(want); w != have {
		return fmt.Sprintf("value has type %s, want %s", have, w)
	}
	if have == "array" {
		w := goKind(elem(want).Elem())
		for i, k := range pos.elems[path] {
			if kindName(k) != w && w != "any" {
				return fmt.Sprintf("element %d has type %s, want %s", i, kindName(k), w)
			}
		}
	}
	return ""
}

// fieldType is the type of the field of table type t that key part names
// (nil: none).
func fieldType(t reflect.Type, part string) reflect.Type {
	t = elem(t)
	if t.Kind() == reflect.Slice {
		t = elem(t.Elem()) // an array of tables
	}
	if t.Kind() != reflect.Struct {
		return nil
	}
	for i := 0; i < t.NumField(); i++ {
		if f := t.Field(i); f.Tag.Get("toml") == part {
			return f.Type
		}
	}
	return nil
}

func elem(t reflect.Type) reflect.Type {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	return t
}

// goKind is the TOML kind a Go type takes.
func goKind(t reflect.Type) string {
	t = elem(t)
	switch t.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "integer"
	case reflect.String:
		return "string"
	case reflect.Bool:
		return "boolean"
	case reflect.Float32, reflect.Float64:
		return "float"
	case reflect.Slice:
		if elem(t.Elem()).Kind() == reflect.Struct {
			return "table" // [[uplink]]: an array of tables
		}
		return "array"
	case reflect.Struct:
		return "table"
	}
	return "any"
}

type validator struct {
	file string
	pos  positions
}

func (v *validator) err(key, format string, args ...any) error {
	return &Error{File: v.file, Line: v.pos.line(key), Key: key, Msg: fmt.Sprintf(format, args...)}
}

func (v *validator) build(raw *rawFile) (*Config, error) {
	c := &Config{}
	if err := v.global(&raw.Global, &c.Global); err != nil {
		return nil, err
	}
	if err := v.uplinks(raw.Uplink, c); err != nil {
		return nil, err
	}
	if err := v.lan(&raw.LAN, c); err != nil {
		return nil, err
	}
	if err := v.policies(raw.Policy, c); err != nil {
		return nil, err
	}
	return c, nil
}

func (v *validator) global(r *rawGlobal, g *Global) error {
	g.MarkMask = DefaultMarkMask
	if r.MarkMask != nil {
		g.MarkMask = *r.MarkMask
	}
	if bits.OnesCount32(g.MarkMask) < 3 {
		return v.err("global.mark_mask", "mask %#x needs at least three bits (one per uplink, the strict bit and the reply bit)", g.MarkMask)
	}
	g.StrictMark = 1 << (31 - bits.LeadingZeros32(g.MarkMask)) // the mask's highest bit
	if r.StrictMark != nil {
		g.StrictMark = *r.StrictMark
		if bits.OnesCount32(g.StrictMark) != 1 || g.StrictMark&g.MarkMask == 0 {
			return v.err("global.strict_mark", "%#x must be a single bit inside mark_mask %#x", g.StrictMark, g.MarkMask)
		}
	}
	rest := g.MarkMask &^ g.StrictMark
	g.ReplyMark = 1 << (31 - bits.LeadingZeros32(rest)) // the highest bit left
	if r.ReplyMark != nil {
		g.ReplyMark = *r.ReplyMark
		if bits.OnesCount32(g.ReplyMark) != 1 || g.ReplyMark&rest == 0 {
			return v.err("global.reply_mark", "%#x must be a single bit inside mark_mask %#x other than strict_mark %#x", g.ReplyMark, g.MarkMask, g.StrictMark)
		}
	}
	g.TableMin, g.TableMax = DefaultTableMin, DefaultTableMax
	if r.Tables != nil {
		if len(r.Tables) != 2 || r.Tables[0] < 1 || r.Tables[0] > r.Tables[1] || r.Tables[1] >= 252 && r.Tables[0] <= 255 {
			return v.err("global.tables", "want [first, last] of a free table range, not touching 252-255 (default, main, local)")
		}
		g.TableMin, g.TableMax = r.Tables[0], r.Tables[1]
	}
	g.RulePriority = DefaultRulePriority
	if r.RulePriority != nil {
		if *r.RulePriority < 1 || *r.RulePriority > 32000 {
			return v.err("global.rule_priority", "%d out of range 1-32000 (32766 is main)", *r.RulePriority)
		}
		g.RulePriority = *r.RulePriority
	}
	g.RouteProtocol = DefaultRouteProtocol
	if r.RouteProtocol != nil {
		if *r.RouteProtocol < 5 || *r.RouteProtocol > 255 {
			return v.err("global.route_protocol", "%d out of range 5-255 (0-4 belong to the kernel)", *r.RouteProtocol)
		}
		g.RouteProtocol = *r.RouteProtocol
	}
	g.PinDir = DefaultPinDir
	if r.PinDir != "" {
		g.PinDir = r.PinDir
	}
	g.CgroupPath = r.Cgroup
	g.FlowMapSize = 262144
	if r.FlowMapSize != nil {
		if *r.FlowMapSize < 1024 {
			return v.err("global.flow_map_size", "%d is too small (at least 1024)", *r.FlowMapSize)
		}
		g.FlowMapSize = *r.FlowMapSize
	}
	g.InboundMapSize = DefaultInboundMapSize
	if r.InboundMapSize != nil {
		if *r.InboundMapSize < 1024 {
			return v.err("global.inbound_map_size", "%d is too small (at least 1024)", *r.InboundMapSize)
		}
		g.InboundMapSize = *r.InboundMapSize
	}
	g.InboundRate = DefaultInboundRate
	if r.InboundRate != nil {
		g.InboundRate = *r.InboundRate
	}
	var err error
	if g.StickyTimeout, err = v.duration("global.sticky_timeout", r.StickyTimeout, 10*time.Minute); err != nil {
		return err
	}
	if g.UpDelay, err = v.duration("global.up_delay", r.UpDelay, time.Second); err != nil {
		return err
	}
	if g.ResyncEvery, err = v.duration("global.resync_every", r.ResyncEvery, 10*time.Second); err != nil {
		return err
	}
	if g.ResyncEvery < time.Second {
		return v.err("global.resync_every", "at least 1s")
	}
	g.MetricsListen = r.MetricsListen
	g.TeardownOnExit = r.TeardownOnExit
	g.NFTable = DefaultNFTable
	if r.NFTable != "" {
		g.NFTable = r.NFTable
	}
	g.StateDir = DefaultStateDir
	if r.StateDir != "" {
		g.StateDir = r.StateDir
	}
	return nil
}

func (v *validator) uplinks(raws []rawUplink, c *Config) error {
	g := &c.Global
	if len(raws) == 0 {
		return v.err("uplink", "no [[uplink]] configured")
	}
	free := g.MarkMask &^ (g.StrictMark | g.ReplyMark)
	if len(raws) > bits.OnesCount32(free) || len(raws) > MaxUplinks {
		return v.err("uplink", "%d uplinks, but mark_mask %#x leaves %d bits (and at most %d uplinks)", len(raws), g.MarkMask, bits.OnesCount32(free), MaxUplinks)
	}
	if len(raws) > g.TableMax-g.TableMin+1 {
		return v.err("global.tables", "%d uplinks, but global.tables %d-%d has %d tables", len(raws), g.TableMin, g.TableMax, g.TableMax-g.TableMin+1)
	}
	names, ifaces, tables, marks := map[string]int{}, map[string]int{}, map[int]int{}, map[uint32]int{}
	for i, r := range raws {
		key := fmt.Sprintf("uplink[%d]", i)
		u := Uplink{Name: r.Name, Interface: r.Interface, Masquerade: r.Masquerade, ID: i,
			// PPP (PPPoE, PPPoA) is where MTUs below 1500 live.
			ClampMSS: strings.HasPrefix(r.Interface, "ppp")}
		if r.ClampMSS != nil {
			u.ClampMSS = *r.ClampMSS
		}
		if r.Name == "" {
			return v.err(key+".name", "missing")
		}
		if j, dup := names[r.Name]; dup {
			return v.err(key+".name", "uplink %q is defined twice (also uplink[%d])", r.Name, j)
		}
		names[r.Name] = i
		if r.Interface == "" {
			return v.err(key+".interface", "missing")
		}
		if j, dup := ifaces[r.Interface]; dup {
			return v.err(key+".interface", "interface %s is used by uplink[%d] too", r.Interface, j)
		}
		ifaces[r.Interface] = i
		// Explicit tables and marks here; the others are assigned below,
		// around them.
		if r.Table != nil {
			u.TableSet = true
			switch t := r.Table.(type) {
			case string:
				n, err := tableByName(t)
				if err != nil {
					return v.err(key+".table", "%v", err)
				}
				u.Table = n
			case int64:
				if t < 1 || t > 1<<31-1 {
					return v.err(key+".table", "table %d out of range", t)
				}
				u.Table = int(t)
			default:
				return v.err(key+".table", "must be a number or a name from /etc/iproute2/rt_tables, not %v", t)
			}
			if u.Table < g.TableMin || u.Table > g.TableMax {
				return v.err(key+".table", "table %d is outside global.tables %d-%d", u.Table, g.TableMin, g.TableMax)
			}
			if j, dup := tables[u.Table]; dup {
				return v.err(key+".table", "table %d is used by uplink[%d] too", u.Table, j)
			}
			tables[u.Table] = i
		}
		if r.Mark != nil {
			u.MarkSet = true
			m := *r.Mark
			if bits.OnesCount32(m) != 1 || m&g.MarkMask == 0 || m == g.StrictMark || m == g.ReplyMark {
				return v.err(key+".mark", "%#x must be a single bit of mark_mask %#x other than the strict bit %#x and the reply bit %#x", m, g.MarkMask, g.StrictMark, g.ReplyMark)
			}
			if j, dup := marks[m]; dup {
				return v.err(key+".mark", "mark %#x is used by uplink[%d] too", m, j)
			}
			marks[m] = i
			u.Mark = m
		}
		w := 1
		if r.Weight != nil {
			w = *r.Weight
		}
		if w < 0 || w > 65535 {
			return v.err(key+".weight", "%d out of range 0-65535", w)
		}
		u.Weight = uint16(w)
		u.Balance = true
		if r.Balance != nil {
			u.Balance = *r.Balance
		}
		if u.Balance && w == 0 {
			return v.err(key+".weight", "weight 0 in a balanced tier (set balance = false to keep %s out of the balance)", r.Name)
		}
		if r.Tier < 0 || r.Tier > 254 {
			return v.err(key+".tier", "%d out of range 0-254", r.Tier)
		}
		u.Tier = uint8(r.Tier)
		if r.Gateway != "" {
			a, err := netip.ParseAddr(r.Gateway)
			if err != nil || !a.Is4() {
				return v.err(key+".gateway", "%q is not an IPv4 address", r.Gateway)
			}
			u.Gateway = a
		}
		if r.Gateway6 != "" {
			a, err := netip.ParseAddr(r.Gateway6)
			if err != nil || !a.Is6() || a.Is4In6() {
				return v.err(key+".gateway6", "%q is not an IPv6 address", r.Gateway6)
			}
			u.Gateway6 = a
		}
		if r.Health != nil {
			h, err := v.health(key+".health", r.Health)
			if err != nil {
				return err
			}
			u.Health = h
		}
		c.Uplinks = append(c.Uplinks, u)
	}
	// The automatic marks and tables of a configuration on its own: the
	// lowest free ones, in order. (The daemon assigns them again with what
	// it remembers of earlier configurations.)
	if _, err := c.AssignIdentities(nil); err != nil {
		return v.err("uplink", "%v", err)
	}
	return nil
}

func (v *validator) health(key string, r *rawHealth) (*Health, error) {
	h := &Health{Method: r.Method, Port: uint16(r.Port), Interval: time.Second, Timeout: time.Second, Failures: 3, Successes: 2}
	if h.Method == "" {
		h.Method = "icmp"
	}
	switch h.Method {
	case "icmp":
		if r.Port != 0 {
			return nil, v.err(key+".port", "only for method = \"tcp\"")
		}
	case "tcp":
		if r.Port < 1 || r.Port > 65535 {
			return nil, v.err(key+".port", "method tcp needs a port 1-65535")
		}
	default:
		return nil, v.err(key+".method", "%q: want \"icmp\" or \"tcp\"", r.Method)
	}
	if len(r.Targets) == 0 {
		return nil, v.err(key+".targets", "at least one target address")
	}
	for _, t := range r.Targets {
		a, err := netip.ParseAddr(t)
		if err != nil {
			return nil, v.err(key+".targets", "%q is not an IP address", t)
		}
		h.Targets = append(h.Targets, a)
	}
	var err error
	if h.Interval, err = v.duration(key+".interval", r.Interval, h.Interval); err != nil {
		return nil, err
	}
	if h.Timeout, err = v.duration(key+".timeout", r.Timeout, h.Timeout); err != nil {
		return nil, err
	}
	if h.Interval < 10*time.Millisecond {
		return nil, v.err(key+".interval", "at least 10ms")
	}
	if h.Timeout <= 0 || h.Timeout > h.Interval {
		return nil, v.err(key+".timeout", "must be positive and at most the interval (%v)", h.Interval)
	}
	if r.Failures != 0 {
		h.Failures = r.Failures
	}
	if r.Successes != 0 {
		h.Successes = r.Successes
	}
	if h.Failures < 1 || h.Successes < 1 {
		return nil, v.err(key, "failures and successes must be at least 1")
	}
	return h, nil
}

func (v *validator) lan(r *rawLAN, c *Config) error {
	seen := map[string]bool{}
	for _, ifname := range r.Interfaces {
		if ifname == "" {
			return v.err("lan.interfaces", "empty interface name")
		}
		if seen[ifname] {
			return v.err("lan.interfaces", "interface %s named twice", ifname)
		}
		for _, u := range c.Uplinks {
			if u.Interface == ifname {
				return v.err("lan.interfaces", "%s is uplink %s's interface", ifname, u.Name)
			}
		}
		seen[ifname] = true
		c.LAN.Interfaces = append(c.LAN.Interfaces, ifname)
	}
	ps, err := v.prefixes("lan.bypass", r.Bypass)
	if err != nil {
		return err
	}
	c.LAN.Bypass = ps
	return nil
}

func (v *validator) prefixes(key string, in []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range in {
		p, err := parsePrefix(s)
		if err != nil {
			return nil, v.err(key, "%v", err)
		}
		out = append(out, p)
	}
	return out, nil
}

// prefixFile reads a list of prefixes named by key: one prefix (or
// address) a line, blank lines and # comments allowed. A relative name is
// relative to the configuration file's directory.
func (v *validator) prefixFile(key, name string) ([]netip.Prefix, error) {
	path := name
	if !filepath.IsAbs(path) {
		path = filepath.Join(filepath.Dir(v.file), path)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, v.err(key, "%v", err)
	}
	var out []netip.Prefix
	for n, line := range strings.Split(string(data), "\n") {
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		p, err := parsePrefix(line)
		if err != nil {
			return nil, v.err(key, "%s:%d: %v", path, n+1, err)
		}
		out = append(out, p)
	}
	return out, nil
}

// parsePrefix reads a prefix or an address (a prefix of its full length);
// host bits are refused, as a likely typo.
func parsePrefix(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		a, aerr := netip.ParseAddr(s)
		if aerr != nil {
			return netip.Prefix{}, fmt.Errorf("%q is not an address or prefix", s)
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	if p.Masked() != p {
		return netip.Prefix{}, fmt.Errorf("%q has host bits set (did you mean %s?)", s, p.Masked())
	}
	return p, nil
}

var protocols = map[string]uint8{"": 0, "any": 0, "tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}

func (v *validator) policies(raws []rawPolicy, c *Config) error {
	if len(raws) > 64 {
		return v.err("policy", "%d policies, at most 64", len(raws))
	}
	names := map[string]int{}
	byName := map[string]int{}
	for i, u := range c.Uplinks {
		byName[u.Name] = i
	}
	for i, r := range raws {
		key := fmt.Sprintf("policy[%d]", i)
		p := Policy{Name: r.Name, Balance: r.Balance}
		if r.Name == "" {
			return v.err(key+".name", "missing")
		}
		if j, dup := names[r.Name]; dup {
			return v.err(key+".name", "policy %q is defined twice (also policy[%d])", r.Name, j)
		}
		names[r.Name] = i
		proto, ok := protocols[strings.ToLower(r.Protocol)]
		if !ok {
			n, err := strconv.ParseUint(r.Protocol, 10, 8)
			if err != nil {
				return v.err(key+".protocol", "%q: want tcp, udp, icmp, icmpv6 or a protocol number", r.Protocol)
			}
			proto = uint8(n)
		}
		p.Protocol = proto
		if len(r.Ports) > 0 && proto != 6 && proto != 17 {
			return v.err(key+".ports", "ports need protocol = \"tcp\" or \"udp\"")
		}
		if len(r.Ports) > 8 {
			return v.err(key+".ports", "%d port ranges, at most 8", len(r.Ports))
		}
		for _, ps := range r.Ports {
			pr, err := portRange(ps)
			if err != nil {
				return v.err(key+".ports", "%v", err)
			}
			p.Ports = append(p.Ports, pr)
		}
		var err error
		if p.Destinations, err = v.prefixes(key+".destinations", r.Destinations); err != nil {
			return err
		}
		if p.Sources, err = v.prefixes(key+".sources", r.Sources); err != nil {
			return err
		}
		for _, f := range []struct {
			key   string
			files []string
			into  *[]netip.Prefix
		}{{key + ".destination_files", r.DestinationFiles, &p.Destinations}, {key + ".source_files", r.SourceFiles, &p.Sources}} {
			for _, name := range f.files {
				list, err := v.prefixFile(f.key, name)
				if err != nil {
					return err
				}
				*f.into = append(*f.into, list...)
			}
			// A policy without prefixes matches every address: an
			// emptied list must not turn into "everything".
			if len(f.files) > 0 && len(*f.into) == 0 {
				return v.err(f.key, "the files list no prefix (a policy without prefixes would match every address)")
			}
		}
		if len(r.Uplinks) == 0 {
			return v.err(key+".uplinks", "at least one uplink")
		}
		if len(r.Uplinks) > 8 {
			return v.err(key+".uplinks", "at most 8 uplinks")
		}
		seen := map[int]bool{}
		for _, name := range r.Uplinks {
			id, ok := byName[name]
			if !ok {
				return v.err(key+".uplinks", "no uplink named %q", name)
			}
			if seen[id] {
				return v.err(key+".uplinks", "uplink %q listed twice", name)
			}
			if p.Balance && c.Uplinks[id].Weight == 0 {
				return v.err(key+".uplinks", "uplink %q has weight 0 in a balanced tier", name)
			}
			seen[id] = true
			p.Uplinks = append(p.Uplinks, id)
		}
		switch r.LastResort {
		case "", "main":
		case "unreachable":
			p.Unreachable = true
		default:
			return v.err(key+".last_resort", "%q: want \"unreachable\" or \"main\"", r.LastResort)
		}
		switch r.Sticky {
		case "", "destination", "flow", "pair":
			p.Sticky = r.Sticky
		default:
			return v.err(key+".sticky", "%q: want \"destination\", \"flow\" or \"pair\"", r.Sticky)
		}
		c.Policies = append(c.Policies, p)
	}
	return nil
}

// tableByName looks a table name up where iproute2 keeps them.
func tableByName(name string) (int, error) {
	files := []string{"/etc/iproute2/rt_tables", "/usr/share/iproute2/rt_tables"}
	if ds, err := os.ReadDir("/etc/iproute2/rt_tables.d"); err == nil {
		for _, d := range ds {
			if strings.HasSuffix(d.Name(), ".conf") {
				files = append(files, "/etc/iproute2/rt_tables.d/"+d.Name())
			}
		}
	}
	for _, f := range files {
		fh, err := os.Open(f)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(fh)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) >= 2 && !strings.HasPrefix(fields[0], "#") && fields[1] == name {
				n, err := strconv.Atoi(fields[0])
				if err == nil {
					fh.Close()
					return n, nil
				}
			}
		}
		fh.Close()
	}
	return 0, fmt.Errorf("no routing table named %q in /etc/iproute2/rt_tables", name)
}
