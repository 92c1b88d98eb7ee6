//! The control-plane part of the report: its targets and table.

use std::fmt::Write as _;

use super::Target;
use crate::control::{ControlReport, LoginRate};

pub fn targets(c: &ControlReport, targets: &mut Vec<Target>) {
    targets.push(under_seconds(
        format!("{} sessions loaded in under 3 s", c.sessions),
        c.session_load.median,
        3.0,
    ));
    targets.push(Target {
        name: "A login enforced (first SYN admitted) within 10 ms".into(),
        measured: format!(
            "{:.2} ms median, {:.2} ms worst",
            c.login_to_admitted.median, c.login_to_admitted.max
        ),
        met: c.login_to_admitted.max < 10.0,
    });
    targets.push(Target {
        name: "A login through one agent enforced by another within 100 ms".into(),
        measured: format!(
            "{:.2} ms median, {:.2} ms worst",
            c.fleet_login_to_admitted.median, c.fleet_login_to_admitted.max
        ),
        met: c.fleet_login_to_admitted.median < 100.0,
    });
    targets.push(under_seconds(
        format!(
            "{} sessions imported in bulk (`session import`) in under 4 s, end to end",
            c.sessions
        ),
        c.bulk_import,
        4.0,
    ));
    targets.push(under_seconds(
        format!(
            "Agent start with {} sessions in its journal: its API answers in under 1.5 s",
            c.sessions
        ),
        c.agent_start,
        1.5,
    ));
    targets.push(under_seconds(
        format!(
            "Agent adoption (of a killed agent's datapath) with {} sessions in its journal: its API answers in under 1.5 s",
            c.sessions
        ),
        c.agent_adopt,
        1.5,
    ));
    let rss_mib = c.rss_bytes as f64 / f64::from(1 << 20);
    targets.push(Target {
        name: format!("Agent RSS at {} sessions under 150 MiB", c.sessions),
        measured: format!("{rss_mib:.0} MiB"),
        met: rss_mib < 150.0,
    });
    let reload = c.policy_compile.median + c.policy_write.median;
    targets.push(Target {
        name: format!(
            "Policy tables of {} CIDRs compiled and written in under 0.5 s",
            c.cidrs
        ),
        measured: format!("{reload:.3} s"),
        met: reload < 0.5,
    });
    // The rate of the agent's import into etcd against the store's own limit.
    let share = c.fleet_etcd_limit / c.fleet_import;
    targets.push(Target {
        name: format!(
            "{} sessions into etcd through an agent at no less than half the rate of a plain batched-put loop",
            c.fleet_sessions
        ),
        measured: format!(
            "{:.0} % ({:.2} s vs {:.2} s)",
            100.0 * share,
            c.fleet_import,
            c.fleet_etcd_limit
        ),
        met: share >= 0.5,
    });
    targets.push(under_seconds(
        format!(
            "An agent joining a fleet of {} sessions holds them all in under 6 s",
            c.fleet_sessions
        ),
        c.fleet_join_synced,
        6.0,
    ));
    targets.push(Target {
        name: format!(
            "A reload adding 64 identity conditions with {} sessions: masks recomputed and flipped in under 1 s (`sessiongate reload`, end to end)",
            c.sessions
        ),
        measured: format!("{:.3} s median, {:.3} s worst", c.reload.median, c.reload.max),
        met: c.reload.median < 1.0,
    });
}

/// The target `name`: done in under `limit` seconds, measured `seconds`.
fn under_seconds(name: String, seconds: f64, limit: f64) -> Target {
    Target {
        name,
        measured: format!("{seconds:.2} s"),
        met: seconds < limit,
    }
}

pub fn section(c: &ControlReport, md: &mut String) {
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let _ = writeln!(
        md,
        "## Control plane and memory\n\n| measure | median | min-max |\n|---|---|---|"
    );
    let rows = [
        (
            format!("{} sessions into the kernel maps (batched)", c.sessions),
            format!(
                "{:.2} s ({:.0} sessions/s)",
                c.session_load.median,
                c.sessions as f64 / c.session_load.median
            ),
            format!("{:.2}-{:.2} s", c.session_load.min, c.session_load.max),
        ),
        (
            format!(
                "agent start with {} sessions in its journal, until its API answers",
                c.sessions
            ),
            format!("{:.2} s", c.agent_start),
            "-".into(),
        ),
        (
            "an agent adopting that agent's datapath after a SIGKILL, with the same journal, until its API answers".into(),
            format!("{:.2} s", c.agent_adopt),
            "-".into(),
        ),
        (
            "login request to the first admitted SYN".into(),
            format!("{:.2} ms", c.login_to_admitted.median),
            format!(
                "{:.2}-{:.2} ms",
                c.login_to_admitted.min, c.login_to_admitted.max
            ),
        ),
        (
            "login through agent A to the first SYN admitted by agent B (etcd fleet)".into(),
            format!("{:.2} ms", c.fleet_login_to_admitted.median),
            format!(
                "{:.2}-{:.2} ms",
                c.fleet_login_to_admitted.min, c.fleet_login_to_admitted.max
            ),
        ),
        login_rate_row(&c.logins),
        (
            format!("parse and compile {} policy CIDRs", c.cidrs),
            format!("{:.3} s", c.policy_compile.median),
            format!("{:.3}-{:.3} s", c.policy_compile.min, c.policy_compile.max),
        ),
        (
            "write the compiled tables".into(),
            format!("{:.3} s", c.policy_write.median),
            format!("{:.3}-{:.3} s", c.policy_write.min, c.policy_write.max),
        ),
        (
            format!(
                "`sessiongate session import` of {} sessions (CSV), end to end",
                c.sessions
            ),
            format!(
                "{:.2} s ({:.0} sessions/s)",
                c.bulk_import,
                c.sessions as f64 / c.bulk_import
            ),
            "-".into(),
        ),
        (
            format!(
                "`sessiongate reload` to {} CIDRs and 64 identity conditions on a running agent with {} sessions, end to end",
                c.cidrs, c.sessions
            ),
            format!("{:.3} s", c.reload.median),
            format!("{:.3}-{:.3} s", c.reload.min, c.reload.max),
        ),
        (
            format!(
                "kernel map memory at {} sessions, room for as many flows",
                c.sessions
            ),
            format!("{:.0} MiB", mib(c.map_bytes)),
            "-".into(),
        ),
        (
            "agent RSS, same".into(),
            format!("{:.0} MiB", mib(c.rss_bytes)),
            "-".into(),
        ),
        (
            format!(
                "{} sessions imported through an agent into etcd (`session import`, CSV), end to end",
                c.fleet_sessions
            ),
            format!(
                "{:.2} s ({:.0} sessions/s)",
                c.fleet_import,
                c.fleet_sessions as f64 / c.fleet_import
            ),
            "-".into(),
        ),
        (
            format!(
                "an agent joining a fleet of {} sessions, until its API answers",
                c.fleet_sessions
            ),
            if c.fleet_join_sessions == c.fleet_sessions {
                format!("{:.2} s", c.fleet_join)
            } else {
                format!(
                    "{:.2} s (holding {} of them: it served before its snapshot was in)",
                    c.fleet_join, c.fleet_join_sessions
                )
            },
            "-".into(),
        ),
        (
            "the same agent, until it holds them all".into(),
            format!("{:.2} s", c.fleet_join_synced),
            "-".into(),
        ),
        (
            "joined agent RSS, same".into(),
            format!("{:.0} MiB", mib(c.fleet_join_rss_bytes)),
            "-".into(),
        ),
        (
            format!("etcd database at {} sessions", c.fleet_sessions),
            format!("{:.0} MiB", mib(c.fleet_etcd_bytes)),
            "-".into(),
        ),
        (
            format!(
                "the store's limit: {} entries put into the same etcd by a plain loop of batched transactions",
                c.fleet_sessions
            ),
            format!(
                "{:.2} s ({:.0} entries/s)",
                c.fleet_etcd_limit,
                c.fleet_sessions as f64 / c.fleet_etcd_limit
            ),
            "-".into(),
        ),
    ];
    for (measure, median, range) in rows {
        let _ = writeln!(md, "| {measure} | {median} | {range} |");
    }
    md.push('\n');
    laps_table(
        md,
        &format!(
            "Where the start's time goes ({} sessions in the journal, as the agent logs it)",
            c.sessions
        ),
        &c.start_laps,
        c.agent_start,
    );
    laps_table(
        md,
        &format!(
            "Where the adoption's time goes ({} sessions in the journal, as the agent logs it)",
            c.sessions
        ),
        &c.adopt_laps,
        c.agent_adopt,
    );
    laps_table(
        md,
        &format!(
            "Where the import's time goes ({} sessions, in the agent, as it logs it)",
            c.sessions
        ),
        &c.import_laps,
        c.bulk_import,
    );
    laps_table(
        md,
        &format!(
            "Where the time of an import of {} sessions into etcd through an agent goes (as it logs it)",
            c.fleet_sessions
        ),
        &c.fleet_import_laps,
        c.fleet_import,
    );
    laps_table(
        md,
        &format!(
            "Where the time of an agent joining a fleet of {} sessions goes (as it logs it)",
            c.fleet_sessions
        ),
        &c.fleet_join_laps,
        c.fleet_join_synced,
    );
}

/// The steps of an operation that took `total_s` seconds end to end, in order, each
/// with its share of that total.
fn laps_table(md: &mut String, title: &str, laps: &[(String, f64)], total_s: f64) {
    if laps.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "### {title}\n\n| step | ms | share of {:.2} s end to end |\n|---|---|---|",
        total_s
    );
    for (step, ms) in laps {
        let _ = writeln!(md, "| {step} | {ms:.0} | {:.0} % |", ms / (10.0 * total_s));
    }
    md.push('\n');
}

/// The concurrent login rate (`--part logins` run alone).
pub fn logins_section(l: &LoginRate, md: &mut String) {
    let _ = writeln!(
        md,
        "## Control plane: logins\n\n| measure | median | min-max |\n|---|---|---|"
    );
    let (measure, median, range) = login_rate_row(l);
    let _ = writeln!(md, "| {measure} | {median} | {range} |\n");
}

fn login_rate_row(l: &LoginRate) -> (String, String, String) {
    (
        format!(
            "concurrent logins/s (durable): {} clients through the API, runs of {:.0} s",
            l.clients, l.seconds
        ),
        format!("{:.0} logins/s", l.per_second.median),
        format!("{:.0}-{:.0}", l.per_second.min, l.per_second.max),
    )
}
