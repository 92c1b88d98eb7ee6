use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;
use sessiongate::{
    cli::{self, Cli, LogFormat},
    output::OneLine,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.command.log_format());
    cli::execute(&cli.command)
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
