//! The verdict for a parsed TCP SYN or UDP datagram: DNS passes first, tracked UDP
//! flows next; then the destination's policy decides whether the device's session is
//! asked for at all. The decisions themselves are `agent_common::logic` and
//! `agent_common::tables`, unit-tested on the host.

use agent_common::{
    hashing::bucket,
    logic::{
        flow_active, flow_needs_refresh, judge_new_flow, judge_unreadable as judge_unreadable_at,
        policy_enforces, policy_for, refusal_action, resolve_identity, session_age_ns,
        verdict_without_policy,
    },
    maps::{
        ACTION_DROP, IPPROTO_TCP, NO_POLICY, NO_SESSION_AGE, PolicyParams, PortRuleKey, Session,
        Settings, config_set, identity_answer_index, policy_slot,
    },
    tables::{DestEntry, FlowSlot, find_flow, find_session, flow_slot_for_new},
    verdict::Verdict,
};

use crate::{
    clock::now_ns,
    family::Family,
    maps::{
        SG_GENERATION, SG_IDENTITIES_0, SG_IDENTITIES_1, SG_IDENTITY_ANSWERS_0,
        SG_IDENTITY_ANSWERS_1, SG_POLICIES, SG_PORT_RULES, SG_SETTINGS,
    },
    parse::L4,
    reply::reply_allowed,
    report::{Report, count_policy_drop, event_allowed, send_event, use_report_allowed},
};

/// The verdict for a TCP SYN or a UDP datagram from `src` to `dst` (parsing already
/// passed every other TCP segment as established), and for a refusal the `ACTION_*`
/// it gets: the policy's, or a drop once the device has used up its replies.
#[inline(always)]
pub fn judge<F: Family>(src: &F::Addr, dst: &F::Addr, l4: &L4) -> (Verdict, u32) {
    let verdict = |v| (v, ACTION_DROP);
    let is_tcp = l4.proto == IPPROTO_TCP;
    // The configuration in force, read once: everything below uses this generation's
    // settings and tables, so a reload never shows a packet a mix of two configs.
    let Some(&generation) = SG_GENERATION.get(0) else {
        return verdict(Verdict::PassedNoPolicy);
    };
    let set = config_set(generation);
    let Some(settings) = SG_SETTINGS.get(set) else {
        return verdict(Verdict::PassedNoPolicy);
    };
    if settings.is_dns_port(l4.dport) {
        return verdict(Verdict::PassedDns);
    }

    // A UDP packet of a tracked flow passes; otherwise remember where a new one goes.
    let mut new_flow = None;
    if !is_tcp {
        let key = F::flow_key(src, dst, l4);
        let folded = F::FlowSlot::fold(&key);
        if let Some(bucket_ptr) = F::flow_bucket(bucket(folded, settings.flow_bucket_mask)) {
            // SAFETY: a live array element; concurrent writers are detected by checks.
            let slots = unsafe { &mut *bucket_ptr };
            let now = now_ns();
            if let Some(slot) = find_flow(slots, &key, folded) {
                let last_seen = slot.last_seen_ns();
                if flow_active(now, last_seen, settings.udp_idle_ns) {
                    if flow_needs_refresh(now, last_seen) {
                        slot.set_last_seen_ns(now);
                    }
                    return verdict(Verdict::PassedEstablished);
                }
            }
            new_flow = Some((slots, key, folded, now));
        }
    }

    let answer = policy_of::<F>(dst, l4, generation, settings);
    let folded_src = F::fold(src);
    // An answer that depends on who the device is needs its session now; any other
    // looks the session up only if the policy checks sessions.
    let mut session = NO_SESSION;
    let by_identity = identity_answer_index(answer);
    let policy_index = match by_identity {
        None => answer,
        Some(index) => {
            session = session_of::<F>(src, folded_src, settings);
            // One function per set: with the map chosen at run time the verifier could
            // not turn the lookups into direct array accesses.
            if set == 0 {
                identity_policy::<0>(index, &session, settings)
            } else {
                identity_policy::<1>(index, &session, settings)
            }
        }
    };
    if let Some(v) = verdict_without_policy(policy_index) {
        return verdict(v);
    }
    let Some(policy) = SG_POLICIES.get(policy_slot(set, policy_index)) else {
        return verdict(Verdict::PassedNoPolicy);
    };
    if !policy_enforces(policy) {
        return verdict(Verdict::PassedUnlimited);
    }

    let now = match &new_flow {
        Some((_, _, _, now)) => *now,
        None => now_ns(),
    };
    if by_identity.is_none() {
        session = session_of::<F>(src, folded_src, settings);
    }
    let authenticated_at = found(&session);
    // Computed before the verdict, as in `judge_unreadable`: left to the reports
    // below, the compiler read a register that the no-session path never wrote.
    let session_age = match authenticated_at {
        Some(at) => session_age_ns(now, at),
        None => NO_SESSION_AGE,
    };
    let judged = judge_new_flow(policy, authenticated_at, settings.unknown_device, now);
    // What the agent is told of this flow: a use or a refusal.
    let report = |action: u32| {
        send_event(&Report {
            family: F::FAMILY,
            src: F::wide(src),
            dst: F::wide(dst),
            l4: *l4,
            policy: policy_index,
            set: set as u8,
            action: action as u8,
            verdict: judged,
            session_age_ns: session_age,
            now_ns: now,
        })
    };
    let mut action = ACTION_DROP;
    match judged {
        Verdict::AdmittedNewFlow | Verdict::AdmittedUnknownDevice => {
            if let Some((slots, key, folded, now)) = new_flow {
                // A full bucket gives up its least recently seen flow, which is then
                // judged again as new.
                *flow_slot_for_new(slots, now, settings.udp_idle_ns) =
                    F::FlowSlot::new(&key, folded, now);
            }
            // The agent prompts before a session runs out for the policies its device
            // uses (`notify_before`); it learns of the use from this report.
            if judged == Verdict::AdmittedNewFlow
                && use_report_allowed(folded_src, policy_index, F::FAMILY, now, settings)
            {
                report(ACTION_DROP);
            }
        }
        _ if judged.is_refusal() => {
            count_policy_drop(policy_slot(set, policy_index));
            // A drop policy's refusal (the common case, and a flood's) decides no more.
            if policy.on_expired != ACTION_DROP {
                action = visible_action(policy, l4, folded_src, now, settings);
            }
            if event_allowed(folded_src, policy_index, F::FAMILY, now, settings) {
                report(action);
            }
        }
        _ => {}
    }
    (judged, action)
}

/// The verdict for a packet whose L4 header cannot be read (`Packet::Unreadable*`):
/// judged by its destination's strictest session-checked policy
/// (`DestRule::unreadable`) as a new flow would be, else `fallback`, as before.
// Out of line: only malformed, fragmented or attacking packets come here.
#[inline(never)]
pub fn judge_unreadable<F: Family>(src: &F::Addr, dst: &F::Addr, fallback: Verdict) -> Verdict {
    let Some(&generation) = SG_GENERATION.get(0) else {
        return fallback;
    };
    let set = config_set(generation);
    let Some(settings) = SG_SETTINGS.get(set) else {
        return fallback;
    };
    let Some(rule) = F::dest_rule(set, dst) else {
        return fallback;
    };
    let index = rule.unreadable;
    if index == NO_POLICY {
        return fallback;
    }
    let Some(policy) = SG_POLICIES.get(policy_slot(set, index)) else {
        return fallback;
    };
    let now = now_ns();
    let folded_src = F::fold(src);
    let authenticated_at = found(&session_of::<F>(src, folded_src, settings));
    // Computed before the verdict: left to the refusal below, the compiler read a
    // register that the no-session path never wrote, which the verifier refuses.
    let session_age = match authenticated_at {
        Some(at) => session_age_ns(now, at),
        None => NO_SESSION_AGE,
    };
    let verdict = judge_unreadable_at(policy, authenticated_at, settings.unknown_device, now);
    if verdict.is_refusal() {
        count_policy_drop(policy_slot(set, index));
        if event_allowed(folded_src, index, F::FAMILY, now, settings) {
            send_event(&Report {
                family: F::FAMILY,
                src: F::wide(src),
                dst: F::wide(dst),
                // No protocol or port could be read.
                l4: L4 {
                    proto: 0,
                    sport: 0,
                    dport: 0,
                    ip_offset: 0,
                    l4_offset: 0,
                },
                policy: index,
                set: set as u8,
                action: ACTION_DROP as u8,
                verdict,
                session_age_ns: session_age,
                now_ns: now,
            });
        }
    }
    verdict
}

/// What a refusal by a reject or redirect policy gets, within the device's reply rate.
// Out of line: it keeps the drop path's registers free.
#[inline(never)]
fn visible_action(
    policy: &PolicyParams,
    l4: &L4,
    device_folded: u64,
    now: u64,
    settings: &Settings,
) -> u32 {
    let action = refusal_action(policy, l4.proto, l4.dport, settings.portal_port != 0);
    if action != ACTION_DROP && !reply_allowed(device_folded, now, settings) {
        return ACTION_DROP;
    }
    action
}

/// The first-match policy index for (destination, protocol, port): from the
/// destination cache, else from the compiled table (longest-prefix match, then the
/// port rules), which then fills the cache.
#[inline(always)]
fn policy_of<F: Family>(dst: &F::Addr, l4: &L4, generation: u32, settings: &Settings) -> u32 {
    let folded = F::DestEntry::fold(dst, l4.dport, l4.proto);
    let cached = F::dest_cache(bucket(folded, settings.dest_cache_mask));
    if let Some(entry) = cached {
        // SAFETY: a live array element; a torn entry fails its check.
        if let Some(policy) =
            unsafe { (*entry).policy_for(dst, l4.dport, l4.proto, generation, folded) }
        {
            return policy;
        }
    }
    let policy = match F::dest_rule(config_set(generation), dst) {
        None => NO_POLICY,
        Some(rule) => {
            let port_rule = if rule.port_table != 0 {
                let key = PortRuleKey {
                    port_table: rule.port_table,
                    port: l4.dport,
                    proto: l4.proto,
                    _pad: 0,
                };
                // SAFETY: not preallocated; replaced elements outlive this program run.
                unsafe { SG_PORT_RULES.get(key) }.copied()
            } else {
                None
            };
            policy_for(rule, l4.proto, port_rule)
        }
    };
    if let Some(entry) = cached {
        // SAFETY: as above; a racing writer of the same slot is caught by the check.
        unsafe {
            *entry = F::DestEntry::new(dst, l4.dport, l4.proto, generation, policy, folded);
        }
    }
    policy
}

/// What `session_of` gives a device without a session. A value rather than `None`:
/// an `Option<Session>`'s `None` left registers unwritten that the verifier refuses to
/// read when the option is copied.
const NO_SESSION: Session = Session {
    authenticated_at_ns: i64::MIN,
    identity: 0,
    _pad: 0,
};

/// The device's session: from the session table, else the session hash map;
/// `NO_SESSION` when it has none.
#[inline(always)]
fn session_of<F: Family>(src: &F::Addr, folded: u64, settings: &Settings) -> Session {
    if let Some(slots) = F::session_bucket(bucket(folded, settings.session_bucket_mask))
        && let Some(session) = find_session(slots, src, folded)
    {
        return session;
    }
    match F::session(src) {
        Some(session) => *session,
        None => NO_SESSION,
    }
}

/// When the device last authenticated, if it has a session.
#[inline(always)]
fn found(session: &Session) -> Option<i64> {
    let at = session.authenticated_at_ns;
    (at != NO_SESSION.authenticated_at_ns).then_some(at)
}

/// The policy identity answer `index` of set `SET` gives the device with `session`
/// (none: no identity, mask 0).
#[inline(always)]
fn identity_policy<const SET: u32>(index: u32, session: &Session, settings: &Settings) -> u32 {
    let (answers, masks) = if SET == 0 {
        (&SG_IDENTITY_ANSWERS_0, &SG_IDENTITIES_0)
    } else {
        (&SG_IDENTITY_ANSWERS_1, &SG_IDENTITIES_1)
    };
    let Some(answer) = answers.get(index) else {
        return NO_POLICY;
    };
    // Slot 0 (no session) holds mask 0.
    let mask = masks.get(session.identity).copied().unwrap_or(0);
    resolve_identity(answer, mask, &settings.identity_policies)
}
