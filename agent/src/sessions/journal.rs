//! Durable session state: an append-only journal of logins and logouts
//! (`state_dir/sessions.jsonl`, one JSON object per line), so a login costs one short
//! append whatever the number of sessions. It is rewritten compactly when dead lines
//! pile up, and at start-up when it has any (or a last line torn by a crash).

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{BufRead, BufReader, BufWriter, Write},
    net::IpAddr,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{SessionError, SessionRecord};

const FILE_NAME: &str = "sessions.jsonl";
/// Everything the journal may leave in the state directory (compaction's temporary file too).
pub(super) const FILES: [&str; 2] = [FILE_NAME, "sessions.jsonl.tmp"];
/// Dead lines tolerated before a rewrite, beyond one per live session.
const SLACK_LINES: usize = 1024;

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Entry {
    Login(SessionRecord),
    Logout { ip: IpAddr },
}

/// `Entry::Login` written from a borrowed record (bulk writes would clone otherwise).
#[derive(Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum LoginRef<'a> {
    Login(&'a SessionRecord),
}

pub(super) struct Journal {
    path: PathBuf,
    file: File,
    lines: usize,
}

impl Journal {
    pub(super) fn open(
        state_dir: &Path,
    ) -> Result<(Self, BTreeMap<IpAddr, SessionRecord>), SessionError> {
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
        let mut sessions = BTreeMap::new();
        let mut replayed = Replayed {
            lines: 0,
            torn_tail: false,
        };
        match File::open(&path) {
            Ok(file) => replayed = replay(&path, file, &mut sessions)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
        let file = open_append(&path).map_err(io(&path))?;
        let mut journal = Self {
            path,
            file,
            lines: replayed.lines,
        };
        // A torn last line must go before anything is appended; dead lines are
        // dropped too while at it.
        if replayed.torn_tail || replayed.lines > sessions.len() {
            journal.compact(sessions.values())?;
        }
        Ok((journal, sessions))
    }

    pub(super) fn append_login(&mut self, record: &SessionRecord) -> Result<(), SessionError> {
        self.append(&LoginRef::Login(record))
    }

    pub(super) fn append_logout(&mut self, ip: &IpAddr) -> Result<(), SessionError> {
        self.append(&Entry::Logout { ip: *ip })
    }

    /// Appends many logins through one buffer and makes them durable with one fsync.
    /// On failure the file is cut back to where it was, so that no partial batch
    /// replays as sessions the caller was told were not recorded.
    pub(super) fn append_logins(&mut self, records: &[SessionRecord]) -> Result<(), SessionError> {
        let io = |source| SessionError::Io {
            path: self.path.clone(),
            source,
        };
        let before = self.file.metadata().map_err(io)?.len();
        let written = (|| {
            let mut out = BufWriter::with_capacity(1 << 20, &self.file);
            for record in records {
                serde_json::to_writer(&mut out, &LoginRef::Login(record))?;
                out.write_all(b"\n")?;
            }
            out.into_inner().map_err(|e| e.into_error())?;
            self.file.sync_data()
        })();
        if let Err(source) = written {
            if let Err(e) = self.file.set_len(before) {
                tracing::error!(path = %self.path.display(), error = %e, "could not cut a failed session import out of the journal");
            }
            return Err(io(source));
        }
        self.lines += records.len();
        Ok(())
    }

    /// Whether dead lines have piled up enough to rewrite the file.
    pub(super) fn needs_compaction(&self, live: usize) -> bool {
        self.lines > 2 * live + SLACK_LINES
    }

    fn append(&mut self, entry: &impl Serialize) -> Result<(), SessionError> {
        let mut line = serde_json::to_vec(entry).expect("entries always serialize");
        line.push(b'\n');
        self.file
            .write_all(&line)
            .map_err(|source| SessionError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.lines += 1;
        Ok(())
    }

    /// Rewrites the file with one login line per live session, atomically.
    pub(super) fn compact<'a>(
        &mut self,
        live: impl Iterator<Item = &'a SessionRecord>,
    ) -> Result<(), SessionError> {
        let io = |source| SessionError::Io {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("jsonl.tmp");
        let mut count = 0;
        {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            let mut out = BufWriter::new(file);
            for record in live {
                serde_json::to_writer(&mut out, &LoginRef::Login(record))
                    .map_err(|e| io(e.into()))?;
                out.write_all(b"\n").map_err(io)?;
                count += 1;
            }
            let file = out.into_inner().map_err(|e| io(e.into_error()))?;
            file.sync_all().map_err(io)?;
        }
        fs::rename(&tmp, &self.path).map_err(io)?;
        self.file = open_append(&self.path).map_err(io)?;
        self.lines = count;
        Ok(())
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

/// What replaying a journal found.
struct Replayed {
    lines: usize,
    /// The last line was cut short by a crash (and ignored).
    torn_tail: bool,
}

/// Applies every line of the journal, streaming. A last line cut short by a crash is
/// ignored; any other bad line is an error naming it.
fn replay(
    path: &Path,
    file: File,
    sessions: &mut BTreeMap<IpAddr, SessionRecord>,
) -> Result<Replayed, SessionError> {
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut line = String::new();
    let mut replayed = Replayed {
        lines: 0,
        torn_tail: false,
    };
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(|source| SessionError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if n == 0 {
            return Ok(replayed);
        }
        replayed.lines += 1;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Entry>(&line) {
            Ok(Entry::Login(record)) => {
                // Written by an older agent with looser rules, or edited: a session
                // the rules refuse now is left out (and dropped by the next rewrite),
                // never a reason not to start.
                if let Err(e) = super::check_identity(record.ip, &record.user, &record.idp) {
                    tracing::warn!(path = %path.display(), line = replayed.lines, device = %record.ip, reason = e.to_string().as_str(), "skipping a session journal line the session rules refuse");
                    continue;
                }
                sessions.insert(record.ip, record);
            }
            Ok(Entry::Logout { ip }) => {
                sessions.remove(&ip);
            }
            // Only the last line can lack its newline.
            Err(_) if !line.ends_with('\n') => {
                tracing::warn!(path = %path.display(), line = replayed.lines, "ignoring a session journal line cut short by a crash");
                replayed.torn_tail = true;
            }
            Err(e) => {
                return Err(SessionError::Corrupt {
                    path: path.to_path_buf(),
                    line: replayed.lines,
                    message: e.to_string(),
                });
            }
        }
    }
}
