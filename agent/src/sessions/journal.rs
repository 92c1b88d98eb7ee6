//! Durable session state: an append-only journal of logins and logouts
//! (`state_dir/sessions.jsonl`, one JSON object per line), so a login costs one short
//! append whatever the number of sessions. It is rewritten compactly at start-up and
//! whenever dead lines outnumber live sessions.

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
/// Dead lines tolerated before a rewrite, beyond one per live session.
const SLACK_LINES: usize = 1024;

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Entry {
    Login(SessionRecord),
    Logout { ip: IpAddr },
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
        let mut lines = 0;
        match File::open(&path) {
            Ok(file) => lines = replay(&path, file, &mut sessions)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
        let file = open_append(&path).map_err(io(&path))?;
        let mut journal = Self { path, file, lines };
        // Start from a clean file: drops dead lines and any torn last line.
        journal.compact(sessions.values())?;
        Ok((journal, sessions))
    }

    pub(super) fn append_login(&mut self, record: &SessionRecord) -> Result<(), SessionError> {
        self.append(&Entry::Login(record.clone()))
    }

    pub(super) fn append_logout(&mut self, ip: &IpAddr) -> Result<(), SessionError> {
        self.append(&Entry::Logout { ip: *ip })
    }

    /// Whether dead lines have piled up enough to rewrite the file.
    pub(super) fn needs_compaction(&self, live: usize) -> bool {
        self.lines > 2 * live + SLACK_LINES
    }

    fn append(&mut self, entry: &Entry) -> Result<(), SessionError> {
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
                serde_json::to_writer(&mut out, &Entry::Login(record.clone()))
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

/// Applies every line of the journal; returns the number of lines. A last line cut
/// short by a crash is ignored; any other bad line is an error naming it.
fn replay(
    path: &Path,
    file: File,
    sessions: &mut BTreeMap<IpAddr, SessionRecord>,
) -> Result<usize, SessionError> {
    let mut lines: Vec<String> = Vec::new();
    let mut reader = BufReader::new(file);
    let mut complete_last = true;
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .map_err(|source| SessionError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if n == 0 {
            break;
        }
        complete_last = line.ends_with('\n');
        lines.push(line);
    }
    let total = lines.len();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Entry>(line) {
            Ok(Entry::Login(record)) => {
                sessions.insert(record.ip, record);
            }
            Ok(Entry::Logout { ip }) => {
                sessions.remove(&ip);
            }
            Err(_) if i + 1 == total && !complete_last => {
                tracing::warn!(path = %path.display(), line = i + 1, "ignoring a session journal line cut short by a crash");
            }
            Err(e) => {
                return Err(SessionError::Corrupt {
                    path: path.to_path_buf(),
                    line: i + 1,
                    message: e.to_string(),
                });
            }
        }
    }
    Ok(total)
}
