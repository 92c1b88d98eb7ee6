//! Real traffic through a real gateway: each test builds its own client, gateway and
//! server namespaces, runs the `sessiongate` binary on the gateway, and opens real TCP
//! connections and UDP flows from device addresses.

use std::{
    net::IpAddr,
    thread,
    time::{Duration, Instant},
};

use netlab::*;

/// The addresses one test body uses, so IPv4 and IPv6 share the body.
#[derive(Clone, Copy)]
struct Family {
    device: fn(u8) -> IpAddr,
    app: IpAddr,
    open: IpAddr,
}

const V4: Family = Family {
    device,
    app: APP,
    open: OPEN,
};
const V6: Family = Family {
    device: device6,
    app: APP6,
    open: OPEN6,
};

fn fresh_session_reaches_the_app(f: Family) {
    let lab = lab!();
    let agent = lab.start_agent(&lab.config("", APP_POLICY));
    assert!(lab.xdp_attached(), "the program is attached");
    let alice = (f.device)(0);
    agent.login(alice, ALICE, NOW);
    assert!(lab.tcp_works(alice, f.app, 443), "TCP with a fresh session");
    let udp = lab.udp_socket(alice);
    assert!(udp_works(&udp, f.app, 4433), "UDP with a fresh session");
    assert!(agent.counter("admitted_new_flow") >= 2);
    assert_eq!(agent.counter("dropped_expired"), 0);
}

for_each_family!(fresh_session_reaches_the_app: fresh_session_reaches_the_protected_app_ipv4, fresh_session_reaches_the_protected_app_ipv6);

fn expired_session_cannot_open_new_flows(f: Family) {
    let lab = lab!();
    let agent = lab.start_agent(&lab.config("", APP_POLICY));
    let alice = (f.device)(1);
    agent.login(alice, ALICE, 2 * HOUR);
    assert!(lab.tcp_blocked(alice, f.app, 443), "TCP must be refused");
    let udp = lab.udp_socket(alice);
    assert!(!udp_works(&udp, f.app, 4433), "UDP must be refused");
    assert!(
        lab.tcp_works(alice, f.open, 443),
        "hosts under no policy still pass"
    );
    assert!(agent.counter("dropped_expired") >= 2);
    assert_eq!(agent.counter("admitted_new_flow"), 0);
    let line = agent.wait_for_log(&[
        "re-authentication required",
        ALICE,
        &alice.to_string(),
        "policy=\"App\"",
        &f.app.to_string(),
        "reason=session_expired",
    ]);
    assert!(
        line.contains(":443/tcp") || line.contains(":4433/udp"),
        "{line}"
    );
}

for_each_family!(expired_session_cannot_open_new_flows: expired_session_cannot_open_new_flows_ipv4, expired_session_cannot_open_new_flows_ipv6);

#[test]
fn expired_device_still_reaches_unprotected_hosts_and_dns_inside_the_range() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let agent = lab.start_agent(&lab.config("", APP_POLICY));
    let alice = device(2);
    agent.login(alice, ALICE, 2 * HOUR);
    assert!(
        lab.tcp_blocked(alice, APP, 443),
        "the app itself is refused"
    );
    assert!(
        lab.tcp_works(alice, OPEN, 443),
        "an unprotected host over TCP"
    );
    assert!(
        udp_works(&lab.udp_socket(alice), OPEN, 4433),
        "an unprotected host over UDP"
    );
    assert!(
        lab.tcp_works(device6(2), OPEN6, 443),
        "an unprotected IPv6 host"
    );
    // The resolver sits inside the protected range; DNS is never session-checked.
    let by_udp = lab
        .resolve_udp(alice, APP_DNS, "app.corp", false)
        .expect("DNS over UDP");
    assert_eq!(by_udp, [APP]);
    let by_tcp = lab
        .resolve_tcp(alice, APP_DNS, "app.corp", true)
        .expect("DNS over TCP");
    assert_eq!(by_tcp, [APP6]);
    assert!(lab.tcp_blocked(alice, APP_DNS, 443), "but not other ports");
    assert!(agent.counter("passed_dns") >= 2);
    assert!(agent.counter("passed_no_policy") >= 3);
}

fn established_flows_survive_expiry(f: Family) {
    let lab = lab!();
    let short = APP_POLICY.replace("duration = \"1h\"", "duration = \"3s\"");
    let agent = lab.start_agent(&lab.config("", &short));
    let alice = (f.device)(3);
    agent.login(alice, ALICE, NOW);
    let logged_in = Instant::now();
    let mut stream = lab
        .tcp_connect(alice, f.app, 22, SHOULD_PASS)
        .expect("an SSH-like connection while the session is valid");
    echo_tcp(&mut stream, b"before").expect("TCP echo before expiry");
    let udp = lab.udp_socket(alice);
    assert!(
        udp_works(&udp, f.app, 443),
        "a QUIC-like UDP flow while valid"
    );

    thread::sleep(Duration::from_millis(3500).saturating_sub(logged_in.elapsed()));
    for round in 0..3 {
        echo_tcp(&mut stream, format!("after {round}").as_bytes())
            .expect("the established TCP connection keeps working after expiry");
        echo_udp(&udp, f.app, 443, b"after", Duration::from_secs(2))
            .expect("the admitted UDP flow keeps working after expiry");
        thread::sleep(Duration::from_millis(300));
    }
    assert!(
        lab.tcp_blocked(alice, f.app, 22),
        "a new connection is refused"
    );
    assert!(
        !udp_works(&lab.udp_socket(alice), f.app, 443),
        "a new UDP flow is refused"
    );
    assert!(agent.counter("passed_established") >= 6);
    assert!(agent.counter("dropped_expired") >= 2);
}

for_each_family!(established_flows_survive_expiry: established_flows_survive_expiry_ipv4, established_flows_survive_expiry_ipv6);

#[test]
fn a_new_login_restores_new_connections_at_once() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let agent = lab.start_agent(&lab.config("", APP_POLICY));
    let alice = device(4);
    agent.login(alice, ALICE, 2 * HOUR);
    assert!(lab.tcp_blocked(alice, APP, 443));
    agent.login(alice, ALICE, NOW);
    assert!(
        lab.tcp_works(alice, APP, 443),
        "right after re-authentication"
    );
    assert!(udp_works(&lab.udp_socket(alice), APP, 4433));
    let show = agent.cli_ok(&["session", "show", &alice.to_string()]);
    assert!(show.contains("satisfied"), "{show}");
}

#[test]
fn a_policy_without_check_session_never_blocks() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let policies = r#"
[[policy]]
name = "Open app"
precedence = 5
destinations = ["198.19.10.0/24"]
"#;
    let agent = lab.start_agent(&lab.config("", policies));
    let (old, unknown) = (device(5), device(6));
    agent.login(old, ALICE, 24 * 30 * HOUR);
    assert!(lab.tcp_works(old, APP, 443));
    assert!(lab.tcp_works(unknown, APP, 443));
    assert!(udp_works(&lab.udp_socket(unknown), APP, 4433));
    assert!(agent.counter("passed_unlimited") >= 3);
    assert_eq!(
        agent.counter("dropped_expired") + agent.counter("dropped_unknown_device"),
        0
    );
}

#[test]
fn unknown_devices_are_refused_by_default() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let agent = lab.start_agent(&lab.config("", APP_POLICY));
    let unknown = device(7);
    assert!(lab.tcp_blocked(unknown, APP, 443));
    assert!(agent.counter("dropped_unknown_device") >= 1);
    agent.wait_for_log(&[
        "re-authentication required",
        "reason=unknown_device",
        &unknown.to_string(),
    ]);
}

#[test]
fn unknown_devices_pass_with_unknown_device_allow() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let agent = lab.start_agent(&lab.config("unknown_device = \"allow\"", APP_POLICY));
    let (unknown, expired) = (device(7), device(8));
    assert!(lab.tcp_works(unknown, APP, 443));
    assert!(agent.counter("admitted_unknown_device") >= 1);
    agent.login(expired, ALICE, 2 * HOUR);
    assert!(
        lab.tcp_blocked(expired, APP, 443),
        "an expired session is still refused"
    );
}

/// A 7-day baseline over the whole server range and a 1-hour app inside it.
fn overlapping(app_precedence: u32, baseline_precedence: u32) -> String {
    format!(
        r#"
[[policy]]
name = "Baseline"
precedence = {baseline_precedence}
destinations = ["198.19.0.0/16"]
check_session = {{ enforce = true, duration = "168h" }}

[[policy]]
name = "App"
precedence = {app_precedence}
destinations = ["198.19.10.0/24"]
check_session = {{ enforce = true, duration = "1h" }}
"#
    )
}

#[test]
fn overlapping_policies_follow_precedence_app_first() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let agent = lab.start_agent(&lab.config("", &overlapping(100, 200)));
    let alice = device(0);
    agent.login(alice, ALICE, 2 * HOUR);
    assert!(
        lab.tcp_blocked(alice, APP, 443),
        "the 1h app policy comes first"
    );
    assert!(
        lab.tcp_works(alice, OPEN, 443),
        "the 7-day baseline is satisfied"
    );
    let show = agent.cli_ok(&["session", "show", &alice.to_string()]);
    assert!(show.contains("EXPIRED"), "{show}");
}

#[test]
fn overlapping_policies_follow_precedence_baseline_first() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let agent = lab.start_agent(&lab.config("", &overlapping(200, 100)));
    let alice = device(0);
    agent.login(alice, ALICE, 2 * HOUR);
    assert!(
        lab.tcp_works(alice, APP, 443),
        "the baseline comes first and shadows the app policy"
    );
    assert!(lab.tcp_works(alice, OPEN, 443));
    agent.login(alice, ALICE, 8 * 24 * HOUR);
    assert!(
        lab.tcp_blocked(alice, OPEN, 443),
        "beyond the 7-day baseline"
    );
}

#[test]
fn an_invalid_config_exits_non_zero_naming_the_problem_and_attaches_nothing() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let bad_duration = APP_POLICY.replace("\"1h\"", "\"90 minutes\"");
    let log = lab.refused_start(&lab.config("", &bad_duration));
    for needle in [
        "policy \"App\" (#1)",
        "check_session.duration",
        "\"90 minutes\"",
        "nothing was loaded",
    ] {
        assert!(log.contains(needle), "missing {needle:?} in:\n{log}");
    }
    assert!(!lab.xdp_attached(), "nothing may be attached");

    // A config naming an interface this host lacks also loads nothing, including on
    // the interfaces that do exist.
    let config = lab.config("", APP_POLICY).replace(
        &format!("[\"{GATEWAY_IFACE}\"]"),
        &format!("[\"{GATEWAY_IFACE}\", \"nosuch0\"]"),
    );
    let log = lab.refused_start(&config);
    assert!(
        log.contains("nosuch0") && log.contains("nothing was attached"),
        "{log}"
    );
    assert!(!lab.xdp_attached());

    // `check` reports the same problem without root-only work.
    let path = lab.dir.path().join("bad.toml");
    std::fs::write(&path, lab.config("", &bad_duration)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sessiongate"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"90 minutes\""));
}

/// Every session without its (ever-growing) age.
fn sessions(agent: &Agent) -> serde_json::Value {
    let mut list: serde_json::Value =
        serde_json::from_str(&agent.cli_ok(&["session", "list", "--json"])).unwrap();
    for s in list.as_array_mut().unwrap() {
        let s = s.as_object_mut().unwrap();
        s.remove("age");
        s.remove("age_seconds");
    }
    list
}

#[test]
fn api_misuse_gets_a_clear_error_and_changes_nothing() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let agent = lab.start_agent(&lab.config("", APP_POLICY));
    let alice = device(0).to_string();
    agent.cli_ok(&[
        "session",
        "login",
        &alice,
        "--user",
        ALICE,
        "--idp",
        "okta",
        "--at",
        &time_ago(2 * HOUR),
    ]);
    let before = sessions(&agent);

    let refused = |args: &[&str], needle: &str| {
        let out = agent.cli(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(
            stderr.contains(needle),
            "{args:?}: expected {needle:?} in {stderr}"
        );
        assert_eq!(sessions(&agent), before, "{args:?} changed state");
    };
    refused(
        &["session", "login", &alice, "--user", BOB, "--idp", "okta"],
        "bound to user \"alice@example.com\"",
    );
    refused(
        &[
            "session", "login", &alice, "--user", ALICE, "--idp", "azure",
        ],
        "enrolled through IdP \"okta\"",
    );
    refused(
        &["session", "login", "300.1.1.1", "--user", BOB],
        "is not an IPv4 or IPv6 address",
    );
    refused(
        &["session", "logout", &device(9).to_string()],
        "no session for device",
    );
    refused(
        &[
            "session",
            "login",
            &alice,
            "--user",
            ALICE,
            "--idp",
            "okta",
            "--at",
            "yesterday",
        ],
        "RFC 3339",
    );

    // The raw API refuses what the CLI cannot even send, with 4xx and no change.
    let api = |method: &str, path: &str, body: &str| -> u16 {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = sessiongate::api::client::ApiClient::new(&agent.socket);
        let body = (!body.is_empty()).then(|| serde_json::from_str(body).unwrap());
        match runtime.block_on(client.call(method.parse().unwrap(), path, body)) {
            Ok(_) => 200,
            Err(sessiongate::api::client::ClientError::Api { status, .. }) => status,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(
        api(
            "POST",
            "/v1/sessions",
            r#"{"ip":"198.18.1.300","user":"bob"}"#
        ),
        400
    );
    assert_eq!(api("POST", "/v1/sessions", r#"{"ip":"198.18.1.19"}"#), 400);
    assert_eq!(
        api(
            "POST",
            "/v1/sessions",
            r#"{"ip":"198.18.1.19","user":"bob","role":"admin"}"#
        ),
        400
    );
    assert_eq!(api("GET", "/v1/sessions/not-an-ip", ""), 400);
    assert_eq!(api("DELETE", "/v1/sessions/198.18.1.19", ""), 404);
    assert_eq!(sessions(&agent), before);

    // The kernel agrees: the device is still expired, and its owner can still reset it.
    assert!(lab.tcp_blocked(device(0), APP, 443));
    agent.cli_ok(&["session", "login", &alice, "--user", ALICE, "--idp", "okta"]);
    assert!(lab.tcp_works(device(0), APP, 443));
}

#[test]
fn sessions_survive_an_agent_restart() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let config = lab.config("", APP_POLICY);
    let mut agent = lab.start_agent(&config);
    let (fresh, old) = (device(0), device(1));
    agent.login(fresh, ALICE, NOW);
    agent.login(old, BOB, 2 * HOUR);
    assert!(agent.stop().success(), "a clean stop on SIGTERM");
    assert!(
        lab.xdp_attached(),
        "enforcement outlives the agent: the pinned program stays attached"
    );
    assert!(
        lab.tcp_blocked(old, APP, 443) && lab.tcp_works(fresh, APP, 443),
        "and keeps judging with no agent running"
    );
    assert!(agent.log_text().contains("stopped"));

    let agent = lab.start_agent(&config);
    assert!(agent.log_text().contains("adopted the pinned datapath"));
    assert!(lab.tcp_works(fresh, APP, 443), "the fresh session is back");
    assert!(
        lab.tcp_blocked(old, APP, 443),
        "the old one is still too old"
    );
    let list = agent.cli_ok(&["session", "list"]);
    assert!(list.contains(ALICE) && list.contains(BOB), "{list}");
    // Bob stays bound to his device across the restart.
    let out = agent.cli(&["session", "login", &old.to_string(), "--user", ALICE]);
    assert!(!out.status.success());
}

#[test]
fn port_and_protocol_narrowing_and_bypass_destinations() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let policies = r#"
[bypass]
destinations = ["198.19.10.10/32"]

[[policy]]
name = "Wiki https"
precedence = 1
destinations = ["198.19.10.0/24"]
protocol = "tcp"
ports = [443, 8443]
check_session = { enforce = true, duration = "1h" }
"#;
    let agent = lab.start_agent(&lab.config("", policies));
    let expired = device(3);
    agent.login(expired, ALICE, 2 * HOUR);
    // 198.19.10.10 is a bypass destination (think: the identity provider).
    assert!(
        lab.tcp_works(expired, APP, 443),
        "bypass destinations always pass"
    );
    assert!(agent.counter("passed_bypass") >= 1);
    // Another address of the range: only TCP 443 and 8443 are session-checked.
    assert!(lab.tcp_blocked(expired, APP_DNS, 443));
    assert!(lab.tcp_blocked(expired, APP_DNS, 8443));
    assert!(lab.tcp_works(expired, APP_DNS, 80), "other TCP ports pass");
    assert!(
        udp_works(&lab.udp_socket(expired), APP_DNS, 443),
        "UDP to 443 is not covered by a tcp-only policy"
    );
    assert!(agent.counter("dropped_expired") >= 2);
}

#[test]
fn generic_xdp_mode_enforces_the_same() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let agent = lab.start_agent(&lab.config("xdp_mode = \"generic\"", APP_POLICY));
    let stats = agent.cli_ok(&["stats"]);
    assert!(
        stats.contains(&format!("{GATEWAY_IFACE} (generic)")),
        "{stats}"
    );
    let (fresh, expired) = (device(0), device(1));
    agent.login(fresh, ALICE, NOW);
    agent.login(expired, BOB, 2 * HOUR);
    assert!(lab.tcp_works(fresh, APP, 443));
    assert!(lab.tcp_blocked(expired, APP, 443));
    assert!(udp_works(&lab.udp_socket(fresh), APP, 4433));
}

#[test]
fn access_sessions_follow_the_global_duration_and_a_policy_s_own_duration_wins() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let config = lab.config(
        "",
        r#"
[access]
session_duration = "1h"

[[policy]]
name = "App"
precedence = 1
destinations = ["198.19.10.0/24"]
access = true

[[policy]]
name = "Open, with its own check"
precedence = 2
destinations = ["198.19.20.0/24"]
access = true
check_session = { enforce = true, duration = "3h" }
"#,
    );
    let agent = lab.start_agent(&config);
    let (recent, older) = (device(0), device(1));
    agent.login(recent, ALICE, HOUR / 2);
    agent.login(older, BOB, 2 * HOUR);
    // The access duration (1h) judges App; Open keeps its own 3h.
    assert!(lab.tcp_works(recent, APP, 443));
    assert!(lab.tcp_blocked(older, APP, 443));
    assert!(lab.tcp_works(older, OPEN, 443));
}
