//! Random frames for the fuzz tests: mostly well-formed packets of every shape the
//! program parses (VLAN tags, IPv4 options and fragments, IPv6 extension chains, TCP,
//! UDP, other protocols) towards the test's destinations, then corrupted by overwriting
//! a few bytes, by a random ethertype or next header, or by cutting the frame short.

use std::net::IpAddr;

use netlab::packets::*;
use rand::{Rng, rngs::StdRng, seq::IndexedRandom};

/// The addresses and ports frames are built from, chosen so that every policy, the
/// bypass, DNS and unmatched destinations all come up, and UDP 5-tuples repeat.
pub struct Pools {
    pub devices4: Vec<IpAddr>,
    pub devices6: Vec<IpAddr>,
    pub destinations4: Vec<IpAddr>,
    pub destinations6: Vec<IpAddr>,
    pub ports: Vec<u16>,
}

const SOURCE_PORTS: [u16; 3] = [5000, 5001, 40000];
const OTHER_PROTOCOLS: [u8; 8] = [
    PROTO_ICMP,
    PROTO_ICMPV6,
    0,  // hop-by-hop options, with a random payload as its header
    44, // fragment header, likewise
    47, // GRE
    50, // ESP
    59, // no next header
    132,
];
const ETHERTYPES: [u16; 6] = [ETH_IPV4, ETH_IPV6, ETH_8021Q, ETH_8021AD, ETH_ARP, 0x88cc];

/// One random frame, at least an Ethernet header long.
pub fn frame(rng: &mut StdRng, pools: &Pools) -> Vec<u8> {
    let mut bytes = match rng.random_range(0..20) {
        0 => arp(),
        1 => {
            let mut b = ethernet_header(&[], rng.random());
            b.extend((0..rng.random_range(0..80)).map(|_| rng.random::<u8>()));
            b
        }
        _ => packet(rng, pools).bytes(),
    };
    corrupt(rng, &mut bytes);
    bytes
}

fn packet(rng: &mut StdRng, pools: &Pools) -> Packet {
    let v6 = rng.random_bool(0.4);
    let (devices, destinations) = if v6 {
        (&pools.devices6, &pools.destinations6)
    } else {
        (&pools.devices4, &pools.destinations4)
    };
    let src = *devices.choose(rng).unwrap();
    let dst = *destinations.choose(rng).unwrap();
    let sport = *SOURCE_PORTS.choose(rng).unwrap();
    let dport = if rng.random_bool(0.9) {
        *pools.ports.choose(rng).unwrap()
    } else {
        rng.random()
    };
    let l4 = match rng.random_range(0..10) {
        0..=4 => L4::Tcp {
            sport,
            dport,
            flags: if rng.random_bool(0.7) {
                TCP_SYN
            } else {
                rng.random()
            },
        },
        5..=8 => L4::Udp { sport, dport },
        _ => L4::Other {
            proto: *OTHER_PROTOCOLS.choose(rng).unwrap(),
        },
    };
    let mut p = Packet::new(src, dst, l4);
    p.payload = rng.random_range(0..48);
    // Mostly untagged; sometimes one to three tags of either kind.
    for _ in 0..[0, 0, 0, 1, 2, 3][rng.random_range(0..6)] {
        p.vlans.push(*[ETH_8021Q, ETH_8021AD].choose(rng).unwrap());
    }
    if v6 {
        for _ in 0..[0, 0, 0, 1, 2, 4, 6, 7][rng.random_range(0..8)] {
            p.ext.push(ext(rng));
        }
    } else {
        p.ipv4_options = 4 * rng.random_range(0..=10) * usize::from(rng.random_bool(0.3));
        p.ipv4_frag = match rng.random_range(0..12) {
            0 => 0x2000,                      // first fragment
            1 => rng.random_range(1..0x2000), // a later one
            2 => 0x4000,                      // don't fragment
            3 => 0x2001,                      // 8 bytes in: over a TCP header's flags
            _ => 0,
        };
    }
    p
}

fn ext(rng: &mut StdRng) -> Ext {
    match rng.random_range(0..6) {
        0 => Ext::HopByHop,
        1 => Ext::Routing,
        2 => Ext::DestOpts,
        3 => Ext::Fragment {
            offset: 0,
            more: true,
        },
        4 => Ext::Fragment {
            offset: 1,
            more: true,
        },
        _ => Ext::Fragment {
            offset: rng.random_range(0..0x2000),
            more: rng.random(),
        },
    }
}

/// Leaves a frame whole, or overwrites bytes, the ethertype or the first next-header
/// field, and maybe cuts it short (never below an Ethernet header, which
/// BPF_PROG_TEST_RUN refuses).
fn corrupt(rng: &mut StdRng, bytes: &mut Vec<u8>) {
    match rng.random_range(0..8) {
        0..=2 => {}
        3..=5 => {
            for _ in 0..rng.random_range(1..=4) {
                let at = rng.random_range(0..bytes.len());
                bytes[at] = rng.random();
            }
        }
        6 => {
            let ethertype = *ETHERTYPES.choose(rng).unwrap();
            bytes[12..14].copy_from_slice(&ethertype.to_be_bytes());
        }
        _ => {
            // IPv4 protocol or IPv6 next header of an untagged packet.
            let at = match u16::from_be_bytes([bytes[12], bytes[13]]) {
                ETH_IPV4 => ETH_LEN + 9,
                _ => ETH_LEN + 6,
            };
            if let Some(b) = bytes.get_mut(at) {
                *b = *[PROTO_TCP, PROTO_UDP, 0, 43, 44, 60, rng.random()]
                    .choose(rng)
                    .unwrap();
            }
        }
    }
    if rng.random_bool(0.3) {
        let cut = rng.random_range(ETH_LEN..=bytes.len());
        bytes.truncate(cut);
    }
}
