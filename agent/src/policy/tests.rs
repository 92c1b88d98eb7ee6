use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};

use super::*;
use crate::config::{GoDuration, Policy, identity::UserPattern};

/// The policy index the kernel's tables give a packet from a device with identity mask
/// `mask`, computed from the compiled table the way the program does (longest prefix,
/// then port rule, then default; then the identity answer).
fn kernel_lookup(table: &PolicyTable, dst: IpAddr, proto: Protocol, port: u16, mask: u64) -> u32 {
    let Some((_, rule)) = table
        .dest
        .iter()
        .filter(|(net, _)| net.contains(&dst))
        .max_by_key(|(net, _)| net.prefix_len())
    else {
        return NO_POLICY;
    };
    let port_rule = (rule.port_table != 0)
        .then(|| {
            table.port_rules.iter().find(|(k, _)| {
                k.port_table == rule.port_table && k.port == port && k.proto == proto.ip_proto()
            })
        })
        .flatten()
        .map(|(_, v)| *v);
    table.resolve(
        agent_common::logic::policy_for(rule, proto.ip_proto(), port_rule),
        mask,
    )
}

/// The reference semantics: the first match over bypass destinations, then policies by
/// precedence, for a device with this identity (`None`: no session). `BYPASS_POLICY`,
/// a policy index, or `NO_POLICY`.
fn first_match(
    config: &Config,
    dst: IpAddr,
    proto: Protocol,
    port: u16,
    who: Option<&Identity<'_>>,
) -> u32 {
    if config.bypass.iter().any(|net| net.contains(&dst)) {
        return BYPASS_POLICY;
    }
    config
        .first_match(dst, proto, port, who)
        .map_or(NO_POLICY, |i| i as u32)
}

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
        .filter(|(_, p)| {
            p.destinations.iter().any(|net| net.contains(&dst))
                && p.matches_protocol(proto)
                && p.matches_port(port)
        })
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

fn base_config() -> Config {
    Config::parse("[agent]\ninterfaces = [\"t0\"]\n", "test").unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn policy(name: &str, precedence: i64, dests: &[&str], duration_secs: Option<u64>) -> Policy {
    Policy {
        name: name.into(),
        precedence,
        destinations: dests.iter().map(|d| net(d)).collect(),
        protocol: None,
        ports: None,
        check_session: match duration_secs {
            Some(s) => CheckSession::Enforce(GoDuration(Duration::from_secs(s))),
            None => CheckSession::Unlimited {
                enforce_without_duration: false,
            },
        },
        on_expired: OnExpired::Drop,
        redirect_ports: Vec::new(),
        access: false,
        identity: None,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn overlapping_policies_follow_precedence_not_prefix_length() {
    // A 7-day baseline over the whole range, with a 10-minute app inside it.
    let mut config = base_config();
    config.policies = vec![
        policy("baseline", 200, &["198.18.0.0/15"], Some(7 * 86400)),
        policy("app", 100, &["198.19.10.0/24"], Some(600)),
    ];
    let table = compile(&config).unwrap();
    let lookup = |a: &str| kernel_lookup(&table, ip(a), Protocol::Tcp, 443, 0);
    assert_eq!(
        lookup("198.19.10.7"),
        1,
        "the app has the lower precedence number"
    );
    assert_eq!(lookup("198.18.3.4"), 0);
    assert_eq!(lookup("203.0.113.1"), NO_POLICY);

    // The reverse order: the baseline comes first and wins everywhere, and the app is
    // completely shadowed.
    config.policies[0].precedence = 50;
    let table = compile(&config).unwrap();
    assert_eq!(
        kernel_lookup(&table, ip("198.19.10.7"), Protocol::Tcp, 443, 0),
        0
    );
    assert_eq!(table.reachable, [true, false]);
}

#[test]
fn protocol_and_port_narrowing_falls_through_to_later_policies() {
    let mut config = base_config();
    let mut wiki = policy("wiki", 10, &["198.19.10.0/24"], Some(60));
    wiki.protocol = Some(Protocol::Tcp);
    wiki.ports = Some(vec![443, 8443]);
    let baseline = policy("baseline", 20, &["198.18.0.0/15"], Some(3600));
    config.policies = vec![wiki, baseline];
    let table = compile(&config).unwrap();
    let at = |proto, port| kernel_lookup(&table, ip("198.19.10.5"), proto, port, 0);
    assert_eq!(at(Protocol::Tcp, 443), 0);
    assert_eq!(at(Protocol::Tcp, 8443), 0);
    assert_eq!(at(Protocol::Tcp, 80), 1);
    assert_eq!(at(Protocol::Udp, 443), 1);
    // One port table for the /24, two TCP port answers; the /15 needs none.
    assert_eq!(table.port_rules.len(), 2);
    assert_eq!(table.dest.len(), 2);
}

#[test]
fn bypass_destinations_win_over_every_policy() {
    let mut config = base_config();
    config.bypass = vec![net("198.19.10.10/32")];
    config.policies = vec![policy("app", 1, &["198.19.10.0/24"], Some(60))];
    let table = compile(&config).unwrap();
    assert_eq!(
        kernel_lookup(&table, ip("198.19.10.10"), Protocol::Udp, 53, 0),
        BYPASS_POLICY
    );
    assert_eq!(
        kernel_lookup(&table, ip("198.19.10.11"), Protocol::Udp, 53, 0),
        0
    );
}

#[test]
fn params_carry_duration_and_enforcement() {
    let mut config = base_config();
    config.policies = vec![
        policy("checked", 1, &["198.18.0.0/24"], Some(90 * 60)),
        policy("open", 2, &["198.18.1.0/24"], None),
    ];
    let table = compile(&config).unwrap();
    assert_eq!(
        table.params[0],
        PolicyParams {
            duration_ns: 90 * 60 * 1_000_000_000,
            flags: POLICY_ENFORCE,
            on_expired: ACTION_DROP,
            redirect_ports: [0; MAX_REDIRECT_PORTS],
        }
    );
    assert_eq!(table.params[1].flags & POLICY_ENFORCE, 0);
}

#[test]
fn capacity_limits_are_enforced_with_a_clear_error() {
    let mut config = base_config();
    config.limits.max_policy_cidrs = 2;
    config.policies = vec![policy(
        "many",
        1,
        &["198.18.0.0/24", "198.18.1.0/24", "198.18.2.0/24"],
        Some(60),
    )];
    let err = compile(&config).unwrap_err();
    assert_eq!(
        err,
        CompileError::TooManyPrefixes {
            family: "IPv4",
            needed: 3,
            limit: 2
        }
    );
    assert!(err.to_string().contains("max_policy_cidrs"));
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

#[test]
fn lint_warns_about_the_common_mistakes() {
    let text = r#"
        [agent]
        interfaces = ["t0"]
        [dns]
        ports = [53]
        resolvers = ["198.19.0.53"]
        [bypass]
        destinations = ["198.19.0.10"]

        [[policy]]
        name = "everything"
        precedence = 1
        destinations = ["198.0.0.0/8"]
        check_session = { enforce = true, duration = "168h" }

        [[policy]]
        name = "shadowed"
        precedence = 2
        destinations = ["198.19.5.0/24"]
        check_session = { enforce = true, duration = "1h" }

        [[policy]]
        name = "dns only"
        precedence = 3
        destinations = ["203.0.113.0/24"]
        ports = [53]
        check_session = { enforce = true }
    "#;
    let config = Config::parse(text, "t").unwrap();
    let table = compile(&config).unwrap();
    let warnings: Vec<String> = lint(&config, &table)
        .iter()
        .map(|w| w.to_string())
        .collect();
    let expect = [
        ("policy \"everything\" (#1)", "DNS resolver 198.19.0.53"),
        (
            "policy \"everything\" (#1)",
            "overlaps the bypass destination 198.19.0.10/32",
        ),
        ("policy \"everything\" (#1)", "/8 or wider"),
        ("policy \"shadowed\" (#2)", "completely shadowed"),
        ("policy \"dns only\" (#3)", "only DNS ports"),
        ("policy \"dns only\" (#3)", "no duration"),
    ];
    for (place, needle) in expect {
        assert!(
            warnings
                .iter()
                .any(|w| w.starts_with(place) && w.contains(needle)),
            "missing warning {place}: {needle} in {warnings:#?}"
        );
    }
    assert_eq!(warnings.len(), expect.len(), "{warnings:#?}");
    let described = describe(&config, &table);
    assert!(described.contains("198.0.0.0/8"), "{described}");
    assert!(
        described.contains("\"everything\" (session <= 168h0m0s, else drop)"),
        "{described}"
    );
    assert!(
        described.contains("198.0.0.0/8            unreadable -> \"everything\""),
        "{described}"
    );
}

#[test]
fn check_shows_identity_conditions_and_warns_about_shadowed_ones() {
    let text = r#"
        [agent]
        interfaces = ["t0"]
        portal_listen = "[::]:8511"
        portal_url = "http://198.18.0.1:8511"

        [[idp]]
        name = "okta"
        issuer = "https://okta.example.com"
        client_id = "sessiongate"
        client_secret_file = "/etc/sessiongate/okta-secret"

        [[policy]]
        name = "Ledger for finance"
        precedence = 1
        destinations = ["198.19.10.0/24"]
        check_session = { enforce = true, duration = "8h" }
        identity = { groups = ["finance"] }

        [[policy]]
        name = "Finance again"
        precedence = 2
        destinations = ["198.19.10.0/25"]
        check_session = { enforce = true, duration = "4h" }
        identity = { groups = ["finance"] }

        [[policy]]
        name = "Partners"
        precedence = 3
        destinations = ["198.19.10.0/24"]
        check_session = { enforce = true, duration = "1h" }
        identity = { idps = ["partner-idp"] }

        [[policy]]
        name = "Ledger"
        precedence = 10
        destinations = ["198.19.10.0/24"]
        check_session = { enforce = true, duration = "168h" }
    "#;
    let config = Config::parse(text, "t").unwrap();
    let table = compile(&config).unwrap();
    let warnings: Vec<String> = lint(&config, &table)
        .iter()
        .map(|w| w.to_string())
        .collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with("policy \"Finance again\" (#2)")
                && w.contains("whoever the user is")),
        "{warnings:#?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with("policy \"Partners\" (#3)")
                && w.contains("\"partner-idp\", which no [[idp]] section is")),
        "{warnings:#?}"
    );
    assert_eq!(warnings.len(), 2, "{warnings:#?}");
    let described = describe(&config, &table);
    assert!(
        described.contains("\"Ledger for finance\" (session <= 8h0m0s, else drop) for identity { groups = [\"finance\"] }"),
        "{described}"
    );
    assert!(
        described.contains("\"Ledger\" (session <= 168h0m0s, else drop) for everyone"),
        "{described}"
    );
    // The table's answer for the ledger names each policy in turn, then the baseline.
    assert!(
        described.contains("if identity { groups = [\"finance\"] }; \"Partners\" (session <= 1h0m0s, else drop) if identity { idps = [\"partner-idp\"] }; else \"Ledger\""),
        "{described}"
    );
}
