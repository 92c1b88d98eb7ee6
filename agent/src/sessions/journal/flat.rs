//! A journal line read in one pass. serde's internally tagged `Entry` first buffers
//! every value of a line (each string copied once more) to find its `op`; a replay of
//! a million logins spent about a quarter of its decoding there. `FlatEntry` holds
//! every field any entry may have, read straight into place. It answers only for
//! lines it reads whole: anything else is decoded again as `Entry`, so the answer,
//! and the error, are always `Entry`'s.

use std::net::IpAddr;

use serde::Deserialize;
use time::OffsetDateTime;

use super::Entry;
use crate::sessions::SessionRecord;

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
struct FlatEntry {
    op: Op,
    ip: Option<IpAddr>,
    user: Option<String>,
    idp: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    authenticated_at: Option<OffsetDateTime>,
    boot_id: Option<String>,
    authenticated_at_boot_ns: Option<i64>,
    #[serde(default)]
    groups: Vec<String>,
    batch: Option<u64>,
    count: Option<usize>,
}

impl FlatEntry {
    /// The entry, if every field its `op` needs is there.
    fn entry(self) -> Option<Entry> {
        Some(match self.op {
            Op::Login => Entry::Login(SessionRecord {
                ip: self.ip?,
                user: self.user?,
                idp: self.idp?,
                authenticated_at: self.authenticated_at?,
                boot_id: self.boot_id?,
                authenticated_at_boot_ns: self.authenticated_at_boot_ns?,
                groups: self.groups,
            }),
            Op::Logout => Entry::Logout { ip: self.ip? },
            Op::Begin => Entry::Begin {
                batch: self.batch?,
                count: self.count?,
            },
            Op::Commit => Entry::Commit { batch: self.batch? },
        })
    }
}

/// `line` as an entry: in one pass when it can be, else as `Entry` reads it.
pub(super) fn parse(line: &[u8]) -> serde_json::Result<Entry> {
    match serde_json::from_slice::<FlatEntry>(line)
        .ok()
        .and_then(FlatEntry::entry)
    {
        Some(entry) => Ok(entry),
        None => serde_json::from_slice::<Entry>(line),
    }
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
                    .and_then(super::FlatEntry::entry)
                    .is_some()
            })
            .count();
        assert!((5..lines.len() - 5).contains(&read_flat), "{read_flat}");
    }
}
