//! Counting verdicts and reporting refusals to the agent.

use agent_common::{
    addr::Ip6,
    hashing::{bucket, check, fold_event},
    logic::{event_due, use_report_due},
    maps::{EVENT_CHECK_REFUSAL, EVENT_CHECK_USE, FlowEvent, Settings},
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

/// A refused new flow, or a use report (verdict `AdmittedNewFlow`), as the agent
/// will see it.
pub struct Report {
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
    let due = slot_due::<false>(device_folded, policy, family, now_ns, settings);
    if !due {
        count(counter::EVENTS_RATE_LIMITED);
    }
    due
}

/// Whether a flow this device opened under this session-checked policy should be
/// reported as a use: at most once per pair per minute, and only when the agent asked.
#[inline(always)]
pub fn use_report_allowed(
    device_folded: u64,
    policy: u32,
    family: u8,
    now_ns: u64,
    settings: &Settings,
) -> bool {
    settings.report_use != 0 && slot_due::<true>(device_folded, policy, family, now_ns, settings)
}

/// Whether the pair's `SG_EVENT_LIMIT` slot lets an event of this kind out now, and if
/// so marks it.
#[inline(always)]
fn slot_due<const USE: bool>(
    device_folded: u64,
    policy: u32,
    family: u8,
    now_ns: u64,
    settings: &Settings,
) -> bool {
    let folded = fold_event(device_folded, policy, family);
    let kind = if USE {
        EVENT_CHECK_USE
    } else {
        EVENT_CHECK_REFUSAL
    };
    let pair = check(folded, kind);
    let Some(slot) = SG_EVENT_LIMIT.get_ptr_mut(bucket(folded, settings.event_slot_mask)) else {
        // Refusals are reported even so; use reports are optional.
        return !USE;
    };
    // SAFETY: a live array element; racing writers at worst let one extra event out.
    unsafe {
        let last = if (*slot).check == pair {
            Some((*slot).last_event_ns)
        } else {
            None
        };
        let due = if USE {
            use_report_due(now_ns, last)
        } else {
            event_due(now_ns, last)
        };
        if !due {
            return false;
        }
        (*slot).check = pair;
        (*slot).last_event_ns = now_ns;
    }
    true
}

// Out of line: it runs at most once per device and policy per second, and inlined it
// would crowd the registers of the path it hangs off.
#[inline(never)]
pub fn send_event(r: &Report) {
    let Some(mut entry) = SG_EVENTS.reserve::<FlowEvent>(0) else {
        count(counter::EVENTS_LOST);
        return;
    };
    entry.write(FlowEvent {
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
    count(if r.verdict.is_refusal() {
        counter::EVENTS_SENT
    } else {
        counter::USE_REPORTS
    });
}
