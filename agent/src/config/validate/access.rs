//! The `[access]` section: one device-session duration for applications that accept
//! the device's session as their login, folded into the policies it applies to.

use super::Problems;
use crate::config::{AccessConfig, CheckSession, GoDuration, Policy, raw::RawAccess};

const PLACE: &str = "[access]";

pub(super) fn section(raw: Option<RawAccess>, problems: &mut Problems) -> Option<AccessConfig> {
    let raw = raw?;
    let Some(text) = raw.session_duration else {
        problems.add(PLACE, "session_duration", "missing; for example \"24h\"");
        return None;
    };
    match text.parse::<GoDuration>() {
        Ok(session_duration) => Some(AccessConfig {
            session_duration,
            apply_to_all: raw.apply_to_all.unwrap_or(false),
        }),
        Err(e) => {
            problems.add(
                PLACE,
                "session_duration",
                format!("invalid duration {text:?}: {e}"),
            );
            None
        }
    }
}

/// What a policy says for itself, as written: its `access`, and whether it has a
/// `check_session` of its own.
#[derive(Clone, Copy, Debug)]
pub(super) struct Asked {
    pub access: Option<bool>,
    pub own_check: bool,
}

/// Gives the access duration to the policies it applies to: those that ask for it
/// (`access = true`), or, with `apply_to_all`, every one that does not say
/// `access = false`. A policy's own `check_session` is never replaced.
pub(super) fn fold(
    policies: &mut [Policy],
    asked: &[Asked],
    access: Option<&AccessConfig>,
    problems: &mut Problems,
    place: impl Fn(usize) -> String,
) {
    for (i, (policy, asked)) in policies.iter_mut().zip(asked).enumerate() {
        let apply_to_all = access.is_some_and(|a| a.apply_to_all);
        if !asked.access.unwrap_or(apply_to_all) {
            continue;
        }
        let Some(access) = access else {
            problems.add(
                &place(i),
                "access",
                "access = true needs [access] session_duration, the device sessions' duration",
            );
            continue;
        };
        if !asked.own_check {
            policy.check_session = CheckSession::Enforce(access.session_duration);
            policy.access = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::{CheckSession, Config, ConfigError, GoDuration};

    const POLICIES: &str = r#"
[[policy]]
name = "Opted in"
precedence = 1
destinations = ["198.19.1.0/24"]
access = true

[[policy]]
name = "Own check"
precedence = 2
destinations = ["198.19.2.0/24"]
access = true
check_session = { enforce = true, duration = "8h" }

[[policy]]
name = "Plain"
precedence = 3
destinations = ["198.19.3.0/24"]

[[policy]]
name = "Opted out"
precedence = 4
destinations = ["198.19.4.0/24"]
access = false
"#;

    fn checks(access: &str) -> Vec<(String, CheckSession, bool)> {
        let text = format!("[agent]\ninterfaces = [\"eth0\"]\n{access}\n{POLICIES}");
        Config::parse(&text, "t.toml")
            .unwrap()
            .policies
            .into_iter()
            .map(|p| (p.name, p.check_session, p.access))
            .collect()
    }

    fn hours(h: u64) -> CheckSession {
        CheckSession::Enforce(GoDuration(Duration::from_secs(h * 3600)))
    }

    const NONE: CheckSession = CheckSession::Unlimited {
        enforce_without_duration: false,
    };

    #[test]
    fn access_applies_to_policies_that_ask_and_never_over_their_own_check() {
        let got = checks("[access]\nsession_duration = \"24h\"");
        assert_eq!(got[0], ("Opted in".into(), hours(24), true));
        assert_eq!(got[1], ("Own check".into(), hours(8), false));
        assert_eq!(got[2], ("Plain".into(), NONE, false));
        assert_eq!(got[3], ("Opted out".into(), NONE, false));
    }

    #[test]
    fn apply_to_all_covers_every_policy_that_does_not_opt_out() {
        let got = checks("[access]\nsession_duration = \"24h\"\napply_to_all = true");
        assert_eq!(got[0].1, hours(24));
        assert_eq!(got[1].1, hours(8), "its own check wins");
        assert_eq!(got[2], ("Plain".into(), hours(24), true));
        assert_eq!(got[3], ("Opted out".into(), NONE, false));
    }

    #[test]
    fn asking_for_access_without_its_duration_is_a_problem() {
        let text = format!("[agent]\ninterfaces = [\"eth0\"]\n{POLICIES}");
        let Err(ConfigError::Invalid { problems, .. }) = Config::parse(&text, "t.toml") else {
            panic!("refused");
        };
        let all: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(all[0].contains("policy \"Opted in\" (#1)"), "{all:?}");
        assert!(all[0].contains("access = true needs [access] session_duration"));
        let bad = "[agent]\ninterfaces = [\"eth0\"]\n[access]\nsession_duration = \"soon\"\n";
        let Err(ConfigError::Invalid { problems, .. }) = Config::parse(bad, "t.toml") else {
            panic!("refused");
        };
        assert!(
            problems[0]
                .to_string()
                .contains("[access], session_duration: invalid duration \"soon\""),
            "{problems:?}"
        );
    }
}
