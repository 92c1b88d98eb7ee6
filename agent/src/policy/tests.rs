//! The compiler on hand-written configs, and `check`'s rendering and warnings
//! (`random_tests`: the property tests).

use std::{net::IpAddr, time::Duration};

use super::*;
use crate::config::{GoDuration, Policy};

/// The policy index the kernel's tables give a packet from a device with identity mask
/// `mask`, computed from the compiled table the way the program does (longest prefix,
/// then port rule, then default; then the identity answer).
pub(super) fn kernel_lookup(
    table: &PolicyTable,
    dst: IpAddr,
    proto: Protocol,
    port: u16,
    mask: u64,
) -> u32 {
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
pub(super) fn first_match(
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

pub(super) fn base_config() -> Config {
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
