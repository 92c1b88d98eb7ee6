//! `on_expired = "reject"` on crafted packets: the reply the program builds in place,
//! checked byte by byte against RFC 9293 (RST), RFC 792 / RFC 4443 (ICMP errors) and an
//! independent checksum, for every header shape the parser accepts.

use std::net::IpAddr;

use agent_common::verdict::counter;
use netlab::{packets::*, privileged};

use crate::harness::*;

const REJECT: &str = r#"
[[policy]]
name = "App"
precedence = 10
destinations = ["198.19.10.0/24", "2001:db8:10::/48"]
check_session = { enforce = true, duration = "1h" }
on_expired = "reject"
"#;

/// RFC 1071 over bytes: 0 for a correct checksum.
fn fold(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in bytes.chunks(2) {
        sum += (u32::from(pair[0]) << 8) | u32::from(*pair.get(1).unwrap_or(&0));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo(src: &[u8], dst: &[u8], proto: u8, len: usize) -> Vec<u8> {
    let mut p = [src, dst].concat();
    if src.len() == 4 {
        p.extend([0, proto]);
        p.extend((len as u16).to_be_bytes());
    } else {
        p.extend((len as u32).to_be_bytes());
        p.extend([0, 0, 0, proto]);
    }
    p
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// The reply's IP header: addresses swapped, length and checksum right. Returns the
/// offset of what follows it.
fn check_ip(input: &[u8], out: &[u8], ip: usize, v6: bool, proto: u8) -> usize {
    // Link layer: addresses swapped, tags and EtherType kept.
    assert_eq!(out[..6], input[6..12]);
    assert_eq!(out[6..12], input[..6]);
    assert_eq!(out[12..ip], input[12..ip]);
    let (src, dst) = if v6 {
        (8..24, 24..40)
    } else {
        (12..16, 16..20)
    };
    assert_eq!(
        out[ip + src.start..ip + src.end],
        input[ip + dst.start..ip + dst.end]
    );
    assert_eq!(
        out[ip + dst.start..ip + dst.end],
        input[ip + src.start..ip + src.end]
    );
    if v6 {
        assert_eq!(out[ip] >> 4, 6);
        assert_eq!(out[ip + 6], proto);
        assert_eq!(usize::from(u16_at(out, ip + 4)), out.len() - ip - 40);
        ip + 40
    } else {
        assert_eq!(out[ip], 0x45);
        assert_eq!(out[ip + 9], proto);
        assert_eq!(usize::from(u16_at(out, ip + 2)), out.len() - ip);
        assert_eq!(fold(&out[ip..ip + 20]), 0, "IPv4 header checksum");
        ip + 20
    }
}

fn addresses(out: &[u8], ip: usize, v6: bool) -> (&[u8], &[u8]) {
    if v6 {
        (&out[ip + 8..ip + 24], &out[ip + 24..ip + 40])
    } else {
        (&out[ip + 12..ip + 16], &out[ip + 16..ip + 20])
    }
}

fn check_reset(p: &Packet, ip: usize, l4: usize) {
    let h = Harness::with_policies("", REJECT);
    let input = p.bytes();
    let (action, out) = h.reply(&input);
    assert_eq!(action, XDP_TX, "{p:?}");
    let v6 = matches!(p.dst, IpAddr::V6(_));
    let tcp = check_ip(&input, &out, ip, v6, 6);
    assert_eq!(out.len(), tcp + 20, "a bare TCP header: {p:?}");
    let (src, dst) = addresses(&out, ip, v6);
    let mut segment = pseudo(src, dst, 6, 20);
    segment.extend(&out[tcp..]);
    assert_eq!(fold(&segment), 0, "TCP checksum: {p:?}");
    assert_eq!(out[tcp..tcp + 2], input[l4 + 2..l4 + 4], "ports swapped");
    assert_eq!(out[tcp + 2..tcp + 4], input[l4..l4 + 2], "ports swapped");
    assert_eq!(u32_at(&out, tcp + 4), 0, "seq 0: the SYN had no ACK");
    // The SYN's sequence number, plus 1 for the SYN, plus its payload.
    let payload = (input.len() - l4 - 20) as u32;
    assert_eq!(u32_at(&out, tcp + 8), u32_at(&input, l4 + 4) + 1 + payload);
    assert_eq!(out[tcp + 12], 5 << 4);
    assert_eq!(out[tcp + 13], 0x14, "RST|ACK");
    assert_eq!(h.counter(counter::REPLIES_TCP_RESET), 1);
}

fn check_unreachable(p: &Packet, ip: usize) {
    let h = Harness::with_policies("", REJECT);
    let input = p.bytes();
    let (action, out) = h.reply(&input);
    assert_eq!(action, XDP_TX, "{p:?}");
    let v6 = matches!(p.dst, IpAddr::V6(_));
    let icmp = check_ip(&input, &out, ip, v6, if v6 { 58 } else { 1 });
    let quote = &out[icmp + 8..];
    // As much of the refused packet as fits (all of these small ones), whole words.
    let offending = &input[ip..];
    assert_eq!(quote.len(), offending.len() & !3, "{p:?}");
    assert_eq!(
        quote,
        &offending[..quote.len()],
        "the offending packet, quoted"
    );
    let message = &out[icmp..];
    if v6 {
        assert_eq!(message[..2], [1, 1], "destination unreachable, prohibited");
        let (src, dst) = addresses(&out, ip, v6);
        let mut all = pseudo(src, dst, 58, message.len());
        all.extend(message);
        assert_eq!(fold(&all), 0, "ICMPv6 checksum: {p:?}");
    } else {
        assert_eq!(message[..2], [3, 13], "destination unreachable, prohibited");
        assert_eq!(fold(message), 0, "ICMP checksum: {p:?}");
    }
    assert_eq!(message[4..8], [0; 4]);
    assert_eq!(h.counter(counter::REPLIES_ICMP), 1);
}

#[test]
fn resets_are_right_for_every_header_shape() {
    if !privileged!() {
        return;
    }
    let app4 = ip("198.19.10.5");
    let app6 = ip("2001:db8:10::5");
    let (d4, d6) = (v4(EXPIRED), v6(EXPIRED));
    check_reset(&Packet::syn(d4, app4, 443), 14, 34);
    check_reset(
        &Packet::syn(d4, app4, 443).vlan(ETH_8021AD).vlan(ETH_8021Q),
        22,
        42,
    );
    check_reset(&Packet::syn(d4, app4, 443).options(8), 14, 42);
    check_reset(&Packet::syn(d6, app6, 443), 14, 54);
    check_reset(&Packet::syn(d6, app6, 443).vlan(ETH_8021Q), 18, 58);
    check_reset(&Packet::syn(d6, app6, 443).ext(Ext::DestOpts), 14, 62);
    let mut bare = Packet::syn(d4, app4, 443);
    bare.payload = 0;
    check_reset(&bare, 14, 34);
}

#[test]
fn icmp_errors_quote_the_refused_datagram() {
    if !privileged!() {
        return;
    }
    let app4 = ip("198.19.10.5");
    let app6 = ip("2001:db8:10::5");
    let (d4, d6) = (v4(EXPIRED), v6(EXPIRED));
    check_unreachable(&Packet::udp(d4, app4, 5000, 4433), 14);
    check_unreachable(&Packet::udp(d4, app4, 5000, 4433).vlan(ETH_8021Q), 18);
    check_unreachable(&Packet::udp(d4, app4, 5000, 4433).options(4), 14);
    check_unreachable(&Packet::udp(d6, app6, 5000, 4433), 14);
    check_unreachable(&Packet::udp(d6, app6, 5000, 4433).ext(Ext::HopByHop), 14);
    check_unreachable(
        &Packet::udp(d6, app6, 5000, 4433)
            .vlan(ETH_8021AD)
            .vlan(ETH_8021Q),
        22,
    );
    // A large datagram is quoted up to the limits: 576 bytes of IPv4, the IPv6 minimum MTU.
    let mut big = Packet::udp(d4, app4, 5000, 4433);
    big.payload = 1400;
    let h = Harness::with_policies("", REJECT);
    let (action, out) = h.reply(&big.bytes());
    assert_eq!((action, out.len()), (XDP_TX, 14 + 576));
    let mut big6 = Packet::udp(d6, app6, 5000, 4433);
    big6.payload = 1400;
    let (action, out) = h.reply(&big6.bytes());
    assert_eq!((action, out.len()), (XDP_TX, 14 + 1280));
}

#[test]
fn a_fresh_device_and_other_policies_get_no_reply() {
    if !privileged!() {
        return;
    }
    let h = Harness::with_policies("", REJECT);
    let app4 = ip("198.19.10.5");
    let syn = Packet::syn(v4(FRESH), app4, 443).bytes();
    assert_eq!(h.reply(&syn), (XDP_PASS, syn.clone()));
    // Beyond the reply rate, refusals are dropped and counted.
    let h = Harness::with_policies("reply_rate = 1\nreply_burst = 2", REJECT);
    let syn = Packet::syn(v4(EXPIRED), app4, 443).bytes();
    let actions: Vec<u32> = (0..5).map(|_| h.reply(&syn).0).collect();
    assert_eq!(actions, [XDP_TX, XDP_TX, XDP_DROP, XDP_DROP, XDP_DROP]);
    assert_eq!(h.counter(counter::REPLIES_RATE_LIMITED), 3);
    // Per device: another expired device still gets its reply.
    let other = Packet::syn(v4(ANCIENT), app4, 443).bytes();
    assert_eq!(h.reply(&other).0, XDP_TX);
}

#[test]
fn redirects_hand_over_only_the_shapes_the_portal_program_parses() {
    if !privileged!() {
        return;
    }
    let redirect = REJECT.replace(r#"on_expired = "reject""#, r#"on_expired = "redirect""#);
    let agent = "portal_listen = \"[::]:8511\"\nreauth_url = \"https://login.example.com/\"";
    let h = Harness::with_policies(agent, &redirect);
    let app4 = ip("198.19.10.5");
    let app6 = ip("2001:db8:10::5");
    let (d4, d6) = (v4(EXPIRED), v6(EXPIRED));
    // Handed over: passed on, for the TC program to deliver.
    for syn in [
        Packet::syn(d4, app4, 80),
        Packet::syn(d4, app4, 80).options(8),
        Packet::syn(d6, app6, 80),
    ] {
        assert_eq!(h.reply(&syn.bytes()).0, XDP_PASS, "{syn:?}");
    }
    assert_eq!(h.counter(counter::PORTAL_REDIRECTED), 3);
    // Shapes the TC program would not recognise as handed over are reset instead:
    // passed on, they would reach the application.
    for syn in [
        Packet::syn(d4, app4, 80).vlan(ETH_8021Q),
        Packet::syn(d6, app6, 80).ext(Ext::DestOpts),
    ] {
        assert_eq!(h.reply(&syn.bytes()).0, XDP_TX, "{syn:?}");
    }
    assert_eq!(h.counter(counter::PORTAL_REDIRECTED), 3);
    assert_eq!(h.counter(counter::REPLIES_TCP_RESET), 2);
}
