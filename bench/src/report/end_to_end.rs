//! The end-to-end part of the report: the SYN-flood target, the comparison table and
//! its charts.

use std::fmt::Write as _;

use super::Target;
use crate::{
    flood::{FloodReport, FloodResult, Setup, Traffic},
    svg::Chart,
};

fn find(e: &FloodReport, traffic: Traffic, setup: Setup) -> Option<&FloodResult> {
    e.results
        .iter()
        .find(|r| r.traffic == traffic && r.setup == setup)
}

pub fn targets(e: &FloodReport, targets: &mut Vec<Target>) {
    let cpu = |setup| find(e, Traffic::ExpiredSyns, setup).map(FloodResult::cpu_ns_per_packet);
    if let (Some(sg), Some(nft)) = (cpu(Setup::Sessiongate), cpu(Setup::Nftables)) {
        // What each costs beyond receiving and freeing the frame, for the reader.
        let beyond = cpu(Setup::DropAll).map_or(String::new(), |floor| {
            format!(
                "; {:.0} vs {:.0} ns beyond {floor:.0} ns for {}",
                sg - floor,
                nft - floor,
                Setup::DropAll.name()
            )
        });
        targets.push(Target {
            name: "Expired-device SYN flood: >= 4 x the refused packets per CPU-second of nftables"
                .into(),
            measured: format!(
                "{:.1} x ({sg:.0} vs {nft:.0} ns per packet{beyond})",
                nft / sg
            ),
            met: nft / sg >= 4.0,
        });
    }
}

pub fn section(e: &FloodReport, md: &mut String) {
    let generator = if e.generator == "live frames" {
        "A generator (an XDP program run in live-frames mode on the client's veth, CPU 0; it sends over 1.8 Mpps where trafgen, pinned to one CPU, sent 0.78 Mpps into an otherwise idle veth on this machine)".to_string()
    } else {
        format!(
            "A generator on CPU 0 (this kernel refuses BPF_PROG_TEST_RUN's live-frames mode, so an AF_PACKET socket sends frames into a veth pair in the client namespace whose far end runs `xdp_relay`: it rewrites each frame's source and redirects it to the client's veth {} times, so that the gateway receives XDP frames, as from a NIC, at a higher rate than the socket alone reaches)",
            e.relay_fanout
        )
    };
    let _ = writeln!(
        md,
        "## End to end\n\n{generator} floods the gateway namespace, which forwards to the server namespace. The gateway's receive work runs in a threaded-NAPI kernel thread pinned to CPU 1; CPU 1's busy time over each {:.1} s measurement is the gateway's cost. Figures are medians over {} rounds, each in a fresh set of namespaces with the setups in rotating order. Without sessiongate the gateway's XDP hook holds a do-nothing program, so frames become socket buffers as a driver would make them. nftables is set up as an expert would: an interval set of the application's CIDRs, a set of valid devices whose elements time out with their sessions, refused SYNs dropped in the raw prerouting hook before connection tracking, and `ct state established,related accept` first in the stateful chain. \"{}\" is an XDP program that reads each frame's Ethernet header and drops it: what receiving, reading and freeing a frame costs the gateway on its own, below any filter.\n\n| traffic | setup | packets/s handled | vs nftables | gateway CPU ns/packet (min-max) | vs nftables | vs no filtering |\n|---|---|---|---|---|---|---|",
        e.seconds,
        e.rounds,
        Setup::DropAll.name()
    );
    let ratio = |a: f64, b: Option<f64>| b.map_or("-".into(), |b| format!("{:.2} x", a / b));
    for traffic in Traffic::ALL {
        let nft = find(e, traffic, Setup::Nftables);
        let none = find(e, traffic, Setup::NoFiltering);
        for r in e.results.iter().filter(|r| r.traffic == traffic) {
            let (low, high) = r.cpu_range();
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {} | {:.0} ({low:.0}-{high:.0}) | {} | {} |",
                traffic.name(),
                r.setup.name(),
                r.pps(),
                ratio(r.pps(), nft.map(FloodResult::pps)),
                r.cpu_ns_per_packet(),
                ratio(
                    r.cpu_ns_per_packet(),
                    nft.map(FloodResult::cpu_ns_per_packet)
                ),
                ratio(
                    r.cpu_ns_per_packet(),
                    none.map(FloodResult::cpu_ns_per_packet)
                ),
            );
        }
    }
    md.push('\n');
}

pub fn charts(e: &FloodReport) -> Vec<(String, Chart)> {
    let rows = |metric: fn(&FloodResult) -> f64| {
        Traffic::ALL
            .iter()
            .map(|&t| {
                let values = Setup::ALL
                    .iter()
                    .map(|&s| find(e, t, s).map(metric))
                    .collect();
                (t.name().to_string(), values)
            })
            .collect()
    };
    let series: Vec<String> = Setup::ALL.iter().map(|s| s.name().to_string()).collect();
    vec![
        (
            "end-to-end-cpu.svg".into(),
            Chart {
                title: "gateway CPU ns per packet".into(),
                unit: "ns".into(),
                series: series.clone(),
                rows: rows(FloodResult::cpu_ns_per_packet),
            },
        ),
        (
            "end-to-end-pps.svg".into(),
            Chart {
                title: "packets per second handled (thousands)".into(),
                unit: "kpps".into(),
                series,
                rows: rows(|r| r.pps() / 1e3),
            },
        ),
    ]
}
