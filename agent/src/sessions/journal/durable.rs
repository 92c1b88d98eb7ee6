//! Group commit: a change is acknowledged only once the journal holds it durably, and
//! changes that wait together share one `fdatasync`. Each append gets a ticket (its
//! sequence number); `Syncer::wait` returns once a sync that started after the append
//! has finished. The first waiter to find no sync under way runs one for everything
//! written so far, while the others wait for it: under load, one sync answers a whole
//! batch of requests.
//!
//! A sync that fails leaves the file in an unknown state. The waiter that ran it calls
//! the `recover` it was given (the store undoes every change not yet durable and
//! rewrites the journal, `SessionStore::recover`); every waiter of those changes is
//! then told that its change was not recorded.

use std::{
    io,
    ops::RangeInclusive,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard},
};

use super::JournalFile;

/// A change appended to the journal, to wait for with `Syncer::wait`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a change is acknowledged only once it is durable (`Syncer::wait`)"]
pub struct Ticket(pub(in crate::sessions) u64);

/// Why a change was not made durable (it was undone).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncFailed {
    pub reason: String,
}

pub struct Syncer {
    dir: PathBuf,
    state: Mutex<State>,
    done: Condvar,
}

struct State {
    /// The journal's file now (compaction replaces it).
    file: Arc<dyn JournalFile>,
    /// The directory's entry for `file` is not known durable yet (after a rename).
    dir_dirty: bool,
    /// Sequence number of the last change appended, and the last known durable; and
    /// the file's length after each.
    written: u64,
    durable: u64,
    written_len: u64,
    durable_len: u64,
    /// Changes undone after a failed sync, and why; never durable, whatever comes later.
    failed: Vec<(RangeInclusive<u64>, String)>,
    /// A sync is under way, or a failed one is being recovered from.
    syncing: bool,
    recovering: bool,
    /// Syncs run so far.
    syncs: u64,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every update of the state is a few assignments that cannot panic half-way.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Syncer {
    /// For a journal of `len` bytes, all of them durable.
    pub(super) fn new(dir: &Path, file: Arc<dyn JournalFile>, len: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            state: Mutex::new(State {
                file,
                dir_dirty: false,
                written: 0,
                durable: 0,
                written_len: len,
                durable_len: len,
                failed: Vec::new(),
                syncing: false,
                recovering: false,
                syncs: 0,
            }),
            done: Condvar::new(),
        }
    }

    /// Records that change `seq` is in the file (whole), which is now `len` bytes
    /// long, waiting for a sync.
    pub(super) fn wrote(&self, seq: u64, len: u64) -> Ticket {
        let mut state = lock(&self.state);
        state.written = seq;
        state.written_len = len;
        Ticket(seq)
    }

    /// The last change known durable, and the file's length then.
    pub(in crate::sessions) fn durable(&self) -> (u64, u64) {
        let state = lock(&self.state);
        (state.durable, state.durable_len)
    }

    /// The journal now lives in `file` of `len` bytes (a compaction renamed it into
    /// place), which holds every change so far: they are durable once the file and the
    /// directory entry pointing at it are synced (`dir_dirty`), or already when
    /// `durable`.
    pub(super) fn switch(&self, file: Arc<dyn JournalFile>, len: u64, durable: bool) {
        let mut state = lock(&self.state);
        state.file = file;
        state.written_len = len;
        if durable {
            state.durable = state.written;
            state.durable_len = len;
            state.dir_dirty = false;
        } else {
            state.dir_dirty = true;
        }
        drop(state);
        self.done.notify_all();
    }

    /// The changes after the last durable one were undone (`SessionStore::recover`):
    /// their waiters are told so.
    pub(in crate::sessions) fn undone(&self, reason: &str) {
        let mut state = lock(&self.state);
        if state.written > state.durable {
            let range = state.durable + 1..=state.written;
            state.failed.push((range, reason.to_string()));
            // Later changes get later numbers; nothing undone is ever reported durable.
            state.durable = state.written;
        }
    }

    /// Syncs run so far (tests and the log).
    pub fn syncs(&self) -> u64 {
        lock(&self.state).syncs
    }

    /// Waits until change `ticket` is durable. If a sync fails on this thread,
    /// `recover` runs (without any lock of the syncer held, while no other sync may
    /// start) and must undo the changes not yet durable and call `undone` before it
    /// writes anything else.
    pub fn wait(&self, ticket: Ticket, recover: impl FnOnce(&io::Error)) -> Result<(), SyncFailed> {
        let mut recover = Some(recover);
        let mut state = lock(&self.state);
        loop {
            if let Some((_, reason)) = state.failed.iter().find(|(r, _)| r.contains(&ticket.0)) {
                return Err(SyncFailed {
                    reason: reason.clone(),
                });
            }
            if ticket.0 <= state.durable {
                return Ok(());
            }
            if state.syncing || state.recovering {
                state = self
                    .done
                    .wait(state)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            }
            // This thread syncs, for every change written so far.
            state.syncing = true;
            let (target, target_len) = (state.written, state.written_len);
            let (file, dir_dirty) = (Arc::clone(&state.file), state.dir_dirty);
            drop(state);
            let result = file.sync_data().and_then(|()| {
                if dir_dirty {
                    sync_dir(&self.dir)
                } else {
                    Ok(())
                }
            });
            state = lock(&self.state);
            state.syncing = false;
            state.syncs += 1;
            match result {
                // Unless a compaction switched files meanwhile (and made all durable).
                Ok(()) if Arc::ptr_eq(&state.file, &file) => {
                    state.durable = state.durable.max(target);
                    state.durable_len = state.durable_len.max(target_len);
                    state.dir_dirty &= !dir_dirty;
                }
                Ok(()) => {}
                Err(e) => {
                    tracing::error!(dir = %self.dir.display(), error = %e, "syncing the session journal failed; undoing the changes not yet durable");
                    state.recovering = true;
                    drop(state);
                    match recover.take() {
                        Some(recover) => recover(&e),
                        None => self.undone(&e.to_string()),
                    }
                    state = lock(&self.state);
                    state.recovering = false;
                }
            }
            self.done.notify_all();
        }
    }
}

/// Makes a directory's entries durable (a file created or renamed in it).
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
