//! From `RawConfig` to `Config`, collecting every problem instead of stopping at the
//! first one. One file per section; `fields` holds the readers they share.

mod access;
mod agent;
mod dns;
mod fields;
mod identity;
mod idps;
mod limits;
mod policies;
mod store;

use ipnet::IpNet;

use super::{
    AgentConfig, Config, IdpConfig, OnExpired, Policy, Problem,
    raw::{RawBypass, RawConfig},
};

/// Every problem found so far, in the order found.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, place: &str, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            place: place.to_string(),
            field: field.into(),
            message: message.into(),
        });
    }
}

/// A config with no problem in it, or every problem at once. The sections are read in
/// a fixed order, so the same file always gives the same list.
pub(super) fn validate(raw: RawConfig, source: &str) -> Result<Config, Vec<Problem>> {
    let mut problems = Problems::default();
    let agent = agent::section(raw.agent, &mut problems);
    let dns = dns::section(raw.dns, &mut problems);
    let bypass = bypass(raw.bypass, &mut problems);
    let limits = limits::section(raw.limits, &mut problems);
    let store = store::section(raw.store, &mut problems);
    let names: Vec<Option<String>> = raw.policies.iter().map(|p| p.name.clone()).collect();
    let (mut policies, asked) = policies::section(raw.policies, &mut problems);
    let idps = idps::section(raw.idps, &mut problems);
    let access = access::section(raw.access, &mut problems);
    access::fold(&mut policies, &asked, access.as_ref(), &mut problems, |i| {
        policies::place(names[i].as_deref(), i + 1)
    });
    portal_needs(&agent, &policies, &idps, &mut problems);
    if problems.0.is_empty() {
        Ok(Config {
            source: source.to_string(),
            agent,
            dns,
            bypass,
            limits,
            store,
            policies,
            idps,
            access,
        })
    } else {
        Err(problems.0)
    }
}

/// Devices reach the portal's own pages at `portal_url`, which must therefore be the
/// port the portal listens on, and HTTPS exactly when the portal has a certificate.
fn portal_address(agent: &AgentConfig, problems: &mut Problems) {
    let Some(url) = agent.portal_url.as_deref() else {
        if agent.portal_tls.is_some() {
            problems.add(
                "[agent]",
                "portal_url",
                "portal_tls_cert is set: give the https:// address devices reach the portal at",
            );
        }
        return;
    };
    let Ok(parsed) = url::Url::parse(url) else {
        return;
    };
    let https = parsed.scheme() == "https";
    if https != agent.portal_tls.is_some() {
        problems.add(
            "[agent]",
            "portal_url",
            if https {
                format!("{url:?} is https://: set portal_tls_cert and portal_tls_key, the portal's certificate")
            } else {
                format!("{url:?} is http://, but the portal has a certificate: write https://")
            },
        );
    }
    if let (Some(port), Some(listen)) = (parsed.port_or_known_default(), agent.portal_listen)
        && port != listen.port()
    {
        problems.add(
            "[agent]",
            "portal_url",
            format!(
                "{url:?} is port {port}, but the portal listens on {}: devices would not reach it",
                listen.port()
            ),
        );
    }
}

/// `[bypass]` is one list of destinations: no file of its own.
fn bypass(raw: RawBypass, problems: &mut Problems) -> Vec<IpNet> {
    fields::cidr_list(&raw.destinations, "[bypass]", "destinations", problems)
}

/// A redirect policy needs the portal; the portal a place to send users to (an IdP to
/// sign in with, or `reauth_url`); and signing in, the portal's own address.
fn portal_needs(
    agent: &AgentConfig,
    policies: &[Policy],
    idps: &[IdpConfig],
    problems: &mut Problems,
) {
    let redirecting = policies
        .iter()
        .enumerate()
        .filter(|(_, p)| p.on_expired == OnExpired::Redirect);
    for (i, p) in redirecting {
        if agent.portal_listen.is_none() {
            problems.add(
                &format!("policy {:?} (#{})", p.name, i + 1),
                "on_expired",
                "\"redirect\" steers HTTP to the re-authentication portal: set [agent] portal_listen, e.g. \"[::]:8511\"",
            );
        }
    }
    if agent.portal_listen.is_some() && agent.reauth_url.is_none() && idps.is_empty() {
        problems.add(
            "[agent]",
            "reauth_url",
            "portal_listen is set: the portal's page links to reauth_url, where users sign in again; set it, or add an [[idp]] to sign in with at the portal",
        );
    }
    portal_address(agent, problems);
    if !idps.is_empty() {
        if agent.portal_listen.is_none() {
            problems.add(
                "[agent]",
                "portal_listen",
                "[[idp]] is set: users sign in at the portal; set portal_listen, e.g. \"[::]:8511\"",
            );
        }
        if agent.portal_url.is_none() {
            problems.add(
                "[agent]",
                "portal_url",
                "[[idp]] is set: the providers send users back to {portal_url}/callback; set it to the portal's address as devices reach it, e.g. \"http://198.18.0.1:8511\"",
            );
        }
    }
}

#[cfg(test)]
mod tests;
