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
use serde_json::{Value, json};

use crate::{
    api::client::ApiClient,
    config::Config,
    control::{SessionDetail, SessionView, Stats},
    policy,
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
    /// Validate the config, attach the XDP program and enforce until SIGINT/SIGTERM.
    Run {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// One log line per event, as text or JSON.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
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
        /// The device's address.
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
        /// The device's address.
        ip: IpAddr,
    },
    /// List every session.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a session's age and which policies it currently satisfies.
    Show {
        /// The device's address.
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
pub fn check(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let table = match policy::compile(&config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: config {}: {e}", config.source);
            return ExitCode::FAILURE;
        }
    };
    println!("config {} is valid", config.source);
    print!("{}", policy::describe(&config, &table));
    let warnings = policy::lint(&config, &table);
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    ExitCode::SUCCESS
}

pub async fn session(target: &Target, command: &SessionCommand) -> anyhow::Result<()> {
    let client = ApiClient::new(&target.socket()?);
    match command {
        SessionCommand::Login { ip, user, idp, at } => {
            let body = json!({ "ip": ip.to_string(), "user": user, "idp": idp, "at": at });
            let view: SessionView = decode(
                client
                    .call(Method::POST, "/v1/sessions", Some(body))
                    .await?,
            )?;
            println!(
                "{} logged in as {} (IdP {}), authenticated at {}, session age {}",
                view.ip, view.user, view.idp, view.authenticated_at, view.age
            );
        }
        SessionCommand::Logout { ip } => {
            let view: SessionView = decode(
                client
                    .call(Method::DELETE, &format!("/v1/sessions/{ip}"), None)
                    .await?,
            )?;
            println!("{} logged out (was {})", view.ip, view.user);
        }
        SessionCommand::List { json } => {
            let value = client.get("/v1/sessions").await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&value)?);
                return Ok(());
            }
            let sessions: Vec<SessionView> = decode(value)?;
            println!(
                "{:<40} {:<30} {:<12} {:<26} AGE",
                "DEVICE", "USER", "IDP", "AUTHENTICATED AT"
            );
            for s in sessions {
                println!(
                    "{:<40} {:<30} {:<12} {:<26} {}",
                    s.ip, s.user, s.idp, s.authenticated_at, s.age
                );
            }
        }
        SessionCommand::Show { ip, json } => {
            let value = client.get(&format!("/v1/sessions/{ip}")).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&value)?);
                return Ok(());
            }
            let detail: SessionDetail = decode(value)?;
            let s = &detail.session;
            println!("device            {}", s.ip);
            println!("user              {}", s.user);
            println!("idp               {}", s.idp);
            println!("authenticated at  {} (age {})", s.authenticated_at, s.age);
            if detail.policies.is_empty() {
                println!("no policy checks sessions");
            }
            for p in &detail.policies {
                let standing = if p.satisfied {
                    format!("satisfied, {} left", p.margin)
                } else {
                    format!("EXPIRED {} ago: re-authentication required", p.margin)
                };
                println!(
                    "policy {:<30} needs <= {:<12} {standing}",
                    format!("{:?}", p.policy),
                    p.duration
                );
            }
        }
    }
    Ok(())
}

pub async fn stats(target: &Target, json: bool) -> anyhow::Result<()> {
    let client = ApiClient::new(&target.socket()?);
    let value = client.get("/v1/stats").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let stats: Stats = decode(value)?;
    println!(
        "interfaces: {}",
        stats
            .interfaces
            .iter()
            .map(|(i, m)| format!("{i} ({m})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "sessions: {}   tracked UDP flows: {}",
        stats.sessions, stats.udp_flows
    );
    for (name, value) in stats.verdicts.iter().chain(&stats.events) {
        println!("  {name:<26} {value}");
    }
    for (name, drops) in &stats.policy_drops {
        println!("  policy {:<30} {drops} refused", format!("{name:?}"));
    }
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(value: Value) -> anyhow::Result<T> {
    serde_json::from_value(value).context("unexpected reply from the agent")
}
