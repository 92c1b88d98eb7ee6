//! What the sessiongate XDP program and its agent share: the layout of every map
//! (`maps`), the stable verdict and counter codes (`verdict`), and the pure decisions the
//! kernel makes on them (`logic`), kept here so they can be unit-tested on the host.
#![cfg_attr(not(any(feature = "user", test)), no_std)]

pub mod addr;
pub mod checksum;
pub mod hashing;
pub mod logic;
pub mod maps;
pub mod tables;
pub mod verdict;
