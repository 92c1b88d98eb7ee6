//! The `[[policy]]` tables: each policy's match, its session check and what a refused
//! flow gets; names and precedences unique across them.

use std::collections::HashMap;

use agent_common::maps::{MAX_POLICIES, MAX_REDIRECT_PORTS};

use super::{
    Problems,
    fields::{choice, cidr_list, port_list},
};
use crate::{
    config::{
        CheckSession, DEFAULT_REDIRECT_PORTS, GoDuration, OnExpired, Policy, Protocol,
        raw::{RawCheckSession, RawPolicy},
    },
    input::{Spaces, check_name, name::preview},
};

pub(super) fn section(raw: Vec<RawPolicy>, problems: &mut Problems) -> Vec<Policy> {
    if raw.len() > MAX_POLICIES as usize {
        problems.add(
            "[[policy]]",
            "policy",
            format!(
                "{} policies, at most {MAX_POLICIES} are supported",
                raw.len()
            ),
        );
    }
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut precedences: HashMap<i64, String> = HashMap::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, p) in raw.into_iter().enumerate() {
        let place = match &p.name {
            Some(name) if !name.trim().is_empty() => {
                format!("policy {} (#{})", preview(name), i + 1)
            }
            _ => format!("policy #{}", i + 1),
        };
        let name = match p.name {
            Some(name) if !name.trim().is_empty() => {
                // Names go into metric labels, log lines and the portal's page.
                if let Err(problem) = check_name(&name, Spaces::Allowed) {
                    problems.add(&place, "name", problem.to_string());
                } else if let Some(first) = names.insert(name.clone(), i + 1) {
                    problems.add(
                        &place,
                        "name",
                        format!("policy #{first} already has this name; names must be unique"),
                    );
                }
                name
            }
            _ => {
                problems.add(&place, "name", "missing: every policy needs a name");
                String::new()
            }
        };
        let precedence = match p.precedence {
            Some(n) if n >= 0 => {
                if let Some(other) = precedences.insert(n, place.clone()) {
                    problems.add(
                        &place,
                        "precedence",
                        format!(
                            "{n} is also the precedence of {other}; precedences must be unique"
                        ),
                    );
                }
                n
            }
            Some(n) => {
                problems.add(&place, "precedence", format!("{n} is negative"));
                0
            }
            None => {
                problems.add(
                    &place,
                    "precedence",
                    "missing: policies are evaluated in precedence order, lower first",
                );
                0
            }
        };
        if p.destinations.is_empty() {
            problems.add(&place, "destinations", "list at least one CIDR or address");
        }
        let destinations = cidr_list(&p.destinations, &place, "destinations", problems);
        let protocol = p.protocol.as_deref().and_then(|text| match text {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            _ => {
                problems.add(
                    &place,
                    "protocol",
                    format!("{text:?} is not \"tcp\" or \"udp\" (leave it out for both)"),
                );
                None
            }
        });
        let ports = p.ports.map(|ports| {
            if ports.is_empty() {
                problems.add(&place, "ports", "empty: leave it out to match every port");
            }
            port_list(&ports, &place, "ports", problems)
        });
        let check_session = check_session(p.check_session, &place, problems);
        let on_expired = choice(
            p.on_expired.as_deref(),
            &[
                ("drop", OnExpired::Drop),
                ("reject", OnExpired::Reject),
                ("redirect", OnExpired::Redirect),
            ],
            OnExpired::Drop,
            (&place, "on_expired"),
            problems,
        );
        let redirect_ports = match (on_expired, p.redirect_ports) {
            (OnExpired::Redirect, None) => DEFAULT_REDIRECT_PORTS.to_vec(),
            (OnExpired::Redirect, Some(ports)) => {
                if ports.is_empty() || ports.len() > MAX_REDIRECT_PORTS {
                    problems.add(
                        &place,
                        "redirect_ports",
                        format!("list 1 to {MAX_REDIRECT_PORTS} ports (the default is [80])"),
                    );
                }
                let mut ports = port_list(&ports, &place, "redirect_ports", problems);
                ports.sort_unstable();
                ports.dedup();
                ports.truncate(MAX_REDIRECT_PORTS);
                ports
            }
            (_, Some(_)) => {
                problems.add(
                    &place,
                    "redirect_ports",
                    "only a policy with on_expired = \"redirect\" steers ports to the portal",
                );
                Vec::new()
            }
            (_, None) => Vec::new(),
        };
        if on_expired == OnExpired::Redirect && protocol == Some(Protocol::Udp) {
            problems.add(
                &place,
                "on_expired",
                "\"redirect\" steers TCP (HTTP) to the portal, and this policy matches only UDP: use \"reject\"",
            );
        }
        out.push(Policy {
            name,
            precedence,
            destinations,
            protocol,
            ports,
            check_session,
            on_expired,
            redirect_ports,
        });
    }
    out
}

fn check_session(
    raw: Option<RawCheckSession>,
    place: &str,
    problems: &mut Problems,
) -> CheckSession {
    let Some(raw) = raw else {
        return CheckSession::Unlimited {
            enforce_without_duration: false,
        };
    };
    let duration = raw.duration.as_deref().and_then(|text| {
        text.parse::<GoDuration>()
            .map_err(|e| {
                problems.add(
                    place,
                    "check_session.duration",
                    format!("invalid duration {text:?}: {e}"),
                );
            })
            .ok()
    });
    match (raw.enforce, raw.duration.is_some(), duration) {
        (Some(false), _, _) => CheckSession::Unlimited {
            enforce_without_duration: false,
        },
        (None, false, _) => {
            problems.add(
                place,
                "check_session",
                "give a duration, as in { enforce = true, duration = \"1h30m0s\" }",
            );
            CheckSession::Unlimited {
                enforce_without_duration: false,
            }
        }
        (_, true, Some(d)) => CheckSession::Enforce(d),
        // An invalid duration was reported above.
        (_, true, None) => CheckSession::Unlimited {
            enforce_without_duration: false,
        },
        (Some(true), false, _) => CheckSession::Unlimited {
            enforce_without_duration: true,
        },
    }
}
