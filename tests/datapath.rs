//! The XDP program on crafted packets, through BPF_PROG_TEST_RUN: the real program,
//! loaded by the agent's loader into the real kernel with maps the agent filled, run on
//! one packet at a time with no interface at all. Every test checks the XDP action and
//! that exactly the expected verdict counter moved.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use agent_common::{
    addr::Ip4,
    hashing::bucket,
    maps::Session,
    verdict::{Verdict, counter},
};
use aya::{
    maps::{MapData, RingBuf},
    programs::{TestRun, TestRunOptions},
};
use netlab::{packets::*, privileged};
use rand::{Rng, SeedableRng, rngs::StdRng};
use sessiongate::{
    clock::boot_now_ns,
    config::{Config, Limits},
    datapath::{Datapath, Geometry},
    events::{RawRefusal, decode},
    policy,
};

const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const HOUR: Duration = Duration::from_secs(3600);

/// Policies over 198.19.0.0/16 and 2001:db8:10::/48, overlapping on purpose.
const POLICIES: &str = r#"
[bypass]
destinations = ["198.19.99.1/32", "2001:db8:99::1/128"]

[[policy]]
name = "App"
precedence = 10
destinations = ["198.19.10.0/24", "2001:db8:10::/48"]
check_session = { enforce = true, duration = "1h" }

[[policy]]
name = "Open app"
precedence = 20
destinations = ["198.19.30.0/24"]

[[policy]]
name = "Web"
precedence = 5
destinations = ["198.19.40.0/24"]
protocol = "tcp"
ports = [443]
check_session = { enforce = true, duration = "1h" }

[[policy]]
name = "Baseline"
precedence = 50
destinations = ["198.19.0.0/16"]
check_session = { enforce = true, duration = "168h" }
"#;
const APP_POLICY: u32 = 0;
const WEB_POLICY: u32 = 2;

fn v4(d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 1, d))
}

fn v6(d: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, d))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Devices: authenticated now, 2 hours ago, 200 hours ago, and never.
const FRESH: u8 = 10;
const EXPIRED: u8 = 11;
const ANCIENT: u8 = 12;
const UNKNOWN: u8 = 13;

/// The loaded program with its maps filled from a config.
struct Harness {
    dp: Datapath,
    events: RingBuf<MapData>,
}

impl Harness {
    fn new(agent_extra: &str) -> Self {
        Self::sized(agent_extra, 1024, 1024)
    }

    /// With room for `sessions` sessions and `flows` flows per family.
    fn sized(agent_extra: &str, sessions: u32, flows: u32) -> Self {
        let text = format!("[agent]\ninterfaces = [\"t0\"]\n{agent_extra}\n{POLICIES}");
        let config = Config::parse(&text, "datapath-test").expect("valid config");
        let table = policy::compile(&config).expect("compiles");
        let limits = Limits {
            max_sessions: sessions,
            max_flows: flows,
            max_policy_cidrs: 1024,
            max_port_rules: 1024,
        };
        let mut dp = Datapath::load(&limits).expect("the kernel accepts the program");
        dp.maps.write_settings(&config).unwrap();
        dp.maps.write_policies(&table).unwrap();
        let events = dp.take_events().unwrap();
        let mut h = Self { dp, events };
        for (device, age) in [
            (FRESH, Duration::ZERO),
            (EXPIRED, 2 * HOUR),
            (ANCIENT, 200 * HOUR),
        ] {
            h.login(v4(device), age);
            h.login(v6(u16::from(device)), age);
        }
        h
    }

    fn login(&mut self, device: IpAddr, age: Duration) {
        let authenticated_at_ns = boot_now_ns() - age.as_nanos() as i64;
        self.dp
            .maps
            .set_session(
                device,
                Session {
                    authenticated_at_ns,
                },
            )
            .unwrap();
    }

    fn action(&self, packet: &[u8]) -> u32 {
        let result = self
            .dp
            .program()
            .test_run(TestRunOptions {
                data_in: Some(packet),
                repeat: 1,
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        result.return_value
    }

    /// Runs a packet; returns the XDP action and the one verdict counter that moved.
    fn run(&self, packet: &[u8]) -> (u32, Verdict) {
        let before = self.dp.maps.counters().unwrap();
        let action = self.action(packet);
        let after = self.dp.maps.counters().unwrap();
        let moved: Vec<(Verdict, u64)> = Verdict::ALL
            .iter()
            .map(|v| (*v, after[v.code() as usize] - before[v.code() as usize]))
            .filter(|(_, d)| *d != 0)
            .collect();
        assert!(
            moved.len() == 1 && moved[0].1 == 1,
            "exactly one verdict per packet, got {moved:?}"
        );
        (action, moved[0].0)
    }

    /// Asserts the action and verdict of a packet.
    fn expect(&self, packet: &Packet, action: u32, verdict: Verdict) {
        assert_eq!(self.run(&packet.bytes()), (action, verdict), "{packet:?}");
    }

    fn counter(&self, slot: u32) -> u64 {
        self.dp.maps.counters().unwrap()[slot as usize]
    }

    fn events(&mut self) -> Vec<RawRefusal> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            out.push(decode(&item).expect("a well-formed event"));
        }
        out
    }
}

fn passes(h: &Harness, p: &Packet, v: Verdict) {
    h.expect(p, XDP_PASS, v);
}

fn drops(h: &Harness, p: &Packet, v: Verdict) {
    h.expect(p, XDP_DROP, v);
}

#[test]
fn new_flows_are_judged_by_session_age() {
    if !privileged("new_flows_are_judged_by_session_age") {
        return;
    }
    let h = Harness::new("");
    let app = ip("198.19.10.5");
    passes(
        &h,
        &Packet::syn(v4(FRESH), app, 443),
        Verdict::AdmittedNewFlow,
    );
    drops(
        &h,
        &Packet::syn(v4(EXPIRED), app, 443),
        Verdict::DroppedExpired,
    );
    drops(
        &h,
        &Packet::syn(v4(UNKNOWN), app, 443),
        Verdict::DroppedUnknownDevice,
    );
    passes(
        &h,
        &Packet::udp(v4(FRESH), app, 5000, 4433),
        Verdict::AdmittedNewFlow,
    );
    drops(
        &h,
        &Packet::udp(v4(EXPIRED), app, 5000, 4433),
        Verdict::DroppedExpired,
    );
    let app6 = ip("2001:db8:10::5");
    passes(
        &h,
        &Packet::syn(v6(10), app6, 443),
        Verdict::AdmittedNewFlow,
    );
    drops(&h, &Packet::syn(v6(11), app6, 443), Verdict::DroppedExpired);
    drops(
        &h,
        &Packet::syn(v6(13), app6, 443),
        Verdict::DroppedUnknownDevice,
    );
    drops(
        &h,
        &Packet::udp(v6(11), app6, 5000, 4433),
        Verdict::DroppedExpired,
    );
    assert_eq!(h.dp.maps.policy_drops(4).unwrap(), [6, 0, 0, 0]);
}

#[test]
fn unknown_devices_are_admitted_with_unknown_device_allow() {
    if !privileged("unknown_devices_are_admitted_with_unknown_device_allow") {
        return;
    }
    let h = Harness::new("unknown_device = \"allow\"");
    let app = ip("198.19.10.5");
    passes(
        &h,
        &Packet::syn(v4(UNKNOWN), app, 443),
        Verdict::AdmittedUnknownDevice,
    );
    passes(
        &h,
        &Packet::syn(v6(13), ip("2001:db8:10::5"), 443),
        Verdict::AdmittedUnknownDevice,
    );
    drops(
        &h,
        &Packet::syn(v4(EXPIRED), app, 443),
        Verdict::DroppedExpired,
    );
}

#[test]
fn only_bare_syns_open_tcp_flows() {
    if !privileged("only_bare_syns_open_tcp_flows") {
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
}

#[test]
fn dns_bypass_unlimited_and_unmatched_destinations_pass() {
    if !privileged("dns_bypass_unlimited_and_unmatched_destinations_pass") {
        return;
    }
    let h = Harness::new("");
    let expired = v4(EXPIRED);
    // DNS to a resolver inside the protected range, over TCP and UDP.
    passes(
        &h,
        &Packet::syn(expired, ip("198.19.10.53"), 53),
        Verdict::PassedDns,
    );
    passes(
        &h,
        &Packet::udp(expired, ip("198.19.10.53"), 5353, 53),
        Verdict::PassedDns,
    );
    passes(
        &h,
        &Packet::udp(v6(11), ip("2001:db8:10::53"), 5353, 53),
        Verdict::PassedDns,
    );
    passes(
        &h,
        &Packet::syn(expired, ip("198.19.99.1"), 443),
        Verdict::PassedBypass,
    );
    passes(
        &h,
        &Packet::syn(v6(11), ip("2001:db8:99::1"), 443),
        Verdict::PassedBypass,
    );
    passes(
        &h,
        &Packet::syn(expired, ip("198.19.30.7"), 443),
        Verdict::PassedUnlimited,
    );
    passes(
        &h,
        &Packet::syn(v4(UNKNOWN), ip("198.19.30.7"), 443),
        Verdict::PassedUnlimited,
    );
    passes(
        &h,
        &Packet::syn(expired, ip("198.18.200.1"), 443),
        Verdict::PassedNoPolicy,
    );
    passes(
        &h,
        &Packet::udp(expired, ip("198.18.200.1"), 1, 2),
        Verdict::PassedNoPolicy,
    );
    passes(
        &h,
        &Packet::syn(v6(11), ip("2001:db8:77::1"), 443),
        Verdict::PassedNoPolicy,
    );
}

#[test]
fn other_protocols_pass() {
    if !privileged("other_protocols_pass") {
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
fn overlapping_policies_follow_precedence_protocol_and_ports() {
    if !privileged("overlapping_policies_follow_precedence_protocol_and_ports") {
        return;
    }
    let h = Harness::new("");
    let web = ip("198.19.40.1");
    let (expired, ancient) = (v4(EXPIRED), v4(ANCIENT));
    // "Web" (1h, tcp/443, precedence 5) inside "Baseline" (168h, precedence 50).
    drops(&h, &Packet::syn(expired, web, 443), Verdict::DroppedExpired);
    passes(&h, &Packet::syn(expired, web, 80), Verdict::AdmittedNewFlow);
    passes(
        &h,
        &Packet::udp(expired, web, 5000, 443),
        Verdict::AdmittedNewFlow,
    );
    drops(&h, &Packet::syn(ancient, web, 80), Verdict::DroppedExpired);
    // Elsewhere in the baseline's range only the baseline applies.
    passes(
        &h,
        &Packet::syn(expired, ip("198.19.200.1"), 22),
        Verdict::AdmittedNewFlow,
    );
    drops(
        &h,
        &Packet::syn(ancient, ip("198.19.200.1"), 22),
        Verdict::DroppedExpired,
    );
    // "Open app" (no session check, precedence 20) wins over the baseline.
    passes(
        &h,
        &Packet::syn(ancient, ip("198.19.30.1"), 22),
        Verdict::PassedUnlimited,
    );
    let drops = h.dp.maps.policy_drops(4).unwrap();
    assert_eq!(
        drops,
        [0, 0, 1, 2],
        "per-policy drops: web once, baseline twice"
    );
}

#[test]
fn udp_flows_admitted_while_valid_survive_expiry_until_idle() {
    if !privileged("udp_flows_admitted_while_valid_survive_expiry_until_idle") {
        return;
    }
    let mut h = Harness::new("udp_idle_timeout = \"1s\"");
    let (device, app) = (v4(20), ip("198.19.10.5"));
    h.login(device, Duration::ZERO);
    let flow = Packet::udp(device, app, 6000, 443);
    passes(&h, &flow, Verdict::AdmittedNewFlow);
    passes(&h, &flow, Verdict::PassedEstablished);

    h.login(device, 2 * HOUR); // the session expires
    passes(&h, &flow, Verdict::PassedEstablished);
    drops(
        &h,
        &Packet::udp(device, app, 6001, 443),
        Verdict::DroppedExpired,
    );
    drops(&h, &Packet::syn(device, app, 443), Verdict::DroppedExpired);

    // Idle past the timeout: the flow is judged again, as new.
    std::thread::sleep(Duration::from_millis(1300));
    drops(&h, &flow, Verdict::DroppedExpired);

    // IPv6 flows are tracked the same way.
    let (device6, app6) = (v6(20), ip("2001:db8:10::5"));
    h.login(device6, Duration::ZERO);
    let flow6 = Packet::udp(device6, app6, 6000, 443);
    passes(&h, &flow6, Verdict::AdmittedNewFlow);
    h.login(device6, 2 * HOUR);
    passes(&h, &flow6, Verdict::PassedEstablished);
    drops(
        &h,
        &Packet::udp(device6, app6, 6002, 443),
        Verdict::DroppedExpired,
    );
    // The IPv4 flow went idle; the IPv6 one is active.
    assert_eq!(h.dp.maps.flow_count(boot_now_ns() as u64), (0, 1));
}

#[test]
fn vlan_tags_are_looked_through() {
    if !privileged("vlan_tags_are_looked_through") {
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
    if !privileged("ipv4_options_and_fragments") {
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
}

#[test]
fn ipv6_extension_headers_are_followed() {
    if !privileged("ipv6_extension_headers_are_followed") {
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

    // Six extension headers are followed; a seventh makes the chain bogus.
    let mut six = Packet::syn(v6(11), app, 443);
    six.ext = vec![Ext::HopByHop; 6];
    drops(&h, &six, Verdict::DroppedExpired);
    let mut seven = Packet::syn(v6(11), app, 443);
    seven.ext = vec![Ext::DestOpts; 7];
    passes(&h, &seven, Verdict::PassedMalformed);
}

#[test]
fn malformed_packets_pass_and_are_never_aborted() {
    if !privileged("malformed_packets_pass_and_are_never_aborted") {
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

    malformed("truncated IPv4 header", syn4[..ETH_LEN + 12].to_vec());
    malformed(
        "truncated TCP header",
        syn4[..ETH_LEN + IPV4_LEN + 12].to_vec(),
    );
    malformed(
        "truncated UDP header",
        udp4[..ETH_LEN + IPV4_LEN + 6].to_vec(),
    );
    malformed("truncated IPv6 header", syn6[..ETH_LEN + 30].to_vec());
    malformed(
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
    malformed("TCP data offset below 5", bad);
    let mut bad = ext6.clone();
    bad[ETH_LEN + IPV6_LEN + 1] = 200; // extension length far past the packet
    malformed("IPv6 extension header longer than the packet", bad);

    // The shortest frame BPF_PROG_TEST_RUN accepts is an Ethernet header alone.
    let mut eth_only = ethernet_header(&[], ETH_IPV4);
    malformed("Ethernet header alone", eth_only.clone());
    eth_only[12..14].copy_from_slice(&ETH_IPV6.to_be_bytes());
    malformed("Ethernet header alone, IPv6", eth_only);
}

#[test]
fn random_garbage_is_never_aborted_and_gets_one_verdict() {
    if !privileged("random_garbage_is_never_aborted_and_gets_one_verdict") {
        return;
    }
    let h = Harness::new("");
    let mut rng = StdRng::seed_from_u64(0x5e55_1061);
    let templates: Vec<Vec<u8>> = vec![
        Packet::syn(v4(EXPIRED), ip("198.19.10.5"), 443).bytes(),
        Packet::udp(v4(FRESH), ip("198.19.40.1"), 5000, 443)
            .options(8)
            .bytes(),
        Packet::syn(v6(11), ip("2001:db8:10::5"), 443)
            .ext(Ext::HopByHop)
            .ext(Ext::Fragment {
                offset: 0,
                more: true,
            })
            .bytes(),
        Packet::udp(v6(13), ip("2001:db8:10::5"), 5000, 53)
            .vlan(ETH_8021AD)
            .vlan(ETH_8021Q)
            .bytes(),
        arp(),
    ];
    let mut actions = [0usize; 3];
    for i in 0..4000 {
        let mut bytes = templates[i % templates.len()].clone();
        for _ in 0..rng.random_range(1..6) {
            let at = rng.random_range(0..bytes.len());
            bytes[at] = rng.random();
        }
        let cut = rng.random_range(ETH_LEN..=bytes.len());
        bytes.truncate(cut);
        let (action, _) = h.run(&bytes);
        assert_ne!(action, XDP_ABORTED, "aborted on {bytes:02x?}");
        assert!(
            action == XDP_PASS || action == XDP_DROP,
            "action {action} on {bytes:02x?}"
        );
        actions[action as usize] += 1;
    }
    // The mutations leave plenty of packets whole enough to be judged either way.
    assert!(
        actions[XDP_PASS as usize] > 100 && actions[XDP_DROP as usize] > 100,
        "{actions:?}"
    );
}

#[test]
fn refusals_send_one_event_per_device_and_policy_per_second() {
    if !privileged("refusals_send_one_event_per_device_and_policy_per_second") {
        return;
    }
    let mut h = Harness::new("");
    let app = ip("198.19.10.5");
    drops(
        &h,
        &Packet::syn(v4(EXPIRED), app, 443),
        Verdict::DroppedExpired,
    );
    let events = h.events();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = events[0];
    assert_eq!(
        (e.device, e.destination, e.port, e.protocol),
        (v4(EXPIRED), app, 443, "tcp")
    );
    assert_eq!((e.policy, e.verdict), (APP_POLICY, Verdict::DroppedExpired));
    let age = e.session_age_ns.expect("the device has a session");
    assert!(
        (2 * HOUR).as_nanos() as i64 <= age
            && age < (2 * HOUR + Duration::from_secs(60)).as_nanos() as i64
    );

    // A burst from the same device to the same policy: counted, not reported again.
    for port in 1..=4 {
        drops(
            &h,
            &Packet::syn(v4(EXPIRED), app, port),
            Verdict::DroppedExpired,
        );
    }
    assert!(h.events().is_empty());
    assert_eq!(h.counter(counter::EVENTS_RATE_LIMITED), 4);

    // Another policy, another device, an unknown device: each its own event.
    drops(
        &h,
        &Packet::syn(v4(EXPIRED), ip("198.19.40.1"), 443),
        Verdict::DroppedExpired,
    );
    drops(
        &h,
        &Packet::udp(v6(11), ip("2001:db8:10::5"), 5000, 4433),
        Verdict::DroppedExpired,
    );
    drops(
        &h,
        &Packet::syn(v4(UNKNOWN), app, 443),
        Verdict::DroppedUnknownDevice,
    );
    let events = h.events();
    let seen: Vec<(IpAddr, u32, Verdict, &str)> = events
        .iter()
        .map(|e| (e.device, e.policy, e.verdict, e.protocol))
        .collect();
    assert_eq!(
        seen,
        [
            (v4(EXPIRED), WEB_POLICY, Verdict::DroppedExpired, "tcp"),
            (v6(11), APP_POLICY, Verdict::DroppedExpired, "udp"),
            (
                v4(UNKNOWN),
                APP_POLICY,
                Verdict::DroppedUnknownDevice,
                "tcp"
            ),
        ]
    );
    assert_eq!(events[2].session_age_ns, None);
    assert_eq!(h.counter(counter::EVENTS_SENT), 4);
    assert_eq!(h.counter(counter::EVENTS_LOST), 0);

    // After a second, the same device and policy report again.
    std::thread::sleep(Duration::from_millis(1100));
    drops(
        &h,
        &Packet::syn(v4(EXPIRED), app, 443),
        Verdict::DroppedExpired,
    );
    assert_eq!(h.events().len(), 1);
}

#[test]
fn sessions_beyond_the_session_table_are_found_in_the_hash_map() {
    if !privileged("sessions_beyond_the_session_table_are_found_in_the_hash_map") {
        return;
    }
    // Eight devices that all hash to one bucket of the session table: four fit in
    // its slots, the other four live in the hash map only.
    let mut h = Harness::sized("", 64, 1024);
    let app = ip("198.19.10.5");
    let mask = Geometry::of(&Limits {
        max_sessions: 64,
        max_flows: 1024,
        max_policy_cidrs: 1024,
        max_port_rules: 1024,
    })
    .session_buckets
        - 1;
    let same_bucket = |ip: &Ipv4Addr| bucket(Ip4::from(*ip).fold(), mask) == 0;
    let devices: Vec<(IpAddr, bool)> = (0..u32::MAX)
        .map(|i| Ipv4Addr::from(0xc612_1000 + i))
        .filter(same_bucket)
        .take(8)
        .enumerate()
        .map(|(i, ip)| (IpAddr::V4(ip), i % 2 == 0))
        .collect();
    for (device, fresh) in &devices {
        h.login(*device, if *fresh { Duration::ZERO } else { 2 * HOUR });
    }
    for (device, fresh) in &devices {
        let packet = Packet::syn(*device, app, 443);
        if *fresh {
            passes(&h, &packet, Verdict::AdmittedNewFlow);
        } else {
            drops(&h, &packet, Verdict::DroppedExpired);
        }
    }
    // Logging a device out removes it from wherever it lives.
    for (device, _) in &devices {
        h.dp.maps.remove_session(*device).unwrap();
        drops(
            &h,
            &Packet::syn(*device, app, 443),
            Verdict::DroppedUnknownDevice,
        );
    }
}

#[test]
fn a_full_flow_table_gives_up_its_least_recently_seen_flows() {
    if !privileged("a_full_flow_table_gives_up_its_least_recently_seen_flows") {
        return;
    }
    // 8 flows allowed: 4 buckets of 4 slots.
    let mut h = Harness::sized("", 1024, 8);
    let (device, app) = (v4(30), ip("198.19.10.5"));
    h.login(device, Duration::ZERO);
    let flows: Vec<Packet> = (0..64u16)
        .map(|i| Packet::udp(device, app, 7000 + i, 443))
        .collect();
    for flow in &flows {
        passes(&h, flow, Verdict::AdmittedNewFlow);
    }
    // Once the session expires, only the flows still tracked keep passing: the
    // table holds at most 16 of the 64, and the most recent flow of each bucket is
    // always among them.
    h.login(device, 2 * HOUR);
    let mut tracked = 0;
    for flow in &flows {
        let (action, verdict) = h.run(&flow.bytes());
        match verdict {
            Verdict::PassedEstablished => {
                assert_eq!(action, XDP_PASS);
                tracked += 1;
            }
            Verdict::DroppedExpired => assert_eq!(action, XDP_DROP),
            other => panic!("unexpected verdict {other:?}"),
        }
    }
    assert!((4..=16).contains(&tracked), "{tracked} flows still tracked");
    let last = flows.last().unwrap();
    passes(&h, last, Verdict::PassedEstablished);
}
