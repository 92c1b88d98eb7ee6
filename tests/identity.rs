//! Identity-aware policies with real traffic: who a device's user is (user, IdP,
//! groups) decides which policy applies, in the kernel. A finance user and a
//! contractor reach one application under their own policies over a baseline; a
//! device without a session falls to the baseline; a new login with other groups, user
//! or IdP changes the verdict at once; a reload that adds an identity condition under
//! traffic gives no wrong verdict.

use std::{net::IpAddr, time::Duration};

use netlab::{
    probes::{probe, under_traffic},
    *,
};

/// The ledger (`APP`): 8 hours for finance, 1 hour for contractors signing in through
/// their own IdP, else the 7-day baseline.
const LEDGER: &str = r#"
[[policy]]
name = "Ledger for finance"
precedence = 1
destinations = ["198.19.10.0/24", "2001:db8:10::/48"]
check_session = { enforce = true, duration = "8h" }
identity = { groups = ["finance"] }

[[policy]]
name = "Ledger for contractors"
precedence = 2
destinations = ["198.19.10.0/24", "2001:db8:10::/48"]
check_session = { enforce = true, duration = "1h" }
identity = { user_matches = ".*@contractor\\.org", idps = ["partners"] }

[[policy]]
name = "Baseline"
precedence = 10
destinations = ["198.19.10.0/24", "2001:db8:10::/48"]
check_session = { enforce = true, duration = "168h" }
"#;

const ANN: &str = "ann@example.com";
const CY: &str = "cy@contractor.org";
const PORT: u16 = 443;

/// `session login` for `who` via `idp` with `groups`, authenticated `ago`.
fn login(agent: &Agent, ip: IpAddr, who: &str, idp: &str, groups: &[&str], ago: Duration) {
    let at = time_ago(ago);
    let ip = ip.to_string();
    let mut args = vec![
        "session", "login", &ip, "--user", who, "--idp", idp, "--at", &at,
    ];
    for group in groups {
        args.extend(["--group", group]);
    }
    agent.cli_ok(&args);
}

/// Refusals counted per policy name.
fn refusals(agent: &Agent, policy: &str) -> u64 {
    let stats: serde_json::Value =
        serde_json::from_str(&agent.cli_ok(&["stats", "--json"])).expect("stats JSON");
    stats["policy_drops"]
        .as_array()
        .expect("policy_drops")
        .iter()
        .find(|pair| pair[0] == policy)
        .and_then(|pair| pair[1].as_u64())
        .unwrap_or(0)
}

#[test]
fn each_device_is_judged_by_the_policy_for_its_user() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let agent = lab.start_agent(&lab.config("", LEDGER));
    let hours = |h: u64| Duration::from_secs(h * 3600);
    let (finance, contractor, plain, nobody) = (device(1), device(2), device(3), device(4));
    login(
        &agent,
        finance,
        ANN,
        "okta",
        &["finance", "staff"],
        hours(3),
    );
    login(&agent, contractor, CY, "partners", &[], hours(2));
    login(&agent, plain, BOB, "okta", &["staff"], hours(9));
    let (finance6, late6) = (device6(1), device6(2));
    login(&agent, finance6, ANN, "okta", &["finance"], hours(9));
    login(&agent, late6, CAROL, "okta", &[], hours(9));

    // Finance: 3h is within its 8h. Contractor: 2h is past its 1h, though the baseline
    // would admit it. Anyone else: the baseline's 168h.
    assert!(lab.tcp_works(finance, APP, PORT));
    assert!(lab.tcp_blocked(contractor, APP, PORT));
    assert!(lab.tcp_works(plain, APP, PORT));
    // 9h: past finance's 8h, within the baseline for someone not in finance.
    assert!(lab.tcp_blocked(finance6, APP6, PORT));
    assert!(lab.tcp_works(late6, APP6, PORT));
    // No session, no identity: the baseline refuses an unknown device.
    assert!(lab.tcp_blocked(nobody, APP, PORT));
    assert!(refusals(&agent, "Ledger for contractors") >= 1);
    assert!(refusals(&agent, "Ledger for finance") >= 1);
    assert!(refusals(&agent, "Baseline") >= 1, "the unknown device");

    // Groups changed by a new login take effect at once: with finance, 9h is too old.
    login(&agent, plain, BOB, "okta", &["finance"], hours(9));
    assert!(lab.tcp_blocked(plain, APP, PORT));
    login(&agent, plain, BOB, "okta", &[], hours(9));
    assert!(lab.tcp_works(plain, APP, PORT));
    // The IdP: the same contractor through another IdP is not under the contractor
    // policy (a device changes IdP only after a logout).
    agent.cli_ok(&["session", "logout", &contractor.to_string()]);
    login(&agent, contractor, CY, "okta", &[], hours(2));
    assert!(lab.tcp_works(contractor, APP, PORT));
    // The user: another user on the device, matched by the pattern, is.
    agent.cli_ok(&["session", "logout", &contractor.to_string()]);
    login(
        &agent,
        contractor,
        "dee@contractor.org",
        "partners",
        &[],
        hours(2),
    );
    assert!(lab.tcp_blocked(contractor, APP, PORT));

    // `session show` says which policies apply to the device, and why.
    let shown = agent.cli_ok(&["session", "show", &contractor.to_string()]);
    assert!(shown.contains("Ledger for contractors"), "{shown}");
}

#[test]
fn a_reload_that_adds_an_identity_condition_gives_no_wrong_verdict() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    // Before: one policy for everyone (1h). After: finance gets 8h first.
    let before = r#"
[[policy]]
name = "Ledger"
precedence = 10
destinations = ["198.19.10.0/24", "2001:db8:10::/48"]
check_session = { enforce = true, duration = "1h" }
"#;
    let after = format!(
        "{before}\n[[policy]]\nname = \"Ledger for finance\"\nprecedence = 1\ndestinations = [\"198.19.10.0/24\"]\ncheck_session = {{ enforce = true, duration = \"8h\" }}\nidentity = {{ groups = [\"finance\"] }}\n"
    );
    let (small, large) = (lab.config("", before), lab.config("", &after));
    let agent = lab.start_agent(&small);
    let hours = |h: u64| Duration::from_secs(h * 3600);
    let (fresh, stale, finance) = (device(1), device(2), device(3));
    login(&agent, fresh, ANN, "okta", &["finance"], Duration::ZERO);
    login(&agent, stale, BOB, "okta", &["staff"], hours(3));
    login(&agent, finance, CAROL, "okta", &["finance"], hours(3));
    assert!(lab.tcp_blocked(finance, APP, PORT), "1h for everyone");

    let config_path = lab.dir.path().join("sessiongate.toml");
    let probes = [
        probe("a fresh finance session opens", || {
            lab.tcp_works(fresh, APP, PORT)
        }),
        probe("a 3h session outside finance is refused", || {
            lab.tcp_blocked(stale, APP, PORT)
        }),
    ];
    under_traffic(&probes, 3, || {
        for round in 0..2 {
            std::fs::write(&config_path, &large).unwrap();
            agent.cli_ok(&["reload"]);
            assert!(lab.tcp_works(finance, APP, PORT), "round {round}: 8h");
            std::fs::write(&config_path, &small).unwrap();
            agent.cli_ok(&["reload"]);
            assert!(lab.tcp_blocked(finance, APP, PORT), "round {round}: 1h");
        }
    });
}

#[test]
fn identity_verdicts_hold_while_the_agent_restarts() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let config = lab.config("", LEDGER);
    let mut agent = lab.start_agent(&config);
    let hours = |h: u64| Duration::from_secs(h * 3600);
    let (finance, contractor) = (device(1), device(2));
    login(&agent, finance, ANN, "okta", &["finance"], hours(3));
    login(&agent, contractor, CY, "partners", &[], hours(2));
    let probes = [
        probe("finance's 3h session opens (8h)", || {
            lab.tcp_works(finance, APP, PORT)
        }),
        probe("the contractor's 2h session is refused (1h)", || {
            lab.tcp_blocked(contractor, APP, PORT)
        }),
    ];
    // Stopped, the pinned datapath judges alone; started again, the new agent adopts
    // it, gives every session a fresh identity slot and puts its own policy in force.
    // A refused probe waits out its connection attempt: the window is long enough
    // for several of each.
    let agent = under_traffic(&probes, 3, || {
        assert!(agent.stop().success());
        std::thread::sleep(Duration::from_secs(2));
        let agent = lab.start_agent(&config);
        std::thread::sleep(Duration::from_secs(2));
        agent
    });
    assert!(agent.log_text().contains("adopted the pinned datapath"));
    // A new login after the restart still takes effect at once.
    login(&agent, contractor, CY, "partners", &[], Duration::ZERO);
    assert!(lab.tcp_works(contractor, APP, PORT));
}
