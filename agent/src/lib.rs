//! sessiongate's agent: configuration, policy compilation, the kernel datapath's maps,
//! device sessions, the control API, re-authentication prompts and the portal, and the CLI.

pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod datapath;
pub mod drops;
pub mod events;
pub mod expiry;
pub mod fleet;
pub mod input;
pub mod listen;
pub mod memory;
pub mod notify;
pub mod output;
pub mod policy;
pub mod portal;
pub mod run;
pub mod sessions;
pub mod signin;
pub mod wire;
