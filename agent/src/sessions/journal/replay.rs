//! Reading the journal back at start-up, streaming, line by line. A line it cannot
//! read is skipped and reported, never an error: a damaged journal must not keep the
//! agent from starting.

use std::{
    io::{self, BufRead, BufReader, Read as _},
    path::Path,
    rc::Rc,
    sync::mpsc,
};

use agent_common::maps::IDENTITY_NONE;

use super::{
    CHUNK, Entry,
    flat::{self, LoginText},
};
use crate::sessions::{
    SessionError,
    rules::check_replayed,
    table::{Fields, SessionTable, WARM_AHEAD},
};

/// The longest line replay reads (a login is well under 1 KiB); longer ones are skipped.
const MAX_LINE: usize = 64 * 1024;
/// Skipped lines named one by one in the log; the rest are counted.
const SKIPPED_LOGGED: usize = 20;

/// What replaying a journal found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Replayed {
    pub lines: usize,
    /// Lines left out, by number, and why.
    pub skipped: Vec<(usize, String)>,
    /// The last line was cut short by a crash (and ignored).
    pub torn_tail: bool,
    /// Batches left out because they were not whole: (first line, entries announced).
    pub cut_batches: Vec<(usize, usize)>,
    /// A whole batch was applied: the file holds batch markers.
    pub batches: bool,
}

impl Replayed {
    pub(super) fn needs_rewrite(&self) -> bool {
        self.torn_tail || !self.skipped.is_empty() || !self.cut_batches.is_empty()
    }
}

/// A batch being read: its number, first line, announced size and entries so far.
struct OpenBatch {
    batch: u64,
    line: usize,
    count: usize,
    entries: Vec<Change>,
}

/// An entry to apply: a login, its strings still in its block's `Texts` (shared with
/// the rest of the block, and kept as long as a batch holds the login), or any other.
enum Change {
    Login(Rc<Texts>, Login),
    Other(Entry),
}

/// Applies every line of the journal it can read, streaming, and says in the log
/// what it left out. Only an error reading the file itself is an error.
///
/// Lines are read here and applied here, in order; decoding them (most of the work)
/// goes to `DECODERS` threads, a block of lines at a time, blocks handed out in turn
/// so that they come back in order.
pub(super) fn replay(
    path: &Path,
    file: impl io::Read,
    sessions: &mut SessionTable,
) -> Result<Replayed, SessionError> {
    let mut reader = BufReader::with_capacity(CHUNK, file);
    let mut replaying = Replaying {
        path,
        sessions,
        replayed: Replayed::default(),
        batch: None,
    };
    let read = std::thread::scope(|scope| {
        let decoders: Vec<_> = (0..DECODERS)
            .map(|_| {
                let (blocks, inbox) = mpsc::sync_channel::<Block>(1);
                let (outbox, decoded) = mpsc::sync_channel::<(Block, Vec<Decoded>, Texts)>(1);
                scope.spawn(move || {
                    for block in inbox {
                        let (lines, texts) = block.decode();
                        if outbox.send((block, lines, texts)).is_err() {
                            break;
                        }
                    }
                });
                (blocks, decoded)
            })
            .collect();
        let (mut sent, mut received, mut done) = (0, 0, false);
        let mut result = Ok(());
        loop {
            // Keep every decoder busy, then take the oldest block back.
            while !done && sent < received + DECODERS {
                match Block::read(&mut reader) {
                    Ok(block) if block.is_empty() => done = true,
                    Ok(block) => {
                        decoders[sent % DECODERS]
                            .0
                            .send(block)
                            .expect("a decoder thread is alive until its inbox closes");
                        sent += 1;
                    }
                    Err(e) => {
                        result = Err(e);
                        done = true;
                    }
                }
            }
            if received == sent {
                break;
            }
            let (block, lines, texts) = decoders[received % DECODERS]
                .1
                .recv()
                .expect("a decoder answers every block");
            received += 1;
            block.apply(lines, texts, &mut replaying);
        }
        drop(decoders);
        result
    });
    read.map_err(|source| SessionError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let replayed = replaying.finish();
    report(path, &replayed);
    Ok(replayed)
}

/// Threads decoding journal lines.
const DECODERS: usize = 2;
/// Lines in a block handed to a decoder.
const BLOCK_LINES: usize = 8192;

/// Consecutive journal lines, as read: their bytes, and for each where it lies in
/// them, its length in the file and whether all of it was kept (`read_line`).
#[derive(Default)]
struct Block {
    text: Vec<u8>,
    lines: Vec<(usize, usize, usize, bool)>,
}

/// A line decoded: `None` for a blank one.
type Decoded = Option<Result<Read, String>>;

/// A line's entry: a login, its strings in its block's `Texts`, or any other.
enum Read {
    Login(Login),
    Other(Entry),
}

/// Where a string lies in a block's `Texts`: start and end.
type Span = (u32, u32);

/// A login as decoded, its strings kept in its block's `Texts`.
struct Login {
    ip: std::net::IpAddr,
    authenticated_at: time::OffsetDateTime,
    authenticated_at_boot_ns: i64,
    user: Span,
    idp: Span,
    boot_id: Span,
    /// Of `Texts::groups`.
    groups: Span,
}

/// The strings of a block's logins, side by side: one buffer for a block, where owned
/// records took three or more allocations each, all freed by the thread that applies
/// them (most of its time, in a replay of a million logins).
#[derive(Default)]
struct Texts {
    text: String,
    groups: Vec<Span>,
}

impl Texts {
    fn keep(&mut self, s: &str) -> Span {
        let start = self.text.len() as u32;
        self.text.push_str(s);
        (start, self.text.len() as u32)
    }

    fn get(&self, (start, end): Span) -> &str {
        &self.text[start as usize..end as usize]
    }

    /// Keeps the login's strings here.
    fn keep_login(&mut self, login: &LoginText<'_>) -> Login {
        let first = self.groups.len() as u32;
        for group in &login.groups {
            let span = self.keep(group);
            self.groups.push(span);
        }
        Login {
            ip: login.ip,
            authenticated_at: login.authenticated_at,
            authenticated_at_boot_ns: login.authenticated_at_boot_ns,
            user: self.keep(login.user),
            idp: self.keep(login.idp),
            boot_id: self.keep(login.boot_id),
            groups: (first, self.groups.len() as u32),
        }
    }

    /// The login kept by `keep_login`.
    fn login(&self, login: &Login) -> LoginText<'_> {
        let (first, end) = login.groups;
        Fields {
            ip: login.ip,
            user: self.get(login.user),
            idp: self.get(login.idp),
            authenticated_at: login.authenticated_at,
            boot_id: self.get(login.boot_id),
            authenticated_at_boot_ns: login.authenticated_at_boot_ns,
            groups: self.groups[first as usize..end as usize]
                .iter()
                .map(|span| self.get(*span))
                .collect(),
        }
    }
}

impl Block {
    /// The next block of the file (empty at its end).
    fn read(reader: &mut impl BufRead) -> io::Result<Self> {
        let mut block = Self::default();
        while block.lines.len() < BLOCK_LINES {
            let start = block.text.len();
            let (n, whole) = read_line(reader, &mut block.text)?;
            if n == 0 {
                break;
            }
            block.lines.push((start, block.text.len(), n, whole));
        }
        Ok(block)
    }

    fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    fn line(&self, i: usize) -> &[u8] {
        let (start, end, ..) = self.lines[i];
        &self.text[start..end]
    }

    fn decode(&self) -> (Vec<Decoded>, Texts) {
        let mut texts = Texts {
            text: String::with_capacity(self.text.len() / 2),
            groups: Vec::new(),
        };
        let lines = (0..self.lines.len())
            .map(|i| {
                let line = self.line(i);
                let (.., n, whole) = self.lines[i];
                (!line.iter().all(u8::is_ascii_whitespace))
                    .then(|| decode(line, n, whole, &mut texts))
            })
            .collect();
        (lines, texts)
    }

    fn apply(&self, mut decoded: Vec<Decoded>, texts: Texts, replaying: &mut Replaying<'_>) {
        let texts = Rc::new(texts);
        for i in 0..decoded.len() {
            // Two waits for memory, each once a line, were most of this thread's time:
            // the decoded line (written on the other core) and the index probe of its
            // device. Both are asked for a few lines ahead, the line first.
            if let Some(ahead) = decoded.get(i + 2 * WARM_AHEAD) {
                crate::memory::prefetch(ahead);
            }
            if let Some(Some(Ok(Read::Login(ahead)))) = decoded.get(i + WARM_AHEAD) {
                replaying.sessions.warm(&ahead.ip);
            }
            let whole = self.lines[i].3;
            replaying.next_line(self.line(i), whole, decoded[i].take(), &texts);
        }
    }
}

/// A replay between two lines: the sessions so far, what it found, and the batch being
/// read, whose entries wait for its `commit`.
struct Replaying<'a> {
    path: &'a Path,
    sessions: &'a mut SessionTable,
    replayed: Replayed,
    batch: Option<OpenBatch>,
}

impl Replaying<'_> {
    /// Takes the next line (all of it in `line` if `whole`), as `Block::decode` decoded
    /// it: applies it, or notes why not.
    fn next_line(&mut self, line: &[u8], whole: bool, decoded: Decoded, texts: &Rc<Texts>) {
        self.replayed.lines += 1;
        let number = self.replayed.lines;
        match decoded {
            None => {}
            Some(Ok(Read::Login(login))) => {
                self.change(number, Change::Login(Rc::clone(texts), login));
            }
            Some(Ok(Read::Other(entry))) => self.change(number, Change::Other(entry)),
            // Only the last line can lack its newline: a write a crash cut short.
            Some(Err(_)) if !line.ends_with(b"\n") && whole => {
                self.replayed.torn_tail = true;
                tracing::warn!(path = %self.path.display(), line = number, "ignoring a session journal line cut short by a crash");
            }
            Some(Err(reason)) => self.replayed.skipped.push((number, reason)),
        }
    }

    /// Applies the entry on line `number`, or holds it while a batch is open.
    fn change(&mut self, number: usize, change: Change) {
        match change {
            Change::Other(Entry::Begin { batch, count }) => self.begin(number, batch, count),
            Change::Other(Entry::Commit { batch }) => self.commit(number, batch),
            change => match &mut self.batch {
                Some(open) => open.entries.push(change),
                None => apply(self.sessions, change),
            },
        }
    }

    /// Opens a batch; one still open was cut short.
    fn begin(&mut self, number: usize, batch: u64, count: usize) {
        if let Some(open) = self.batch.take() {
            self.replayed.cut_batches.push((open.line, open.count));
        }
        self.batch = Some(OpenBatch {
            batch,
            line: number,
            count,
            entries: Vec::with_capacity(count.min(1 << 20)),
        });
    }

    /// Applies the open batch if this `commit` is its own; otherwise the batch open (if
    /// any) was cut short and this line is skipped.
    fn commit(&mut self, number: usize, batch: u64) {
        match self.batch.take() {
            Some(open) if open.batch == batch => {
                for entry in open.entries {
                    apply(self.sessions, entry);
                }
                self.replayed.batches = true;
            }
            Some(open) => {
                self.replayed.cut_batches.push((open.line, open.count));
                self.replayed.skipped.push((
                    number,
                    format!("the end of batch {batch}, which did not begin here"),
                ));
            }
            None => self.replayed.skipped.push((
                number,
                format!("the end of batch {batch}, which never began"),
            )),
        }
    }

    /// What the replay found; a batch still open at the end of the file was cut short.
    fn finish(mut self) -> Replayed {
        if let Some(open) = self.batch.take() {
            self.replayed.cut_batches.push((open.line, open.count));
        }
        self.replayed
    }
}

fn apply(sessions: &mut SessionTable, change: Change) {
    // Not in the kernel yet: no identity slot.
    match change {
        Change::Login(texts, login) => {
            sessions.insert_fields(&texts.login(&login), IDENTITY_NONE);
        }
        Change::Other(Entry::Login(record)) => sessions.insert(&record, IDENTITY_NONE),
        Change::Other(Entry::Logout { ip }) => {
            sessions.remove(&ip);
        }
        Change::Other(Entry::Begin { .. } | Entry::Commit { .. }) => {}
    }
}

/// Reads one line of at most `MAX_LINE` bytes into `line` (its newline included); a
/// longer one is read to its end but not kept. Returns the bytes read and whether
/// all of them are in `line`.
fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<(usize, bool)> {
    let n = reader
        .by_ref()
        .take(MAX_LINE as u64)
        .read_until(b'\n', line)?;
    if n < MAX_LINE || line.ends_with(b"\n") {
        return Ok((n, true));
    }
    // Too long: skip to the end of the line.
    let mut rest = n;
    loop {
        let (done, used) = {
            let available = reader.fill_buf()?;
            match available.iter().position(|&b| b == b'\n') {
                Some(i) => (true, i + 1),
                None => (available.is_empty(), available.len()),
            }
        };
        reader.consume(used);
        rest += used;
        if done {
            return Ok((rest, false));
        }
    }
}

/// One line as an entry (a login's strings kept in `texts`), or why it is not one. A
/// line that an older version's failed write left a stump of, with a whole entry glued
/// after it, yields that entry.
fn decode(line: &[u8], n: usize, whole: bool, texts: &mut Texts) -> Result<Read, String> {
    if !whole {
        return Err(format!(
            "{n} bytes long, beyond the {MAX_LINE} bytes of any entry"
        ));
    }
    let checked = |read: flat::Line<'_>, texts: &mut Texts| match read {
        flat::Line::Login(login) => check_replayed(&login)
            .map(|()| Read::Login(texts.keep_login(&login)))
            .map_err(|e| e.to_string()),
        flat::Line::Other(Entry::Login(record)) => check_replayed(&record.fields())
            .map(|()| Read::Other(Entry::Login(record)))
            .map_err(|e| e.to_string()),
        flat::Line::Other(entry) => Ok(Read::Other(entry)),
    };
    match flat::parse_line(line) {
        Ok(read) => checked(read, texts),
        Err(e) => {
            let glued = find_last(line, br#"{"op":"#)
                .filter(|&at| at > 0)
                .and_then(|at| flat::parse_line(&line[at..]).ok());
            match glued {
                Some(read) => checked(read, texts),
                None => {
                    // serde_json's position is within the line; keep the column.
                    let message = e.to_string();
                    let suffix = format!(" at line {} column {}", e.line(), e.column());
                    let what = message.strip_suffix(&suffix).unwrap_or(&message);
                    Err(format!(
                        "not a journal entry: {what} (column {})",
                        e.column()
                    ))
                }
            }
        }
    }
}

fn find_last(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

/// Says in the log what replay left out.
fn report(path: &Path, replayed: &Replayed) {
    for (line, reason) in replayed.skipped.iter().take(SKIPPED_LOGGED) {
        tracing::warn!(path = %path.display(), line, "skipped a session journal line: {reason}");
    }
    if !replayed.skipped.is_empty() {
        let lines: Vec<String> = replayed
            .skipped
            .iter()
            .take(SKIPPED_LOGGED)
            .map(|(line, _)| line.to_string())
            .collect();
        let more = replayed.skipped.len().saturating_sub(SKIPPED_LOGGED);
        tracing::warn!(
            path = %path.display(),
            skipped = replayed.skipped.len(),
            "the session journal had lines that could not be read (lines {}{}); every other line was kept, and the devices of the skipped ones have no session until they log in again",
            lines.join(", "),
            if more > 0 { format!(" and {more} more") } else { String::new() },
        );
    }
    for (line, count) in &replayed.cut_batches {
        tracing::warn!(path = %path.display(), line, entries = count, "ignoring a batch of session changes (an import) that is not whole: the agent stopped while writing it, and it was never acknowledged");
    }
}
