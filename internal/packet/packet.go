// Package packet builds raw packets for the tc programs' tests, benchmarks
// and 'mhbpf explain' (its test run): Ethernet or bare IP framing, IPv4
// (with options) or IPv6 (with extension headers), TCP, UDP or ICMP.
// Checksums are left zero: the programs never look at them.
package packet

import (
	"encoding/binary"
	"net/netip"
)

const (
	ProtoICMP   = 1
	ProtoTCP    = 6
	ProtoUDP    = 17
	ProtoICMPv6 = 58

	TCPSyn = 0x02
	TCPAck = 0x10
)

// Packet describes one packet to build.
type Packet struct {
	Src, Dst netip.AddrPort // ICMP echo: Src's port is the identifier
	Proto    uint8
	TCPFlags uint8
	ICMPType uint8
	// IPv4Options is appended to the IPv4 header (a multiple of 4 bytes).
	IPv4Options []byte
	// Ext are IPv6 extension headers (next-header numbers) put before L4:
	// 0 hop-by-hop, 60 destination options, 43 routing (8 bytes each),
	// 44 fragment (FragOffset, MoreFragments, FragID).
	Ext []uint8
	// FragOffset makes an IPv4 packet, or an IPv6 packet's fragment header
	// (Ext 44), a fragment at this offset (in 8-byte units); MoreFragments
	// sets MF (IPv6: M); FragID is the datagram's identification (IPv4:
	// the low 16 bits).
	FragOffset    uint16
	MoreFragments bool
	FragID        uint32
	Payload       int
	// L3 leaves out the Ethernet header, as on ppp and tun devices.
	L3 bool
}

// Bytes builds the packet.
func (p Packet) Bytes() []byte {
	l4 := p.l4()
	var ip []byte
	if p.Src.Addr().Is4() {
		ip = p.ipv4(len(l4))
	} else {
		ip = p.ipv6(l4)
	}
	var out []byte
	if !p.L3 {
		eth := make([]byte, 14)
		copy(eth[0:6], []byte{0x02, 0, 0, 0, 0, 1})
		copy(eth[6:12], []byte{0x02, 0, 0, 0, 0, 2})
		if p.Src.Addr().Is4() {
			binary.BigEndian.PutUint16(eth[12:], 0x0800)
		} else {
			binary.BigEndian.PutUint16(eth[12:], 0x86dd)
		}
		out = eth
	}
	out = append(out, ip...)
	return append(out, l4...)
}

func (p Packet) l4() []byte {
	var h []byte
	switch p.Proto {
	case ProtoTCP:
		h = make([]byte, 20)
		binary.BigEndian.PutUint16(h[0:], p.Src.Port())
		binary.BigEndian.PutUint16(h[2:], p.Dst.Port())
		h[12] = 5 << 4
		h[13] = p.TCPFlags
	case ProtoUDP:
		h = make([]byte, 8)
		binary.BigEndian.PutUint16(h[0:], p.Src.Port())
		binary.BigEndian.PutUint16(h[2:], p.Dst.Port())
		binary.BigEndian.PutUint16(h[4:], uint16(8+p.Payload))
	case ProtoICMP, ProtoICMPv6:
		h = make([]byte, 8)
		h[0] = p.ICMPType
		binary.BigEndian.PutUint16(h[4:], p.Src.Port())
	}
	return append(h, make([]byte, p.Payload)...)
}

func (p Packet) ipv4(l4len int) []byte {
	h := make([]byte, 20+len(p.IPv4Options))
	h[0] = 0x40 | byte(len(h)/4)
	binary.BigEndian.PutUint16(h[2:], uint16(len(h)+l4len))
	frag := p.FragOffset & 0x1fff
	if p.MoreFragments {
		frag |= 0x2000
	}
	binary.BigEndian.PutUint16(h[4:], uint16(p.FragID))
	binary.BigEndian.PutUint16(h[6:], frag)
	h[8] = 64
	h[9] = p.Proto
	s, d := p.Src.Addr().As4(), p.Dst.Addr().As4()
	copy(h[12:], s[:])
	copy(h[16:], d[:])
	copy(h[20:], p.IPv4Options)
	return h
}

func (p Packet) ipv6(l4 []byte) []byte {
	h := make([]byte, 40)
	h[0] = 0x60
	h[7] = 64
	s, d := p.Src.Addr().As16(), p.Dst.Addr().As16()
	copy(h[8:], s[:])
	copy(h[24:], d[:])
	var ext []byte
	next := p.Proto
	for i := len(p.Ext) - 1; i >= 0; i-- {
		e := make([]byte, 8)
		e[0] = next
		if p.Ext[i] == 44 {
			frag := p.FragOffset << 3
			if p.MoreFragments {
				frag |= 1
			}
			binary.BigEndian.PutUint16(e[2:], frag)
			binary.BigEndian.PutUint32(e[4:], p.FragID)
		}
		// Hop-by-hop, routing and destination options: length 0 means 8
		// bytes; the fragment header is always 8 bytes.
		ext = append(e, ext...)
		next = p.Ext[i]
	}
	h[6] = next
	binary.BigEndian.PutUint16(h[4:], uint16(len(ext)+len(l4)))
	return append(h, ext...)
}
