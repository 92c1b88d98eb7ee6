//! Random frames checked one by one against the reference model (`reference`), with
//! unknown devices refused and allowed.

use std::net::IpAddr;

use agent_common::verdict::{Verdict, counter};
use netlab::{
    packets::{PROTO_TCP, PROTO_UDP},
    privileged,
};
use rand::{SeedableRng, rngs::StdRng};
use sessiongate::config::{Identity, UnknownDevice};

use crate::{
    harness::*,
    random,
    random::Pools,
    reference::{Model, Who},
};

/// Frames per fuzz run: enough that every verdict comes up dozens of times.
const RANDOM_FRAMES: usize = 6000;

/// Who each device with a session is, in the runs with identities. The sessions of
/// two hours (`EXPIRED`) fall where identity decides: a contractor's (IPv4) is past
/// Contractors' 90 minutes where Baseline's 168 hours would admit it, a finance
/// user's (IPv6) within Finance's 8 hours where App's 1 hour would refuse it.
fn identity_of(device: IpAddr, d: u8) -> Who {
    let who = |user: &str, idp: &str, groups: &[&str]| -> Who {
        let groups = groups.iter().map(|g| g.to_string()).collect();
        (user.to_string(), idp.to_string(), groups)
    };
    match (d, device.is_ipv4()) {
        (EXPIRED, true) => who("cy@contractor.org", "entra", &[]),
        (EXPIRED, false) => who("ann@example.com", "okta", &["finance"]),
        _ => who("bob@example.com", "okta", &["staff"]),
    }
}

/// Runs random frames (`random::frame`) and checks each against the reference model:
/// the same verdict, XDP_DROP exactly for its refusals (so never XDP_ABORTED, and no
/// drop of anything but a new TCP or UDP flow to a session-checked destination), and
/// any refusal event naming the refused flow. With `identities`, devices sign in as
/// `identity_of` says (else as `DEFAULT_USER`, whom no identity condition matches).
fn random_frames_match_the_reference_model(agent_extra: &str, seed: u64, identities: bool) {
    // Flow table room far beyond the flows admitted, so that none is evicted: the
    // model keeps every one.
    let mut h = Harness::sized(agent_extra, 1024, 1 << 16);
    let mut sessions = Vec::new();
    for (d, age) in DEVICES.iter().filter_map(|&(d, age)| Some((d, age?))) {
        for device in [v4(d), v6(d)] {
            let who = if identities {
                identity_of(device, d)
            } else {
                let (user, idp, groups) = DEFAULT_USER;
                let groups = groups.iter().map(|g| g.to_string()).collect();
                (user.into(), idp.into(), groups)
            };
            let identity = Identity {
                user: &who.0,
                idp: &who.1,
                groups: &who.2,
            };
            h.login_as(device, age, &identity);
            sessions.push((device, age, who));
        }
    }
    let mut model = Model::new(&h.config, sessions);
    let pools = Pools {
        devices4: DEVICES.iter().map(|&(d, _)| v4(d)).collect(),
        devices6: DEVICES.iter().map(|&(d, _)| v6(d)).collect(),
        destinations4: [
            "198.19.10.5",
            "198.19.30.7",
            "198.19.40.1",
            "198.19.61.5",
            "198.19.62.5",
            "198.19.200.1",
            "198.19.99.1",
            "198.18.200.1",
        ]
        .map(ip)
        .to_vec(),
        destinations6: [
            "2001:db8:10::5",
            "2001:db8:61::5",
            "2001:db8:99::1",
            "2001:db8:77::1",
        ]
        .map(ip)
        .to_vec(),
        ports: vec![53, 22, 80, 443, 3389, 3478, 4433, 5060],
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seen = [0u64; Verdict::ALL.len()];
    let mut events = 0;
    for _ in 0..RANDOM_FRAMES {
        let frame = random::frame(&mut rng, &pools);
        let verdict = model.verdict(&frame);
        let action = if verdict.is_refusal() {
            XDP_DROP
        } else {
            XDP_PASS
        };
        let got = h.run(&frame);
        assert_ne!(got.0, XDP_ABORTED, "aborted on {frame:02x?}");
        assert_eq!(got, (action, verdict), "frame {frame:02x?}");
        seen[verdict.code() as usize] += 1;
        // Events are rate-limited, so a refusal may have none; but an event only ever
        // comes from this frame's refusal.
        for e in h.events() {
            let (flow, policy) = model.last_refusal.expect("an event without a refusal");
            let protocol = match flow.proto {
                PROTO_TCP => "tcp",
                PROTO_UDP => "udp",
                _ => "ip",
            };
            assert_eq!(
                (e.device, e.destination, e.port, e.protocol, e.policy),
                (flow.src, flow.dst, flow.dport, protocol, policy)
            );
            assert_eq!(e.verdict, verdict);
            events += 1;
        }
    }

    assert_eq!(h.policy_drops(), model.policy_drops);
    let refusals: u64 = Verdict::ALL
        .iter()
        .filter(|v| v.is_refusal())
        .map(|v| seen[v.code() as usize])
        .sum();
    assert_eq!(h.counter(counter::EVENTS_SENT), events);
    assert_eq!(h.counter(counter::EVENTS_LOST), 0);
    assert_eq!(
        events + h.counter(counter::EVENTS_RATE_LIMITED),
        refusals,
        "every refusal is reported or counted as rate-limited"
    );
    // The frames reach every verdict the config allows, many times over.
    let impossible = if h.config.agent.unknown_device == UnknownDevice::Allow {
        Verdict::DroppedUnknownDevice
    } else {
        Verdict::AdmittedUnknownDevice
    };
    for v in Verdict::ALL {
        let n = seen[v.code() as usize];
        if v == impossible {
            assert_eq!(n, 0, "{v:?}");
        } else {
            assert!(n >= 20, "{v:?} came up {n} times: {seen:?}");
        }
    }
}

#[test]
fn random_frames_get_the_reference_verdicts_and_are_never_aborted() {
    if !privileged!() {
        return;
    }
    random_frames_match_the_reference_model("", 0x5e55_1061, false);
}

#[test]
fn random_frames_get_the_reference_verdicts_with_unknown_devices_allowed() {
    if !privileged!() {
        return;
    }
    random_frames_match_the_reference_model("unknown_device = \"allow\"", 0xa110_0b1d, false);
}

#[test]
fn random_frames_get_the_reference_verdicts_for_each_identity() {
    if !privileged!() {
        return;
    }
    random_frames_match_the_reference_model("", 0x1de7_1717, true);
}
