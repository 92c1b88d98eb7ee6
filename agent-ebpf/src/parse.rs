//! Header parsing: Ethernet, up to two VLAN tags, IPv4 with options, IPv6 with its
//! extension headers, then TCP or UDP. Anything it cannot or need not judge comes back
//! as a passing verdict; it never fails in any other way.

use agent_common::{
    maps::{IPPROTO_TCP, IPPROTO_UDP},
    verdict::Verdict,
};
use aya_ebpf::programs::XdpContext;

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;
/// Extension headers followed before giving up on a chain as bogus.
const IPV6_MAX_EXT_HEADERS: usize = 6;
/// Offsets beyond this are not parsed; it keeps every offset visibly bounded for the
/// verifier and is far beyond any sane header stack.
const MAX_L4_OFFSET: usize = 1024;

#[repr(C)]
struct EthHdr {
    dst: [u8; 6],
    src: [u8; 6],
    proto: [u8; 2],
}

#[repr(C)]
struct VlanHdr {
    tci: [u8; 2],
    proto: [u8; 2],
}

#[repr(C)]
struct Ipv4Hdr {
    version_ihl: u8,
    tos: u8,
    total_len: [u8; 2],
    id: [u8; 2],
    frag_off: [u8; 2],
    ttl: u8,
    proto: u8,
    check: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
}

#[repr(C)]
struct Ipv6Hdr {
    version_class_flow: [u8; 4],
    payload_len: [u8; 2],
    next_header: u8,
    hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

/// The first two bytes shared by hop-by-hop, routing and destination-options headers.
#[repr(C)]
struct Ipv6ExtHdr {
    next_header: u8,
    len_8_octets: u8,
}

#[repr(C)]
struct Ipv6FragHdr {
    next_header: u8,
    reserved: u8,
    offset_flags: [u8; 2],
    id: [u8; 4],
}

#[repr(C)]
struct TcpHdr {
    sport: [u8; 2],
    dport: [u8; 2],
    seq: [u8; 4],
    ack: [u8; 4],
    data_offset: u8,
    flags: u8,
    window: [u8; 2],
    check: [u8; 2],
    urgent: [u8; 2],
}

#[repr(C)]
struct UdpHdr {
    sport: [u8; 2],
    dport: [u8; 2],
    len: [u8; 2],
    check: [u8; 2],
}

/// The L4 facts the verdict needs; ports in host order.
#[derive(Clone, Copy)]
pub struct L4 {
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte; 0 for UDP.
    pub tcp_flags: u8,
}

pub enum Packet {
    V4 {
        src: [u8; 4],
        dst: [u8; 4],
        l4: L4,
    },
    V6 {
        src: [u8; 16],
        dst: [u8; 16],
        l4: L4,
    },
}

/// A pointer to a `T` at `offset` in the packet, if the packet holds all of it.
#[inline(always)]
fn header<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
const fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Parses a packet down to its L4 header, or says why it passes unjudged.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Verdict> {
    let eth: *const EthHdr = header(ctx, 0).ok_or(Verdict::PassedMalformed)?;
    let mut proto = be16(unsafe { (*eth).proto });
    let mut offset = size_of::<EthHdr>();
    // Up to two tags (802.1ad outer, 802.1Q inner); a third leaves a VLAN ethertype,
    // which passes as another protocol.
    for _ in 0..2 {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        let vlan: *const VlanHdr = header(ctx, offset).ok_or(Verdict::PassedMalformed)?;
        proto = be16(unsafe { (*vlan).proto });
        offset += size_of::<VlanHdr>();
    }
    match proto {
        ETH_P_IPV4 => parse_ipv4(ctx, offset),
        ETH_P_IPV6 => parse_ipv6(ctx, offset),
        _ => Err(Verdict::PassedOtherProtocol),
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, offset: usize) -> Result<Packet, Verdict> {
    let ip: *const Ipv4Hdr = header(ctx, offset).ok_or(Verdict::PassedMalformed)?;
    let (version_ihl, frag_off, total_len, proto, src, dst) = unsafe {
        (
            (*ip).version_ihl,
            be16((*ip).frag_off),
            be16((*ip).total_len) as usize,
            (*ip).proto,
            (*ip).src,
            (*ip).dst,
        )
    };
    let header_len = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || header_len < size_of::<Ipv4Hdr>() || total_len < header_len {
        return Err(Verdict::PassedMalformed);
    }
    // A non-first fragment has no L4 header; the first fragment (offset 0) is judged.
    if frag_off & 0x1fff != 0 {
        return Err(Verdict::PassedFragment);
    }
    let l4 = parse_l4(ctx, offset + header_len, proto)?;
    Ok(Packet::V4 { src, dst, l4 })
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, offset: usize) -> Result<Packet, Verdict> {
    let ip: *const Ipv6Hdr = header(ctx, offset).ok_or(Verdict::PassedMalformed)?;
    let (version, mut next, src, dst) = unsafe {
        (
            (*ip).version_class_flow[0] >> 4,
            (*ip).next_header,
            (*ip).src,
            (*ip).dst,
        )
    };
    if version != 6 {
        return Err(Verdict::PassedMalformed);
    }
    let mut offset = offset + size_of::<Ipv6Hdr>();
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let ext: *const Ipv6ExtHdr = header(ctx, offset).ok_or(Verdict::PassedMalformed)?;
                let (n, len) = unsafe { ((*ext).next_header, (*ext).len_8_octets) };
                next = n;
                offset += (len as usize + 1) * 8;
            }
            IPV6_FRAGMENT => {
                let frag: *const Ipv6FragHdr =
                    header(ctx, offset).ok_or(Verdict::PassedMalformed)?;
                let (n, offset_flags) =
                    unsafe { ((*frag).next_header, be16((*frag).offset_flags)) };
                if offset_flags & 0xfff8 != 0 {
                    return Err(Verdict::PassedFragment);
                }
                next = n;
                offset += size_of::<Ipv6FragHdr>();
            }
            _ => break,
        }
        if offset > MAX_L4_OFFSET {
            return Err(Verdict::PassedMalformed);
        }
    }
    if matches!(
        next,
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_FRAGMENT
    ) {
        // Still inside the extension-header chain: too long to be genuine.
        return Err(Verdict::PassedMalformed);
    }
    let l4 = parse_l4(ctx, offset, next)?;
    Ok(Packet::V6 { src, dst, l4 })
}

#[inline(always)]
fn parse_l4(ctx: &XdpContext, offset: usize, proto: u8) -> Result<L4, Verdict> {
    if offset > MAX_L4_OFFSET {
        return Err(Verdict::PassedMalformed);
    }
    match proto {
        IPPROTO_TCP => {
            let tcp: *const TcpHdr = header(ctx, offset).ok_or(Verdict::PassedMalformed)?;
            let (sport, dport, data_offset, flags) = unsafe {
                (
                    be16((*tcp).sport),
                    be16((*tcp).dport),
                    (*tcp).data_offset >> 4,
                    (*tcp).flags,
                )
            };
            if data_offset < 5 {
                return Err(Verdict::PassedMalformed);
            }
            Ok(L4 {
                proto,
                sport,
                dport,
                tcp_flags: flags,
            })
        }
        IPPROTO_UDP => {
            let udp: *const UdpHdr = header(ctx, offset).ok_or(Verdict::PassedMalformed)?;
            let (sport, dport) = unsafe { (be16((*udp).sport), be16((*udp).dport)) };
            Ok(L4 {
                proto,
                sport,
                dport,
                tcp_flags: 0,
            })
        }
        _ => Err(Verdict::PassedOtherProtocol),
    }
}
