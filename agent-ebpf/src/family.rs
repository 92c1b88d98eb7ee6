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
        SG_DEST_CACHE_V4, SG_DEST_CACHE_V6, SG_DEST_V4, SG_DEST_V6, SG_FLOWS_V4, SG_FLOWS_V6,
        SG_SESSION_TABLE_V4, SG_SESSION_TABLE_V6, SG_SESSIONS_V4, SG_SESSIONS_V6,
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
    /// The longest-prefix match of a destination in the compiled policy table.
    fn dest_rule(dst: &Self::Addr) -> Option<&'static DestRule>;
    fn dest_cache(index: u32) -> Option<*mut Self::DestEntry>;
    fn session_bucket(index: u32) -> Option<&'static [Self::SessionSlot; WAYS]>;
    /// The authoritative session map, for devices the session table does not hold.
    fn session(src: &Self::Addr) -> Option<&'static Session>;
    fn flow_bucket(index: u32) -> Option<*mut [Self::FlowSlot; WAYS]>;
    fn flow_key(src: &Self::Addr, dst: &Self::Addr, l4: &L4) -> Self::FlowKey;
    /// The address in the 16-byte form events use.
    fn wide(addr: &Self::Addr) -> Ip6;
}

pub struct V4;
pub struct V6;

impl Family for V4 {
    type Addr = Ip4;
    type SessionSlot = SessionSlotV4;
    type FlowKey = FlowKeyV4;
    type FlowSlot = FlowSlotV4;
    type DestEntry = DestCacheV4;
    const FAMILY: u8 = 4;

    #[inline(always)]
    fn fold(addr: &Ip4) -> u64 {
        addr.fold()
    }

    #[inline(always)]
    fn dest_rule(dst: &Ip4) -> Option<&'static DestRule> {
        SG_DEST_V4.get(Key::new(32, *dst))
    }

    #[inline(always)]
    fn dest_cache(index: u32) -> Option<*mut DestCacheV4> {
        SG_DEST_CACHE_V4.get_ptr_mut(index)
    }

    #[inline(always)]
    fn session_bucket(index: u32) -> Option<&'static [SessionSlotV4; WAYS]> {
        SG_SESSION_TABLE_V4.get(index).map(|b| &b.slots)
    }

    #[inline(always)]
    fn session(src: &Ip4) -> Option<&'static Session> {
        // SAFETY: not preallocated, so a concurrently replaced element stays valid until
        // the RCU grace period after this program returns.
        unsafe { SG_SESSIONS_V4.get(src) }
    }

    #[inline(always)]
    fn flow_bucket(index: u32) -> Option<*mut [FlowSlotV4; WAYS]> {
        // SAFETY: a pointer into a live array element.
        SG_FLOWS_V4
            .get_ptr_mut(index)
            .map(|b| unsafe { &raw mut (*b).slots })
    }

    #[inline(always)]
    fn flow_key(src: &Ip4, dst: &Ip4, l4: &L4) -> FlowKeyV4 {
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
    fn wide(addr: &Ip4) -> Ip6 {
        addr.wide()
    }
}

impl Family for V6 {
    type Addr = Ip6;
    type SessionSlot = SessionSlotV6;
    type FlowKey = FlowKeyV6;
    type FlowSlot = FlowSlotV6;
    type DestEntry = DestCacheV6;
    const FAMILY: u8 = 6;

    #[inline(always)]
    fn fold(addr: &Ip6) -> u64 {
        addr.fold()
    }

    #[inline(always)]
    fn dest_rule(dst: &Ip6) -> Option<&'static DestRule> {
        SG_DEST_V6.get(Key::new(128, *dst))
    }

    #[inline(always)]
    fn dest_cache(index: u32) -> Option<*mut DestCacheV6> {
        SG_DEST_CACHE_V6.get_ptr_mut(index)
    }

    #[inline(always)]
    fn session_bucket(index: u32) -> Option<&'static [SessionSlotV6; WAYS]> {
        SG_SESSION_TABLE_V6.get(index).map(|b| &b.slots)
    }

    #[inline(always)]
    fn session(src: &Ip6) -> Option<&'static Session> {
        // SAFETY: as for IPv4.
        unsafe { SG_SESSIONS_V6.get(src) }
    }

    #[inline(always)]
    fn flow_bucket(index: u32) -> Option<*mut [FlowSlotV6; WAYS]> {
        // SAFETY: a pointer into a live array element.
        SG_FLOWS_V6
            .get_ptr_mut(index)
            .map(|b| unsafe { &raw mut (*b).slots })
    }

    #[inline(always)]
    fn flow_key(src: &Ip6, dst: &Ip6, l4: &L4) -> FlowKeyV6 {
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
    fn wide(addr: &Ip6) -> Ip6 {
        *addr
    }
}
