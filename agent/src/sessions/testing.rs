//! Test doubles for the store: kernel maps and journal files that fail on demand.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, Write as _},
    net::IpAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use agent_common::maps::Session;

use super::{
    KernelSessions, LoginRequest, SessionRecord, SessionStore,
    journal::{JournalFile, Opener},
};
use crate::{
    config::{Identity, IdentityCondition},
    datapath::DatapathError,
};

/// A login request for now, through the default IdP.
pub fn request(ip: &str, user: &str) -> LoginRequest {
    LoginRequest {
        ip: ip.parse().unwrap(),
        user: user.into(),
        idp: None,
        at: None,
        groups: Vec::new(),
    }
}

/// The store's sessions in address order.
pub fn sorted(store: &SessionStore) -> Vec<SessionRecord> {
    let mut records: Vec<SessionRecord> = store.records().collect();
    records.sort_unstable_by_key(|r| r.ip);
    records
}

/// The journal's text in `dir` (empty when there is none yet).
pub fn journal(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("sessions.jsonl")).unwrap_or_default()
}

/// Kernel session maps in memory; every write fails while `fail` is set, batches
/// while `fail_batches` is. Each write takes a fresh identity slot, as the real maps
/// do, and the slots the store says a batch replaces, or a configuration's masks go
/// to, must be the ones the sessions hold (a wrong one panics the test).
#[derive(Debug, Default)]
pub struct FakeKernel {
    pub sessions: BTreeMap<IpAddr, Session>,
    pub fail: bool,
    pub fail_batches: bool,
    last_slot: u32,
    /// Masks written by the last `prepare_identities`, by slot.
    pub prepared: BTreeMap<u32, u64>,
    /// Second entries of devices (an agent killed between a renewal's two writes
    /// leaves one): listed again by `kernel_sessions`, gone with the device's next
    /// write or removal.
    pub duplicates: BTreeMap<IpAddr, Session>,
}

impl FakeKernel {
    fn check(&self) -> Result<(), DatapathError> {
        if self.fail {
            Err(DatapathError::SessionsFull {
                family: "IPv4",
                limit: 0,
            })
        } else {
            Ok(())
        }
    }

    pub fn at(&self, ip: &str) -> Option<i64> {
        self.sessions
            .get(&ip.parse().unwrap())
            .map(|s| s.authenticated_at_ns)
    }

    fn fresh(&mut self, session: Session) -> Session {
        self.last_slot += 1;
        Session {
            identity: self.last_slot,
            ..session
        }
    }
}

impl KernelSessions for FakeKernel {
    fn set_session(
        &mut self,
        ip: IpAddr,
        session: Session,
        _who: &Identity<'_>,
    ) -> Result<u32, DatapathError> {
        self.check()?;
        let session = self.fresh(session);
        self.sessions.insert(ip, session);
        self.duplicates.remove(&ip);
        Ok(session.identity)
    }

    fn remove_session(&mut self, ip: IpAddr) -> Result<(), DatapathError> {
        self.check()?;
        self.sessions.remove(&ip);
        self.duplicates.remove(&ip);
        Ok(())
    }

    fn load_sessions(
        &mut self,
        sessions: &[(IpAddr, Session, Identity<'_>, Option<u32>)],
    ) -> Result<Vec<u32>, DatapathError> {
        self.check()?;
        if self.fail_batches {
            return Err(DatapathError::SessionsFull {
                family: "IPv4",
                limit: 0,
            });
        }
        let mut slots = Vec::with_capacity(sessions.len());
        for (ip, session, _, previous) in sessions {
            let held = self.sessions.get(ip).map(|s| s.identity);
            assert_eq!(*previous, held, "the store's slot for {ip}");
            let session = self.fresh(*session);
            self.sessions.insert(*ip, session);
            self.duplicates.remove(ip);
            slots.push(session.identity);
        }
        Ok(slots)
    }

    fn kernel_sessions(&self) -> Result<Vec<(IpAddr, Session)>, DatapathError> {
        self.check()?;
        Ok(self
            .sessions
            .iter()
            .chain(&self.duplicates)
            .map(|(ip, s)| (*ip, *s))
            .collect())
    }

    fn prepare_identities(
        &mut self,
        _set: usize,
        _conditions: Vec<IdentityCondition>,
        slots: &[u32],
        masks: &[u64],
    ) -> Result<(), DatapathError> {
        self.check()?;
        let mut held: Vec<u32> = self.sessions.values().map(|s| s.identity).collect();
        let mut given = slots.to_vec();
        held.sort_unstable();
        given.sort_unstable();
        assert_eq!(given, held, "masks go to every session's slot");
        self.prepared = slots.iter().copied().zip(masks.iter().copied()).collect();
        Ok(())
    }
}

/// A fake kernel the test keeps a handle on while the session mirror owns it.
#[derive(Clone, Debug, Default)]
pub struct SharedKernel(pub Arc<Mutex<FakeKernel>>);

impl SharedKernel {
    pub fn with<R>(&self, f: impl FnOnce(&mut FakeKernel) -> R) -> R {
        f(&mut self.0.lock().unwrap())
    }
}

impl KernelSessions for SharedKernel {
    fn set_session(
        &mut self,
        ip: IpAddr,
        session: Session,
        who: &Identity<'_>,
    ) -> Result<u32, DatapathError> {
        self.with(|k| k.set_session(ip, session, who))
    }

    fn remove_session(&mut self, ip: IpAddr) -> Result<(), DatapathError> {
        self.with(|k| k.remove_session(ip))
    }

    fn load_sessions(
        &mut self,
        sessions: &[(IpAddr, Session, Identity<'_>, Option<u32>)],
    ) -> Result<Vec<u32>, DatapathError> {
        self.with(|k| k.load_sessions(sessions))
    }

    fn kernel_sessions(&self) -> Result<Vec<(IpAddr, Session)>, DatapathError> {
        self.with(|k| k.kernel_sessions())
    }

    fn prepare_identities(
        &mut self,
        set: usize,
        conditions: Vec<IdentityCondition>,
        slots: &[u32],
        masks: &[u64],
    ) -> Result<(), DatapathError> {
        self.with(|k| k.prepare_identities(set, conditions, slots, masks))
    }
}

/// Faults for the journal's files (`faulty`), shared by every file it opens.
#[derive(Default)]
pub struct Faults {
    /// Bytes writes may still add before the disk is full (`None`: no limit). A write
    /// that does not fit writes what fits, then fails with ENOSPC, as a full disk does.
    pub space: Mutex<Option<u64>>,
    pub fail_truncate: AtomicBool,
    pub fail_sync: AtomicBool,
    /// How long a sync takes.
    pub sync_delay: Mutex<Duration>,
    pub syncs: AtomicU64,
    /// The journal's length at the end of the last sync that succeeded.
    pub synced_len: AtomicU64,
}

impl Faults {
    pub fn space(&self, bytes: Option<u64>) {
        *self.space.lock().unwrap() = bytes;
    }
}

struct FaultyFile {
    file: File,
    faults: Arc<Faults>,
}

impl JournalFile for FaultyFile {
    fn append(&self, bytes: &[u8]) -> io::Result<()> {
        let mut space = self.faults.space.lock().unwrap();
        match *space {
            Some(left) if (bytes.len() as u64) > left => {
                (&self.file).write_all(&bytes[..left as usize])?;
                *space = Some(0);
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            }
            Some(left) => {
                *space = Some(left - bytes.len() as u64);
                (&self.file).write_all(bytes)
            }
            None => (&self.file).write_all(bytes),
        }
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        if self.faults.fail_truncate.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        let delay = *self.faults.sync_delay.lock().unwrap();
        std::thread::sleep(delay);
        self.faults.syncs.fetch_add(1, Ordering::SeqCst);
        if self.faults.fail_sync.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let len = self.file.metadata()?.len();
        self.file.sync_data()?;
        self.faults.synced_len.store(len, Ordering::SeqCst);
        Ok(())
    }
}

/// Opens journal files as the agent does, wrapped to fail as `faults` say.
pub fn faulty(faults: &Arc<Faults>) -> Opener {
    let faults = Arc::clone(faults);
    Arc::new(move |path: &Path, fresh: bool| {
        super::journal::open_file(path, fresh)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(!fresh)
            .write(fresh)
            .open(path)?;
        Ok(Arc::new(FaultyFile {
            file,
            faults: Arc::clone(&faults),
        }) as Arc<dyn JournalFile>)
    })
}

/// Runs `f` with the log captured at every level; returns what it logged.
pub fn logs_of(f: impl FnOnce()) -> String {
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = buffer.0.lock().unwrap().clone();
    String::from_utf8_lossy(&bytes).into_owned()
}
