//! Gateway's login rules, shared by the local store and the fleet's etcd store: a
//! login resets the device's session timer to zero; a device is bound to one user until
//! logged out; a session only resets through the IdP the device enrolled with; and
//! every session, however it arrives, names a device and a user and IdP by `input`'s
//! rules.

use std::{collections::HashMap, net::IpAddr};

use super::{
    DEFAULT_IDP, LoginRequest, SessionError, SessionRecord,
    import::{ImportRecord, LineError},
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
    let ip = req.ip;
    let idp = req.idp.as_deref().unwrap_or(DEFAULT_IDP);
    check_identity(ip, &req.user, idp)?;
    for group in &req.groups {
        check_name("group", group)?;
    }
    let user = req.user.clone();
    let idp = idp.to_string();
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
    let (authenticated_at, boot_ns) = match req.at {
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
        groups: req.groups.clone(),
    })
}

/// Checks every line of an import against the login rules and the current sessions
/// (`current`): the records it would write, and each refused line with its number. A
/// device may appear only once (`import::parse` already refuses files where it does not).
pub fn plan_import<'a>(
    current: impl Fn(&IpAddr) -> Option<Enrolled<'a>>,
    records: &[ImportRecord],
    clock: &ClockPair,
    boot_id: &str,
) -> (Vec<SessionRecord>, Vec<LineError>) {
    let mut planned = Vec::with_capacity(records.len());
    let mut errors = Vec::new();
    let mut seen: HashMap<IpAddr, usize> = HashMap::with_capacity(records.len());
    for r in records {
        if let Some(&first) = seen.get(&r.ip) {
            errors.push(LineError::new(
                r.line,
                format_args!(
                    "ip {} already appears on line {first} (one session per device)",
                    r.ip
                ),
            ));
            continue;
        }
        seen.insert(r.ip, r.line);
        let line = LoginRequest {
            ip: r.ip,
            user: r.user.clone(),
            idp: Some(r.idp.clone()),
            at: Some(r.authenticated_at),
            groups: r.groups.clone(),
        };
        match plan_login(current(&r.ip), &line, clock, boot_id) {
            Ok(record) => planned.push(record),
            Err(e) => errors.push(LineError::new(r.line, e)),
        }
    }
    (planned, errors)
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
pub(super) fn check_replayed(record: &SessionRecord) -> Result<(), SessionError> {
    check_identity(record.ip, &record.user, &record.idp)
}

/// A user or IdP by the rules of `input::name`: one word, bounded, visible.
pub(crate) fn check_name(field: &'static str, value: &str) -> Result<(), SessionError> {
    name::check_name(value, Spaces::Refused).map_err(|reason| SessionError::InvalidName {
        field,
        value: preview(value),
        reason,
    })
}
