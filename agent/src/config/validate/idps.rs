//! The `[[idp]]` sections: the OpenID providers users sign in with at the portal.

use std::collections::HashSet;

use super::{
    Problems,
    fields::{http_url, path},
};
use crate::{
    config::{IdpConfig, raw::RawIdp},
    input::{Spaces, name::check_name},
};

const DEFAULT_SCOPES: [&str; 3] = ["openid", "email", "profile"];

pub(super) fn section(raw: Vec<RawIdp>, problems: &mut Problems) -> Vec<IdpConfig> {
    let mut names = HashSet::new();
    raw.into_iter()
        .enumerate()
        .filter_map(|(i, idp)| {
            let place = match &idp.name {
                Some(name) => format!("[[idp]] {name:?} (#{})", i + 1),
                None => format!("[[idp]] #{}", i + 1),
            };
            let idp = one(idp, &place, problems)?;
            if !names.insert(idp.name.clone()) {
                problems.add(
                    &place,
                    "name",
                    "another [[idp]] has this name; each needs its own",
                );
            }
            Some(idp)
        })
        .collect()
}

/// One section, or `None` (with its problems added) when a required field is missing.
fn one(raw: RawIdp, place: &str, problems: &mut Problems) -> Option<IdpConfig> {
    let mut required = |value: Option<String>, field: &str, example: &str| {
        if value.is_none() {
            problems.add(place, field, format!("missing; for example {example}"));
        }
        value
    };
    let name = required(
        raw.name,
        "name",
        "name = \"entra\" (the IdP sessions record)",
    );
    let issuer = required(
        raw.issuer,
        "issuer",
        "issuer = \"https://login.example.com/realms/staff\"",
    );
    let client_id = required(raw.client_id, "client_id", "client_id = \"sessiongate\"");
    let secret = required(
        raw.client_secret_file,
        "client_secret_file",
        "client_secret_file = \"/etc/sessiongate/idp-secret\"",
    );
    if let Some(name) = &name
        && let Err(reason) = check_name(name, Spaces::Refused)
    {
        problems.add(place, "name", format!("{name:?}: {reason}"));
    }
    if let Some(issuer) = &issuer {
        http_url(issuer, (place, "issuer"), problems);
    }
    if client_id.as_ref().is_some_and(|id| id.trim().is_empty()) {
        problems.add(place, "client_id", "is empty");
    }
    let scopes = scopes(raw.scopes, place, problems);
    let mut claim = |value: Option<String>, field: &str, default: &str| match value {
        Some(v) if v.trim().is_empty() => {
            problems.add(place, field, "is empty");
            String::new()
        }
        Some(v) => v,
        None => default.to_string(),
    };
    let user_claim = claim(raw.user_claim, "user_claim", "email");
    let groups_claim = claim(raw.groups_claim, "groups_claim", "groups");
    let ca_file = raw
        .ca_file
        .map(|f| path(Some(f), "", (place, "ca_file"), problems));
    Some(IdpConfig {
        name: name?,
        issuer: issuer?,
        client_id: client_id?,
        client_secret_file: path(secret, "", (place, "client_secret_file"), problems),
        scopes,
        user_claim,
        groups_claim,
        force_interaction: raw.force_interaction.unwrap_or(false),
        ca_file,
    })
}

/// The scopes asked for: `openid` always among them.
fn scopes(raw: Option<Vec<String>>, place: &str, problems: &mut Problems) -> Vec<String> {
    let scopes = raw.unwrap_or_else(|| DEFAULT_SCOPES.map(str::to_string).to_vec());
    if !scopes.iter().any(|s| s == "openid") {
        problems.add(
            place,
            "scopes",
            "must include \"openid\": without it the provider sends no ID token",
        );
    }
    if let Some(bad) = scopes
        .iter()
        .find(|s| s.is_empty() || s.contains(char::is_whitespace))
    {
        problems.add(place, "scopes", format!("{bad:?} is not one scope name"));
    }
    scopes
}

/// `portal_url`: where devices reach the portal, an http(s) URL without a path.
pub(super) fn portal_url(raw: Option<String>, problems: &mut Problems) -> Option<String> {
    let url = raw?;
    if !http_url(&url, ("[agent]", "portal_url"), problems) {
        return None;
    }
    let trimmed = url.trim_end_matches('/');
    let after_scheme = trimmed.split_once("://").map_or("", |(_, rest)| rest);
    if after_scheme.contains(['/', '?', '#']) {
        problems.add(
            "[agent]",
            "portal_url",
            format!("{url:?} has a path; give the portal's address only, e.g. \"http://198.18.0.1:8511\""),
        );
        return None;
    }
    Some(trimmed.to_string())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use crate::config::{Config, ConfigError, IdpConfig};

    const PORTAL: &str = "[agent]\ninterfaces = [\"eth0\"]\nportal_listen = \"[::]:8511\"\nportal_url = \"http://198.18.0.1:8511/\"\n";

    fn parse(text: &str) -> Result<Config, Vec<String>> {
        Config::parse(text, "t.toml").map_err(|e| match e {
            ConfigError::Invalid { problems, .. } => {
                problems.iter().map(ToString::to_string).collect()
            }
            other => vec![other.to_string()],
        })
    }

    #[test]
    fn an_idp_gets_its_defaults_and_the_portal_url_loses_its_slash() {
        let config = parse(&format!(
            "{PORTAL}\n[[idp]]\nname = \"corp\"\nissuer = \"https://idp.example.com/realms/staff\"\nclient_id = \"sg\"\nclient_secret_file = \"/etc/sessiongate/idp-secret\"\n"
        ))
        .unwrap();
        assert_eq!(
            config.idps,
            [IdpConfig {
                name: "corp".into(),
                issuer: "https://idp.example.com/realms/staff".into(),
                client_id: "sg".into(),
                client_secret_file: PathBuf::from("/etc/sessiongate/idp-secret"),
                scopes: vec!["openid".into(), "email".into(), "profile".into()],
                user_claim: "email".into(),
                groups_claim: "groups".into(),
                force_interaction: false,
                ca_file: None,
            }]
        );
        assert_eq!(
            config.agent.portal_url.as_deref(),
            Some("http://198.18.0.1:8511")
        );
        // No reauth_url is needed: the page's button signs in at the portal.
        assert!(config.agent.reauth_url.is_none());
    }

    #[test]
    fn every_idp_problem_is_named_at_once() {
        let problems = parse(
            "[agent]\ninterfaces = [\"eth0\"]\nportal_url = \"http://198.18.0.1:8511/x\"\n\n[[idp]]\nname = \"corp\"\nissuer = \"ftp://idp\"\nclient_id = \"\"\nclient_secret_file = \"/s\"\nscopes = [\"email\"]\n\n[[idp]]\nname = \"corp\"\nissuer = \"https://idp\"\nclient_id = \"x\"\n\n[[idp]]\nissuer = \"https://idp\"\n",
        )
        .unwrap_err();
        let all = problems.join("\n");
        for needle in [
            "portal_url: \"http://198.18.0.1:8511/x\" has a path",
            "[[idp]] \"corp\" (#1), issuer: \"ftp://idp\" is not an http:// or https:// URL",
            "[[idp]] \"corp\" (#1), client_id: is empty",
            "[[idp]] \"corp\" (#1), scopes: must include \"openid\"",
            "[[idp]] \"corp\" (#2), client_secret_file: missing",
            "[[idp]] #3, name: missing",
            "portal_listen: [[idp]] is set",
            "portal_url: [[idp]] is set",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn two_idps_of_one_name_are_refused() {
        let problems = parse(&format!(
            "{PORTAL}\n[[idp]]\nname = \"corp\"\nissuer = \"https://a\"\nclient_id = \"a\"\nclient_secret_file = \"/a\"\n\n[[idp]]\nname = \"corp\"\nissuer = \"https://b\"\nclient_id = \"b\"\nclient_secret_file = \"/b\"\n"
        ))
        .unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("another [[idp]] has this name")),
            "{problems:?}"
        );
    }

    #[test]
    fn the_portal_url_matches_the_listener_and_its_certificate() {
        let agent = |extra: &str| {
            parse(&format!(
                "[agent]\ninterfaces = [\"eth0\"]\nportal_listen = \"[::]:8511\"\nreauth_url = \"https://sso\"\n{extra}\n"
            ))
        };
        let tls = "portal_tls_cert = \"/c.pem\"\nportal_tls_key = \"/k.pem\"";
        let ok = agent(&format!("portal_url = \"https://gw:8511\"\n{tls}")).unwrap();
        assert_eq!(
            ok.agent.portal_tls,
            Some((PathBuf::from("/c.pem"), PathBuf::from("/k.pem")))
        );
        for (extra, needle) in [
            (
                "portal_url = \"https://gw:8511\"".to_string(),
                "is https://: set portal_tls_cert",
            ),
            (
                format!("portal_url = \"http://gw:8511\"\n{tls}"),
                "is http://, but the portal has a certificate",
            ),
            (
                format!("portal_url = \"https://gw\"\n{tls}"),
                "is port 443, but the portal listens on 8511",
            ),
            (
                "portal_url = \"http://gw:8511\"\nportal_tls_cert = \"/c.pem\"".to_string(),
                "portal_tls_key: portal_tls_cert is set: give its key too",
            ),
            (tls.to_string(), "portal_url: portal_tls_cert is set"),
        ] {
            let problems = agent(&extra).unwrap_err().join("\n");
            assert!(problems.contains(needle), "{extra}: {problems}");
        }
    }
}
