//! The benchmark report: `report.md` with the targets, tables and method, charts as
//! SVG, and every number in `report.json`, all under the output directory.

use std::{fmt::Write as _, fs, path::Path};

use serde::Serialize;

use crate::{
    control::ControlReport,
    flood::{FloodReport, Setup, Traffic},
    progrun::ProgRunReport,
    svg::Chart,
};

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub virtualized: bool,
    pub date: String,
}

impl Machine {
    pub fn describe() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |text: &str, key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        };
        Self {
            cpu: field(&cpuinfo, "model name").unwrap_or_else(|| "unknown".into()),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: field(&meminfo, "MemTotal")
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .map_or(0.0, |kb| kb / 1024.0 / 1024.0),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            virtualized: cpuinfo.contains(" hypervisor"),
            date: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
        }
    }
}

#[derive(Serialize)]
pub struct Report {
    pub quick: bool,
    pub machine: Machine,
    pub per_packet: ProgRunReport,
    pub end_to_end: FloodReport,
    pub control: ControlReport,
}

/// A target of the benchmark issue and whether this run met it.
pub struct Target {
    pub name: String,
    pub measured: String,
    pub met: bool,
}

const LARGEST: &str = "1M sessions, 10k CIDRs";

impl Report {
    pub fn targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        let at_scale: Vec<_> = self
            .per_packet
            .results
            .iter()
            .filter(|r| r.size == LARGEST)
            .collect();
        if let Some(established) = at_scale.iter().find(|r| r.path == "TCP established") {
            targets.push(Target {
                name: "Established TCP path <= 1.3 x the do-nothing program".into(),
                measured: format!("{:.2} x", established.ratio.median),
                met: established.ratio.median <= 1.3,
            });
        }
        let new_flows: Vec<_> = at_scale.iter().filter(|r| r.new_flow).collect();
        if let Some(worst) = new_flows
            .iter()
            .max_by(|a, b| a.ratio.median.total_cmp(&b.ratio.median))
        {
            targets.push(Target {
                name: format!("New-flow paths at {LARGEST} <= 2.5 x the do-nothing program"),
                measured: format!("at most {:.2} x ({})", worst.ratio.median, worst.path),
                met: worst.ratio.median <= 2.5,
            });
        }
        let above_filter: Vec<_> = new_flows
            .iter()
            .filter(|r| {
                r.xdp_filter
                    .is_none_or(|x| r.sessiongate.median >= x.median)
            })
            .collect();
        if !new_flows.is_empty() {
            targets.push(Target {
                name: "New-flow paths below xdp-filter with all its filters".into(),
                measured: if above_filter.is_empty() {
                    "every path".into()
                } else {
                    format!("{} paths not", above_filter.len())
                },
                met: above_filter.is_empty(),
            });
        }
        let cpu = |setup| {
            self.end_to_end
                .results
                .iter()
                .find(|r| r.traffic == Traffic::ExpiredSyns && r.setup == setup)
                .map(|r| r.cpu_ns_per_packet())
        };
        if let (Some(sg), Some(nft)) = (cpu(Setup::Sessiongate), cpu(Setup::Nftables)) {
            targets.push(Target {
                name: "Expired-device SYN flood: >= 3 x the refused packets per CPU-second of nftables".into(),
                measured: format!("{:.1} x ({sg:.0} vs {nft:.0} ns per packet)", nft / sg),
                met: nft / sg >= 3.0,
            });
        }
        let c = &self.control;
        targets.push(Target {
            name: format!("{} sessions loaded in under 3 s", c.sessions),
            measured: format!("{:.2} s", c.session_load.median),
            met: c.session_load.median < 3.0,
        });
        targets.push(Target {
            name: "A login enforced (first SYN admitted) within 10 ms".into(),
            measured: format!(
                "{:.2} ms median, {:.2} ms worst",
                c.login_to_admitted.median, c.login_to_admitted.max
            ),
            met: c.login_to_admitted.max < 10.0,
        });
        let reload = c.policy_compile.median + c.policy_write.median;
        targets.push(Target {
            name: format!(
                "Policy tables of {} CIDRs compiled and written in under 0.5 s",
                c.cidrs
            ),
            measured: format!("{:.3} s", reload),
            met: reload < 0.5,
        });
        targets
    }

    /// Writes report.md, report.json and the charts; returns the summary table.
    pub fn write(&self, dir: &Path, command: &str) -> anyhow::Result<String> {
        fs::create_dir_all(dir)?;
        fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        let charts = self.charts();
        for (file, chart) in &charts {
            fs::write(dir.join(file), chart.render())?;
        }
        let summary = self.summary();
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(md, "# sessiongate benchmark\n");
        let _ = writeln!(
            md,
            "`{command}` on {} ({} cores{}, {:.0} GiB, Linux {}), {}.{}\n",
            m.cpu,
            m.cores,
            if m.virtualized {
                ", virtual machine"
            } else {
                ""
            },
            m.memory_gib,
            m.kernel,
            m.date,
            if self.quick {
                " **Quick run: small tables and short measurements check the harness; its figures are not the targets' measure.**"
            } else {
                ""
            }
        );
        let _ = writeln!(md, "## Targets\n\n{summary}");
        self.per_packet_section(&mut md);
        self.end_to_end_section(&mut md);
        self.control_section(&mut md);
        let _ = writeln!(md, "## Charts\n");
        for (file, chart) in &charts {
            let _ = writeln!(md, "![{}]({file})\n", chart.title);
        }
        fs::write(dir.join("report.md"), md)?;
        Ok(summary)
    }

    fn summary(&self) -> String {
        let mut out = String::from("| target | measured | met |\n|---|---|---|\n");
        for t in self.targets() {
            let _ = writeln!(
                out,
                "| {} | {} | {} |",
                t.name,
                t.measured,
                if t.met { "yes" } else { "**no**" }
            );
        }
        out
    }

    fn per_packet_section(&self, md: &mut String) {
        let p = &self.per_packet;
        let _ = writeln!(
            md,
            "## Per-packet cost (BPF_PROG_TEST_RUN)\n\nThe kernel runs each program on one packet {} times and reports the mean; each figure is the median of {} such measurements. The do-nothing program (the floor of the method) is measured back to back with sessiongate on the same packet, and the ratio is taken per pair so that drift of the shared machine cancels. xdp-filter (Debian's xdp-tools) runs with all its features on the same packets. Every path's verdict is checked before it is timed.\n",
            p.repeat, p.runs
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
                    "| {}{} | {:.0} | {:.0} | {:.2} ({:.2}-{:.2}) | {} |",
                    r.path,
                    if r.new_flow { " *" } else { "" },
                    r.sessiongate.median,
                    r.floor.median,
                    r.ratio.median,
                    r.ratio.min,
                    r.ratio.max,
                    r.xdp_filter
                        .map_or("-".into(), |x| format!("{:.0}", x.median))
                );
            }
            md.push('\n');
        }
        let _ = writeln!(md, "\\* new-flow paths.\n");
    }

    fn end_to_end_section(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "## End to end\n\nA generator (an XDP program run in live-frames mode on the client's veth, CPU 0) floods the gateway namespace, which forwards to the server namespace. The gateway's receive work runs in a threaded-NAPI kernel thread pinned to CPU 1; its busy time over {:.1} s is the gateway's cost. Without sessiongate the gateway's XDP hook holds a do-nothing program, so frames become socket buffers as a driver would make them. nftables is set up as an expert would: an interval set of the application's CIDRs, a set of valid devices whose elements time out with their sessions, refused SYNs dropped in the raw prerouting hook before connection tracking, and `ct state established,related accept` first in the stateful chain.\n",
            self.end_to_end.seconds
        );
        let _ = writeln!(
            md,
            "| traffic | setup | packets/s handled | gateway CPU ns/packet | CPU vs nftables |\n|---|---|---|---|---|"
        );
        for traffic in Traffic::ALL {
            let nft = self
                .end_to_end
                .results
                .iter()
                .find(|r| r.traffic == traffic && r.setup == Setup::Nftables)
                .map(|r| r.cpu_ns_per_packet());
            for r in self
                .end_to_end
                .results
                .iter()
                .filter(|r| r.traffic == traffic)
            {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.0} | {:.0} | {} |",
                    traffic.name(),
                    r.setup.name(),
                    r.pps(),
                    r.cpu_ns_per_packet(),
                    nft.map_or("-".into(), |n| format!(
                        "{:.2} x",
                        r.cpu_ns_per_packet() / n
                    ))
                );
            }
        }
        md.push('\n');
    }

    fn control_section(&self, md: &mut String) {
        let c = &self.control;
        let mb = |b: u64| b as f64 / (1 << 20) as f64;
        let _ = writeln!(
            md,
            "## Control plane and memory\n\n| measure | median | min-max |\n|---|---|---|\n| {} sessions into the kernel maps (batched) | {:.2} s ({:.0} sessions/s) | {:.2}-{:.2} s |\n| agent start with {} sessions in its journal, until its API answers | {:.2} s | - |\n| login request to first admitted SYN | {:.2} ms | {:.2}-{:.2} ms |\n| parse and compile {} policy CIDRs | {:.3} s | {:.3}-{:.3} s |\n| write the compiled tables | {:.3} s | {:.3}-{:.3} s |\n| kernel map memory at {} sessions, room for as many flows | {:.0} MiB | - |\n| agent RSS, same | {:.0} MiB | - |\n",
            c.sessions,
            c.session_load.median,
            c.sessions as f64 / c.session_load.median,
            c.session_load.min,
            c.session_load.max,
            c.sessions,
            c.agent_start,
            c.login_to_admitted.median,
            c.login_to_admitted.min,
            c.login_to_admitted.max,
            c.cidrs,
            c.policy_compile.median,
            c.policy_compile.min,
            c.policy_compile.max,
            c.policy_write.median,
            c.policy_write.min,
            c.policy_write.max,
            c.sessions,
            mb(c.map_bytes),
            mb(c.rss_bytes),
        );
    }

    fn charts(&self) -> Vec<(String, Chart)> {
        let p = &self.per_packet;
        let mut charts = Vec::new();
        let largest = p.sizes.last().map(|s| s.label.clone()).unwrap_or_default();
        charts.push((
            "per-packet.svg".to_string(),
            Chart {
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
                        (
                            r.path.clone(),
                            vec![
                                Some(r.sessiongate.median),
                                Some(r.floor.median),
                                r.xdp_filter.map(|x| x.median),
                            ],
                        )
                    })
                    .collect(),
            },
        ));
        charts.push((
            "per-packet-sizes.svg".to_string(),
            Chart {
                title: "sessiongate ns per packet by table size".into(),
                unit: "ns".into(),
                series: p.sizes.iter().map(|s| s.label.clone()).collect(),
                rows: p
                    .results
                    .iter()
                    .filter(|r| r.size == p.sizes[0].label)
                    .map(|first| {
                        let values = p
                            .sizes
                            .iter()
                            .map(|s| {
                                p.results
                                    .iter()
                                    .find(|r| r.size == s.label && r.path == first.path)
                                    .map(|r| r.sessiongate.median)
                            })
                            .collect();
                        (first.path.clone(), values)
                    })
                    .collect(),
            },
        ));
        let e2e = |metric: fn(&crate::flood::FloodResult) -> f64| {
            Traffic::ALL
                .iter()
                .map(|t| {
                    let values = Setup::ALL
                        .iter()
                        .map(|s| {
                            self.end_to_end
                                .results
                                .iter()
                                .find(|r| r.traffic == *t && r.setup == *s)
                                .map(metric)
                        })
                        .collect();
                    (t.name().to_string(), values)
                })
                .collect()
        };
        let setups: Vec<String> = Setup::ALL.iter().map(|s| s.name().to_string()).collect();
        charts.push((
            "end-to-end-cpu.svg".to_string(),
            Chart {
                title: "gateway CPU ns per packet".into(),
                unit: "ns".into(),
                series: setups.clone(),
                rows: e2e(|r| r.cpu_ns_per_packet()),
            },
        ));
        charts.push((
            "end-to-end-pps.svg".to_string(),
            Chart {
                title: "packets per second handled (thousands)".into(),
                unit: "kpps".into(),
                series: setups,
                rows: e2e(|r| r.pps() / 1e3),
            },
        ));
        charts
    }
}
