//! Prompts with real traffic: refusals reach the live event stream at once and a
//! webhook at most once per interval; with `notify_before`, a device that uses a
//! session-checked policy is prompted once before its session runs out for it, again
//! after each re-authentication, and a device that does not use it, or that a new sign-in
//! left outside it, is not.

use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr, UdpSocket},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use netlab::*;

/// `sessiongate events --json` following `agent`: the child, and its lines as they
/// arrive.
fn follow_events(agent: &Agent) -> (Child, mpsc::Receiver<(Instant, String)>) {
    let mut follower = Command::new(env!("CARGO_BIN_EXE_sessiongate"))
        .args(["events", "--json", "--socket"])
        .arg(&agent.socket)
        .stdout(Stdio::piped())
        .spawn()
        .expect("sessiongate events");
    let (tx, rx) = mpsc::channel();
    let stdout = follower.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send((Instant::now(), line));
        }
    });
    thread::sleep(Duration::from_millis(300)); // let it subscribe
    (follower, rx)
}

/// Sends `count` UDP datagrams from `src` to distinct ports of `dst`: each one a new
/// flow to judge.
fn udp_flood(lab: &Lab, src: IpAddr, dst: IpAddr, count: u16) {
    let socket: UdpSocket = lab.udp_socket(src);
    for i in 0..count {
        let _ = socket.send_to(b"flood", SocketAddr::new(dst, 10_000 + i % 50_000));
    }
}

#[test]
fn events_stream_live_and_prompts_are_sent_once_per_interval() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let prompts = lab.webhook(8701);
    let agent = lab.start_agent_with(&lab.config(
            "notify_url = \"http://127.0.0.1:8701/prompt\"\nnotify_interval = \"2s\"\nreauth_url = \"https://198.18.0.1/reauth\"",
            APP_POLICY,
        ),
        &["--log-format", "json"],
    );
    agent.login(device(1), BOB, 2 * HOUR);

    // The event stream, as an operator would follow it.
    let (mut follower, rx) = follow_events(&agent);
    let sent = Instant::now();
    assert!(lab.tcp_blocked(device(1), APP, 443));
    let (at, line) = rx.recv_timeout(Duration::from_secs(3)).expect("an event");
    let latency = at.saturating_duration_since(sent);
    assert!(latency < Duration::from_secs(1), "event after {latency:?}");
    let event: serde_json::Value = serde_json::from_str(&line).expect("JSON event");
    assert_eq!(event["device"], "198.18.1.11");
    assert_eq!(event["user"], BOB);
    assert_eq!(event["policy"], "App");
    assert_eq!(event["port"], 443);
    let _ = follower.kill();
    let _ = follower.wait();

    // A flood of refused new flows for 5 s: one prompt at first, then at most one per
    // 2 s interval, never one per packet.
    let started = Instant::now();
    let mut packets = 0u64;
    while started.elapsed() < Duration::from_secs(5) {
        udp_flood(&lab, device(1), APP, 2000);
        packets += 2000;
    }
    thread::sleep(Duration::from_millis(500));
    let got = prompts.lock().unwrap().clone();
    let refused = agent.counter("dropped_expired");
    assert!(
        refused > 5_000,
        "a flood: {refused} refused of {packets} sent"
    );
    assert!(
        (2..=4).contains(&got.len()),
        "{} prompts for {refused} refused packets: {got:#?}",
        got.len()
    );
    for pair in got.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(gap >= Duration::from_millis(1900), "prompts {gap:?} apart");
    }
    let prompt: serde_json::Value = serde_json::from_str(&got[0].1).expect("JSON prompt");
    assert_eq!(prompt["user"], BOB);
    assert_eq!(prompt["device"], "198.18.1.11");
    assert_eq!(prompt["policy"], "App");
    assert_eq!(prompt["reauth_url"], "https://198.18.0.1/reauth");
    assert!(prompt["session_age"].as_str().unwrap().starts_with("2h"));
    assert!(
        prompt["destination"]
            .as_str()
            .unwrap()
            .starts_with("198.19.10.10:")
    );

    // --log-format json: every log line is one JSON object; refusals carry their fields.
    let log = agent.log_text();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "re-authentication required"
                && l["device"] == "198.18.1.11"
                && l["policy"] == "App"),
        "{log}"
    );
}

/// The application with sessions of 14 s, prompted 8 s before they run out.
const SHORT_SESSIONS: &str = r#"
[[policy]]
name = "App"
precedence = 10
destinations = ["198.19.10.0/24", "2001:db8:10::/48"]
check_session = { enforce = true, duration = "14s" }
"#;
const SESSION: Duration = Duration::from_secs(14);
const BEFORE: Duration = Duration::from_secs(8);

/// The webhook's prompts of one kind.
fn of_kind(prompts: &Prompts, kind: &str) -> Vec<(Instant, serde_json::Value)> {
    prompts
        .lock()
        .unwrap()
        .iter()
        .map(|(at, body)| (*at, serde_json::from_str(body).expect("JSON prompt")))
        .filter(|(_, v): &(Instant, serde_json::Value)| v["kind"] == kind)
        .collect()
}

/// Waits up to `limit` for the webhook to hold `n` prompts of `kind`.
fn wait_for_prompts(prompts: &Prompts, kind: &str, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while of_kind(prompts, kind).len() < n && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_device_using_a_policy_is_prompted_once_per_sign_in_before_it_runs_out() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let prompts = lab.webhook(8702);
    let agent = lab.start_agent(&lab.config(
        "notify_url = \"http://127.0.0.1:8702/prompt\"\nnotify_before = \"8s\"\nreauth_url = \"https://198.18.0.1/reauth\"",
        SHORT_SESSIONS,
    ));
    let (mut follower, stream) = follow_events(&agent);

    // Both sign in; only device 1 uses the application (device 2 reaches a host under
    // no policy, which reports nothing).
    agent.login(device(1), BOB, NOW);
    agent.login(device(2), CAROL, NOW);
    let first_sign_in = Instant::now();
    assert!(lab.tcp_works(device(1), APP, 443));
    assert!(lab.tcp_works(device(2), OPEN, 443));
    assert!(agent.counter("events_use_reports") >= 1);

    // One prompt, once the session has less than 8 s left (and before it runs out).
    wait_for_prompts(&prompts, "expiring", 1, SESSION);
    let got = of_kind(&prompts, "expiring");
    assert_eq!(got.len(), 1, "{got:#?}");
    let (at, first) = &got[0];
    let after = at.duration_since(first_sign_in);
    assert!(
        after >= SESSION - BEFORE - Duration::from_secs(1) && after < SESSION,
        "prompted {after:?} after signing in"
    );
    assert_eq!(first["device"], "198.18.1.11");
    assert_eq!(first["user"], BOB);
    assert_eq!(first["policy"], "App");
    assert_eq!(first["reauth_url"], "https://198.18.0.1/reauth");
    let left = first["seconds_remaining"].as_u64().unwrap();
    assert!((1..=8).contains(&left), "{first}");

    // The event stream carried it too.
    let line = loop {
        let (_, line) = stream
            .recv_timeout(Duration::from_secs(5))
            .expect("an expiring event on the stream");
        let event: serde_json::Value = serde_json::from_str(&line).expect("JSON event");
        if event["kind"] == "expiring" {
            break event;
        }
    };
    assert_eq!(line["device"], "198.18.1.11");
    assert_eq!(line["expires_at"], first["expires_at"]);
    let _ = follower.kill();
    let _ = follower.wait();

    // Re-authenticating starts the count again: one more prompt, for the new sign-in,
    // before the new session runs out; nothing more after that.
    agent.login(device(1), BOB, NOW);
    let second_sign_in = Instant::now();
    assert!(lab.tcp_works(device(1), APP, 443));
    wait_for_prompts(&prompts, "expiring", 2, SESSION);
    let got = of_kind(&prompts, "expiring");
    assert_eq!(got.len(), 2, "{got:#?}");
    let after = got[1].0.duration_since(second_sign_in);
    assert!(
        after >= SESSION - BEFORE - Duration::from_secs(1) && after < SESSION,
        "prompted {after:?} after signing in again"
    );
    assert_ne!(got[1].1["expires_at"], first["expires_at"]);
    thread::sleep(
        (second_sign_in + SESSION + Duration::from_secs(3))
            .saturating_duration_since(Instant::now()),
    );
    let got = of_kind(&prompts, "expiring");
    assert_eq!(
        got.len(),
        2,
        "prompted again for the same sign-in: {got:#?}"
    );
    assert!(
        got.iter().all(|(_, v)| v["device"] == "198.18.1.11"),
        "{got:#?}"
    );
}

/// The application with a 14 s policy for the finance group before a 1 h one for
/// everyone.
const FINANCE_FIRST: &str = r#"
[[policy]]
name = "Finance"
precedence = 10
destinations = ["198.19.10.0/24", "2001:db8:10::/48"]
check_session = { enforce = true, duration = "14s" }
identity = { groups = ["finance"] }

[[policy]]
name = "App"
precedence = 20
destinations = ["198.19.10.0/24", "2001:db8:10::/48"]
check_session = { enforce = true, duration = "1h" }
"#;

#[test]
fn a_device_is_not_prompted_for_a_policy_its_new_groups_left() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let prompts = lab.webhook(8703);
    let agent = lab.start_agent(&lab.config(
        "notify_url = \"http://127.0.0.1:8703/prompt\"\nnotify_before = \"8s\"",
        FINANCE_FIRST,
    ));
    let ip = device(1).to_string();
    let login = |groups: &[&str]| {
        let mut args = vec!["session", "login", &ip, "--user", BOB];
        for group in groups {
            args.extend(["--group", group]);
        }
        agent.cli_ok(&args);
    };

    // In finance, the device uses the application under the 14 s policy...
    login(&["finance"]);
    assert!(lab.tcp_works(device(1), APP, 443));
    let reports = agent.counter("events_use_reports");
    assert!(reports >= 1);
    // ...then signs in again without the group: only the 1 h policy applies now.
    login(&[]);
    let signed_in = Instant::now();
    assert!(lab.tcp_works(device(1), APP, 443));

    // The finance session would have run out by now; no prompt said it would.
    thread::sleep(
        (signed_in + SESSION + Duration::from_secs(2)).saturating_duration_since(Instant::now()),
    );
    assert!(lab.tcp_works(device(1), APP, 443));
    let got = of_kind(&prompts, "expiring");
    assert!(
        got.is_empty(),
        "prompted for a policy that no longer applies: {got:#?}"
    );
}
