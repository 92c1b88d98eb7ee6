//! Crafted packets for BPF_PROG_TEST_RUN and packet generators: a small builder for well-formed Ethernet /
//! VLAN / IPv4 / IPv6 (with extension headers) / TCP / UDP frames, whose bytes the
//! tests then cut or corrupt to make malformed ones. Checksums are left zero: the
//! program never reads them.

use std::net::IpAddr;

pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86DD;
pub const ETH_ARP: u16 = 0x0806;
pub const ETH_8021Q: u16 = 0x8100;
pub const ETH_8021AD: u16 = 0x88A8;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// Lengths of the headers, for tests that cut packets at a boundary.
pub const ETH_LEN: usize = 14;
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
pub const TCP_LEN: usize = 20;
pub const UDP_LEN: usize = 8;

#[derive(Clone, Copy, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// Any other IP protocol, with this many payload bytes.
    Other {
        proto: u8,
    },
}

/// An IPv6 extension header.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    HopByHop,
    Routing,
    DestOpts,
    /// Fragment header: offset in 8-byte units, and the more-fragments flag.
    Fragment {
        offset: u16,
        more: bool,
    },
}

impl Ext {
    const fn code(self) -> u8 {
        match self {
            Self::HopByHop => 0,
            Self::Routing => 43,
            Self::Fragment { .. } => 44,
            Self::DestOpts => 60,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    /// VLAN tag protocol ids, outermost first.
    pub vlans: Vec<u16>,
    /// IPv6 only.
    pub ext: Vec<Ext>,
    /// IPv4 only: option bytes (a multiple of 4).
    pub ipv4_options: usize,
    /// IPv4 only: the flags-and-offset field (MF = 0x2000, offset in 8-byte units).
    pub ipv4_frag: u16,
    pub payload: usize,
}

impl Packet {
    pub fn tcp(src: IpAddr, dst: IpAddr, dport: u16, flags: u8) -> Self {
        Self::new(
            src,
            dst,
            L4::Tcp {
                sport: 40000,
                dport,
                flags,
            },
        )
    }

    pub fn syn(src: IpAddr, dst: IpAddr, dport: u16) -> Self {
        Self::tcp(src, dst, dport, TCP_SYN)
    }

    pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Self {
        Self::new(src, dst, L4::Udp { sport, dport })
    }

    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        Self {
            src,
            dst,
            l4,
            vlans: Vec::new(),
            ext: Vec::new(),
            ipv4_options: 0,
            ipv4_frag: 0,
            payload: 16,
        }
    }

    pub fn vlan(mut self, tpid: u16) -> Self {
        self.vlans.push(tpid);
        self
    }

    pub fn ext(mut self, ext: Ext) -> Self {
        self.ext.push(ext);
        self
    }

    pub fn options(mut self, bytes: usize) -> Self {
        assert_eq!(bytes % 4, 0);
        self.ipv4_options = bytes;
        self
    }

    pub fn ipv4_fragment(mut self, offset_units: u16, more: bool) -> Self {
        self.ipv4_frag = offset_units | if more { 0x2000 } else { 0 };
        self
    }

    fn l4_bytes(&self) -> (u8, Vec<u8>) {
        let payload = vec![0xab; self.payload];
        match self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                let mut b = Vec::with_capacity(TCP_LEN + payload.len());
                b.extend(sport.to_be_bytes());
                b.extend(dport.to_be_bytes());
                b.extend(1u32.to_be_bytes()); // sequence
                b.extend(0u32.to_be_bytes()); // acknowledgement
                b.push(5 << 4); // data offset: 5 words
                b.push(flags);
                b.extend(65535u16.to_be_bytes()); // window
                b.extend([0; 4]); // checksum, urgent pointer
                b.extend(payload);
                (PROTO_TCP, b)
            }
            L4::Udp { sport, dport } => {
                let mut b = Vec::with_capacity(UDP_LEN + payload.len());
                b.extend(sport.to_be_bytes());
                b.extend(dport.to_be_bytes());
                b.extend(((UDP_LEN + payload.len()) as u16).to_be_bytes());
                b.extend([0; 2]);
                b.extend(payload);
                (PROTO_UDP, b)
            }
            L4::Other { proto } => (proto, payload),
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let (proto, l4) = self.l4_bytes();
        let (ethertype, ip) = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let header_len = IPV4_LEN + self.ipv4_options;
                let mut b = Vec::new();
                b.push(0x40 | (header_len / 4) as u8);
                b.push(0);
                b.extend(((header_len + l4.len()) as u16).to_be_bytes());
                b.extend([0, 0]); // id
                b.extend(self.ipv4_frag.to_be_bytes());
                b.push(64);
                b.push(proto);
                b.extend([0, 0]); // checksum
                b.extend(s.octets());
                b.extend(d.octets());
                // NOP options, then the end-of-list option.
                b.extend(std::iter::repeat_n(1u8, self.ipv4_options));
                if let Some(last) = b.last_mut().filter(|_| self.ipv4_options > 0) {
                    *last = 0;
                }
                b.extend(l4);
                (ETH_IPV4, b)
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut chain = Vec::new();
                for (i, ext) in self.ext.iter().enumerate() {
                    let next = self.ext.get(i + 1).map_or(proto, |e| e.code());
                    chain.push(next);
                    match ext {
                        Ext::Fragment { offset, more } => {
                            chain.push(0);
                            chain.extend(((offset << 3) | u16::from(*more)).to_be_bytes());
                            chain.extend(7u32.to_be_bytes()); // identification
                        }
                        _ => {
                            chain.push(0); // length: one 8-byte unit
                            chain.extend([1, 4, 0, 0, 0, 0]); // PadN option
                        }
                    }
                }
                let first = self.ext.first().map_or(proto, |e| e.code());
                let mut b = vec![0x60, 0, 0, 0];
                b.extend(((chain.len() + l4.len()) as u16).to_be_bytes());
                b.push(first);
                b.push(64);
                b.extend(s.octets());
                b.extend(d.octets());
                b.extend(chain);
                b.extend(l4);
                (ETH_IPV6, b)
            }
            _ => panic!("mixed address families"),
        };
        let mut frame = ethernet_header(&self.vlans, ethertype);
        frame.extend(ip);
        frame
    }
}

/// Destination and source MAC, VLAN tags, then the ethertype.
pub fn ethernet_header(vlans: &[u16], ethertype: u16) -> Vec<u8> {
    let mut b = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    for (i, tpid) in vlans.iter().enumerate() {
        b.extend(tpid.to_be_bytes());
        b.extend((100 + i as u16).to_be_bytes()); // VLAN id
    }
    b.extend(ethertype.to_be_bytes());
    b
}

/// A 42-byte ARP request.
pub fn arp() -> Vec<u8> {
    let mut b = ethernet_header(&[], ETH_ARP);
    b.extend([0, 1, 8, 0, 6, 4, 0, 1]);
    b.extend([0u8; 20]);
    b
}
