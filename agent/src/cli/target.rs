//! The running agent a command talks to: where its API socket is, and reading its replies.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde_json::Value;

use super::args::{DEFAULT_CONFIG, Target};
use crate::{api::client::ApiClient, config::Config, outln};

const DEFAULT_SOCKET: &str = "/run/sessiongate/api.sock";

impl Target {
    /// A client of the agent listening on this target's socket.
    pub(super) fn client(&self) -> anyhow::Result<ApiClient> {
        Ok(ApiClient::new(&self.socket()?))
    }

    /// `--socket`, else the config's `api_socket`, else the default socket.
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

/// Reads a reply of the agent as `T`.
pub(super) fn decode<T: serde::de::DeserializeOwned>(value: Value) -> anyhow::Result<T> {
    serde_json::from_value(value).context("unexpected reply from the agent")
}

/// Prints a reply of the agent as it came, in indented JSON.
pub(super) fn print_json(value: &Value) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
