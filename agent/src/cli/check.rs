//! `sessiongate check`: validates a config and prints what it compiles to.

use std::{path::Path, process::ExitCode};

use crate::{config::Config, errln, outln, policy};

/// `sessiongate check`.
pub(super) fn execute(path: &Path) -> ExitCode {
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
