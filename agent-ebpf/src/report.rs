//! Counting verdicts and reporting refusals to the agent.

use agent_common::{
    logic::event_due,
    maps::{EventLimitKey, RefusalEvent},
    verdict::{Verdict, counter},
};

use crate::{
    maps::{SG_COUNTERS, SG_EVENT_LIMIT, SG_EVENTS, SG_POLICY_DROPS},
    parse::L4,
};

#[inline(always)]
pub fn count(slot: u32) {
    if let Some(c) = SG_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, and XDP does not preempt itself on one CPU.
        unsafe { *c += 1 };
    }
}

/// A refused new flow, as the agent will see it.
pub struct Refusal {
    pub family: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub l4: L4,
    pub policy: u32,
    pub verdict: Verdict,
    pub session_age_ns: i64,
    pub now_ns: u64,
}

/// Counts the drop against its policy and sends an event, at most one per device and
/// policy per second so that a flood cannot swamp the ring buffer or the agent.
#[inline(always)]
pub fn report_refusal(r: &Refusal) {
    if let Some(c) = SG_POLICY_DROPS.get_ptr_mut(r.policy) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
    let key = EventLimitKey {
        addr: r.src,
        policy: r.policy,
        family: r.family,
        _pad: [0; 3],
    };
    // SAFETY: an 8-byte value written whole by this program only.
    let last = unsafe { SG_EVENT_LIMIT.get(key) }.copied();
    if !event_due(r.now_ns, last) {
        count(counter::EVENTS_RATE_LIMITED);
        return;
    }
    let _ = SG_EVENT_LIMIT.insert(key, r.now_ns, 0);
    let Some(mut entry) = SG_EVENTS.reserve::<RefusalEvent>(0) else {
        count(counter::EVENTS_LOST);
        return;
    };
    entry.write(RefusalEvent {
        at_ns: r.now_ns,
        session_age_ns: r.session_age_ns,
        policy: r.policy,
        verdict: r.verdict.code(),
        family: r.family,
        proto: r.l4.proto,
        dport: r.l4.dport,
        sport: r.l4.sport,
        _pad: [0; 2],
        src: r.src,
        dst: r.dst,
    });
    entry.submit(0);
    count(counter::EVENTS_SENT);
}
