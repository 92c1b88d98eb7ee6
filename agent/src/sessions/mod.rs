//! Device sessions: who authenticated on which device, through which IdP, and when
//! (the rules are Gateway's, `rules`).
//!
//! One owner changes them: the session mirror (`SessionMirror`) holds the local store
//! (memory and journal, `SessionStore`) and the kernel's session maps under one lock.
//! Every change, a login, logout or import through the API or a change from the fleet's
//! store, checks the request (changing nothing), writes the kernel, then appends to the
//! journal, and undoes the kernel write if the append fails. A local change is
//! acknowledged once the journal holds it durably (`Syncer::wait`, group commit); if
//! that sync fails, every change not yet durable is undone, in the kernel too.

mod error;
pub mod import;
mod journal;
mod kernel;
mod mirror;
mod names;
mod rules;
mod store;
pub mod table;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use agent_common::maps::Session;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::clock::ClockPair;
pub use error::{ChangeError, SessionError};
pub use journal::durable::{SyncFailed, Syncer, Ticket};
pub use kernel::KernelSessions;
pub use mirror::{Imported, SessionMirror};
pub(crate) use rules::check_name;
pub use rules::{Enrolled, check_identity, plan_import, plan_login};
pub use store::SessionStore;

/// The IdP recorded when a login names none.
pub const DEFAULT_IDP: &str = "default";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub ip: IpAddr,
    pub user: String,
    pub idp: String,
    #[serde(with = "time::serde::rfc3339")]
    pub authenticated_at: OffsetDateTime,
    /// The boot the boot-clock time below belongs to.
    pub boot_id: String,
    /// Boot-clock time of the authentication, as written to the kernel.
    pub authenticated_at_boot_ns: i64,
    /// The user's groups at the identity provider when they signed in (none for a
    /// session made through the API without them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

impl SessionRecord {
    /// The record's fields, borrowed (as a journal line's are read in place).
    pub fn fields(&self) -> table::Fields<'_, &[String]> {
        table::Fields {
            ip: self.ip,
            user: &self.user,
            idp: &self.idp,
            authenticated_at: self.authenticated_at,
            boot_id: &self.boot_id,
            authenticated_at_boot_ns: self.authenticated_at_boot_ns,
            groups: &self.groups,
        }
    }

    /// Who the session says the device's user is, for policies' identity conditions.
    pub fn identity(&self) -> crate::config::Identity<'_> {
        crate::config::Identity {
            user: &self.user,
            idp: &self.idp,
            groups: &self.groups,
        }
    }

    /// The kernel's view of this session now. Within the boot it was recorded in, the
    /// recorded boot-clock time (immune to wall-clock steps); after a reboot, converted
    /// from wall-clock time.
    pub fn kernel_value(&self, clock: &ClockPair, current_boot: &str) -> Session {
        let authenticated_at_ns = if !self.boot_id.is_empty() && self.boot_id == current_boot {
            self.authenticated_at_boot_ns
        } else {
            clock.boot_ns_of(self.authenticated_at)
        };
        // The identity slot is the kernel writer's to choose.
        Session {
            authenticated_at_ns,
            identity: 0,
            _pad: 0,
        }
    }

    /// Whom this session binds its device to (the login rules' question).
    pub fn enrolled(&self) -> Enrolled<'_> {
        Enrolled {
            user: &self.user,
            idp: &self.idp,
        }
    }
}

#[derive(Clone, Debug)]
pub struct LoginRequest {
    pub ip: IpAddr,
    pub user: String,
    pub idp: Option<String>,
    /// When the authentication happened; `None` is now.
    pub at: Option<OffsetDateTime>,
    /// The user's groups, as the identity provider gave them.
    pub groups: Vec<String>,
}

/// One change from the fleet's store, in revision order.
#[derive(Clone, Debug)]
pub enum StoreChange {
    Put(SessionRecord),
    Delete(IpAddr),
}

/// What a full resync changed here, and the devices it could not change (logged; they
/// keep their previous state).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreDiff {
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
    pub not_applied: usize,
}

impl std::ops::AddAssign for StoreDiff {
    fn add_assign(&mut self, other: Self) {
        self.added += other.added;
        self.changed += other.changed;
        self.removed += other.removed;
        self.not_applied += other.not_applied;
    }
}

impl StoreDiff {
    fn failed(&mut self, ip: IpAddr, error: &ChangeError) {
        tracing::error!(device = %ip, error = %error, "could not apply the store's session here; the device keeps its previous state");
        self.not_applied += 1;
    }
}

/// The running agent's lock in `state_dir`, holding its pid.
pub const LOCK_FILE: &str = "agent.lock";

/// Files the agent keeps in `state_dir`.
pub fn state_files(state_dir: &Path) -> Vec<PathBuf> {
    journal::FILES
        .iter()
        .chain([&LOCK_FILE])
        .map(|f| state_dir.join(f))
        .collect()
}

#[cfg(test)]
mod durability_tests;
#[cfg(test)]
mod mirror_tests;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
