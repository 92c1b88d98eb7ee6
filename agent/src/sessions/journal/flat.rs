//! A journal line read in one pass. serde's internally tagged `Entry` first buffers
//! every value of a line (each string copied once more) to find its `op`; a replay of
//! a million logins spent about a quarter of its decoding there. `FlatEntry` holds
//! every field any entry may have, read straight into place, and a login's strings
//! are not even copied: they are borrowed from the line (`LoginText`), so that replay
//! can keep a block's logins without an allocation each. It answers only for lines
//! it reads whole (and whose strings need no unescaping): anything else is decoded
//! again as `Entry`, so the answer, and the error, are always `Entry`'s.

use std::net::IpAddr;

use serde::Deserialize;
use time::OffsetDateTime;

use super::Entry;
use crate::sessions::table::Fields;

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Op {
    Login,
    Logout,
    Begin,
    Commit,
}

/// Every field of every entry; which ones must be there depends on `op`. Unknown
/// fields are ignored, as `Entry` ignores them.
#[derive(Deserialize)]
struct FlatEntry<'a> {
    op: Op,
    ip: Option<IpAddr>,
    user: Option<&'a str>,
    idp: Option<&'a str>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    authenticated_at: Option<OffsetDateTime>,
    boot_id: Option<&'a str>,
    authenticated_at_boot_ns: Option<i64>,
    #[serde(default, borrow)]
    groups: Vec<&'a str>,
    batch: Option<u64>,
    count: Option<usize>,
}

/// A login line's fields, its strings where they lie in the line.
pub(super) type LoginText<'a> = Fields<'a, Vec<&'a str>>;

/// A line read: a login, borrowed, or any other entry.
pub(super) enum Line<'a> {
    Login(LoginText<'a>),
    Other(Entry),
}

impl<'a> FlatEntry<'a> {
    /// The line, if every field its `op` needs is there.
    fn line(self) -> Option<Line<'a>> {
        Some(match self.op {
            Op::Login => Line::Login(Fields {
                ip: self.ip?,
                user: self.user?,
                idp: self.idp?,
                authenticated_at: self.authenticated_at?,
                boot_id: self.boot_id?,
                authenticated_at_boot_ns: self.authenticated_at_boot_ns?,
                groups: self.groups,
            }),
            Op::Logout => Line::Other(Entry::Logout { ip: self.ip? }),
            Op::Begin => Line::Other(Entry::Begin {
                batch: self.batch?,
                count: self.count?,
            }),
            Op::Commit => Line::Other(Entry::Commit { batch: self.batch? }),
        })
    }
}

/// `line` read: in one pass, borrowing a login's strings, when it can be; else as
/// `Entry` reads it.
pub(super) fn parse_line(line: &[u8]) -> serde_json::Result<Line<'_>> {
    match serde_json::from_slice::<FlatEntry<'_>>(line)
        .ok()
        .and_then(FlatEntry::line)
    {
        Some(read) => Ok(read),
        None => serde_json::from_slice::<Entry>(line).map(Line::Other),
    }
}

/// `line` as an entry (owned).
#[cfg(test)]
pub(super) fn parse(line: &[u8]) -> serde_json::Result<Entry> {
    parse_line(line).map(|read| match read {
        Line::Login(login) => Entry::Login(crate::sessions::SessionRecord {
            ip: login.ip,
            user: login.user.to_owned(),
            idp: login.idp.to_owned(),
            authenticated_at: login.authenticated_at,
            boot_id: login.boot_id.to_owned(),
            authenticated_at_boot_ns: login.authenticated_at_boot_ns,
            groups: login.groups.iter().map(|g| (*g).to_owned()).collect(),
        }),
        Line::Other(entry) => entry,
    })
}

#[cfg(test)]
mod tests {
    use super::{Entry, parse};

    /// What `Entry` alone makes of a line, for comparison: the entry written back, or
    /// the error.
    fn tagged(line: &str) -> Result<String, String> {
        serde_json::from_str::<Entry>(line)
            .map(|e| serde_json::to_string(&e).unwrap())
            .map_err(|e| e.to_string())
    }

    fn flat(line: &str) -> Result<String, String> {
        parse(line.as_bytes())
            .map(|e| serde_json::to_string(&e).unwrap())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn every_line_reads_as_the_tagged_entry_reads_it() {
        let login = r#""ip":"198.18.0.7","user":"alice","idp":"okta","authenticated_at":"2026-12-07T10:00:00.5Z","boot_id":"b","authenticated_at_boot_ns":12"#;
        let lines = [
            format!(r#"{{"op":"login",{login}}}"#),
            format!(r#"{{"op":"login",{login},"groups":["staff","finance"]}}"#),
            format!(r#"{{{login},"op":"login"}}"#),
            format!(r#"{{"op":"login",{login},"future":{{"x":[1]}},"batch":3}}"#),
            format!(r#"{{"op":"login",{login},"groups":null}}"#),
            // Escaped strings cannot be borrowed from the line: read as `Entry` reads them.
            format!(r#"{{"op":"login",{login},"groups":["fin\u0061nce","a\"b"]}}"#),
            r#"{"op":"login","ip":"198.18.0.7","user":"al\u0069ce","idp":"okta","authenticated_at":"2026-12-07T10:00:00Z","boot_id":"b","authenticated_at_boot_ns":1}"#.to_string(),
            format!(r#"{{"op":"login",{login},"ip":"198.18.0.8"}}"#),
            r#"{"op":"login","ip":"198.18.0.7","user":"alice"}"#.to_string(),
            r#"{"op":"login","ip":null,"user":"a","idp":"b","authenticated_at":"2026-12-07T10:00:00Z","boot_id":"","authenticated_at_boot_ns":1}"#.to_string(),
            r#"{"op":"login","ip":"198.18.0.7","user":"a","idp":"b","authenticated_at":"yesterday","boot_id":"","authenticated_at_boot_ns":1}"#.to_string(),
            r#"{"op":"logout","ip":"2001:db8::10"}"#.to_string(),
            r#"{"op":"logout","ip":"2001:db8::10","user":5,"groups":"x"}"#.to_string(),
            r#"{"op":"logout"}"#.to_string(),
            r#"{"op":"logout","ip":"198.018.0.7"}"#.to_string(),
            r#"{"op":"begin","batch":4,"count":2}"#.to_string(),
            r#"{"op":"begin","batch":4}"#.to_string(),
            r#"{"op":"begin","batch":-4,"count":2}"#.to_string(),
            r#"{"op":"commit","batch":4}"#.to_string(),
            r#"{"op":"commit","batch":4,"count":"many"}"#.to_string(),
            r#"{"op":"rename","ip":"198.18.0.7"}"#.to_string(),
            r#"{"ip":"198.18.0.7"}"#.to_string(),
            r#"{"op":"logout","op":"logout","ip":"198.18.0.7"}"#.to_string(),
            r#"["op","logout"]"#.to_string(),
            r#"{"op":"logout","ip":"198.18.0.7""#.to_string(),
            String::new(),
        ];
        for line in &lines {
            assert_eq!(flat(line), tagged(line), "{line}");
        }
        // The cases above reach both ways of reading.
        let read_flat = lines
            .iter()
            .filter(|l| {
                serde_json::from_str::<super::FlatEntry>(l)
                    .ok()
                    .is_some_and(|f| f.line().is_some())
            })
            .count();
        assert!((5..lines.len() - 5).contains(&read_flat), "{read_flat}");
    }
}
