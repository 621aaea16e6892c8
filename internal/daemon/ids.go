package daemon

import "fmt"

// Typed names for what the logs mention: a slot, a mark bit or a table
// number alone says nothing to the reader of a log ("t101"); with the
// uplink's name it does ("table isp1 (101)").

// UplinkRef is an uplink by name and slot (its id in the BPF maps).
type UplinkRef struct {
	Name string
	Slot int
}

func (u UplinkRef) String() string { return fmt.Sprintf("%s (slot %d)", u.Name, u.Slot) }

// TableRef is an uplink's routing table.
type TableRef struct {
	Uplink string
	Num    int
}

func (t TableRef) String() string { return fmt.Sprintf("table %s (%d)", t.Uplink, t.Num) }

// MarkRef is an uplink's mark bit.
type MarkRef struct {
	Uplink string
	Bit    uint32
}

func (m MarkRef) String() string { return fmt.Sprintf("mark %s (%#x)", m.Uplink, m.Bit) }
