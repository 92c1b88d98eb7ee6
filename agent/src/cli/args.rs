//! What the command line accepts: the clap definitions of every command and option.

use std::{net::IpAddr, path::PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

use crate::input;

pub(super) const DEFAULT_CONFIG: &str = "/etc/sessiongate/sessiongate.toml";

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

/// Where the running agent listens.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// The agent's API socket [default: the config's api_socket, else /run/sessiongate/api.sock].
    #[arg(long, env = "SESSIONGATE_SOCKET", global = true)]
    pub(super) socket: Option<PathBuf>,
    /// Read the API socket path from this config.
    #[arg(long, short, global = true)]
    pub(super) config: Option<PathBuf>,
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
        /// A group the user is in at the identity provider (repeat for several); a new
        /// login replaces the groups.
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
    },
    /// End a device's session and its binding to a user.
    Logout {
        /// The device's address (an IPv4-mapped IPv6 address is its IPv4 address).
        #[arg(value_parser = input::parse_device)]
        ip: IpAddr,
    },
    /// Load sessions in bulk from a file: JSON lines ({"ip", "user", "idp", "authenticated_at",
    /// "groups"}) or CSV (ip,user,idp,authenticated_at[,groups], groups separated by ;). A
    /// file with a bad line imports nothing.
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
