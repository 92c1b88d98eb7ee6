//! Device sessions: who authenticated on which device, through which IdP, and when.
//! The rules are Gateway's: a login resets the device's session timer to zero; a
//! device is bound to one user until logged out; and a session only resets through the
//! IdP the device enrolled with.
//!
//! Changes are two-phase so the kernel map and this store never disagree: `plan_*`
//! checks a request and returns what would change without changing anything, the
//! caller writes the kernel map, then `commit_*` records it durably.

pub mod import;
mod journal;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
};

use agent_common::maps::Session;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use time::OffsetDateTime;

use crate::{
    clock::{ClockPair, boot_id},
    input::{
        AddressError, NameProblem, Spaces,
        address::device,
        name::{self, preview},
    },
};
use import::{ImportRecord, LineError};
use journal::Journal;

/// The IdP recorded when a login names none.
pub const DEFAULT_IDP: &str = "default";
/// A login time this far ahead of the agent's clock is refused; closer ones are taken
/// as "now" (small skew between the caller's clock and ours).
const FUTURE_TOLERANCE: time::Duration = time::Duration::seconds(5);

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
}

impl SessionRecord {
    /// The kernel's view of this session now. Within the boot it was recorded in, the
    /// recorded boot-clock time (immune to wall-clock steps); after a reboot, converted
    /// from wall-clock time.
    pub fn kernel_value(&self, clock: &ClockPair, current_boot: &str) -> Session {
        let authenticated_at_ns = if !self.boot_id.is_empty() && self.boot_id == current_boot {
            self.authenticated_at_boot_ns
        } else {
            clock.boot_ns_of(self.authenticated_at)
        };
        Session {
            authenticated_at_ns,
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
}

#[derive(Debug, Error)]
pub enum SessionError {
    #[error(
        "device {ip} is bound to user {current:?}; {requested:?} cannot log in on it until it is logged out (one user per device)"
    )]
    OtherUser {
        ip: IpAddr,
        current: String,
        requested: String,
    },
    #[error(
        "device {ip} enrolled through IdP {enrolled:?}; its session resets only through that IdP, not {requested:?}"
    )]
    WrongIdp {
        ip: IpAddr,
        enrolled: String,
        requested: String,
    },
    #[error("authentication time {at} is in the future (agent clock: {now})")]
    InFuture {
        at: OffsetDateTime,
        now: OffsetDateTime,
    },
    #[error("no session for device {ip}")]
    NotFound { ip: IpAddr },
    /// `value` is the name as `input::name::preview` shows it.
    #[error("{field} {value} is invalid: {reason}")]
    InvalidName {
        field: &'static str,
        value: String,
        reason: NameProblem,
    },
    #[error(transparent)]
    NotADevice(#[from] AddressError),
    #[error("session state {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("session state {path}, line {line}: {message}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

impl SessionError {
    /// A stable machine-readable code for API clients.
    pub const fn code(&self) -> &'static str {
        match self {
            Self::OtherUser { .. } => "other_user",
            Self::WrongIdp { .. } => "wrong_idp",
            Self::InFuture { .. } => "in_future",
            Self::NotFound { .. } => "not_found",
            Self::InvalidName { .. } | Self::NotADevice(_) => "invalid",
            Self::Io { .. } | Self::Corrupt { .. } => "state_error",
        }
    }
}

pub struct SessionStore {
    sessions: BTreeMap<IpAddr, SessionRecord>,
    journal: Journal,
    boot_id: String,
}

impl SessionStore {
    /// Opens (creating if needed) the store in `state_dir` and replays its journal.
    pub fn open(state_dir: &Path) -> Result<Self, SessionError> {
        let (journal, sessions) = Journal::open(state_dir)?;
        Ok(Self {
            sessions,
            journal,
            boot_id: boot_id(),
        })
    }

    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    pub fn get(&self, ip: &IpAddr) -> Option<&SessionRecord> {
        self.sessions.get(ip)
    }

    pub fn iter(&self) -> impl Iterator<Item = &SessionRecord> {
        self.sessions.values()
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Checks a login against the rules and returns the record it would write.
    pub fn plan_login(
        &self,
        req: &LoginRequest,
        clock: &ClockPair,
    ) -> Result<SessionRecord, SessionError> {
        plan_login(self.sessions.get(&req.ip), req, clock, &self.boot_id)
    }

    /// Checks every line of an import against the login rules and this store's state
    /// (`plan_import`).
    pub fn plan_import(
        &self,
        records: &[ImportRecord],
        clock: &ClockPair,
    ) -> (Vec<SessionRecord>, Vec<LineError>) {
        plan_import(|ip| self.sessions.get(ip), records, clock, &self.boot_id)
    }

    /// Records a planned import: one journal write and one fsync for all of it. On
    /// error nothing is recorded.
    pub fn commit_import(&mut self, records: Vec<SessionRecord>) -> Result<(), SessionError> {
        self.journal.append_logins(&records)?;
        for record in records {
            self.sessions.insert(record.ip, record);
        }
        self.compact_if_needed();
        Ok(())
    }

    /// Records a planned login; returns the session it replaced.
    pub fn commit_login(
        &mut self,
        record: SessionRecord,
    ) -> Result<Option<SessionRecord>, SessionError> {
        self.journal.append_login(&record)?;
        let previous = self.sessions.insert(record.ip, record);
        self.compact_if_needed();
        Ok(previous)
    }

    /// Checks a logout: the device must have a session.
    pub fn plan_logout(&self, ip: &IpAddr) -> Result<&SessionRecord, SessionError> {
        self.sessions
            .get(ip)
            .ok_or(SessionError::NotFound { ip: *ip })
    }

    /// Records a logout; returns the removed session.
    pub fn commit_logout(&mut self, ip: &IpAddr) -> Result<SessionRecord, SessionError> {
        let record = self.plan_logout(ip)?.clone();
        self.journal.append_logout(ip)?;
        self.sessions.remove(ip);
        self.compact_if_needed();
        Ok(record)
    }

    /// The change is already durable in the journal; a failed rewrite only leaves it
    /// longer than it needs to be, so it is logged rather than failing the change.
    fn compact_if_needed(&mut self) {
        if self.journal.needs_compaction(self.sessions.len())
            && let Err(e) = self.journal.compact(self.sessions.values())
        {
            tracing::warn!(error = %e, "could not compact the session journal");
        }
    }
}

/// The login rules: checks `req` against the device's `current` session and returns
/// the record it would write. Shared by the local store and the fleet's etcd store.
pub fn plan_login(
    current: Option<&SessionRecord>,
    req: &LoginRequest,
    clock: &ClockPair,
    boot_id: &str,
) -> Result<SessionRecord, SessionError> {
    let ip = req.ip;
    let idp = req.idp.as_deref().unwrap_or(DEFAULT_IDP);
    check_identity(ip, &req.user, idp)?;
    let user = req.user.clone();
    let idp = idp.to_string();
    if let Some(current) = current {
        if current.user != user {
            return Err(SessionError::OtherUser {
                ip,
                current: current.user.clone(),
                requested: user,
            });
        }
        if current.idp != idp {
            return Err(SessionError::WrongIdp {
                ip,
                enrolled: current.idp.clone(),
                requested: idp,
            });
        }
    }
    let (authenticated_at, boot_ns) = match req.at {
        None => (clock.wall, clock.boot_ns),
        Some(at) if at > clock.wall + FUTURE_TOLERANCE => {
            return Err(SessionError::InFuture {
                at,
                now: clock.wall,
            });
        }
        Some(at) if at > clock.wall => (clock.wall, clock.boot_ns),
        Some(at) => (at, clock.boot_ns_of(at)),
    };
    Ok(SessionRecord {
        ip,
        user,
        idp,
        authenticated_at,
        boot_id: boot_id.to_string(),
        authenticated_at_boot_ns: boot_ns,
    })
}

/// Checks every line of an import against the login rules and the current sessions
/// (`current`): the records it would write, and each refused line with its number. A
/// device may appear only once (`import::parse` already refuses files where it does not).
pub fn plan_import<'a>(
    current: impl Fn(&IpAddr) -> Option<&'a SessionRecord>,
    records: &[ImportRecord],
    clock: &ClockPair,
    boot_id: &str,
) -> (Vec<SessionRecord>, Vec<LineError>) {
    let mut planned = Vec::with_capacity(records.len());
    let mut errors = Vec::new();
    let mut seen: HashMap<IpAddr, usize> = HashMap::with_capacity(records.len());
    for r in records {
        if let Some(&first) = seen.get(&r.ip) {
            errors.push(LineError::new(
                r.line,
                format_args!(
                    "ip {} already appears on line {first} (one session per device)",
                    r.ip
                ),
            ));
            continue;
        }
        seen.insert(r.ip, r.line);
        let line = LoginRequest {
            ip: r.ip,
            user: r.user.clone(),
            idp: Some(r.idp.clone()),
            at: Some(r.authenticated_at),
        };
        match plan_login(current(&r.ip), &line, clock, boot_id) {
            Ok(record) => planned.push(record),
            Err(e) => errors.push(LineError::new(r.line, e)),
        }
    }
    (planned, errors)
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

/// What every session must be, however it arrives (a login, an import line, an etcd
/// entry, a journal line): a device address in the one form `input` reads it in, and
/// a user and IdP by the name rules.
pub fn check_identity(ip: IpAddr, user: &str, idp: &str) -> Result<(), SessionError> {
    let device = device(ip)?;
    if device != ip {
        // One device, one identity: callers pass the address as `input` reads it.
        return Err(AddressError::NotCanonical {
            ip,
            canonical: device,
        }
        .into());
    }
    check_name("user", user)?;
    check_name("idp", idp)
}

/// A user or IdP by the rules of `input::name`: one word, bounded, visible.
pub(crate) fn check_name(field: &'static str, value: &str) -> Result<(), SessionError> {
    name::check_name(value, Spaces::Refused).map_err(|reason| SessionError::InvalidName {
        field,
        value: preview(value),
        reason,
    })
}

#[cfg(test)]
mod tests;
