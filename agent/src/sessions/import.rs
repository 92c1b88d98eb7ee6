//! Bulk session import files: JSON lines (`{"ip", "user", "idp"?, "authenticated_at",
//! "groups"?}` per line) or CSV (`ip,user,idp,authenticated_at[,groups]`, header
//! optional, empty idp for the default, groups separated by `;`). The first line that
//! is not blank or a `#` comment decides the format.
//! Parsing checks each line on its own (and that no device appears twice); whether a
//! session may be recorded against the current state is `SessionStore::plan_import`'s
//! job. Every problem is collected with its line number, so one run reports them all.

use std::{borrow::Cow, fmt, net::IpAddr};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{DEFAULT_IDP, check_name};
use crate::input::parse_device;

const CSV_COLUMNS: [&str; 5] = ["ip", "user", "idp", "authenticated_at", "groups"];
/// Columns a CSV line must have; the last one (groups) may be left out.
const CSV_REQUIRED: usize = 4;

/// One session to import, from line `line` of the file (1-based).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportRecord {
    pub line: usize,
    pub ip: IpAddr,
    pub user: String,
    pub idp: String,
    #[serde(with = "time::serde::rfc3339")]
    pub authenticated_at: OffsetDateTime,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// A line that cannot be imported, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Error)]
#[error("line {line}: {message}")]
pub struct LineError {
    pub line: usize,
    pub message: String,
}

impl LineError {
    pub fn new(line: usize, message: impl fmt::Display) -> Self {
        Self {
            line,
            message: message.to_string(),
        }
    }
}

/// The good lines of a file, and the bad ones; both in line order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedImport {
    pub records: Vec<ImportRecord>,
    pub errors: Vec<LineError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    JsonLines,
    Csv,
}

/// A JSON line's fields, all optional so that a missing one gets our message.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonLine<'a> {
    #[serde(borrow)]
    ip: Option<Cow<'a, str>>,
    #[serde(borrow)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow)]
    idp: Option<Cow<'a, str>>,
    #[serde(borrow)]
    authenticated_at: Option<Cow<'a, str>>,
    groups: Option<Vec<String>>,
}

/// A line's fields as text, before checking.
struct Fields<'a> {
    ip: Cow<'a, str>,
    user: Cow<'a, str>,
    /// `None` for the default IdP.
    idp: Option<Cow<'a, str>>,
    authenticated_at: Cow<'a, str>,
    groups: Vec<String>,
}

/// Files larger than this are parsed in two halves at once.
const SPLIT_ABOVE: usize = 1 << 20;

/// Parses an import file, detecting its format. A large file is parsed in two halves on
/// two threads; the result is the same as reading it line by line.
pub fn parse(text: &str) -> ParsedImport {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let split = (text.len() > SPLIT_ABOVE).then(|| {
        let middle = text.len() / 2;
        text[middle..]
            .find('\n')
            .map_or(text.len(), |i| middle + i + 1)
    });
    parse_split(text, split)
}

/// `parse` with the text cut at byte `split` (just after a newline), if given.
fn parse_split(text: &str, split: Option<usize>) -> ParsedImport {
    // The first line that is not blank or a comment decides the format.
    let Some(format) = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|first| {
            if first.starts_with('{') {
                Format::JsonLines
            } else {
                Format::Csv
            }
        })
    else {
        return ParsedImport::default();
    };
    let Some(split) = split.filter(|&at| at > 0 && at < text.len()) else {
        return parse_part(text, 1, format, true).into_parsed();
    };
    let (first, second) = text.split_at(split);
    let second_line = first.bytes().filter(|&b| b == b'\n').count() + 1;
    // The header is the file's first content line, wherever that is.
    let header_in_second = first.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#')
    });
    let (mut a, b) = std::thread::scope(|scope| {
        let b = scope.spawn(|| parse_part(second, second_line, format, header_in_second));
        let a = parse_part(first, 1, format, true);
        (a, b.join().expect("an import parser panicked"))
    });
    // A device of the second half already seen in the first is a duplicate there,
    // whatever else its line has wrong (as when read line by line).
    let duplicate = |line: usize, ip: IpAddr| {
        a.seen.get(&ip).map(|first| LineError {
            line,
            message: duplicate_message(ip, *first),
        })
    };
    let mut errors = b.errors;
    for (error, ip) in errors.iter_mut().zip(&b.error_ips) {
        if let Some(d) = ip.and_then(|ip| duplicate(error.line, ip)) {
            *error = d;
        }
    }
    a.records.reserve(b.records.len());
    for record in b.records {
        match duplicate(record.line, record.ip) {
            Some(d) => errors.push(d),
            None => a.records.push(record),
        }
    }
    errors.sort_by_key(|e| e.line);
    a.errors.append(&mut errors);
    a.into_parsed()
}

/// What one part of a file parsed to.
struct Part {
    records: Vec<ImportRecord>,
    errors: Vec<LineError>,
    /// For each error, its line's device if the address could be read.
    error_ips: Vec<Option<IpAddr>>,
    /// The line each device first appeared on.
    seen: hashbrown::HashMap<IpAddr, usize>,
}

impl Part {
    fn into_parsed(self) -> ParsedImport {
        ParsedImport {
            records: self.records,
            errors: self.errors,
        }
    }
}

/// Parses `text`, whose first line is line `first_line` of the file, in `format`;
/// a CSV header is allowed on its first content line if `header_allowed`.
fn parse_part(text: &str, first_line: usize, format: Format, mut header_allowed: bool) -> Part {
    // Sized up front: growing these for a million lines costs more than counting.
    let lines = text.bytes().filter(|&b| b == b'\n').count() + 1;
    let mut part = Part {
        records: Vec::with_capacity(lines),
        errors: Vec::new(),
        error_ips: Vec::new(),
        seen: hashbrown::HashMap::with_capacity(lines),
    };
    for (index, raw) in text.lines().enumerate() {
        let line = first_line + index;
        let content = raw.trim();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let fields = match format {
            Format::JsonLines => json_fields(content),
            Format::Csv if header_allowed && is_header(content) => {
                header_allowed = false;
                match check_header(content) {
                    Ok(()) => continue,
                    Err(message) => Err(message),
                }
            }
            Format::Csv => csv_fields(content),
        };
        header_allowed = false;
        let mut ip = None;
        match fields.and_then(|fields| check(line, fields, &mut part.seen, &mut ip)) {
            Ok(record) => part.records.push(record),
            Err(message) => {
                part.errors.push(LineError { line, message });
                part.error_ips.push(ip);
            }
        }
    }
    part
}

/// Why a line is refused whose device `ip` already appeared on line `first` (here, and
/// in `rules::plan_import`).
pub(super) fn duplicate_message(ip: IpAddr, first: usize) -> String {
    format!("ip {ip} already appears on line {first} (one session per device)")
}

fn json_fields(content: &str) -> Result<Fields<'_>, String> {
    let fields: JsonLine<'_> = serde_json::from_str(content).map_err(|e| {
        // serde_json ends its messages with a position within the line; keep only the
        // column, as the line number is the file's.
        let message = e.to_string();
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        let what = message.strip_suffix(&suffix).unwrap_or(&message);
        format!(
            "not a JSON object with ip, user, idp, authenticated_at, groups: {what} (column {})",
            e.column()
        )
    })?;
    let missing = |name: &str| format!("missing field {name:?}");
    Ok(Fields {
        ip: fields.ip.ok_or_else(|| missing("ip"))?,
        user: fields.user.ok_or_else(|| missing("user"))?,
        idp: fields.idp,
        authenticated_at: fields
            .authenticated_at
            .ok_or_else(|| missing("authenticated_at"))?,
        groups: fields.groups.unwrap_or_default(),
    })
}

/// A CSV header names the first column instead of holding an address.
fn is_header(content: &str) -> bool {
    content
        .split(',')
        .next()
        .is_some_and(|first| first.trim().eq_ignore_ascii_case("ip"))
}

fn check_header(content: &str) -> Result<(), String> {
    let columns: Vec<&str> = content.split(',').map(str::trim).collect();
    if (CSV_REQUIRED..=CSV_COLUMNS.len()).contains(&columns.len())
        && columns
            .iter()
            .zip(CSV_COLUMNS)
            .all(|(got, want)| got.eq_ignore_ascii_case(want))
    {
        Ok(())
    } else {
        Err(format!(
            "header {content:?} should be {} (these columns, in this order; groups may be left out)",
            CSV_COLUMNS.join(",")
        ))
    }
}

fn csv_fields(content: &str) -> Result<Fields<'_>, String> {
    if content.starts_with('{') {
        return Err(
            "a JSON object in a CSV file (the first line decides the format, and it was CSV)"
                .into(),
        );
    }
    if content.contains('"') {
        return Err(
            "CSV fields cannot be quoted; write them bare, or use JSON lines for a name with a comma"
                .into(),
        );
    }
    let mut split = content.split(',').map(str::trim);
    let (Some(ip), Some(user), Some(idp), Some(authenticated_at), groups, None) = (
        split.next(),
        split.next(),
        split.next(),
        split.next(),
        split.next(),
        split.next(),
    ) else {
        return Err(format!(
            "expected 4 or 5 comma-separated fields ({}), found {}",
            CSV_COLUMNS.join(","),
            content.split(',').count()
        ));
    };
    let groups = groups
        .unwrap_or_default()
        .split(';')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(str::to_string)
        .collect();
    for (name, value) in [
        ("ip", ip),
        ("user", user),
        ("authenticated_at", authenticated_at),
    ] {
        if value.is_empty() {
            return Err(format!("missing field {name:?}"));
        }
    }
    Ok(Fields {
        ip: ip.into(),
        user: user.into(),
        idp: (!idp.is_empty()).then_some(idp.into()),
        authenticated_at: authenticated_at.into(),
        groups,
    })
}

/// Checks one line's fields, whatever the format. A device counts as seen once its
/// address parses, even if the line has other problems, so that a duplicate is
/// reported in the same run.
/// `device` gets the line's device once its address is read.
fn check(
    line: usize,
    fields: Fields<'_>,
    seen: &mut hashbrown::HashMap<IpAddr, usize>,
    device: &mut Option<IpAddr>,
) -> Result<ImportRecord, String> {
    let ip = parse_device(&fields.ip).map_err(|e| format!("ip {e}"))?;
    *device = Some(ip);
    match seen.entry(ip) {
        hashbrown::hash_map::Entry::Occupied(first) => {
            return Err(duplicate_message(ip, *first.get()));
        }
        hashbrown::hash_map::Entry::Vacant(slot) => {
            slot.insert(line);
        }
    }
    check_name("user", &fields.user).map_err(|e| e.to_string())?;
    let idp = fields.idp.unwrap_or(Cow::Borrowed(DEFAULT_IDP));
    check_name("idp", &idp).map_err(|e| e.to_string())?;
    for group in &fields.groups {
        check_name("group", group).map_err(|e| e.to_string())?;
    }
    let authenticated_at =
        OffsetDateTime::parse(&fields.authenticated_at, &Rfc3339).map_err(|_| {
            format!(
                "authenticated_at {:?} is not an RFC 3339 time like 2026-11-23T09:30:00Z",
                fields.authenticated_at
            )
        })?;
    Ok(ImportRecord {
        line,
        ip,
        user: fields.user.into_owned(),
        idp: idp.into_owned(),
        authenticated_at,
        groups: fields.groups,
    })
}

#[cfg(test)]
mod tests;
