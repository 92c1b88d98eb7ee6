//! Sessions as the API shows them: ages by the kernel's clock, times in RFC 3339.

use crate::{
    clock::ClockPair,
    config::{Config, IdentityCondition},
    events,
    sessions::SessionRecord,
    wire::{PolicyStanding, SessionDetail, SessionView},
};

/// A session's age by the kernel's clock.
pub(super) fn age_ns(record: &SessionRecord, clock: &ClockPair, boot_id: &str) -> i64 {
    clock
        .boot_ns
        .saturating_sub(record.kernel_value(clock, boot_id).authenticated_at_ns)
}

pub(super) fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

pub(super) fn view(record: &SessionRecord, clock: &ClockPair, boot_id: &str) -> SessionView {
    let age_ns = age_ns(record, clock, boot_id);
    SessionView {
        ip: record.ip,
        user: record.user.clone(),
        idp: record.idp.clone(),
        authenticated_at: rfc3339(record.authenticated_at),
        age: events::format_age(age_ns),
        age_seconds: age_ns / 1_000_000_000,
        groups: record.groups.clone(),
    }
}

/// `session show`: the session and how it stands against each session-checked policy
/// of `config`.
pub(super) fn detail(
    record: &SessionRecord,
    clock: &ClockPair,
    boot_id: &str,
    config: &Config,
) -> SessionDetail {
    let age_ns = age_ns(record, clock, boot_id);
    let policies = config
        .policies
        .iter()
        .filter_map(|p| {
            let duration = p.duration()?;
            let limit = duration.as_nanos_u64() as i64;
            let satisfied = age_ns <= limit;
            Some(PolicyStanding {
                policy: p.name.clone(),
                duration: duration.to_string(),
                satisfied,
                margin: events::format_age((limit - age_ns).abs()),
                identity: p.identity.as_ref().map(IdentityCondition::describe),
                applies: p.applies_to(Some(&record.identity())),
            })
        })
        .collect();
    SessionDetail {
        session: view(record, clock, boot_id),
        policies,
    }
}
