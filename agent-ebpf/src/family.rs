//! What differs between IPv4 and IPv6: the address type, and the maps keyed by it.

use agent_common::{
    addr::{Ip4, Ip6},
    maps::{
        DestCacheV4, DestCacheV6, DestRule, FlowKeyV4, FlowKeyV6, FlowSlotV4, FlowSlotV6, Session,
        SessionSlotV4, SessionSlotV6, WAYS,
    },
    tables::{DestEntry, FlowSlot, SessionSlot},
};
use aya_ebpf::maps::lpm_trie::Key;

use crate::{
    maps::{
        SG_DEST_CACHE_V4, SG_DEST_CACHE_V6, SG_DEST_V4_0, SG_DEST_V4_1, SG_DEST_V6_0, SG_DEST_V6_1,
        SG_FLOWS_V4, SG_FLOWS_V6, SG_SESSION_TABLE_V4, SG_SESSION_TABLE_V6, SG_SESSIONS_V4,
        SG_SESSIONS_V6,
    },
    parse::L4,
};

pub trait Family {
    type Addr: Copy + PartialEq;
    type SessionSlot: SessionSlot<Addr = Self::Addr> + 'static;
    type FlowKey: Copy + PartialEq;
    type FlowSlot: FlowSlot<Key = Self::FlowKey>;
    type DestEntry: DestEntry<Addr = Self::Addr>;
    const FAMILY: u8;

    fn fold(addr: &Self::Addr) -> u64;
    /// The longest-prefix match of a destination in set `set`'s policy table.
    fn dest_rule(set: u32, dst: &Self::Addr) -> Option<&'static DestRule>;
    fn dest_cache(index: u32) -> Option<*mut Self::DestEntry>;
    fn session_bucket(index: u32) -> Option<&'static [Self::SessionSlot; WAYS]>;
    /// The session hash map, for devices the session table does not hold.
    fn session(src: &Self::Addr) -> Option<&'static Session>;
    fn flow_bucket(index: u32) -> Option<*mut [Self::FlowSlot; WAYS]>;
    fn flow_key(src: &Self::Addr, dst: &Self::Addr, l4: &L4) -> Self::FlowKey;
    /// The address in the 16-byte form events use.
    fn wide(addr: &Self::Addr) -> Ip6;
}

pub struct V4;
pub struct V6;

/// The two families differ only in their types, maps and prefix length.
macro_rules! family {
    ($family:ident {
        code: $code:literal, addr: $addr:ident, bits: $bits:literal, wide: $wide:expr,
        dest: $dest0:ident / $dest1:ident, dest_cache: $dest_cache:ident of $dest_entry:ident,
        sessions: $sessions:ident, session_table: $session_table:ident of $session_slot:ident,
        flows: $flows:ident of $flow_slot:ident keyed by $flow_key:ident $(,)?
    }) => {
        impl Family for $family {
            type Addr = $addr;
            type SessionSlot = $session_slot;
            type FlowKey = $flow_key;
            type FlowSlot = $flow_slot;
            type DestEntry = $dest_entry;
            const FAMILY: u8 = $code;

            #[inline(always)]
            fn fold(addr: &$addr) -> u64 {
                addr.fold()
            }

            #[inline(always)]
            fn dest_rule(set: u32, dst: &$addr) -> Option<&'static DestRule> {
                let key = Key::new($bits, *dst);
                if set == 0 {
                    $dest0.get(key)
                } else {
                    $dest1.get(key)
                }
            }

            #[inline(always)]
            fn dest_cache(index: u32) -> Option<*mut $dest_entry> {
                $dest_cache.get_ptr_mut(index)
            }

            #[inline(always)]
            fn session_bucket(index: u32) -> Option<&'static [$session_slot; WAYS]> {
                $session_table.get(index).map(|b| &b.slots)
            }

            #[inline(always)]
            fn session(src: &$addr) -> Option<&'static Session> {
                // SAFETY: not preallocated, so a concurrently replaced element stays valid
                // until the RCU grace period after this program returns.
                unsafe { $sessions.get(src) }
            }

            #[inline(always)]
            fn flow_bucket(index: u32) -> Option<*mut [$flow_slot; WAYS]> {
                // SAFETY: a pointer into a live array element.
                $flows
                    .get_ptr_mut(index)
                    .map(|b| unsafe { &raw mut (*b).slots })
            }

            #[inline(always)]
            fn flow_key(src: &$addr, dst: &$addr, l4: &L4) -> $flow_key {
                $flow_key {
                    saddr: *src,
                    daddr: *dst,
                    sport: l4.sport,
                    dport: l4.dport,
                    proto: l4.proto,
                    _pad: [0; 3],
                }
            }

            #[inline(always)]
            fn wide(addr: &$addr) -> Ip6 {
                $wide(*addr)
            }
        }
    };
}

family!(V4 {
    code: 4, addr: Ip4, bits: 32, wide: Ip4::wide,
    dest: SG_DEST_V4_0 / SG_DEST_V4_1, dest_cache: SG_DEST_CACHE_V4 of DestCacheV4,
    sessions: SG_SESSIONS_V4, session_table: SG_SESSION_TABLE_V4 of SessionSlotV4,
    flows: SG_FLOWS_V4 of FlowSlotV4 keyed by FlowKeyV4,
});
family!(V6 {
    code: 6, addr: Ip6, bits: 128, wide: core::convert::identity,
    dest: SG_DEST_V6_0 / SG_DEST_V6_1, dest_cache: SG_DEST_CACHE_V6 of DestCacheV6,
    sessions: SG_SESSIONS_V6, session_table: SG_SESSION_TABLE_V6 of SessionSlotV6,
    flows: SG_FLOWS_V6 of FlowSlotV6 keyed by FlowKeyV6,
});
