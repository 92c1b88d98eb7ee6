//! The control API's requests and replies as JSON: the server writes them (through
//! `control`) and the CLI reads them, so both are compiled against these types alone.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::sessions::import::LineError;

/// Body of `POST /v1/sessions`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    pub ip: String,
    pub user: String,
    pub idp: Option<String>,
    /// RFC 3339; absent means now.
    pub at: Option<String>,
    /// The user's groups at the identity provider (for identity-conditioned policies);
    /// a new login replaces them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// Reloads so far and how the last one went.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReloadStatus {
    pub succeeded: u64,
    pub failed: u64,
    /// Unix time of the last attempt, and its problems (empty when it succeeded).
    pub last_at: Option<i64>,
    pub last_ok: Option<bool>,
    pub last_problems: Vec<String>,
}

/// What a successful reload did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reloaded {
    pub generation: u32,
    pub policies: usize,
    pub prefixes: usize,
    /// Changes that only a restart applies, and `check`'s warnings.
    pub warnings: Vec<String>,
}

/// A reload that changed nothing, with every reason.
#[derive(Clone, Debug, Error, PartialEq, Serialize, Deserialize)]
#[error("reload rejected; the running policy stays:\n  {}", .problems.join("\n  "))]
pub struct ReloadRejected {
    pub problems: Vec<String>,
}

/// A session as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionView {
    pub ip: IpAddr,
    pub user: String,
    pub idp: String,
    pub authenticated_at: String,
    /// Age by the kernel's clock, Go format, to the second.
    pub age: String,
    pub age_seconds: i64,
    /// The user's groups at the identity provider, when it gave them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// `session show`: the session and how it stands against each session-checked policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionDetail {
    #[serde(flatten)]
    pub session: SessionView,
    pub policies: Vec<PolicyStanding>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyStanding {
    pub policy: String,
    pub duration: String,
    pub satisfied: bool,
    /// Time left while satisfied, or time since it expired.
    pub margin: String,
    /// The policy's identity condition, as the config writes it; `None`: everyone's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Whether the policy applies to this device's user (always without a condition).
    #[serde(default = "applies_by_default")]
    pub applies: bool,
}

fn applies_by_default() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Verdict counters by name, in code order.
    pub verdicts: Vec<(String, u64)>,
    pub events: Vec<(String, u64)>,
    /// Visible refusals: RSTs and ICMP errors sent or not, portal hand-overs.
    #[serde(default)]
    pub replies: Vec<(String, u64)>,
    /// Refused new flows per policy.
    pub policy_drops: Vec<(String, u64)>,
    pub sessions: usize,
    pub udp_flows: usize,
    pub interfaces: Vec<(String, String)>,
    /// Where sessions come from and how that stands.
    #[serde(default)]
    pub store: StoreStatus,
}

/// What an import did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImportReport {
    pub imported: usize,
    /// Devices that had no session before, and devices whose session was reset.
    pub new_devices: usize,
    pub reset_devices: usize,
    /// Bad lines left out (`skip_bad`), and the first of them.
    pub skipped_lines: usize,
    pub errors: Vec<LineError>,
}

impl ImportReport {
    pub fn new(imported: usize, reset: usize, skipped: usize, errors: Vec<LineError>) -> Self {
        Self {
            imported,
            new_devices: imported - reset,
            reset_devices: reset,
            skipped_lines: skipped,
            errors,
        }
    }
}

/// How the store stands, for status and metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreStatus {
    /// "local" or "etcd".
    pub kind: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// The follower is watching the store (always true for "local").
    pub connected: bool,
    /// Unix time of the last change of `connected`.
    #[serde(default)]
    pub since: Option<i64>,
    /// The store revision the kernel reflects.
    #[serde(default)]
    pub revision: i64,
    #[serde(default)]
    pub last_error: Option<String>,
    /// Connections lost, full snapshots taken (the first one included), watch events
    /// applied, device keys whose value is not a session (now), and writes through
    /// this agent that lost a compare-and-swap to another writer and were judged again.
    #[serde(default)]
    pub disconnects: u64,
    #[serde(default)]
    pub resyncs: u64,
    #[serde(default)]
    pub events: u64,
    #[serde(default)]
    pub bad_entries: u64,
    #[serde(default)]
    pub lost_races: u64,
}

impl StoreStatus {
    pub fn local() -> Self {
        Self {
            kind: "local".to_string(),
            connected: true,
            ..Self::default()
        }
    }
}
