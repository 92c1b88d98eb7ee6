//! Visible refusals, built in place from the refused packet and sent back out of the
//! interface it came in on (XDP_TX): a TCP RST for a SYN, an ICMP / ICMPv6
//! "administratively prohibited" error quoting a UDP datagram. And the hand-over of a
//! SYN to the portal (`SG_PORTAL_HANDOFF`, then `portal.rs`). Each reply is out of line: it runs at most
//! a few times a second per device (`reply_allowed`), and inlined it would crowd the
//! judging path's registers.
//!
//! Every header is written as the memory image of its words (`checksum` explains why
//! checksums then need no byte swapping). Replies come from the refused packet's
//! destination address, as a firewall's reject on the path reads to the client.

use agent_common::{
    checksum::{Checksum, be16, be32},
    hashing::{bucket, check},
    logic::reply_due,
    maps::{self, PortalHandoff, Settings},
    verdict::counter,
};
use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::{bpf_ktime_get_boot_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};

use crate::{
    maps::{SG_PORTAL_HANDOFF, SG_REPLY_LIMIT},
    packet::{load_u8, load_u16, load_u16_be, load_u32, load_u64, store_u16, store_u32, store_u64},
    parse::{
        ETH_HLEN, IPV4_MIN_HLEN, IPV6_HLEN, L4, MAX_IP_OFFSET, MAX_L4_OFFSET, TCP_MIN_HLEN,
        UDP_HLEN,
    },
    report::count,
};

/// The headers replies write: IPv4 and TCP without options.
const IPV4_HLEN: usize = IPV4_MIN_HLEN;
const TCP_HLEN: usize = TCP_MIN_HLEN;
const ICMP_HLEN: usize = 8;
const IPPROTO_TCP: u16 = maps::IPPROTO_TCP as u16;
const IPPROTO_ICMPV6: u32 = 58;
const TCP_FIN: u8 = 0x01;
/// Data offset 5 words, flags RST|ACK.
const TCP_RST_ACK: u16 = 0x5014;
/// ICMP destination unreachable (3), communication administratively prohibited (13).
const ICMP4_PROHIBITED: u16 = 0x030d;
/// ICMPv6 destination unreachable (1), administratively prohibited (1).
const ICMP6_PROHIBITED: u16 = 0x0101;
/// Quoted bytes of a refused datagram: as much as fits in 576 bytes (RFC 1812, beyond
/// RFC 792's header plus 8 bytes) or in the IPv6 minimum MTU (RFC 4443), in whole
/// words so that the checksum loop reads words only.
const ICMP4_QUOTE_MAX: usize = 576 - IPV4_HLEN - ICMP_HLEN;
const ICMP6_QUOTE_MAX: usize = 1280 - IPV6_HLEN - ICMP_HLEN;

/// Whether a refusal of this device (`device_folded`) may be answered or redirected
/// now; counts it as rate-limited if not.
#[inline(always)]
pub fn reply_allowed(device_folded: u64, now_ns: u64, settings: &Settings) -> bool {
    let mine = check(device_folded, 0);
    let Some(slot) = SG_REPLY_LIMIT.get_ptr_mut(bucket(device_folded, settings.reply_slot_mask))
    else {
        return false;
    };
    // SAFETY: a live array element; racing writers at worst let one extra reply out.
    unsafe {
        let next = if (*slot).check == mine {
            Some((*slot).next_ns)
        } else {
            None
        };
        match reply_due(
            now_ns,
            next,
            settings.reply_interval_ns,
            settings.reply_tolerance_ns,
        ) {
            Some(next) => {
                (*slot).check = mine;
                (*slot).next_ns = next;
                true
            }
            None => {
                count(counter::REPLIES_RATE_LIMITED);
                false
            }
        }
    }
}

/// Answers a refused SYN or datagram; the XDP action.
#[inline(always)]
pub fn reject(ctx: &XdpContext, l4: &L4, ipv6: bool) -> u32 {
    let (ip, transport) = (l4.ip_offset as usize, l4.l4_offset as usize);
    match (ipv6, l4.proto as u16 == IPPROTO_TCP) {
        (false, true) => tcp_reset_v4(ctx, ip, transport),
        (true, true) => tcp_reset_v6(ctx, ip, transport),
        (false, false) => icmp_v4(ctx, ip),
        (true, false) => icmp_v6(ctx, ip),
    }
}

/// Hands a refused SYN to the portal: records it in `SG_PORTAL_HANDOFF` for the TC
/// program, which delivers it. Only the shapes the TC program parses (untagged
/// Ethernet, IPv6 with TCP right after its fixed header) are handed over: one it could
/// not recognise would reach the application, so those are rejected instead.
#[inline(never)]
pub fn to_portal(ctx: &XdpContext, l4: &L4, ipv6: bool) -> u32 {
    let (ip, tcp) = (l4.ip_offset as usize, l4.l4_offset as usize);
    if ip != ETH_HLEN || (ipv6 && tcp != ETH_HLEN + IPV6_HLEN) || tcp > MAX_L4_OFFSET {
        return reject(ctx, l4, ipv6);
    }
    let start = ctx.data();
    let (iph, tcph) = (start + ETH_HLEN, start + tcp);
    if iph + IPV6_HLEN > ctx.data_end() || tcph + 4 > ctx.data_end() {
        return failed();
    }
    let mut key = PortalHandoff::default();
    // SAFETY (all loads): within the bounds checked above (an IPv4 SYN's IP and TCP
    // headers together are at least `IPV6_HLEN` bytes).
    unsafe {
        key.ports = load_u32(tcph);
        if ipv6 {
            key.family = 6;
            for i in 0..4 {
                key.src[i] = load_u32(iph + 8 + 4 * i);
                key.dst[i] = load_u32(iph + 24 + 4 * i);
            }
        } else {
            key.family = 4;
            key.src[0] = load_u32(iph + 12);
            key.dst[0] = load_u32(iph + 16);
        }
    }
    // SAFETY: a helper without pointer arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if SG_PORTAL_HANDOFF.insert(key, now, 0).is_err() {
        return failed();
    }
    count(counter::PORTAL_REDIRECTED);
    XDP_PASS
}

fn failed() -> u32 {
    count(counter::REPLIES_FAILED);
    XDP_DROP
}

/// Swaps the Ethernet addresses at `eth` and writes them to `to` (may be `eth`).
///
/// # Safety
/// 12 bytes at both addresses must be in bounds.
#[inline(always)]
unsafe fn reverse_macs(eth: usize, to: usize) {
    // SAFETY: by the caller.
    unsafe {
        let (d0, d1) = (load_u32(eth), load_u16(eth + 4));
        let (s0, s1) = (load_u32(eth + 6), load_u16(eth + 10));
        store_u32(to, s0);
        store_u16(to + 4, s1);
        store_u32(to + 6, d0);
        store_u16(to + 10, d1);
    }
}

/// Cuts the packet to `len` bytes; all packet pointers are stale afterwards.
#[inline(always)]
fn truncate(ctx: &XdpContext, len: usize) -> bool {
    let delta = len as i64 - (ctx.data_end() - ctx.data()) as i64;
    // SAFETY: the helper checks the new length itself.
    delta <= 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta as i32) } == 0
}

/// The acknowledgement number of a RST answering a segment without ACK (RFC 9293
/// 3.10.7.1): its sequence number plus its length, SYN and FIN included.
#[inline(always)]
fn reset_ack(seq: u32, segment_len: u32, tcp_header_len: u32, flags: u8) -> Option<u32> {
    let payload = segment_len.checked_sub(tcp_header_len)?;
    Some(
        seq.wrapping_add(1)
            .wrapping_add(payload)
            .wrapping_add((flags & TCP_FIN) as u32),
    )
}

#[inline(never)]
fn tcp_reset_v4(ctx: &XdpContext, ip: usize, tcp: usize) -> u32 {
    // No relation between `ip` and `tcp` is checked before the bounds: the compiler
    // would use it to drop a bounds check the verifier needs.
    if ip > MAX_IP_OFFSET || tcp > MAX_L4_OFFSET {
        return failed();
    }
    let start = ctx.data();
    let end = ctx.data_end();
    let (iph, tcph) = (start + ip, start + tcp);
    if start + ETH_HLEN > end || iph + IPV4_HLEN + TCP_HLEN > end || tcph + TCP_HLEN > end {
        return failed();
    }
    // SAFETY (all packet accesses): within the bounds checked above.
    let (saddr, daddr, ports, ack) = unsafe {
        let total_len = load_u16_be(iph + 2) as u32;
        let header_len = ((load_u8(tcph + 12) >> 4) as u32) * 4;
        let seq = u32::from_be(load_u32(tcph + 4));
        let headers = tcp.wrapping_sub(ip);
        if headers < IPV4_HLEN {
            return failed();
        }
        let Some(segment) = total_len.checked_sub(headers as u32) else {
            return failed();
        };
        let Some(ack) = reset_ack(seq, segment, header_len, load_u8(tcph + 13)) else {
            return failed();
        };
        (load_u32(iph + 12), load_u32(iph + 16), load_u32(tcph), ack)
    };
    // Source and destination swap; the ports' memory image is two 16-bit halves.
    let ports = ports.rotate_left(16);
    let version_len = be32(0x4500_0000 | (IPV4_HLEN + TCP_HLEN) as u32);
    let ttl_proto = be16(0x4000 | IPPROTO_TCP);
    let ip_sum = Checksum::new()
        .add32(version_len)
        .add16(ttl_proto)
        .add32(daddr)
        .add32(saddr)
        .finish();
    let tcp_sum = Checksum::new()
        .add32(daddr)
        .add32(saddr)
        .add16(be16(IPPROTO_TCP))
        .add16(be16(TCP_HLEN as u16))
        .add32(ports)
        .add32(be32(ack))
        .add16(be16(TCP_RST_ACK))
        .finish();
    unsafe {
        reverse_macs(start, start);
        store_u32(iph, version_len);
        store_u32(iph + 4, 0); // id 0, no flags
        store_u16(iph + 8, ttl_proto);
        store_u16(iph + 10, ip_sum);
        store_u32(iph + 12, daddr);
        store_u32(iph + 16, saddr);
        let t = iph + IPV4_HLEN;
        store_u32(t, ports);
        store_u32(t + 4, 0); // seq 0: the SYN carried no ACK
        store_u32(t + 8, be32(ack));
        store_u16(t + 12, be16(TCP_RST_ACK));
        store_u16(t + 14, 0); // window
        store_u16(t + 16, tcp_sum);
        store_u16(t + 18, 0); // urgent pointer
    }
    if !truncate(ctx, ip + IPV4_HLEN + TCP_HLEN) {
        return failed();
    }
    count(counter::REPLIES_TCP_RESET);
    XDP_TX
}

#[inline(never)]
fn tcp_reset_v6(ctx: &XdpContext, ip: usize, tcp: usize) -> u32 {
    // As in `tcp_reset_v4`.
    if ip > MAX_IP_OFFSET || tcp > MAX_L4_OFFSET {
        return failed();
    }
    let start = ctx.data();
    let end = ctx.data_end();
    let (iph, tcph) = (start + ip, start + tcp);
    if start + ETH_HLEN > end || iph + IPV6_HLEN + TCP_HLEN > end || tcph + TCP_HLEN > end {
        return failed();
    }
    // SAFETY (all packet accesses): within the bounds checked above.
    let (saddr, daddr, ports, ack) = unsafe {
        let payload_len = load_u16_be(iph + 4) as u32;
        let header_len = ((load_u8(tcph + 12) >> 4) as u32) * 4;
        let seq = u32::from_be(load_u32(tcph + 4));
        // Extension headers between the fixed header and TCP count in the payload.
        let headers = tcp.wrapping_sub(ip);
        if headers < IPV6_HLEN {
            return failed();
        }
        let Some(segment) = payload_len.checked_sub((headers - IPV6_HLEN) as u32) else {
            return failed();
        };
        let Some(ack) = reset_ack(seq, segment, header_len, load_u8(tcph + 13)) else {
            return failed();
        };
        (
            [load_u64(iph + 8), load_u64(iph + 16)],
            [load_u64(iph + 24), load_u64(iph + 32)],
            load_u32(tcph),
            ack,
        )
    };
    let ports = ports.rotate_left(16);
    // Payload length 20, next header TCP, hop limit 64.
    let len_next_hop = be32((TCP_HLEN as u32) << 16 | (IPPROTO_TCP as u32) << 8 | 64);
    let tcp_sum = Checksum::new()
        .add64(daddr[0])
        .add64(daddr[1])
        .add64(saddr[0])
        .add64(saddr[1])
        .add32(be32(TCP_HLEN as u32))
        .add32(be32(IPPROTO_TCP as u32))
        .add32(ports)
        .add32(be32(ack))
        .add16(be16(TCP_RST_ACK))
        .finish();
    unsafe {
        reverse_macs(start, start);
        store_u32(iph, be32(0x6000_0000));
        store_u32(iph + 4, len_next_hop);
        store_u64(iph + 8, daddr[0]);
        store_u64(iph + 16, daddr[1]);
        store_u64(iph + 24, saddr[0]);
        store_u64(iph + 32, saddr[1]);
        let t = iph + IPV6_HLEN;
        store_u32(t, ports);
        store_u32(t + 4, 0);
        store_u32(t + 8, be32(ack));
        store_u16(t + 12, be16(TCP_RST_ACK));
        store_u16(t + 14, 0);
        store_u16(t + 16, tcp_sum);
        store_u16(t + 18, 0);
    }
    if !truncate(ctx, ip + IPV6_HLEN + TCP_HLEN) {
        return failed();
    }
    count(counter::REPLIES_TCP_RESET);
    XDP_TX
}

/// Makes room for `grow` bytes of new headers in front of the packet and moves the
/// link-layer header (MACs reversed, VLAN tags and EtherType kept) to the new front.
/// Returns the new start and the end.
#[inline(always)]
fn grow_front(ctx: &XdpContext, ip: usize, grow: usize) -> Option<(usize, usize)> {
    // SAFETY: the helper checks the headroom itself.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } != 0 {
        return None;
    }
    let start = ctx.data();
    let end = ctx.data_end();
    let old = start + grow;
    if old + MAX_IP_OFFSET > end || ip > MAX_IP_OFFSET {
        return None;
    }
    // SAFETY: both link-layer headers lie within the checked `MAX_IP_OFFSET` bytes,
    // and the new one ends before the old one's tags are read (`grow` >= 28).
    unsafe {
        reverse_macs(old, start);
        let mut offset = 12;
        while offset < MAX_IP_OFFSET {
            if offset >= ip {
                break;
            }
            store_u16(start + offset, load_u16(old + offset));
            offset += 2;
        }
    }
    Some((start, end))
}

/// Checksums the ICMP message from `offset` to the end of the packet (already cut to
/// it, in whole words, checksum field 0) onto `sum`, stores the checksum, and sends the
/// reply. Out of line and last: each exit of the word loop leaves the verifier only
/// these few instructions to follow, where a loop in the middle of the builder made it
/// walk the rest of the builder once per possible length. The packet's bounds come as
/// words: given the context, the compiler narrowed them to 32 bits, which the verifier
/// refuses on pointers.
#[inline(never)]
fn send_icmp(start: usize, end: usize, offset: usize, sum: Checksum) -> u32 {
    const MAX_WORDS: usize = (ICMP_HLEN + ICMP6_QUOTE_MAX) / 4;
    if offset > MAX_IP_OFFSET + IPV6_HLEN {
        return failed();
    }
    let icmp = start + offset;
    if icmp + ICMP_HLEN > end {
        return failed();
    }
    let mut sum = sum;
    let mut word = 0;
    while word < MAX_WORDS {
        let p = icmp + 4 * word;
        if p + 4 > end {
            break;
        }
        // SAFETY: checked just above.
        sum = sum.add32(unsafe { load_u32(p) });
        word += 1;
    }
    // SAFETY: the ICMP header was checked above.
    unsafe { store_u16(icmp + 2, sum.finish()) };
    count(counter::REPLIES_ICMP);
    XDP_TX
}

#[inline(never)]
fn icmp_v4(ctx: &XdpContext, ip: usize) -> u32 {
    const GROW: usize = IPV4_HLEN + ICMP_HLEN;
    let Some((start, end)) = grow_front(ctx, ip, GROW) else {
        return failed();
    };
    // Every pointer from one base at constant offsets, checked once: the verifier
    // cannot relate pointers computed apart, and the compiler drops checks it can.
    let iph = start + ip;
    if iph + GROW + IPV4_HLEN + UDP_HLEN > end {
        return failed();
    }
    let quoted = iph + GROW;
    // SAFETY: within the bounds checked above.
    let (total_len, saddr, daddr) = unsafe {
        (
            load_u16_be(quoted + 2) as usize,
            load_u32(quoted + 12),
            load_u32(quoted + 16),
        )
    };
    let quote = min(min(total_len, end - quoted), ICMP4_QUOTE_MAX) & !3;
    if quote < IPV4_HLEN + UDP_HLEN {
        return failed();
    }
    let icmp = iph + IPV4_HLEN;
    let version_len = be32(0x4500_0000 | (GROW + quote) as u32);
    let ttl_proto = be16(0x4001);
    let ip_sum = Checksum::new()
        .add32(version_len)
        .add16(ttl_proto)
        .add32(daddr)
        .add32(saddr)
        .finish();
    // SAFETY: `iph` to `icmp + ICMP_HLEN` was checked above.
    unsafe {
        store_u32(iph, version_len);
        store_u32(iph + 4, 0);
        store_u16(iph + 8, ttl_proto);
        store_u16(iph + 10, ip_sum);
        store_u32(iph + 12, daddr);
        store_u32(iph + 16, saddr);
        store_u16(icmp, be16(ICMP4_PROHIBITED));
        store_u16(icmp + 2, 0);
        store_u32(icmp + 4, 0);
    }
    if !truncate(ctx, ip + GROW + quote) {
        return failed();
    }
    send_icmp(ctx.data(), ctx.data_end(), ip + IPV4_HLEN, Checksum::new())
}

#[inline(never)]
fn icmp_v6(ctx: &XdpContext, ip: usize) -> u32 {
    const GROW: usize = IPV6_HLEN + ICMP_HLEN;
    let Some((start, end)) = grow_front(ctx, ip, GROW) else {
        return failed();
    };
    // Every pointer from one base at constant offsets, checked once: the verifier
    // cannot relate pointers computed apart, and the compiler drops checks it can.
    let iph = start + ip;
    if iph + GROW + IPV6_HLEN + UDP_HLEN > end {
        return failed();
    }
    let quoted = iph + GROW;
    // SAFETY: within the bounds checked above.
    let (payload_len, saddr, daddr) = unsafe {
        (
            load_u16_be(quoted + 4) as usize,
            [load_u64(quoted + 8), load_u64(quoted + 16)],
            [load_u64(quoted + 24), load_u64(quoted + 32)],
        )
    };
    let quote = min(min(IPV6_HLEN + payload_len, end - quoted), ICMP6_QUOTE_MAX) & !3;
    if quote < IPV6_HLEN + UDP_HLEN {
        return failed();
    }
    let icmp = iph + IPV6_HLEN;
    let message_len = (ICMP_HLEN + quote) as u32;
    let len_next_hop = be32(message_len << 16 | IPPROTO_ICMPV6 << 8 | 64);
    let pseudo = Checksum::new()
        .add64(daddr[0])
        .add64(daddr[1])
        .add64(saddr[0])
        .add64(saddr[1])
        .add32(be32(message_len))
        .add32(be32(IPPROTO_ICMPV6));
    // SAFETY: `iph` to `icmp + ICMP_HLEN` was checked above.
    unsafe {
        store_u32(iph, be32(0x6000_0000));
        store_u32(iph + 4, len_next_hop);
        store_u64(iph + 8, daddr[0]);
        store_u64(iph + 16, daddr[1]);
        store_u64(iph + 24, saddr[0]);
        store_u64(iph + 32, saddr[1]);
        store_u16(icmp, be16(ICMP6_PROHIBITED));
        store_u16(icmp + 2, 0);
        store_u32(icmp + 4, 0);
    }
    if !truncate(ctx, ip + GROW + quote) {
        return failed();
    }
    send_icmp(ctx.data(), ctx.data_end(), ip + IPV6_HLEN, pseudo)
}

#[inline(always)]
fn min(a: usize, b: usize) -> usize {
    if a < b { a } else { b }
}
