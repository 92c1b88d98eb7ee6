//! Gateway's login rules, shared by the local store and the fleet's etcd store: a
//! login resets the device's session timer to zero; a device is bound to one user until
//! logged out; a session only resets through the IdP the device enrolled with; and
//! every session, however it arrives, names a device and a user and IdP by `input`'s
//! rules.

use std::net::IpAddr;

use super::{
    DEFAULT_IDP, LoginRequest, SessionError, SessionRecord,
    import::{ImportRecord, LineError, duplicate_message},
    table::Fields,
};
use crate::{
    clock::ClockPair,
    input::{
        AddressError, Spaces,
        address::device,
        name::{self, preview},
    },
};

/// A login time this far ahead of the agent's clock is refused; closer ones are taken
/// as "now" (small skew between the caller's clock and ours).
const FUTURE_TOLERANCE: time::Duration = time::Duration::seconds(5);

/// Who a device's current session binds it to: its user, and the IdP it enrolled with.
#[derive(Clone, Copy, Debug)]
pub struct Enrolled<'a> {
    pub user: &'a str,
    pub idp: &'a str,
}

/// The login rules: checks `req` against the device's `current` session and returns
/// the record it would write. Shared by the local store and the fleet's etcd store.
pub fn plan_login(
    current: Option<Enrolled<'_>>,
    req: &LoginRequest,
    clock: &ClockPair,
    boot_id: &str,
) -> Result<SessionRecord, SessionError> {
    plan_owned_login(current, req.clone(), clock, boot_id)
}

/// `plan_login` on a request it may take apart, so that the record keeps its strings
/// (each line of an import).
fn plan_owned_login(
    current: Option<Enrolled<'_>>,
    req: LoginRequest,
    clock: &ClockPair,
    boot_id: &str,
) -> Result<SessionRecord, SessionError> {
    let LoginRequest {
        ip,
        user,
        idp,
        at,
        groups,
    } = req;
    let idp = idp.unwrap_or_else(|| DEFAULT_IDP.to_string());
    check_identity(ip, &user, &idp)?;
    for group in &groups {
        check_name("group", group)?;
    }
    if let Some(current) = current {
        if current.user != user {
            return Err(SessionError::OtherUser {
                ip,
                current: current.user.to_string(),
                requested: user,
            });
        }
        if current.idp != idp {
            return Err(SessionError::WrongIdp {
                ip,
                enrolled: current.idp.to_string(),
                requested: idp,
            });
        }
    }
    let (authenticated_at, boot_ns) = match at {
        None => (clock.wall, clock.boot_ns),
        Some(at) if at > clock.wall + FUTURE_TOLERANCE => {
            return Err(SessionError::InFuture {
                at,
                now: clock.wall,
            });
        }
        Some(at) if at > clock.wall => (clock.wall, clock.boot_ns),
        Some(at) => (at, clock.boot_ns_of(at)),
    };
    Ok(SessionRecord {
        ip,
        user,
        idp,
        authenticated_at,
        boot_id: boot_id.to_string(),
        authenticated_at_boot_ns: boot_ns,
        groups,
    })
}

/// Checks every line of an import against the login rules and the current sessions
/// (`current`): the records it would write, and each refused line with its number. A
/// device may appear only once (`import::parse` already refuses files where it does not).
/// Above `SPLIT_ABOVE` records, the two halves are checked at once.
pub fn plan_import<'a>(
    current: impl Fn(&IpAddr) -> Option<Enrolled<'a>> + Sync,
    records: Vec<ImportRecord>,
    clock: &ClockPair,
    boot_id: &str,
) -> (Vec<SessionRecord>, Vec<LineError>) {
    let split = (records.len() > SPLIT_ABOVE).then_some(records.len() / 2);
    plan_split(&current, records, split, clock, boot_id)
}

/// Records above which `plan_import` checks two halves at once: a million lines took
/// half a second on one thread.
const SPLIT_ABOVE: usize = 4096;

/// `plan_import` with the records cut before record `split`, if given.
fn plan_split<'a>(
    current: &(impl Fn(&IpAddr) -> Option<Enrolled<'a>> + Sync),
    mut records: Vec<ImportRecord>,
    split: Option<usize>,
    clock: &ClockPair,
    boot_id: &str,
) -> (Vec<SessionRecord>, Vec<LineError>) {
    let Some(split) = split.filter(|&at| at > 0 && at < records.len()) else {
        let part = plan_part(current, records, clock, boot_id);
        return (
            part.planned,
            part.errors.into_iter().map(|(e, _)| e).collect(),
        );
    };
    let second = records.split_off(split);
    let (first, second) = std::thread::scope(|scope| {
        let second = scope.spawn(|| plan_part(current, second, clock, boot_id));
        let first = plan_part(current, records, clock, boot_id);
        (first, second.join().expect("an import planner panicked"))
    });
    // A device of the second half already seen in the first is a duplicate there,
    // whatever its line's own verdict (as when checked in one pass).
    let earlier = |ip: &IpAddr| first.seen.get(ip).copied();
    let mut planned = first.planned;
    planned.reserve(second.planned.len());
    let mut later = Vec::new();
    for (record, line) in second.planned.into_iter().zip(second.lines) {
        match earlier(&record.ip) {
            Some(at) => later.push(duplicate(line, record.ip, at)),
            None => planned.push(record),
        }
    }
    for (error, ip) in second.errors {
        later.push(match earlier(&ip) {
            Some(at) => duplicate(error.line, ip, at),
            None => error,
        });
    }
    later.sort_by_key(|e| e.line);
    let mut errors: Vec<LineError> = first.errors.into_iter().map(|(e, _)| e).collect();
    errors.append(&mut later);
    (planned, errors)
}

/// One part of an import checked: its records with their line numbers, its refused
/// lines with their devices, and the line each device first appeared on.
struct PlannedPart {
    planned: Vec<SessionRecord>,
    lines: Vec<usize>,
    errors: Vec<(LineError, IpAddr)>,
    seen: hashbrown::HashMap<IpAddr, usize>,
}

fn plan_part<'a>(
    current: &impl Fn(&IpAddr) -> Option<Enrolled<'a>>,
    records: Vec<ImportRecord>,
    clock: &ClockPair,
    boot_id: &str,
) -> PlannedPart {
    let mut part = PlannedPart {
        planned: Vec::with_capacity(records.len()),
        lines: Vec::with_capacity(records.len()),
        errors: Vec::new(),
        seen: hashbrown::HashMap::with_capacity(records.len()),
    };
    for r in records {
        let (line, ip) = (r.line, r.ip);
        if let Some(&first) = part.seen.get(&ip) {
            part.errors.push((duplicate(line, ip, first), ip));
            continue;
        }
        part.seen.insert(ip, line);
        let request = LoginRequest {
            ip,
            user: r.user,
            idp: Some(r.idp),
            at: Some(r.authenticated_at),
            groups: r.groups,
        };
        match plan_owned_login(current(&ip), request, clock, boot_id) {
            Ok(record) => {
                part.planned.push(record);
                part.lines.push(line);
            }
            Err(e) => part.errors.push((LineError::new(line, e), ip)),
        }
    }
    part
}

/// Line `line`'s refusal: its device `ip` already appeared on line `first`.
fn duplicate(line: usize, ip: IpAddr, first: usize) -> LineError {
    LineError::new(line, duplicate_message(ip, first))
}

/// What every session must be, however it arrives (a login, an import line, an etcd
/// entry, a journal line): a device address in the one form `input` reads it in, and
/// a user and IdP by the name rules.
pub fn check_identity(ip: IpAddr, user: &str, idp: &str) -> Result<(), SessionError> {
    let device = device(ip)?;
    if device != ip {
        // One device, one identity: callers pass the address as `input` reads it.
        return Err(AddressError::NotCanonical {
            ip,
            canonical: device,
        }
        .into());
    }
    check_name("user", user)?;
    check_name("idp", idp)
}

/// Whether a login read back from the journal may count: the rules every session must
/// meet now. Replay skips (and names) one that does not.
pub(super) fn check_replayed<G>(record: &Fields<'_, G>) -> Result<(), SessionError> {
    check_identity(record.ip, record.user, record.idp)
}

/// A user or IdP by the rules of `input::name`: one word, bounded, visible.
pub(crate) fn check_name(field: &'static str, value: &str) -> Result<(), SessionError> {
    name::check_name(value, Spaces::Refused).map_err(|reason| SessionError::InvalidName {
        field,
        value: preview(value),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(line: usize, ip: &str, user: &str, clock: &ClockPair) -> ImportRecord {
        ImportRecord {
            line,
            ip: ip.parse().unwrap(),
            user: user.into(),
            idp: DEFAULT_IDP.into(),
            authenticated_at: clock.wall - time::Duration::hours(1),
            groups: Vec::new(),
        }
    }

    /// Checking an import in two halves, cut anywhere, gives what one pass gives: the
    /// same records, and the same refusals in the same order, duplicates across the
    /// cut (of a good line and of a refused one) included.
    #[test]
    fn planning_in_two_halves_matches_one_pass_wherever_the_cut() {
        let clock = ClockPair::now();
        let records = vec![
            record(1, "198.18.2.1", "alice@example.com", &clock),
            record(2, "198.18.2.2", "bad name", &clock),
            record(3, "198.18.2.1", "alice@example.com", &clock),
            record(4, "198.18.2.3", "carol@example.com", &clock),
            record(5, "198.18.2.2", "bob@example.com", &clock),
            record(6, "198.18.2.4", "dave@example.com", &clock),
            record(7, "198.18.2.4", "dave@example.com", &clock),
            record(8, "198.18.2.5", "erin@example.com", &clock),
        ];
        // 198.18.2.3 is bound to another user.
        let bound: IpAddr = "198.18.2.3".parse().unwrap();
        let current = |ip: &IpAddr| {
            (*ip == bound).then_some(Enrolled {
                user: "zoe@example.com",
                idp: DEFAULT_IDP,
            })
        };
        let show = |(planned, errors): (Vec<SessionRecord>, Vec<LineError>)| {
            let planned: Vec<String> = planned.iter().map(|r| r.ip.to_string()).collect();
            let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
            (planned, errors)
        };
        let one_pass = show(plan_split(&current, records.clone(), None, &clock, "b"));
        assert_eq!(one_pass.0, ["198.18.2.1", "198.18.2.4", "198.18.2.5"]);
        let lines: Vec<&str> = one_pass
            .1
            .iter()
            .map(|e| e.split(':').next().unwrap())
            .collect();
        assert_eq!(lines, ["line 2", "line 3", "line 4", "line 5", "line 7"]);
        assert!(
            one_pass.1[3].contains("already appears on line 2"),
            "{one_pass:?}"
        );
        for cut in 1..records.len() {
            let halves = show(plan_split(
                &current,
                records.clone(),
                Some(cut),
                &clock,
                "b",
            ));
            assert_eq!(halves, one_pass, "cut before record {cut}");
        }
    }
}
