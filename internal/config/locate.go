package config

import (
	"fmt"
	"regexp"
	"strings"
)

// positions maps a key path ("uplink[1].health.interval", "uplink[1]",
// "global.mark_mask") to the line it is on. The TOML decoder keeps key
// positions to itself, and an error that names a line is what an operator
// needs, so the file is scanned once more here, line by line. It follows
// table headers, arrays of tables and dotted keys; keys inside inline
// tables are found at the line of their table.
type positions struct {
	lines  map[string]int
	values map[string]string // raw text after '=' of each key
}

var (
	arrayHeader = regexp.MustCompile(`^\[\[\s*([A-Za-z0-9_.\-" ]+?)\s*\]\]`)
	tableHeader = regexp.MustCompile(`^\[\s*([A-Za-z0-9_.\-" ]+?)\s*\]`)
	keyLine     = regexp.MustCompile(`^([A-Za-z0-9_.\-" ]+?)\s*=`)
)

func locate(data []byte) positions {
	pos := positions{lines: map[string]int{}}
	values := map[string]string{}
	count := map[string]int{} // array-of-tables name -> entries seen
	prefix := ""
	for i, raw := range strings.Split(string(data), "\n") {
		line := strings.TrimSpace(raw)
		n := i + 1
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case arrayHeader.MatchString(line):
			name := cleanKey(arrayHeader.FindStringSubmatch(line)[1])
			path := name
			if dot := strings.LastIndex(name, "."); dot >= 0 {
				path = resolve(name[:dot], count) + name[dot:]
			}
			prefix = fmt.Sprintf("%s[%d]", path, count[path])
			count[path]++
			pos.set(prefix, n)
		case tableHeader.MatchString(line):
			prefix = resolve(cleanKey(tableHeader.FindStringSubmatch(line)[1]), count)
			pos.set(prefix, n)
		case keyLine.MatchString(line):
			m := keyLine.FindStringSubmatch(line)
			key := cleanKey(m[1])
			if prefix != "" {
				key = prefix + "." + key
			}
			pos.set(key, n)
			values[key] = strings.TrimSpace(line[len(m[0]):])
		}
	}
	pos.values = values
	return pos
}

func (p positions) set(k string, line int) {
	if _, ok := p.lines[k]; !ok {
		p.lines[k] = line
	}
}

// resolve turns "uplink.health" into "uplink[2].health" when uplink is an
// array of tables whose latest entry is index 2.
func resolve(name string, count map[string]int) string {
	parts := strings.Split(name, ".")
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

func cleanKey(k string) string {
	parts := strings.Split(k, ".")
	for i := range parts {
		parts[i] = strings.Trim(strings.TrimSpace(parts[i]), `"`)
	}
	return strings.Join(parts, ".")
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

var indexRE = regexp.MustCompile(`\[\d+\]`)

// find locates a key given without array indexes (as the TOML decoder
// reports unknown keys): the first line holding it, with its indexed path.
func (p positions) find(plain string) (string, int) {
	return p.findWhere(plain, func(string) bool { return true })
}

// findTyped is find for a key whose value has the given TOML type (as the
// decoder names it in a type error), so that a wrong type in the third of
// three [[uplink]] tables is reported at the third.
func (p positions) findTyped(plain, tomlType string) (string, int) {
	return p.findWhere(plain, func(v string) bool { return strings.EqualFold(guessType(v), tomlType) })
}

func (p positions) findWhere(plain string, ok func(value string) bool) (string, int) {
	best, bestLine := plain, 0
	for k, n := range p.lines {
		if indexRE.ReplaceAllString(k, "") == plain && ok(p.values[k]) && (bestLine == 0 || n < bestLine) {
			best, bestLine = k, n
		}
	}
	return best, bestLine
}

func guessType(v string) string {
	switch {
	case v == "":
		return ""
	case v[0] == '"' || v[0] == '\'':
		return "String"
	case v[0] == '[':
		return "Array"
	case v[0] == '{':
		return "Table"
	case strings.HasPrefix(v, "true") || strings.HasPrefix(v, "false"):
		return "Boolean"
	case strings.ContainsAny(v, ".eE") && !strings.HasPrefix(v, "0x"):
		return "Float"
	}
	return "Integer"
}
