//! The XDP program on crafted packets, through BPF_PROG_TEST_RUN: the real program,
//! loaded by the agent's loader into the real kernel with maps the agent filled, run on
//! one packet at a time with no interface at all. Every test checks the XDP action and
//! that exactly the expected verdict counter moved.
//!
//! Here: verdicts, policies, sessions, flows and events. `parsing`: packet shapes.
//! `fuzz`: random frames against an independent model of the program (`reference`).

#[path = "datapath/fuzz.rs"]
mod fuzz;
#[path = "datapath/harness.rs"]
mod harness;
#[path = "datapath/parsing.rs"]
mod parsing;
#[path = "datapath/random.rs"]
mod random;
#[path = "datapath/reference.rs"]
mod reference;
#[path = "datapath/replies.rs"]
mod replies;

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use agent_common::{
    addr::Ip4,
    hashing::bucket,
    maps::Session,
    verdict::{Verdict, counter},
};
use netlab::{packets::*, privileged};
use sessiongate::{
    clock::{ClockPair, boot_now_ns},
    config::Identity,
    datapath::{Datapath, Geometry, Origin},
};

use crate::harness::*;

#[test]
fn each_verdict_moves_its_own_counter_and_nothing_else() {
    if !privileged!() {
        return;
    }
    let h = Harness::new("");
    let app = ip("198.19.10.5");
    let expired = v4(EXPIRED);
    let mut truncated = Packet::syn(expired, app, 443).bytes();
    truncated.truncate(ETH_LEN + 10);
    let one_of_each: [(Vec<u8>, Verdict); 11] = [
        (arp(), Verdict::PassedOtherProtocol),
        (truncated, Verdict::PassedMalformed),
        (
            Packet::udp(expired, app, 5000, 443)
                .ipv4_fragment(20, false)
                .bytes(),
            Verdict::PassedFragment,
        ),
        (
            Packet::udp(expired, app, 5000, 53).bytes(),
            Verdict::PassedDns,
        ),
        (
            Packet::syn(expired, ip("198.19.99.1"), 443).bytes(),
            Verdict::PassedBypass,
        ),
        (
            Packet::syn(expired, ip("198.18.200.1"), 443).bytes(),
            Verdict::PassedNoPolicy,
        ),
        (
            Packet::syn(expired, ip("198.19.30.7"), 443).bytes(),
            Verdict::PassedUnlimited,
        ),
        (
            Packet::tcp(expired, app, 443, TCP_ACK).bytes(),
            Verdict::PassedEstablished,
        ),
        (
            Packet::syn(v4(FRESH), app, 443).bytes(),
            Verdict::AdmittedNewFlow,
        ),
        (
            Packet::syn(expired, app, 443).bytes(),
            Verdict::DroppedExpired,
        ),
        (
            Packet::syn(v4(UNKNOWN), app, 443).bytes(),
            Verdict::DroppedUnknownDevice,
        ),
    ];
    for (bytes, verdict) in &one_of_each {
        let action = if verdict.is_refusal() {
            XDP_DROP
        } else {
            XDP_PASS
        };
        assert_eq!(h.action(bytes), action, "{verdict:?}");
    }
    // Read back whole: every slot, the event counters too, holds exactly this.
    let mut expected = vec![0; counter::SLOTS as usize];
    for (_, verdict) in &one_of_each {
        expected[verdict.code() as usize] += 1;
    }
    expected[counter::EVENTS_SENT as usize] = 2; // two devices refused
    assert_eq!(h.dp.maps.counters().unwrap(), expected);

    // The last verdict needs `unknown_device = "allow"`.
    let h = Harness::new("unknown_device = \"allow\"");
    let syn = Packet::syn(v4(UNKNOWN), app, 443).bytes();
    assert_eq!(h.action(&syn), XDP_PASS);
    let mut expected = vec![0; counter::SLOTS as usize];
    expected[Verdict::AdmittedUnknownDevice.code() as usize] = 1;
    assert_eq!(h.dp.maps.counters().unwrap(), expected);
}

#[test]
fn new_flows_are_judged_by_session_age() {
    if !privileged!() {
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
    let mut expected = vec![0; POLICY_COUNT];
    expected[APP_POLICY as usize] = 6;
    assert_eq!(h.policy_drops(), expected);
}

#[test]
fn unknown_devices_are_admitted_with_unknown_device_allow() {
    if !privileged!() {
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
fn dns_bypass_unlimited_and_unmatched_destinations_pass() {
    if !privileged!() {
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
fn overlapping_policies_follow_precedence_protocol_and_ports() {
    if !privileged!() {
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
    // "Voice" (30m, udp/3478 and udp/5060, precedence 7) takes only its protocol
    // and ports: TCP to the same ports, and UDP to others, fall to the baseline.
    let voice = Packet::udp(expired, web, 5000, 3478);
    drops(&h, &voice, Verdict::DroppedExpired);
    drops(
        &h,
        &Packet::udp(expired, web, 5000, 5060),
        Verdict::DroppedExpired,
    );
    passes(
        &h,
        &Packet::udp(v4(FRESH), web, 5000, 3478),
        Verdict::AdmittedNewFlow,
    );
    passes(
        &h,
        &Packet::syn(expired, web, 3478),
        Verdict::AdmittedNewFlow,
    );
    passes(
        &h,
        &Packet::udp(expired, web, 5000, 3479),
        Verdict::AdmittedNewFlow,
    );
    // Voice's prefix is the Web policy's: outside it, the ports mean nothing.
    passes(
        &h,
        &Packet::udp(expired, ip("198.19.41.1"), 5000, 3478),
        Verdict::AdmittedNewFlow,
    );
    let mut expected = vec![0; POLICY_COUNT];
    expected[WEB_POLICY as usize] = 1;
    expected[BASELINE_POLICY as usize] = 2;
    expected[VOICE_POLICY as usize] = 2;
    assert_eq!(h.policy_drops(), expected);
}

#[test]
fn a_wider_prefix_of_better_precedence_beats_a_narrower_one() {
    if !privileged!() {
        return;
    }
    let h = Harness::new("");
    let lab = ip("198.19.61.5");
    let (expired, unknown, ancient) = (v4(EXPIRED), v4(UNKNOWN), v4(ANCIENT));
    // "Admin ports" (tcp/22 and tcp/3389 on 198.19.60.0/22, unlimited, precedence 1)
    // beats "Lab" (198.19.61.0/24, 1h, precedence 30) although Lab's prefix is longer.
    for port in [22, 3389] {
        passes(
            &h,
            &Packet::syn(expired, lab, port),
            Verdict::PassedUnlimited,
        );
        passes(
            &h,
            &Packet::syn(unknown, lab, port),
            Verdict::PassedUnlimited,
        );
    }
    // Every other protocol and port of the lab is Lab's.
    drops(&h, &Packet::syn(expired, lab, 80), Verdict::DroppedExpired);
    drops(
        &h,
        &Packet::udp(expired, lab, 5000, 22),
        Verdict::DroppedExpired,
    );
    drops(
        &h,
        &Packet::syn(unknown, lab, 80),
        Verdict::DroppedUnknownDevice,
    );
    passes(
        &h,
        &Packet::syn(v4(FRESH), lab, 80),
        Verdict::AdmittedNewFlow,
    );
    // Beside the lab, inside Admin's /22: Admin's ports, else the baseline (168h).
    let beside = ip("198.19.62.5");
    passes(
        &h,
        &Packet::syn(ancient, beside, 22),
        Verdict::PassedUnlimited,
    );
    passes(
        &h,
        &Packet::syn(expired, beside, 80),
        Verdict::AdmittedNewFlow,
    );
    drops(
        &h,
        &Packet::syn(ancient, beside, 80),
        Verdict::DroppedExpired,
    );
    // Admin's ports are IPv4 only: all of the lab's IPv6 prefix is Lab's.
    drops(
        &h,
        &Packet::syn(v6(EXPIRED), ip("2001:db8:61::5"), 22),
        Verdict::DroppedExpired,
    );
    let mut expected = vec![0; POLICY_COUNT];
    expected[LAB_POLICY as usize] = 4;
    expected[BASELINE_POLICY as usize] = 1;
    assert_eq!(h.policy_drops(), expected);
}

#[test]
fn who_the_user_is_decides_which_policy_applies() {
    if !privileged!() {
        return;
    }
    let mut h = Harness::new("");
    let two_hours = Duration::from_secs(2 * 3600);
    let strings = |items: &[&str]| -> Vec<String> { items.iter().map(|s| s.to_string()).collect() };
    let (finance, none) = (strings(&["finance"]), strings(&[]));
    let contractor = Identity {
        user: "cy@contractor.org",
        idp: "entra",
        groups: &none,
    };
    let accountant = Identity {
        user: "ann@example.com",
        idp: "okta",
        groups: &finance,
    };
    // Device 20 signed in two hours ago as nobody in particular, 21 as a contractor,
    // 22 as a finance user; device 23 has no session.
    h.login(v4(20), two_hours);
    h.login(v6(20), two_hours);
    h.login_as(v4(21), two_hours, &contractor);
    h.login_as(v6(22), two_hours, &accountant);
    let (beside, app6) = (ip("198.19.62.5"), ip("2001:db8:10::5"));
    // Beside the lab, Baseline (168h) admits a 2h session, unless it is a
    // contractor's: Contractors (90m, precedence 3) comes first for them.
    passes(
        &h,
        &Packet::syn(v4(20), beside, 80),
        Verdict::AdmittedNewFlow,
    );
    drops(
        &h,
        &Packet::syn(v4(21), beside, 80),
        Verdict::DroppedExpired,
    );
    // In App, App (1h) refuses a 2h session, unless it is finance's: Finance (8h).
    drops(&h, &Packet::syn(v6(20), app6, 443), Verdict::DroppedExpired);
    passes(
        &h,
        &Packet::syn(v6(22), app6, 443),
        Verdict::AdmittedNewFlow,
    );
    // No session, no identity: the policies without a condition, as before.
    drops(
        &h,
        &Packet::syn(v4(23), beside, 80),
        Verdict::DroppedUnknownDevice,
    );
    // Signing in again without the group takes effect at once.
    h.login_as(v6(22), two_hours, &contractor);
    drops(&h, &Packet::syn(v6(22), app6, 443), Verdict::DroppedExpired);
    let mut expected = vec![0; POLICY_COUNT];
    expected[CONTRACTORS_POLICY as usize] = 1;
    expected[APP_POLICY as usize] = 2;
    expected[BASELINE_POLICY as usize] = 1;
    assert_eq!(h.policy_drops(), expected);
}

#[test]
fn udp_flows_admitted_while_valid_survive_expiry_until_idle() {
    if !privileged!() {
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
fn udp_flows_from_consecutive_source_ports_are_all_tracked() {
    if !privileged!() {
        return;
    }
    // 16 flows in a table of 512 buckets: with the 5-tuple spread over buckets, all
    // stay tracked. Flows that differ only in their source port's low bits are what
    // one client's sockets to one server look like.
    let mut h = Harness::new("");
    for (device, app) in [(v4(21), ip("198.19.10.5")), (v6(21), ip("2001:db8:10::5"))] {
        h.login(device, Duration::ZERO);
        let flows: Vec<Packet> = (0..16)
            .map(|i| Packet::udp(device, app, 40000 + i, 443))
            .collect();
        for flow in &flows {
            passes(&h, flow, Verdict::AdmittedNewFlow);
        }
        h.login(device, 2 * HOUR);
        for flow in &flows {
            passes(&h, flow, Verdict::PassedEstablished);
        }
    }
}

#[test]
fn refusals_send_one_event_per_device_and_policy_per_second() {
    if !privileged!() {
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
    let shown = e.resolve(&ClockPair::now(), None, "App".into());
    assert_eq!(shown.reason, "session_expired");
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
    let shown = events[2].resolve(&ClockPair::now(), None, "App".into());
    assert_eq!(shown.reason, "unknown_device");
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
fn each_policy_limits_a_devices_events_on_its_own() {
    if !privileged!() {
        return;
    }
    // One device refused by two policies in turn, within a second: one event each.
    let mut h = Harness::new("");
    let device = v4(EXPIRED);
    let (app, web) = (ip("198.19.10.5"), ip("198.19.40.1"));
    for port in 1..=3 {
        drops(&h, &Packet::syn(device, app, port), Verdict::DroppedExpired);
        drops(&h, &Packet::syn(device, web, 443), Verdict::DroppedExpired);
    }
    let policies: Vec<u32> = h.events().iter().map(|e| e.policy).collect();
    assert_eq!(policies, [APP_POLICY, WEB_POLICY]);
    assert_eq!(h.counter(counter::EVENTS_SENT), 2);
    assert_eq!(h.counter(counter::EVENTS_RATE_LIMITED), 4);
}

#[test]
fn sessions_beyond_the_session_table_are_found_in_the_hash_map() {
    if !privileged!() {
        return;
    }
    // Eight devices that all hash to one bucket of the session table: four fit in
    // its slots, the other four live in the hash map only.
    let mut h = Harness::sized("", 64, 1024);
    let app = ip("198.19.10.5");
    let same_bucket = |ip: &Ipv4Addr| session_bucket(*ip, 64) == 0;
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
        h.sessions.remove_session(*device).unwrap();
        drops(
            &h,
            &Packet::syn(*device, app, 443),
            Verdict::DroppedUnknownDevice,
        );
    }
}

#[test]
fn a_batch_of_sessions_is_placed_in_the_session_table_itself() {
    if !privileged!() {
        return;
    }
    // A batch (start-up, import) writes the session table in its own memory, and the
    // hash map only for what a full bucket cannot take (none here). Seen from the
    // program: every device of two batches is found, a renewed one with its new
    // session.
    let mut h = Harness::new("");
    let devices = both_families(100, 0xc612_2000, 0x2001_0db8_0002);
    let who = DEFAULT_IDENTITY;
    // First batch: every other device expired; the second renews those.
    let first: Vec<_> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| {
            (
                *d,
                aged(if i % 4 < 2 { Duration::ZERO } else { 2 * HOUR }),
                who,
                None,
            )
        })
        .collect();
    let slots = h.sessions.load_sessions(&first).unwrap();
    assert_eq!(
        remove_from_session_hash_maps(&h, &devices),
        0,
        "a batch of new devices leaves the hash maps alone"
    );
    for (i, device) in devices.iter().enumerate() {
        let verdict = if i % 4 < 2 {
            Verdict::AdmittedNewFlow
        } else {
            Verdict::DroppedExpired
        };
        assert_eq!(
            h.run(&Packet::syn(*device, app(device), 443).bytes()).1,
            verdict,
            "{device}"
        );
    }
    let renewed: Vec<_> = devices
        .iter()
        .zip(&slots)
        .enumerate()
        .filter(|(i, _)| i % 4 >= 2)
        .map(|(_, (d, slot))| (*d, aged(Duration::ZERO), who, Some(*slot)))
        .collect();
    h.sessions.load_sessions(&renewed).unwrap();
    assert_eq!(
        remove_from_session_hash_maps(&h, &devices),
        0,
        "a renewal with room in its bucket goes beside its old entry"
    );
    for device in &devices {
        let packet = Packet::syn(*device, app(device), 443);
        passes(&h, &packet, Verdict::AdmittedNewFlow);
    }
}

#[test]
fn a_batch_renews_entries_of_full_buckets_after_the_hash_map_has_them() {
    if !privileged!() {
        return;
    }
    // Six devices of one session-table bucket: four fit, two live in the hash map.
    // Renewed in a batch, the four are rewritten in place, which a reader may meet
    // half-done, so the hash map takes their sessions first.
    let mut h = Harness::new("");
    let bucket_of = |ip: &IpAddr| match ip {
        IpAddr::V4(a) => session_bucket(*a, 1024),
        IpAddr::V6(_) => u32::MAX,
    };
    let taken: Vec<u32> = h
        .sessions
        .kernel_sessions()
        .unwrap()
        .iter()
        .map(|(ip, _)| bucket_of(ip))
        .collect();
    let target = (0..)
        .map(|i| bucket_of(&IpAddr::V4(Ipv4Addr::from(0xc612_5000 + i))))
        .find(|b| !taken.contains(b))
        .unwrap();
    let devices: Vec<IpAddr> = (0..u32::MAX)
        .map(|i| IpAddr::V4(Ipv4Addr::from(0xc612_5000 + i)))
        .filter(|ip| bucket_of(ip) == target)
        .take(6)
        .collect();
    assert_eq!(devices.len(), 6);
    let expired: Vec<_> = devices
        .iter()
        .map(|d| (*d, aged(2 * HOUR), DEFAULT_IDENTITY, None))
        .collect();
    let slots = h.sessions.load_sessions(&expired).unwrap();
    for device in &devices {
        drops(
            &h,
            &Packet::syn(*device, app(device), 443),
            Verdict::DroppedExpired,
        );
    }
    let renewed: Vec<_> = devices
        .iter()
        .zip(&slots)
        .map(|(d, slot)| (*d, aged(Duration::ZERO), DEFAULT_IDENTITY, Some(*slot)))
        .collect();
    h.sessions.load_sessions(&renewed).unwrap();
    for device in &devices {
        passes(
            &h,
            &Packet::syn(*device, app(device), 443),
            Verdict::AdmittedNewFlow,
        );
    }
    assert_eq!(
        remove_from_session_hash_maps(&h, &devices),
        6,
        "the two beyond the table, and the four renewed in place"
    );
    // Without the hash map, the table still answers for its four, with their new
    // sessions.
    let admitted = devices
        .iter()
        .filter(|d| h.run(&Packet::syn(**d, app(d), 443).bytes()).1 == Verdict::AdmittedNewFlow)
        .count();
    assert_eq!(admitted, 4);
}

#[test]
fn sessions_only_in_the_session_table_are_listed_and_removed() {
    if !privileged!() {
        return;
    }
    // What a restart adopts and a logout ends includes the sessions a batch put in
    // the session table only.
    let mut h = Harness::new("");
    let harness_devices = h.sessions.kernel_sessions().unwrap().len();
    let devices = both_families(8, 0xc612_3000, 0x2001_0db8_0003);
    let fresh = aged(Duration::ZERO);
    let batch: Vec<_> = devices
        .iter()
        .map(|d| (*d, fresh, DEFAULT_IDENTITY, None))
        .collect();
    let slots = h.sessions.load_sessions(&batch).unwrap();
    let listed: Vec<(IpAddr, u32)> = h
        .sessions
        .kernel_sessions()
        .unwrap()
        .into_iter()
        .map(|(ip, s)| (ip, s.identity))
        .collect();
    assert_eq!(
        listed.len(),
        harness_devices + devices.len(),
        "each device once"
    );
    for (device, slot) in devices.iter().zip(&slots) {
        assert!(
            listed.contains(&(*device, *slot)),
            "{device} with slot {slot}"
        );
    }
    for device in &devices[..4] {
        h.sessions.remove_session(*device).unwrap();
    }
    for device in &devices {
        let packet = Packet::syn(*device, app(device), 443);
        if devices[..4].contains(device) {
            drops(&h, &packet, Verdict::DroppedUnknownDevice);
        } else {
            passes(&h, &packet, Verdict::AdmittedNewFlow);
        }
    }
    assert_eq!(
        h.sessions.kernel_sessions().unwrap().len(),
        harness_devices + devices.len() - 4
    );
}

#[test]
fn an_adopted_datapath_hands_over_the_sessions_it_read_until_a_write_makes_them_stale() {
    if !privileged!() {
        return;
    }
    // An adoption reads the pinned session maps when it opens them (to count the
    // devices and find the identity slots in use); the session mirror takes that list
    // instead of reading a million entries again, unless something was written since.
    let dir = tempfile::tempdir().unwrap();
    let bpf = netlab::BpfMount::new(dir.path().join("bpf"));
    let pins = bpf.path.join("sessiongate");
    let (config, table) = compiled("", POLICIES);
    let limits = limits(1024, 1024);
    let open = || {
        let (mut dp, origin) = Datapath::open(&pins, &limits, false).unwrap();
        let sessions = dp.take_sessions().unwrap();
        (dp, origin, sessions)
    };
    let sorted = |mut held: Vec<(IpAddr, Session)>| {
        held.sort_by_key(|(ip, _)| *ip);
        held.into_iter()
            .map(|(ip, s)| (ip, s.authenticated_at_ns, s.identity))
            .collect::<Vec<_>>()
    };
    let devices = both_families(40, 0xc612_6000, 0x2001_0db8_0006);
    let (mut dp, origin, mut sessions) = open();
    assert!(matches!(origin, Origin::Loaded));
    dp.maps
        .apply(sessiongate::policy::settings(&config), &table)
        .unwrap();
    let batch: Vec<_> = devices
        .iter()
        .map(|d| (*d, aged(Duration::ZERO), DEFAULT_IDENTITY, None))
        .collect();
    sessions.load_sessions(&batch).unwrap();
    let written = sorted(sessions.kernel_sessions().unwrap());
    assert_eq!(written.len(), devices.len());
    drop((dp, sessions));

    let (_dp, origin, mut sessions) = open();
    assert!(matches!(origin, Origin::Adopted));
    assert_eq!(sorted(sessions.take_kernel_sessions().unwrap()), written);
    drop((_dp, sessions));

    // A login between the opening and the adoption's matching is in the list.
    let (_dp, _, mut sessions) = open();
    let newcomer = IpAddr::V4(Ipv4Addr::from(0xc612_6100));
    sessions
        .set_session(newcomer, aged(Duration::ZERO), &DEFAULT_IDENTITY)
        .unwrap();
    let listed = sorted(sessions.take_kernel_sessions().unwrap());
    assert_eq!(listed.len(), devices.len() + 1);
    assert!(listed.iter().any(|(ip, ..)| *ip == newcomer));
    // And a second take reads the maps again.
    sessions.remove_session(newcomer).unwrap();
    assert_eq!(sorted(sessions.take_kernel_sessions().unwrap()), written);
}

#[test]
fn a_family_holds_at_most_max_sessions_devices() {
    if !privileged!() {
        return;
    }
    // The hash maps no longer hold every session, so the limit is counted: a login
    // or a batch beyond it is refused and changes nothing; renewals and the other
    // family are not held back.
    const MAX: u32 = 64;
    let mut h = Harness::sized("", MAX, 1024);
    let held = h.sessions.kernel_sessions().unwrap();
    let held_v4 = held.iter().filter(|(ip, _)| ip.is_ipv4()).count() as u32;
    let fresh = aged(Duration::ZERO);
    let room = MAX - held_v4;
    let devices: Vec<IpAddr> = (0..room + 1)
        .map(|i| IpAddr::V4(Ipv4Addr::from(0xc612_4000 + i)))
        .collect();
    let batch: Vec<_> = devices
        .iter()
        .map(|d| (*d, fresh, DEFAULT_IDENTITY, None))
        .collect();
    let full = |e| matches!(e, sessiongate::datapath::DatapathError::SessionsFull { .. });
    assert!(full(h.sessions.load_sessions(&batch).unwrap_err()));
    assert_eq!(
        h.sessions.kernel_sessions().unwrap(),
        held,
        "nothing changed"
    );
    let slots = h.sessions.load_sessions(&batch[..room as usize]).unwrap();
    let last = *devices.last().unwrap();
    let refused = h.sessions.set_session(last, fresh, &DEFAULT_IDENTITY);
    assert!(full(refused.unwrap_err()));
    drops(
        &h,
        &Packet::syn(last, app(&last), 443),
        Verdict::DroppedUnknownDevice,
    );
    // A renewal takes no room, nor does an IPv6 device.
    let renewal = [(devices[0], fresh, DEFAULT_IDENTITY, Some(slots[0]))];
    h.sessions.load_sessions(&renewal).unwrap();
    h.sessions
        .set_session(devices[1], fresh, &DEFAULT_IDENTITY)
        .unwrap();
    h.login(ip("2001:db8:4::1"), Duration::ZERO);
    // A logout makes room.
    h.sessions.remove_session(devices[2]).unwrap();
    h.sessions
        .set_session(last, fresh, &DEFAULT_IDENTITY)
        .unwrap();
    passes(
        &h,
        &Packet::syn(last, app(&last), 443),
        Verdict::AdmittedNewFlow,
    );
}

/// Who the harness's devices are, without groups.
const DEFAULT_IDENTITY: Identity<'static> = Identity {
    user: DEFAULT_USER.0,
    idp: DEFAULT_USER.1,
    groups: &[],
};

/// The session-table bucket of an IPv4 device in a datapath sized for `max_sessions`.
fn session_bucket(device: Ipv4Addr, max_sessions: u32) -> u32 {
    let buckets = Geometry::of(&limits(max_sessions, 1024)).session_buckets;
    bucket(Ip4::from(device).fold(), buckets - 1)
}

/// `n` IPv4 devices from `v4` on and `n` IPv6 ones in the /48 `v6_48`, interleaved.
fn both_families(n: u32, v4: u32, v6_48: u128) -> Vec<IpAddr> {
    (0..n)
        .flat_map(|i| {
            [
                IpAddr::V4(Ipv4Addr::from(v4 + i)),
                IpAddr::V6(std::net::Ipv6Addr::from((v6_48 << 80) | u128::from(i))),
            ]
        })
        .collect()
}

/// The harness's application for a device's family.
fn app(device: &IpAddr) -> IpAddr {
    if device.is_ipv4() {
        ip("198.19.10.5")
    } else {
        ip("2001:db8:10::5")
    }
}

/// Deletes devices' sessions from the kernel's hash maps only (found through the
/// program's own map ids), leaving their session-table copies; returns how many of
/// them the hash maps held.
fn remove_from_session_hash_maps(h: &Harness, devices: &[IpAddr]) -> usize {
    use agent_common::addr::Ip6;
    use aya::maps::{HashMap, Map, MapData, MapError};
    let ids = h.dp.program().info().unwrap().map_ids().unwrap().unwrap();
    let named = |name: &str| {
        ids.iter()
            .map(|id| MapData::from_id(*id).unwrap())
            .find(|m| m.info().unwrap().name_as_str() == Some(name))
            .unwrap_or_else(|| panic!("the program has no map {name}"))
    };
    let mut v4: HashMap<MapData, Ip4, Session> =
        HashMap::try_from(Map::HashMap(named("SG_SESSIONS_V4"))).unwrap();
    let mut v6: HashMap<MapData, Ip6, Session> =
        HashMap::try_from(Map::HashMap(named("SG_SESSIONS_V6"))).unwrap();
    let mut removed = 0;
    for device in devices {
        let result = match device {
            IpAddr::V4(a) => v4.remove(&Ip4::from(*a)),
            IpAddr::V6(a) => v6.remove(&Ip6::from(*a)),
        };
        match result {
            Ok(()) => removed += 1,
            // ENOENT: the map has no copy of this device.
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(2) => {}
            Err(e) => panic!("removing {device}: {e}"),
        }
    }
    removed
}

#[test]
fn a_full_flow_table_gives_up_its_least_recently_seen_flows() {
    if !privileged!() {
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
