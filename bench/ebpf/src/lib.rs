//! Empty on purpose: the programs are the `bench` binary target. This library target
//! only lets the benchmark declare a build dependency on this crate.
#![no_std]
