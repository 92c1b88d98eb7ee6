//! The session mirror: the one owner of session state. It holds the local store and
//! the kernel's session maps under one lock, and nothing else changes either: logins,
//! logouts and imports through the API, and the fleet store's changes and snapshots,
//! each take the store's single write path (kernel, then journal, undone together).
//! Local changes are answered once durable, the wait for the sync taken without the
//! lock so that concurrent changes share it.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use super::{
    ChangeError, KernelSessions, LoginRequest, SessionError, SessionRecord, SessionStore,
    StoreChange, StoreDiff, Syncer, Ticket,
};
use crate::{
    clock::{ClockPair, Laps},
    config::IdentityCondition,
    datapath::{DatapathError, SessionMaps},
};

/// Changes from the fleet's store in one batch beyond which they are logged as one
/// line (each at debug level).
const BULK_CHANGES: usize = 16;

/// A kernel time no session has: a device whose kernel copy must be rewritten.
const NO_TIME: i64 = i64::MIN;

/// How far apart two agents' boot-clock times of one session of an earlier boot may be
/// and still count as the same: each converts its wall-clock time with its own clock
/// readings. Far below the kernel's own lag in reading "now" (one tick, 1-10 ms); a
/// wall clock corrected by more since is converted afresh.
const CONVERTED_SLACK_NS: u64 = 1_000_000;

pub struct SessionMirror<K = SessionMaps> {
    /// Lock order: this before the datapath's.
    sides: Mutex<Sides<K>>,
    /// Acknowledges the store's changes once durable; waited on without the lock.
    syncer: Arc<Syncer>,
    state_dir: PathBuf,
    boot_id: String,
}

/// What the mirror keeps equal.
struct Sides<K> {
    store: SessionStore,
    kernel: K,
}

/// What an import recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Imported {
    pub sessions: usize,
    /// Of those, devices whose session was reset (the others had none).
    pub reset: usize,
}

impl<K: KernelSessions> SessionMirror<K> {
    /// Takes over the store (opened from `state_dir`) and the kernel's session maps,
    /// and puts every session of the store in the kernel. Maps `adopted` from an
    /// earlier agent may hold a change its journal never recorded: devices the store
    /// does not have are removed (returned: how many), and every device the store has
    /// keeps a session throughout. A device whose kernel session is already the
    /// store's (`same_time`) is left as it is (its identity masks are the earlier
    /// agent's for the set in force, as a rewrite would copy them, and are computed
    /// afresh for the set the new configuration puts in force).
    pub fn start(
        mut store: SessionStore,
        mut kernel: K,
        state_dir: &Path,
        adopted: bool,
    ) -> Result<(Self, usize), DatapathError> {
        let clock = ClockPair::now();
        let boot_id = store.boot_id().to_string();
        let mut removed = 0;
        // The kernel's time of each of the store's rows (in the order of
        // `kernel_values`) that has a copy there; `NO_TIME` where it has two.
        let mut in_kernel: Vec<Option<i64>> = Vec::new();
        if adopted {
            let held = kernel.take_kernel_sessions()?;
            in_kernel = vec![None; store.len()];
            for (ip, session) in held {
                // The sessions in the kernel hold identity slots the store does not
                // know.
                match store.note_slot(&ip, session.identity) {
                    Some(row) => {
                        // Listed twice (two table entries): rewritten, which clears one.
                        in_kernel[row] = match in_kernel[row] {
                            None => Some(session.authenticated_at_ns),
                            Some(_) => Some(NO_TIME),
                        };
                    }
                    None => {
                        kernel.remove_session(ip)?;
                        removed += 1;
                    }
                }
            }
        }
        let started = std::time::Instant::now();
        let mut sessions = store.table().kernel_values(&clock, &boot_id);
        if adopted {
            let recorded = store.table().boot_times_recorded(&boot_id);
            let mut rows = in_kernel.iter().zip(recorded);
            sessions.retain(|(_, session, _, _)| {
                let (at, recorded) = rows.next().expect("one per row");
                !at.is_some_and(|at| same_time(at, session.authenticated_at_ns, recorded))
            });
        }
        drop(in_kernel);
        let slots = kernel.load_sessions(&sessions)?;
        tracing::info!(
            sessions = sessions.len(),
            ms = started.elapsed().as_millis() as u64,
            "wrote the sessions to the kernel"
        );
        if adopted {
            let written: Vec<IpAddr> = sessions.iter().map(|s| s.0).collect();
            drop(sessions);
            for (ip, slot) in written.iter().zip(&slots) {
                store.note_slot(ip, *slot);
            }
        } else {
            drop(sessions);
            store.note_slots_in_order(&slots);
        }
        let mirror = Self {
            syncer: store.syncer(),
            sides: Mutex::new(Sides { store, kernel }),
            state_dir: state_dir.to_path_buf(),
            boot_id,
        };
        Ok((mirror, removed))
    }

    fn lock(&self) -> MutexGuard<'_, Sides<K>> {
        // A panic while holding the lock leaves both sides consistent: each change puts
        // the kernel back before it returns an error, and nothing else panics midway.
        self.sides
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The boot the kernel's session times belong to.
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    /// Reads the sessions (briefly: changes wait meanwhile).
    pub fn read<R>(&self, f: impl FnOnce(&SessionStore) -> R) -> R {
        f(&self.lock().store)
    }

    /// A login by the rules, answered once durable.
    pub fn login(
        &self,
        req: &LoginRequest,
        clock: &ClockPair,
    ) -> Result<SessionRecord, ChangeError> {
        let (record, ticket) = {
            let sides = &mut *self.lock();
            sides.store.login(req, clock, &mut sides.kernel)?
        };
        self.durable(ticket)?;
        Ok(record)
    }

    /// A logout, answered once durable; returns the session it ended.
    pub fn logout(&self, ip: IpAddr, clock: &ClockPair) -> Result<SessionRecord, ChangeError> {
        let (record, ticket) = {
            let sides = &mut *self.lock();
            sides.store.logout(&ip, clock, &mut sides.kernel)?
        };
        self.durable(ticket)?;
        Ok(record)
    }

    /// An import, answered once durable: `plan` checks it against the sessions as they
    /// are (under the lock, so nothing changes in between) and returns the records to
    /// write, or refuses it whole; they are then written as one batch.
    /// `laps` gets the time of each step.
    pub fn import<T, E: From<ChangeError>>(
        &self,
        clock: &ClockPair,
        laps: &mut Laps,
        plan: impl FnOnce(&SessionStore) -> Result<(Vec<SessionRecord>, T), E>,
    ) -> Result<(Imported, T), E> {
        let (imported, ticket, planned) = {
            let sides = &mut *self.lock();
            laps.lap("lock");
            let (records, planned) = plan(&sides.store)?;
            laps.lap("plan");
            let sessions = records.len();
            let (reset, ticket) = sides
                .store
                .import(records, clock, &mut sides.kernel, laps)?;
            (Imported { sessions, reset }, ticket, planned)
        };
        self.durable(ticket).map_err(ChangeError::from)?;
        laps.lap("sync");
        Ok((imported, planned))
    }

    /// Applies the fleet store's changes, in revision order, up to `revision`. A change
    /// that cannot be applied here leaves the device as it was and is logged; returns
    /// how many could not (the follower then takes a full snapshot again).
    pub fn apply(&self, changes: Vec<StoreChange>, revision: i64) -> usize {
        let sides = &mut *self.lock();
        let clock = ClockPair::now();
        // Each change is logged, at info level unless it came in bulk (an import); its
        // description is only written when it will be logged.
        let bulk = changes.len() > BULK_CHANGES;
        let described = !bulk || tracing::enabled!(tracing::Level::DEBUG);
        let (mut applied, mut failed) = (0, 0);
        for change in changes {
            let what = match &change {
                _ if !described => String::new(),
                StoreChange::Put(r) => format!("session of {} for {} via {}", r.ip, r.user, r.idp),
                StoreChange::Delete(ip) => format!("logout of {ip}"),
            };
            match sides.store.apply(change, &clock, &mut sides.kernel) {
                Ok(false) => {}
                Ok(true) if bulk => {
                    applied += 1;
                    tracing::debug!(revision, "applied from the fleet's store: {what}");
                }
                Ok(true) => {
                    applied += 1;
                    tracing::info!(revision, "applied from the fleet's store: {what}");
                }
                Err(e) => {
                    failed += 1;
                    tracing::error!(revision, error = %e, "could not apply a change from the fleet's store here; the device keeps its previous state until the next full snapshot");
                }
            }
        }
        if bulk {
            tracing::info!(
                revision,
                applied,
                failed,
                "applied a batch of changes from the fleet's store"
            );
        }
        failed
    }

    /// Makes this host equal to a full snapshot of the fleet's store, in the pages it
    /// was read in: each page (`resync_page`), then the devices none of them holds
    /// removed (`remove_absent`). The fleet's follower calls the two itself, to apply
    /// each page while the next is read; the tests take the whole.
    #[cfg(test)]
    pub fn resync(&self, snapshot: Vec<Vec<SessionRecord>>) -> StoreDiff {
        let wanted = snapshot.iter().flatten().map(|r| r.ip).collect();
        let mut diff = StoreDiff::default();
        for page in snapshot {
            diff += self.resync_page(page);
        }
        diff += self.remove_absent(&wanted);
        diff
    }

    /// One page of a full snapshot of the fleet's store (`SessionStore::resync_page`).
    pub fn resync_page(&self, page: Vec<SessionRecord>) -> StoreDiff {
        let sides = &mut *self.lock();
        sides
            .store
            .resync_page(page, &ClockPair::now(), &mut sides.kernel)
    }

    /// The end of a full snapshot: removes the devices it does not hold
    /// (`SessionStore::remove_absent`).
    pub fn remove_absent(&self, wanted: &hashbrown::HashSet<IpAddr>) -> StoreDiff {
        let sides = &mut *self.lock();
        sides
            .store
            .remove_absent(wanted, &ClockPair::now(), &mut sides.kernel)
    }

    /// Puts a configuration in force with the sessions held still: `next_set` (under the
    /// caller's own lock on the datapath) names the set it will write, every device's
    /// identity mask of that set is written for `conditions`, then `switch` writes the
    /// set and flips to it. No login can come between the masks and the flip.
    pub fn switch_config<D, R, E: From<DatapathError>>(
        &self,
        conditions: Vec<IdentityCondition>,
        datapath: &mut D,
        next_set: impl FnOnce(&mut D) -> Result<usize, E>,
        switch: impl FnOnce(&mut D) -> Result<R, E>,
    ) -> Result<R, E> {
        let sides = &mut *self.lock();
        let set = next_set(datapath)?;
        let started = std::time::Instant::now();
        // Without conditions the set's masks are never read: nothing to compute.
        let (slots, masks) = if conditions.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            sides.store.table().masks(&conditions)
        };
        let computed = started.elapsed();
        sides
            .kernel
            .prepare_identities(set, conditions, &slots, &masks)?;
        if !slots.is_empty() {
            tracing::info!(
                devices = slots.len(),
                computed_ms = computed.as_millis() as u64,
                written_ms = (started.elapsed() - computed).as_millis() as u64,
                "identity masks written for the configuration about to be put in force"
            );
        }
        switch(datapath)
    }

    /// When the agent stops: leaves the journal readable by earlier versions.
    pub fn close(&self) {
        self.lock().store.close();
    }

    /// Waits until a change is durable (sharing the sync with concurrent changes). If
    /// the sync fails, every change not yet durable is undone, here and in the
    /// kernel, and its caller gets an error.
    fn durable(&self, ticket: Ticket) -> Result<(), SessionError> {
        self.syncer
            .wait(ticket, |error| {
                let sides = &mut *self.lock();
                sides
                    .store
                    .recover(&mut sides.kernel, &ClockPair::now(), error);
            })
            .map_err(|failed| SessionError::NotDurable {
                dir: self.state_dir.clone(),
                reason: failed.reason,
            })
    }
}

/// Whether the kernel's time of a session (`NO_TIME`: none to keep) is the journal's:
/// exactly, when the journal `recorded` it for this boot, else within
/// `CONVERTED_SLACK_NS`.
fn same_time(kernel: i64, journal: i64, recorded: bool) -> bool {
    if kernel == NO_TIME {
        return false;
    }
    if recorded {
        kernel == journal
    } else {
        kernel.abs_diff(journal) <= CONVERTED_SLACK_NS
    }
}
