//! What a verified ID token says about the user: who (the configured user claim), in
//! which groups (the groups claim), and when they last authenticated (`auth_time`).
//! The token itself is verified by the `openidconnect` crate before any of this runs.

use openidconnect::AdditionalClaims;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::SignInError;

/// Every claim the crate does not model itself (`groups`, custom user claims), kept
/// as the provider sent it.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct OtherClaims(pub Map<String, Value>);

impl AdditionalClaims for OtherClaims {}

/// The claims sessiongate reads, taken out of a verified token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    pub email: Option<String>,
    pub preferred_username: Option<String>,
    pub name: Option<String>,
    /// Unix time of the last authentication, if the token says.
    pub auth_time: Option<i64>,
    pub other: Map<String, Value>,
}

/// Who signed in, as a session records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub groups: Vec<String>,
    pub authenticated_at: OffsetDateTime,
}

impl Claims {
    /// The identity these claims give, by `user_claim` and `groups_claim`. A token
    /// without `auth_time` is refused: the session timer must start at the real
    /// authentication, not at the token's issue. With `not_before` (forced
    /// interaction), an authentication older than the start of the flow is refused too.
    pub fn identity(
        &self,
        user_claim: &str,
        groups_claim: &str,
        not_before: Option<i64>,
    ) -> Result<Identity, SignInError> {
        let user = self
            .text(user_claim)
            .ok_or_else(|| SignInError::MissingClaim {
                claim: user_claim.to_string(),
            })?;
        let auth_time = self.auth_time.ok_or_else(|| SignInError::MissingClaim {
            claim: "auth_time".to_string(),
        })?;
        if let Some(started) = not_before
            && auth_time < started
        {
            return Err(SignInError::NotInteractive { auth_time, started });
        }
        let authenticated_at = OffsetDateTime::from_unix_timestamp(auth_time).map_err(|_| {
            SignInError::MissingClaim {
                claim: "auth_time".to_string(),
            }
        })?;
        Ok(Identity {
            user,
            groups: self.groups(groups_claim),
            authenticated_at,
        })
    }

    /// A claim as text: the standard ones the crate reads, or any other string claim.
    fn text(&self, claim: &str) -> Option<String> {
        match claim {
            "sub" => Some(self.sub.clone()),
            "email" => self.email.clone(),
            "preferred_username" => self.preferred_username.clone(),
            "name" => self.name.clone(),
            other => self.other.get(other)?.as_str().map(str::to_string),
        }
        .filter(|text| !text.is_empty())
    }

    /// The groups claim: a list of names (or one name), sorted, without duplicates; none
    /// when the provider sends none.
    fn groups(&self, claim: &str) -> Vec<String> {
        let mut groups: Vec<String> = match self.other.get(claim) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            Some(Value::String(one)) => vec![one.clone()],
            _ => Vec::new(),
        };
        groups.sort();
        groups.dedup();
        groups
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn claims(other: Value, auth_time: Option<i64>) -> Claims {
        Claims {
            sub: "u-1".into(),
            email: Some("alice@example.com".into()),
            preferred_username: None,
            name: Some("Alice".into()),
            auth_time,
            other: other.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn the_user_and_groups_come_from_the_configured_claims() {
        let c = claims(
            json!({"groups": ["staff", "payroll", "staff"], "upn": "alice@corp"}),
            Some(1_800_000_000),
        );
        let id = c.identity("email", "groups", None).unwrap();
        assert_eq!(id.user, "alice@example.com");
        assert_eq!(id.groups, ["payroll", "staff"]);
        assert_eq!(id.authenticated_at.unix_timestamp(), 1_800_000_000);
        assert_eq!(c.identity("upn", "roles", None).unwrap().user, "alice@corp");
        assert!(c.identity("upn", "roles", None).unwrap().groups.is_empty());
        assert_eq!(c.identity("sub", "groups", None).unwrap().user, "u-1");
    }

    #[test]
    fn a_token_without_the_user_or_auth_time_is_refused() {
        let c = claims(json!({}), Some(1_800_000_000));
        assert!(matches!(
            c.identity("preferred_username", "groups", None),
            Err(SignInError::MissingClaim { claim }) if claim == "preferred_username"
        ));
        let c = claims(json!({}), None);
        assert!(matches!(
            c.identity("email", "groups", None),
            Err(SignInError::MissingClaim { claim }) if claim == "auth_time"
        ));
    }

    #[test]
    fn forced_interaction_refuses_an_authentication_from_before_the_flow() {
        let c = claims(json!({}), Some(1_800_000_000));
        assert!(matches!(
            c.identity("email", "groups", Some(1_800_000_001)),
            Err(SignInError::NotInteractive { .. })
        ));
        assert!(c.identity("email", "groups", Some(1_800_000_000)).is_ok());
    }
}
