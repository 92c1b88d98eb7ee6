//! Counting verdicts and reporting refusals to the agent.

use agent_common::{
    addr::Ip6,
    hashing::{bucket, check, fold_event},
    logic::event_due,
    maps::{RefusalEvent, Settings},
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
    pub src: Ip6,
    pub dst: Ip6,
    pub l4: L4,
    pub policy: u32,
    pub set: u8,
    pub action: u8,
    pub verdict: Verdict,
    pub session_age_ns: i64,
    pub now_ns: u64,
}

/// Counts a refusal against its policy's `policy_slot`.
#[inline(always)]
pub fn count_policy_drop(slot: u32) {
    if let Some(c) = SG_POLICY_DROPS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
}

/// Whether a refusal of this device (`device_folded`: `Ip4::fold`/`Ip6::fold`) by this
/// policy may send an event: at most one per pair per second, so a flood cannot swamp
/// the ring buffer or the agent. Checked before the event is even built.
#[inline(always)]
pub fn event_allowed(
    device_folded: u64,
    policy: u32,
    family: u8,
    now_ns: u64,
    settings: &Settings,
) -> bool {
    let folded = fold_event(device_folded, policy, family);
    let pair = check(folded, 0);
    let Some(slot) = SG_EVENT_LIMIT.get_ptr_mut(bucket(folded, settings.event_slot_mask)) else {
        return true;
    };
    // SAFETY: a live array element; racing writers at worst let one extra event out.
    unsafe {
        let last = if (*slot).check == pair {
            Some((*slot).last_event_ns)
        } else {
            None
        };
        if !event_due(now_ns, last) {
            count(counter::EVENTS_RATE_LIMITED);
            return false;
        }
        (*slot).check = pair;
        (*slot).last_event_ns = now_ns;
    }
    true
}

// Out of line: it runs at most once per device and policy per second, and inlined it
// would crowd the registers of the refused path it hangs off.
#[inline(never)]
pub fn send_event(r: &Refusal) {
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
        set: r.set,
        action: r.action,
        src: r.src,
        dst: r.dst,
    });
    entry.submit(0);
    count(counter::EVENTS_SENT);
}
