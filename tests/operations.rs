//! Operating the agent: Prometheus metrics, the token-protected TCP API, and bulk
//! session import. Real
//! agents in real namespaces; HTTP is spoken from inside the gateway namespace.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    process::Command,
    time::{Duration, Instant},
};

use netlab::*;

/// One HTTP/1.1 exchange from inside the gateway namespace: (status, body).
fn http(lab: &Lab, addr: &str, request: &str) -> (u16, String) {
    let addr: SocketAddr = addr.parse().unwrap();
    let request = request.to_string();
    lab.gateway.run(move || {
        let mut stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(request.as_bytes()).expect("send");
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        let text = String::from_utf8_lossy(&reply).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
        let body = text
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_string();
        (status, body)
    })
}

fn get(path: &str, headers: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n")
}

fn post(path: &str, headers: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Sample values of a scrape, by metric name and labels as written.
fn scrape(lab: &Lab) -> prometheus_parse::Scrape {
    let (status, body) = http(lab, "127.0.0.1:9464", &get("/metrics", ""));
    assert_eq!(status, 200, "{body}");
    // The body is chunked when large; the parser needs the text itself.
    let text = dechunk(&body);
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("valid Prometheus text")
}

/// Removes HTTP/1.1 chunked framing if present.
fn dechunk(body: &str) -> String {
    if body.starts_with('#') {
        return body.to_string();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 {
            break;
        }
        out.push_str(&tail[..n]);
        rest = &tail[n + 2..];
    }
    out
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
        .unwrap_or_else(|| panic!("no sample {name} {label:?}"))
}

#[test]
fn metrics_are_prometheus_text_and_move_with_traffic() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let agent = lab.start_agent(&lab.config("metrics_listen = \"127.0.0.1:9464\"", APP_POLICY));
    agent.login(device(0), ALICE, NOW);
    agent.login(device(1), BOB, 2 * HOUR);
    let before = scrape(&lab);
    let refused = |s: &prometheus_parse::Scrape| {
        value(
            s,
            "sessiongate_packets_total",
            Some(("verdict", "dropped_expired")),
        )
    };
    let admitted = |s: &prometheus_parse::Scrape| {
        value(
            s,
            "sessiongate_packets_total",
            Some(("verdict", "admitted_new_flow")),
        )
    };
    for _ in 0..3 {
        assert!(lab.tcp_works(device(0), APP, 443));
    }
    assert!(lab.tcp_blocked(device(1), APP, 443));
    assert!(udp_works(&lab.udp_socket(device(0)), APP, 4433));
    let after = scrape(&lab);
    assert!(
        value(
            &after,
            "sessiongate_table_entries",
            Some(("table", "udp_flows_v4"))
        ) >= 1.0,
        "the tracked UDP flow is counted"
    );
    assert!(admitted(&after) >= admitted(&before) + 3.0);
    assert!(refused(&after) >= refused(&before) + 1.0);
    assert!(
        value(
            &after,
            "sessiongate_policy_refused_flows_total",
            Some(("policy", "App"))
        ) >= 1.0
    );
    assert_eq!(value(&after, "sessiongate_sessions", None), 2.0);
    assert_eq!(
        value(
            &after,
            "sessiongate_table_entries",
            Some(("table", "sessions_v4"))
        ),
        2.0
    );
    assert_eq!(
        value(
            &after,
            "sessiongate_table_capacity_entries",
            Some(("table", "sessions_v4"))
        ),
        4096.0
    );
    assert_eq!(
        value(
            &after,
            "sessiongate_refusal_events_total",
            Some(("outcome", "lost"))
        ),
        0.0
    );
    assert_eq!(value(&after, "sessiongate_build_info", None), 1.0);
    assert_eq!(
        value(
            &after,
            "sessiongate_reloads_total",
            Some(("result", "success"))
        ),
        0.0
    );
    // A reload shows up, and so does a failed one.
    agent.cli_ok(&["reload"]);
    let reloaded = scrape(&lab);
    assert_eq!(
        value(
            &reloaded,
            "sessiongate_reloads_total",
            Some(("result", "success"))
        ),
        1.0
    );
    assert_eq!(
        value(&reloaded, "sessiongate_last_reload_success", None),
        1.0
    );
    // Every family's name follows the conventions.
    for s in &reloaded.samples {
        assert!(s.metric.starts_with("sessiongate_"), "{}", s.metric);
    }
}

#[test]
fn tcp_api_needs_the_token_and_bad_requests_change_nothing() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let token_file = lab.dir.path().join("api-token");
    let token = "c2Vzc2lvbmdhdGUtdGVzdC10b2tlbi0xMjM0";
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let agent = lab.start_agent(&lab.config(
        &format!(
            "api_listen = \"127.0.0.1:8700\"\napi_token_file = \"{}\"",
            token_file.display()
        ),
        APP_POLICY,
    ));
    agent.login(device(1), BOB, 2 * HOUR);
    let state = || agent.sessions_without_ages();
    let before = state();
    let api = "127.0.0.1:8700";
    let bearer = format!("Authorization: Bearer {token}\r\n");
    let login = format!(r#"{{"ip": "198.18.1.11", "user": "{BOB}"}}"#);

    for (what, request) in [
        ("no token", post("/v1/sessions", "", &login)),
        (
            "wrong token",
            post(
                "/v1/sessions",
                "Authorization: Bearer not-the-token\r\n",
                &login,
            ),
        ),
        (
            "token without Bearer",
            post(
                "/v1/sessions",
                &format!("Authorization: {token}\r\n"),
                &login,
            ),
        ),
        (
            "no token, logout",
            "DELETE /v1/sessions/198.18.1.11 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                .to_string(),
        ),
        ("no token, read", get("/v1/sessions", "")),
    ] {
        let (status, body) = http(&lab, api, &request);
        assert_eq!(status, 401, "{what}: {body}");
    }
    let huge = format!(
        r#"{{"ip": "198.18.1.11", "user": "{}"}}"#,
        "x".repeat(64 * 1024)
    );
    for (what, body) in [
        ("oversize", huge.as_str()),
        ("not JSON", "ip=198.18.1.11"),
        (
            "unknown field",
            r#"{"ip": "198.18.1.11", "user": "b", "admin": true}"#,
        ),
        ("bad address", r#"{"ip": "198.18.1.300", "user": "b"}"#),
    ] {
        let (status, reply) = http(&lab, api, &post("/v1/sessions", &bearer, body));
        assert_eq!(status, 400, "{what}: {reply}");
    }
    assert_eq!(state(), before, "no refused request changed anything");
    assert!(lab.tcp_blocked(device(1), APP, 443));

    // With the token, the same login works, and the audit log names the caller.
    let (status, reply) = http(&lab, api, &post("/v1/sessions", &bearer, &login));
    assert_eq!(status, 200, "{reply}");
    assert!(lab.tcp_works(device(1), APP, 443));
    let log = agent.log_text();
    let audit: Vec<&str> = log.lines().filter(|l| l.contains("audit")).collect();
    assert!(
        audit.iter().any(|l| l.contains("tcp 127.0.0.1")
            && l.contains("198.18.1.11")
            && l.contains("login")),
        "{audit:#?}"
    );
    assert!(
        audit.iter().any(|l| l.contains("unix uid=0")),
        "unix-socket changes are audited too: {audit:#?}"
    );
    // The unix socket stays root-only.
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn a_million_sessions_import_in_bulk() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let config = lab
        .config("", APP_POLICY)
        .replace("max_sessions = 4096", "max_sessions = 1100000");
    let agent = lab.start_agent(&config);
    let file = lab.dir.path().join("sessions.csv");
    let fresh = time_ago(NOW);
    let stale = time_ago(2 * HOUR);
    let mut text = String::with_capacity(80 << 20);
    text.push_str("ip,user,idp,authenticated_at\n");
    text.push_str(&format!("198.18.1.10,{ALICE},okta,{fresh}\n"));
    text.push_str(&format!("198.18.1.11,{BOB},okta,{stale}\n"));
    for i in 0..999_998u32 {
        text.push_str(&format!(
            "2001:db8:100:{:x}::{:x},user{i}@example.com,okta,{fresh}\n",
            i >> 16,
            i & 0xffff
        ));
    }
    // A bad line: nothing of the file is imported.
    let bad = lab.dir.path().join("bad.csv");
    std::fs::write(&bad, format!("{text}198.18.1.12,carol,okta,yesterday\n")).unwrap();
    let out = agent.cli(&["session", "import", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("1000002") && stderr.contains("yesterday"),
        "{stderr}"
    );
    assert!(lab.tcp_blocked(device(0), APP, 443), "nothing was imported");
    assert_eq!(sessions(&agent), 0);
    // --skip-bad imports the good lines of a small file and names the bad one.
    let small = lab.dir.path().join("small.jsonl");
    std::fs::write(
        &small,
        format!(
            "{{\"ip\": \"198.18.1.13\", \"user\": \"dave\", \"authenticated_at\": \"{fresh}\"}}\n{{\"ip\": \"198.18.1.14\", \"user\": \"erin\"}}\n"
        ),
    )
    .unwrap();
    let out = agent.cli(&["session", "import", small.to_str().unwrap(), "--skip-bad"]);
    assert!(out.status.success());
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        stdout.contains("imported 1 sessions") && stdout.contains("skipped 1"),
        "{stdout}"
    );
    assert!(
        stderr.contains(":2:") && stderr.contains("authenticated_at"),
        "{stderr}"
    );
    assert!(lab.tcp_works(device(3), APP, 443));
    agent.cli_ok(&["session", "logout", "198.18.1.13"]);

    std::fs::write(&file, &text).unwrap();
    let started = Instant::now();
    let out = agent.cli_ok(&["session", "import", file.to_str().unwrap()]);
    let took = started.elapsed();
    assert!(out.contains("imported 1000000 sessions"), "{out}");
    eprintln!("imported 1,000,000 sessions in {took:?} (debug build)");
    assert_eq!(sessions(&agent), 1_000_000);
    assert!(
        lab.tcp_works(device(0), APP, 443),
        "a fresh imported session passes"
    );
    assert!(
        lab.tcp_blocked(device(1), APP, 443),
        "a stale one is refused"
    );
}

fn sessions(agent: &Agent) -> u64 {
    let stats: serde_json::Value =
        serde_json::from_str(&agent.cli_ok(&["stats", "--json"])).unwrap();
    stats["sessions"].as_u64().unwrap()
}

/// One request to the agent's API on its unix socket: (status, body).
fn unix_api(agent: &Agent, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut curl = Command::new("curl");
    curl.args(["-s", "-w", "\n%{http_code}", "-X", method, "--unix-socket"])
        .arg(&agent.socket)
        .arg(format!("http://agent{path}"));
    if let Some(body) = body {
        curl.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ]);
    }
    let out = curl.output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').expect("a status line");
    (status.parse().expect("a status"), body.to_string())
}

#[test]
fn an_ipv4_mapped_address_is_the_ipv4_device() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let agent = lab.start_agent(&lab.config("", APP_POLICY));
    agent.login(device(1), BOB, 2 * HOUR);
    assert!(lab.tcp_blocked(device(1), APP, 443));
    let mapped = "::ffff:198.18.1.11";
    let login = |user: &str, idp: &str| {
        format!(r#"{{"ip": "{mapped}", "user": "{user}", "idp": "{idp}"}}"#)
    };
    let state = || agent.sessions_without_ages();
    let before = state();

    // Another user cannot take the device through its other spelling, by the API or
    // the CLI.
    let (status, body) = unix_api(
        &agent,
        "POST",
        "/v1/sessions",
        Some(&login("mallory@example.com", "evil")),
    );
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("198.18.1.11 is bound to user"), "{body}");
    let out = agent.cli(&["session", "login", mapped, "--user", "mallory@example.com"]);
    assert!(!out.status.success());
    // Nor can addresses that are no device, or read two ways, be logged in.
    for (ip, needle) in [
        ("224.0.0.1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("0.0.0.0", "unspecified"),
        ("::ffff:127.0.0.1", "loopback"),
        ("198.018.1.11", "leading zero"),
    ] {
        let body = format!(r#"{{"ip": "{ip}", "user": "{BOB}"}}"#);
        let (status, reply) = unix_api(&agent, "POST", "/v1/sessions", Some(&body));
        assert_eq!(status, 400, "{ip}: {reply}");
        assert!(reply.contains(needle), "{ip}: {reply}");
    }
    assert_eq!(state(), before, "no refused request changed anything");

    // The device's own user re-authenticating through it resets the IPv4 session.
    let (status, body) = unix_api(&agent, "POST", "/v1/sessions", Some(&login(BOB, "default")));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"ip\":\"198.18.1.11\""), "{body}");
    assert!(lab.tcp_works(device(1), APP, 443));
    let list = state();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let (status, body) = unix_api(&agent, "GET", &format!("/v1/sessions/{mapped}"), None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"ip\":\"198.18.1.11\""), "{body}");
    let (status, body) = unix_api(&agent, "DELETE", &format!("/v1/sessions/{mapped}"), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(sessions(&agent), 0);
    assert!(lab.tcp_blocked(device(1), APP, 443));
}

#[test]
fn names_cannot_forge_metric_or_log_lines() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    // Quotes and braces are fine in a policy name; every output escapes them.
    let policy = APP_POLICY.replace("name = \"App\"", r#"name = "App\"} 1 #""#);
    let agent = lab.start_agent(&lab.config("metrics_listen = \"127.0.0.1:9464\"", &policy));
    agent.login(device(1), BOB, 2 * HOUR);
    assert!(lab.tcp_blocked(device(1), APP, 443));
    agent.wait_for_log(&["re-authentication required", r#"policy="App\"} 1 #""#]);
    let (status, body) = http(&lab, "127.0.0.1:9464", &get("/metrics", ""));
    assert_eq!(status, 200, "{body}");
    let text = dechunk(&body);
    let refused: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("sessiongate_policy_refused_flows_total"))
        .collect();
    assert_eq!(refused.len(), 1, "{text}");
    assert!(
        refused[0].starts_with(r#"sessiongate_policy_refused_flows_total{policy="App\"} 1 #"} "#),
        "{text}"
    );

    // Names that would break a line are refused where they enter, and change nothing.
    let before = agent.cli_ok(&["session", "list", "--json"]);
    for user in [
        "bob\\nINFO forged",
        "bob\\u202e",
        "\\ufeffbob",
        "bob\\u200b",
    ] {
        let body = format!(r#"{{"ip": "198.18.1.11", "user": "{user}"}}"#);
        let (status, reply) = unix_api(&agent, "POST", "/v1/sessions", Some(&body));
        assert_eq!(status, 400, "{user}: {reply}");
        assert!(reply.contains("control or invisible character"), "{reply}");
    }
    let long = format!(r#"{{"ip": "198.18.1.11", "user": "{}"}}"#, "b".repeat(300));
    let (status, reply) = unix_api(&agent, "POST", "/v1/sessions", Some(&long));
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply.contains("300 bytes long; the limit is 256"),
        "{reply}"
    );
    assert_eq!(agent.cli_ok(&["session", "list", "--json"]), before);
    std::fs::write(
        &agent.config,
        lab.config(
            "",
            &APP_POLICY.replace("name = \"App\"", r#"name = "App\n# forged""#),
        ),
    )
    .unwrap();
    let out = agent.cli(&["reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("U+000A"),
        "{stderr}"
    );
    assert!(
        !agent
            .log_text()
            .lines()
            .any(|l| l.starts_with("INFO forged") || l.starts_with("# forged")),
        "{}",
        agent.log_text()
    );
}

/// A tmpfs of `size` mounted at `path` for a test's lifetime (unmounted on drop).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: std::path::PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&path).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs at {}", path.display());
        Self(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `POST /v1/sessions` on the agent's socket with curl: (status, body).
fn login_status(agent: &Agent, ip: IpAddr, user: &str) -> (u16, serde_json::Value) {
    let out = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(&agent.socket)
        .args(["-H", "content-type: application/json", "-d"])
        .arg(format!(r#"{{"ip":"{ip}","user":"{user}"}}"#))
        .arg("http://agent/v1/sessions")
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, status) = text.rsplit_once('\n').expect("curl output");
    (
        status.parse().expect("status"),
        serde_json::from_str(body).unwrap_or_default(),
    )
}

#[test]
fn a_full_disk_refuses_logins_whole_with_507_and_every_acknowledged_one_survives() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let state = Tmpfs::mount(lab.dir.path().join("state"), "64k");
    let config = lab.config("", APP_POLICY);
    let mut agent = lab.start_agent(&config);
    agent.login(device(0), ALICE, NOW);
    // Fill the file system, then log in until the journal's last page is full too.
    let filler = state.0.join("filler");
    {
        let mut file = std::fs::File::create(&filler).unwrap();
        while file.write_all(&[0; 4096]).is_ok() {}
    }
    let mut acknowledged = 0;
    let full = loop {
        let (status, body) = login_status(&agent, device(0), ALICE);
        if status != 200 {
            break (status, body);
        }
        acknowledged += 1;
        assert!(acknowledged < 100, "the disk never filled up");
    };
    assert_eq!(full.0, 507, "{}", full.1);
    assert_eq!(full.1["code"], "storage_full", "{}", full.1);
    let message = full.1["error"].as_str().unwrap();
    assert!(
        message.contains("out of space") && message.contains("Free space"),
        "says what was wrong and what to do: {message}"
    );
    agent.wait_for_log(&["ERROR", "could not write to the session journal"]);

    // Another device's login: refused, and nothing of it is in force.
    let (status, _) = login_status(&agent, device(1), BOB);
    assert_eq!(status, 507);
    assert!(
        !agent
            .cli(&["session", "show", &device(1).to_string()])
            .status
            .success()
    );
    assert!(
        lab.tcp_blocked(device(1), APP, 443),
        "the kernel write was undone"
    );

    // Space again: logins work, and a crash loses none of the acknowledged ones.
    std::fs::remove_file(&filler).unwrap();
    let (status, body) = login_status(&agent, device(1), BOB);
    assert_eq!(status, 200, "{body}");
    agent.kill();
    let agent = lab.start_agent(&config);
    let sessions = agent.cli_ok(&["session", "list"]);
    assert!(
        sessions.contains(ALICE) && sessions.contains(BOB),
        "{sessions}"
    );
    assert!(
        !agent.log_text().contains("skipped"),
        "{}",
        agent.log_text()
    );
    assert!(lab.tcp_works(device(1), APP, 443));
    drop(agent);
    drop(state);
}
