//! End to end: a packet generator floods the gateway namespace, which forwards between
//! client and server, and the gateway's CPU time per packet is compared between
//! sessiongate, an expert nftables ruleset doing the same job, and no filtering.
//!
//! The generator is `xdp_generate` run with BPF_PROG_TEST_RUN in live-frames mode on
//! the client's veth: frames arrive at the gateway as a NIC would deliver them, with an
//! XDP hook. Where the kernel refuses live frames, an AF_PACKET socket feeds
//! `xdp_relay`, which redirects each frame to the client's veth: the gateway still
//! receives XDP frames, not socket buffers. Without sessiongate the hook only passes
//! (the do-nothing program), so the kernel builds socket buffers for the stack as a
//! driver would. The gateway's NAPI work runs in a kernel thread pinned to CPU 1 and
//! the generator on CPU 0, so CPU 1's busy time is the gateway's cost.

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, xdp::XdpMode};
use netlab::{APP, GATEWAY_IFACE, Lab, RawLink, packets::Packet};
use serde::Serialize;

use crate::{
    cmd::output,
    programs::{BenchPrograms, GenConfig},
    stats::Sample,
};

/// Devices whose sessions are older than the policy allows, and devices with fresh
/// sessions; both outside the lab's own client addresses.
const EXPIRED_POOL: Ipv4Addr = Ipv4Addr::new(198, 18, 16, 0);
const FRESH_POOL: Ipv4Addr = Ipv4Addr::new(198, 18, 20, 0);
const POOL_SIZE: u32 = 1024;
const POOLS: &str = "198.18.16.0/20";
/// A server port nothing listens on: admitted traffic costs the server one reply,
/// which a blackhole route then drops, so no reply traffic loads the gateway.
const SINK_PORT: u16 = 5001;
const GATEWAY_CPU: usize = 1;
const GENERATOR_CPU: usize = 0;
/// The relay's veth pair in the client namespace: frames sent on the outer end reach
/// `xdp_relay` on the inner end.
const RELAY_OUTER: &str = "relay0";
const RELAY_INNER: &str = "relay1";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Setup {
    NoFiltering,
    Nftables,
    Sessiongate,
    /// An XDP program that reads each frame's Ethernet header and drops it: what
    /// receiving, reading and freeing a frame costs on its own, measured for the
    /// refused SYNs only.
    DropAll,
}

impl Setup {
    pub const ALL: [Self; 4] = [
        Self::NoFiltering,
        Self::Nftables,
        Self::Sessiongate,
        Self::DropAll,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::NoFiltering => "no filtering",
            Self::Nftables => "nftables",
            Self::Sessiongate => "sessiongate",
            Self::DropAll => "dropping every frame after its Ethernet header",
        }
    }

    /// The traffics this setup is measured with.
    fn measures(self, traffic: Traffic) -> bool {
        self != Self::DropAll || traffic == Traffic::ExpiredSyns
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Traffic {
    ExpiredSyns,
    AdmittedUdp,
    ValidSyns,
}

impl Traffic {
    pub const ALL: [Self; 3] = [Self::ExpiredSyns, Self::AdmittedUdp, Self::ValidSyns];

    pub const fn name(self) -> &'static str {
        match self {
            Self::ExpiredSyns => "SYNs from expired devices",
            Self::AdmittedUdp => "packets of admitted UDP flows",
            Self::ValidSyns => "SYNs from valid devices",
        }
    }

    fn packet(self) -> Packet {
        let app = APP;
        match self {
            Self::ExpiredSyns => Packet::syn(IpAddr::V4(EXPIRED_POOL), app, SINK_PORT),
            Self::ValidSyns => Packet::syn(IpAddr::V4(FRESH_POOL), app, SINK_PORT),
            Self::AdmittedUdp => Packet::udp(IpAddr::V4(FRESH_POOL), app, 40_000, SINK_PORT),
        }
    }

    fn generator(self) -> GenConfig {
        let (pool, sport_base, sport_count) = match self {
            Self::ExpiredSyns => (EXPIRED_POOL, 1024, 60_000),
            Self::ValidSyns => (FRESH_POOL, 1024, 60_000),
            // A fixed set of flows: 1024 devices x 4 source ports.
            Self::AdmittedUdp => (FRESH_POOL, 40_000, 4),
        };
        GenConfig {
            src_base: u32::from(pool),
            src_count: POOL_SIZE,
            sport_base,
            sport_count,
            _pad: 0,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct FloodResult {
    pub traffic: Traffic,
    pub setup: Setup,
    /// One measurement per round, each in a fresh lab.
    pub rounds: Vec<Round>,
}

/// One measurement of one traffic through one setup.
#[derive(Clone, Debug, Serialize)]
pub struct Round {
    /// Frames the gateway took in during the measurement.
    pub handled: u64,
    pub seconds: f64,
    /// The gateway CPU's busy time over the measurement.
    pub busy_seconds: f64,
}

impl Round {
    fn pps(&self) -> f64 {
        self.handled as f64 / self.seconds
    }

    fn cpu_ns_per_packet(&self) -> f64 {
        self.busy_seconds * 1e9 / self.handled.max(1) as f64
    }
}

impl FloodResult {
    /// Packets per second handled, median over the rounds.
    pub fn pps(&self) -> f64 {
        Sample::of(&self.rounds.iter().map(Round::pps).collect::<Vec<_>>()).median
    }

    /// Gateway CPU time per packet in ns, median over the rounds.
    pub fn cpu_ns_per_packet(&self) -> f64 {
        Sample::of(
            &self
                .rounds
                .iter()
                .map(Round::cpu_ns_per_packet)
                .collect::<Vec<_>>(),
        )
        .median
    }

    /// The spread of `cpu_ns_per_packet` over the rounds.
    pub fn cpu_range(&self) -> (f64, f64) {
        let s = Sample::of(
            &self
                .rounds
                .iter()
                .map(Round::cpu_ns_per_packet)
                .collect::<Vec<_>>(),
        );
        (s.min, s.max)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct FloodReport {
    /// Seconds each measurement lasts.
    pub seconds: f64,
    /// `live frames` (BPF_PROG_TEST_RUN) or `relay` where the kernel refuses those.
    pub generator: &'static str,
    /// Frames the relay sends per frame it receives.
    pub relay_fanout: u32,
    pub rounds: usize,
    pub results: Vec<FloodResult>,
}

pub fn run(
    quick: bool,
    programs: &mut BenchPrograms,
    agent: &std::path::Path,
) -> anyhow::Result<FloodReport> {
    let (seconds, rounds) = if quick { (0.3, 1) } else { (2.0, 5) };
    let mut results: Vec<FloodResult> = Setup::ALL
        .iter()
        .flat_map(|&setup| {
            Traffic::ALL
                .iter()
                .filter(move |&&traffic| setup.measures(traffic))
                .map(move |&traffic| FloodResult {
                    traffic,
                    setup,
                    rounds: Vec::new(),
                })
        })
        .collect();
    for round in 0..rounds {
        // A fresh lab each round (no connection-tracking state carried over), and the
        // setups in a rotating order so that none always runs first.
        let lab = Lab::new(agent);
        lab.gateway
            .ip(&format!("route add {POOLS} dev {GATEWAY_IFACE}"));
        lab.server.ip(&format!("route add blackhole {POOLS}"));
        let source = Source::new(&lab, programs)?;
        for i in 0..Setup::ALL.len() {
            let setup = Setup::ALL[(i + round) % Setup::ALL.len()];
            eprintln!("bench: end to end, round {}, {}", round + 1, setup.name());
            let gateway = Gateway::prepare(&lab, setup, programs)?;
            for traffic in Traffic::ALL.into_iter().filter(|&t| setup.measures(t)) {
                let measured = gateway.flood(&lab, programs, &source, traffic, seconds)?;
                results
                    .iter_mut()
                    .find(|r| r.setup == setup && r.traffic == traffic)
                    .expect("every pair has a result")
                    .rounds
                    .push(measured);
            }
            gateway.finish(&lab, programs)?;
        }
        source.finish(programs)?;
    }
    Ok(FloodReport {
        seconds,
        generator: generator_used(),
        relay_fanout: programs.relay_fanout(),
        rounds,
        results,
    })
}

/// The gateway set up for one comparison.
struct Gateway {
    setup: Setup,
    agent: Option<netlab::Agent>,
}

impl Gateway {
    fn prepare(lab: &Lab, setup: Setup, programs: &mut BenchPrograms) -> anyhow::Result<Self> {
        let agent = match setup {
            Setup::Sessiongate => {
                let agent = lab.start_agent(&lab.config("", crate::scenario::APP_POLICY));
                login_pools(&agent)?;
                Some(agent)
            }
            Setup::Nftables => {
                attach(lab, programs, "xdp_pass")?;
                load_nftables(lab)?;
                None
            }
            Setup::NoFiltering => {
                attach(lab, programs, "xdp_pass")?;
                None
            }
            Setup::DropAll => {
                attach(lab, programs, "xdp_drop")?;
                None
            }
        };
        pin_napi_thread(&lab.gateway, GATEWAY_IFACE, GATEWAY_CPU)?;
        Ok(Self { setup, agent })
    }

    fn finish(self, lab: &Lab, programs: &mut BenchPrograms) -> anyhow::Result<()> {
        match self.setup {
            // The pinned datapath outlives the agent: remove it for the next setup.
            Setup::Sessiongate => {
                if let Some(agent) = self.agent {
                    agent.stop_and_detach();
                }
            }
            Setup::Nftables => {
                output(lab.gateway.command("nft").args(["flush", "ruleset"]))?;
                programs.detach_attached()?;
            }
            Setup::NoFiltering | Setup::DropAll => programs.detach_attached()?,
        }
        Ok(())
    }

    fn flood(
        &self,
        lab: &Lab,
        programs: &mut BenchPrograms,
        source: &Source,
        traffic: Traffic,
        seconds: f64,
    ) -> anyhow::Result<Round> {
        let packet = frame(lab, traffic)?;
        let generator = programs.generator(traffic.generator())?;
        // Warm up: admits the UDP flows, fills caches and conntrack.
        source.generate(lab, generator, &packet, 0.1 + seconds / 5.0)?;
        thread::sleep(Duration::from_millis(100));
        let before = (rx_packets(lab)?, cpu_busy_ticks(GATEWAY_CPU)?);
        let started = Instant::now();
        source.generate(lab, generator, &packet, seconds)?;
        // Let the gateway drain its queue before reading the counters.
        thread::sleep(Duration::from_millis(50));
        let elapsed = started.elapsed().as_secs_f64();
        let after = (rx_packets(lab)?, cpu_busy_ticks(GATEWAY_CPU)?);
        let ticks_per_second = clock_ticks_per_second();
        Ok(Round {
            handled: after.0 - before.0,
            seconds: elapsed,
            busy_seconds: (after.1 - before.1) as f64 / ticks_per_second,
        })
    }
}

fn pool(base: Ipv4Addr) -> impl Iterator<Item = Ipv4Addr> {
    (0..POOL_SIZE).map(move |i| Ipv4Addr::from(u32::from(base) + i))
}

/// Logs the pools in through the API (one request each, without a process per login).
fn login_pools(agent: &netlab::Agent) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = sessiongate::api::client::ApiClient::new(&agent.socket);
    runtime.block_on(async {
        for (base, age) in [
            (EXPIRED_POOL, Duration::from_secs(7200)),
            (FRESH_POOL, Duration::ZERO),
        ] {
            let at = netlab::time_ago(age);
            for device in pool(base) {
                let body = serde_json::json!({
                    "ip": device.to_string(), "user": "bench@example.com", "at": at,
                });
                client
                    .call(hyper::Method::POST, "/v1/sessions", Some(body))
                    .await?;
            }
        }
        Ok(())
    })
}

/// The nftables equivalent, as an expert would write it: an interval set of the
/// application's CIDRs, a set of devices whose sessions are valid for it with each
/// element timing out when its session does, refused SYNs dropped before connection
/// tracking, and everything else judged after `ct state established,related accept`.
fn nft_ruleset() -> String {
    let mut valid = String::new();
    for (i, device) in pool(FRESH_POOL).enumerate() {
        let _ = write!(
            valid,
            "{}{device} timeout 3599s",
            if i > 0 { ", " } else { "" }
        );
    }
    format!(
        r#"table inet sessiongate {{
    set protected {{ type ipv4_addr; flags interval; elements = {{ 198.19.10.0/24 }} }}
    set valid_app {{ type ipv4_addr; flags timeout; elements = {{ {valid} }} }}

    # New TCP connections are judged before connection tracking: a refused SYN costs
    # no conntrack entry.
    chain early {{
        type filter hook prerouting priority raw; policy accept;
        tcp flags & (fin | syn | rst | ack) == syn tcp dport != 53 ip daddr @protected ip saddr != @valid_app drop
    }}

    chain stateful {{
        type filter hook prerouting priority -150; policy accept;
        ct state established,related accept
        meta l4proto {{ tcp, udp }} th dport 53 accept
        ip daddr @protected ip saddr != @valid_app drop
    }}
}}
"#
    )
}

fn load_nftables(lab: &Lab) -> anyhow::Result<()> {
    let path = lab.dir.path().join("ruleset.nft");
    fs::write(&path, nft_ruleset())?;
    output(lab.gateway.command("nft").arg("-f").arg(&path))
        .context("loading the nftables ruleset (Debian package nftables)")?;
    Ok(())
}

/// One of the benchmark's programs on the gateway's device side. With `xdp_pass`,
/// frames take the path a NIC driver's would, into socket buffers for the stack.
fn attach(lab: &Lab, programs: &mut BenchPrograms, program: &'static str) -> anyhow::Result<()> {
    lab.gateway
        .run(|| programs.attach(program, GATEWAY_IFACE, XdpMode::Driver))
        .with_context(|| format!("attaching {program}"))
}

/// Turns on threaded NAPI for `device` in `ns` and pins its thread to `cpu`.
fn pin_napi_thread(ns: &netlab::Netns, device: &str, cpu: usize) -> anyhow::Result<()> {
    output(
        ns.command("sh")
            .args(["-c", &format!("echo 1 > /sys/class/net/{device}/threaded")]),
    )
    .with_context(|| format!("enabling threaded NAPI on {device}"))?;
    let prefix = format!("napi/{device}-");
    let mut pinned = 0;
    for entry in fs::read_dir("/proc")?.filter_map(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let comm = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        // Every lab names its devices alike; the benchmark runs one lab at a time.
        if comm.trim().starts_with(&prefix) {
            crate::pin_to_cpu_pid(pid, cpu);
            pinned += 1;
        }
    }
    if pinned == 0 {
        bail!("no NAPI thread for {device}");
    }
    Ok(())
}

/// The traffic's frame, addressed from the client's veth to the gateway's.
fn frame(lab: &Lab, traffic: Traffic) -> anyhow::Result<Vec<u8>> {
    let mut bytes = traffic.packet().bytes();
    let dst = mac(&lab.gateway, GATEWAY_IFACE)?;
    let src = mac(&lab.client, "cli0")?;
    bytes[..6].copy_from_slice(&dst);
    bytes[6..12].copy_from_slice(&src);
    Ok(bytes)
}

fn link_json(ns: &netlab::Netns, dev: &str) -> anyhow::Result<serde_json::Value> {
    let out = output(Command::new("ip").args(["-n", &ns.name, "-j", "-s", "link", "show", dev]))?;
    Ok(serde_json::from_str(&out)?)
}

fn mac(ns: &netlab::Netns, dev: &str) -> anyhow::Result<[u8; 6]> {
    let json = link_json(ns, dev)?;
    let text = json[0]["address"].as_str().context("no MAC address")?;
    let mut mac = [0u8; 6];
    for (i, part) in text.split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}

fn ifindex(lab: &Lab, dev: &str) -> anyhow::Result<u32> {
    let json = link_json(&lab.client, dev)?;
    Ok(json[0]["ifindex"].as_u64().context("no ifindex")? as u32)
}

/// Frames the gateway's device-side veth took in.
fn rx_packets(lab: &Lab) -> anyhow::Result<u64> {
    let json = link_json(&lab.gateway, GATEWAY_IFACE)?;
    json[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .context("no rx packet count")
}

/// Set once a kernel refuses BPF_PROG_TEST_RUN's live-frames mode (some sandboxed
/// kernels answer EPERM): the generator is then the relay.
static LIVE_FRAMES_REFUSED: AtomicBool = AtomicBool::new(false);

/// Which generator the measurements used, for the report.
fn generator_used() -> &'static str {
    if LIVE_FRAMES_REFUSED.load(Ordering::Relaxed) {
        "relay"
    } else {
        "live frames"
    }
}

/// Where a lab's flood comes from, on CPU 0.
enum Source {
    /// `xdp_generate` in live-frames mode on the client's veth.
    LiveFrames { ifindex: u32 },
    /// An AF_PACKET socket on the relay pair's outer end; `xdp_relay` on its inner end
    /// rewrites each frame as `xdp_generate` would and redirects it to the client's
    /// veth, which hands it to the gateway's veth as an XDP frame.
    Relay(RawLink),
}

impl Source {
    /// Live frames if the kernel runs them (tried once per benchmark), else the relay,
    /// set up in `lab`'s client namespace.
    fn new(lab: &Lab, programs: &mut BenchPrograms) -> anyhow::Result<Self> {
        let ifindex = ifindex(lab, "cli0")?;
        if !LIVE_FRAMES_REFUSED.load(Ordering::Relaxed) {
            let traffic = Traffic::ValidSyns;
            let packet = frame(lab, traffic)?;
            let generator = programs.generator(traffic.generator())?;
            match lab.client.run(|| send_live(generator, &packet, ifindex, 1)) {
                Ok(()) => return Ok(Self::LiveFrames { ifindex }),
                Err(e) if is_permission_denied(&e) => {
                    eprintln!(
                        "bench: this kernel refuses BPF_PROG_TEST_RUN live frames ({e}); relaying frames from an AF_PACKET socket instead"
                    );
                    LIVE_FRAMES_REFUSED.store(true, Ordering::Relaxed);
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context("generating frames (BPF_PROG_TEST_RUN live frames)"));
                }
            }
        }
        lab.client.ip(&format!(
            "link add {RELAY_OUTER} type veth peer name {RELAY_INNER}"
        ));
        lab.client.ip(&format!("link set {RELAY_OUTER} up"));
        lab.client.ip(&format!("link set {RELAY_INNER} up"));
        lab.client
            .run(|| programs.attach_relay(RELAY_INNER, ifindex))
            .context("attaching the relay")?;
        Ok(Self::Relay(lab.client_generator(RELAY_OUTER)))
    }

    /// Sends frames toward the gateway for `seconds`.
    fn generate(
        &self,
        lab: &Lab,
        generator: &Xdp,
        packet: &[u8],
        seconds: f64,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        lab.client.run(|| {
            crate::pin_to_cpu(GENERATOR_CPU);
            while Instant::now() < deadline {
                match self {
                    Self::LiveFrames { ifindex } => {
                        send_live(generator, packet, *ifindex, 100_000)
                            .context("generating frames (BPF_PROG_TEST_RUN live frames)")?;
                    }
                    Self::Relay(link) => {
                        for _ in 0..16 {
                            // A full transmit queue drops frames, as a NIC would.
                            let _ = link.send_copies(packet, 64);
                        }
                    }
                }
            }
            Ok(())
        })
    }

    fn finish(self, programs: &mut BenchPrograms) -> anyhow::Result<()> {
        match self {
            Self::LiveFrames { .. } => Ok(()),
            // The pair goes with the lab's namespace.
            Self::Relay(_) => programs.detach_relay(),
        }
    }
}

/// `repeat` frames from the generator in live-frames mode, transmitted by `ifindex`.
fn send_live(
    generator: &Xdp,
    packet: &[u8],
    ifindex: u32,
    repeat: u32,
) -> Result<(), aya::programs::ProgramError> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex. The kernel wants data_end to be the frame's length and no
    // metadata.
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(packet.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    generator
        .test_run(TestRunOptions {
            data_in: Some(packet),
            ctx_in: Some(&ctx),
            repeat,
            attrs: TestRunAttrs::new().xdp_live_frames(64),
            ..Default::default()
        })
        .map(|_| ())
}

fn is_permission_denied(e: &aya::programs::ProgramError) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.raw_os_error() == Some(libc::EPERM)
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// Busy clock ticks (USER_HZ) of one CPU so far, from /proc/stat.
fn cpu_busy_ticks(cpu: usize) -> anyhow::Result<u64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with(&format!("cpu{cpu} ")))
        .with_context(|| format!("no cpu{cpu} in /proc/stat"))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...: busy is the time this CPU ran
    // anything, so all but idle, iowait and time the hypervisor stole.
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    Ok(field(0) + field(1) + field(2) + field(5) + field(6))
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}
