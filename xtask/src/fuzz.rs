//! `cargo xtask fuzz`: runs the targets in `fuzz/` with cargo-fuzz (libFuzzer, nightly),
//! each for a number of seconds, with the seeds in `fuzz/seeds/TARGET` and the corpus it
//! grows in `fuzz/corpus/TARGET` (not committed). A crash stops the run with the input
//! saved in `fuzz/artifacts/TARGET`.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::setup;

/// Every target, as `fuzz/Cargo.toml` names them.
pub const TARGETS: [&str; 6] = [
    "config",
    "duration",
    "api_login",
    "import_lines",
    "journal",
    "etcd_entry",
];

pub fn run(seconds: u64, only: &[String]) -> anyhow::Result<()> {
    for target in only {
        if !TARGETS.contains(&target.as_str()) {
            bail!(
                "no fuzz target {target:?}; the targets are {}",
                TARGETS.join(", ")
            );
        }
    }
    let fuzz_dir = setup::workspace().join("fuzz");
    for target in TARGETS
        .iter()
        .filter(|t| only.is_empty() || only.iter().any(|o| o == *t))
    {
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("cannot create {}", corpus.display()))?;
        let mut cmd = Command::new("rustup");
        cmd.args(["run", "nightly", "cargo", "fuzz", "run", target])
            .arg("--fuzz-dir")
            .arg(&fuzz_dir)
            // Safe Rust needs no AddressSanitizer; panics and assertions are the finds.
            .args(["--sanitizer", "none"])
            .arg(&corpus);
        let seeds = fuzz_dir.join("seeds").join(target);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // Inputs beyond a few KiB find nothing new in these parsers.
            .arg("-max_len=8192")
            .env("PATH", setup::path_with_tools())
            // The parsers need no XDP program.
            .env("AYA_BUILD_SKIP", "1")
            .env("CARGO_TARGET_DIR", setup::workspace().join("target/fuzz"))
            .current_dir(setup::workspace());
        println!("fuzz: {target} for {seconds} s");
        crate::run(cmd)?;
    }
    Ok(())
}
