//! The `sessiongate` command line: `run` and `check` work on a config file; `session`
//! and `stats` talk to a running agent through its API socket.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use hyper::Method;
use serde_json::Value;

use crate::{
    api::{
        client::{ApiClient, ClientError},
        server::MAX_IMPORT_BODY,
    },
    config::Config,
    errln,
    events::{self, Refusal},
    input::{self, file::Accept, printable},
    outln, policy,
    wire::{ImportReport, LoginBody, Reloaded, SessionDetail, SessionView, Stats, StoreStatus},
};

const DEFAULT_CONFIG: &str = "/etc/sessiongate/sessiongate.toml";
const DEFAULT_SOCKET: &str = "/run/sessiongate/api.sock";

#[derive(Debug, Parser)]
#[command(
    name = "sessiongate",
    version,
    about = "Per-application device session timeouts, enforced in the kernel with XDP"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the config, adopt (or load) the pinned XDP datapath and enforce until
    /// SIGINT/SIGTERM; SIGHUP reloads the config. Enforcement outlives the agent: the
    /// next one adopts the pinned datapath without a gap.
    Run {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// One log line per event, as text or JSON.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        /// Swap a pinned datapath this agent cannot adopt (another map layout, other
        /// [limits]) for a new one in one step.
        #[arg(long)]
        replace: bool,
    },
    /// Remove the pinned datapath (detaching the program), the session state and the
    /// API socket. The agent must be stopped first.
    Detach {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Keep the session journal in state_dir.
        #[arg(long)]
        keep_sessions: bool,
    },
    /// Make a running agent re-read its config and apply it atomically (as SIGHUP does);
    /// an invalid config is rejected with every reason and the running policy stays.
    Reload {
        #[command(flatten)]
        target: Target,
    },
    /// Follow refused flows live.
    Events {
        #[command(flatten)]
        target: Target,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Validate the config, print the compiled policy table and warn about likely mistakes.
    Check {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Record, end and inspect device sessions on a running agent.
    Session {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: SessionCommand,
    },
    /// Show the datapath's counters.
    Stats {
        #[command(flatten)]
        target: Target,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

impl Command {
    /// How `run` logs; the other commands log plain text.
    pub fn log_format(&self) -> LogFormat {
        match self {
            Command::Run { log_format, .. } => *log_format,
            _ => LogFormat::Text,
        }
    }
}

/// Runs a parsed command and says how the process exits. `check` runs without an async
/// runtime; the other commands run on a small one and report their error, with its
/// causes, here.
pub fn execute(command: &Command) -> ExitCode {
    if let Command::Check { config } = command {
        return check(config);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(dispatch(command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: &Command) -> anyhow::Result<()> {
    match command {
        Command::Run {
            config, replace, ..
        } => crate::run::run(config, *replace).await,
        Command::Detach {
            config,
            keep_sessions,
        } => detach(config, *keep_sessions).await,
        Command::Reload { target } => reload(target).await,
        Command::Events { target, json } => events(target, *json).await,
        Command::Session { target, command } => session(target, command).await,
        Command::Stats { target, json } => stats(target, *json).await,
        Command::Check { .. } => unreachable!("execute runs check without a runtime"),
    }
}

/// Where the running agent listens.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// The agent's API socket [default: the config's api_socket, else /run/sessiongate/api.sock].
    #[arg(long, env = "SESSIONGATE_SOCKET", global = true)]
    socket: Option<PathBuf>,
    /// Read the API socket path from this config.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Record an authentication: starts the device's session, or resets its timer.
    Login {
        /// The device's address (an IPv4-mapped IPv6 address is its IPv4 address).
        #[arg(value_parser = input::parse_device)]
        ip: IpAddr,
        /// Who authenticated (for example an email address).
        #[arg(long)]
        user: String,
        /// The identity provider (a device re-authenticates only through the one it enrolled with).
        #[arg(long)]
        idp: Option<String>,
        /// When the authentication happened (RFC 3339); default now.
        #[arg(long)]
        at: Option<String>,
    },
    /// End a device's session and its binding to a user.
    Logout {
        /// The device's address (an IPv4-mapped IPv6 address is its IPv4 address).
        #[arg(value_parser = input::parse_device)]
        ip: IpAddr,
    },
    /// Load sessions in bulk from a file: JSON lines ({"ip", "user", "idp", "authenticated_at"})
    /// or CSV (ip,user,idp,authenticated_at). A file with a bad line imports nothing.
    Import {
        file: PathBuf,
        /// Import the good lines of a file with bad ones (which are reported).
        #[arg(long)]
        skip_bad: bool,
    },
    /// List every session.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a session's age and which policies it currently satisfies.
    Show {
        /// The device's address (an IPv4-mapped IPv6 address is its IPv4 address).
        #[arg(value_parser = input::parse_device)]
        ip: IpAddr,
        #[arg(long)]
        json: bool,
    },
}

impl Target {
    fn socket(&self) -> anyhow::Result<PathBuf> {
        if let Some(socket) = &self.socket {
            return Ok(socket.clone());
        }
        if let Some(path) = &self.config {
            return Ok(Config::load(path)?.agent.api_socket);
        }
        let default_config = Path::new(DEFAULT_CONFIG);
        if default_config.exists() {
            return Ok(Config::load(default_config)?.agent.api_socket);
        }
        Ok(PathBuf::from(DEFAULT_SOCKET))
    }
}

/// `sessiongate check`.
fn check(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            errln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let table = match policy::compile(&config) {
        Ok(t) => t,
        Err(e) => {
            errln!("error: config {}: {e}", config.source);
            return ExitCode::FAILURE;
        }
    };
    // What `run` reads besides the config, short of binding its listeners.
    if let (Some(_), Some(path)) = (config.agent.api_listen, &config.agent.api_token_file)
        && let Err(e) = crate::api::auth::read_token(path)
    {
        errln!("error: config {}: {e:#}", config.source);
        return ExitCode::FAILURE;
    }
    outln!("config {} is valid", config.source);
    crate::output::write_or_exit(
        &mut std::io::stdout().lock(),
        format_args!("{}", policy::describe(&config, &table)),
    );
    let warnings = policy::lint(&config, &table);
    for w in &warnings {
        errln!("warning: {w}");
    }
    ExitCode::SUCCESS
}

async fn session(target: &Target, command: &SessionCommand) -> anyhow::Result<()> {
    let client = ApiClient::new(&target.socket()?);
    match command {
        SessionCommand::Login { ip, user, idp, at } => {
            let body = serde_json::to_value(LoginBody {
                ip: ip.to_string(),
                user: user.clone(),
                idp: idp.clone(),
                at: at.clone(),
            })?;
            let view: SessionView = decode(
                client
                    .call(Method::POST, "/v1/sessions", Some(body))
                    .await?,
            )?;
            outln!(
                "{} logged in as {} (IdP {}), authenticated at {}, session age {}",
                view.ip,
                printable(&view.user),
                printable(&view.idp),
                view.authenticated_at,
                view.age
            );
        }
        SessionCommand::Logout { ip } => {
            let view: SessionView = decode(
                client
                    .call(Method::DELETE, &format!("/v1/sessions/{ip}"), None)
                    .await?,
            )?;
            outln!("{} logged out (was {})", view.ip, printable(&view.user));
        }
        SessionCommand::Import { file, skip_bad } => {
            import(&client, file, *skip_bad).await?;
        }
        SessionCommand::List { json } => {
            let value = client.get("/v1/sessions").await?;
            if *json {
                outln!("{}", serde_json::to_string_pretty(&value)?);
                return Ok(());
            }
            let sessions: Vec<SessionView> = decode(value)?;
            outln!(
                "{:<40} {:<30} {:<12} {:<26} AGE",
                "DEVICE",
                "USER",
                "IDP",
                "AUTHENTICATED AT"
            );
            for s in sessions {
                outln!(
                    "{:<40} {:<30} {:<12} {:<26} {}",
                    s.ip,
                    printable(&s.user),
                    printable(&s.idp),
                    s.authenticated_at,
                    s.age
                );
            }
        }
        SessionCommand::Show { ip, json } => {
            let value = client.get(&format!("/v1/sessions/{ip}")).await?;
            if *json {
                outln!("{}", serde_json::to_string_pretty(&value)?);
                return Ok(());
            }
            let detail: SessionDetail = decode(value)?;
            let s = &detail.session;
            outln!("device            {}", s.ip);
            outln!("user              {}", printable(&s.user));
            outln!("idp               {}", printable(&s.idp));
            outln!("authenticated at  {} (age {})", s.authenticated_at, s.age);
            if detail.policies.is_empty() {
                outln!("no policy checks sessions");
            }
            for p in &detail.policies {
                let standing = if p.satisfied {
                    format!("satisfied, {} left", p.margin)
                } else {
                    format!("EXPIRED {} ago: re-authentication required", p.margin)
                };
                outln!(
                    "policy {:<30} needs <= {:<12} {standing}",
                    format!("{:?}", p.policy),
                    p.duration
                );
            }
        }
    }
    Ok(())
}

async fn stats(target: &Target, json: bool) -> anyhow::Result<()> {
    let client = ApiClient::new(&target.socket()?);
    let value = client.get("/v1/stats").await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let stats: Stats = decode(value)?;
    outln!(
        "interfaces: {}",
        stats
            .interfaces
            .iter()
            .map(|(i, m)| format!("{i} ({m})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    outln!(
        "sessions: {}   tracked UDP flows: {}",
        stats.sessions,
        stats.udp_flows
    );
    outln!("store: {}", describe_store(&stats.store));
    for (name, value) in stats
        .verdicts
        .iter()
        .chain(&stats.events)
        .chain(&stats.replies)
    {
        outln!("  {name:<26} {value}");
    }
    for (name, drops) in &stats.policy_drops {
        outln!("  policy {:<30} {drops} refused", format!("{name:?}"));
    }
    Ok(())
}

/// One line on the session store: kind, and for etcd whether it is followed.
fn describe_store(store: &StoreStatus) -> String {
    if store.kind != "etcd" {
        return store.kind.clone();
    }
    let since = store
        .since
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    let state = if store.connected {
        format!("connected since {since}")
    } else {
        format!(
            "UNREACHABLE since {since} (enforcing the last sessions known; logins fail while no member answers): {}",
            store.last_error.as_deref().unwrap_or("not connected yet")
        )
    };
    format!(
        "etcd {} {state}; revision {}, {} disconnect(s), {} full resync(s), {} bad entr(ies), {} lost race(s)",
        store.endpoints.join(","),
        store.revision,
        store.disconnects,
        store.resyncs,
        store.bad_entries,
        store.lost_races
    )
}

/// `sessiongate session import`: uploads the file with a progress bar; the agent
/// validates every line and applies all of it (or, with `--skip-bad`, the good lines).
async fn import(client: &ApiClient, file: &Path, skip_bad: bool) -> anyhow::Result<()> {
    let data = input::file::read_bounded(file, MAX_IMPORT_BODY as u64, Accept::RegularFileOrPipe)
        .with_context(|| format!("cannot read {}", file.display()))?
        .bytes;
    let bar = indicatif::ProgressBar::new(data.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {elapsed}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message("uploading");
    let progress = bar.clone();
    let path = format!("/v1/sessions/import?skip_bad={skip_bad}");
    let pending = client.upload(&path, data.into(), move |sent| {
        progress.set_position(sent);
        if sent == progress.length().unwrap_or(0) {
            progress.set_message("applying");
        }
    });
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let result = pending.await;
    bar.finish_and_clear();
    let print_errors = |errors: &Value| {
        for e in errors.as_array().into_iter().flatten() {
            errln!(
                "{}:{}: {}",
                file.display(),
                e["line"],
                e["message"].as_str().unwrap_or("?")
            );
        }
    };
    match result {
        Ok(value) => {
            let report: ImportReport = decode(value.clone())?;
            print_errors(&value["errors"]);
            outln!(
                "imported {} sessions from {} ({} new devices, {} reset){}",
                report.imported,
                file.display(),
                report.new_devices,
                report.reset_devices,
                if report.skipped_lines > 0 {
                    format!("; skipped {} bad lines", report.skipped_lines)
                } else {
                    String::new()
                }
            );
            Ok(())
        }
        Err(ClientError::Api {
            code,
            message,
            body,
            ..
        }) if code == "import_rejected" => {
            print_errors(&body["errors"]);
            let shown = body["errors"].as_array().map_or(0, Vec::len);
            let total = body["error_count"].as_u64().unwrap_or(0) as usize;
            if total > shown {
                errln!("... and {} more", total - shown);
            }
            anyhow::bail!("{}: {message}", file.display())
        }
        Err(e) => Err(e.into()),
    }
}

/// `sessiongate reload`.
async fn reload(target: &Target) -> anyhow::Result<()> {
    let client = ApiClient::new(&target.socket()?);
    match client.call(Method::POST, "/v1/reload", None).await {
        Ok(value) => {
            let done: Reloaded = decode(value)?;
            outln!(
                "reloaded: generation {}, {} policies, {} prefixes",
                done.generation,
                done.policies,
                done.prefixes
            );
            for w in &done.warnings {
                errln!("warning: {w}");
            }
            Ok(())
        }
        Err(ClientError::Api { code, message, .. }) if code == "reload_rejected" => {
            anyhow::bail!("{message}")
        }
        Err(e) => Err(e.into()),
    }
}

/// `sessiongate events`: one line per refusal until interrupted.
async fn events(target: &Target, json: bool) -> anyhow::Result<()> {
    let client = ApiClient::new(&target.socket()?);
    client
        .stream_lines("/v1/events/stream", |line| {
            // Blank lines are the stream's keep-alives.
            if line.trim().is_empty() {
                return;
            }
            if json {
                outln!("{line}");
                return;
            }
            match serde_json::from_str::<Refusal>(line) {
                Ok(r) => outln!("{}", events::describe(&r)),
                Err(_) => outln!("{line}"),
            }
        })
        .await?;
    Ok(())
}

/// `sessiongate detach`.
async fn detach(config_path: &Path, keep_sessions: bool) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let agent = &config.agent;
    if ApiClient::new(&agent.api_socket)
        .get("/v1/health")
        .await
        .is_ok()
    {
        anyhow::bail!(
            "an agent is running on {}; stop it first (systemctl stop sessiongate)",
            agent.api_socket.display()
        );
    }
    let removed = crate::datapath::remove_pins(&agent.pin_dir)?;
    if removed.is_empty() {
        outln!("no pinned datapath under {}", agent.pin_dir.display());
    }
    for dir in removed {
        outln!("removed {} (the program is detached)", dir.display());
    }
    if agent.portal_listen.is_some() {
        crate::portal::routing::remove();
        outln!("removed the portal's policy routing");
    }
    // The per-policy refusal counts belong to the datapath just removed.
    let mut gone = vec![
        agent.api_socket.clone(),
        agent.state_dir.join(crate::drops::FILE_NAME),
    ];
    if !keep_sessions {
        gone.extend(crate::sessions::state_files(&agent.state_dir));
    }
    for path in gone {
        match std::fs::remove_file(&path) {
            Ok(()) => outln!("removed {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => anyhow::bail!("cannot remove {}: {e}", path.display()),
        }
    }
    if !keep_sessions {
        // Only if nothing else lives there.
        let _ = std::fs::remove_dir(&agent.state_dir);
    }
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(value: Value) -> anyhow::Result<T> {
    serde_json::from_value(value).context("unexpected reply from the agent")
}
