//! A fleet: agents in two gateway namespaces (each with its own devices and server)
//! sharing sessions through a real etcd (`netlab::etcd`), in a namespace of its own.
//! Logins through either agent, or written to etcd directly, are enforced by both;
//! concurrent logins bind one user; etcd outages leave verdicts as they were and
//! refuse logins; a compaction while an agent is cut off makes it resync.

use std::{
    net::IpAddr,
    process::Output,
    thread,
    time::{Duration, Instant},
};

use netlab::{etcd::Etcd, *};

/// The protected port every check uses.
const PORT: u16 = 443;
/// How long a change may take to reach an agent before a test calls it lost.
const PROPAGATION_LIMIT: Duration = Duration::from_secs(10);

/// One gateway of the fleet: its lab (devices, gateway, server) and its agent.
struct Gateway {
    lab: Lab,
    agent: Agent,
}

fn store_section(etcd: &Etcd) -> String {
    etcd.store_section("/fleet")
}

/// Two gateways following `etcd`.
fn fleet(etcd: &Etcd) -> [Gateway; 2] {
    fleet_with(etcd, APP_POLICY)
}

/// Two gateways following `etcd`, with `policies`.
fn fleet_with(etcd: &Etcd, policies: &str) -> [Gateway; 2] {
    [(), ()].map(|()| {
        let lab = lab!();
        etcd.connect(&lab.gateway);
        let config = lab.config(
            "metrics_listen = \"127.0.0.1:9464\"",
            &format!("{}{policies}", store_section(etcd)),
        );
        let agent = lab.start_agent(&config);
        Gateway { lab, agent }
    })
}

impl Gateway {
    fn passes(&self, ip: IpAddr) -> bool {
        self.lab.tcp_works(ip, APP, PORT)
    }

    fn blocked(&self, ip: IpAddr) -> bool {
        self.lab.tcp_blocked(ip, APP, PORT)
    }

    /// `sessiongate stats --json`'s store part.
    fn store(&self) -> serde_json::Value {
        let stats: serde_json::Value =
            serde_json::from_str(&self.agent.cli_ok(&["stats", "--json"])).expect("stats JSON");
        stats["store"].clone()
    }

    /// The user the agent has for `ip`, if any.
    fn user_of(&self, ip: IpAddr) -> Option<String> {
        let out = self
            .agent
            .cli(&["session", "show", &ip.to_string(), "--json"]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("session JSON");
        v["user"].as_str().map(str::to_string)
    }

    /// The session list as (device, user, authenticated_at), sorted.
    fn sessions(&self) -> Vec<(String, String, String)> {
        let v: serde_json::Value =
            serde_json::from_str(&self.agent.cli_ok(&["session", "list", "--json"])).unwrap();
        let mut list: Vec<_> = v
            .as_array()
            .expect("a list")
            .iter()
            .map(|s| {
                (
                    s["ip"].as_str().unwrap().to_string(),
                    s["user"].as_str().unwrap().to_string(),
                    s["authenticated_at"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        list.sort();
        list
    }

    /// Waits until `done` holds for this agent; how long it took.
    fn wait_until(&self, what: &str, done: impl Fn(&Self) -> bool) -> Duration {
        let start = Instant::now();
        while !done(self) {
            assert!(
                start.elapsed() < PROPAGATION_LIMIT,
                "{what}: not after {PROPAGATION_LIMIT:?}; store {}; log:\n{}",
                self.store(),
                self.agent.log_text()
            );
            thread::sleep(Duration::from_millis(2));
        }
        start.elapsed()
    }

    /// The agent's Prometheus metrics (fetched inside the gateway namespace).
    fn metrics(&self) -> String {
        let out = self
            .lab
            .gateway
            .command("curl")
            .args(["-sf", "http://127.0.0.1:9464/metrics"])
            .output()
            .expect("curl");
        assert!(out.status.success(), "metrics: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the agent says it follows the store (or not). A cut that stays
    /// silent is noticed by keepalive pings, within about 8 s.
    fn wait_connected(&self, connected: bool) {
        let start = Instant::now();
        while self.store()["connected"] != connected {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "store connected = {connected}: not after 20 s; store {}; log:\n{}",
                self.store(),
                self.agent.log_text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn login_output(agent: &Agent, ip: IpAddr, user: &str) -> Output {
    agent.cli(&["session", "login", &ip.to_string(), "--user", user])
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The device entries in etcd that are sessions, as (device, user, authenticated_at),
/// sorted.
fn etcd_sessions(etcd: &Etcd) -> Vec<(String, String, String)> {
    let text = etcd.etcdctl(&["get", "--prefix", "/fleet/devices/"]);
    let lines: Vec<&str> = text.lines().collect();
    let mut list: Vec<_> = lines
        .chunks(2)
        .filter_map(|kv| {
            let ip = kv[0].trim_start_matches("/fleet/devices/").to_string();
            let v: serde_json::Value = serde_json::from_str(kv[1]).ok()?;
            let at = time::OffsetDateTime::parse(
                v["authenticated_at"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
            Some((ip, v["user"].as_str().unwrap().to_string(), at))
        })
        .collect();
    list.sort();
    list
}

fn entry(user: &str, ago: Duration) -> String {
    format!(
        r#"{{"user":"{user}","idp":"default","authenticated_at":"{}"}}"#,
        time_ago(ago)
    )
}

/// Test 1, over mutual TLS: a login through A is enforced by B. Propagation is the
/// time from sending the login to A until B's API shows it (B writes its kernel map
/// before its session list), over ten logins, printed; the CLI's start-up is in it.
/// (`cargo xtask bench --part control` measures it to the first admitted SYN.)
#[test]
fn a_login_through_one_agent_is_enforced_by_the_other() {
    if !privileged!() {
        return;
    }
    let etcd = Etcd::start_tls(1);
    let [a, b] = fleet(&etcd);
    let dev = device(0);
    assert!(a.blocked(dev) && b.blocked(dev), "no session yet");

    let mut samples = Vec::new();
    for n in 0..10u8 {
        let ip = device(n);
        let start = Instant::now();
        let out = login_output(&a.agent, ip, ALICE);
        assert!(out.status.success(), "login through A: {}", stderr(&out));
        let answered = start.elapsed();
        b.wait_until("B learns the login", |b| {
            b.user_of(ip).as_deref() == Some(ALICE)
        });
        samples.push((answered, start.elapsed()));
    }
    let mut seen: Vec<Duration> = samples.iter().map(|s| s.1).collect();
    seen.sort();
    let median = seen[seen.len() / 2];
    eprintln!(
        "propagation A login -> B applied (10 logins, mutual TLS): median {median:?}, max {:?}; A answered in {:?} (median)",
        seen[seen.len() - 1],
        {
            let mut a: Vec<Duration> = samples.iter().map(|s| s.0).collect();
            a.sort();
            a[a.len() / 2]
        }
    );
    // The figure is the benchmark's to judge (target: under 100 ms); here it only has
    // to be a live update, not a later resync.
    assert!(
        median < Duration::from_secs(1),
        "median propagation {median:?}"
    );
    assert!(b.passes(dev), "B enforces A's login: the device passes");
    assert!(a.passes(dev), "and so does A");
    let through_etcd = etcd_sessions(&etcd);
    assert_eq!(b.sessions(), through_etcd);
    assert_eq!(a.sessions(), through_etcd);

    // A logout through B is enforced by A.
    b.agent.cli_ok(&["session", "logout", &dev.to_string()]);
    a.wait_until("A learns the logout", |a| a.user_of(dev).is_none());
    assert!(a.blocked(dev), "logged out through B, refused by A");
}

/// Test 2: two agents race to bind one device to two users; one wins everywhere.
#[test]
fn concurrent_conflicting_logins_bind_one_user() {
    if !privileged!() {
        return;
    }
    let etcd = Etcd::start(1);
    let [a, b] = fleet(&etcd);
    for n in 0..10u8 {
        let ip = device(n);
        let start = std::sync::Barrier::new(2);
        let (from_a, from_b) = thread::scope(|s| {
            let ta = s.spawn(|| {
                start.wait();
                login_output(&a.agent, ip, ALICE)
            });
            let tb = s.spawn(|| {
                start.wait();
                login_output(&b.agent, ip, BOB)
            });
            (ta.join().unwrap(), tb.join().unwrap())
        });
        let winners = [&from_a, &from_b]
            .iter()
            .filter(|o| o.status.success())
            .count();
        assert_eq!(
            winners,
            1,
            "device {ip}: exactly one login wins; A: {} B: {}",
            stderr(&from_a),
            stderr(&from_b)
        );
        let (winner, loser) = if from_a.status.success() {
            (ALICE, &from_b)
        } else {
            (BOB, &from_a)
        };
        let refusal = stderr(loser);
        assert!(
            refusal.contains(&format!("bound to user \"{winner}\"")),
            "the loser is told who holds the device: {refusal}"
        );
        for g in [&a, &b] {
            g.wait_until("the winner everywhere", |g| {
                g.user_of(ip).as_deref() == Some(winner)
            });
        }
    }
    // Both kernels hold the same sessions: every device passes through both gateways.
    for n in 0..10u8 {
        assert!(a.passes(device(n)) && b.passes(device(n)), "device {n}");
    }
    assert_eq!(a.sessions(), b.sessions());
    assert_eq!(a.sessions(), etcd_sessions(&etcd));
    // How often a login read the device free, lost the compare-and-swap to the other
    // agent's write, and was judged again (the race this test is after; the rest of
    // the time one agent's read already saw the other's write).
    let lost = [&a, &b].map(|g| g.store()["lost_races"].as_u64().unwrap());
    eprintln!(
        "racing logins: 10 devices, lost compare-and-swaps: A {}, B {}",
        lost[0], lost[1]
    );
    assert!(
        lost[0] + lost[1] > 0,
        "the logins never overlapped: the race was not exercised"
    );
}

/// Test 3: etcd stops; both agents keep their verdicts and refuse logins clearly. It
/// comes back; changes written to it directly (as an IdP hook would) reach both, and
/// the agents resume their watch rather than start over.
#[test]
fn etcd_stopped_keeps_verdicts_refuses_logins_and_catches_up() {
    if !privileged!() {
        return;
    }
    let etcd = Etcd::start(1);
    let [mut a, b] = fleet(&etcd);
    let (fresh, expired, broken) = (device(0), device(1), device(2));
    a.agent.login(fresh, ALICE, NOW);
    b.agent.login(expired, BOB, 2 * HOUR);
    a.agent.login(broken, CAROL, NOW);
    for g in [&a, &b] {
        g.wait_until("the sessions", |g| {
            [fresh, expired, broken]
                .iter()
                .all(|ip| g.user_of(*ip).is_some())
        });
        assert!(g.passes(fresh) && g.blocked(expired));
    }

    etcd.stop(0);
    for g in [&a, &b] {
        g.wait_connected(false);
        assert!(
            g.passes(fresh),
            "fail-static: the fresh device still passes"
        );
        assert!(
            g.blocked(expired),
            "fail-static: the expired one is still refused"
        );
        let out = login_output(&g.agent, expired, BOB);
        assert!(!out.status.success(), "a login with etcd down must fail");
        assert!(
            stderr(&out).contains("the session store (etcd) could not be used"),
            "a clear error: {}",
            stderr(&out)
        );
        assert!(g.store()["last_error"].is_string());
        let metrics = g.metrics();
        assert!(
            metrics.contains("sessiongate_store_connected{kind=\"etcd\"} 0"),
            "{metrics}"
        );
    }
    // An agent restarted during the outage starts on its local mirror of the store.
    let config = std::fs::read_to_string(&a.agent.config).unwrap();
    a.agent.stop();
    a.agent = a.lab.start_agent(&config);
    assert_eq!(a.store()["connected"], false);
    assert!(
        a.passes(fresh) && a.blocked(expired),
        "the restarted agent enforces the mirror"
    );
    a.agent.wait_for_log(&["not reachable yet", "local mirror"]);

    etcd.start_member(0);
    // Written straight to etcd, as an identity provider's hook would.
    etcd.etcdctl(&["put", "/fleet/devices/198.18.1.11", &entry(BOB, NOW)]);
    etcd.etcdctl(&["del", "/fleet/devices/198.18.1.10"]);
    etcd.etcdctl(&["put", "/fleet/devices/198.18.1.12", "not a session"]);
    // Three changes to one device in a row: only the order gives the last one.
    let churned = device(4);
    let key = format!("/fleet/devices/{churned}");
    etcd.etcdctl(&["put", &key, &entry(ALICE, NOW)]);
    etcd.etcdctl(&["del", &key]);
    etcd.etcdctl(&["put", &key, &entry(ALICE, 2 * HOUR)]);
    let revision = etcd.revision();
    for g in [&a, &b] {
        g.wait_connected(true);
        g.wait_until("the hook's changes", |g| {
            g.store()["revision"].as_i64() == Some(revision)
        });
        assert!(g.passes(expired), "re-authenticated through the hook");
        assert!(g.blocked(fresh), "logged out in etcd: refused");
        assert!(g.user_of(broken).is_none(), "a bad entry is no session");
        assert!(g.blocked(broken), "and the device is refused");
        assert_eq!(g.store()["bad_entries"], 1);
        assert_eq!(g.user_of(churned).as_deref(), Some(ALICE));
        assert!(g.blocked(churned), "the last write (2 h ago) is in force");
    }
    assert_eq!(a.sessions(), etcd_sessions(&etcd));
    // A login replaces a bad entry.
    b.agent.login(broken, CAROL, NOW);
    a.wait_until("the bad entry replaced", |a| a.store()["bad_entries"] == 0);
    assert!(a.passes(broken));
    // B followed the store throughout: it resumed its watch from its revision.
    assert_eq!(
        b.store()["resyncs"],
        1,
        "B caught up without a full snapshot"
    );
    assert!(b.store()["disconnects"].as_u64() >= Some(1));
    let out = login_output(&a.agent, device(3), CAROL);
    assert!(out.status.success(), "logins work again: {}", stderr(&out));
}

/// Test 4: with one member of three down (the leader), both agents keep working
/// through the other two.
#[test]
fn a_three_member_cluster_with_one_member_down_keeps_working() {
    if !privileged!() {
        return;
    }
    let etcd = Etcd::start(3);
    let [a, b] = fleet(&etcd);
    a.agent.login(device(0), ALICE, NOW);
    b.wait_until("B learns it", |b| b.user_of(device(0)).is_some());

    let leader = etcd.leader();
    etcd.stop(leader);
    // A new leader is elected within the election timeout; a login may be refused
    // meanwhile, and must work after.
    let start = Instant::now();
    loop {
        let out = login_output(&b.agent, device(1), BOB);
        if out.status.success() {
            break;
        }
        assert!(
            start.elapsed() < PROPAGATION_LIMIT,
            "no login through the remaining members: {}",
            stderr(&out)
        );
        thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "first login after stopping the leader: {:?}",
        start.elapsed()
    );
    a.wait_until("A learns B's login", |a| a.user_of(device(1)).is_some());
    assert!(a.passes(device(1)) && b.passes(device(0)));
    a.agent
        .cli_ok(&["session", "logout", &device(0).to_string()]);
    b.wait_until("B learns A's logout", |b| b.user_of(device(0)).is_none());
    for g in [&a, &b] {
        g.wait_connected(true);
    }
    assert_eq!(a.sessions(), etcd_sessions(&etcd));
    assert_eq!(b.sessions(), etcd_sessions(&etcd));
}

/// Test 5: while B is cut off from etcd, the store changes and is compacted past B's
/// revision; B resyncs from a full snapshot and ends equal to the store.
#[test]
fn compaction_while_cut_off_ends_in_a_full_resync() {
    if !privileged!() {
        return;
    }
    let etcd = Etcd::start(1);
    let [a, b] = fleet(&etcd);
    a.agent.login(device(0), ALICE, NOW);
    a.agent.login(device(1), BOB, NOW);
    b.wait_until("B has both", |b| b.sessions().len() == 2);
    let before = b.store()["revision"].as_i64().unwrap();

    etcd.cut(&b.lab.gateway);
    b.wait_connected(false);
    assert!(b.passes(device(0)), "B enforces what it had");
    a.agent
        .cli_ok(&["session", "logout", &device(0).to_string()]);
    a.agent.login(device(2), CAROL, NOW);
    for n in 3..8u8 {
        etcd.etcdctl(&[
            "put",
            &format!("/fleet/devices/{}", device(n)),
            &entry(ALICE, Duration::from_secs(60 * u64::from(n))),
        ]);
    }
    let compacted = etcd.compact();
    assert!(compacted > before + 1);
    etcd.restore(&b.lab.gateway);

    b.wait_connected(true);
    b.wait_until("B resynced", |b| b.store()["resyncs"] == 2);
    assert!(b.agent.log_text().contains("compacted past the revision"));
    assert_eq!(b.sessions(), etcd_sessions(&etcd));
    assert_eq!(b.sessions().len(), 7);
    assert!(b.blocked(device(0)), "logged out while B was away");
    assert!(b.passes(device(2)), "logged in while B was away");
}

/// A bulk import through A is checked against etcd's entries, written in
/// compare-and-swap batches, and enforced by B.
#[test]
fn an_import_through_one_agent_reaches_the_other() {
    if !privileged!() {
        return;
    }
    let etcd = Etcd::start(1);
    let [a, b] = fleet(&etcd);
    b.agent.login(device(0), BOB, NOW);
    a.wait_until("A learns B's login", |a| a.user_of(device(0)).is_some());

    // 300 devices (several batches): a real device among them, and one line that breaks
    // the one-user rule against the entry B wrote.
    let mut csv = String::from("ip,user,idp,authenticated_at\n");
    for n in 0..300u32 {
        csv.push_str(&format!(
            "198.19.{}.{},user{n}@example.com,,{}\n",
            100 + n / 200,
            n % 200 + 1,
            time_ago(HOUR / 2)
        ));
    }
    csv.push_str(&format!("{},{ALICE},,{}\n", device(1), time_ago(NOW)));
    csv.push_str(&format!("{},{ALICE},,{}\n", device(0), time_ago(NOW)));
    let file = a.lab.dir.path().join("import.csv");
    std::fs::write(&file, csv).unwrap();
    let path = file.to_string_lossy().to_string();

    let refused = a.agent.cli(&["session", "import", &path]);
    assert!(
        !refused.status.success(),
        "a bad line refuses the whole file"
    );
    assert!(
        stderr(&refused).contains(":303: device 198.18.1.10 is bound to user"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(etcd_sessions(&etcd).len(), 1, "nothing was written");

    a.agent.cli_ok(&["session", "import", &path, "--skip-bad"]);
    b.wait_until("B has the import", |b| b.sessions().len() == 302);
    assert_eq!(b.sessions(), etcd_sessions(&etcd));
    assert_eq!(a.sessions(), etcd_sessions(&etcd));
    assert_eq!(
        b.user_of(device(0)).as_deref(),
        Some(BOB),
        "the refused line changed nothing"
    );
    assert!(b.passes(device(1)), "an imported device passes through B");
}

/// Groups in the fleet's store, written by one agent's login or straight into etcd
/// (as an identity provider's hook would), decide the policy on every agent.
#[test]
fn groups_in_the_store_decide_the_policy_on_every_agent() {
    if !privileged!() {
        return;
    }
    let finance = format!(
        "{APP_POLICY}\n[[policy]]\nname = \"App for finance\"\nprecedence = 1\ndestinations = [\"198.19.10.0/24\"]\ncheck_session = {{ enforce = true, duration = \"8h\" }}\nidentity = {{ groups = [\"finance\"] }}\n"
    );
    let etcd = Etcd::start(1);
    let [a, b] = fleet_with(&etcd, &finance);
    // Three hours old: past App's hour, within finance's eight.
    let (written, logged_in) = (device(1), device(2));
    let three_hours = time_ago(3 * HOUR);
    let with_groups = |user: &str, groups: &str| {
        format!(
            r#"{{"user":"{user}","idp":"default","authenticated_at":"{three_hours}","groups":{groups}}}"#
        )
    };
    let key = format!("/fleet/devices/{written}");
    etcd.etcdctl(&["put", &key, &with_groups(ALICE, r#"["finance"]"#)]);
    for g in [&a, &b] {
        g.wait_until("the entry with groups arrives", |g| {
            g.user_of(written).is_some()
        });
        assert!(g.passes(written), "finance: 8h");
    }
    // The hook drops the group: both agents refuse at once.
    etcd.etcdctl(&["put", &key, &with_groups(ALICE, "[]")]);
    for g in [&a, &b] {
        g.wait_until("the change arrives", |g| g.blocked(written));
    }
    // A login with a group through A is enforced by B.
    a.agent.cli_ok(&[
        "session",
        "login",
        &logged_in.to_string(),
        "--user",
        BOB,
        "--group",
        "finance",
        "--at",
        &three_hours,
    ]);
    b.wait_until("B learns A's login", |b| b.user_of(logged_in).is_some());
    assert!(b.passes(logged_in), "B applies the group A recorded");
    let stored = etcd.etcdctl(&["get", &format!("/fleet/devices/{logged_in}")]);
    assert!(stored.contains(r#""groups":["finance"]"#), "{stored}");
}

/// TLS mistakes are named: a CA file that cannot be read stops the agent at start;
/// a CA that did not sign the members' certificates leaves it unable to follow the
/// store (fail-static), saying why, and refusing logins.
#[test]
fn tls_mistakes_are_reported() {
    if !privileged!() {
        return;
    }
    let etcd = Etcd::start_tls(1);
    let lab = lab!();
    etcd.connect(&lab.gateway);
    let tls = etcd.tls().expect("a TLS cluster");
    let good = store_section(&etcd);

    let missing = good.replace(&tls.ca.display().to_string(), "/nonexistent/ca.pem");
    let log = lab.refused_start(&lab.config("", &format!("{missing}{APP_POLICY}")));
    assert!(
        log.contains("[store] ca_file /nonexistent/ca.pem: cannot read it"),
        "{log}"
    );

    // The client's own certificate as the CA: the members' certificates do not verify.
    let wrong = good.replace(
        &format!("ca_file = {:?}", tls.ca.display().to_string()),
        &format!("ca_file = {:?}", tls.cert.display().to_string()),
    );
    let agent = lab.start_agent(&lab.config("", &format!("{wrong}{APP_POLICY}")));
    let gateway = Gateway { lab, agent };
    let store = gateway.store();
    assert_eq!(store["connected"], false, "{store}");
    let error = store["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        error.contains("certificate"),
        "the TLS failure is named: {store}"
    );
    let out = login_output(&gateway.agent, device(0), ALICE);
    assert!(!out.status.success());
    eprintln!("a login with the wrong CA: {}", stderr(&out));
    assert!(
        stderr(&out).contains("could not be used")
            && stderr(&out).to_lowercase().contains("certificate"),
        "{}",
        stderr(&out)
    );
}

/// Keys and values written straight to etcd follow the API's input rules: another
/// spelling of a device (`::ffff:198.18.1.11`) or an address that is no device names
/// nothing, and a name with an invisible character is no session.
#[test]
fn other_spellings_and_invisible_names_in_etcd_are_bad_entries() {
    if !privileged!() {
        return;
    }
    let etcd = Etcd::start(1);
    let lab = lab!();
    etcd.connect(&lab.gateway);
    let agent = lab.start_agent(&lab.config("", &format!("{}{APP_POLICY}", store_section(&etcd))));
    let g = Gateway { lab, agent };
    g.wait_connected(true);
    let (expired, forged) = (device(1), device(2));
    g.agent.login(expired, BOB, 2 * HOUR);
    let mapped = format!("/fleet/devices/::ffff:{expired}");
    etcd.etcdctl(&["put", &mapped, &entry(CAROL, NOW)]);
    etcd.etcdctl(&["put", "/fleet/devices/224.0.0.1", &entry(CAROL, NOW)]);
    etcd.etcdctl(&[
        "put",
        &format!("/fleet/devices/{forged}"),
        &entry("carol\u{202e}", NOW),
    ]);
    let caught_up = |g: &Gateway| g.store()["revision"].as_i64() == Some(etcd.revision());
    g.wait_until("the puts", caught_up);
    assert_eq!(
        g.user_of(expired).as_deref(),
        Some(BOB),
        "still bob's device"
    );
    assert!(g.blocked(expired), "the other spelling renews nothing");
    assert!(
        g.user_of(forged).is_none(),
        "an invisible character: no session"
    );
    assert!(g.blocked(forged));
    assert_eq!(g.store()["bad_entries"], 3, "{}", g.store());
    assert!(
        g.agent
            .log_text()
            .contains(&format!("key=\"{mapped}\" reason=\"\\\"::ffff:{expired}\\\" is not the canonical form of {expired}")),
        "{}",
        g.agent.log_text()
    );
    // Deleting the other spelling logs nobody out.
    etcd.etcdctl(&["del", &mapped]);
    g.wait_until("the delete", caught_up);
    assert_eq!(g.user_of(expired).as_deref(), Some(BOB));
    assert_eq!(g.store()["bad_entries"], 2);
}
