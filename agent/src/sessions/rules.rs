//! Gateway's login rules, shared by the local store and the fleet's etcd store: a
//! login resets the device's session timer to zero; a device is bound to one user until
//! logged out; a session only resets through the IdP the device enrolled with; and
//! every session, however it arrives, names a device and a user and IdP by `input`'s
//! rules.

use std::net::IpAddr;

use super::{
    DEFAULT_IDP, LoginRequest, SessionError, SessionRecord,
    import::{ImportRecord, LineError},
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
pub fn plan_import<'a>(
    current: impl Fn(&IpAddr) -> Option<Enrolled<'a>>,
    records: Vec<ImportRecord>,
    clock: &ClockPair,
    boot_id: &str,
) -> (Vec<SessionRecord>, Vec<LineError>) {
    let mut planned = Vec::with_capacity(records.len());
    let mut errors = Vec::new();
    let mut seen: hashbrown::HashMap<IpAddr, usize> =
        hashbrown::HashMap::with_capacity(records.len());
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
            user: r.user,
            idp: Some(r.idp),
            at: Some(r.authenticated_at),
            groups: r.groups,
        };
        match plan_owned_login(current(&r.ip), line, clock, boot_id) {
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
