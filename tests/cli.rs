//! The `sessiongate` command line without a running agent or root: `check` on good
//! and bad configs, and client commands with no agent to talk to.

use std::process::{Command, Output};

fn sessiongate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sessiongate"))
        .args(args)
        .output()
        .expect("run sessiongate")
}

fn check(config: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessiongate.toml");
    std::fs::write(&path, config).unwrap();
    let out = sessiongate(&["check", "--config", path.to_str().unwrap()]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_prints_the_compiled_table_and_warns_about_common_mistakes() {
    let (ok, stdout, stderr) = check(
        r#"
[agent]
interfaces = ["eth0"]
[dns]
resolvers = ["198.19.0.53"]
[bypass]
destinations = ["198.19.0.10/32"]

[[policy]]
name = "Company Wiki"
precedence = 103
destinations = ["198.19.10.0/24"]
protocol = "tcp"
ports = [443, 8443]
check_session = { enforce = true, duration = "1h30m0s" }

[[policy]]
name = "Everything"
precedence = 200
destinations = ["198.0.0.0/8"]
check_session = { enforce = true, duration = "168h" }

[[policy]]
name = "Hidden"
precedence = 300
destinations = ["198.19.20.0/24"]
check_session = { enforce = true, duration = "1h" }
"#,
    );
    assert!(ok, "{stderr}");
    for needle in [
        "is valid",
        "198.19.10.0/24",
        "tcp/443",
        "\"Company Wiki\" (session <= 1h30m0s, else drop)",
        "198.19.0.10/32",
        "bypass (pass)",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    for needle in [
        "policy \"Everything\" (#2): session-checked over 198.0.0.0/8",
        "covers the DNS resolver 198.19.0.53",
        "overlaps the bypass destination 198.19.0.10/32",
        "policy \"Hidden\" (#3): completely shadowed",
    ] {
        assert!(
            stderr.contains(needle),
            "missing warning {needle:?} in:\n{stderr}"
        );
    }
}

#[test]
fn check_lists_every_problem_and_exits_non_zero() {
    let (ok, _, stderr) = check(
        r#"
[agent]
interfaces = ["eth0"]
xdp_mode = "fast"
[[policy]]
name = "Payroll"
precedence = 1
destinations = ["198.19.1.1/24"]
check_session = { enforce = true, duration = "1 hour" }
on_expired = "redirect"
"#,
    );
    assert!(!ok);
    for needle in [
        "4 problem(s); nothing was loaded",
        "[agent], xdp_mode: \"fast\"",
        "policy \"Payroll\" (#1), destinations[0]: \"198.19.1.1/24\" has host bits set; did you mean 198.19.1.0/24?",
        "policy \"Payroll\" (#1), check_session.duration: invalid duration \"1 hour\"",
        "policy \"Payroll\" (#1), on_expired: \"redirect\" steers HTTP to the re-authentication portal: set [agent] portal_listen",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
}

#[test]
fn check_reports_unreadable_and_unparsable_files() {
    let out = sessiongate(&["check", "--config", "/nonexistent/sessiongate.toml"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cannot read config /nonexistent/sessiongate.toml")
    );
    let (ok, _, stderr) = check("[agent]\ninterfaces = [\"eth0\"\n");
    assert!(!ok);
    assert!(stderr.contains("is not valid TOML"), "{stderr}");
}

#[test]
fn client_commands_explain_a_missing_agent() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let out = sessiongate(&["stats", "--socket", socket.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reach the agent") && stderr.contains("sessiongate run"),
        "{stderr}"
    );
}
