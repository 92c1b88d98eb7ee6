//! The decisions the XDP program makes, as pure functions of map values and the clock,
//! so they are unit-tested on the host exactly as the kernel runs them.

use crate::{
    maps::{
        ACTION_DROP, ACTION_REDIRECT, ACTION_REJECT, BYPASS_POLICY, DestRule, IPPROTO_TCP,
        IdentityAnswer, MAX_IDENTITY_POLICIES, NO_POLICY, POLICY_ENFORCE, PolicyParams,
        UNKNOWN_DEVICE_ALLOW,
    },
    verdict::Verdict,
};

pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_ACK: u8 = 0x10;

const SECOND_NS: u64 = 1_000_000_000;
/// A tracked flow's last-seen time is rewritten at most this often, so the packets of
/// a busy flow do not all dirty the same shared cache line.
pub const FLOW_REFRESH_NS: u64 = SECOND_NS;
/// At most one refusal event per device and policy in this interval.
pub const EVENT_INTERVAL_NS: u64 = SECOND_NS;
/// At most one use report per device and policy in this interval: the agent needs to
/// know that a device uses a policy lately, not every flow it opens.
pub const USE_REPORT_INTERVAL_NS: u64 = 60 * SECOND_NS;

/// A TCP segment opens a new connection when it is a SYN without ACK. Everything else
/// (SYN-ACK, ACK, data, FIN, RST) belongs to a connection and is never judged, so
/// established connections survive a session's expiry.
#[inline(always)]
pub const fn is_new_tcp_flow(flags: u8) -> bool {
    flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
}

/// Age of a session at boot-clock time `now_ns`; negative if authenticated "later"
/// than now (which the agent never writes, but must not overflow).
#[inline(always)]
pub const fn session_age_ns(now_ns: u64, authenticated_at_ns: i64) -> i64 {
    (now_ns as i64).saturating_sub(authenticated_at_ns)
}

/// A session is valid for a policy while `now - authenticated_at <= duration`.
#[inline(always)]
pub const fn session_valid(now_ns: u64, authenticated_at_ns: i64, duration_ns: u64) -> bool {
    session_age_ns(now_ns, authenticated_at_ns) <= duration_ns as i64
}

/// A tracked UDP flow still counts as established while its idle time is at most
/// `idle_ns`.
#[inline(always)]
pub const fn flow_active(now_ns: u64, last_seen_ns: u64, idle_ns: u64) -> bool {
    now_ns.saturating_sub(last_seen_ns) <= idle_ns
}

/// Whether a packet of an active flow should rewrite its last-seen time.
#[inline(always)]
pub const fn flow_needs_refresh(now_ns: u64, last_seen_ns: u64) -> bool {
    now_ns.saturating_sub(last_seen_ns) >= FLOW_REFRESH_NS
}

/// Whether `interval_ns` has passed since `last_ns` (`None`: never happened).
#[inline(always)]
const fn interval_passed(now_ns: u64, last_ns: Option<u64>, interval_ns: u64) -> bool {
    match last_ns {
        None => true,
        Some(last) => now_ns.saturating_sub(last) >= interval_ns,
    }
}

/// Whether a refusal may send an event, given when the last one for the same device and
/// policy was sent (`None`: never).
#[inline(always)]
pub const fn event_due(now_ns: u64, last_event_ns: Option<u64>) -> bool {
    interval_passed(now_ns, last_event_ns, EVENT_INTERVAL_NS)
}

/// Whether an admitted new flow may send a use report, given when the last one for the
/// same device and policy was sent (`None`: never, or the slot holds another pair).
#[inline(always)]
pub const fn use_report_due(now_ns: u64, last_report_ns: Option<u64>) -> bool {
    interval_passed(now_ns, last_report_ns, USE_REPORT_INTERVAL_NS)
}

/// A de Bruijn sequence B(2, 6): a single set bit times this word leaves a distinct
/// number in the top six bits, one for each of the 64 bits.
const DE_BRUIJN_64: u64 = 0x03f7_9d71_b4cb_0a89;

/// Where the lowest bit set in `x` is kept in a table of 64 indexed this way (any
/// number for 0): four instructions, where the program cannot count trailing zeros
/// and a binary search costs a dozen branches. `Settings::identity_policies` is such
/// a table.
#[inline(always)]
pub const fn bit_slot(x: u64) -> usize {
    ((x & x.wrapping_neg()).wrapping_mul(DE_BRUIJN_64) >> 58) as usize
}

/// The policy an identity answer gives a device whose identity satisfies the
/// conditions of the policies in `device_mask` (0 without a session): the first of them
/// by precedence that the answer lists, else its unconditional default.
#[inline(always)]
pub fn resolve_identity(
    answer: &IdentityAnswer,
    device_mask: u64,
    identity_policies: &[u32; MAX_IDENTITY_POLICIES],
) -> u32 {
    let hit = answer.mask & device_mask;
    if hit == 0 {
        return answer.default;
    }
    // Masked so that the verifier sees the index in bounds.
    identity_policies[bit_slot(hit) & (MAX_IDENTITY_POLICIES - 1)]
}

/// What a refused new flow gets: `ACTION_DROP`, `ACTION_REJECT` or `ACTION_REDIRECT`.
/// A redirect policy steers TCP to its `redirect_ports` when there is a portal and
/// rejects everything else.
#[inline(always)]
pub fn refusal_action(policy: &PolicyParams, proto: u8, dport: u16, portal: bool) -> u32 {
    match policy.on_expired {
        ACTION_REJECT => ACTION_REJECT,
        ACTION_REDIRECT if proto == IPPROTO_TCP && portal && policy.redirects(dport) => {
            ACTION_REDIRECT
        }
        ACTION_REDIRECT => ACTION_REJECT,
        _ => ACTION_DROP,
    }
}

/// Whether a device may get a reply (RST, ICMP error, portal redirect) now, given its
/// slot's `next_ns` (`None`: no state): a GCRA that allows one reply every
/// `interval_ns`, and `tolerance_ns / interval_ns` more at once (`reply_tolerance`).
/// Returns the slot's new `next_ns` if so.
#[inline(always)]
pub const fn reply_due(
    now_ns: u64,
    next_ns: Option<u64>,
    interval_ns: u64,
    tolerance_ns: u64,
) -> Option<u64> {
    let next = match next_ns {
        Some(t) if t > now_ns => t,
        _ => now_ns,
    };
    if next - now_ns > tolerance_ns {
        return None;
    }
    Some(next.saturating_add(interval_ns))
}

/// The GCRA tolerance for bursts of `burst` replies (at least 1) at `interval_ns`.
pub const fn reply_tolerance(interval_ns: u64, burst: u32) -> u64 {
    interval_ns.saturating_mul(burst.saturating_sub(1) as u64)
}

/// The policy index that applies to a packet, from the destination's rule and the
/// port-specific answer for (rule, protocol, port), if `SG_PORT_RULES` has one.
#[inline(always)]
pub const fn policy_for(rule: &DestRule, proto: u8, port_rule: Option<u32>) -> u32 {
    match port_rule {
        Some(policy) => policy,
        None if proto == IPPROTO_TCP => rule.tcp,
        None => rule.udp,
    }
}

/// The verdict for a policy index that matches no policy entry.
#[inline(always)]
pub const fn verdict_without_policy(policy: u32) -> Option<Verdict> {
    match policy {
        NO_POLICY => Some(Verdict::PassedNoPolicy),
        BYPASS_POLICY => Some(Verdict::PassedBypass),
        _ => None,
    }
}

/// Whether a policy needs the device's session at all.
#[inline(always)]
pub const fn policy_enforces(policy: &PolicyParams) -> bool {
    policy.flags & POLICY_ENFORCE != 0
}

/// The verdict for a new flow matched by `policy`, from the time the device last
/// authenticated (`None`: it has no session).
#[inline(always)]
pub const fn judge_new_flow(
    policy: &PolicyParams,
    authenticated_at_ns: Option<i64>,
    unknown_device: u32,
    now_ns: u64,
) -> Verdict {
    if !policy_enforces(policy) {
        return Verdict::PassedUnlimited;
    }
    match authenticated_at_ns {
        None if unknown_device == UNKNOWN_DEVICE_ALLOW => Verdict::AdmittedUnknownDevice,
        None => Verdict::DroppedUnknownDevice,
        Some(at) if session_valid(now_ns, at, policy.duration_ns) => Verdict::AdmittedNewFlow,
        Some(_) => Verdict::DroppedExpired,
    }
}

/// The verdict for a packet whose L4 header cannot be read, to a destination whose
/// strictest session-checked policy is `policy`: as a new flow would get, under the
/// verdicts of its own.
#[inline(always)]
pub const fn judge_unreadable(
    policy: &PolicyParams,
    authenticated_at_ns: Option<i64>,
    unknown_device: u32,
    now_ns: u64,
) -> Verdict {
    match judge_new_flow(policy, authenticated_at_ns, unknown_device, now_ns) {
        Verdict::AdmittedNewFlow | Verdict::AdmittedUnknownDevice => Verdict::AdmittedUnreadable,
        Verdict::DroppedExpired | Verdict::DroppedUnknownDevice => Verdict::DroppedUnreadable,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{ACTION_DROP, IPPROTO_UDP, UNKNOWN_DEVICE_ENFORCE};

    const H: u64 = 3600 * SECOND_NS;

    fn enforcing(duration_ns: u64) -> PolicyParams {
        PolicyParams {
            duration_ns,
            flags: POLICY_ENFORCE,
            on_expired: ACTION_DROP,
            redirect_ports: [0; crate::maps::MAX_REDIRECT_PORTS],
        }
    }

    #[test]
    fn redirect_policies_steer_their_tcp_ports_and_reject_the_rest() {
        let mut p = enforcing(H);
        assert_eq!(refusal_action(&p, IPPROTO_TCP, 80, true), ACTION_DROP);
        p.on_expired = ACTION_REJECT;
        assert_eq!(refusal_action(&p, IPPROTO_UDP, 443, true), ACTION_REJECT);
        p.on_expired = ACTION_REDIRECT;
        p.redirect_ports[0] = 80;
        p.redirect_ports[1] = 8080;
        assert_eq!(refusal_action(&p, IPPROTO_TCP, 80, true), ACTION_REDIRECT);
        assert_eq!(refusal_action(&p, IPPROTO_TCP, 8080, true), ACTION_REDIRECT);
        assert_eq!(refusal_action(&p, IPPROTO_TCP, 443, true), ACTION_REJECT);
        assert_eq!(refusal_action(&p, IPPROTO_UDP, 80, true), ACTION_REJECT);
        // Unused slots are 0: port 0 never redirects. Without a portal: reject.
        assert_eq!(refusal_action(&p, IPPROTO_TCP, 0, true), ACTION_REJECT);
        assert_eq!(refusal_action(&p, IPPROTO_TCP, 80, false), ACTION_REJECT);
    }

    #[test]
    fn replies_are_limited_to_a_burst_then_the_rate() {
        let interval = SECOND_NS / 5;
        let mut next = None;
        let mut sent = 0;
        // 1000 refusals in one second: a burst of 10, then 5 a second.
        for i in 0..1000u64 {
            let now = 7 * SECOND_NS + i * SECOND_NS / 1000;
            if let Some(n) = reply_due(now, next, interval, reply_tolerance(interval, 10)) {
                next = Some(n);
                sent += 1;
            }
        }
        assert!((14..=15).contains(&sent), "sent {sent}");
        // Idle for a while: the burst is available again, not more.
        let later = 60 * SECOND_NS;
        let mut burst = 0;
        while let Some(n) = reply_due(later, next, interval, reply_tolerance(interval, 10)) {
            next = Some(n);
            burst += 1;
        }
        assert_eq!(burst, 10);
        // A burst of 1 is a plain rate; no state allows a reply at once.
        let plain = reply_tolerance(interval, 1);
        assert_eq!(plain, 0);
        assert_eq!(reply_due(5, None, interval, plain), Some(5 + interval));
        assert_eq!(reply_due(6, Some(5 + interval), interval, plain), None);
        let huge = reply_tolerance(u64::MAX, 3);
        assert_eq!(
            reply_due(u64::MAX, Some(u64::MAX), u64::MAX, huge),
            Some(u64::MAX)
        );
    }

    #[test]
    fn only_a_bare_syn_opens_a_tcp_flow() {
        assert!(is_new_tcp_flow(TCP_FLAG_SYN));
        assert!(is_new_tcp_flow(TCP_FLAG_SYN | 0x01 | 0x08 | 0x20)); // with FIN/PSH/URG noise
        assert!(!is_new_tcp_flow(TCP_FLAG_SYN | TCP_FLAG_ACK));
        assert!(!is_new_tcp_flow(TCP_FLAG_ACK));
        assert!(!is_new_tcp_flow(0x04)); // RST
        assert!(!is_new_tcp_flow(0));
    }

    #[test]
    fn session_is_valid_up_to_and_including_the_duration() {
        let auth = 1_000 * SECOND_NS as i64;
        let now = |age: u64| auth as u64 + age;
        assert!(session_valid(now(0), auth, H));
        assert!(session_valid(now(H), auth, H));
        assert!(!session_valid(now(H + 1), auth, H));
        // Authenticated before this boot: negative boot-clock time, still aged right.
        assert!(!session_valid(5 * SECOND_NS, -2 * H as i64, H));
        assert!(session_valid(
            5 * SECOND_NS,
            -(H as i64) + 5 * SECOND_NS as i64,
            H
        ));
        // Extreme values do not overflow.
        assert!(!session_valid(u64::MAX / 2, i64::MIN, H));
        assert!(session_valid(0, i64::MAX, H));
        assert_eq!(session_age_ns(10, 4), 6);
    }

    #[test]
    fn udp_flows_expire_after_the_idle_timeout_and_refresh_once_a_second() {
        let idle = 120 * SECOND_NS;
        assert!(flow_active(1000 + idle, 1000, idle));
        assert!(!flow_active(1001 + idle, 1000, idle));
        assert!(
            flow_active(5, 10, idle),
            "a clock behind the entry is not idle"
        );
        assert!(!flow_needs_refresh(1000 + SECOND_NS - 1, 1000));
        assert!(flow_needs_refresh(1000 + SECOND_NS, 1000));
    }

    #[test]
    fn unreadable_packets_are_judged_as_new_flows_under_their_own_verdicts() {
        let p = enforcing(H);
        let now = 10 * H;
        let fresh = Some((now - H / 2) as i64);
        let old = Some((now - 2 * H) as i64);
        let allow = UNKNOWN_DEVICE_ALLOW;
        let enforce = UNKNOWN_DEVICE_ENFORCE;
        assert_eq!(
            judge_unreadable(&p, fresh, enforce, now),
            Verdict::AdmittedUnreadable
        );
        assert_eq!(
            judge_unreadable(&p, old, enforce, now),
            Verdict::DroppedUnreadable
        );
        assert_eq!(
            judge_unreadable(&p, None, enforce, now),
            Verdict::DroppedUnreadable
        );
        assert_eq!(
            judge_unreadable(&p, None, allow, now),
            Verdict::AdmittedUnreadable
        );
    }

    #[test]
    fn events_are_limited_to_one_a_second() {
        assert!(event_due(5, None));
        assert!(!event_due(SECOND_NS + 4, Some(5)));
        assert!(event_due(SECOND_NS + 5, Some(5)));
    }

    #[test]
    fn bit_slots_are_distinct_and_follow_the_lowest_bit() {
        let slots: std::collections::BTreeSet<usize> = (0..64).map(|i| bit_slot(1 << i)).collect();
        assert_eq!(slots.len(), 64);
        assert!(slots.iter().all(|&s| s < 64));
        for i in 0..64 {
            assert_eq!(bit_slot(u64::MAX << i), bit_slot(1 << i));
            assert_eq!(bit_slot((1 << i) | (1 << 63)), bit_slot(1 << i));
        }
    }

    #[test]
    fn identity_answers_give_the_first_matching_conditioned_policy_else_the_default() {
        let mut policies = [0u32; MAX_IDENTITY_POLICIES];
        for i in 0..MAX_IDENTITY_POLICIES {
            policies[bit_slot(1 << i)] = 100 + i as u32;
        }
        let answer = IdentityAnswer {
            mask: 0b1010_0100,
            default: 7,
            _pad: 0,
        };
        assert_eq!(resolve_identity(&answer, 0, &policies), 7, "no session");
        assert_eq!(resolve_identity(&answer, 0b0101_1011, &policies), 7);
        assert_eq!(resolve_identity(&answer, 0b1000_0000, &policies), 107);
        assert_eq!(resolve_identity(&answer, 0b1010_0100, &policies), 102);
        assert_eq!(resolve_identity(&answer, u64::MAX, &policies), 102);
    }

    #[test]
    fn use_reports_are_limited_to_one_a_minute() {
        assert!(use_report_due(5, None));
        assert!(!use_report_due(USE_REPORT_INTERVAL_NS + 4, Some(5)));
        assert!(use_report_due(USE_REPORT_INTERVAL_NS + 5, Some(5)));
    }

    #[test]
    fn port_answers_override_the_protocol_default() {
        let rule = DestRule {
            port_table: 7,
            tcp: 1,
            udp: NO_POLICY,
            unreadable: 1,
        };
        assert_eq!(policy_for(&rule, IPPROTO_TCP, None), 1);
        assert_eq!(policy_for(&rule, IPPROTO_UDP, None), NO_POLICY);
        assert_eq!(policy_for(&rule, IPPROTO_UDP, Some(3)), 3);
        assert_eq!(
            verdict_without_policy(NO_POLICY),
            Some(Verdict::PassedNoPolicy)
        );
        assert_eq!(
            verdict_without_policy(BYPASS_POLICY),
            Some(Verdict::PassedBypass)
        );
        assert_eq!(verdict_without_policy(0), None);
    }

    #[test]
    fn new_flows_are_judged_by_session_age_and_unknown_device_setting() {
        let now = 10 * H;
        let fresh = (now - H) as i64;
        let old = (now - 3 * H) as i64;
        let p = enforcing(2 * H);
        let allow = UNKNOWN_DEVICE_ALLOW;
        let enforce = UNKNOWN_DEVICE_ENFORCE;
        assert_eq!(
            judge_new_flow(&p, Some(fresh), enforce, now),
            Verdict::AdmittedNewFlow
        );
        assert_eq!(
            judge_new_flow(&p, Some(old), allow, now),
            Verdict::DroppedExpired
        );
        assert_eq!(
            judge_new_flow(&p, None, enforce, now),
            Verdict::DroppedUnknownDevice
        );
        assert_eq!(
            judge_new_flow(&p, None, allow, now),
            Verdict::AdmittedUnknownDevice
        );
        let unlimited = PolicyParams::default();
        assert_eq!(
            judge_new_flow(&unlimited, Some(old), enforce, now),
            Verdict::PassedUnlimited
        );
        assert_eq!(
            judge_new_flow(&unlimited, None, enforce, now),
            Verdict::PassedUnlimited
        );
    }
}
