//! The program's maps. Layouts, writers and meaning are documented on the types in
//! `agent_common::maps`; sizes here are placeholders that the agent overrides at load
//! time from the config's `[limits]`.

use agent_common::maps::{
    DestRule, EventLimitKey, FlowKeyV4, FlowKeyV6, FlowState, MAX_POLICIES, PolicyParams,
    PortRuleKey, Session, Settings,
};
use agent_common::verdict::counter;
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};

#[map]
pub static SG_SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map]
pub static SG_DEST_V4: LpmTrie<[u8; 4], DestRule> = LpmTrie::with_max_entries(1024, 0);

#[map]
pub static SG_DEST_V6: LpmTrie<[u8; 16], DestRule> = LpmTrie::with_max_entries(1024, 0);

#[map]
pub static SG_PORT_RULES: HashMap<PortRuleKey, u32> = HashMap::with_max_entries(1024, 0);

#[map]
pub static SG_POLICIES: Array<PolicyParams> = Array::with_max_entries(MAX_POLICIES, 0);

// Sessions are rewritten by the agent while the program reads them; without
// preallocation a replaced element is freed after an RCU grace period, so a reader never
// sees another device's session in a recycled element.
#[map]
pub static SG_SESSIONS_V4: HashMap<[u8; 4], Session> =
    HashMap::with_max_entries(1024, BPF_F_NO_PREALLOC);

#[map]
pub static SG_SESSIONS_V6: HashMap<[u8; 16], Session> =
    HashMap::with_max_entries(1024, BPF_F_NO_PREALLOC);

#[map]
pub static SG_FLOWS_V4: LruHashMap<FlowKeyV4, FlowState> = LruHashMap::with_max_entries(1024, 0);

#[map]
pub static SG_FLOWS_V6: LruHashMap<FlowKeyV6, FlowState> = LruHashMap::with_max_entries(1024, 0);

/// Packets per verdict code, and the event counters (`agent_common::verdict::counter`).
#[map]
pub static SG_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::SLOTS, 0);

/// Refused new flows per policy index.
#[map]
pub static SG_POLICY_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_POLICIES, 0);

#[map]
pub static SG_EVENT_LIMIT: LruHashMap<EventLimitKey, u64> = LruHashMap::with_max_entries(1024, 0);

#[map]
pub static SG_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);
