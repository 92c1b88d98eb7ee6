//! Device sessions: who authenticated on which device, through which IdP, and when.
//! The rules are Gateway's: a login resets the device's session timer to zero; a
//! device is bound to one user until logged out; and a session only resets through the
//! IdP the device enrolled with.
//!
//! The store owns the rule that the kernel's session maps and the journal never
//! disagree: `login`, `logout` and `import` check a request (`plan_*`, which changes
//! nothing), write the kernel (`KernelSessions`), then append to the journal, and undo
//! the kernel write if the append fails. The change is acknowledged once the journal
//! holds it durably (`Syncer::wait` on the ticket they return; group commit); if that
//! sync fails, `recover` undoes every change not yet durable, in the kernel too.

mod durable;
pub mod import;
mod journal;
mod kernel;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use agent_common::maps::Session;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use time::OffsetDateTime;

use crate::{
    clock::{ClockPair, boot_id},
    datapath::DatapathError,
    input::{
        AddressError, NameProblem, Spaces,
        address::device,
        name::{self, preview},
    },
};
pub use durable::{SyncFailed, Syncer, Ticket};
use import::{ImportRecord, LineError};
use journal::Journal;
pub use kernel::KernelSessions;

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
    #[error(
        "the session journal {path} is out of space ({source}); the change was undone. Free space on its file system (or raise the quota), then retry"
    )]
    JournalFull {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the change could not be written to the session journal {path} ({source}) and was undone; check the disk and the file's permissions, then retry"
    )]
    NotRecorded {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the session journal in {dir} could not be made durable ({reason}); the change was undone. Check the disk and the kernel log, then retry"
    )]
    NotDurable { dir: PathBuf, reason: String },
}

impl SessionError {
    /// A failed journal write: out of space, or another failure.
    fn not_recorded(path: PathBuf, source: std::io::Error) -> Self {
        let full = matches!(
            source.raw_os_error(),
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG)
        );
        if full {
            Self::JournalFull { path, source }
        } else {
            Self::NotRecorded { path, source }
        }
    }

    /// A stable machine-readable code for API clients.
    pub const fn code(&self) -> &'static str {
        match self {
            Self::OtherUser { .. } => "other_user",
            Self::WrongIdp { .. } => "wrong_idp",
            Self::InFuture { .. } => "in_future",
            Self::NotFound { .. } => "not_found",
            Self::InvalidName { .. } | Self::NotADevice(_) => "invalid",
            Self::JournalFull { .. } => "storage_full",
            Self::NotRecorded { .. } | Self::NotDurable { .. } => "journal_unavailable",
            Self::Io { .. } => "state_error",
        }
    }
}

/// A session change refused by the rules, the journal or the kernel; nothing changed.
#[derive(Debug, Error)]
pub enum ChangeError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Kernel(#[from] DatapathError),
}

/// How to undo a change not yet durable: sessions to remove, and sessions to put back.
#[derive(Debug, Default)]
struct Undo {
    added: Vec<IpAddr>,
    replaced: Vec<SessionRecord>,
}

pub struct SessionStore {
    sessions: BTreeMap<IpAddr, SessionRecord>,
    journal: Journal,
    boot_id: String,
    /// Changes made through `login`, `logout` and `import` that are not known durable
    /// yet, by ticket, with how to undo each (`recover`).
    pending: VecDeque<(Ticket, Undo)>,
}

impl SessionStore {
    /// Opens (creating if needed) the store in `state_dir` and replays its journal.
    pub fn open(state_dir: &Path) -> Result<Self, SessionError> {
        Self::open_with(state_dir, Arc::new(journal::open_file))
    }

    fn open_with(state_dir: &Path, open: journal::Opener) -> Result<Self, SessionError> {
        let (journal, sessions) = Journal::open(state_dir, open)?;
        Ok(Self {
            sessions,
            journal,
            boot_id: boot_id(),
            pending: VecDeque::new(),
        })
    }

    /// What acknowledges changes: wait on it (without holding the store) for a ticket.
    pub fn syncer(&self) -> Arc<Syncer> {
        Arc::clone(self.journal.syncer())
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

    /// Checks a logout: the device must have a session.
    pub fn plan_logout(&self, ip: &IpAddr) -> Result<&SessionRecord, SessionError> {
        self.sessions
            .get(ip)
            .ok_or(SessionError::NotFound { ip: *ip })
    }

    /// A login by the rules: the kernel, then the journal. Acknowledge it once the
    /// ticket is durable.
    pub fn login(
        &mut self,
        req: &LoginRequest,
        clock: &ClockPair,
        kernel: &mut impl KernelSessions,
    ) -> Result<(SessionRecord, Ticket), ChangeError> {
        let record = self.plan_login(req, clock)?;
        self.prepare_write()?;
        let ip = record.ip;
        let undo = match self.sessions.get(&ip) {
            Some(old) => Undo {
                added: Vec::new(),
                replaced: vec![old.clone()],
            },
            None => Undo {
                added: vec![ip],
                replaced: Vec::new(),
            },
        };
        kernel.set_session(ip, record.kernel_value(clock, &self.boot_id))?;
        let ticket = match self.journal.append_login(&record) {
            Ok(ticket) => ticket,
            Err(e) => {
                self.restore_kernel(kernel, clock, &undo.added, &undo.replaced);
                return Err(e.into());
            }
        };
        self.sessions.insert(ip, record.clone());
        self.pending.push_back((ticket, undo));
        self.compact_if_needed();
        Ok((record, ticket))
    }

    /// A logout: the kernel, then the journal. Acknowledge it once the ticket is
    /// durable.
    pub fn logout(
        &mut self,
        ip: &IpAddr,
        clock: &ClockPair,
        kernel: &mut impl KernelSessions,
    ) -> Result<(SessionRecord, Ticket), ChangeError> {
        let record = self.plan_logout(ip)?.clone();
        self.prepare_write()?;
        kernel.remove_session(*ip)?;
        let ticket = match self.journal.append_logout(ip) {
            Ok(ticket) => ticket,
            Err(e) => {
                self.restore_kernel(kernel, clock, &[], std::slice::from_ref(&record));
                return Err(e.into());
            }
        };
        self.sessions.remove(ip);
        self.pending.push_back((
            ticket,
            Undo {
                added: Vec::new(),
                replaced: vec![record.clone()],
            },
        ));
        self.compact_if_needed();
        Ok((record, ticket))
    }

    /// Records planned sessions (`plan_import`) all together: one batched kernel write,
    /// one journal batch that replay takes whole or not at all. Returns how many of
    /// them reset an existing session. Acknowledge it once the ticket is durable.
    pub fn import(
        &mut self,
        planned: Vec<SessionRecord>,
        clock: &ClockPair,
        kernel: &mut impl KernelSessions,
    ) -> Result<(usize, Ticket), ChangeError> {
        self.prepare_write()?;
        let mut undo = Undo::default();
        for record in &planned {
            match self.sessions.get(&record.ip) {
                Some(old) => undo.replaced.push(old.clone()),
                None => undo.added.push(record.ip),
            }
        }
        let values: Vec<_> = planned
            .iter()
            .map(|r| (r.ip, r.kernel_value(clock, &self.boot_id)))
            .collect();
        let written = kernel
            .load_sessions(&values)
            .map_err(ChangeError::from)
            .and_then(|()| Ok(self.journal.append_logins(&planned)?));
        let ticket = match written {
            Ok(ticket) => ticket,
            Err(e) => {
                self.restore_kernel(kernel, clock, &undo.added, &undo.replaced);
                return Err(e);
            }
        };
        let reset = undo.replaced.len();
        for record in planned {
            self.sessions.insert(record.ip, record);
        }
        self.pending.push_back((ticket, undo));
        self.compact_if_needed();
        Ok((reset, ticket))
    }

    /// After a failed sync (`Syncer::wait`): undoes every change not yet durable, in
    /// memory and in the kernel, newest first; tells their waiters; and rewrites the
    /// journal from what is left, which is then durable.
    pub fn recover(
        &mut self,
        kernel: &mut impl KernelSessions,
        clock: &ClockPair,
        error: &std::io::Error,
    ) {
        let (durable, durable_len) = self.journal.syncer().durable();
        let mut undone = 0;
        while let Some((ticket, undo)) = self.pending.pop_back() {
            if ticket.0 <= durable {
                break;
            }
            for ip in &undo.added {
                self.sessions.remove(ip);
            }
            for record in &undo.replaced {
                self.sessions.insert(record.ip, record.clone());
            }
            self.restore_kernel(kernel, clock, &undo.added, &undo.replaced);
            undone += 1;
        }
        self.pending.clear();
        self.journal.syncer().undone(&error.to_string());
        tracing::error!(changes = undone, error = %error, "undid the session changes the journal could not make durable");
        // What the file holds beyond the last sync is unknown: cut it off, then
        // rewrite the file from what is left (tried again before the next change if
        // this fails).
        self.journal.cut_back(durable_len);
        if let Err(e) = self.journal.compact(self.sessions.values()) {
            tracing::error!(error = %e, "could not rewrite the session journal after a failed sync; it is tried again before the next change");
        }
    }

    /// Records a session from the fleet's store in the local mirror (no rules, no
    /// kernel; etcd holds it durably, so nothing waits for the mirror's sync). Returns
    /// the session it replaced.
    pub fn commit_login(
        &mut self,
        record: SessionRecord,
    ) -> Result<Option<SessionRecord>, SessionError> {
        self.prepare_write()?;
        let _ = self.journal.append_login(&record)?;
        let previous = self.sessions.insert(record.ip, record);
        self.compact_if_needed();
        Ok(previous)
    }

    /// Records a logout from the fleet's store in the local mirror (`commit_login`).
    pub fn commit_logout(&mut self, ip: &IpAddr) -> Result<SessionRecord, SessionError> {
        let record = self.plan_logout(ip)?.clone();
        self.prepare_write()?;
        let _ = self.journal.append_logout(ip)?;
        self.sessions.remove(ip);
        self.compact_if_needed();
        Ok(record)
    }

    /// Records sessions from the fleet's store in the local mirror as one batch
    /// (`commit_login`). On error nothing is recorded.
    pub fn commit_import(&mut self, records: Vec<SessionRecord>) -> Result<(), SessionError> {
        self.prepare_write()?;
        let _ = self.journal.append_logins(&records)?;
        for record in records {
            self.sessions.insert(record.ip, record);
        }
        self.compact_if_needed();
        Ok(())
    }

    /// When the agent stops: rewrites a journal that holds batches (imports) as plain
    /// logins, so that a version from before batches can read it (a rollback).
    pub fn close(&mut self) {
        if self.journal.has_batches()
            && let Err(e) = self.journal.compact(self.sessions.values())
        {
            tracing::warn!(error = %e, "could not rewrite the session journal without its import batches; an earlier version of sessiongate (a rollback) cannot read it until this one has run again");
        }
    }

    /// Before an append: forgets the undo of changes now durable, and rewrites the
    /// journal if a failed write left it needing that.
    fn prepare_write(&mut self) -> Result<(), SessionError> {
        let (durable, _) = self.journal.syncer().durable();
        while self.pending.front().is_some_and(|(t, _)| t.0 <= durable) {
            self.pending.pop_front();
        }
        if self.journal.needs_rewrite() {
            self.journal
                .compact(self.sessions.values())
                .map_err(|e| match e {
                    SessionError::Io { path, source } => SessionError::not_recorded(path, source),
                    other => other,
                })?;
        }
        Ok(())
    }

    /// Puts the kernel back as this store has it for these devices: `added` removed,
    /// `replaced` written back. Errors are logged: the caller is already failing.
    fn restore_kernel(
        &self,
        kernel: &mut impl KernelSessions,
        clock: &ClockPair,
        added: &[IpAddr],
        replaced: &[SessionRecord],
    ) {
        for ip in added {
            if let Err(e) = kernel.remove_session(*ip) {
                tracing::error!(device = %ip, error = %e, "could not undo a kernel session write");
            }
        }
        for record in replaced {
            if let Err(e) = kernel.set_session(record.ip, record.kernel_value(clock, &self.boot_id))
            {
                tracing::error!(device = %record.ip, error = %e, "could not undo a kernel session write");
            }
        }
    }

    /// A change is already in the journal; a failed rewrite only leaves it longer
    /// than it needs to be, so it is logged rather than failing the change.
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

/// Whether a login read back from the journal may count: the rules every session must
/// meet now. Replay skips (and names) one that does not.
fn check_replayed(record: &SessionRecord) -> Result<(), SessionError> {
    check_identity(record.ip, &record.user, &record.idp)
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
mod durability_tests;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
