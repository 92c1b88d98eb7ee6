//! The `[[policy]]` tables: each policy's match, its session check and what a refused
//! flow gets; names and precedences unique across them.

use std::collections::HashMap;

use agent_common::maps::{MAX_POLICIES, MAX_REDIRECT_PORTS};
use ipnet::IpNet;

use super::{
    Problems, access,
    fields::{choice, cidr_list, port_list},
    identity,
};
use crate::{
    config::{
        CheckSession, DEFAULT_REDIRECT_PORTS, GoDuration, OnExpired, Policy, Protocol,
        raw::{RawCheckSession, RawPolicy},
    },
    input::{Spaces, check_name, name::preview},
};

/// The policies, and what each says for itself about `[access]` (`access::fold`).
pub(super) fn section(
    raw: Vec<RawPolicy>,
    problems: &mut Problems,
) -> (Vec<Policy>, Vec<access::Asked>) {
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
    let mut seen = Seen::default();
    let (policies, asked): (Vec<Policy>, Vec<access::Asked>) = raw
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let asked = access::Asked {
                access: p.access,
                own_check: p.check_session.is_some(),
            };
            (policy(i + 1, p, &mut seen, problems), asked)
        })
        .unzip();
    identity::count(&policies, problems);
    (policies, asked)
}

/// Policy `number` (counted from 1, as in messages).
fn policy(number: usize, raw: RawPolicy, seen: &mut Seen, problems: &mut Problems) -> Policy {
    let place = place(raw.name.as_deref(), number);
    let name = seen.name(raw.name, number, &place, problems);
    let precedence = seen.precedence(raw.precedence, &place, problems);
    let destinations = destinations(&raw.destinations, &place, problems);
    let protocol = protocol(raw.protocol.as_deref(), &place, problems);
    let ports = ports(raw.ports, &place, problems);
    let check_session = check_session(raw.check_session, &place, problems);
    let on_expired = on_expired(raw.on_expired.as_deref(), &place, problems);
    let redirect_ports = redirect_ports(on_expired, raw.redirect_ports, &place, problems);
    if on_expired == OnExpired::Redirect && protocol == Some(Protocol::Udp) {
        problems.add(
            &place,
            "on_expired",
            "\"redirect\" steers TCP (HTTP) to the portal, and this policy matches only UDP: use \"reject\"",
        );
    }
    let identity = identity::condition(raw.identity, &place, problems);
    Policy {
        name,
        precedence,
        destinations,
        protocol,
        ports,
        check_session,
        on_expired,
        redirect_ports,
        access: false,
        identity,
    }
}

/// How messages name a policy: by its name when it has one, always by its number.
pub(super) fn place(name: Option<&str>, number: usize) -> String {
    match name {
        Some(name) if !name.trim().is_empty() => {
            format!("policy {} (#{number})", preview(name))
        }
        _ => format!("policy #{number}"),
    }
}

/// The policies read so far, by name and by precedence: both must be unique.
#[derive(Default)]
struct Seen {
    /// Each name, with the number of the policy that has it.
    names: HashMap<String, usize>,
    /// Each precedence, with the place of the policy that has it.
    precedences: HashMap<i64, String>,
}

impl Seen {
    fn name(
        &mut self,
        raw: Option<String>,
        number: usize,
        place: &str,
        problems: &mut Problems,
    ) -> String {
        match raw {
            Some(name) if !name.trim().is_empty() => {
                // Names go into metric labels, log lines and the portal's page.
                if let Err(problem) = check_name(&name, Spaces::Allowed) {
                    problems.add(place, "name", problem.to_string());
                } else if let Some(first) = self.names.insert(name.clone(), number) {
                    problems.add(
                        place,
                        "name",
                        format!("policy #{first} already has this name; names must be unique"),
                    );
                }
                name
            }
            _ => {
                problems.add(place, "name", "missing: every policy needs a name");
                String::new()
            }
        }
    }

    fn precedence(&mut self, raw: Option<i64>, place: &str, problems: &mut Problems) -> i64 {
        match raw {
            Some(n) if n >= 0 => {
                if let Some(other) = self.precedences.insert(n, place.to_string()) {
                    problems.add(
                        place,
                        "precedence",
                        format!(
                            "{n} is also the precedence of {other}; precedences must be unique"
                        ),
                    );
                }
                n
            }
            Some(n) => {
                problems.add(place, "precedence", format!("{n} is negative"));
                0
            }
            None => {
                problems.add(
                    place,
                    "precedence",
                    "missing: policies are evaluated in precedence order, lower first",
                );
                0
            }
        }
    }
}

fn destinations(texts: &[String], place: &str, problems: &mut Problems) -> Vec<IpNet> {
    if texts.is_empty() {
        problems.add(place, "destinations", "list at least one CIDR or address");
    }
    cidr_list(texts, place, "destinations", problems)
}

/// `None` matches both TCP and UDP.
fn protocol(value: Option<&str>, place: &str, problems: &mut Problems) -> Option<Protocol> {
    value.and_then(|text| match text {
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        _ => {
            problems.add(
                place,
                "protocol",
                format!("{text:?} is not \"tcp\" or \"udp\" (leave it out for both)"),
            );
            None
        }
    })
}

/// `None` matches every port; an empty list, which would match none, is refused.
fn ports(value: Option<Vec<i64>>, place: &str, problems: &mut Problems) -> Option<Vec<u16>> {
    value.map(|ports| {
        if ports.is_empty() {
            problems.add(place, "ports", "empty: leave it out to match every port");
        }
        port_list(&ports, place, "ports", problems)
    })
}

fn on_expired(value: Option<&str>, place: &str, problems: &mut Problems) -> OnExpired {
    choice(
        value,
        &[
            ("drop", OnExpired::Drop),
            ("reject", OnExpired::Reject),
            ("redirect", OnExpired::Redirect),
        ],
        OnExpired::Drop,
        (place, "on_expired"),
        problems,
    )
}

/// The TCP ports a redirect policy steers to the portal: sorted, once each, and no more
/// than the kernel's policy entry holds. Only a redirect policy has any.
fn redirect_ports(
    on_expired: OnExpired,
    value: Option<Vec<i64>>,
    place: &str,
    problems: &mut Problems,
) -> Vec<u16> {
    match (on_expired, value) {
        (OnExpired::Redirect, None) => DEFAULT_REDIRECT_PORTS.to_vec(),
        (OnExpired::Redirect, Some(ports)) => {
            if ports.is_empty() || ports.len() > MAX_REDIRECT_PORTS {
                problems.add(
                    place,
                    "redirect_ports",
                    format!("list 1 to {MAX_REDIRECT_PORTS} ports (the default is [80])"),
                );
            }
            let mut ports = port_list(&ports, place, "redirect_ports", problems);
            ports.sort_unstable();
            ports.dedup();
            ports.truncate(MAX_REDIRECT_PORTS);
            ports
        }
        (_, Some(_)) => {
            problems.add(
                place,
                "redirect_ports",
                "only a policy with on_expired = \"redirect\" steers ports to the portal",
            );
            Vec::new()
        }
        (_, None) => Vec::new(),
    }
}

/// `enforce = true` without a duration limits nothing; it is kept apart so that
/// `check` can warn about it.
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
