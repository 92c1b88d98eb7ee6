//! A policy's `identity = { users, user_matches, groups, idps }`: each part optional
//! but at least one given, no empty list, a pattern that compiles; and at most
//! `MAX_IDENTITY_POLICIES` policies with one (the kernel keeps one bit per policy).

use agent_common::maps::MAX_IDENTITY_POLICIES;

use super::Problems;
use crate::{
    config::{
        Policy,
        identity::{IdentityCondition, UserPattern},
        raw::RawIdentity,
    },
    input::{Spaces, check_name},
};

pub(super) fn condition(
    raw: Option<RawIdentity>,
    place: &str,
    problems: &mut Problems,
) -> Option<IdentityCondition> {
    let raw = raw?;
    let given = raw.users.is_some()
        || raw.user_matches.is_some()
        || raw.groups.is_some()
        || raw.idps.is_some();
    if !given {
        problems.add(
            place,
            "identity",
            "empty: give users, user_matches, groups or idps, or leave it out",
        );
    }
    let mut list = |items: Option<Vec<String>>, field: &str, what: &str| {
        let items = items?;
        let field = format!("identity.{field}");
        if items.is_empty() {
            problems.add(
                place,
                &field,
                format!("empty: list at least one {what}, or leave it out"),
            );
        }
        for item in &items {
            if let Err(problem) = check_name(item, Spaces::Allowed) {
                problems.add(place, &field, format!("{item:?}: {problem}"));
            }
        }
        Some(items)
    };
    let users = list(raw.users, "users", "user");
    let groups = list(raw.groups, "groups", "group");
    let idps = list(raw.idps, "idps", "identity provider");
    let user_matches = raw.user_matches.and_then(|source| {
        if source.len() > UserPattern::MAX_LEN {
            problems.add(
                place,
                "identity.user_matches",
                format!("longer than {} characters", UserPattern::MAX_LEN),
            );
            return None;
        }
        UserPattern::new(&source)
            .map_err(|e| {
                problems.add(
                    place,
                    "identity.user_matches",
                    format!("{source:?} is not a regular expression: {e}"),
                );
            })
            .ok()
    });
    Some(IdentityCondition {
        users,
        user_matches,
        groups,
        idps,
    })
}

/// The kernel keeps one bit per identity-conditioned policy in each device's mask.
pub(super) fn count(policies: &[Policy], problems: &mut Problems) {
    let n = policies.iter().filter(|p| p.identity.is_some()).count();
    if n > MAX_IDENTITY_POLICIES {
        problems.add(
            "[[policy]]",
            "identity",
            format!("{n} policies have an identity condition; at most {MAX_IDENTITY_POLICIES} may"),
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{
        Config,
        validate::tests::{assert_exactly, has, problems},
    };

    #[test]
    fn identity_conditions_are_checked_part_by_part() {
        let policy = |n: usize, identity: &str| {
            format!(
                "[[policy]]\nname = \"p{n}\"\nprecedence = {n}\ndestinations = [\"198.19.{n}.0/24\"]\ncheck_session = {{ enforce = true, duration = \"1h\" }}\nidentity = {identity}\n"
            )
        };
        let text = format!(
            "[agent]\ninterfaces = [\"eth0\"]\n{}{}{}{}",
            policy(1, "{ users = [] }"),
            policy(2, "{ user_matches = \"(unclosed\" }"),
            policy(3, "{}"),
            policy(4, "{ groups = [\"fin\\u202eance\"], idps = [\"okta\"] }"),
        );
        assert_exactly(
            &problems(&text),
            &[
                ("policy \"p1\" (#1)", "identity.users", "empty"),
                (
                    "policy \"p2\" (#2)",
                    "identity.user_matches",
                    "not a regular expression",
                ),
                ("policy \"p3\" (#3)", "identity", "empty"),
                ("policy \"p4\" (#4)", "identity.groups", "invisible"),
            ],
        );
        // Unknown keys are syntax errors with a location.
        let unknown = format!(
            "[agent]\ninterfaces = [\"eth0\"]\n{}",
            policy(1, "{ email = \"a\" }")
        );
        let err = Config::parse(&unknown, "test.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("email"), "{err}");
        // At most 64 policies may have a condition.
        let many: String = (1..=65)
            .map(|n| policy(n, "{ groups = [\"g\"] }"))
            .collect();
        let text = format!("[agent]\ninterfaces = [\"eth0\"]\n{many}");
        assert!(has(
            &problems(&text),
            "[[policy]]",
            "identity",
            "65 policies"
        ));
        // A valid one parses into its parts.
        let ok = format!(
            "[agent]\ninterfaces = [\"eth0\"]\n{}",
            policy(
                1,
                "{ users = [\"a@example.com\"], user_matches = \".*@example\\\\.com\", groups = [\"finance\"], idps = [\"okta\"] }"
            )
        );
        let config = Config::parse(&ok, "test.toml").expect("valid");
        let condition = config.policies[0].identity.as_ref().expect("a condition");
        assert_eq!(
            condition.users.as_deref(),
            Some(&["a@example.com".to_string()][..])
        );
        assert_eq!(
            condition.user_matches.as_ref().unwrap().source,
            ".*@example\\.com"
        );
    }
}
