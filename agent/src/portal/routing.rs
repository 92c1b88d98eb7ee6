//! The policy routing that delivers portal connections to the local host although they
//! are addressed to the application: packets the TC program marks `PORTAL_MARK` are
//! looked up in `PORTAL_TABLE`, which routes every destination locally (the same
//! set-up as iptables' TPROXY). Unmarked traffic never meets the rule. Installed with
//! iproute2, idempotently; left in place when the agent stops (the pinned TC program
//! keeps marking), removed by `sessiongate detach`.

use std::process::Command;

use agent_common::maps::{PORTAL_MARK, PORTAL_TABLE};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RoutingError {
    #[error("cannot run `ip` (iproute2)")]
    NoIp(#[source] std::io::Error),
    #[error("ip {command}: {stderr}")]
    Refused { command: String, stderr: String },
    #[error("installing the portal's policy routing")]
    Install(#[source] Box<RoutingError>),
}

/// The rule's priority: ahead of the main table (32766), behind the local one (0).
const RULE_PRIORITY: &str = "1000";

/// Per family: `ip` flag, the default route's prefix.
const FAMILIES: [(&str, &str); 2] = [("-4", "0.0.0.0/0"), ("-6", "::/0")];

/// `ip FAMILY rule ACTION` of the portal's rule.
fn rule(family: &str, action: &str) -> Result<(), RoutingError> {
    let (mark, table) = (format!("{PORTAL_MARK:#x}"), PORTAL_TABLE.to_string());
    ip(&[
        family,
        "rule",
        action,
        "fwmark",
        &mark,
        "lookup",
        &table,
        "priority",
        RULE_PRIORITY,
    ])
}

/// Adds the local route and the mark rule for both families. A host without IPv6 gets
/// a warning, not an error.
pub fn install() -> Result<(), RoutingError> {
    let table = PORTAL_TABLE.to_string();
    for (family, default) in FAMILIES {
        let route = ip(&[
            family, "route", "replace", "local", default, "dev", "lo", "table", &table,
        ]);
        let rule = route.and_then(|()| {
            rule(family, "add").or_else(|e| {
                // `ip rule add` refuses an identical rule: it is already there.
                if matches!(&e, RoutingError::Refused { stderr, .. } if stderr.contains("File exists")) {
                    Ok(())
                } else {
                    Err(e)
                }
            })
        });
        match (family, rule) {
            (_, Ok(())) => {}
            ("-6", Err(e)) => {
                tracing::warn!(error = %e, "cannot route IPv6 portal connections; IPv6 devices of redirect policies are dropped instead")
            }
            (_, Err(e)) => return Err(RoutingError::Install(Box::new(e))),
        }
    }
    Ok(())
}

/// Removes the rule and the table's route, where present.
pub fn remove() {
    let table = PORTAL_TABLE.to_string();
    for (family, default) in FAMILIES {
        // Several identical rules may have been added by hand; remove them all.
        while rule(family, "del").is_ok() {}
        let _ = ip(&[
            family, "route", "del", "local", default, "dev", "lo", "table", &table,
        ]);
    }
}

fn ip(args: &[&str]) -> Result<(), RoutingError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(RoutingError::NoIp)?;
    if !out.status.success() {
        return Err(RoutingError::Refused {
            command: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}
