//! `cargo xtask`: everything a developer or CI does with sessiongate, each command
//! doing its own set-up on a fresh machine.

mod demo;
mod fuzz;
mod setup;

use std::process::{Command, ExitCode};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, set up, demo and test sessiongate"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and tests need (idempotent): rust-src for nightly,
    /// bpf-linker in .tools/, Debian packages.
    Setup,
    /// Build the agent with its XDP program.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Show sessiongate enforcing session timeouts on live traffic in throwaway
    /// network namespaces.
    Demo,
    /// Measure per-packet cost, end-to-end throughput against nftables, control-plane
    /// speed and memory; writes target/bench/report.md with charts.
    Bench {
        /// A short smoke run that checks the harness (what CI runs), not speed.
        #[arg(long)]
        quick: bool,
        /// Extra arguments for the benchmark binary (--part per-packet, ...).
        #[arg(last = true)]
        bench_args: Vec<String>,
    },
    /// Fuzz the parsers of everything an attacker or a typo controls (config, durations,
    /// API bodies, import lines, the journal, etcd entries) with libFuzzer.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
    /// Run every check and test: formatting, clippy (host and eBPF), unit tests,
    /// BPF_PROG_TEST_RUN tests, real-traffic tests, a benchmark smoke run and a short
    /// run of each fuzz target.
    Test {
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (a test name filter, --nocapture, ...).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run_task(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_task(task: Task) -> anyhow::Result<()> {
    match task {
        Task::Setup => setup::setup(true),
        Task::Build { release } => {
            setup::setup(false)?;
            build(release)
        }
        Task::Demo => {
            setup::setup(false)?;
            build(false)?;
            demo::run()
        }
        Task::Bench { quick, bench_args } => {
            setup::setup(false)?;
            bench(quick, &bench_args)
        }
        Task::Fuzz { seconds, targets } => {
            setup::setup(false)?;
            fuzz::run(seconds, &targets)
        }
        Task::Test {
            no_lint,
            cargo_args,
        } => {
            setup::setup(false)?;
            test(no_lint, &cargo_args)
        }
    }
}

/// `cargo` with `.tools/bin` (bpf-linker) on PATH.
fn cargo() -> Command {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.env("PATH", setup::path_with_tools());
    cmd.current_dir(setup::workspace());
    cmd
}

fn run(mut cmd: Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

fn build(release: bool) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", "sessiongate"]);
    if release {
        cmd.arg("--release");
    }
    run(cmd)
}

/// Builds the agent and the benchmark in `profile` ("release" or "debug"); returns the
/// directory that holds both binaries.
fn build_bench(profile: &str) -> anyhow::Result<std::path::PathBuf> {
    let mut build = cargo();
    build.args([
        "build",
        "--package",
        "sessiongate",
        "--package",
        "sessiongate-bench",
    ]);
    if profile == "release" {
        build.arg("--release");
    }
    run(build)?;
    Ok(setup::workspace().join("target").join(profile))
}

/// Builds the agent and the benchmark in release mode and runs the benchmark.
fn bench(quick: bool, bench_args: &[String]) -> anyhow::Result<()> {
    let bin = build_bench("release")?;
    let target = setup::workspace().join("target");
    let mut bench = Command::new(bin.join("sessiongate-bench"));
    bench
        .arg("--out")
        .arg(target.join("bench"))
        .args(quick.then_some("--quick"))
        .args(bench_args);
    run(bench)
}

fn test(no_lint: bool, cargo_args: &[String]) -> anyhow::Result<()> {
    if !no_lint {
        step("formatting");
        let mut fmt = cargo();
        fmt.args(["fmt", "--all", "--", "--check"]);
        run(fmt)?;

        step("clippy (host crates)");
        let mut clippy = cargo();
        // Default members only: the eBPF crate builds for its own target, below.
        clippy.args(["clippy", "--all-targets"]);
        clippy.args(["--", "-D", "warnings"]);
        run(clippy)?;

        step("clippy (eBPF programs)");
        let mut clippy = Command::new("rustup");
        clippy
            .args(["run", "nightly", "cargo", "clippy"])
            .args(["--package", "agent-ebpf", "--package", "bench-ebpf"])
            .args([
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--release",
            ])
            .args(["--", "-D", "warnings"])
            .env("PATH", setup::path_with_tools())
            .env(
                "CARGO_TARGET_DIR",
                setup::workspace().join("target/ebpf-clippy"),
            )
            .current_dir(setup::workspace());
        run(clippy)?;
    }

    step("tests (unit, BPF_PROG_TEST_RUN, real traffic)");
    let mut test = cargo();
    test.args(["test"])
        .env("SESSIONGATE_REQUIRE_PRIVILEGED", "1")
        .args(cargo_args);
    run(test)?;

    // Only when the whole suite runs: a filtered run is someone looking at one test.
    if cargo_args.is_empty() {
        step("benchmark smoke run (checks the harness, not speed)");
        let bin = build_bench("debug")?;
        let mut smoke = Command::new(bin.join("sessiongate-bench"));
        smoke
            .args(["--quick", "--out"])
            .arg(setup::workspace().join("target/bench-smoke"))
            .arg("--agent")
            .arg(bin.join("sessiongate"));
        run(smoke)?;

        step("fuzz targets, briefly (cargo xtask fuzz runs them longer)");
        fuzz::run(FUZZ_SECONDS_IN_TEST, &[])?;
    }
    step("all tests passed");
    Ok(())
}

/// Seconds per fuzz target in `cargo xtask test`: enough to catch a parser that panics
/// on shallow input, short enough for CI.
const FUZZ_SECONDS_IN_TEST: u64 = 10;

fn step(what: &str) {
    println!("\n==> {what}");
}
