//! The `[limits]` section: map capacities, each within what the kernel can preallocate.

use super::Problems;
use crate::config::{Limits, raw::RawLimits};

/// Largest capacity accepted for any map: beyond it, preallocation alone would take
/// gigabytes of kernel memory.
const MAX_CAPACITY: i64 = 1 << 26;

pub(super) fn section(raw: RawLimits, problems: &mut Problems) -> Limits {
    const PLACE: &str = "[limits]";
    let defaults = Limits::default();
    let mut capacity = |value: Option<i64>, field: &str, default: u32| match value {
        None => default,
        Some(n) if (1..=MAX_CAPACITY).contains(&n) => n as u32,
        Some(n) => {
            problems.add(
                PLACE,
                field,
                format!("{n} is out of range (1 to {MAX_CAPACITY})"),
            );
            default
        }
    };
    Limits {
        max_sessions: capacity(raw.max_sessions, "max_sessions", defaults.max_sessions),
        max_flows: capacity(raw.max_flows, "max_flows", defaults.max_flows),
        max_policy_cidrs: capacity(
            raw.max_policy_cidrs,
            "max_policy_cidrs",
            defaults.max_policy_cidrs,
        ),
        max_port_rules: capacity(
            raw.max_port_rules,
            "max_port_rules",
            defaults.max_port_rules,
        ),
    }
}
