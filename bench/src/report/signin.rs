//! The sign-in part of the report: its target and table.

use std::fmt::Write as _;

use super::Target;
use crate::signin::SigninReport;

pub fn targets(s: &SigninReport, targets: &mut Vec<Target>) {
    let l = &s.callback_to_admitted;
    targets.push(Target {
        name: "A sign-in enforced (first SYN admitted) within 50 ms of the provider's callback"
            .into(),
        measured: format!("{:.2} ms median, {:.2} ms worst", l.median, l.max),
        met: l.median < 50.0,
    });
}

pub fn section(s: &SigninReport, md: &mut String) {
    let l = &s.callback_to_admitted;
    let _ = writeln!(
        md,
        "## Signing in at the portal

A real OpenID provider (`oidc-provider`) answers the agent's code exchanges; the sign-ins at the provider are made beforehand, so the user's part is not measured.

| measure | median | min-max |\n|---|---|---|"
    );
    let _ = writeln!(
        md,
        "| callback to the portal to the first admitted SYN ({} runs) | {:.2} ms | {:.2}-{:.2} ms |",
        l.runs, l.median, l.min, l.max
    );
    let _ = writeln!(
        md,
        "| callbacks completed per second ({} callbacks, 8 at a time: code exchange, token check, durable login) | {:.0}/s | - |\n",
        s.callbacks, s.callbacks_per_second
    );
}
