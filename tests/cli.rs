//! The `sessiongate` command line without a running agent or root: `check` on good
//! and bad configs, client commands with no agent to talk to, and client commands
//! against a stand-in for the agent's API.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixListener,
    process::{Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

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

/// Runs `sessiongate ARGS` and gives up (killing it) after 10 s: (exited in time, output).
fn sessiongate_within(args: &[&str]) -> (bool, Output) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sessiongate"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sessiongate");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            return (false, child.wait_with_output().unwrap());
        }
        thread::sleep(Duration::from_millis(20));
    }
    (true, child.wait_with_output().unwrap())
}

#[test]
fn check_refuses_a_config_that_is_not_a_small_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.toml");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let big = dir.path().join("big.toml");
    // Sparse: larger than a config may be, without writing it.
    std::fs::File::create(&big)
        .and_then(|f| f.set_len((64 << 20) + 1))
        .unwrap();
    for (path, needle) in [
        (
            fifo.to_str().unwrap(),
            "is a FIFO (named pipe), not a regular file",
        ),
        ("/dev/zero", "is a character device, not a regular file"),
        (
            dir.path().to_str().unwrap(),
            "is a directory, not a regular file",
        ),
        (big.to_str().unwrap(), "is larger than 67108864 bytes"),
    ] {
        let (in_time, out) = sessiongate_within(&["check", "--config", path]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(in_time, "check --config {path} hung");
        assert!(!out.status.success());
        assert!(
            stderr.contains(&format!("cannot read config {path}: it {needle}")),
            "{path}: {stderr}"
        );
    }
}

#[test]
fn check_exits_quietly_when_its_reader_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessiongate.toml");
    std::fs::write(&path, "[agent]\ninterfaces = [\"eth0\"]\n").unwrap();
    // A pipe whose reader has already closed, as after `| head -0`.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_sessiongate"))
        .args(["check", "--config", path.to_str().unwrap()])
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A stand-in for the agent's API on a unix socket: answers every request with
/// `reply` (JSON) and passes on each request it got (head and body).
fn fake_agent(reply: String) -> (tempfile::TempDir, String, mpsc::Receiver<String>) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let (sender, requests) = mpsc::channel();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(n) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = n.trim().parse().unwrap();
                }
                request.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            request.push_str(&String::from_utf8_lossy(&body));
            let _ = sender.send(request);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                reply.len()
            );
        }
    });
    let socket = socket.to_str().unwrap().to_string();
    (dir, socket, requests)
}

fn session_json(ip: &str, user: &str) -> serde_json::Value {
    serde_json::json!({
        "ip": ip, "user": user, "idp": "okta",
        "authenticated_at": "2026-11-23T09:30:00Z", "age": "1h0m0s", "age_seconds": 3600,
    })
}

#[test]
fn session_list_into_head_exits_quietly() {
    // Far more than a pipe holds, so the CLI is still writing when the reader goes.
    let sessions: Vec<_> = (0..5000)
        .map(|i| {
            session_json(
                &format!("198.18.{}.{}", i / 250, i % 250 + 1),
                "alice@example.com",
            )
        })
        .collect();
    let (_dir, socket, _) = fake_agent(serde_json::Value::from(sessions).to_string());
    for args in [
        &["session", "list"][..],
        &["session", "list", "--json"],
        &["stats", "--json"],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sessiongate"))
            .args(args)
            .args(["--socket", &socket])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        // `head -1` has what it wants and goes away.
        drop(stdout);
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !stderr.contains("panicked"),
            "{args:?} into a closed pipe: {:?}: {stderr}",
            out.status
        );
        assert!(!first.is_empty(), "{args:?}");
    }
}

#[test]
fn device_addresses_are_read_once_and_checked_before_asking_the_agent() {
    let mut reply = session_json("198.18.1.2", "alice");
    reply["policies"] = serde_json::json!([]);
    let (_dir, socket, requests) = fake_agent(reply.to_string());
    // An IPv4-mapped address is sent as the IPv4 device.
    let out = sessiongate(&[
        "session",
        "login",
        "::ffff:198.18.1.2",
        "--user",
        "alice",
        "--socket",
        &socket,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let request = requests.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(request.contains("\"ip\":\"198.18.1.2\""), "{request}");
    let out = sessiongate(&["session", "show", "::ffff:198.18.1.2", "--socket", &socket]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let request = requests.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(
        request.starts_with("GET /v1/sessions/198.18.1.2 "),
        "{request}"
    );
    // What cannot be a device, or reads two ways, never reaches the agent.
    for (args, needle) in [
        (&["session", "logout", "198.010.2.010"][..], "leading zero"),
        (
            &["session", "show", "224.0.0.1"],
            "224.0.0.1 cannot be a device: it is a multicast address",
        ),
        (
            &["session", "login", "255.255.255.255", "--user", "a"],
            "broadcast",
        ),
        (
            &["session", "login", "0.0.0.0", "--user", "a"],
            "unspecified",
        ),
        (&["session", "login", "::1", "--user", "a"], "loopback"),
        (
            &["session", "show", "198.18.1.2/../../stats"],
            "not an IPv4 or IPv6 address",
        ),
    ] {
        let out = sessiongate(&[args, &["--socket", &socket]].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(needle),
            "{args:?}: {stderr}"
        );
    }
    assert!(
        requests.try_recv().is_err(),
        "nothing more reached the agent"
    );
}

#[test]
fn names_are_printed_escaped() {
    // An agent (an older one, say) that hands back names with invisible characters.
    let sessions = vec![session_json(
        "198.18.1.2",
        "evil\u{202e}moc.elpmaxe\nforged",
    )];
    let (_dir, socket, _) = fake_agent(serde_json::Value::from(sessions).to_string());
    let out = sessiongate(&["session", "list", "--socket", &socket]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("evil\\u{202e}moc.elpmaxe\\u{a}forged"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
}
