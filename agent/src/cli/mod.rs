//! The `sessiongate` command line: `run` and `check` work on a config file; `session`
//! and `stats` talk to a running agent through its API socket.
//!
//! `args` defines the command line, one file per subcommand group does its work, and
//! `target` finds the running agent's socket and reads its replies.

use std::process::ExitCode;

use crate::errln;

mod args;
mod check;
mod detach;
mod events;
mod reload;
mod session;
mod stats;
mod target;

pub use args::{Cli, Command, LogFormat, SessionCommand, Target};

/// Runs a parsed command and says how the process exits. `check` runs without an async
/// runtime; the other commands run on a small one and report their error, with its
/// causes, here.
pub fn execute(command: &Command) -> ExitCode {
    if let Command::Check { config } = command {
        return check::execute(config);
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
        } => detach::execute(config, *keep_sessions).await,
        Command::Reload { target } => reload::execute(target).await,
        Command::Events { target, json } => events::execute(target, *json).await,
        Command::Session { target, command } => session::execute(target, command).await,
        Command::Stats { target, json } => stats::execute(target, *json).await,
        Command::Check { .. } => unreachable!("execute runs check without a runtime"),
    }
}
