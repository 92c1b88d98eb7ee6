//! The verdict for a parsed packet: DNS and established flows pass first, then the
//! destination's policy decides whether the device's session is asked for at all.
//! The decisions themselves are `agent_common::logic`, unit-tested on the host.

use agent_common::{
    logic::{
        flow_active, flow_needs_refresh, is_new_tcp_flow, judge_new_flow, policy_enforces,
        policy_for, session_age_ns, verdict_without_policy,
    },
    maps::{
        DestRule, FlowKeyV4, FlowKeyV6, FlowState, IPPROTO_TCP, NO_SESSION_AGE, PortRuleKey,
        Session,
    },
    verdict::Verdict,
};
use aya_ebpf::{
    helpers::bpf_ktime_get_boot_ns,
    maps::{LruHashMap, lpm_trie::Key},
};

use crate::{
    maps::{
        SG_DEST_V4, SG_DEST_V6, SG_FLOWS_V4, SG_FLOWS_V6, SG_POLICIES, SG_PORT_RULES,
        SG_SESSIONS_V4, SG_SESSIONS_V6, SG_SETTINGS,
    },
    parse::L4,
    report::{Refusal, report_refusal},
};

/// What differs between IPv4 and IPv6: the address type and the maps keyed by it.
pub trait Family {
    type Addr: Copy;
    type FlowKey: 'static;
    const FAMILY: u8;
    fn dest_rule(dst: &Self::Addr) -> Option<&'static DestRule>;
    fn session(src: &Self::Addr) -> Option<&'static Session>;
    fn flows() -> &'static LruHashMap<Self::FlowKey, FlowState>;
    fn flow_key(src: &Self::Addr, dst: &Self::Addr, l4: &L4) -> Self::FlowKey;
    /// The address in the 16-byte form events use.
    fn wide(addr: &Self::Addr) -> [u8; 16];
}

pub struct V4;
pub struct V6;

impl Family for V4 {
    type Addr = [u8; 4];
    type FlowKey = FlowKeyV4;
    const FAMILY: u8 = 4;

    #[inline(always)]
    fn dest_rule(dst: &[u8; 4]) -> Option<&'static DestRule> {
        SG_DEST_V4.get(Key::new(32, *dst))
    }

    #[inline(always)]
    fn session(src: &[u8; 4]) -> Option<&'static Session> {
        // SAFETY: sessions are not preallocated, so a concurrently replaced element stays
        // valid until the RCU grace period after this program returns.
        unsafe { SG_SESSIONS_V4.get(src) }
    }

    #[inline(always)]
    fn flows() -> &'static LruHashMap<FlowKeyV4, FlowState> {
        &SG_FLOWS_V4
    }

    #[inline(always)]
    fn flow_key(src: &[u8; 4], dst: &[u8; 4], l4: &L4) -> FlowKeyV4 {
        FlowKeyV4 {
            saddr: *src,
            daddr: *dst,
            sport: l4.sport,
            dport: l4.dport,
            proto: l4.proto,
            _pad: [0; 3],
        }
    }

    #[inline(always)]
    fn wide(addr: &[u8; 4]) -> [u8; 16] {
        let mut w = [0u8; 16];
        w[..4].copy_from_slice(addr);
        w
    }
}

impl Family for V6 {
    type Addr = [u8; 16];
    type FlowKey = FlowKeyV6;
    const FAMILY: u8 = 6;

    #[inline(always)]
    fn dest_rule(dst: &[u8; 16]) -> Option<&'static DestRule> {
        SG_DEST_V6.get(Key::new(128, *dst))
    }

    #[inline(always)]
    fn session(src: &[u8; 16]) -> Option<&'static Session> {
        // SAFETY: as for IPv4.
        unsafe { SG_SESSIONS_V6.get(src) }
    }

    #[inline(always)]
    fn flows() -> &'static LruHashMap<FlowKeyV6, FlowState> {
        &SG_FLOWS_V6
    }

    #[inline(always)]
    fn flow_key(src: &[u8; 16], dst: &[u8; 16], l4: &L4) -> FlowKeyV6 {
        FlowKeyV6 {
            saddr: *src,
            daddr: *dst,
            sport: l4.sport,
            dport: l4.dport,
            proto: l4.proto,
            _pad: [0; 3],
        }
    }

    #[inline(always)]
    fn wide(addr: &[u8; 16]) -> [u8; 16] {
        *addr
    }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// The verdict for one TCP or UDP packet from `src` to `dst`.
#[inline(always)]
pub fn judge<F: Family>(src: &F::Addr, dst: &F::Addr, l4: &L4) -> Verdict {
    let is_tcp = l4.proto == IPPROTO_TCP;
    // Every TCP segment but a bare SYN belongs to a connection already admitted (or
    // already refused at its SYN): the cheapest path, with no map lookup.
    if is_tcp && !is_new_tcp_flow(l4.tcp_flags) {
        return Verdict::PassedEstablished;
    }
    let Some(settings) = SG_SETTINGS.get(0) else {
        return Verdict::PassedMalformed;
    };
    if settings.is_dns_port(l4.dport) {
        return Verdict::PassedDns;
    }

    let mut flow_key = None;
    if !is_tcp {
        let key = F::flow_key(src, dst, l4);
        if let Some(state) = F::flows().get_ptr_mut(&key) {
            let now = now_ns();
            // SAFETY: a live LRU element; a racing refresh writes the same kind of value.
            let last_seen = unsafe { (*state).last_seen_ns };
            if flow_active(now, last_seen, settings.udp_idle_ns) {
                if flow_needs_refresh(now, last_seen) {
                    unsafe { (*state).last_seen_ns = now };
                }
                return Verdict::PassedEstablished;
            }
        }
        flow_key = Some(key);
    }

    let Some(rule) = F::dest_rule(dst) else {
        return Verdict::PassedNoPolicy;
    };
    let port_rule = if rule.port_table != 0 {
        let key = PortRuleKey {
            port_table: rule.port_table,
            port: l4.dport,
            proto: l4.proto,
            _pad: 0,
        };
        // SAFETY: written only by the agent, replaced whole.
        unsafe { SG_PORT_RULES.get(key) }.copied()
    } else {
        None
    };
    let policy_index = policy_for(rule, l4.proto, port_rule);
    if let Some(verdict) = verdict_without_policy(policy_index) {
        return verdict;
    }
    let Some(policy) = SG_POLICIES.get(policy_index) else {
        return Verdict::PassedNoPolicy;
    };
    if !policy_enforces(policy) {
        return Verdict::PassedUnlimited;
    }

    let now = now_ns();
    let session = F::session(src);
    let verdict = judge_new_flow(policy, session, settings.unknown_device, now);
    match verdict {
        Verdict::AdmittedNewFlow | Verdict::AdmittedUnknownDevice => {
            if let Some(key) = flow_key {
                // A full table evicts its least recently used flow, which is then judged
                // again as new; failure to insert means the same.
                let _ = F::flows().insert(key, FlowState { last_seen_ns: now }, 0);
            }
        }
        _ if verdict.is_refusal() => report_refusal(&Refusal {
            family: F::FAMILY,
            src: F::wide(src),
            dst: F::wide(dst),
            l4: *l4,
            policy: policy_index,
            verdict,
            session_age_ns: match session {
                Some(s) => session_age_ns(now, s.authenticated_at_ns),
                None => NO_SESSION_AGE,
            },
            now_ns: now,
        }),
        _ => {}
    }
    verdict
}
