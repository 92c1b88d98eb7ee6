//! Header parsing: Ethernet, up to two VLAN tags, IPv4 with options, IPv6 with its
//! extension headers, then TCP or UDP. Anything it need not judge comes back as a
//! passing verdict. A packet with a valid IP header whose L4 header it cannot read
//! comes back as `Packet::Unreadable*`, with its addresses: the datagram the receiver
//! reassembles may still open a flow (a first fragment too short to show the TCP
//! flags, RFC 1858; a header chain longer than it follows), so it is judged by its
//! destination alone (`judge::judge_unreadable`).
//!
//! Fields are read with one load of their width (`packet::load_*`): the code LLVM
//! generates for byte-array fields reads a byte at a time, and addresses would cost
//! 4 to 16 loads each.

use agent_common::{
    addr::{Ip4, Ip6},
    logic::is_new_tcp_flow,
    maps::{IPPROTO_TCP, IPPROTO_UDP},
    verdict::Verdict,
};
use aya_ebpf::programs::XdpContext;

use crate::packet::{load_u8, load_u16_be, load_u32, load_u64};

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

pub const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
pub const IPV4_MIN_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
const IPV6_FRAG_HLEN: usize = 8;
pub const TCP_MIN_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;
/// Extension headers followed before giving up on a chain as bogus.
const IPV6_MAX_EXT_HEADERS: usize = 6;
/// Offsets beyond this are not parsed; it keeps every offset visibly bounded for the
/// verifier and is far beyond any sane header stack.
pub const MAX_L4_OFFSET: usize = 1024;

/// The L4 facts the verdict needs, of a TCP SYN or a UDP datagram; ports in host order.
/// The offsets are where a reply (`reply`) is built.
#[derive(Clone, Copy)]
pub struct L4 {
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// Offsets of the IP header and of the TCP/UDP header from the packet's start.
    pub ip_offset: u16,
    pub l4_offset: u16,
}

/// Largest IP header offset: Ethernet and two VLAN tags.
pub const MAX_IP_OFFSET: usize = ETH_HLEN + 2 * VLAN_HLEN;

pub enum Packet {
    V4 {
        src: Ip4,
        dst: Ip4,
        l4: L4,
    },
    V6 {
        src: Ip6,
        dst: Ip6,
        l4: L4,
    },
    /// Its L4 header cannot be read; `verdict` is what it passes with where no session
    /// check applies.
    Unreadable4 {
        src: Ip4,
        dst: Ip4,
        verdict: Verdict,
    },
    Unreadable6 {
        src: Ip6,
        dst: Ip6,
        verdict: Verdict,
    },
}

/// A TCP fragment at offset 8 (fragment offset 1) covers the TCP header from byte 8 on,
/// flags included: it could turn an admitted segment into a SYN on reassembly
/// (RFC 1858's overlapping fragment attack). No genuine sender fragments that small.
#[inline(always)]
const fn rewrites_tcp_flags(fragment_offset_units: u16, proto: u8) -> bool {
    fragment_offset_units == 1 && proto == IPPROTO_TCP
}

/// The address of `len` bytes at `offset` in the packet, if the packet holds them all.
#[inline(always)]
fn bytes_at(ctx: &XdpContext, offset: usize, len: usize) -> Option<usize> {
    let start = ctx.data();
    if start + offset + len > ctx.data_end() {
        return None;
    }
    Some(start + offset)
}

/// Parses a packet down to its L4 header, or says why it passes unjudged.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Verdict> {
    let eth = bytes_at(ctx, 0, ETH_HLEN).ok_or(Verdict::PassedMalformed)?;
    // SAFETY (all loads below): each address was checked by `bytes_at` to have its
    // bytes inside the packet.
    let mut proto = unsafe { load_u16_be(eth + 12) };
    // Untagged IPv4 first: the common case takes the fewest branches.
    if proto == ETH_P_IPV4 {
        return parse_ipv4(ctx, ETH_HLEN);
    }
    let mut offset = ETH_HLEN;
    // Up to two tags (802.1ad outer, 802.1Q inner); a third leaves a VLAN ethertype,
    // which passes as another protocol.
    for _ in 0..2 {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        let vlan = bytes_at(ctx, offset, VLAN_HLEN).ok_or(Verdict::PassedMalformed)?;
        proto = unsafe { load_u16_be(vlan + 2) };
        offset += VLAN_HLEN;
    }
    match proto {
        ETH_P_IPV4 => parse_ipv4(ctx, offset),
        ETH_P_IPV6 => parse_ipv6(ctx, offset),
        _ => Err(Verdict::PassedOtherProtocol),
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, offset: usize) -> Result<Packet, Verdict> {
    let ip = bytes_at(ctx, offset, IPV4_MIN_HLEN).ok_or(Verdict::PassedMalformed)?;
    let (version_ihl, total_len, frag_off, proto) = unsafe {
        (
            load_u8(ip),
            load_u16_be(ip + 2) as usize,
            load_u16_be(ip + 6),
            load_u8(ip + 9),
        )
    };
    let header_len = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || header_len < IPV4_MIN_HLEN || total_len < header_len {
        return Err(Verdict::PassedMalformed);
    }
    let (src, dst) = unsafe { (Ip4(load_u32(ip + 12)), Ip4(load_u32(ip + 16))) };
    let unreadable = |verdict| Ok(Packet::Unreadable4 { src, dst, verdict });
    // A non-first fragment has no L4 header; the first fragment (offset 0) is judged.
    let fragment = frag_off & 0x1fff;
    if fragment != 0 {
        if rewrites_tcp_flags(fragment, proto) {
            return unreadable(Verdict::PassedFragment);
        }
        return Err(Verdict::PassedFragment);
    }
    match parse_l4(ctx, offset, offset + header_len, proto) {
        Ok(l4) => Ok(Packet::V4 { src, dst, l4 }),
        Err(Verdict::PassedMalformed) => unreadable(Verdict::PassedMalformed),
        Err(verdict) => Err(verdict),
    }
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, ip_offset: usize) -> Result<Packet, Verdict> {
    let ip = bytes_at(ctx, ip_offset, IPV6_HLEN).ok_or(Verdict::PassedMalformed)?;
    let (version, mut next) = unsafe { (load_u8(ip) >> 4, load_u8(ip + 6)) };
    if version != 6 {
        return Err(Verdict::PassedMalformed);
    }
    let (src, dst) = unsafe {
        (
            Ip6([load_u64(ip + 8), load_u64(ip + 16)]),
            Ip6([load_u64(ip + 24), load_u64(ip + 32)]),
        )
    };
    let unreadable = |verdict| Ok(Packet::Unreadable6 { src, dst, verdict });
    let mut offset = ip_offset + IPV6_HLEN;
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let Some(ext) = bytes_at(ctx, offset, 2) else {
                    return unreadable(Verdict::PassedMalformed);
                };
                let (n, len) = unsafe { (load_u8(ext), load_u8(ext + 1)) };
                next = n;
                offset += (len as usize + 1) * 8;
            }
            IPV6_FRAGMENT => {
                let Some(frag) = bytes_at(ctx, offset, IPV6_FRAG_HLEN) else {
                    return unreadable(Verdict::PassedMalformed);
                };
                let (n, offset_flags) = unsafe { (load_u8(frag), load_u16_be(frag + 2)) };
                let fragment = offset_flags >> 3;
                if fragment != 0 {
                    if rewrites_tcp_flags(fragment, n) {
                        return unreadable(Verdict::PassedFragment);
                    }
                    return Err(Verdict::PassedFragment);
                }
                next = n;
                offset += IPV6_FRAG_HLEN;
            }
            _ => break,
        }
        if offset > MAX_L4_OFFSET {
            return unreadable(Verdict::PassedMalformed);
        }
    }
    if matches!(
        next,
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_FRAGMENT
    ) {
        // Still inside the extension-header chain: longer than the program follows.
        return unreadable(Verdict::PassedMalformed);
    }
    match parse_l4(ctx, ip_offset, offset, next) {
        Ok(l4) => Ok(Packet::V6 { src, dst, l4 }),
        Err(Verdict::PassedMalformed) => unreadable(Verdict::PassedMalformed),
        Err(verdict) => Err(verdict),
    }
}

#[inline(always)]
fn parse_l4(ctx: &XdpContext, ip_offset: usize, offset: usize, proto: u8) -> Result<L4, Verdict> {
    if offset > MAX_L4_OFFSET {
        return Err(Verdict::PassedMalformed);
    }
    match proto {
        IPPROTO_TCP => {
            let tcp = bytes_at(ctx, offset, TCP_MIN_HLEN).ok_or(Verdict::PassedMalformed)?;
            let (data_offset, tcp_flags) = unsafe { (load_u8(tcp + 12) >> 4, load_u8(tcp + 13)) };
            if data_offset < 5 {
                return Err(Verdict::PassedMalformed);
            }
            // Every segment but a bare SYN belongs to a connection already admitted (or
            // refused at its SYN): decided here, before any address is even read, as
            // the cheapest path of the program.
            if !is_new_tcp_flow(tcp_flags) {
                return Err(Verdict::PassedEstablished);
            }
            let (sport, dport) = unsafe { (load_u16_be(tcp), load_u16_be(tcp + 2)) };
            Ok(L4 {
                proto,
                sport,
                dport,
                ip_offset: ip_offset as u16,
                l4_offset: offset as u16,
            })
        }
        IPPROTO_UDP => {
            let udp = bytes_at(ctx, offset, UDP_HLEN).ok_or(Verdict::PassedMalformed)?;
            let (sport, dport) = unsafe { (load_u16_be(udp), load_u16_be(udp + 2)) };
            Ok(L4 {
                proto,
                sport,
                dport,
                ip_offset: ip_offset as u16,
                l4_offset: offset as u16,
            })
        }
        _ => Err(Verdict::PassedOtherProtocol),
    }
}
