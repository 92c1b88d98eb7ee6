//! Durable session state: an append-only journal of logins and logouts
//! (`state_dir/sessions.jsonl`, one JSON object per line), so a login costs one short
//! append whatever the number of sessions. It is rewritten compactly when dead lines
//! pile up, and at start-up when it has any (or anything replay had to leave out).
//!
//! - A record is written whole or not at all: a failed write is cut back off the file
//!   (and if even that fails, the file is rewritten from memory before anything else
//!   is appended), so a later record never lands on the stump of a failed one.
//! - A batch (an import) is framed by `begin` and `commit` lines: replay applies it
//!   only if its `commit` is there, so a batch cut short by a crash counts as never
//!   written.
//! - Appends are made durable by `durable::Syncer` (group commit); a compaction
//!   writes and syncs a new file, renames it into place and syncs the directory.
//! - No content stops a replay: a line it cannot read (damage, a stump left by an
//!   older version, an entry the current rules refuse) is skipped and named in the
//!   log, and the file as it was is kept beside the journal (`sessions.jsonl.damaged`).

pub(super) mod durable;
mod flat;
mod replay;

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufWriter, Write},
    net::IpAddr,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use super::{SessionError, SessionRecord, table::SessionTable};
use durable::{Syncer, Ticket, sync_dir};
use replay::replay;

const FILE_NAME: &str = "sessions.jsonl";
const TMP_NAME: &str = "sessions.jsonl.tmp";
/// The journal as it was before a replay that had to skip lines rewrote it.
const DAMAGED_NAME: &str = "sessions.jsonl.damaged";
/// Everything the journal may leave in the state directory.
pub(super) const FILES: [&str; 3] = [FILE_NAME, TMP_NAME, DAMAGED_NAME];
/// Dead lines tolerated before a rewrite, beyond one per live session.
const SLACK_LINES: usize = 1024;
/// Bytes of a usual login line (one with a short user and no groups is about 200).
const USUAL_LINE: u64 = 200;
/// Bulk writes go out in pieces of this size.
const CHUNK: usize = 1 << 20;

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Entry {
    Login(SessionRecord),
    Logout {
        ip: IpAddr,
    },
    /// The start of a batch of `count` entries, which count only if the batch's
    /// `commit` follows them.
    Begin {
        batch: u64,
        count: usize,
    },
    Commit {
        batch: u64,
    },
}

/// `Entry::Login` written from a borrowed record (bulk writes would clone otherwise).
#[derive(Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum LoginRef<'a> {
    Login(&'a SessionRecord),
}

/// What the journal does to its file. Tests put a file that fails on demand in its
/// place (`Opener`).
pub(super) trait JournalFile: Send + Sync {
    /// Writes all of `bytes` at the end of the file. On error, part of it may be there.
    fn append(&self, bytes: &[u8]) -> io::Result<()>;
    fn truncate(&self, len: u64) -> io::Result<()>;
    fn sync_data(&self) -> io::Result<()>;
}

impl JournalFile for File {
    fn append(&self, bytes: &[u8]) -> io::Result<()> {
        (&*self).write_all(bytes)
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
}

/// Opens a journal file for writing at its end, creating it; `fresh` empties it.
pub(super) type Opener = Arc<dyn Fn(&Path, bool) -> io::Result<Arc<dyn JournalFile>> + Send + Sync>;

pub(super) fn open_file(path: &Path, fresh: bool) -> io::Result<Arc<dyn JournalFile>> {
    let mut options = OpenOptions::new();
    if fresh {
        options.write(true).truncate(true);
    } else {
        options.append(true);
    }
    let file = options.create(true).mode(0o600).open(path)?;
    Ok(Arc::new(file))
}

/// `Write` onto a `JournalFile`, counting what got there.
struct Appender<'a> {
    file: &'a dyn JournalFile,
    written: u64,
}

impl Write for Appender<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.append(buf)?;
        self.written += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes through `write` into `file` in `CHUNK` pieces; returns the bytes written,
/// or the error with what did get there (a buffered rest is dropped, never written
/// after the caller cut the file back).
fn write_chunked(
    file: &dyn JournalFile,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<u64, io::Error> {
    let mut out = BufWriter::with_capacity(CHUNK, Appender { file, written: 0 });
    let result = write(&mut out).and_then(|()| out.flush());
    let (appender, _unwritten) = out.into_parts();
    result.map(|()| appender.written)
}

pub(super) struct Journal {
    path: PathBuf,
    dir: PathBuf,
    file: Arc<dyn JournalFile>,
    open: Opener,
    /// Lines in the file (for compaction).
    lines: usize,
    /// Bytes of whole records: where a failed write is cut back to.
    len: u64,
    /// Changes appended (the numbers of their tickets).
    seq: u64,
    /// A failed write could not be cut back off: the file must be rewritten before
    /// anything else is appended.
    stump: bool,
    /// The file holds batch markers, which versions before them cannot read.
    batches: bool,
    syncer: Arc<Syncer>,
}

impl Journal {
    /// Opens the journal in `state_dir` (creating both if needed) and replays it.
    pub(super) fn open(
        state_dir: &Path,
        open: Opener,
    ) -> Result<(Self, SessionTable), SessionError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SessionError::Io { path, source }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(io(state_dir))?;
        let path = state_dir.join(FILE_NAME);
        let mut sessions = SessionTable::default();
        let replayed = match File::open(&path) {
            Ok(file) => {
                // Room for as many sessions as the file could hold lines of a usual
                // length; untouched room costs no memory.
                let len = file.metadata().map_or(0, |m| m.len());
                sessions.reserve((len / USUAL_LINE) as usize);
                Some(replay(&path, file, &mut sessions)?)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(&path)(e)),
        };
        let file = open(&path, false).map_err(io(&path))?;
        if replayed.is_none() {
            // A new file: its directory entry must be as durable as what it will hold.
            sync_dir(state_dir).map_err(io(state_dir))?;
        }
        let len = fs::metadata(&path).map_err(io(&path))?.len();
        let syncer = Arc::new(Syncer::new(state_dir, Arc::clone(&file), len));
        let mut journal = Self {
            path,
            dir: state_dir.to_path_buf(),
            file,
            open,
            lines: replayed.as_ref().map_or(0, |r| r.lines),
            len,
            seq: 0,
            stump: false,
            batches: false,
            syncer,
        };
        if let Some(replayed) = replayed {
            if !replayed.skipped.is_empty() {
                journal.keep_damaged();
            }
            // Whatever replay left out goes before anything is appended. Dead lines
            // wait for the usual threshold: rewriting a million sessions would hold
            // up the start about as long as reading them did.
            if replayed.needs_rewrite() || journal.needs_compaction(sessions.len()) {
                journal.compact(sessions.records())?;
            } else {
                journal.batches = replayed.batches;
            }
        }
        Ok((journal, sessions))
    }

    pub(super) fn syncer(&self) -> &Arc<Syncer> {
        &self.syncer
    }

    /// Whether the file must be rewritten before anything is appended: a failed write
    /// left a stump that could not be cut off, or a rewrite stopped half-way.
    pub(super) fn needs_rewrite(&self) -> bool {
        self.stump
    }

    pub(super) fn append_login(&mut self, record: &SessionRecord) -> Result<Ticket, SessionError> {
        self.append_line(&LoginRef::Login(record))
    }

    pub(super) fn append_logout(&mut self, ip: &IpAddr) -> Result<Ticket, SessionError> {
        self.append_line(&Entry::Logout { ip: *ip })
    }

    /// Appends many logins as one batch (`begin`, the logins, `commit`), which replay
    /// applies all of or, if the batch is not whole, none of; meanwhile `alongside`
    /// (the kernel's write of the same sessions) runs on this thread. The lines are
    /// encoded and written on another, and the `commit` follows only if `alongside`
    /// succeeded. Otherwise the lines are cut back off, and should even that fail,
    /// replay ignores a batch without its `commit`. On two CPUs this takes about the
    /// longer of the two instead of their sum.
    pub(super) fn append_logins_alongside<T, E: From<SessionError>>(
        &mut self,
        records: &[SessionRecord],
        alongside: impl FnOnce() -> Result<T, E>,
    ) -> Result<(T, Ticket), E> {
        let batch = self.lines as u64 + 1;
        let file = Arc::clone(&self.file);
        let (done, written) = std::thread::scope(|scope| {
            let writing = scope.spawn(|| {
                write_chunked(&*file, |out| {
                    write_line(
                        out,
                        &Entry::Begin {
                            batch,
                            count: records.len(),
                        },
                    )?;
                    for record in records {
                        write_line(out, &LoginRef::Login(record))?;
                    }
                    Ok(())
                })
            });
            let done = alongside();
            (
                done,
                writing.join().expect("the journal writer does not panic"),
            )
        });
        let value = match done {
            Ok(value) => value,
            Err(e) => {
                if let Err(cut) = self.file.truncate(self.len) {
                    self.stump = true;
                    tracing::error!(path = %self.path.display(), error = %cut, "could not cut an abandoned batch back off the session journal; it is rewritten before the next change");
                }
                return Err(e);
            }
        };
        let written = written.and_then(|bytes| {
            let mut commit = serde_json::to_vec(&Entry::Commit { batch })?;
            commit.push(b'\n');
            file.append(&commit)?;
            Ok(bytes + commit.len() as u64)
        });
        let ticket = self.appended(written, records.len() + 2)?;
        self.batches = true;
        Ok((value, ticket))
    }

    fn append_line(&mut self, entry: &impl Serialize) -> Result<Ticket, SessionError> {
        let mut line = serde_json::to_vec(entry).expect("entries always serialize");
        line.push(b'\n');
        let written = self.file.append(&line).map(|()| line.len() as u64);
        self.appended(written, 1)
    }

    /// Accounts for a write of `lines` lines, or cuts a failed one back off.
    fn appended(&mut self, written: io::Result<u64>, lines: usize) -> Result<Ticket, SessionError> {
        match written {
            Ok(bytes) => {
                self.len += bytes;
                self.lines += lines;
                self.seq += 1;
                Ok(self.syncer.wrote(self.seq, self.len))
            }
            Err(source) => {
                if let Err(e) = self.file.truncate(self.len) {
                    self.stump = true;
                    tracing::error!(path = %self.path.display(), error = %e, "could not cut a failed write back off the session journal; it is rewritten before the next change");
                }
                tracing::error!(path = %self.path.display(), error = %source, "could not write to the session journal; the change is refused and undone");
                Err(SessionError::not_recorded(self.path.clone(), source))
            }
        }
    }

    /// Cuts the file back to `len` bytes (the changes after it were undone), to be
    /// rewritten before anything else is appended.
    pub(super) fn cut_back(&mut self, len: u64) {
        self.stump = true;
        match self.file.truncate(len) {
            Ok(()) => self.len = len,
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "could not cut undone changes back off the session journal");
            }
        }
    }

    /// Whether the file holds batch markers (an import since the last rewrite).
    pub(super) fn has_batches(&self) -> bool {
        self.batches
    }

    /// Whether dead lines have piled up enough to rewrite the file.
    pub(super) fn needs_compaction(&self, live: usize) -> bool {
        self.lines > 2 * live + SLACK_LINES
    }

    /// Rewrites the file with one login line per live session: a new file, synced,
    /// renamed into place, and the directory synced. Every change so far is then
    /// durable.
    pub(super) fn compact(
        &mut self,
        live: impl Iterator<Item = SessionRecord>,
    ) -> Result<(), SessionError> {
        let io = |source| SessionError::Io {
            path: self.path.clone(),
            source,
        };
        let tmp = self.dir.join(TMP_NAME);
        let mut count = 0;
        let written = (|| {
            let file = (self.open)(&tmp, true)?;
            let len = write_chunked(&*file, |out| {
                for record in live {
                    write_line(out, &LoginRef::Login(&record))?;
                    count += 1;
                }
                Ok(())
            })?;
            file.sync_data()?;
            Ok(len)
        })();
        let len = match written.and_then(|len| fs::rename(&tmp, &self.path).map(|()| len)) {
            Ok(len) => len,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(io(e));
            }
        };
        // From here the new file is the journal, whatever else fails; until it is
        // open and its directory entry durable, nothing more is appended to it.
        self.lines = count;
        self.len = len;
        self.batches = false;
        self.stump = true;
        let file = (self.open)(&self.path, false).map_err(io)?;
        self.file = Arc::clone(&file);
        let synced = sync_dir(&self.dir);
        self.syncer.switch(file, len, synced.is_ok());
        synced.map_err(io)?;
        self.stump = false;
        Ok(())
    }

    /// Keeps the journal as it is now beside it, before a rewrite drops what replay
    /// could not read.
    fn keep_damaged(&self) {
        let damaged = self.dir.join(DAMAGED_NAME);
        let _ = fs::remove_file(&damaged);
        match fs::hard_link(&self.path, &damaged) {
            Ok(()) => {
                tracing::warn!(path = %damaged.display(), "kept the session journal as it was, with the lines skipped")
            }
            Err(e) => {
                tracing::warn!(path = %damaged.display(), error = %e, "could not keep a copy of the session journal as it was")
            }
        }
    }
}

fn write_line(out: &mut dyn Write, entry: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer(&mut *out, entry)?;
    out.write_all(b"\n")
}
