use std::{path::PathBuf, time::Duration};

use ipnet::IpNet;

use crate::config::{
    CheckSession, Config, ConfigError, DEFAULT_ETCD_PREFIX, EtcdConfig, GoDuration, Limits,
    OnExpired, Problem, Protocol, ReplyLimit, StoreConfig, UnknownDevice, XdpMode,
};

const EXAMPLE: &str = r#"
    [agent]
    interfaces = ["eth0"]
    xdp_mode = "auto"
    unknown_device = "enforce"
    api_socket = "/run/sessiongate/api.sock"
    state_dir = "/var/lib/sessiongate"

    [dns]
    ports = [53]

    [bypass]
    destinations = ["203.0.113.10/32"]

    [[policy]]
    name = "Company Wiki"
    precedence = 103
    destinations = ["198.19.10.0/24", "2001:db8:10::/48"]
    protocol = "tcp"
    ports = [443, 8443]
    check_session = { enforce = true, duration = "1h30m0s" }
    on_expired = "drop"
"#;

pub(super) fn problems(text: &str) -> Vec<Problem> {
    match Config::parse(text, "test.toml") {
        Err(ConfigError::Invalid { problems, .. }) => problems,
        other => panic!("expected problems, got {other:?}"),
    }
}

pub(super) fn has(problems: &[Problem], place: &str, field: &str, needle: &str) -> bool {
    problems
        .iter()
        .any(|p| p.place == place && p.field == field && p.message.contains(needle))
}

/// Every expected (place, field, message part) is among `p`, and nothing else is.
pub(super) fn assert_exactly(p: &[Problem], expected: &[(&str, &str, &str)]) {
    for (place, field, needle) in expected {
        assert!(
            has(p, place, field, needle),
            "missing problem {place} / {field} / {needle}; got:\n{p:#?}"
        );
    }
    assert_eq!(p.len(), expected.len(), "unexpected extra problems: {p:#?}");
}

#[test]
fn the_documented_example_is_valid() {
    let config = Config::parse(EXAMPLE, "example.toml").expect("valid");
    assert_eq!(config.agent.interfaces, ["eth0"]);
    assert_eq!(config.agent.xdp_mode, XdpMode::Auto);
    assert_eq!(config.agent.udp_idle_timeout.0, Duration::from_secs(120));
    assert_eq!(config.dns.ports, [53]);
    assert_eq!(config.bypass, ["203.0.113.10/32".parse::<IpNet>().unwrap()]);
    let wiki = &config.policies[0];
    assert_eq!(wiki.name, "Company Wiki");
    assert_eq!(wiki.precedence, 103);
    assert_eq!(wiki.protocol, Some(Protocol::Tcp));
    assert_eq!(wiki.ports.as_deref(), Some(&[443, 8443][..]));
    assert_eq!(
        wiki.check_session,
        CheckSession::Enforce(GoDuration(Duration::from_secs(5400)))
    );
    assert_eq!(wiki.on_expired, OnExpired::Drop);
}

#[test]
fn a_socket_path_too_long_for_a_unix_socket_is_refused() {
    let fits = format!("/run/{}", "s".repeat(102));
    let text = |path: &str| format!("[agent]\ninterfaces = [\"veth0\"]\napi_socket = \"{path}\"\n");
    assert_eq!(fits.len(), 107);
    assert!(Config::parse(&text(&fits), "t").is_ok());
    let long = format!("{fits}k");
    assert_exactly(
        &problems(&text(&long)),
        &[(
            "[agent]",
            "api_socket",
            "108 bytes long; a unix socket path holds at most 107",
        )],
    );
}

#[test]
fn defaults_fill_every_section_but_interfaces() {
    let config = Config::parse("[agent]\ninterfaces = [\"veth0\"]\n", "t").unwrap();
    assert_eq!(config.agent.unknown_device, UnknownDevice::Enforce);
    assert_eq!(
        config.agent.api_socket,
        PathBuf::from("/run/sessiongate/api.sock")
    );
    assert_eq!(config.dns.ports, [53]);
    assert!(config.policies.is_empty());
    assert_eq!(config.limits, Limits::default());
    assert_eq!(config.store, StoreConfig::Local);
}

#[test]
fn an_etcd_store_parses_with_its_tls_files() {
    let text = r#"
        [agent]
        interfaces = ["veth0"]
        [store]
        kind = "etcd"
        endpoints = ["https://198.18.250.1:2379", "https://etcd-2.example:2379"]
        prefix = "/fleet/a"
        ca_file = "/etc/sessiongate/etcd-ca.pem"
        cert_file = "/etc/sessiongate/etcd.pem"
        key_file = "/etc/sessiongate/etcd-key.pem"
    "#;
    let config = Config::parse(text, "t").unwrap();
    let StoreConfig::Etcd(etcd) = config.store else {
        panic!("not etcd: {:?}", config.store);
    };
    assert_eq!(etcd.endpoints.len(), 2);
    assert_eq!(etcd.prefix, "/fleet/a");
    let tls = etcd.tls.expect("tls");
    assert_eq!(tls.ca_file, PathBuf::from("/etc/sessiongate/etcd-ca.pem"));
    assert_eq!(
        tls.client,
        Some((
            PathBuf::from("/etc/sessiongate/etcd.pem"),
            PathBuf::from("/etc/sessiongate/etcd-key.pem")
        ))
    );
    let plain = Config::parse(
        "[agent]\ninterfaces = [\"veth0\"]\n[store]\nkind = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\n",
        "t",
    )
    .unwrap();
    assert_eq!(
        plain.store,
        StoreConfig::Etcd(EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".to_string()],
            prefix: DEFAULT_ETCD_PREFIX.to_string(),
            tls: None,
        })
    );
}

#[test]
fn etcd_store_problems_are_named() {
    let with = |store: &str| {
        problems(&format!(
            "[agent]\ninterfaces = [\"veth0\"]\n[store]\n{store}\n"
        ))
    };
    let cases: [(&str, &str, &str); 10] = [
        ("kind = \"zookeeper\"", "kind", "\"zookeeper\""),
        ("kind = \"etcd\"", "endpoints", "list the etcd members"),
        (
            "kind = \"etcd\"\nendpoints = [\"198.18.250.1:2379\"]",
            "endpoints[0]",
            "http:// or https://",
        ),
        (
            "kind = \"etcd\"\nendpoints = [\"http://198.18.250.1\"]",
            "endpoints[0]",
            "needs a port",
        ),
        (
            "kind = \"etcd\"\nendpoints = [\"http://198.18.250.1:0\"]",
            "endpoints[0]",
            "1 to 65535",
        ),
        (
            "kind = \"etcd\"\nendpoints = [\"http://a:1\", \"https://b:1\"]\nca_file = \"/ca\"",
            "endpoints",
            "mixes",
        ),
        (
            "kind = \"etcd\"\nendpoints = [\"https://a:1\"]",
            "ca_file",
            "CA certificate",
        ),
        (
            "kind = \"etcd\"\nendpoints = [\"https://a:1\"]\nca_file = \"/ca\"\ncert_file = \"/c\"",
            "key_file",
            "needs the key",
        ),
        (
            "kind = \"etcd\"\nendpoints = [\"http://a:1\"]\nprefix = \"sessiongate/\"",
            "prefix",
            "\"sessiongate/\"",
        ),
        (
            "endpoints = [\"http://a:1\"]",
            "endpoints",
            "only applies with kind = \"etcd\"",
        ),
    ];
    for (store, field, needle) in cases {
        let p = with(store);
        assert!(
            has(&p, "[store]", field, needle),
            "{store}: expected [store] {field} ~ {needle:?}, got {p:?}"
        );
    }
    let p = with("kind = \"etcd\"\nendpoints = [\"http://a:1\"]\nca_file = \"/ca\"");
    assert!(has(&p, "[store]", "endpoints", "need https://"), "{p:?}");
}

#[test]
fn every_problem_is_reported_at_once_with_place_and_field() {
    let text = r#"
        [agent]
        interfaces = []
        xdp_mode = "turbo"
        unknown_device = "maybe"
        udp_idle_timeout = "2 minutes"

        [dns]
        ports = [53, 70000]
        resolvers = ["not-an-ip"]

        [bypass]
        destinations = ["203.0.113.10/24"]

        [limits]
        max_flows = 0

        [[policy]]
        name = "Wiki"
        precedence = 10
        destinations = ["198.19.10.0/33"]
        protocol = "icmp"
        ports = [0, 443, 443]
        check_session = { enforce = true, duration = "90 minutes" }
        on_expired = "redirect"
        redirect_ports = [80, 0]

        [[policy]]
        name = "Wiki"
        precedence = 10
        destinations = []
        on_expired = "explode"

        [[policy]]
        destinations = ["198.19.0.0/16"]
        check_session = {}
    "#;
    let p = problems(text);
    let expected = [
        ("[agent]", "interfaces", "at least one"),
        ("[agent]", "xdp_mode", "\"turbo\""),
        ("[agent]", "unknown_device", "\"maybe\""),
        ("[agent]", "udp_idle_timeout", "\"2 minutes\""),
        ("[dns]", "ports[1]", "70000"),
        ("[dns]", "resolvers[0]", "not-an-ip"),
        ("[bypass]", "destinations[0]", "did you mean 203.0.113.0/24"),
        ("[limits]", "max_flows", "out of range"),
        ("policy \"Wiki\" (#1)", "destinations[0]", "198.19.10.0/33"),
        ("policy \"Wiki\" (#1)", "protocol", "\"icmp\""),
        ("policy \"Wiki\" (#1)", "ports[0]", "not a port"),
        ("policy \"Wiki\" (#1)", "ports[2]", "listed twice"),
        (
            "policy \"Wiki\" (#1)",
            "check_session.duration",
            "\"90 minutes\"",
        ),
        ("policy \"Wiki\" (#1)", "redirect_ports[1]", "not a port"),
        (
            "policy \"Wiki\" (#2)",
            "name",
            "policy #1 already has this name",
        ),
        (
            "policy \"Wiki\" (#2)",
            "precedence",
            "precedences must be unique",
        ),
        ("policy \"Wiki\" (#2)", "destinations", "at least one"),
        ("policy \"Wiki\" (#2)", "on_expired", "\"explode\""),
        ("policy #3", "name", "missing"),
        ("policy #3", "precedence", "missing"),
        ("policy #3", "check_session", "give a duration"),
        (
            "policy \"Wiki\" (#1)",
            "on_expired",
            "set [agent] portal_listen",
        ),
    ];
    assert_exactly(&p, &expected);
}

#[test]
fn reject_and_redirect_policies_parse_with_their_ports_and_needs() {
    let text = r#"
        [agent]
        interfaces = ["eth0"]
        portal_listen = "[::]:8511"
        reauth_url = "https://sso.example.com/"
        reply_rate = 2
        [[policy]]
        name = "A"
        precedence = 1
        destinations = ["198.19.1.0/24"]
        check_session = { duration = "1h" }
        on_expired = "reject"
        [[policy]]
        name = "B"
        precedence = 2
        destinations = ["198.19.2.0/24"]
        check_session = { duration = "1h" }
        on_expired = "redirect"
        [[policy]]
        name = "C"
        precedence = 3
        destinations = ["198.19.3.0/24"]
        check_session = { duration = "1h" }
        on_expired = "redirect"
        redirect_ports = [8080, 80]
    "#;
    let config = Config::parse(text, "t.toml").expect("valid");
    let actions: Vec<_> = config
        .policies
        .iter()
        .map(|p| (p.on_expired, p.redirect_ports.clone()))
        .collect();
    assert_eq!(
        actions,
        [
            (OnExpired::Reject, vec![]),
            (OnExpired::Redirect, vec![80]),
            (OnExpired::Redirect, vec![80, 8080]),
        ]
    );
    assert_eq!(config.agent.replies, ReplyLimit { rate: 2, burst: 10 });
    assert_eq!(
        config.agent.portal_listen,
        Some("[::]:8511".parse().unwrap())
    );

    let p = problems(
        r#"
        [agent]
        interfaces = ["eth0"]
        portal_listen = "[::]:8511"
        reply_burst = 0
        [[policy]]
        name = "A"
        precedence = 1
        destinations = ["198.19.1.0/24"]
        check_session = { duration = "1h" }
        redirect_ports = [80]
        [[policy]]
        name = "B"
        precedence = 2
        destinations = ["198.19.2.0/24"]
        protocol = "udp"
        check_session = { duration = "1h" }
        on_expired = "redirect"
        redirect_ports = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    "#,
    );
    let expected = [
        ("[agent]", "reply_burst", "out of range"),
        ("[agent]", "reauth_url", "set it"),
        ("policy \"A\" (#1)", "redirect_ports", "only a policy with"),
        ("policy \"B\" (#2)", "redirect_ports", "list 1 to 8"),
        ("policy \"B\" (#2)", "on_expired", "matches only UDP"),
    ];
    assert_exactly(&p, &expected);
}

#[test]
fn the_error_message_names_file_policy_field_and_string() {
    let text = r#"
        [agent]
        interfaces = ["eth0"]
        [[policy]]
        name = "Payroll"
        precedence = 1
        destinations = ["198.19.0.0/24"]
        check_session = { enforce = true, duration = "1 hour" }
    "#;
    let message = Config::parse(text, "/etc/sessiongate.toml")
        .unwrap_err()
        .to_string();
    assert!(message.contains("/etc/sessiongate.toml"), "{message}");
    assert!(message.contains("policy \"Payroll\" (#1)"), "{message}");
    assert!(message.contains("check_session.duration"), "{message}");
    assert!(message.contains("\"1 hour\""), "{message}");
}

#[test]
fn unknown_keys_and_wrong_types_are_syntax_errors_with_a_location() {
    let typo = Config::parse("[agent]\ninterface = [\"eth0\"]\n", "t.toml").unwrap_err();
    let text = typo.to_string();
    assert!(matches!(typo, ConfigError::Syntax { .. }), "{text}");
    assert!(
        text.contains("interface") && text.contains("line 2"),
        "{text}"
    );
    let wrong = Config::parse("[dns]\nports = \"53\"\n", "t.toml").unwrap_err();
    assert!(matches!(wrong, ConfigError::Syntax { .. }));
}

#[test]
fn check_session_forms() {
    let policy = |cs: &str| {
        let text = format!(
            "[agent]\ninterfaces=[\"e\"]\n[[policy]]\nname=\"p\"\nprecedence=1\ndestinations=[\"198.18.0.1\"]\n{cs}\n"
        );
        Config::parse(&text, "t").unwrap().policies.remove(0)
    };
    let unlimited = CheckSession::Unlimited {
        enforce_without_duration: false,
    };
    assert_eq!(policy("").check_session, unlimited);
    assert_eq!(
        policy("check_session = { enforce = false, duration = \"1h\" }").check_session,
        unlimited
    );
    assert_eq!(
        policy("check_session = { enforce = true }").check_session,
        CheckSession::Unlimited {
            enforce_without_duration: true
        }
    );
    assert_eq!(
        policy("check_session = { duration = \"45s\" }").check_session,
        CheckSession::Enforce(GoDuration(Duration::from_secs(45)))
    );
    // A plain address is a host route.
    assert_eq!(
        policy("").destinations,
        ["198.18.0.1/32".parse::<IpNet>().unwrap()]
    );
}

#[test]
fn addresses_are_read_as_the_api_reads_them() {
    // Leading zeros are refused with the fix, as the API refuses them; an
    // IPv4-mapped network is the IPv4 network it maps, as an IPv4-mapped device
    // is the IPv4 device.
    let p = problems(
        r#"
        [agent]
        interfaces = ["eth0"]
        [dns]
        resolvers = ["198.019.10.53", "::ffff:198.19.10.53"]
        [bypass]
        destinations = ["198.010.2.010", "::ffff:198.19.0.10/128"]
        [[policy]]
        name = "App"
        precedence = 1
        destinations = ["198.010.2.0/24", "::ffff:198.19.10.0/120", "::ffff:198.19.11.1/120"]
        "#,
    );
    assert_exactly(
        &p,
        &[
            (
                "[dns]",
                "resolvers[0]",
                "\"198.019.10.53\" has a leading zero in an IPv4 part, which some tools read as octal and others as decimal; write each part without leading zeros (e.g. 198.19.10.53)",
            ),
            ("[bypass]", "destinations[0]", "(e.g. 198.10.2.10)"),
            (
                "policy \"App\" (#1)",
                "destinations[0]",
                "(e.g. 198.10.2.0/24)",
            ),
            (
                "policy \"App\" (#1)",
                "destinations[2]",
                "has host bits set; did you mean 198.19.11.0/24?",
            ),
        ],
    );
    let config = Config::parse(
        r#"
        [agent]
        interfaces = ["eth0"]
        [dns]
        resolvers = ["::ffff:198.19.10.53"]
        [bypass]
        destinations = ["::ffff:198.19.0.10/128"]
        [[policy]]
        name = "App"
        precedence = 1
        destinations = ["::ffff:198.19.10.0/120"]
        "#,
        "t",
    )
    .unwrap();
    assert_eq!(
        config.dns.resolvers,
        ["198.19.10.53".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(config.bypass, ["198.19.0.10/32".parse::<IpNet>().unwrap()]);
    assert_eq!(
        config.policies[0].destinations,
        ["198.19.10.0/24".parse::<IpNet>().unwrap()]
    );
}

#[test]
fn policy_names_are_bounded_and_visible() {
    let precedence = std::cell::Cell::new(0);
    let policy = |name: &str| {
        precedence.set(precedence.get() + 1);
        format!(
            "[[policy]]\nname = {}\nprecedence = {}\ndestinations = [\"198.19.10.0/24\"]\n",
            toml::Value::String(name.into()),
            precedence.get()
        )
    };
    let long = "W".repeat(257);
    let text = format!(
        "[agent]\ninterfaces = [\"eth0\"]\n{}{}{}{}{}{}",
        policy("Wiki\n# forged"),
        policy("Wiki\u{202e}"),
        policy("\u{feff}Wiki"),
        policy(&long),
        policy(" Wiki"),
        // Quotes and braces are fine in a name: outputs escape them.
        policy("Wiki\"} 1"),
    );
    let p = problems(&text);
    assert_exactly(
        &p,
        &[
            (
                "policy \"Wiki\\n# forged\" (#1)",
                "name",
                "U+000A (at byte 4), a control or invisible character",
            ),
            ("policy \"Wiki\\u{202e}\" (#2)", "name", "U+202E"),
            ("policy \"\\u{feff}Wiki\" (#3)", "name", "U+FEFF"),
            (
                "policy \"WWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWW\"... (#4)",
                "name",
                "257 bytes long; the limit is 256",
            ),
            (
                "policy \" Wiki\" (#5)",
                "name",
                "starts or ends with whitespace",
            ),
        ],
    );
}

#[test]
fn notify_before_is_a_duration_longer_than_zero() {
    let config =
        |value: &str| format!("[agent]\ninterfaces = [\"eth0\"]\nnotify_before = {value}\n");
    let parsed = Config::parse(&config("\"10m\""), "test.toml").expect("valid");
    assert_eq!(
        parsed.agent.notify_before,
        Some(GoDuration(Duration::from_secs(600)))
    );
    assert_exactly(
        &problems(&config("\"0s\"")),
        &[("[agent]", "notify_before", "longer than 0s")],
    );
    assert_exactly(
        &problems(&config("\"soon\"")),
        &[("[agent]", "notify_before", "invalid duration \"soon\"")],
    );
}
