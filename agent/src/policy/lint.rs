//! Warnings for valid configs that probably do not do what their author wants; most
//! are the "common mistake" of the Gateway docs: a session check so wide that a user
//! who misses one prompt loses the whole network, private DNS included.

use std::fmt;

use ipnet::IpNet;

use super::PolicyTable;
use crate::config::{CheckSession, Config};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// `policy "Company Wiki" (#2)`.
    pub place: String,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.place, self.message)
    }
}

/// IPv4 prefixes this short or shorter (and IPv6 /32 or shorter) count as "the whole
/// private network" for the common-mistake warning; the docs' example is 10.0.0.0/8.
const WIDE_V4: u8 = 8;
const WIDE_V6: u8 = 32;

pub fn lint(config: &Config, table: &PolicyTable) -> Vec<Warning> {
    let mut warnings = Vec::new();
    for (i, policy) in config.policies.iter().enumerate() {
        let place = format!("policy {:?} (#{})", policy.name, i + 1);
        let mut warn = |message: String| {
            warnings.push(Warning {
                place: place.clone(),
                message,
            })
        };
        if let CheckSession::Unlimited {
            enforce_without_duration: true,
        } = policy.check_session
        {
            warn("check_session.enforce = true but no duration: sessions are unlimited".into());
        }
        if policy.duration().is_some() {
            for resolver in &config.dns.resolvers {
                if policy.destinations.iter().any(|net| net.contains(resolver)) {
                    warn(format!(
                        "session-checked and covers the DNS resolver {resolver}: DNS queries to ports {:?} still pass, but a user who misses the re-authentication prompt loses its other services",
                        config.dns.ports
                    ));
                }
            }
            for bypass in &config.bypass {
                if let Some(net) = policy.destinations.iter().find(|net| overlaps(net, bypass)) {
                    warn(format!(
                        "{net} overlaps the bypass destination {bypass}, which always passes: re-authentication must be able to reach the identity provider"
                    ));
                }
            }
            for net in &policy.destinations {
                let wide = match net {
                    IpNet::V4(n) => n.prefix_len() <= WIDE_V4,
                    IpNet::V6(n) => n.prefix_len() <= WIDE_V6,
                };
                if wide {
                    warn(format!(
                        "session-checked over {net}, a /{} or wider: one missed re-authentication prompt blocks the whole range, private DNS servers included (the Gateway docs' common mistake); prefer per-application policies",
                        if matches!(net, IpNet::V4(_)) {
                            WIDE_V4
                        } else {
                            WIDE_V6
                        }
                    ));
                }
            }
        }
        if let Some(ports) = &policy.ports
            && !ports.is_empty()
            && ports.iter().all(|p| config.dns.ports.contains(p))
        {
            warn(format!(
                "names only DNS ports {ports:?}, which are never session-checked"
            ));
        }
        if !table.reachable.get(i).copied().unwrap_or(true) {
            let whoever = if policy.identity.is_some() {
                ", whoever the user is"
            } else {
                ""
            };
            warn(format!(
                "completely shadowed by bypass destinations or policies of lower precedence numbers (or ones with the same identity condition): it never applies{whoever}"
            ));
        }
        let idps = policy.identity.as_ref().and_then(|c| c.idps.as_ref());
        if !config.idps.is_empty() {
            for idp in idps.into_iter().flatten() {
                if !config.idps.iter().any(|known| &known.name == idp) {
                    warn(format!(
                        "identity.idps names {idp:?}, which no [[idp]] section is: only sessions made through the API or the fleet's store with that IdP can match"
                    ));
                }
            }
        }
    }
    warnings
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}
