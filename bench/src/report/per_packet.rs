//! The per-packet part of the report: targets, tables and charts.

use std::fmt::Write as _;

use super::Target;
use crate::{
    progrun::{ADMITTED_SYN, ProgRunReport, REFUSED_SYN},
    svg::Chart,
};

/// The size the per-packet targets are stated at.
const LARGEST: &str = "1M sessions, 10k CIDRs";

pub fn targets(p: &ProgRunReport, targets: &mut Vec<Target>) {
    let at_scale: Vec<_> = p.results.iter().filter(|r| r.size == LARGEST).collect();
    if let Some(established) = at_scale.iter().find(|r| r.path == "TCP established") {
        targets.push(Target {
            name: "Established TCP path <= 1.25 x the do-nothing program".into(),
            measured: format!("{:.2} x", established.ratio.median),
            met: established.ratio.median <= 1.25,
        });
    }
    let new_flows: Vec<_> = at_scale.iter().filter(|r| r.new_flow).collect();
    let Some(worst) = new_flows
        .iter()
        .max_by(|a, b| a.ratio.median.total_cmp(&b.ratio.median))
    else {
        return;
    };
    targets.push(Target {
        name: format!(
            "New-flow paths at {LARGEST} <= 2.2 x the do-nothing program (so that 2.5 x holds on slower machines of this kind)"
        ),
        measured: format!("at most {:.2} x ({})", worst.ratio.median, worst.path),
        met: worst.ratio.median <= 2.2,
    });
    let not_below: Vec<_> = new_flows
        .iter()
        .filter(|r| {
            r.xdp_filter
                .is_none_or(|x| r.sessiongate.median >= x.median)
        })
        .collect();
    targets.push(Target {
        name: "New-flow paths below xdp-filter with all its filters".into(),
        measured: if not_below.is_empty() {
            "every path".into()
        } else {
            format!("{} paths not", not_below.len())
        },
        met: not_below.is_empty(),
    });
}

pub fn section(p: &ProgRunReport, md: &mut String) {
    let _ = writeln!(
        md,
        "## Per-packet cost (BPF_PROG_TEST_RUN)\n\nThe kernel runs each program on one packet {} times; the mean per run is the benchmark thread's CPU time over the call, less that of a call of two runs (the fixed cost of a call), divided by the repeat count, and each figure is the median of {} such measurements. The kernel's own figure is whole nanoseconds, truncated; {} of the {} calls were more than half a nanosecond below it or 1.5 above, and for those the kernel's figure is used. The do-nothing program (the floor of the method) is measured back to back with sessiongate on the same packet, and the ratio is taken per pair so that drift of the shared machine cancels. xdp-filter (Debian's xdp-tools) runs with all its features on the same packets. Every path's verdict is checked before it is timed.\n",
        p.repeat, p.runs, p.kernel_figures, p.measurements
    );
    for size in &p.sizes {
        let _ = writeln!(
            md,
            "### {} ({} tracked UDP flows)\n\n| path | sessiongate ns | floor ns | ratio (min-max) | xdp-filter ns |\n|---|---|---|---|---|",
            size.label, size.flows
        );
        for r in p.results.iter().filter(|r| r.size == size.label) {
            let _ = writeln!(
                md,
                "| {}{} | {:.1} | {:.1} | {:.2} ({:.2}-{:.2}) | {} |",
                r.path,
                if r.new_flow { " *" } else { "" },
                r.sessiongate.median,
                r.floor.median,
                r.ratio.median,
                r.ratio.min,
                r.ratio.max,
                r.xdp_filter
                    .map_or("-".into(), |x| format!("{:.1}", x.median))
            );
        }
        md.push('\n');
    }
    let _ = writeln!(md, "\\* new-flow paths.\n");
    refusal_parts(p, md);
}

/// Where the refusal path's time goes: what a refused SYN costs beyond an admitted one
/// (the same packet and policy, the largest tables), and its parts measured alone.
fn refusal_parts(p: &ProgRunReport, md: &mut String) {
    let Some(size) = p.sizes.last() else {
        return;
    };
    let path = |name: &str| {
        p.results
            .iter()
            .find(|r| r.size == size.label && r.path == name)
    };
    let (Some(refused), Some(admitted)) = (path(REFUSED_SYN), path(ADMITTED_SYN)) else {
        return;
    };
    let _ = writeln!(
        md,
        "### Where the refusal path's time goes\n\nThe refused IPv4 SYN against the admitted one at {}, then each part of the refusal as a program of its own on the same packet, above the floor (median, min-max of {} pairs). A drop policy's refusal (a flood's) runs the first two parts on every packet; the ring buffer only when the limiter lets an event out.\n\n| part | ns |\n|---|---|",
        size.label, p.runs
    );
    // The fastest runs: a stray slow run of either path would skew a difference of
    // medians taken in different loops.
    let _ = writeln!(
        md,
        "| a refused SYN beyond an admitted one (fastest runs: {:.1} - {:.1} ns) | {:.1} |",
        refused.sessiongate.min,
        admitted.sessiongate.min,
        refused.sessiongate.min - admitted.sessiongate.min
    );
    for part in &p.refusal_parts {
        let ns = &part.above_floor_ns;
        let _ = writeln!(
            md,
            "| {} | {:.1} ({:.1} to {:.1}) |",
            part.part, ns.median, ns.min, ns.max
        );
    }
    md.push('\n');
}

pub fn charts(p: &ProgRunReport) -> Vec<(String, Chart)> {
    let largest = p.sizes.last().map(|s| s.label.clone()).unwrap_or_default();
    let by_path = Chart {
        title: format!("ns per packet, {largest}"),
        unit: "ns".into(),
        series: vec![
            "sessiongate".into(),
            "do-nothing floor".into(),
            "xdp-filter (all filters)".into(),
        ],
        rows: p
            .results
            .iter()
            .filter(|r| r.size == largest)
            .map(|r| {
                let values = vec![
                    Some(r.sessiongate.median),
                    Some(r.floor.median),
                    r.xdp_filter.map(|x| x.median),
                ];
                (r.path.clone(), values)
            })
            .collect(),
    };
    let first = p.sizes.first().map(|s| s.label.clone()).unwrap_or_default();
    let by_size = Chart {
        title: "sessiongate ns per packet by table size".into(),
        unit: "ns".into(),
        series: p.sizes.iter().map(|s| s.label.clone()).collect(),
        rows: p
            .results
            .iter()
            .filter(|r| r.size == first)
            .map(|row| {
                let values = p
                    .sizes
                    .iter()
                    .map(|s| {
                        p.results
                            .iter()
                            .find(|r| r.size == s.label && r.path == row.path)
                            .map(|r| r.sessiongate.median)
                    })
                    .collect();
                (row.path.clone(), values)
            })
            .collect(),
    };
    vec![
        ("per-packet.svg".into(), by_path),
        ("per-packet-sizes.svg".into(), by_size),
    ]
}
