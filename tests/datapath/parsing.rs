//! Packet shapes: which headers the program looks through (VLAN tags, IPv4 options
//! and fragments, IPv6 extension headers), which TCP segments it judges, and what
//! passes unjudged as another protocol or as malformed.

use agent_common::verdict::Verdict;
use netlab::{packets::*, privileged};

use crate::harness::*;

#[test]
fn only_bare_syns_open_tcp_flows() {
    if !privileged!() {
        return;
    }
    let h = Harness::new("");
    let app = ip("198.19.10.5");
    for flags in [
        TCP_ACK,
        TCP_SYN | TCP_ACK,
        0x04, /* RST */
        0x11, /* FIN ACK */
        0x18, /* PSH ACK */
    ] {
        passes(
            &h,
            &Packet::tcp(v4(EXPIRED), app, 443, flags),
            Verdict::PassedEstablished,
        );
        passes(
            &h,
            &Packet::tcp(v4(UNKNOWN), app, 443, flags),
            Verdict::PassedEstablished,
        );
    }
    // SYN with ECN bits is still a new connection.
    drops(
        &h,
        &Packet::tcp(v4(EXPIRED), app, 443, TCP_SYN | 0xc0),
        Verdict::DroppedExpired,
    );
    // A SYN as real stacks send it: don't-fragment set, 20 bytes of TCP options.
    let mut real = Packet::syn(v4(EXPIRED), app, 443);
    real.ipv4_frag = 0x4000;
    real.payload = 20;
    let mut bytes = real.bytes();
    bytes[ETH_LEN + IPV4_LEN + 12] = 10 << 4; // data offset: 10 words
    assert_eq!(h.run(&bytes), (XDP_DROP, Verdict::DroppedExpired));
    bytes[ETH_LEN + IPV4_LEN + 13] = TCP_SYN | TCP_ACK;
    assert_eq!(h.run(&bytes), (XDP_PASS, Verdict::PassedEstablished));
}

#[test]
fn other_protocols_pass() {
    if !privileged!() {
        return;
    }
    let h = Harness::new("");
    assert_eq!(h.run(&arp()), (XDP_PASS, Verdict::PassedOtherProtocol));
    let icmp = Packet::new(
        v4(EXPIRED),
        ip("198.19.10.5"),
        L4::Other { proto: PROTO_ICMP },
    );
    passes(&h, &icmp, Verdict::PassedOtherProtocol);
    let icmp6 = Packet::new(
        v6(11),
        ip("2001:db8:10::5"),
        L4::Other {
            proto: PROTO_ICMPV6,
        },
    );
    passes(&h, &icmp6, Verdict::PassedOtherProtocol);
    // ESP, SCTP: not TCP or UDP, never judged.
    for proto in [50, 132] {
        passes(
            &h,
            &Packet::new(v4(EXPIRED), ip("198.19.10.5"), L4::Other { proto }),
            Verdict::PassedOtherProtocol,
        );
    }
}

#[test]
fn vlan_tags_are_looked_through() {
    if !privileged!() {
        return;
    }
    let h = Harness::new("");
    let app = ip("198.19.10.5");
    for tags in [
        vec![ETH_8021Q],
        vec![ETH_8021AD, ETH_8021Q],
        vec![ETH_8021Q, ETH_8021Q],
    ] {
        let mut expired = Packet::syn(v4(EXPIRED), app, 443);
        let mut fresh = Packet::syn(v4(FRESH), app, 443);
        let mut expired6 = Packet::udp(v6(11), ip("2001:db8:10::5"), 5000, 443);
        expired.vlans.clone_from(&tags);
        fresh.vlans.clone_from(&tags);
        expired6.vlans.clone_from(&tags);
        drops(&h, &expired, Verdict::DroppedExpired);
        passes(&h, &fresh, Verdict::AdmittedNewFlow);
        drops(&h, &expired6, Verdict::DroppedExpired);
    }
    // A third tag is more than the program follows: it passes unjudged.
    let three = Packet::syn(v4(EXPIRED), app, 443)
        .vlan(ETH_8021AD)
        .vlan(ETH_8021Q)
        .vlan(ETH_8021Q);
    passes(&h, &three, Verdict::PassedOtherProtocol);
}

#[test]
fn ipv4_options_and_fragments() {
    if !privileged!() {
        return;
    }
    let h = Harness::new("");
    let app = ip("198.19.10.5");
    drops(
        &h,
        &Packet::syn(v4(EXPIRED), app, 443).options(12),
        Verdict::DroppedExpired,
    );
    drops(
        &h,
        &Packet::syn(v4(EXPIRED), app, 443).options(40),
        Verdict::DroppedExpired,
    );
    passes(
        &h,
        &Packet::syn(v4(FRESH), app, 443).options(40),
        Verdict::AdmittedNewFlow,
    );
    // The first fragment carries the L4 header and is judged; later ones pass.
    drops(
        &h,
        &Packet::udp(v4(EXPIRED), app, 5000, 443).ipv4_fragment(0, true),
        Verdict::DroppedExpired,
    );
    passes(
        &h,
        &Packet::udp(v4(EXPIRED), app, 5000, 443).ipv4_fragment(185, true),
        Verdict::PassedFragment,
    );
    passes(
        &h,
        &Packet::udp(v4(EXPIRED), app, 5000, 443).ipv4_fragment(185, false),
        Verdict::PassedFragment,
    );
    // The flag bits (reserved, don't fragment) do not make a packet a fragment.
    let mut flagged = Packet::syn(v4(EXPIRED), app, 443);
    flagged.ipv4_frag = 0xc000;
    drops(&h, &flagged, Verdict::DroppedExpired);
}

#[test]
fn ipv6_extension_headers_are_followed() {
    if !privileged!() {
        return;
    }
    let h = Harness::new("");
    let app = ip("2001:db8:10::5");
    let chain = [Ext::HopByHop, Ext::DestOpts, Ext::Routing, Ext::DestOpts];
    let mut syn = Packet::syn(v6(11), app, 443);
    syn.ext = chain.to_vec();
    drops(&h, &syn, Verdict::DroppedExpired);
    let mut fresh = Packet::syn(v6(10), app, 443);
    fresh.ext = chain.to_vec();
    passes(&h, &fresh, Verdict::AdmittedNewFlow);
    for (sport, ext) in [
        (5001, Ext::HopByHop),
        (5002, Ext::Routing),
        (5003, Ext::DestOpts),
    ] {
        let expired = Packet::udp(v6(EXPIRED), app, sport, 443).ext(ext);
        drops(&h, &expired, Verdict::DroppedExpired);
        let fresh = Packet::udp(v6(FRESH), app, sport, 443).ext(ext);
        passes(&h, &fresh, Verdict::AdmittedNewFlow);
    }
    // Traffic class and flow label bits leave the version alone.
    let mut bytes = Packet::syn(v6(11), app, 443).bytes();
    bytes[ETH_LEN..ETH_LEN + 4].copy_from_slice(&[0x6b, 0x8f, 0x12, 0x34]);
    assert_eq!(h.run(&bytes), (XDP_DROP, Verdict::DroppedExpired));

    let first = Packet::udp(v6(11), app, 5000, 443)
        .ext(Ext::HopByHop)
        .ext(Ext::Fragment {
            offset: 0,
            more: true,
        });
    drops(&h, &first, Verdict::DroppedExpired);
    let later = Packet::udp(v6(11), app, 5000, 443).ext(Ext::Fragment {
        offset: 181,
        more: false,
    });
    passes(&h, &later, Verdict::PassedFragment);

    // Six extension headers are followed; behind a seventh the SYN cannot be read, so
    // it is judged by its destination alone: refused unless the session is valid.
    let mut six = Packet::syn(v6(11), app, 443);
    six.ext = vec![Ext::HopByHop; 6];
    drops(&h, &six, Verdict::DroppedExpired);
    let mut seven = Packet::syn(v6(11), app, 443);
    seven.ext = vec![Ext::DestOpts; 7];
    drops(&h, &seven, Verdict::DroppedUnreadable);
    seven.src = v6(FRESH);
    passes(&h, &seven, Verdict::AdmittedUnreadable);
    seven.dst = ip("2001:db8:77::1");
    seven.src = v6(EXPIRED);
    passes(&h, &seven, Verdict::PassedMalformed);
    let mut mixed = Packet::udp(v6(11), app, 5000, 443);
    mixed.ext = vec![
        Ext::HopByHop,
        Ext::Routing,
        Ext::Fragment {
            offset: 0,
            more: true,
        },
        Ext::DestOpts,
        Ext::Routing,
        Ext::DestOpts,
        Ext::DestOpts,
        Ext::DestOpts,
    ];
    drops(&h, &mixed, Verdict::DroppedUnreadable);
}

#[test]
fn malformed_packets_pass_or_are_judged_and_are_never_aborted() {
    if !privileged!() {
        return;
    }
    let h = Harness::new("");
    let app = ip("198.19.10.5");
    let syn4 = Packet::syn(v4(EXPIRED), app, 443).bytes();
    let udp4 = Packet::udp(v4(EXPIRED), app, 5000, 443).bytes();
    let syn6 = Packet::syn(v6(11), ip("2001:db8:10::5"), 443).bytes();
    let ext6 = Packet::syn(v6(11), ip("2001:db8:10::5"), 443)
        .ext(Ext::Routing)
        .bytes();
    let malformed = |name: &str, bytes: Vec<u8>| {
        assert_eq!(
            h.run(&bytes),
            (XDP_PASS, Verdict::PassedMalformed),
            "{name}"
        );
    };
    // A valid IP header with an L4 header that cannot be read: judged by destination
    // (`unreadable_packets_are_judged_by_their_destination`), so the expired device
    // is refused.
    let unreadable = |name: &str, bytes: Vec<u8>| {
        assert_eq!(
            h.run(&bytes),
            (XDP_DROP, Verdict::DroppedUnreadable),
            "{name}"
        );
    };

    malformed("truncated IPv4 header", syn4[..ETH_LEN + 12].to_vec());
    unreadable(
        "truncated TCP header",
        syn4[..ETH_LEN + IPV4_LEN + 12].to_vec(),
    );
    unreadable(
        "truncated UDP header",
        udp4[..ETH_LEN + IPV4_LEN + 6].to_vec(),
    );
    malformed("truncated IPv6 header", syn6[..ETH_LEN + 30].to_vec());
    unreadable(
        "IPv6 without its TCP header",
        syn6[..ETH_LEN + IPV6_LEN + 4].to_vec(),
    );
    let mut half_tag = ethernet_header(&[], ETH_8021Q);
    half_tag.extend([0, 100]);
    malformed("truncated VLAN tag", half_tag);

    let mut bad = syn4.clone();
    bad[ETH_LEN] = 0x44; // IHL 4 < 5
    malformed("IHL below 5", bad);
    let mut bad = syn4.clone();
    bad[ETH_LEN] = 0x4f; // IHL 15: 60 bytes, past the end of this packet's headers
    bad.truncate(ETH_LEN + 40);
    malformed("IHL past the packet", bad);
    let mut bad = syn4.clone();
    bad[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&10u16.to_be_bytes());
    malformed("total length below the header length", bad);
    let mut bad = syn4.clone();
    bad[ETH_LEN] = 0x65; // says IPv6 in an IPv4 ethertype
    malformed("IPv4 ethertype with version 6", bad);
    let mut bad = syn6.clone();
    bad[ETH_LEN] = 0x45;
    malformed("IPv6 ethertype with version 4", bad);
    let mut bad = syn4.clone();
    bad[ETH_LEN + IPV4_LEN + 12] = 4 << 4; // TCP data offset 4 < 5
    unreadable("TCP data offset below 5", bad);
    let mut bad = ext6.clone();
    bad[ETH_LEN + IPV6_LEN + 1] = 200; // extension length far past the packet
    unreadable("IPv6 extension header longer than the packet", bad);

    // The shortest frame BPF_PROG_TEST_RUN accepts is an Ethernet header alone.
    let mut eth_only = ethernet_header(&[], ETH_IPV4);
    malformed("Ethernet header alone", eth_only.clone());
    eth_only[12..14].copy_from_slice(&ETH_IPV6.to_be_bytes());
    malformed("Ethernet header alone, IPv6", eth_only);
}

/// The cut-down IPv4 first fragment of `p`: its IP header and `l4_bytes` of the
/// TCP or UDP header, with "more fragments" set and the length fields to match.
fn first_fragment(p: &Packet, l4_bytes: usize) -> Vec<u8> {
    let mut bytes = p.clone().ipv4_fragment(0, true).bytes();
    bytes.truncate(ETH_LEN + IPV4_LEN + l4_bytes);
    let total = (IPV4_LEN + l4_bytes) as u16;
    bytes[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&total.to_be_bytes());
    bytes
}

#[test]
fn unreadable_packets_are_judged_by_their_destination() {
    if !privileged!() {
        return;
    }
    let mut h = Harness::new("");
    let app = ip("198.19.10.5");
    let run = |h: &Harness, bytes: &[u8]| h.run(bytes);
    let refused = (XDP_DROP, Verdict::DroppedUnreadable);
    let admitted = (XDP_PASS, Verdict::AdmittedUnreadable);
    // RFC 1858's tiny first fragment: 8 or 16 bytes of TCP header hide the flags.
    for l4_bytes in [0, 8, 16] {
        let syn = |device| first_fragment(&Packet::syn(device, app, 443), l4_bytes);
        assert_eq!(run(&h, &syn(v4(EXPIRED))), refused, "{l4_bytes} bytes");
        assert_eq!(run(&h, &syn(v4(UNKNOWN))), refused, "{l4_bytes} bytes");
        assert_eq!(run(&h, &syn(v4(FRESH))), admitted, "{l4_bytes} bytes");
    }
    // A UDP first fragment too short to show the ports.
    let udp = first_fragment(&Packet::udp(v4(EXPIRED), app, 5000, 443), 4);
    assert_eq!(run(&h, &udp), refused);
    // A TCP fragment 8 bytes in would rewrite the flags; a UDP one cannot.
    let overlap = Packet::tcp(v4(EXPIRED), app, 443, TCP_ACK).ipv4_fragment(1, false);
    drops(&h, &overlap, Verdict::DroppedUnreadable);
    let later = Packet::udp(v4(EXPIRED), app, 5000, 443).ipv4_fragment(1, false);
    passes(&h, &later, Verdict::PassedFragment);
    let overlap6 =
        Packet::tcp(v6(EXPIRED), ip("2001:db8:10::5"), 443, TCP_ACK).ext(Ext::Fragment {
            offset: 1,
            more: false,
        });
    drops(&h, &overlap6, Verdict::DroppedUnreadable);

    // The policy is the strictest session-checked one a readable packet there could
    // get: at 198.19.40.5, Voice (30 minutes, UDP 3478 and 5060), not Web (1 hour,
    // TCP 443) or Baseline (168 hours).
    let before = h.policy_drops();
    let voice = first_fragment(&Packet::syn(v4(EXPIRED), ip("198.19.40.5"), 443), 8);
    assert_eq!(run(&h, &voice), refused);
    let mut expected = before.clone();
    expected[VOICE_POLICY as usize] += 1;
    assert_eq!(h.policy_drops(), expected);
    // Behind unlimited admin ports, Baseline (168 hours): a 2-hour-old session is
    // enough, a 200-hour-old one is not.
    let admin = |device| first_fragment(&Packet::syn(device, ip("198.19.60.5"), 22), 8);
    assert_eq!(run(&h, &admin(v4(EXPIRED))), admitted);
    assert_eq!(run(&h, &admin(v4(ANCIENT))), refused);
    // Where no packet can meet a session check (an unlimited policy covering every
    // port first, a bypass, no policy), nothing changes: they pass as before.
    for dst in ["198.19.30.5", "198.19.99.1", "198.18.200.1"] {
        let syn = first_fragment(&Packet::syn(v4(EXPIRED), ip(dst), 443), 8);
        assert_eq!(run(&h, &syn), (XDP_PASS, Verdict::PassedMalformed), "{dst}");
    }
    // The refusal is reported: no protocol or port, the policy that refused it.
    let _ = h.events();
    let syn = first_fragment(&Packet::syn(v4(ANCIENT), app, 443), 8);
    assert_eq!(run(&h, &syn), refused);
    let events = h.events();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(
        (e.verdict, e.destination, e.port, e.protocol, e.policy),
        (Verdict::DroppedUnreadable, app, 0, "ip", APP_POLICY)
    );
}
