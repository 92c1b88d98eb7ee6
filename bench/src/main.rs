//! `cargo xtask bench`: measures sessiongate against the limit of the method and
//! against its peers, and writes a report with charts under `target/bench/`.
//!
//! - per-packet cost of the XDP program through BPF_PROG_TEST_RUN (`progrun`), against
//!   a do-nothing program and xdp-filter;
//! - end to end with a packet generator, against nftables and no filtering (`flood`);
//! - control-plane speed and memory (`control`), login to enforcement included, by the
//!   agent that took the login and by another agent sharing sessions through etcd.
//!
//! Needs root, and measures best on an otherwise idle machine.

mod cmd;
mod control;
mod flood;
mod programs;
mod progrun;
mod report;
mod scenario;
mod signin;
mod stats;
mod svg;
mod xdp_filter;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Parser;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    PerPacket,
    EndToEnd,
    Control,
    /// Only the control part's concurrent login rate.
    Logins,
    /// Signing in at the portal with a real OpenID provider.
    Signin,
}

#[derive(Parser)]
#[command(about = "Benchmark sessiongate")]
struct Args {
    /// A short smoke run: small tables, few repetitions; checks the harness, not speed.
    #[arg(long)]
    quick: bool,
    /// Where the report goes.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Run only these parts (default: all); the report then leaves the others out.
    #[arg(long, value_enum)]
    part: Vec<Part>,
    /// The `sessiongate` binary the end-to-end and control-plane parts run [default:
    /// the one next to this binary].
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Consecutive runs of the chosen parts. With more than one, each run's report goes
    /// to `run-N/` under the output directory, and `report.md` sets their targets side
    /// by side: a target counts as met only if every run met it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10))]
    runs: u32,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let agent = match args.agent.clone() {
        Some(path) => path,
        None => std::env::current_exe()?
            .parent()
            .context("no binary directory")?
            .join("sessiongate"),
    };
    anyhow::ensure!(
        agent.is_file(),
        "no sessiongate binary at {}; build it first (cargo xtask bench does)",
        agent.display()
    );
    let machine = report::Machine::describe();
    let command = if args.quick {
        "cargo xtask bench --quick"
    } else {
        "cargo xtask bench"
    };
    let mut programs = programs::BenchPrograms::load()?;
    let mut reports = Vec::new();
    for run in 1..=args.runs {
        if args.runs > 1 {
            println!("bench: run {run} of {}", args.runs);
        }
        let report = run_once(&args, &agent, &machine, &mut programs)?;
        if args.runs > 1 {
            report.write(&args.out.join(format!("run-{run}")), command)?;
        }
        reports.push(report);
    }
    let summary = match reports.as_slice() {
        [one] => one.write(&args.out, command)?,
        runs => report::write_runs(runs, &args.out, command)?,
    };
    println!("{summary}");
    println!("report: {}", args.out.join("report.md").display());
    Ok(())
}

/// One run of the chosen parts.
fn run_once(
    args: &Args,
    agent: &Path,
    machine: &report::Machine,
    programs: &mut programs::BenchPrograms,
) -> anyhow::Result<report::Report> {
    pin_to_cpu(0);
    let xdp_filter = match xdp_filter::XdpFilter::load() {
        Ok(xf) => Some(xf),
        Err(e) => {
            eprintln!("bench: the xdp-filter reference is unavailable: {e:#}");
            None
        }
    };
    let wanted = |part| args.part.is_empty() || args.part.contains(&part);
    let per_packet = wanted(Part::PerPacket)
        .then(|| progrun::run(args.quick, programs, xdp_filter.as_ref()))
        .transpose()?;
    drop(xdp_filter);
    let end_to_end = wanted(Part::EndToEnd)
        .then(|| flood::run(args.quick, programs, agent))
        .transpose()?;
    // The agents, etcd and the CLI the remaining parts start inherit this thread's
    // CPUs: they get every CPU, as in production (pinned, a million-session start ran
    // on one CPU and took twice as long).
    unpin();
    let control = wanted(Part::Control)
        .then(|| control::run(args.quick, agent))
        .transpose()?;
    // The control part measures it too.
    let logins = (control.is_none() && wanted(Part::Logins))
        .then(|| control::login_rate(args.quick, agent))
        .transpose()?;
    let signin = wanted(Part::Signin)
        .then(|| signin::run(args.quick, agent))
        .transpose()?;
    Ok(report::Report {
        quick: args.quick,
        machine: machine.clone(),
        per_packet,
        end_to_end,
        control,
        logins,
        signin,
    })
}

/// Keeps the calling thread on one CPU: BPF_PROG_TEST_RUN runs where it is called.
fn pin_to_cpu(cpu: usize) {
    pin_to_cpu_pid(0, cpu);
}

/// Lets the calling thread (and what it starts) run on every CPU again.
fn unpin() {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        // Not `available_parallelism`: it counts the CPUs this thread is pinned to.
        let cpus = usize::try_from(libc::sysconf(libc::_SC_NPROCESSORS_ONLN)).unwrap_or(1);
        for cpu in 0..cpus.clamp(1, libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Keeps a thread (0: the calling one) on one CPU.
fn pin_to_cpu_pid(pid: i32, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid, size_of::<libc::cpu_set_t>(), &set);
    }
}
