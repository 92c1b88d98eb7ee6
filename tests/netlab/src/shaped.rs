//! SYNs shaped to slip past a packet filter, as an attacker on a device would send
//! them: split into IPv4 fragments whose first one is too short to show the TCP flags
//! (RFC 1858), or behind a long chain of IPv6 extension headers. They are whole, valid
//! SYNs once the server reassembles or walks them, with real checksums, and leave the
//! client through its own stack (a raw IP socket, header included), which routes them
//! and resolves the gateway's address.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use crate::{Lab, packets::PROTO_TCP};

const IPPROTO_DSTOPTS: u8 = 60;

/// RFC 1071's checksum of `parts`, concatenated (each of even length but the last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let bytes = parts.iter().flat_map(|p| p.iter().copied());
    let mut pending: Option<u8> = None;
    for b in bytes {
        match pending.take() {
            None => pending = Some(b),
            Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
        }
    }
    if let Some(hi) = pending {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A 20-byte TCP SYN header from `src:sport` to `dst:dport`, checksum included.
fn syn_header(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20);
    tcp.extend(sport.to_be_bytes());
    tcp.extend(dport.to_be_bytes());
    tcp.extend(0x1234_5678u32.to_be_bytes()); // sequence
    tcp.extend(0u32.to_be_bytes());
    tcp.push(5 << 4);
    tcp.push(0x02); // SYN
    tcp.extend(64240u16.to_be_bytes());
    tcp.extend([0; 4]); // checksum, urgent pointer
    let pseudo: Vec<u8> = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            [&s.octets()[..], &d.octets(), &[0, PROTO_TCP, 0, 20]].concat()
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => [
            &s.octets()[..],
            &d.octets(),
            &20u32.to_be_bytes(),
            &[0, 0, 0, PROTO_TCP],
        ]
        .concat(),
        _ => panic!("mixed address families"),
    };
    let sum = checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    tcp
}

/// An IPv4 header for `payload_len` bytes at fragment offset `offset_units` (8-byte
/// units), with "more fragments" as given; the kernel fills in the checksum.
fn ipv4_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    offset_units: u16,
    more: bool,
    payload_len: usize,
) -> Vec<u8> {
    let mut ip = vec![0x45, 0];
    ip.extend(((20 + payload_len) as u16).to_be_bytes());
    ip.extend(id.to_be_bytes());
    ip.extend((offset_units | if more { 0x2000 } else { 0 }).to_be_bytes());
    ip.extend([64, PROTO_TCP, 0, 0]);
    ip.extend(src.octets());
    ip.extend(dst.octets());
    ip
}

/// A SYN from `src:sport` to `dst:dport` as two IPv4 fragments, the first carrying
/// only `first_bytes` (8 or 16) of the TCP header: the flags are in the second.
pub fn fragmented_syn(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    first_bytes: usize,
) -> Vec<Vec<u8>> {
    assert!(
        first_bytes.is_multiple_of(8) && first_bytes < 20,
        "fragments are whole 8-byte units"
    );
    let tcp = syn_header(src.into(), dst.into(), sport, dport);
    let id = sport ^ 0x5a5a;
    let (head, tail) = tcp.split_at(first_bytes);
    vec![
        [
            ipv4_header(src, dst, id, 0, true, head.len()),
            head.to_vec(),
        ]
        .concat(),
        [
            ipv4_header(src, dst, id, (first_bytes / 8) as u16, false, tail.len()),
            tail.to_vec(),
        ]
        .concat(),
    ]
}

/// A SYN from `src:sport` to `dst:dport` behind `count` IPv6 destination-options
/// headers (8 bytes each, padding only).
pub fn syn_behind_extension_headers(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    count: usize,
) -> Vec<u8> {
    let tcp = syn_header(src.into(), dst.into(), sport, dport);
    let mut chain = Vec::new();
    for i in 0..count {
        let next = if i + 1 == count {
            PROTO_TCP
        } else {
            IPPROTO_DSTOPTS
        };
        // Next header, length 0 (8 bytes), then a PadN option of 4 bytes.
        chain.extend([next, 0, 1, 4, 0, 0, 0, 0]);
    }
    let first = if count == 0 {
        PROTO_TCP
    } else {
        IPPROTO_DSTOPTS
    };
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend(((chain.len() + tcp.len()) as u16).to_be_bytes());
    ip.extend([first, 64]);
    ip.extend(src.octets());
    ip.extend(dst.octets());
    [ip, chain, tcp].concat()
}

impl Lab {
    /// Sends whole IP packets (headers included) from the client namespace to `dst`,
    /// through the client's stack.
    pub fn send_ip_packets(&self, dst: IpAddr, packets: &[Vec<u8>]) {
        self.client
            .run(|| send_raw(dst, packets))
            .expect("raw IP socket in the client namespace");
    }
}

fn send_raw(dst: IpAddr, packets: &[Vec<u8>]) -> io::Result<()> {
    let family = if dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // IPPROTO_RAW: the header is ours (IP_HDRINCL, and its IPv6 equivalent).
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd of ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let to: socket2::SockAddr = SocketAddr::new(dst, 0).into();
    for packet in packets {
        // SAFETY: the buffer and address are valid for their lengths.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                to.as_ptr().cast(),
                to.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify_and_fragments_reassemble_to_the_syn() {
        let (s, d) = (
            Ipv4Addr::new(198, 18, 1, 11),
            Ipv4Addr::new(198, 19, 10, 10),
        );
        let tcp = syn_header(s.into(), d.into(), 40000, 443);
        let pseudo = [&s.octets()[..], &d.octets(), &[0, PROTO_TCP, 0, 20]].concat();
        assert_eq!(
            checksum(&[&pseudo, &tcp]),
            0,
            "a valid checksum sums to zero"
        );
        let frags = fragmented_syn(s, d, 40000, 443, 8);
        assert_eq!(frags[0].len(), 28);
        assert_eq!(frags[0][6..8], [0x20, 0x00], "more fragments, offset 0");
        assert_eq!(frags[1][6..8], [0x00, 0x01], "offset 1 (8 bytes)");
        assert_eq!([&frags[0][20..], &frags[1][20..]].concat(), tcp);

        let (s6, d6): (Ipv6Addr, Ipv6Addr) = (
            "2001:db8:1::b".parse().unwrap(),
            "2001:db8:10::10".parse().unwrap(),
        );
        let p = syn_behind_extension_headers(s6, d6, 40000, 443, 8);
        assert_eq!(p.len(), 40 + 8 * 8 + 20);
        assert_eq!(p[6], IPPROTO_DSTOPTS);
        assert_eq!(p[40 + 7 * 8], PROTO_TCP);
    }
}
