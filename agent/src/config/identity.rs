//! A policy's identity condition (`identity = { users, user_matches, groups, idps }`),
//! as Gateway's `identity.email`, `identity.groups.name` and the IdP: who the device's
//! user is decides whether the policy applies at all.

use regex::Regex;

/// Every part present must match; a list matches when any of its entries does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityCondition {
    /// The user, compared without regard to ASCII case (e-mail addresses).
    pub users: Option<Vec<String>>,
    /// The whole user name matches this regular expression.
    pub user_matches: Option<UserPattern>,
    /// The user is in one of these groups (exactly as the IdP names them).
    pub groups: Option<Vec<String>>,
    /// The session came from one of these identity providers (`[[idp]] name`, or a
    /// login's `--idp`).
    pub idps: Option<Vec<String>>,
}

/// Who a device's session says its user is.
#[derive(Clone, Copy, Debug)]
pub struct Identity<'a> {
    pub user: &'a str,
    pub idp: &'a str,
    pub groups: &'a [String],
}

impl IdentityCondition {
    pub fn matches(&self, who: &Identity<'_>) -> bool {
        self.users
            .as_ref()
            .is_none_or(|users| users.iter().any(|u| u.eq_ignore_ascii_case(who.user)))
            && self
                .user_matches
                .as_ref()
                .is_none_or(|p| p.matches(who.user))
            && self
                .groups
                .as_ref()
                .is_none_or(|groups| groups.iter().any(|g| who.groups.contains(g)))
            && self
                .idps
                .as_ref()
                .is_none_or(|idps| idps.iter().any(|i| i == who.idp))
    }

    /// As the config would write it, for `check` and `session show`.
    pub fn describe(&self) -> String {
        let list = |items: &[String]| {
            let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
            format!("[{}]", quoted.join(", "))
        };
        let mut parts = Vec::new();
        if let Some(users) = &self.users {
            parts.push(format!("users = {}", list(users)));
        }
        if let Some(p) = &self.user_matches {
            parts.push(format!("user_matches = {:?}", p.source));
        }
        if let Some(groups) = &self.groups {
            parts.push(format!("groups = {}", list(groups)));
        }
        if let Some(idps) = &self.idps {
            parts.push(format!("idps = {}", list(idps)));
        }
        format!("{{ {} }}", parts.join(", "))
    }
}

/// An identity mask: bit `i` set when `who` satisfies `conditions[i]`.
pub fn mask_of(conditions: &[IdentityCondition], who: &Identity<'_>) -> u64 {
    conditions
        .iter()
        .enumerate()
        .filter(|(_, c)| c.matches(who))
        .fold(0, |mask, (bit, _)| mask | 1 << bit)
}

/// Whether any of `conditions` depends on the user (else identities that differ only
/// in their user get the same mask).
pub fn looks_at_user(conditions: &[IdentityCondition]) -> bool {
    conditions
        .iter()
        .any(|c| c.users.is_some() || c.user_matches.is_some())
}

/// `mask_of` for many identities at once: each distinct identity is evaluated once
/// (and the user left out of the comparison when no condition looks at it), since a
/// million devices typically share far fewer identities, or at least group sets.
pub fn masks_of<'a>(
    conditions: &[IdentityCondition],
    who: impl IntoIterator<Item = &'a Identity<'a>>,
) -> Vec<u64> {
    let by_user = looks_at_user(conditions);
    let mut known: hashbrown::HashMap<(&str, &str, &[String]), u64> = hashbrown::HashMap::new();
    who.into_iter()
        .map(|w| {
            let user = if by_user { w.user } else { "" };
            *known
                .entry((user, w.idp, w.groups))
                .or_insert_with(|| mask_of(conditions, w))
        })
        .collect()
}

/// A `user_matches` pattern: the `regex` crate's syntax, matched against the whole
/// user name (as if written `^(?:pattern)$`).
#[derive(Clone, Debug)]
pub struct UserPattern {
    pub source: String,
    whole: Regex,
}

impl UserPattern {
    /// Patterns are bounded so that a config cannot make matching costly.
    pub const MAX_LEN: usize = 1024;
    const SIZE_LIMIT: usize = 1 << 20;

    pub fn new(source: &str) -> Result<Self, regex::Error> {
        let whole = regex::RegexBuilder::new(&format!("^(?:{source})$"))
            .size_limit(Self::SIZE_LIMIT)
            .build()?;
        Ok(Self {
            source: source.to_string(),
            whole,
        })
    }

    pub fn matches(&self, user: &str) -> bool {
        self.whole.is_match(user)
    }
}

impl PartialEq for UserPattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for UserPattern {}

#[cfg(test)]
mod tests {
    use super::*;

    fn who<'a>(user: &'a str, idp: &'a str, groups: &'a [String]) -> Identity<'a> {
        Identity { user, idp, groups }
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parts_present_are_anded_and_lists_match_any_entry() {
        let finance = strings(&["finance", "staff"]);
        let none: Vec<String> = vec![];
        let condition = IdentityCondition {
            users: None,
            user_matches: Some(UserPattern::new(r".*@example\.com").unwrap()),
            groups: Some(strings(&["finance", "audit"])),
            idps: Some(strings(&["okta"])),
        };
        assert!(condition.matches(&who("ann@example.com", "okta", &finance)));
        assert!(!condition.matches(&who("ann@example.com", "entra", &finance)));
        assert!(!condition.matches(&who("ann@example.com", "okta", &none)));
        assert!(!condition.matches(&who("ann@example.org", "okta", &finance)));
        // A full-string match: a suffix or prefix is not enough.
        assert!(!condition.matches(&who("ann@example.com.evil", "okta", &finance)));
        assert!(!condition.matches(&who("x\nann@example.com", "okta", &finance)));
    }

    #[test]
    fn users_compare_without_ascii_case_and_groups_exactly() {
        let groups = strings(&["Finance"]);
        let condition = IdentityCondition {
            users: Some(strings(&["Ann@Example.com"])),
            user_matches: None,
            groups: None,
            idps: None,
        };
        assert!(condition.matches(&who("ann@example.com", "okta", &groups)));
        assert!(!condition.matches(&who("bob@example.com", "okta", &groups)));
        let by_group = IdentityCondition {
            users: None,
            user_matches: None,
            groups: Some(strings(&["finance"])),
            idps: None,
        };
        assert!(!by_group.matches(&who("ann@example.com", "okta", &groups)));
    }

    #[test]
    fn a_mask_has_the_bits_of_the_conditions_met() {
        let condition = |groups: &[&str]| IdentityCondition {
            users: None,
            user_matches: None,
            groups: Some(strings(groups)),
            idps: None,
        };
        let conditions = [
            condition(&["finance"]),
            condition(&["staff"]),
            condition(&["finance", "audit"]),
        ];
        let groups = strings(&["finance"]);
        let ann = who("ann@example.com", "okta", &groups);
        assert_eq!(mask_of(&conditions, &ann), 0b101);
        assert_eq!(mask_of(&[], &ann), 0);
    }

    #[test]
    fn masks_of_many_equal_mask_of_each() {
        let conditions = [
            IdentityCondition {
                users: None,
                user_matches: None,
                groups: Some(strings(&["finance"])),
                idps: None,
            },
            IdentityCondition {
                users: None,
                user_matches: Some(UserPattern::new("a.*").unwrap()),
                groups: None,
                idps: Some(strings(&["okta"])),
            },
        ];
        let (finance, none) = (strings(&["finance"]), strings(&[]));
        let people = [
            who("ann@example.com", "okta", &finance),
            who("bob@example.com", "okta", &finance),
            who("ann@example.com", "entra", &none),
            who("al@example.com", "okta", &none),
        ];
        let each: Vec<u64> = people.iter().map(|p| mask_of(&conditions, p)).collect();
        assert_eq!(each, [0b11, 0b01, 0b00, 0b10]);
        assert_eq!(masks_of(&conditions, &people), each);
        // Without a condition on the user, users that share the rest share the mask.
        assert_eq!(masks_of(&conditions[..1], &people), [1, 1, 0, 0]);
    }

    #[test]
    fn describe_writes_the_condition_back() {
        let condition = IdentityCondition {
            users: Some(strings(&["a@example.com"])),
            user_matches: Some(UserPattern::new(".*@example\\.com").unwrap()),
            groups: Some(strings(&["finance"])),
            idps: Some(strings(&["okta", "entra"])),
        };
        assert_eq!(
            condition.describe(),
            r#"{ users = ["a@example.com"], user_matches = ".*@example\\.com", groups = ["finance"], idps = ["okta", "entra"] }"#
        );
    }
}
