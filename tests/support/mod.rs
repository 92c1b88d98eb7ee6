//! Shared by the tests in this folder. Each test file includes only what it uses.
#![allow(dead_code, reason = "each test crate uses a different part")]

pub mod packets;

pub use netlab::privileged;
