package main

import (
	"io"
	"strings"
	"unicode/utf8"
)

// streamTable writes rows of cells aligned as text/tabwriter aligns them
// (each cell but the last padded to its column's width plus two spaces)
// without holding the whole table, which tabwriter does until Flush: a
// million flows would be a few hundred MB of cells. The widths come from
// the first `ahead` rows (so a short table is exactly tabwriter's); a
// later, wider cell widens its column from its own row on.
type streamTable struct {
	w      io.Writer
	ahead  int
	rows   [][]string // the first rows, until ahead of them are known
	widths []int
	line   []byte
}

const tablePadding = 2

func newStreamTable(w io.Writer, ahead int) *streamTable {
	return &streamTable{w: w, ahead: ahead}
}

// Row adds one row (the cells are not kept after Row returns, unless
// buffered: then they are copied).
func (t *streamTable) Row(cells ...string) error {
	if t.rows != nil || t.widths == nil {
		t.rows = append(t.rows, append([]string(nil), cells...))
		if len(t.rows) < t.ahead {
			return nil
		}
		return t.release()
	}
	return t.write(cells)
}

// Flush writes the rows still held.
func (t *streamTable) Flush() error { return t.release() }

func (t *streamTable) release() error {
	for _, r := range t.rows {
		t.widen(r)
	}
	rows := t.rows
	t.rows = nil
	if t.widths == nil {
		t.widths = []int{}
	}
	for _, r := range rows {
		if err := t.write(r); err != nil {
			return err
		}
	}
	return nil
}

func (t *streamTable) widen(cells []string) {
	for i := range len(cells) - 1 { // the last cell is not aligned
		if i == len(t.widths) {
			t.widths = append(t.widths, 0)
		}
		t.widths[i] = max(t.widths[i], utf8.RuneCountInString(cells[i]))
	}
}

func (t *streamTable) write(cells []string) error {
	t.widen(cells)
	b := t.line[:0]
	for i, c := range cells {
		b = append(b, c...)
		if i < len(cells)-1 {
			b = append(b, strings.Repeat(" ", t.widths[i]-utf8.RuneCountInString(c)+tablePadding)...)
		}
	}
	b = append(b, '\n')
	t.line = b
	_, err := t.w.Write(b)
	return err
}
