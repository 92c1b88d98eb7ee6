//! Empty on purpose: the program is the `sessiongate` binary target. This library
//! target only lets the agent declare a build dependency on this crate, so that cargo
//! rebuilds the agent when the program's sources change.
#![no_std]
