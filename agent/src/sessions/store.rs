//! The local session store: the sessions in memory, their journal on disk, and the
//! one write path that keeps the kernel's session maps equal to both. Every change
//! (`login`, `logout`, `import`, and `apply`/`resync` from the fleet's store) checks
//! first, writes the kernel (`KernelSessions`), then appends to the journal, and puts
//! the kernel back if the append fails.

use std::{collections::VecDeque, net::IpAddr, path::Path, sync::Arc};

use super::{
    ChangeError, KernelSessions, LoginRequest, SessionError, SessionRecord, StoreChange, StoreDiff,
    Syncer, Ticket,
    import::{ImportRecord, LineError},
    journal::{self, Journal},
    rules::{plan_import, plan_login},
    table::{SessionTable, WARM_AHEAD},
};
use agent_common::maps::IDENTITY_NONE;

use crate::clock::{ClockPair, Laps, boot_id};

/// How to undo a change not yet durable: sessions to remove, and sessions to put back.
#[derive(Debug, Default)]
struct Undo {
    added: Vec<IpAddr>,
    replaced: Vec<SessionRecord>,
}

impl Undo {
    /// The undo of writing a session for `ip`, whose session now is `old`.
    fn of_writing(old: Option<SessionRecord>, ip: IpAddr) -> Self {
        match old {
            Some(old) => Self {
                added: Vec::new(),
                replaced: vec![old],
            },
            None => Self {
                added: vec![ip],
                replaced: Vec::new(),
            },
        }
    }
}

pub struct SessionStore {
    sessions: SessionTable,
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

    pub(super) fn open_with(state_dir: &Path, open: journal::Opener) -> Result<Self, SessionError> {
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

    pub fn get(&self, ip: &IpAddr) -> Option<SessionRecord> {
        self.sessions.get(ip)
    }

    /// Every session, in no particular order.
    pub fn records(&self) -> impl Iterator<Item = SessionRecord> + '_ {
        self.sessions.records()
    }

    /// The sessions as kept in memory, for readers that need more than one record.
    pub fn table(&self) -> &SessionTable {
        &self.sessions
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Notes the identity slot the kernel's copy of the device's session holds
    /// (start-up); returns the device's row in the order of
    /// `SessionTable::kernel_values`, or `None` if the store has no session for it.
    pub(super) fn note_slot(&mut self, ip: &IpAddr, slot: u32) -> Option<usize> {
        self.sessions.set_slot(ip, slot)
    }

    /// Notes every session's slot, in the order of `SessionTable::kernel_values`
    /// (start-up, right after the bulk write those values went into).
    pub(super) fn note_slots_in_order(&mut self, slots: &[u32]) {
        self.sessions.set_slots_in_order(slots);
    }

    /// Checks a login against the rules and returns the record it would write.
    pub fn plan_login(
        &self,
        req: &LoginRequest,
        clock: &ClockPair,
    ) -> Result<SessionRecord, SessionError> {
        plan_login(self.sessions.enrolled(&req.ip), req, clock, &self.boot_id)
    }

    /// Checks every line of an import against the login rules and this store's state
    /// (`plan_import`).
    pub fn plan_import(
        &self,
        records: Vec<ImportRecord>,
        clock: &ClockPair,
    ) -> (Vec<SessionRecord>, Vec<LineError>) {
        plan_import(
            |ip| self.sessions.enrolled(ip),
            records,
            clock,
            &self.boot_id,
        )
    }

    /// Checks a logout: the device must have a session.
    pub fn plan_logout(&self, ip: &IpAddr) -> Result<SessionRecord, SessionError> {
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
        let undo = Undo::of_writing(self.sessions.get(&ip), ip);
        let slot = kernel.set_session(
            ip,
            record.kernel_value(clock, &self.boot_id),
            &record.identity(),
        )?;
        let ticket = match self.journal.append_login(&record) {
            Ok(ticket) => ticket,
            Err(e) => {
                self.restore_kernel(kernel, clock, &undo.added, &undo.replaced);
                return Err(e.into());
            }
        };
        self.sessions.insert(&record, slot);
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
        let record = self.plan_logout(ip)?;
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
        laps: &mut Laps,
    ) -> Result<(usize, Ticket), ChangeError> {
        self.prepare_write()?;
        let undo = self.undo_of_writing(&planned);
        laps.lap("undo");
        let (sessions, boot_id) = (&self.sessions, self.boot_id.as_str());
        let written = self.journal.append_logins_alongside(&planned, || {
            write_kernel(sessions, boot_id, &planned, clock, kernel)
        });
        laps.lap("kernel_and_journal");
        let (slots, ticket) = match written {
            Ok(written) => written,
            Err(e) => {
                self.restore_kernel(kernel, clock, &undo.added, &undo.replaced);
                return Err(e);
            }
        };
        let reset = undo.replaced.len();
        // Grown once, not doubled (and rehashed) twenty times on the way to a million.
        self.sessions.reserve(undo.added.len());
        for (i, (record, slot)) in planned.iter().zip(slots).enumerate() {
            if let Some(ahead) = planned.get(i + WARM_AHEAD) {
                self.sessions.warm(&ahead.ip);
            }
            self.sessions.insert(record, slot);
        }
        laps.lap("memory");
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
                // The slot of the session being undone, until the kernel is put back.
                let slot = self.sessions.slot(&record.ip).unwrap_or(IDENTITY_NONE);
                self.sessions.insert(record, slot);
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
        if let Err(e) = self.journal.compact(self.sessions.records()) {
            tracing::error!(error = %e, "could not rewrite the session journal after a failed sync; it is tried again before the next change");
        }
    }

    /// One change from the fleet's store, by the same path as a login: the kernel, then
    /// the journal, the kernel undone if the journal fails. Nothing waits for the
    /// journal's sync (etcd holds the change durably). Returns whether it changed
    /// anything: a session already as the store has it stays as it is, with the
    /// boot-clock time it was first applied with.
    pub fn apply(
        &mut self,
        change: StoreChange,
        clock: &ClockPair,
        kernel: &mut impl KernelSessions,
    ) -> Result<bool, ChangeError> {
        match change {
            StoreChange::Put(record) => {
                if self.sessions.same_session(&record) {
                    return Ok(false);
                }
                let undo = Undo::of_writing(self.sessions.get(&record.ip), record.ip);
                self.prepare_write()?;
                let slot = kernel.set_session(
                    record.ip,
                    record.kernel_value(clock, &self.boot_id),
                    &record.identity(),
                )?;
                if let Err(e) = self.journal.append_login(&record) {
                    self.restore_kernel(kernel, clock, &undo.added, &undo.replaced);
                    return Err(e.into());
                }
                self.sessions.insert(&record, slot);
            }
            StoreChange::Delete(ip) => {
                let Some(old) = self.sessions.get(&ip) else {
                    return Ok(false);
                };
                self.prepare_write()?;
                kernel.remove_session(ip)?;
                if let Err(e) = self.journal.append_logout(&ip) {
                    self.restore_kernel(kernel, clock, &[], std::slice::from_ref(&old));
                    return Err(e.into());
                }
                self.sessions.remove(&ip);
            }
        }
        self.compact_if_needed();
        Ok(true)
    }

    /// One page of a full snapshot of the fleet's store: its new and changed sessions
    /// go in as one batch (one kernel write, one journal batch, the kernel undone if
    /// the journal fails). Should the kernel refuse the batch (a full map), each goes
    /// on its own so that all that fit are in. Changes that fail are logged and
    /// counted. Once every page is in, `remove_absent` ends the snapshot.
    pub fn resync_page(
        &mut self,
        page: Vec<SessionRecord>,
        clock: &ClockPair,
        kernel: &mut impl KernelSessions,
    ) -> StoreDiff {
        let mut diff = StoreDiff::default();
        let changed: Vec<SessionRecord> = page
            .into_iter()
            .filter(|r| !self.sessions.same_session(r))
            .collect();
        let replaced = changed
            .iter()
            .filter(|r| self.sessions.contains(&r.ip))
            .count();
        match self.write_batch(&changed, clock, kernel) {
            Ok(()) => {
                diff.changed += replaced;
                diff.added += changed.len() - replaced;
            }
            Err(ChangeError::Kernel(e)) => {
                tracing::error!(error = %e, "could not write the store's snapshot to the kernel in one batch; writing it device by device");
                for record in changed {
                    let (ip, known) = (record.ip, self.sessions.contains(&record.ip));
                    match self.apply(StoreChange::Put(record), clock, kernel) {
                        Ok(true) if known => diff.changed += 1,
                        Ok(true) => diff.added += 1,
                        Ok(false) => {}
                        Err(e) => diff.failed(ip, &e),
                    }
                }
            }
            Err(e) => {
                tracing::error!(devices = changed.len(), error = %e, "could not record the store's snapshot here; these devices keep their previous state");
                diff.not_applied += changed.len();
            }
        }
        diff
    }

    /// The end of a full snapshot of the fleet's store: removes the devices it does
    /// not hold (`wanted`: every device of its pages).
    pub fn remove_absent(
        &mut self,
        wanted: &hashbrown::HashSet<IpAddr>,
        clock: &ClockPair,
        kernel: &mut impl KernelSessions,
    ) -> StoreDiff {
        let gone: Vec<IpAddr> = self
            .sessions
            .devices()
            .filter(|ip| !wanted.contains(ip))
            .collect();
        let mut diff = StoreDiff::default();
        for ip in gone {
            match self.apply(StoreChange::Delete(ip), clock, kernel) {
                Ok(changed) => diff.removed += usize::from(changed),
                Err(e) => diff.failed(ip, &e),
            }
        }
        diff
    }

    /// Records sessions as one batch: one kernel write, one journal append, the
    /// kernel undone if the append fails. Not waited on (`apply`).
    fn write_batch(
        &mut self,
        records: &[SessionRecord],
        clock: &ClockPair,
        kernel: &mut impl KernelSessions,
    ) -> Result<(), ChangeError> {
        if records.is_empty() {
            return Ok(());
        }
        let undo = self.undo_of_writing(records);
        self.prepare_write()?;
        let (sessions, boot_id) = (&self.sessions, self.boot_id.as_str());
        let (slots, _) = match self.journal.append_logins_alongside(records, || {
            write_kernel(sessions, boot_id, records, clock, kernel)
        }) {
            Ok(written) => written,
            // The kernel refused the batch: nothing of it was journaled.
            Err(e @ ChangeError::Kernel(_)) => return Err(e),
            Err(e) => {
                self.restore_kernel(kernel, clock, &undo.added, &undo.replaced);
                return Err(e);
            }
        };
        for (record, slot) in records.iter().zip(slots) {
            self.sessions.insert(record, slot);
        }
        self.compact_if_needed();
        Ok(())
    }

    /// When the agent stops: rewrites a journal that holds batches (imports) as plain
    /// logins, so that a version from before batches can read it (a rollback).
    pub fn close(&mut self) {
        if self.journal.has_batches()
            && let Err(e) = self.journal.compact(self.sessions.records())
        {
            tracing::warn!(error = %e, "could not rewrite the session journal without its import batches; an earlier version of sessiongate (a rollback) cannot read it until this one has run again");
        }
    }

    /// How to undo writing `records`: the sessions they replace, the devices they add.
    fn undo_of_writing(&self, records: &[SessionRecord]) -> Undo {
        let mut undo = Undo::default();
        for record in records {
            match self.sessions.get(&record.ip) {
                Some(old) => undo.replaced.push(old),
                None => undo.added.push(record.ip),
            }
        }
        undo
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
                .compact(self.sessions.records())
                .map_err(|e| match e {
                    SessionError::Io { path, source } => SessionError::not_recorded(path, source),
                    other => other,
                })?;
        }
        Ok(())
    }

    /// Puts the kernel back as this store has it for these devices: `added` removed,
    /// `replaced` written back. Errors are logged: the caller is already failing.
    pub(super) fn restore_kernel(
        &mut self,
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
            let restored = kernel.set_session(
                record.ip,
                record.kernel_value(clock, &self.boot_id),
                &record.identity(),
            );
            // The slot the kernel's copy holds; not known after a failure, so never
            // passed back to the kernel as one to free.
            let slot = restored.as_ref().map_or(IDENTITY_NONE, |slot| *slot);
            self.sessions.set_slot(&record.ip, slot);
            if let Err(e) = restored {
                tracing::error!(device = %record.ip, error = %e, "could not undo a kernel session write");
            }
        }
    }

    /// A change is already in the journal; a failed rewrite only leaves it longer
    /// than it needs to be, so it is logged rather than failing the change.
    fn compact_if_needed(&mut self) {
        if self.journal.needs_compaction(self.sessions.len())
            && let Err(e) = self.journal.compact(self.sessions.records())
        {
            tracing::warn!(error = %e, "could not compact the session journal");
        }
    }
}

/// Writes `records` to the kernel in one batch; returns their identity slots.
/// `sessions` holds the slots their devices' kernel copies hold now.
fn write_kernel(
    sessions: &SessionTable,
    boot_id: &str,
    records: &[SessionRecord],
    clock: &ClockPair,
    kernel: &mut impl KernelSessions,
) -> Result<Vec<u32>, ChangeError> {
    let values: Vec<_> = records
        .iter()
        .map(|r| {
            let value = r.kernel_value(clock, boot_id);
            (r.ip, value, r.identity(), sessions.slot(&r.ip))
        })
        .collect();
    Ok(kernel.load_sessions(&values)?)
}
