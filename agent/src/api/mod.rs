//! The control API (server, on the agent's unix socket) and its client (the CLI).

pub mod client;
pub mod server;
