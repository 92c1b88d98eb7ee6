//! Per-packet cost of the XDP program, through BPF_PROG_TEST_RUN: the kernel runs the
//! loaded program on one packet `repeat` times; the mean time per run is taken from this
//! thread's CPU time over the call (`time`). Each
//! path is measured against the do-nothing program (the method's floor) interleaved in
//! the same run, and against xdp-filter on the same packet.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::atomic::{AtomicUsize, Ordering},
    time::Instant,
};

use agent_common::{
    maps::{FlowKeyV4, IPPROTO_UDP, Session},
    verdict::Verdict,
};
use anyhow::{Context as _, ensure};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use netlab::packets::{ETH_8021Q, Packet, TCP_ACK};
use serde::Serialize;
use sessiongate::{
    clock::boot_now_ns,
    config::{Config, Limits},
    datapath::Datapath,
    policy,
};

use crate::{
    programs::BenchPrograms,
    scenario::{self, APP, APP6, EXPIRED_AGE_SECS, RESOLVER, UNPROTECTED},
    stats::Sample,
    xdp_filter::XdpFilter,
};

/// A table size the paths are measured at.
#[derive(Clone, Debug, Serialize)]
pub struct Size {
    pub label: String,
    pub sessions: usize,
    pub cidrs: usize,
    pub flows: usize,
}

pub fn sizes(quick: bool) -> Vec<Size> {
    let size = |sessions: usize, cidrs: usize, flows: usize| Size {
        label: format!("{} sessions, {} CIDRs", human(sessions), human(cidrs)),
        sessions,
        cidrs,
        flows,
    };
    if quick {
        return vec![size(1_000, 10, 1_000)];
    }
    vec![
        size(1_000, 10, 1_000),
        size(1_000, 10_000, 1_000),
        size(1_000_000, 10, 1_000_000),
        size(1_000_000, 10_000, 1_000_000),
    ]
}

pub fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

/// One packet path through the program.
struct PathCase {
    name: &'static str,
    packet: Vec<u8>,
    /// The verdict the packet must get: checked before timing, so a benchmark never
    /// measures a different path than it names.
    verdict: Verdict,
    /// A new UDP flow on every run: the flow table's idle timeout is set to zero so the
    /// flow admitted by one run is judged again, as new, by the next.
    renew_flow: bool,
    /// Counts towards the "new-flow paths" target.
    new_flow: bool,
    /// With `notify_before` set: admitted flows check their use-report slot.
    report_use: bool,
}

const TRACKED_SPORT: u16 = 40_000;
const NEW_SPORT: u16 = 40_001;
const APP_UDP_PORT: u16 = 4433;

fn paths() -> Vec<PathCase> {
    let fresh = IpAddr::V4(scenario::FRESH_DEVICE);
    let expired = IpAddr::V4(scenario::EXPIRED_DEVICE);
    let fresh6 = IpAddr::V6(scenario::FRESH_DEVICE6);
    let expired6 = IpAddr::V6(scenario::EXPIRED_DEVICE6);
    let (app, app6) = (IpAddr::V4(APP), IpAddr::V6(APP6));
    let case = |name, packet: Packet, verdict, renew_flow, new_flow| PathCase {
        name,
        packet: packet.bytes(),
        verdict,
        renew_flow,
        new_flow,
        report_use: false,
    };
    let vlan = |p: Packet| p.vlan(ETH_8021Q);
    vec![
        case(
            "TCP established",
            Packet::tcp(fresh, app, 443, TCP_ACK),
            Verdict::PassedEstablished,
            false,
            false,
        ),
        case(
            ADMITTED_SYN,
            Packet::syn(fresh, app, 443),
            Verdict::AdmittedNewFlow,
            false,
            true,
        ),
        PathCase {
            report_use: true,
            ..case(
                "TCP SYN, valid, notify_before set",
                Packet::syn(fresh, app, 443),
                Verdict::AdmittedNewFlow,
                false,
                true,
            )
        },
        case(
            "TCP SYN, identity-decided, valid",
            Packet::syn(fresh, IpAddr::V4(scenario::IDENTITY_APP), 443),
            Verdict::AdmittedNewFlow,
            false,
            true,
        ),
        case(
            "TCP SYN, identity-decided, expired",
            Packet::syn(expired, IpAddr::V4(scenario::IDENTITY_APP), 443),
            Verdict::DroppedExpired,
            false,
            true,
        ),
        case(
            REFUSED_SYN,
            Packet::syn(expired, app, 443),
            Verdict::DroppedExpired,
            false,
            true,
        ),
        case(
            "UDP, tracked flow",
            Packet::udp(fresh, app, TRACKED_SPORT, APP_UDP_PORT),
            Verdict::PassedEstablished,
            false,
            false,
        ),
        case(
            "UDP, new flow",
            Packet::udp(fresh, app, NEW_SPORT, APP_UDP_PORT),
            Verdict::AdmittedNewFlow,
            true,
            true,
        ),
        case(
            "DNS (UDP 53)",
            Packet::udp(expired, IpAddr::V4(RESOLVER), 5353, 53),
            Verdict::PassedDns,
            false,
            false,
        ),
        case(
            "no policy (TCP SYN)",
            Packet::syn(fresh, IpAddr::V4(UNPROTECTED), 443),
            Verdict::PassedNoPolicy,
            false,
            false,
        ),
        case(
            "IPv6 TCP SYN, valid",
            Packet::syn(fresh6, app6, 443),
            Verdict::AdmittedNewFlow,
            false,
            true,
        ),
        case(
            "IPv6 TCP SYN, expired",
            Packet::syn(expired6, app6, 443),
            Verdict::DroppedExpired,
            false,
            true,
        ),
        case(
            "IPv6 UDP, new flow",
            Packet::udp(fresh6, app6, NEW_SPORT, APP_UDP_PORT),
            Verdict::AdmittedNewFlow,
            true,
            true,
        ),
        case(
            "VLAN TCP SYN, valid",
            vlan(Packet::syn(fresh, app, 443)),
            Verdict::AdmittedNewFlow,
            false,
            true,
        ),
        case(
            "VLAN TCP SYN, expired",
            vlan(Packet::syn(expired, app, 443)),
            Verdict::DroppedExpired,
            false,
            true,
        ),
        case(
            "VLAN UDP, new flow",
            vlan(Packet::udp(fresh, app, NEW_SPORT, APP_UDP_PORT)),
            Verdict::AdmittedNewFlow,
            true,
            true,
        ),
    ]
}

#[derive(Clone, Debug, Serialize)]
pub struct PathResult {
    pub path: String,
    pub size: String,
    pub new_flow: bool,
    /// ns per packet.
    pub sessiongate: Sample,
    pub floor: Sample,
    /// sessiongate / floor, each run's pair measured back to back, so that drift of
    /// the shared machine cancels out.
    pub ratio: Sample,
    pub xdp_filter: Option<Sample>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProgRunReport {
    pub repeat: u32,
    pub runs: usize,
    pub sizes: Vec<Size>,
    pub results: Vec<PathResult>,
    /// Seconds to fill each size's tables (sessions, flows, policies), for the record.
    pub fill_seconds: Vec<(String, f64)>,
    /// The refusal path's parts, each measured alone on the refused IPv4 SYN.
    pub refusal_parts: Vec<PartResult>,
    /// Timed calls, and those for which `time` used the kernel's figure.
    pub measurements: usize,
    pub kernel_figures: usize,
}

/// One part of the refusal path as its own program (`BenchPrograms::refusal_parts`).
#[derive(Clone, Debug, Serialize)]
pub struct PartResult {
    pub part: String,
    /// ns above the floor, each run's pair measured back to back.
    pub above_floor_ns: Sample,
}

pub fn run(
    quick: bool,
    programs: &BenchPrograms,
    xdp_filter: Option<&XdpFilter>,
) -> anyhow::Result<ProgRunReport> {
    let (repeat, runs) = if quick { (10_000, 3) } else { (1_000_000, 9) };
    let mut report = ProgRunReport {
        repeat,
        runs,
        sizes: sizes(quick),
        results: Vec::new(),
        fill_seconds: Vec::new(),
        refusal_parts: Vec::new(),
        measurements: 0,
        kernel_figures: 0,
    };
    let counted_before = (
        MEASUREMENTS.load(Ordering::Relaxed),
        KERNEL_FIGURES_USED.load(Ordering::Relaxed),
    );
    for size in report.sizes.clone() {
        eprintln!("bench: per-packet cost at {}", size.label);
        let started = Instant::now();
        let mut bench = Loaded::new(&size)?;
        report
            .fill_seconds
            .push((size.label.clone(), started.elapsed().as_secs_f64()));
        // Warm caches and clocks before the first timed path.
        for path in paths() {
            bench.check_verdict(&path)?;
            bench.measure(&path, repeat)?;
        }
        for path in paths() {
            bench.check_verdict(&path)?;
            let mut ours = Vec::with_capacity(runs);
            let mut floor = Vec::with_capacity(runs);
            let mut ratio = Vec::with_capacity(runs);
            for _ in 0..runs {
                let f = time(programs.floor(), &path.packet, repeat)?;
                let o = bench.measure(&path, repeat)?;
                floor.push(f);
                ours.push(o);
                ratio.push(o / f);
            }
            let xdp_filter = match xdp_filter {
                Some(xf) => Some(Sample::of(
                    &(0..runs)
                        .map(|_| time(xf.program(), &path.packet, repeat))
                        .collect::<anyhow::Result<Vec<_>>>()?,
                )),
                None => None,
            };
            report.results.push(PathResult {
                path: path.name.to_string(),
                size: size.label.clone(),
                new_flow: path.new_flow,
                sessiongate: Sample::of(&ours),
                floor: Sample::of(&floor),
                ratio: Sample::of(&ratio),
                xdp_filter,
            });
        }
    }
    let refused = paths()
        .into_iter()
        .find(|p| p.name == REFUSED_SYN)
        .expect("the refused SYN is a benchmark path")
        .packet;
    for (program, part) in programs.refusal_parts() {
        time(program, &refused, repeat)?;
        let above = (0..runs)
            .map(|_| {
                let f = time(programs.floor(), &refused, repeat)?;
                Ok(time(program, &refused, repeat)? - f)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        report.refusal_parts.push(PartResult {
            part: part.to_string(),
            above_floor_ns: Sample::of(&above),
        });
    }
    report.measurements = MEASUREMENTS.load(Ordering::Relaxed) - counted_before.0;
    report.kernel_figures = KERNEL_FIGURES_USED.load(Ordering::Relaxed) - counted_before.1;
    Ok(report)
}

/// The path whose parts `refusal_parts` measures, and the admitted one it differs from.
pub const REFUSED_SYN: &str = "TCP SYN, expired (refused)";
pub const ADMITTED_SYN: &str = "TCP SYN, valid session";

/// The program loaded with one size's tables.
struct Loaded {
    dp: Datapath,
    config: Config,
}

impl Loaded {
    fn new(size: &Size) -> anyhow::Result<Self> {
        let text = format!(
            "[agent]\ninterfaces = [\"bench0\"]\n{}",
            scenario::policies(size.cidrs, 7)
        );
        let config = Config::parse(&text, "bench").context("benchmark config")?;
        let table = policy::compile(&config)?;
        let limits = Limits {
            max_sessions: (size.sessions as u32).max(1024) + 1024,
            max_flows: (size.flows as u32).max(1024) + 1024,
            max_policy_cidrs: 16_384,
            max_port_rules: 65_536,
        };
        let mut dp = Datapath::load(&limits)?;
        dp.maps.apply(policy::settings(&config), &table)?;
        let mut sessions = dp.take_sessions().expect("not taken yet");
        let conditions = policy::identity_conditions(&config, &table);
        sessions
            .identities
            .set_conditions([Some(conditions.clone()), Some(conditions)]);
        let now = boot_now_ns();
        let fresh = Session {
            authenticated_at_ns: now,
            ..Session::default()
        };
        let population: Vec<_> = scenario::devices(size.sessions)
            .map(|device| (device, fresh, scenario::IDENTITY, None))
            .collect();
        sessions.load_sessions(&population)?;
        let expired = now - (EXPIRED_AGE_SECS * 1_000_000_000) as i64;
        for (device, at) in [
            (IpAddr::V4(scenario::FRESH_DEVICE), now),
            (IpAddr::V6(scenario::FRESH_DEVICE6), now),
            (IpAddr::V4(scenario::EXPIRED_DEVICE), expired),
            (IpAddr::V6(scenario::EXPIRED_DEVICE6), expired),
        ] {
            let session = Session {
                authenticated_at_ns: at,
                ..Session::default()
            };
            // In one of the 64 teams: the identity-decided paths resolve its bit.
            let groups = [scenario::BENCH_GROUP.to_string()];
            let who = sessiongate::config::Identity {
                groups: &groups,
                ..scenario::IDENTITY
            };
            sessions.set_session(device, session, &who)?;
        }
        dp.maps.track_flows_v4(flows(size.flows), now as u64)?;
        Ok(Self { dp, config })
    }

    fn check_verdict(&mut self, path: &PathCase) -> anyhow::Result<()> {
        self.set_settings(path)?;
        let before = self.dp.maps.counters()?;
        run_program(self.dp.program(), &path.packet, 1)?;
        let after = self.dp.maps.counters()?;
        let got: Vec<Verdict> = Verdict::ALL
            .into_iter()
            .filter(|v| after[v.code() as usize] != before[v.code() as usize])
            .collect();
        ensure!(
            got == [path.verdict],
            "benchmark path {:?} got verdict {got:?}, not {:?}",
            path.name,
            path.verdict
        );
        Ok(())
    }

    fn set_settings(&mut self, path: &PathCase) -> anyhow::Result<()> {
        let mut s = policy::settings(&self.config);
        if path.renew_flow {
            s.udp_idle_ns = 0;
        }
        s.report_use = u16::from(path.report_use);
        self.dp.maps.write_raw_settings(s)?;
        Ok(())
    }

    fn measure(&mut self, path: &PathCase, repeat: u32) -> anyhow::Result<f64> {
        self.set_settings(path)?;
        time(self.dp.program(), &path.packet, repeat)
    }
}

/// `n` tracked flows from the device population to the app, plus the one the
/// "tracked flow" path sends.
fn flows(n: usize) -> impl Iterator<Item = FlowKeyV4> {
    let key = |saddr: Ipv4Addr, sport: u16| FlowKeyV4 {
        saddr: saddr.into(),
        daddr: APP.into(),
        sport,
        dport: APP_UDP_PORT,
        proto: IPPROTO_UDP,
        _pad: [0; 3],
    };
    let tracked = key(scenario::FRESH_DEVICE, TRACKED_SPORT);
    (0..n.saturating_sub(1))
        .map(move |i| {
            let device = Ipv4Addr::from(0xc612_0000u32 + (i as u32 % (1 << 17)));
            key(device, 1024 + (i / (1 << 17)) as u16)
        })
        .chain(std::iter::once(tracked))
}

/// Mean ns per run of `program` on `packet`, over `repeat` runs in the kernel.
///
/// The kernel's own figure is whole nanoseconds per run, truncated: at 5-25 ns per run
/// that alone moves a ratio by up to 20 %. This is the calling thread's CPU time over
/// the call instead, less that of a call of two runs made right after it: a call of
/// more than one run costs a fixed 0.2-0.6 ms besides its runs (the kernel switches
/// its XDP dispatcher to the program and back), which would otherwise add up to half
/// a nanosecond per run. Time the thread spends descheduled counts in neither.
pub fn time(program: &Xdp, packet: &[u8], repeat: u32) -> anyhow::Result<f64> {
    MEASUREMENTS.fetch_add(1, Ordering::Relaxed);
    let (spent, kernel) = thread_cpu_ns_over(|| run_program(program, packet, repeat))?;
    let (fixed, _) = thread_cpu_ns_over(|| run_program(program, packet, 2))?;
    let mean = spent.saturating_sub(fixed) as f64 / f64::from(repeat - 2);
    let kernel = kernel.as_nanos() as f64;
    // Far from the kernel's figure, the thread's clock measured something other than
    // the runs: the kernel's figure is then the one used.
    if mean < kernel - 0.5 || mean > kernel + 1.5 {
        KERNEL_FIGURES_USED.fetch_add(1, Ordering::Relaxed);
        return Ok(kernel);
    }
    Ok(mean)
}

/// Measurements for which `time` fell back to the kernel's figure (in a quick run's
/// short calls, the fixed cost's spread alone is more than a nanosecond per run).
static KERNEL_FIGURES_USED: AtomicUsize = AtomicUsize::new(0);
static MEASUREMENTS: AtomicUsize = AtomicUsize::new(0);

/// Runs `program` on `packet` `repeat` times; the kernel's mean time per run.
fn run_program(program: &Xdp, packet: &[u8], repeat: u32) -> anyhow::Result<std::time::Duration> {
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(packet),
            repeat,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    Ok(result.duration)
}

/// This thread's CPU time over `f`, in nanoseconds, and what `f` returned.
fn thread_cpu_ns_over<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(u64, T)> {
    let started = thread_cpu_ns();
    let value = f()?;
    Ok((thread_cpu_ns() - started, value))
}

/// This thread's CPU time, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}
