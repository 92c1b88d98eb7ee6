//! The program's maps. Layouts, writers and meaning are documented on the types in
//! `agent_common::maps`; sizes here are placeholders that the agent overrides at load
//! time from the config's `[limits]`, and writes into `Settings` as index masks.

use agent_common::addr::{Ip4, Ip6};
use agent_common::maps::{
    DestCacheV4, DestCacheV6, DestRule, EventLimitSlot, FlowBucketV4, FlowBucketV6, IdentityAnswer,
    MAX_POLICIES, PORTAL_HANDOFF_ENTRIES, PolicyParams, PortRuleKey, PortalHandoff, ReplyLimitSlot,
    Session, SessionBucketV4, SessionBucketV6, Settings, TickClock,
};
use agent_common::verdict::counter;
use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};

/// The configuration generation in force; its low bit picks the set below.
#[map]
pub static SG_GENERATION: Array<u32> = Array::with_max_entries(1, 0);

/// One entry per set.
#[map]
pub static SG_SETTINGS: Array<Settings> = Array::with_max_entries(2, 0);

#[map]
pub static SG_CLOCK: PerCpuArray<TickClock> = PerCpuArray::with_max_entries(1, 0);

// The policy tables of sets 0 and 1.
#[map]
pub static SG_DEST_V4_0: LpmTrie<Ip4, DestRule> = LpmTrie::with_max_entries(1024, 0);

#[map]
pub static SG_DEST_V4_1: LpmTrie<Ip4, DestRule> = LpmTrie::with_max_entries(1024, 0);

#[map]
pub static SG_DEST_V6_0: LpmTrie<Ip6, DestRule> = LpmTrie::with_max_entries(1024, 0);

#[map]
pub static SG_DEST_V6_1: LpmTrie<Ip6, DestRule> = LpmTrie::with_max_entries(1024, 0);

#[map]
pub static SG_DEST_CACHE_V4: Array<DestCacheV4> = Array::with_max_entries(1024, 0);

#[map]
pub static SG_DEST_CACHE_V6: Array<DestCacheV6> = Array::with_max_entries(1024, 0);

// Rewritten by the agent while the program reads it: without preallocation a replaced
// element is freed after an RCU grace period, never recycled under a reader.
#[map]
pub static SG_PORT_RULES: HashMap<PortRuleKey, u32> =
    HashMap::with_max_entries(1024, BPF_F_NO_PREALLOC);

/// Both sets' policies (`policy_slot`).
#[map]
pub static SG_POLICIES: Array<PolicyParams> = Array::with_max_entries(2 * MAX_POLICIES, 0);

// As for port rules: sessions are replaced while the program reads them.
#[map]
pub static SG_SESSIONS_V4: HashMap<Ip4, Session> =
    HashMap::with_max_entries(1024, BPF_F_NO_PREALLOC);

#[map]
pub static SG_SESSIONS_V6: HashMap<Ip6, Session> =
    HashMap::with_max_entries(1024, BPF_F_NO_PREALLOC);

// Identity masks by `Session::identity`, and identity answers, of sets 0 and 1.
#[map]
pub static SG_IDENTITIES_0: Array<u64> = Array::with_max_entries(1024, 0);

#[map]
pub static SG_IDENTITIES_1: Array<u64> = Array::with_max_entries(1024, 0);

#[map]
pub static SG_IDENTITY_ANSWERS_0: Array<IdentityAnswer> = Array::with_max_entries(1024, 0);

#[map]
pub static SG_IDENTITY_ANSWERS_1: Array<IdentityAnswer> = Array::with_max_entries(1024, 0);

// Mappable: the agent places a batch of sessions in the tables' own memory.
#[map]
pub static SG_SESSION_TABLE_V4: Array<SessionBucketV4> =
    Array::with_max_entries(1024, BPF_F_MMAPABLE);

#[map]
pub static SG_SESSION_TABLE_V6: Array<SessionBucketV6> =
    Array::with_max_entries(1024, BPF_F_MMAPABLE);

// Mappable: the agent counts the flows by reading the tables' memory.
#[map]
pub static SG_FLOWS_V4: Array<FlowBucketV4> = Array::with_max_entries(1024, BPF_F_MMAPABLE);

#[map]
pub static SG_FLOWS_V6: Array<FlowBucketV6> = Array::with_max_entries(1024, BPF_F_MMAPABLE);

/// Packets per verdict code, and the event counters (`agent_common::verdict::counter`).
#[map]
pub static SG_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::SLOTS, 0);

/// Refused new flows per policy of each set (`policy_slot`).
#[map]
pub static SG_POLICY_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2 * MAX_POLICIES, 0);

#[map]
pub static SG_EVENT_LIMIT: Array<EventLimitSlot> = Array::with_max_entries(1024, 0);

#[map]
pub static SG_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[map]
pub static SG_REPLY_LIMIT: Array<ReplyLimitSlot> = Array::with_max_entries(1024, 0);

/// Refused SYNs the XDP program hands to the TC program for the portal.
#[map]
pub static SG_PORTAL_HANDOFF: LruHashMap<PortalHandoff, u64> =
    LruHashMap::with_max_entries(PORTAL_HANDOFF_ENTRIES, 0);
