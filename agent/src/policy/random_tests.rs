//! Property tests of the compiler: random overlapping policies, with random identity
//! conditions and random people, against a brute-force first match over the config.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};

use super::{
    tests::{base_config, first_match, kernel_lookup},
    *,
};
use crate::config::{GoDuration, Policy, identity::UserPattern};

/// Every answer some device could get for a packet, taking identity conditions as
/// independent of each other (as the compiler does; it compares them only for
/// equality): the conditioned policies met before the first unconditional match, each
/// condition once, then that match (or `NO_POLICY`).
fn reachable_for_some_identity(
    config: &Config,
    dst: IpAddr,
    proto: Protocol,
    port: u16,
) -> Vec<u32> {
    if config.bypass.iter().any(|net| net.contains(&dst)) {
        return vec![BYPASS_POLICY];
    }
    let mut matching: Vec<(usize, &Policy)> = config
        .policies
        .iter()
        .enumerate()
        .filter(|(_, p)| p.matches_packet(dst, proto, port))
        .collect();
    matching.sort_by_key(|(_, p)| p.precedence);
    let mut reached = Vec::new();
    let mut conditions = Vec::new();
    for (i, p) in matching {
        match &p.identity {
            Some(c) if conditions.contains(&c) => {}
            Some(c) => {
                conditions.push(c);
                reached.push(i as u32);
            }
            None => {
                reached.push(i as u32);
                return reached;
            }
        }
    }
    reached.push(NO_POLICY);
    reached
}

/// Who a random test's devices can be: each user with each provider and each set of
/// groups drawn from `GROUPS`.
const USERS: [&str; 3] = ["ann@example.com", "bob@example.com", "cy@contractor.org"];
const IDPS: [&str; 2] = ["okta", "entra"];
const GROUPS: [&str; 2] = ["finance", "staff"];

struct Person {
    user: &'static str,
    idp: &'static str,
    groups: Vec<String>,
}

impl Person {
    fn identity(&self) -> Identity<'_> {
        Identity {
            user: self.user,
            idp: self.idp,
            groups: &self.groups,
        }
    }
}

fn everyone() -> Vec<Person> {
    let mut people = Vec::new();
    for user in USERS {
        for idp in IDPS {
            for subset in 0..1 << GROUPS.len() {
                let groups = GROUPS
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| subset & (1 << i) != 0)
                    .map(|(_, g)| g.to_string())
                    .collect();
                people.push(Person { user, idp, groups });
            }
        }
    }
    people
}

/// A random identity condition over `USERS`, `IDPS` and `GROUPS`; never a users list
/// with a pattern, so that some person always satisfies it.
fn random_identity(rng: &mut StdRng) -> IdentityCondition {
    let pick = |rng: &mut StdRng, from: &[&str]| -> Vec<String> {
        let mut items: Vec<String> = from
            .iter()
            .filter(|_| rng.random_bool(0.5))
            .map(|s| s.to_string())
            .collect();
        if items.is_empty() {
            items.push(from.choose(rng).unwrap().to_string());
        }
        items
    };
    let mut condition = IdentityCondition {
        users: None,
        user_matches: None,
        groups: None,
        idps: None,
    };
    match rng.random_range(0..4) {
        0 => condition.users = Some(pick(rng, &USERS)),
        1 => {
            let pattern = [".*@example\\.com", "ann@.*|cy@.*", ".*"]
                .choose(rng)
                .unwrap();
            condition.user_matches = Some(UserPattern::new(pattern).unwrap());
        }
        _ => {}
    }
    if rng.random_bool(0.5) {
        condition.groups = Some(pick(rng, &GROUPS));
    }
    let empty =
        condition.users.is_none() && condition.user_matches.is_none() && condition.groups.is_none();
    if rng.random_bool(0.3) || empty {
        condition.idps = Some(pick(rng, &IDPS));
    }
    condition
}

/// A random policy set over a small address universe, so that CIDRs nest and overlap.
fn random_config(rng: &mut StdRng) -> Config {
    const PORTS: [u16; 6] = [22, 53, 80, 443, 3389, 8443];
    let mut config = base_config();
    let random_net = |rng: &mut StdRng| -> IpNet {
        if rng.random_bool(0.7) {
            let len = *[15u8, 16, 20, 23, 24, 25, 26, 28, 31, 32]
                .choose(rng)
                .unwrap();
            let addr = Ipv4Addr::from(0xC612_0000u32 | rng.random_range(0..0x0002_0000u32));
            IpNet::new(addr.into(), len).unwrap().trunc()
        } else {
            let len = *[32u8, 33, 40, 48, 64, 120, 127, 128].choose(rng).unwrap();
            let addr = random_v6(rng);
            IpNet::new(addr.into(), len).unwrap().trunc()
        }
    };
    let n = rng.random_range(1..12);
    let mut precedences: Vec<i64> = (0..100).collect();
    for i in 0..n {
        let dests = (0..rng.random_range(1..4))
            .map(|_| random_net(rng))
            .collect();
        let slot = rng.random_range(0..precedences.len());
        config.policies.push(Policy {
            name: format!("p{i}"),
            precedence: precedences.swap_remove(slot),
            destinations: dests,
            protocol: *[None, Some(Protocol::Tcp), Some(Protocol::Udp)]
                .choose(rng)
                .unwrap(),
            ports: rng.random_bool(0.5).then(|| {
                let mut ports: Vec<u16> = PORTS
                    .iter()
                    .copied()
                    .filter(|_| rng.random_bool(0.4))
                    .collect();
                if ports.is_empty() {
                    ports.push(443);
                }
                ports
            }),
            check_session: match rng.random_range(0..4) {
                0 => CheckSession::Unlimited {
                    enforce_without_duration: false,
                },
                d => CheckSession::Enforce(GoDuration(Duration::from_secs(60 * d))),
            },
            on_expired: OnExpired::Drop,
            redirect_ports: Vec::new(),
            access: false,
            identity: rng.random_bool(0.4).then(|| random_identity(rng)),
        });
    }
    config.bypass = (0..rng.random_range(0..3))
        .map(|_| random_net(rng))
        .collect();
    config
}

/// An address in 2001:db8::/32 drawn from few enough values that prefixes nest.
fn random_v6(rng: &mut StdRng) -> Ipv6Addr {
    let middle: u128 = rng.random_range(0..4u128) << 80;
    let low: u128 = rng.random_range(0..4u128);
    Ipv6Addr::from((0x2001_0db8u128 << 96) | middle | low)
}

fn probe_addresses(config: &Config, rng: &mut StdRng) -> Vec<IpAddr> {
    let mut addrs: Vec<IpAddr> = Vec::new();
    for net in config
        .policies
        .iter()
        .flat_map(|p| &p.destinations)
        .chain(&config.bypass)
    {
        addrs.push(net.network());
        addrs.push(net.broadcast());
    }
    for _ in 0..200 {
        addrs.push(Ipv4Addr::from(0xC612_0000u32 | rng.random_range(0..0x0002_0000u32)).into());
        addrs.push(random_v6(rng).into());
    }
    addrs
}

#[test]
fn compiled_tables_equal_first_match_by_precedence_on_random_policies() {
    let people = everyone();
    let mut checked = 0usize;
    let mut decided_by_identity = 0usize;
    for seed in 0..150u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let config = random_config(&mut rng);
        let table = compile(&config).unwrap();
        let masks: Vec<u64> = people
            .iter()
            .map(|p| identity_mask(&config, &table, &p.identity()))
            .collect();
        let addrs = probe_addresses(&config, &mut rng);
        for addr in addrs {
            // No session, and three people drawn at random.
            let mut devices: Vec<Option<usize>> = vec![None];
            devices.extend((0..3).map(|_| Some(rng.random_range(0..people.len()))));
            for proto in [Protocol::Tcp, Protocol::Udp] {
                for port in [22, 53, 80, 443, 3389, 8443, 1, 65535] {
                    let mut answers = Vec::new();
                    for &device in &devices {
                        let who = device.map(|d| people[d].identity());
                        let mask = device.map_or(0, |d| masks[d]);
                        let expected = first_match(&config, addr, proto, port, who.as_ref());
                        let got = kernel_lookup(&table, addr, proto, port, mask);
                        assert_eq!(
                            got,
                            expected,
                            "seed {seed}: {addr} {proto:?}/{port} for {:?}: kernel table gives {got}, first match is {expected}\n{config:#?}",
                            device.map(|d| (people[d].user, people[d].idp, &people[d].groups))
                        );
                        answers.push(got);
                        checked += 1;
                    }
                    decided_by_identity += usize::from(answers.iter().any(|a| *a != answers[0]));
                }
            }
        }
    }
    assert!(checked > 200_000, "only {checked} probes");
    assert!(
        decided_by_identity > 5_000,
        "only {decided_by_identity} probes where identity changed the answer"
    );
}

#[test]
fn unreadable_packets_get_the_strictest_policy_some_packet_reaches_on_random_policies() {
    let mut judged = 0usize;
    for seed in 0..300u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let config = random_config(&mut rng);
        let table = compile(&config).unwrap();
        for addr in probe_addresses(&config, &mut rng) {
            // Every answer a readable packet to `addr` can get (1 and 65535 stand for
            // the ports no policy names), and of those the session-checked policy
            // with the shortest duration, the earliest by precedence on a tie.
            let mut reached = Vec::new();
            for proto in [Protocol::Tcp, Protocol::Udp] {
                for port in [22, 53, 80, 443, 3389, 8443, 1, 65535] {
                    reached.extend(reachable_for_some_identity(&config, addr, proto, port));
                }
            }
            let expected = reached
                .iter()
                .filter_map(|&i| {
                    let p = config.policies.get(i as usize)?;
                    Some((p.duration()?, p.precedence, i))
                })
                .min()
                .map_or(NO_POLICY, |(_, _, i)| i);
            let got = table
                .dest
                .iter()
                .filter(|(net, _)| net.contains(&addr))
                .max_by_key(|(net, _)| net.prefix_len())
                .map_or(NO_POLICY, |(_, rule)| rule.unreadable);
            assert_eq!(got, expected, "seed {seed}: {addr}\n{config:#?}");
            judged += usize::from(got != NO_POLICY);
        }
    }
    assert!(
        judged > 1000,
        "only {judged} addresses under a session check"
    );
}

#[test]
fn reachability_matches_a_brute_force_search_on_random_policies() {
    for seed in 0..200u64 {
        let mut rng = StdRng::seed_from_u64(1000 + seed);
        let config = random_config(&mut rng);
        let table = compile(&config).unwrap();
        // Brute force over every address a policy's CIDRs can hold, at their ends and
        // at every boundary of any other prefix inside them (enough to meet every
        // region), and every port any policy names plus one none names.
        let mut boundaries: Vec<IpAddr> = Vec::new();
        let all: Vec<IpNet> = config
            .policies
            .iter()
            .flat_map(|p| p.destinations.clone())
            .chain(config.bypass.clone())
            .collect();
        for net in &all {
            for edge in [net.network(), net.broadcast()] {
                boundaries.push(edge);
                boundaries.extend(step(edge, 1));
                boundaries.extend(step(edge, -1));
            }
        }
        let mut seen = vec![false; config.policies.len()];
        for addr in boundaries {
            for proto in [Protocol::Tcp, Protocol::Udp] {
                for port in [22, 53, 80, 443, 3389, 8443, 1] {
                    for policy in reachable_for_some_identity(&config, addr, proto, port) {
                        if let Some(s) = seen.get_mut(policy as usize) {
                            *s = true;
                        }
                    }
                }
            }
        }
        assert_eq!(table.reachable, seen, "seed {seed}: {config:#?}");
    }
}

fn step(addr: IpAddr, delta: i8) -> Option<IpAddr> {
    match addr {
        IpAddr::V4(a) => u32::from(a)
            .checked_add_signed(i32::from(delta))
            .map(|n| Ipv4Addr::from(n).into()),
        IpAddr::V6(a) => {
            let n = u128::from(a);
            let n = if delta > 0 {
                n.checked_add(1)
            } else {
                n.checked_sub(1)
            };
            n.map(|n| Ipv6Addr::from(n).into())
        }
    }
}
