//! `cargo xtask demo`: sessiongate doing its job on live traffic, step by step, in
//! throwaway network namespaces that are removed at the end.

use std::{
    net::IpAddr,
    thread,
    time::{Duration, Instant},
};

use anyhow::bail;
use netlab::{APP, APP_DNS, Agent, Lab, OPEN, SHOULD_PASS, device, echo_tcp, udp_works};

const POLICY: &str = r#"
[dns]
ports = [53]
resolvers = ["198.19.10.53"]

[[policy]]
name = "Company Wiki"
precedence = 103
destinations = ["198.19.10.0/24", "2001:db8:10::/48"]
check_session = { enforce = true, duration = "1h30m0s" }
on_expired = "drop"
"#;

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";
const CAROL: &str = "carol@example.com";
/// Carol authenticated this long ago: expired under 1h30m, valid under 3h.
const CAROL_AGE: Duration = Duration::from_secs(2 * 3600);
/// Bob authenticated this long ago: valid for a few more seconds under a 1h30m policy.
const BOB_AGE: Duration = Duration::from_secs(90 * 60 - 5);

struct Narrator {
    failures: Vec<String>,
}

impl Narrator {
    fn step(&self, text: &str) {
        println!("\n\x1b[1m▶ {text}\x1b[0m");
    }

    fn say(&self, text: &str) {
        println!("  {text}");
    }

    /// Reports an observation and whether it is what sessiongate should do.
    fn expect(&mut self, what: &str, happened: bool, should: bool) {
        let (mark, outcome) = match (happened, should) {
            (true, true) => ("\x1b[32m✔\x1b[0m", "as expected"),
            (false, false) => ("\x1b[32m✔\x1b[0m", "refused, as expected"),
            _ => ("\x1b[31m✘\x1b[0m", "UNEXPECTED"),
        };
        let verb = if happened { "works" } else { "is refused" };
        println!("  {mark} {what}: {verb} ({outcome})");
        if happened != should {
            self.failures.push(what.to_string());
        }
    }
}

pub fn run() -> anyhow::Result<()> {
    let bin = crate::setup::workspace().join("target/debug/sessiongate");
    let mut n = Narrator {
        failures: Vec::new(),
    };
    let (alice, bob) = (device(0), device(1));

    n.step("Building a throwaway network (network namespaces, removed at the end)");
    let lab = Lab::new(&bin);
    n.say(&format!(
        "client devices ({}): alice's laptop {alice}, bob's laptop {bob}",
        lab.client.name
    ));
    n.say(&format!(
        "gateway ({}): forwards device traffic; sessiongate attaches XDP here",
        lab.gateway.name
    ));
    n.say(&format!(
        "server ({}): Company Wiki {APP} (TCP 443, SSH 22, QUIC-like UDP 4433), DNS {APP_DNS}, unprotected host {OPEN}",
        lab.server.name
    ));

    n.step("Starting sessiongate with one Gateway-style policy");
    for line in POLICY.trim().lines().filter(|l| !l.is_empty()) {
        n.say(&format!("  {line}"));
    }
    let config = lab.config("", POLICY);
    let mut agent = lab.start_agent(&config);
    n.say(&format!(
        "agent running (pid {}), XDP attached: {}",
        agent.pid(),
        lab.xdp_attached()
    ));

    n.step("Alice authenticates now, Bob authenticated 1h29m55s ago");
    login(&n, &agent, alice, ALICE, "okta", None);
    let bob_at = netlab::time_ago(BOB_AGE);
    let bob_logged_in = Instant::now();
    login(&n, &agent, bob, BOB, "okta", Some(&bob_at));

    n.step("Both reach the wiki while their sessions are young enough");
    n.expect(
        "alice -> wiki https (TCP 443)",
        lab.tcp_works(alice, APP, 443),
        true,
    );
    n.expect(
        "alice -> wiki QUIC-like flow (UDP 4433)",
        udp_works(&lab.udp_socket(alice), APP, 4433),
        true,
    );
    let mut ssh = lab.tcp_connect(bob, APP, 22, SHOULD_PASS);
    let opened = ssh.as_mut().is_ok_and(|s| echo_tcp(s, b"ls\n").is_ok());
    n.expect(
        "bob opens an SSH-like session to the wiki (TCP 22)",
        opened,
        true,
    );

    let wait = (BOB_AGE.abs_diff(Duration::from_secs(90 * 60)) + Duration::from_millis(700))
        .saturating_sub(bob_logged_in.elapsed());
    n.step(&format!(
        "Waiting {:.1} s until Bob's session is older than 1h30m0s",
        wait.as_secs_f64()
    ));
    thread::sleep(wait);
    cli(&n, &agent, &["session", "show", &bob.to_string()]);

    n.step("Bob's session has expired");
    n.expect(
        "bob -> wiki https, a new connection",
        !lab.tcp_blocked(bob, APP, 443),
        false,
    );
    n.expect(
        "bob -> wiki QUIC-like flow, a new flow",
        udp_works(&lab.udp_socket(bob), APP, 4433),
        false,
    );
    let still = ssh.as_mut().is_ok_and(|s| echo_tcp(s, b"uptime\n").is_ok());
    n.expect(
        "bob's established SSH-like session keeps talking",
        still,
        true,
    );
    let resolved = lab
        .resolve_udp(bob, APP_DNS, "app.corp", false)
        .unwrap_or_default();
    n.expect(
        &format!("bob resolves app.corp via DNS at {APP_DNS} (inside the protected range) -> {resolved:?}"),
        resolved == [APP],
        true,
    );
    n.expect(
        &format!("bob -> unprotected host {OPEN}"),
        lab.tcp_works(bob, OPEN, 443),
        true,
    );
    n.expect(
        "alice -> wiki, unaffected",
        lab.tcp_works(alice, APP, 443),
        true,
    );
    if let Some(line) = reauth_line(&agent, bob) {
        n.say("the agent reports:");
        n.say(&format!("  {line}"));
    } else {
        n.expect(
            "a re-authentication-required line in the agent's log",
            false,
            true,
        );
    }

    n.step("Bob re-authenticates with the IdP he enrolled with: his timer resets to zero");
    login(&n, &agent, bob, BOB, "okta", None);
    n.expect(
        "bob -> wiki https, a new connection",
        lab.tcp_works(bob, APP, 443),
        true,
    );

    n.step("Another user cannot take over Bob's device, and only his IdP resets his session");
    let taken = agent.cli(&[
        "session",
        "login",
        &bob.to_string(),
        "--user",
        ALICE,
        "--idp",
        "okta",
    ]);
    n.say(String::from_utf8_lossy(&taken.stderr).trim());
    let other_idp = agent.cli(&[
        "session",
        "login",
        &bob.to_string(),
        "--user",
        BOB,
        "--idp",
        "google",
    ]);
    n.say(String::from_utf8_lossy(&other_idp.stderr).trim());

    n.step("The agent crashes (SIGKILL): enforcement goes on without it");
    let carol = device(2);
    login(
        &n,
        &agent,
        carol,
        CAROL,
        "okta",
        Some(&netlab::time_ago(CAROL_AGE)),
    );
    agent.kill();
    n.say(&format!(
        "agent killed; XDP still attached: {} (pinned under {})",
        lab.xdp_attached(),
        lab.pin_dir().display()
    ));
    n.expect(
        "carol (authenticated 2h ago) -> wiki, with no agent running",
        !lab.tcp_blocked(carol, APP, 443),
        false,
    );
    n.expect(
        "alice -> wiki, with no agent running",
        lab.tcp_works(alice, APP, 443),
        true,
    );
    let agent = lab.start_agent(&config);
    if let Some(line) = agent
        .log_text()
        .lines()
        .find(|l| l.contains("adopted the pinned datapath"))
    {
        n.say("a new agent starts and adopts the datapath:");
        n.say(&format!("  {}", line.trim()));
    }
    let still = ssh.as_mut().is_ok_and(|s| echo_tcp(s, b"whoami\n").is_ok());
    n.expect("bob's SSH-like session, through it all", still, true);

    n.step("An edited config applies atomically: the wiki now accepts sessions up to 3h");
    std::fs::write(
        lab.dir.path().join("sessiongate.toml"),
        config.replace("duration = \"1h30m0s\"", "duration = \"3h\""),
    )?;
    cli(&n, &agent, &["reload"]);
    n.expect(
        "carol (authenticated 2h ago) -> wiki https, a new connection",
        lab.tcp_works(carol, APP, 443),
        true,
    );

    n.step("The datapath's counters");
    cli(&n, &agent, &["stats"]);

    n.step("Cleaning up: stopping the agent, removing its pinned datapath and the namespaces");
    drop(ssh);
    agent.stop_and_detach();
    n.say(&format!("XDP attached: {}", lab.xdp_attached()));
    drop(lab);
    n.say("done");

    if !n.failures.is_empty() {
        bail!(
            "the demo saw unexpected behaviour: {}",
            n.failures.join("; ")
        );
    }
    println!(
        "\nsessiongate refused exactly the new connections of expired sessions, and nothing else, through a crash and a reload."
    );
    Ok(())
}

/// `sessiongate session login`, shown as it runs.
fn login(n: &Narrator, agent: &Agent, device: IpAddr, user: &str, idp: &str, at: Option<&str>) {
    let device = device.to_string();
    let mut args = vec!["session", "login", &device, "--user", user, "--idp", idp];
    if let Some(at) = at {
        args.extend(["--at", at]);
    }
    cli(n, agent, &args);
}

/// Runs a CLI command and prints its output, indented.
fn cli(n: &Narrator, agent: &Agent, args: &[&str]) {
    n.say(&format!("$ sessiongate {}", args.join(" ")));
    let out = agent.cli(args);
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
    {
        n.say(&format!("  {line}"));
    }
}

/// The agent's "re-authentication required" log line for `device`, waiting briefly
/// for the event to arrive.
fn reauth_line(agent: &Agent, device: IpAddr) -> Option<String> {
    let needle = format!("device={device}");
    for _ in 0..40 {
        if let Some(line) = agent
            .log_text()
            .lines()
            .find(|l| l.contains("re-authentication required") && l.contains(&needle))
        {
            return Some(line.trim().to_string());
        }
        thread::sleep(Duration::from_millis(50));
    }
    None
}
