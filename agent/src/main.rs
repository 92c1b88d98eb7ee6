use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;
use sessiongate::{
    cli::{self, Cli, Command, LogFormat},
    errln,
    output::OneLine,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Run { log_format, .. } => *log_format,
        _ => LogFormat::Text,
    };
    init_logging(log_format);
    if let Command::Check { config } = &cli.command {
        return cli::check(config);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Run {
                config, replace, ..
            } => sessiongate::run::run(config, *replace).await,
            Command::Detach {
                config,
                keep_sessions,
            } => cli::detach(config, *keep_sessions).await,
            Command::Reload { target } => cli::reload(target).await,
            Command::Events { target, json } => cli::events(target, *json).await,
            Command::Session { target, command } => cli::session(target, command).await,
            Command::Stats { target, json } => cli::stats(target, *json).await,
            Command::Check { .. } => unreachable!("handled above"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("SESSIONGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(move || OneLine::new(std::io::stderr(), ansi))
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
