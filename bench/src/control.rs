//! The control plane: how fast sessions and policies reach the kernel, how soon a login
//! is enforced (by the agent that took it, and by another agent of an etcd fleet), what
//! a large deployment costs in memory, and how an etcd fleet takes a bulk import and a
//! new agent.

use std::{
    fs,
    io::{BufWriter, Write as _},
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    path::Path,
    time::{Duration, Instant},
};

use agent_common::maps::Session;
use anyhow::{Context as _, bail};
use serde::Serialize;
use sessiongate::{
    api::client::{ApiClient, ClientError},
    clock::{ClockPair, boot_id, boot_now_ns},
    config::{Config, Limits},
    datapath::Datapath,
    policy,
};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{scenario, stats::Sample};

/// Named steps of an operation and their milliseconds, in order.
pub type Laps = Vec<(String, f64)>;

#[derive(Clone, Debug, Serialize)]
pub struct ControlReport {
    pub sessions: usize,
    /// Seconds to write `sessions` sessions into the kernel maps (batched).
    pub session_load: Sample,
    /// Seconds from starting the agent with `sessions` sessions in its journal to its
    /// API answering with the program attached.
    pub agent_start: f64,
    /// Where the start's time went, as the agent logs it ("sessiongate running":
    /// `journal_replay_ms` and the steps of `start`), milliseconds.
    pub start_laps: Laps,
    /// Seconds from starting an agent on the datapath and journal that agent left
    /// (killed with SIGKILL) to its API answering: an adoption.
    pub agent_adopt: f64,
    /// Where the adoption's time went, as `start_laps`.
    pub adopt_laps: Laps,
    /// Milliseconds from a login request to the first SYN the kernel admits.
    pub login_to_admitted: Sample,
    /// Milliseconds from a login request to agent A to the first SYN that gateway B's
    /// kernel admits, A and B (in two labs) sharing sessions through one etcd member.
    pub fleet_login_to_admitted: Sample,
    /// Acknowledged logins per second with concurrent clients (`concurrent_logins`).
    pub logins: LoginRate,
    pub cidrs: usize,
    /// Seconds to parse, validate and compile a config of `cidrs` CIDRs.
    pub policy_compile: Sample,
    /// Seconds to write the compiled tables into the kernel.
    pub policy_write: Sample,
    /// Kernel memory of the agent's maps (fdinfo memlock), bytes, and the agent's RSS,
    /// with `sessions` sessions loaded and room for as many flows.
    pub map_bytes: u64,
    pub rss_bytes: u64,
    /// Seconds for `sessiongate session import` of `sessions` sessions (a CSV file) into
    /// a running agent, end to end through the CLI.
    pub bulk_import: f64,
    /// Where the import's time went in the agent, as it logs it ("imported
    /// sessions": `laps`), milliseconds.
    pub import_laps: Laps,
    /// Seconds for `sessiongate reload` from a one-policy config to one of `cidrs`
    /// CIDRs and 64 identity-conditioned policies on a running agent holding `sessions`
    /// sessions (each device in one of the 64 groups), end to end through the CLI:
    /// every device's identity mask is computed and written before the flip.
    pub reload: Sample,
    /// Sessions of the fleet-at-scale scenario.
    pub fleet_sessions: usize,
    /// Seconds for `sessiongate session import` of `fleet_sessions` sessions (a CSV
    /// file) through agent A of an etcd fleet, end to end through the CLI: A writes them
    /// to etcd and answers once its own follower has applied them.
    pub fleet_import: f64,
    /// Where A's import went, as it logs it ("imported sessions into the fleet's
    /// store": `laps`), milliseconds.
    pub fleet_import_laps: Laps,
    /// Seconds from starting agent B (another lab, the same etcd) until its API
    /// answers. B serves once it has loaded the fleet's snapshot, or after waiting 5 s
    /// for it (then on its local mirror while the snapshot goes on).
    pub fleet_join: f64,
    /// The sessions B held when its API first answered (`fleet_sessions`: in step).
    pub fleet_join_sessions: usize,
    /// Seconds from starting B until it holds all `fleet_sessions` sessions.
    pub fleet_join_synced: f64,
    /// Agent B's RSS once its snapshot is done (after it holds them), bytes.
    pub fleet_join_rss_bytes: u64,
    /// Where B's time went: its start's steps, then its first snapshot's (fetch from
    /// etcd, decode, resync), as it logs them, milliseconds.
    pub fleet_join_laps: Laps,
    /// The etcd member's database (`dbSize`) holding the fleet's sessions, bytes.
    pub fleet_etcd_bytes: u64,
    /// Seconds for a plain loop of put-only transactions, `IMPORT_BATCH` entries each,
    /// one after another, writing `fleet_sessions` entries like the agent's into the
    /// same etcd (after the fleet's): what the store takes for this pattern.
    pub fleet_etcd_limit: f64,
}

pub fn run(quick: bool, agent: &Path) -> anyhow::Result<ControlReport> {
    let sessions = if quick { 10_000 } else { 1_000_000 };
    let cidrs = if quick { 1_000 } else { 10_000 };
    let runs = if quick { 2 } else { 5 };
    eprintln!("bench: control plane");
    let session_load = Sample::of(&repeat(runs, || session_load(sessions))?);
    let (compile, write): (Vec<f64>, Vec<f64>) =
        repeat(runs, || policy_load(cidrs))?.into_iter().unzip();
    let at_scale = agent_at_scale(sessions, agent)?;
    let login_runs = if quick { 3 } else { 15 };
    let login_to_admitted = Sample::of(&single_agent_logins(agent, login_runs)?);
    let fleet_login_to_admitted = Sample::of(&fleet_logins(agent, login_runs)?);
    let logins = login_rate(quick, agent)?;
    let (bulk_import, import_laps, reloads) = import_and_reload(sessions, cidrs, runs, agent)?;
    let fleet = fleet_at_scale(if quick { 5_000 } else { FLEET_SESSIONS }, agent)?;
    Ok(ControlReport {
        sessions,
        session_load,
        agent_start: at_scale.start,
        start_laps: at_scale.start_laps,
        agent_adopt: at_scale.adopt,
        adopt_laps: at_scale.adopt_laps,
        login_to_admitted,
        fleet_login_to_admitted,
        logins,
        cidrs,
        policy_compile: Sample::of(&compile),
        policy_write: Sample::of(&write),
        map_bytes: at_scale.map_bytes,
        rss_bytes: at_scale.rss_bytes,
        bulk_import,
        import_laps,
        reload: Sample::of(&reloads),
        fleet_sessions: fleet.sessions,
        fleet_import: fleet.import,
        fleet_import_laps: fleet.import_laps,
        fleet_join: fleet.join,
        fleet_join_sessions: fleet.join_sessions,
        fleet_join_synced: fleet.join_synced,
        fleet_join_rss_bytes: fleet.join_rss_bytes,
        fleet_join_laps: fleet.join_laps,
        fleet_etcd_bytes: fleet.etcd_bytes,
        fleet_etcd_limit: fleet.etcd_limit,
    })
}

/// Acknowledged logins per second through the API of one agent (local store), with
/// `clients` clients each sending its next login as soon as the last is answered.
#[derive(Clone, Debug, Serialize)]
pub struct LoginRate {
    pub clients: usize,
    /// Seconds each run lasts.
    pub seconds: f64,
    /// Logins per second, one value per run.
    pub per_second: Sample,
}

/// Concurrent clients of `login_rate`.
const LOGIN_CLIENTS: usize = 16;

/// `cargo xtask bench -- --part logins`, and a row of the control part: logins per
/// second with `LOGIN_CLIENTS` concurrent clients, three runs of 5 s (1 s when quick).
pub fn login_rate(quick: bool, agent: &Path) -> anyhow::Result<LoginRate> {
    let (runs, seconds) = if quick { (2, 1.0) } else { (3, 5.0) };
    eprintln!("bench: {LOGIN_CLIENTS} concurrent clients logging in");
    let lab = netlab::Lab::new(agent);
    let agent = lab.start_agent(&lab.config("", scenario::APP_POLICY));
    let rates = repeat(runs, || {
        concurrent_logins(
            &agent.socket,
            LOGIN_CLIENTS,
            Duration::from_secs_f64(seconds),
        )
    })?;
    Ok(LoginRate {
        clients: LOGIN_CLIENTS,
        seconds,
        per_second: Sample::of(&rates),
    })
}

/// Logins per second over `length`: `clients` tasks, each logging its own device in
/// again and again (a login resets the session: one journal record each).
fn concurrent_logins(socket: &Path, clients: usize, length: Duration) -> anyhow::Result<f64> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let deadline = started + length;
    let done: usize = runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, device) in scenario::devices(clients).enumerate() {
            let api = ApiClient::new(socket);
            tasks.spawn(async move {
                let body = serde_json::json!({ "ip": device.to_string(), "user": format!("bench{i}@example.com") });
                let mut n = 0usize;
                while Instant::now() < deadline {
                    api.call(hyper::Method::POST, "/v1/sessions", Some(body.clone()))
                        .await?;
                    n += 1;
                }
                anyhow::Ok(n)
            });
        }
        let mut total = 0;
        while let Some(n) = tasks.join_next().await {
            total += n??;
        }
        anyhow::Ok(total)
    })?;
    Ok(done as f64 / started.elapsed().as_secs_f64())
}

/// Seconds to import `n` sessions through the CLI, and `runs` timings of reloading a
/// config of `cidrs` CIDRs (after a one-policy config each time).
fn import_and_reload(
    n: usize,
    cidrs: usize,
    runs: usize,
    agent: &Path,
) -> anyhow::Result<(f64, Laps, Vec<f64>)> {
    let lab = netlab::Lab::new(agent);
    let small = sized(lab.config("", scenario::APP_POLICY), n);
    let large = sized(lab.config("", &scenario::policies(cidrs, 11)), n);
    let agent = lab.start_agent(&small);

    let file = lab.dir.path().join("sessions.csv");
    write_csv(&file, n)?;
    let import = import_file(&agent, &file)?;
    let import_laps = logged_laps(&agent.log_text(), "imported sessions", "laps=");

    let config_path = lab.dir.path().join("sessiongate.toml");
    let mut reloads = Vec::with_capacity(runs);
    for _ in 0..runs {
        fs::write(&config_path, &small)?;
        agent.cli_ok(&["reload"]);
        fs::write(&config_path, &large)?;
        let started = Instant::now();
        agent.cli_ok(&["reload"]);
        reloads.push(started.elapsed().as_secs_f64());
    }
    Ok((import, import_laps, reloads))
}

/// `config` (from `Lab::config`) with limits for `sessions` sessions and large policies.
fn sized(config: String, sessions: usize) -> String {
    config.replace(
        "[limits]\nmax_sessions = 4096\nmax_flows = 4096\nmax_policy_cidrs = 1024\nmax_port_rules = 1024\n",
        &format!(
            "[limits]\nmax_sessions = {}\nmax_flows = 4096\nmax_policy_cidrs = 16384\nmax_port_rules = 65536\n",
            sessions + 1024
        ),
    )
}

/// A CSV import file of `n` devices authenticated now.
fn write_csv(path: &Path, n: usize) -> anyhow::Result<()> {
    let at = ClockPair::now()
        .wall
        .format(&time::format_description::well_known::Rfc3339)?;
    let mut out = BufWriter::new(fs::File::create(path)?);
    writeln!(out, "ip,user,idp,authenticated_at,groups")?;
    // Each device in one of the teams the identity-conditioned policies name.
    let teams = scenario::IDENTITY_POLICIES;
    for (i, device) in scenario::devices(n).enumerate() {
        writeln!(
            out,
            "{device},bench@example.com,default,{at},team-{}",
            i % teams
        )?;
    }
    out.flush()?;
    Ok(())
}

/// Seconds for `sessiongate session import FILE` on `agent`, which must succeed.
fn import_file(agent: &netlab::Agent, file: &Path) -> anyhow::Result<f64> {
    let started = Instant::now();
    let imported = agent.cli(&["session", "import", &file.to_string_lossy()]);
    let seconds = started.elapsed().as_secs_f64();
    if !imported.status.success() {
        bail!(
            "session import failed: {}",
            String::from_utf8_lossy(&imported.stderr)
        );
    }
    Ok(seconds)
}

/// Sessions of the fleet-at-scale scenario in a full run.
const FLEET_SESSIONS: usize = 1_000_000;

/// What `fleet_at_scale` measured.
struct FleetScale {
    sessions: usize,
    import: f64,
    import_laps: Laps,
    join: f64,
    join_sessions: usize,
    join_synced: f64,
    join_rss_bytes: u64,
    join_laps: Laps,
    etcd_bytes: u64,
    etcd_limit: f64,
}

/// An etcd fleet at scale: `n` sessions imported through agent A (in one lab) into a
/// one-member etcd, then agent B started in a second lab on the same etcd and timed
/// until its API answers, and until it holds the `n` sessions (which it must, within
/// 10 minutes).
fn fleet_at_scale(n: usize, agent: &Path) -> anyhow::Result<FleetScale> {
    eprintln!("bench: an etcd fleet of {n} sessions");
    // Declared first, dropped last: the agents stop while their store still answers.
    let etcd = netlab::Etcd::start(1);
    let rest = fleet_config(&etcd);
    let labs = [(), ()].map(|()| netlab::Lab::new(agent));
    for lab in &labs {
        etcd.connect(&lab.gateway);
    }
    let configs = labs.each_ref().map(|lab| sized(lab.config("", &rest), n));

    let a = labs[0].start_agent(&configs[0]);
    let file = labs[0].dir.path().join("sessions.csv");
    write_csv(&file, n)?;
    let import = import_file(&a, &file)?;
    let import_laps = logged_laps(
        &a.log_text(),
        "imported sessions into the fleet's store",
        "laps=",
    );
    let on_a = session_count(&a)?;
    if on_a != n {
        bail!("agent A has {on_a} sessions after importing {n}");
    }

    let started = Instant::now();
    let b = labs[1].spawn_agent(&configs[1]);
    let deadline = started + Duration::from_secs(600);
    let join_sessions = wait_answering(&b, deadline)?;
    let join = started.elapsed().as_secs_f64();
    loop {
        let on_b = session_count(&b)?;
        if on_b == n {
            break;
        }
        if Instant::now() >= deadline || on_b > n {
            bail!(
                "agent B has {on_b} sessions after joining a fleet of {n}; log:\n{}",
                b.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let join_synced = started.elapsed().as_secs_f64();
    // The snapshot ends after its last page (removals, its log line, memory given
    // back): its RSS and laps are read once the agent counts it done.
    while resyncs(&b)? == 0 {
        if Instant::now() >= deadline {
            bail!(
                "agent B never finished its snapshot; log:\n{}",
                b.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let join_rss_bytes = rss(b.pid())?;
    let log = b.log_text();
    let mut join_laps = logged_laps(&log, "sessiongate running", "start=");
    for (step, ms) in logged_laps(&log, "applied a full snapshot", "laps=") {
        join_laps.push((format!("snapshot: {step}"), ms));
    }
    let status: serde_json::Value =
        serde_json::from_str(&etcd.etcdctl(&["endpoint", "status", "-w", "json"]))?;
    let etcd_bytes = status[0]["Status"]["dbSize"]
        .as_u64()
        .context("no dbSize in etcd's endpoint status")?;
    drop((a, b));
    let etcd_limit = etcd_put_limit(&etcd, n)?;
    Ok(FleetScale {
        sessions: n,
        import,
        import_laps,
        join,
        join_sessions,
        join_synced,
        join_rss_bytes,
        join_laps,
        etcd_bytes,
        etcd_limit,
    })
}

/// Seconds for `n` entries like the agent's (a session's value, keys of the same
/// length) put into `etcd` by a plain loop: transactions of `IMPORT_BATCH` puts, one
/// after another, no compares, from a client inside etcd's namespace. The agent's
/// import makes the same number of transactions of the same size, each also
/// comparing every key's revision.
fn etcd_put_limit(etcd: &netlab::Etcd, n: usize) -> anyhow::Result<f64> {
    use etcd_client::{Client, Txn, TxnOp};
    use sessiongate::{fleet::IMPORT_BATCH, sessions};

    let request = sessions::LoginRequest {
        ip: "198.18.0.7".parse()?,
        user: "bench@example.com".into(),
        idp: None,
        at: None,
        groups: vec!["team-7".into()],
    };
    let record = sessions::plan_login(None, &request, &ClockPair::now(), &boot_id())?;
    let value = sessiongate::fleet::entry::encode(&record);
    let keys: Vec<String> = scenario::devices(n)
        .map(|device| format!("/limit/sessions/{device}"))
        .collect();
    let endpoint = etcd.endpoint(0);
    etcd.ns.run(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let mut client = Client::connect([endpoint], None).await?;
            let started = Instant::now();
            for batch in keys.chunks(IMPORT_BATCH) {
                let puts: Vec<TxnOp> = batch
                    .iter()
                    .map(|key| TxnOp::put(key.as_str(), value.clone(), None))
                    .collect();
                client.txn(Txn::new().and_then(puts)).await?;
            }
            Ok(started.elapsed().as_secs_f64())
        })
    })
}

/// The sections after `[limits]` of an agent config that shares sessions through
/// `etcd` (prefix `/fleet`), with one session-checked application.
fn fleet_config(etcd: &netlab::Etcd) -> String {
    format!("{}{}", etcd.store_section("/fleet"), scenario::APP_POLICY)
}

/// An agent's `sessiongate stats --json`.
fn stats(agent: &netlab::Agent) -> anyhow::Result<serde_json::Value> {
    let out = agent.cli(&["stats", "--json"]);
    if !out.status.success() {
        bail!(
            "sessiongate stats failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The sessions an agent reports.
fn session_count(agent: &netlab::Agent) -> anyhow::Result<usize> {
    sessions_of(&stats(agent)?)
}

/// The full snapshots an agent of a fleet has applied.
fn resyncs(agent: &netlab::Agent) -> anyhow::Result<u64> {
    stats(agent)?["store"]["resyncs"]
        .as_u64()
        .context("no store.resyncs in the agent's stats")
}

fn sessions_of(stats: &serde_json::Value) -> anyhow::Result<usize> {
    stats["sessions"]
        .as_u64()
        .map(|n| n as usize)
        .context("no sessions in the agent's stats")
}

/// Waits until a starting agent's API answers (`sessiongate stats --json`): polls
/// every 10 ms until its socket exists, then asks (a request made before the agent
/// serves waits for it). Returns the sessions it reported; fails if the agent exits or
/// the deadline passes.
fn wait_answering(agent: &netlab::Agent, deadline: Instant) -> anyhow::Result<usize> {
    loop {
        if agent.socket.exists() {
            let out = agent.cli(&["stats", "--json"]);
            if out.status.success() {
                return sessions_of(&serde_json::from_slice(&out.stdout)?);
            }
        }
        if !running(agent.pid()) {
            bail!(
                "the agent exited while starting; log:\n{}",
                agent.log_text()
            );
        }
        if Instant::now() >= deadline {
            bail!("the agent's API did not answer; log:\n{}", agent.log_text());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether a child process still runs (not exited, not a zombie awaiting its parent).
fn running(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command name, which is in parentheses.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

fn repeat<T>(runs: usize, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<Vec<T>> {
    (0..runs).map(|_| f()).collect()
}

fn limits(sessions: usize) -> Limits {
    Limits {
        max_sessions: sessions as u32 + 1024,
        max_flows: sessions as u32 + 1024,
        max_policy_cidrs: 16_384,
        max_port_rules: 65_536,
    }
}

/// Seconds to load `n` sessions into freshly loaded maps.
fn session_load(n: usize) -> anyhow::Result<f64> {
    let mut dp = Datapath::load(&limits(n))?;
    let session = Session {
        authenticated_at_ns: boot_now_ns(),
        ..Session::default()
    };
    let all: Vec<_> = scenario::devices(n)
        .map(|d| (d, session, scenario::IDENTITY, None))
        .collect();
    let started = Instant::now();
    let mut sessions = dp.take_sessions().expect("not taken yet");
    sessions.load_sessions(&all)?;
    Ok(started.elapsed().as_secs_f64())
}

/// Seconds to compile a config of `cidrs` CIDRs, and to write its tables.
fn policy_load(cidrs: usize) -> anyhow::Result<(f64, f64)> {
    let text = format!(
        "[agent]\ninterfaces = [\"bench0\"]\n{}",
        scenario::policies(cidrs, 11)
    );
    let started = Instant::now();
    let config = Config::parse(&text, "bench")?;
    let table = policy::compile(&config)?;
    let compiled = started.elapsed().as_secs_f64();
    let mut dp = Datapath::load(&limits(1024))?;
    let started = Instant::now();
    dp.maps.apply(policy::settings(&config), &table)?;
    Ok((compiled, started.elapsed().as_secs_f64()))
}

/// An agent with a million sessions: started, then adopted.
struct AtScale {
    start: f64,
    start_laps: Laps,
    adopt: f64,
    adopt_laps: Laps,
    map_bytes: u64,
    rss_bytes: u64,
}

/// Starts the agent with `n` sessions in its journal: the seconds until it answers,
/// where its start's time went, the kernel memory of its maps and its RSS. Then kills
/// it and starts another on what it left: the same for that adoption.
fn agent_at_scale(n: usize, agent: &Path) -> anyhow::Result<AtScale> {
    let lab = netlab::Lab::new(agent);
    let state = lab.dir.path().join("state");
    fs::create_dir_all(&state)?;
    write_journal(&state.join("sessions.jsonl"), n)?;
    let limits = format!(
        "[limits]\nmax_sessions = {}\nmax_flows = {}\n",
        n + 1024,
        n + 1024
    );
    let config = lab
        .config("", "")
        .replace("[limits]\nmax_sessions = 4096\nmax_flows = 4096\n", &limits);
    let timed_start = || {
        let started = Instant::now();
        let agent = lab.start_agent(&config);
        let seconds = started.elapsed().as_secs_f64();
        let log = agent.log_text();
        let mut laps = logged_laps(&log, "sessiongate running", "journal_replay_ms=");
        for lap in &mut laps {
            lap.0 = "journal replay (on its own thread, beside the steps below)".into();
        }
        laps.extend(logged_laps(&log, "sessiongate running", "start="));
        (agent, seconds, laps)
    };
    let (mut first, start, start_laps) = timed_start();
    let map_bytes = map_memory(first.pid())?;
    let rss_bytes = rss(first.pid())?;
    first.kill();
    let (adopted, adopt, adopt_laps) = timed_start();
    anyhow::ensure!(
        adopted.log_text().contains("adopted"),
        "the second agent did not adopt the first one's datapath:\n{}",
        adopted.log_text()
    );
    Ok(AtScale {
        start,
        start_laps,
        adopt,
        adopt_laps,
        map_bytes,
        rss_bytes,
    })
}

/// The steps an agent logged in the first line containing `line`, in the field that
/// starts with `field`: `name=Nms` words (for `journal_replay_ms=N`, one step named
/// `journal_replay`), in milliseconds. Empty if the line is not there.
fn logged_laps(log: &str, line: &str, field: &str) -> Laps {
    let Some(at) = log
        .lines()
        .find(|l| l.contains(line))
        .and_then(|l| l.find(field).map(|i| &l[i + field.len()..]))
    else {
        return Vec::new();
    };
    if let Some(name) = field.strip_suffix("_ms=") {
        let ms = at.split_whitespace().next().and_then(|v| v.parse().ok());
        return ms
            .map(|ms| vec![(name.to_string(), ms)])
            .unwrap_or_default();
    }
    at.split_whitespace()
        .map_while(|word| {
            let (name, value) = word.split_once('=')?;
            let ms = value.strip_suffix("ms")?.parse().ok()?;
            Some((name.to_string(), ms))
        })
        .collect()
}

/// A session journal as the agent writes it, with `n` devices authenticated now.
fn write_journal(path: &Path, n: usize) -> anyhow::Result<()> {
    let clock = ClockPair::now();
    let at = clock
        .wall
        .format(&time::format_description::well_known::Rfc3339)?;
    let boot = boot_id();
    let mut out = BufWriter::new(fs::File::create(path)?);
    for device in scenario::devices(n) {
        writeln!(
            out,
            r#"{{"op":"login","ip":"{device}","user":"bench@example.com","idp":"default","authenticated_at":"{at}","boot_id":"{boot}","authenticated_at_boot_ns":{}}}"#,
            clock.boot_ns
        )?;
    }
    out.flush()?;
    Ok(())
}

/// Kernel memory of the BPF maps a process holds, from /proc/PID/fdinfo.
fn map_memory(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo"))?.filter_map(Result::ok) {
        let info = fs::read_to_string(entry.path()).unwrap_or_default();
        if !info.contains("map_type:") {
            continue;
        }
        total += info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

/// Milliseconds from a login request to the first SYN the kernel admits, `runs` times,
/// with one agent taking the login and enforcing it.
fn single_agent_logins(agent: &Path, runs: usize) -> anyhow::Result<Vec<f64>> {
    let lab = netlab::Lab::new(agent);
    let agent = lab.start_agent(&lab.config("", scenario::APP_POLICY));
    let api = ApiClient::new(&agent.socket);
    login_latencies(runs, &api, &lab, &api)
}

/// Milliseconds from a login request to agent A to the first SYN that agent B admits,
/// `runs` times: A and B run in two labs and share sessions through a one-member etcd
/// (in a namespace of its own), so the login travels A, etcd, B's watch, B's map.
fn fleet_logins(agent: &Path, runs: usize) -> anyhow::Result<Vec<f64>> {
    // Declared first, dropped last: the agents stop while their store still answers.
    let etcd = netlab::Etcd::start(1);
    let rest = fleet_config(&etcd);
    let labs = [(), ()].map(|()| netlab::Lab::new(agent));
    for lab in &labs {
        etcd.connect(&lab.gateway);
    }
    let agents = labs
        .each_ref()
        .map(|lab| lab.start_agent(&lab.config("", &rest)));
    let [a, b] = agents.each_ref().map(|agent| ApiClient::new(&agent.socket));
    login_latencies(runs, &a, &labs[1], &b)
}

/// Milliseconds from a login request to the first SYN the kernel admits, `runs` times:
/// a device of `lab` whose session expired sends a new SYN every 100 µs from the
/// client namespace; the login goes to `login_api`; the first of those SYNs to be
/// answered through `lab`'s gateway marks enforcement. `enforcer` is the API of the
/// agent on that gateway: the one behind `login_api`, or another following the same
/// store. Before each run it must have the expired session, after each run's logout
/// (through `login_api`) it must have none, so that runs start alike.
fn login_latencies(
    runs: usize,
    login_api: &ApiClient,
    lab: &netlab::Lab,
    enforcer: &ApiClient,
) -> anyhow::Result<Vec<f64>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut latencies = Vec::with_capacity(runs);
    for run in 0..runs {
        let device = netlab::device((run % 10) as u8);
        let user = format!("user{run}@example.com");
        let expired = netlab::time_ago(Duration::from_secs(7200));
        let login = |at: Option<String>| {
            let body = serde_json::json!({ "ip": device.to_string(), "user": user, "at": at });
            runtime.block_on(login_api.call(hyper::Method::POST, "/v1/sessions", Some(body)))
        };
        login(Some(expired))?;
        wait_for_session(&runtime, enforcer, device, |u| u == Some(user.as_str()))?;
        // Neighbour entries on both sides first, so the measurement is the agents'.
        if !lab.tcp_works(device, netlab::OPEN, 443) {
            bail!("{device} cannot reach the unprotected host");
        }
        let latency = lab
            .client
            .run(|| probe_until_admitted(device, || Ok(login(None)?)))?;
        latencies.push(latency.as_secs_f64() * 1e3);
        runtime.block_on(login_api.call(
            hyper::Method::DELETE,
            &format!("/v1/sessions/{device}"),
            None,
        ))?;
        wait_for_session(&runtime, enforcer, device, |u| u.is_none())?;
    }
    Ok(latencies)
}

/// Polls `api` (every 2 ms, up to 10 s) until `done` holds for the user of `device`'s
/// session, `None` when it has none.
fn wait_for_session(
    runtime: &tokio::runtime::Runtime,
    api: &ApiClient,
    device: IpAddr,
    done: impl Fn(Option<&str>) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let user = match runtime.block_on(api.get(&format!("/v1/sessions/{device}"))) {
            Ok(session) => Some(session["user"].as_str().unwrap_or_default().to_owned()),
            Err(ClientError::Api { status: 404, .. }) => None,
            Err(e) => return Err(e.into()),
        };
        if done(user.as_deref()) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the enforcing agent's session of {device} is still {user:?} after 10 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Sends a SYN from `device` every 100 µs, runs `login` after the first few, and
/// returns the time from the start of `login` to the sending of the first SYN that was
/// answered (SYNs sent before the login are ignored).
pub fn probe_until_admitted<T>(
    device: IpAddr,
    login: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<Duration> {
    let target = SocketAddr::new(netlab::APP, 443);
    let mut pending: Vec<(Socket, Instant)> = Vec::new();
    let mut login = Some(login);
    let mut login_started = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_nonblocking(true)?;
        socket.bind(&SocketAddr::new(device, 0).into())?;
        let sent = Instant::now();
        match socket.connect(&target.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e.into()),
        }
        pending.push((socket, sent));
        if pending.len() == 20
            && let Some(login) = login.take()
        {
            login_started = Some(Instant::now());
            login()?;
        }
        if let Some(started) = login_started {
            for (socket, sent) in &pending {
                if *sent >= started && connected(socket) {
                    return Ok(sent.duration_since(started));
                }
            }
        }
        // Unanswered SYNs are retransmitted after a second; close them long before.
        pending.retain(|(_, sent)| sent.elapsed() < Duration::from_millis(500));
        std::thread::sleep(Duration::from_micros(100));
    }
    bail!("no SYN from {device} was admitted within 5 s of the login")
}

fn connected(socket: &Socket) -> bool {
    let mut fd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut fd, 1, 0) } == 1;
    ready && matches!(socket.take_error(), Ok(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laps_are_read_from_the_agents_log_lines() {
        let log = "2026-12-07T11:00:00Z  INFO sessiongate::run: sessiongate running policies=1 journal_replay_ms=966 start=datapath=294ms replay_after_datapath=673ms sessions=781ms api_socket=/x\n\
                   2026-12-07T11:00:05Z  INFO sessiongate::control::sessions: imported sessions sessions=10 reset=0 laps=parse=12ms plan=7ms sync=1ms\n";
        assert_eq!(
            logged_laps(log, "sessiongate running", "start="),
            [
                ("datapath".to_string(), 294.0),
                ("replay_after_datapath".to_string(), 673.0),
                ("sessions".to_string(), 781.0)
            ]
        );
        assert_eq!(
            logged_laps(log, "sessiongate running", "journal_replay_ms="),
            [("journal_replay".to_string(), 966.0)]
        );
        assert_eq!(logged_laps(log, "imported sessions", "laps=").len(), 3);
        assert!(logged_laps(log, "no such line", "laps=").is_empty());
    }
}
