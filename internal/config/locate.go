package config

import (
	"fmt"
	"strings"

	"github.com/pelletier/go-toml/v2/unstable"
)

// positions maps a key path ("uplink[1].health.interval", "uplink[1]",
// "global.mark_mask") to the line it is on, and says what kind of value
// each key has. The decoder reports the line of its own errors but not the
// index of an array-of-tables entry, and the validator's errors need a line
// too; both come from the TOML parser's own key positions here.
type positions struct {
	lines map[string]int
	kinds map[string]unstable.Kind   // the value of each key
	elems map[string][]unstable.Kind // the elements of each array value
	// byLine lists the paths that start on each line, in file order.
	byLine map[int][]string
}

func locate(data []byte) positions {
	pos := positions{lines: map[string]int{}, kinds: map[string]unstable.Kind{}, elems: map[string][]unstable.Kind{},
		byLine: map[int][]string{}}
	p := unstable.Parser{}
	p.Reset(data)
	count := map[string]int{} // array-of-tables path -> entries seen
	prefix := ""
	for p.NextExpression() {
		e := p.Expression()
		switch e.Kind {
		case unstable.Table, unstable.ArrayTable:
			parts, line := keyOf(&p, e.Key())
			if e.Kind == unstable.Table {
				prefix = resolve(parts, count)
			} else {
				path := parts[len(parts)-1]
				if len(parts) > 1 {
					path = resolve(parts[:len(parts)-1], count) + "." + path
				}
				prefix = fmt.Sprintf("%s[%d]", path, count[path])
				count[path]++
			}
			pos.set(prefix, line, unstable.Table)
		case unstable.KeyValue:
			pos.keyValue(&p, prefix, e)
		}
	}
	// A syntax error ends the walk; the decoder reports it.
	return pos
}

// keyValue records a key and, in an inline table, the keys inside it.
func (pos positions) keyValue(p *unstable.Parser, prefix string, e *unstable.Node) {
	parts, line := keyOf(p, e.Key())
	key := strings.Join(parts, ".")
	if prefix != "" {
		key = prefix + "." + key
	}
	v := e.Value()
	pos.set(key, line, v.Kind)
	if v.Kind == unstable.Array {
		for it := v.Children(); it.Next(); {
			if c := it.Node(); c.Kind != unstable.Comment {
				pos.elems[key] = append(pos.elems[key], c.Kind)
			}
		}
	}
	if v.Kind == unstable.InlineTable {
		for it := v.Children(); it.Next(); {
			if c := it.Node(); c.Kind == unstable.KeyValue {
				pos.keyValue(p, key, c)
			}
		}
	}
}

func keyOf(p *unstable.Parser, it unstable.Iterator) ([]string, int) {
	var parts []string
	line := 0
	for it.Next() {
		n := it.Node()
		if line == 0 {
			line = p.Shape(n.Raw).Start.Line
		}
		parts = append(parts, string(n.Data))
	}
	return parts, line
}

func (p positions) set(k string, line int, kind unstable.Kind) {
	if _, ok := p.lines[k]; !ok {
		p.lines[k] = line
		p.kinds[k] = kind
		p.byLine[line] = append(p.byLine[line], k)
	}
}

// resolve turns [uplink health] into "uplink[2].health" when uplink is an
// array of tables whose latest entry is index 2.
func resolve(parts []string, count map[string]int) string {
	out := ""
	for _, part := range parts {
		if out != "" {
			out += "."
		}
		out += part
		if c := count[out]; c > 0 {
			out = fmt.Sprintf("%s[%d]", out, c-1)
		}
	}
	return out
}

// line finds the line of path, or of the nearest enclosing key or table.
func (p positions) line(path string) int {
	for path != "" {
		if n, ok := p.lines[path]; ok {
			return n
		}
		cut := strings.LastIndexAny(path, ".[")
		if cut < 0 {
			break
		}
		path = path[:cut]
	}
	return 0
}

// at names, with its array indexes, the key the decoder reports (without
// them) at line: the path on that line that is the key, else the one that
// ends like it (a key inside an inline table), else the last on the line.
func (p positions) at(line int, key []string) string {
	plain := strings.Join(key, ".")
	paths := p.byLine[line]
	for _, k := range paths {
		if unindexed(k) == plain {
			return k
		}
	}
	if len(key) > 0 {
		for _, k := range paths {
			if strings.HasSuffix(unindexed(k), "."+key[len(key)-1]) {
				return k
			}
		}
	}
	if len(paths) > 0 {
		return paths[len(paths)-1]
	}
	// Nothing starts on the line: a key defined twice is recorded where
	// it was first. The nearest such key above is the one.
	best, bestLine := plain, 0
	for k, n := range p.lines {
		u := unindexed(k)
		if (u == plain || strings.HasSuffix(u, "."+plain)) && n <= line && n > bestLine {
			best, bestLine = k, n
		}
	}
	return best
}

// unindexed is a path without its array indexes: "uplink[1].name" is
// "uplink.name".
func unindexed(path string) string {
	var b strings.Builder
	depth := 0
	for _, r := range path {
		switch {
		case r == '[':
			depth++
		case r == ']':
			depth--
		case depth == 0:
			b.WriteRune(r)
		}
	}
	return b.String()
}

// kindName is how an error names the kind of a TOML value.
func kindName(k unstable.Kind) string {
	switch k {
	case unstable.String:
		return "string"
	case unstable.Integer:
		return "integer"
	case unstable.Float:
		return "float"
	case unstable.Bool:
		return "boolean"
	case unstable.Array:
		return "array"
	case unstable.InlineTable, unstable.Table:
		return "table"
	case unstable.LocalDate, unstable.LocalTime, unstable.LocalDateTime, unstable.DateTime:
		return "date-time"
	}
	return strings.ToLower(k.String())
}
