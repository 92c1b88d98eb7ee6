//! The control API (server, on the agent's unix socket) and its client (the CLI).

pub mod auth;
pub mod client;
pub mod metrics;
pub mod server;
