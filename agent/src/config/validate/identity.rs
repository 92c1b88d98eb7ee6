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
