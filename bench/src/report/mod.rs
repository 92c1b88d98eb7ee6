//! The benchmark report: `report.md` with the targets, tables and method, charts as
//! SVG, and every number in `report.json`, all under the output directory. Each part
//! of the benchmark has a module with its targets, its section and its charts.

mod control;
mod end_to_end;
mod per_packet;
mod signin;

use std::{fmt::Write as _, fs, path::Path};

use serde::Serialize;

use crate::{
    control::{ControlReport, LoginRate},
    flood::FloodReport,
    progrun::ProgRunReport,
    signin::SigninReport,
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
    /// Call before pinning the process to a CPU: the core count is the process's.
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

/// Everything one run measured; parts not run are `None`.
#[derive(Serialize)]
pub struct Report {
    pub quick: bool,
    pub machine: Machine,
    pub per_packet: Option<ProgRunReport>,
    pub end_to_end: Option<FloodReport>,
    pub control: Option<ControlReport>,
    /// `--part logins` alone (the control part includes it).
    pub logins: Option<LoginRate>,
    pub signin: Option<SigninReport>,
}

/// A target of the benchmark and whether this run met it.
pub struct Target {
    pub name: String,
    pub measured: String,
    pub met: bool,
}

impl Report {
    pub fn targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        if let Some(p) = &self.per_packet {
            per_packet::targets(p, &mut targets);
        }
        if let Some(e) = &self.end_to_end {
            end_to_end::targets(e, &mut targets);
        }
        if let Some(c) = &self.control {
            control::targets(c, &mut targets);
        }
        if let Some(s) = &self.signin {
            signin::targets(s, &mut targets);
        }
        targets
    }

    /// Writes report.md, report.json and the charts; returns the targets table.
    pub fn write(&self, dir: &Path, command: &str) -> anyhow::Result<String> {
        fs::create_dir_all(dir)?;
        fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        let mut charts: Vec<(String, Chart)> = Vec::new();
        let mut sections = String::new();
        if let Some(p) = &self.per_packet {
            per_packet::section(p, &mut sections);
            charts.extend(per_packet::charts(p));
        }
        if let Some(e) = &self.end_to_end {
            end_to_end::section(e, &mut sections);
            charts.extend(end_to_end::charts(e));
        }
        if let Some(c) = &self.control {
            control::section(c, &mut sections);
        }
        if let Some(l) = &self.logins {
            control::logins_section(l, &mut sections);
        }
        if let Some(s) = &self.signin {
            signin::section(s, &mut sections);
        }
        for (file, chart) in &charts {
            fs::write(dir.join(file), chart.render())?;
        }
        let summary = self.summary();
        let mut md = heading(&self.machine, self.quick, command);
        let _ = writeln!(md, "## Targets\n\n{summary}\n{sections}## Charts\n");
        for (file, chart) in &charts {
            let _ = writeln!(md, "![{}]({file})\n", chart.title);
        }
        fs::write(dir.join("report.md"), md)?;
        Ok(summary)
    }

    fn summary(&self) -> String {
        let mut out = String::from("| target | measured | met |\n|---|---|---|\n");
        for t in self.targets() {
            let _ = writeln!(out, "| {} | {} | {} |", t.name, t.measured, yes_no(t.met));
        }
        out
    }
}

fn yes_no(met: bool) -> &'static str {
    if met { "yes" } else { "**no**" }
}

/// The report's title and the line saying what ran where.
fn heading(m: &Machine, quick: bool, command: &str) -> String {
    let mut md = String::new();
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
        if quick {
            " **Quick run: small tables and short measurements check the harness; its figures are not the targets' measure.**"
        } else {
            ""
        }
    );
    md
}

/// Consecutive runs (`--runs`) side by side: `report.md` with their targets' spread
/// and links to each run's own report (`run-N/`, written by the caller), and every
/// run's numbers in `report.json`. Returns the spread table.
pub fn write_runs(runs: &[Report], dir: &Path, command: &str) -> anyhow::Result<String> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join("report.json"), serde_json::to_string_pretty(runs)?)?;
    let targets: Vec<Vec<Target>> = runs.iter().map(Report::targets).collect();
    let table = spread(&targets);
    let mut md = heading(&runs[0].machine, runs[0].quick, command);
    let _ = writeln!(
        md,
        "## Targets over {} consecutive runs\n\nA target is met only if every run met it.\n\n{table}",
        runs.len()
    );
    let links: Vec<String> = (1..=runs.len())
        .map(|n| format!("[run {n}](run-{n}/report.md)"))
        .collect();
    let _ = writeln!(
        md,
        "Each run's tables, \"where the time goes\" and charts: {}.",
        links.join(", ")
    );
    fs::write(dir.join("report.md"), md)?;
    Ok(table)
}

/// One row per target (in the order they first appear): its measure in each run, and
/// whether every run met it. A run without the target counts as not meeting it.
fn spread(runs: &[Vec<Target>]) -> String {
    let mut out = String::from("| target |");
    for n in 1..=runs.len() {
        let _ = write!(out, " run {n} |");
    }
    out.push_str(" met in every run |\n|---|");
    out.push_str(&"---|".repeat(runs.len() + 1));
    out.push('\n');
    let mut names: Vec<&str> = Vec::new();
    for t in runs.iter().flatten() {
        if !names.contains(&t.name.as_str()) {
            names.push(&t.name);
        }
    }
    for name in names {
        let found: Vec<Option<&Target>> = runs
            .iter()
            .map(|targets| targets.iter().find(|t| t.name == name))
            .collect();
        let _ = write!(out, "| {name} |");
        for t in &found {
            match t {
                Some(t) if t.met => {
                    let _ = write!(out, " {} |", t.measured);
                }
                Some(t) => {
                    let _ = write!(out, " {} (not met) |", t.measured);
                }
                None => out.push_str(" - |"),
            }
        }
        let every = found.iter().all(|t| t.is_some_and(|t| t.met));
        let _ = writeln!(out, " {} |", yes_no(every));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{Target, spread};

    fn target(name: &str, measured: &str, met: bool) -> Target {
        Target {
            name: name.into(),
            measured: measured.into(),
            met,
        }
    }

    #[test]
    fn a_target_is_met_only_if_every_run_met_it() {
        let runs = vec![
            vec![
                target("start", "1.2 s", true),
                target("join", "5.9 s", true),
            ],
            vec![
                target("start", "1.6 s", false),
                target("join", "5.8 s", true),
            ],
            vec![target("join", "5.7 s", true), target("new", "1 x", true)],
        ];
        let table = spread(&runs);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "| target | run 1 | run 2 | run 3 | met in every run |"
        );
        assert_eq!(lines[1], "|---|---|---|---|---|");
        assert_eq!(lines[2], "| start | 1.2 s | 1.6 s (not met) | - | **no** |");
        assert_eq!(lines[3], "| join | 5.9 s | 5.8 s | 5.7 s | yes |");
        assert_eq!(lines[4], "| new | - | - | 1 x | **no** |");
        assert_eq!(lines.len(), 5);
    }
}
