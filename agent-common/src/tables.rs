//! Entries of the array-backed tables and the pure logic on them: building an entry
//! with its check word, recognising a valid one, and choosing the slot a new flow
//! takes. The program runs these on map memory; the agent on its copies.

use crate::{
    addr::{Ip4, Ip6},
    hashing::{check, fold_dest, fold_flow},
    logic::flow_active,
    maps::{
        DestCacheV4, DestCacheV6, FlowKeyV4, FlowKeyV6, FlowSlotV4, FlowSlotV6, Session,
        SessionBucketV4, SessionBucketV6, SessionSlotV4, SessionSlotV6, WAYS,
    },
};

/// A session-table entry of either family.
pub trait SessionSlot: Copy {
    type Addr: Copy + PartialEq;
    fn fold(addr: &Self::Addr) -> u64;
    fn new(addr: &Self::Addr, session: &Session) -> Self;
    fn addr(&self) -> &Self::Addr;
    /// The session, if this valid entry is `addr`'s.
    fn session_of(&self, addr: &Self::Addr, folded: u64) -> Option<Session>;
    fn is_valid(&self) -> bool;
}

/// A session entry's check word: every field, so a torn entry (a time of one session
/// with the identity of another) fails it.
#[inline(always)]
fn session_check(folded: u64, authenticated_at_ns: i64, identity: u32) -> u32 {
    check(
        folded,
        authenticated_at_ns as u64 ^ (identity as u64).rotate_left(29),
    ) as u32
}

/// An entry's session, if the entry is the device's (`same_addr`) and its check word
/// holds for its fields.
#[inline(always)]
fn checked_session(
    same_addr: bool,
    check: u32,
    folded: u64,
    authenticated_at_ns: i64,
    identity: u32,
) -> Option<Session> {
    (same_addr && check == session_check(folded, authenticated_at_ns, identity)).then_some(
        Session {
            authenticated_at_ns,
            identity,
            _pad: 0,
        },
    )
}

impl SessionSlot for SessionSlotV4 {
    type Addr = Ip4;

    #[inline(always)]
    fn fold(addr: &Ip4) -> u64 {
        addr.fold()
    }

    fn new(addr: &Ip4, session: &Session) -> Self {
        Self {
            addr: *addr,
            check: session_check(addr.fold(), session.authenticated_at_ns, session.identity),
            authenticated_at_ns: session.authenticated_at_ns,
            identity: session.identity,
            _pad: 0,
        }
    }

    fn addr(&self) -> &Ip4 {
        &self.addr
    }

    #[inline(always)]
    fn session_of(&self, addr: &Ip4, folded: u64) -> Option<Session> {
        checked_session(
            self.addr == *addr,
            self.check,
            folded,
            self.authenticated_at_ns,
            self.identity,
        )
    }

    fn is_valid(&self) -> bool {
        self.session_of(&self.addr, self.addr.fold()).is_some()
    }
}

impl SessionSlot for SessionSlotV6 {
    type Addr = Ip6;

    #[inline(always)]
    fn fold(addr: &Ip6) -> u64 {
        addr.fold()
    }

    fn new(addr: &Ip6, session: &Session) -> Self {
        Self {
            addr: *addr,
            authenticated_at_ns: session.authenticated_at_ns,
            check: session_check(addr.fold(), session.authenticated_at_ns, session.identity),
            identity: session.identity,
        }
    }

    fn addr(&self) -> &Ip6 {
        &self.addr
    }

    #[inline(always)]
    fn session_of(&self, addr: &Ip6, folded: u64) -> Option<Session> {
        checked_session(
            self.addr == *addr,
            self.check,
            folded,
            self.authenticated_at_ns,
            self.identity,
        )
    }

    fn is_valid(&self) -> bool {
        self.session_of(&self.addr, self.addr.fold()).is_some()
    }
}

/// A session-table bucket of either family.
pub trait SessionBucket: Copy + Default {
    type Slot: SessionSlot + Default;
    fn slots(&self) -> &[Self::Slot; WAYS];
    fn slots_mut(&mut self) -> &mut [Self::Slot; WAYS];
}

impl SessionBucket for SessionBucketV4 {
    type Slot = SessionSlotV4;

    fn slots(&self) -> &[SessionSlotV4; WAYS] {
        &self.slots
    }

    fn slots_mut(&mut self) -> &mut [SessionSlotV4; WAYS] {
        &mut self.slots
    }
}

impl SessionBucket for SessionBucketV6 {
    type Slot = SessionSlotV6;

    fn slots(&self) -> &[SessionSlotV6; WAYS] {
        &self.slots
    }

    fn slots_mut(&mut self) -> &mut [SessionSlotV6; WAYS] {
        &mut self.slots
    }
}

/// Where a session goes in its session-table bucket. The agent writes a bucket whole,
/// and a reader on another CPU may meet any entry that changes half-written (it then
/// fails its check): a device that had a valid entry must keep one throughout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Into free slot `.0`, the device's earlier entries left valid until a second
    /// write clears them (`clear_others`).
    Beside(usize),
    /// Over the device's own entry `.0` (the bucket is full): a reader may meet it
    /// half-written, so the session must be readable elsewhere (the hash map) first.
    Over(usize),
    /// The bucket is full and holds no entry of the device.
    Full,
}

/// Where `addr`'s session goes in this bucket.
pub fn placement<S: SessionSlot>(slots: &[S; WAYS], addr: &S::Addr) -> Placement {
    if let Some(free) = slots.iter().position(|s| !s.is_valid()) {
        return Placement::Beside(free);
    }
    // The address first: checking a slot's word costs a hash.
    match slots.iter().position(|s| s.addr() == addr && s.is_valid()) {
        Some(own) => Placement::Over(own),
        None => Placement::Full,
    }
}

/// Clears the valid entries of `addr` other than slot `keep` (a device has one entry,
/// but an agent killed between the two writes of a `Placement::Beside` leaves two);
/// returns whether any was.
pub fn clear_others<S: SessionSlot + Default>(
    slots: &mut [S; WAYS],
    addr: &S::Addr,
    keep: Option<usize>,
) -> bool {
    let mut cleared = false;
    for (i, slot) in slots.iter_mut().enumerate() {
        if Some(i) != keep && slot.addr() == addr && slot.is_valid() {
            *slot = S::default();
            cleared = true;
        }
    }
    cleared
}

/// Puts `at` (or, with `None`, nothing) in `addr`'s entry of a session-table bucket in
/// one write, for a writer that has made the session readable elsewhere first (the
/// hash map); returns whether the bucket changed. A device whose bucket is full and
/// holds no entry of it does not change it.
pub fn place_session<S: SessionSlot + Default>(
    slots: &mut [S; WAYS],
    addr: &S::Addr,
    at: Option<&Session>,
) -> bool {
    let Some(at) = at else {
        return clear_others(slots, addr, None);
    };
    match placement(slots, addr) {
        Placement::Beside(i) | Placement::Over(i) => {
            slots[i] = S::new(addr, at);
            clear_others(slots, addr, Some(i));
            true
        }
        Placement::Full => false,
    }
}

/// The session of `addr` in its bucket, if there.
#[inline(always)]
pub fn find_session<S: SessionSlot>(
    bucket: &[S; WAYS],
    addr: &S::Addr,
    folded: u64,
) -> Option<Session> {
    for slot in bucket {
        if let Some(session) = slot.session_of(addr, folded) {
            return Some(session);
        }
    }
    None
}

/// A flow-table entry of either family.
pub trait FlowSlot: Copy {
    type Key: Copy + PartialEq;
    fn fold(key: &Self::Key) -> u64;
    fn new(key: &Self::Key, folded: u64, last_seen_ns: u64) -> Self;
    fn key(&self) -> &Self::Key;
    fn check(&self) -> u64;
    fn last_seen_ns(&self) -> u64;
    fn set_last_seen_ns(&mut self, ns: u64);
}

macro_rules! flow_slot {
    ($slot:ty, $key:ty) => {
        impl FlowSlot for $slot {
            type Key = $key;

            #[inline(always)]
            fn fold(key: &$key) -> u64 {
                fold_flow(
                    key.saddr.fold(),
                    key.daddr.fold(),
                    key.sport,
                    key.dport,
                    key.proto,
                )
            }

            #[inline(always)]
            fn new(key: &$key, folded: u64, last_seen_ns: u64) -> Self {
                Self {
                    key: *key,
                    last_seen_ns,
                    check: check(folded, 0),
                }
            }

            #[inline(always)]
            fn key(&self) -> &$key {
                &self.key
            }

            #[inline(always)]
            fn check(&self) -> u64 {
                self.check
            }

            #[inline(always)]
            fn last_seen_ns(&self) -> u64 {
                self.last_seen_ns
            }

            #[inline(always)]
            fn set_last_seen_ns(&mut self, ns: u64) {
                self.last_seen_ns = ns;
            }
        }
    };
}

flow_slot!(FlowSlotV4, FlowKeyV4);
flow_slot!(FlowSlotV6, FlowKeyV6);

/// The slot holding `key` in its bucket, if any.
#[inline(always)]
pub fn find_flow<'a, S: FlowSlot>(
    bucket: &'a mut [S; WAYS],
    key: &S::Key,
    folded: u64,
) -> Option<&'a mut S> {
    let expected = check(folded, 0);
    bucket
        .iter_mut()
        .find(|slot| slot.check() == expected && slot.key() == key)
}

/// The slot a new flow takes: an empty or idle one, else the least recently seen.
#[inline(always)]
pub fn flow_slot_for_new<S: FlowSlot>(bucket: &mut [S; WAYS], now_ns: u64, idle_ns: u64) -> &mut S {
    let mut oldest = 0;
    let mut oldest_seen = u64::MAX;
    for (i, slot) in bucket.iter().enumerate() {
        let last = slot.last_seen_ns();
        if slot.check() == 0 || !flow_active(now_ns, last, idle_ns) {
            oldest = i;
            break;
        }
        if last < oldest_seen {
            oldest = i;
            oldest_seen = last;
        }
    }
    // Clamped so that the compiler sees the index in bounds: no panic path in BPF.
    &mut bucket[oldest.min(WAYS - 1)]
}

/// A destination-cache entry of either family.
pub trait DestEntry: Copy {
    type Addr: Copy + PartialEq;
    fn fold(daddr: &Self::Addr, dport: u16, proto: u8) -> u64;
    fn new(
        daddr: &Self::Addr,
        dport: u16,
        proto: u8,
        generation: u32,
        policy: u32,
        folded: u64,
    ) -> Self;
    /// The cached policy, if this valid entry of `generation` is for the triple.
    fn policy_for(
        &self,
        daddr: &Self::Addr,
        dport: u16,
        proto: u8,
        generation: u32,
        folded: u64,
    ) -> Option<u32>;
}

macro_rules! dest_entry {
    ($entry:ty, $addr:ty, { $($pad:ident),* }) => {
        impl DestEntry for $entry {
            type Addr = $addr;

            #[inline(always)]
            fn fold(daddr: &$addr, dport: u16, proto: u8) -> u64 {
                fold_dest(daddr.fold(), dport, proto)
            }

            #[inline(always)]
            fn new(daddr: &$addr, dport: u16, proto: u8, generation: u32, policy: u32, folded: u64) -> Self {
                Self {
                    daddr: *daddr,
                    dport,
                    proto,
                    generation,
                    policy,
                    check: check(folded, (generation as u64) << 32 | policy as u64),
                    $($pad: Default::default(),)*
                }
            }

            #[inline(always)]
            fn policy_for(&self, daddr: &$addr, dport: u16, proto: u8, generation: u32, folded: u64) -> Option<u32> {
                let valid = self.generation == generation
                    && self.dport == dport
                    && self.proto == proto
                    && self.daddr == *daddr
                    && self.check == check(folded, (generation as u64) << 32 | self.policy as u64);
                valid.then_some(self.policy)
            }
        }
    };
}

dest_entry!(DestCacheV4, Ip4, { _pad });
dest_entry!(DestCacheV6, Ip6, { _pad, _pad2 });

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hashing::bucket;

    fn session(at: i64, identity: u32) -> Session {
        Session {
            authenticated_at_ns: at,
            identity,
            _pad: 0,
        }
    }

    #[test]
    fn session_slots_answer_only_for_their_device_and_reject_torn_entries() {
        let addr = Ip4::from_octets([198, 18, 0, 7]);
        let folded = addr.fold();
        let slot = SessionSlotV4::new(&addr, &session(42, 9));
        assert_eq!(slot.session_of(&addr, folded), Some(session(42, 9)));
        let other = Ip4::from_octets([198, 18, 0, 8]);
        assert_eq!(slot.session_of(&other, other.fold()), None);
        let mut torn = slot;
        torn.authenticated_at_ns = 43; // a new time under the old check
        assert_eq!(torn.session_of(&addr, folded), None);
        let mut torn = slot;
        torn.identity = 10; // another session's identity slot under the old check
        assert_eq!(torn.session_of(&addr, folded), None);
        assert!(
            !SessionSlotV4::default().is_valid(),
            "empty slots are invalid"
        );

        let addr6 = Ip6::from_octets([0x20, 1, 0xd, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
        let mut bucket = [SessionSlotV6::default(); WAYS];
        bucket[2] = SessionSlotV6::new(&addr6, &session(-5, 3));
        assert_eq!(
            find_session(&bucket, &addr6, addr6.fold()),
            Some(session(-5, 3))
        );
        let mut torn = bucket[2];
        torn.identity = 4;
        assert_eq!(torn.session_of(&addr6, addr6.fold()), None);
        bucket[2].addr.0[1] ^= 1 << 56; // torn address
        assert_eq!(find_session(&bucket, &addr6, addr6.fold()), None);
    }

    #[test]
    fn sessions_are_placed_in_their_own_slot_a_free_one_or_none() {
        let device = |n: u8| Ip4::from_octets([198, 18, 0, n]);
        let mut bucket = SessionBucketV4::default();
        for n in 1..=4 {
            assert!(place_session(
                bucket.slots_mut(),
                &device(n),
                Some(&session(n.into(), 1))
            ));
        }
        let found =
            |b: &SessionBucketV4, n: u8| find_session(b.slots(), &device(n), device(n).fold());
        assert_eq!(found(&bucket, 3), Some(session(3, 1)));
        // Full: a fifth device changes nothing; a placed one is renewed in place.
        let before = bucket;
        assert!(!place_session(
            bucket.slots_mut(),
            &device(5),
            Some(&session(5, 1))
        ));
        assert_eq!(bucket, before);
        assert!(place_session(
            bucket.slots_mut(),
            &device(3),
            Some(&session(33, 2))
        ));
        assert_eq!(found(&bucket, 3), Some(session(33, 2)));
        assert_eq!(
            bucket
                .slots()
                .iter()
                .filter(|s| s.addr() == &device(3))
                .count(),
            1
        );
        // Cleared, its slot is free for the fifth; clearing an absent device changes nothing.
        assert!(place_session(bucket.slots_mut(), &device(2), None));
        assert_eq!(found(&bucket, 2), None);
        assert!(!place_session(bucket.slots_mut(), &device(2), None));
        assert!(place_session(
            bucket.slots_mut(),
            &device(5),
            Some(&session(5, 1))
        ));
        assert_eq!(found(&bucket, 5), Some(session(5, 1)));
    }

    #[test]
    fn a_renewal_goes_beside_the_old_entry_while_a_slot_is_free() {
        let device = |n: u8| Ip4::from_octets([198, 18, 0, n]);
        let mut bucket = SessionBucketV4::default();
        for n in 1..=3 {
            place_session(bucket.slots_mut(), &device(n), Some(&session(n.into(), 1)));
        }
        // Device 2 renewed: the new entry goes in the free slot, the old one stays
        // valid until the second write.
        let Placement::Beside(free) = placement(bucket.slots(), &device(2)) else {
            panic!("a slot is free");
        };
        assert_eq!(free, 3);
        bucket.slots_mut()[free] = SessionSlotV4::new(&device(2), &session(22, 2));
        let valid = |b: &SessionBucketV4, n: u8| {
            b.slots()
                .iter()
                .filter(|s| s.is_valid() && s.addr() == &device(n))
                .count()
        };
        assert_eq!(valid(&bucket, 2), 2, "both entries are valid in between");
        assert!(clear_others(bucket.slots_mut(), &device(2), Some(free)));
        assert_eq!(valid(&bucket, 2), 1);
        let found =
            |b: &SessionBucketV4, n: u8| find_session(b.slots(), &device(n), device(n).fold());
        assert_eq!(found(&bucket, 2), Some(session(22, 2)));
        assert_eq!(found(&bucket, 1), Some(session(1, 1)), "others untouched");
        // Full: a device's own entry is renewed over, an absent device finds none.
        place_session(bucket.slots_mut(), &device(4), Some(&session(4, 1)));
        assert_eq!(placement(bucket.slots(), &device(3)), Placement::Over(2));
        assert_eq!(placement(bucket.slots(), &device(9)), Placement::Full);
        // Two entries of one device (an agent killed between the writes): a single
        // write keeps one, a removal clears both.
        bucket.slots_mut()[0] = SessionSlotV4::new(&device(3), &session(30, 3));
        assert_eq!(valid(&bucket, 3), 2);
        assert!(place_session(
            bucket.slots_mut(),
            &device(3),
            Some(&session(33, 3))
        ));
        assert_eq!(valid(&bucket, 3), 1);
        assert_eq!(found(&bucket, 3), Some(session(33, 3)));
        bucket.slots_mut()[1] = SessionSlotV4::new(&device(3), &session(30, 3));
        assert!(place_session(bucket.slots_mut(), &device(3), None));
        assert_eq!(valid(&bucket, 3), 0);
    }

    fn key(sport: u16) -> FlowKeyV4 {
        FlowKeyV4 {
            saddr: Ip4::from_octets([198, 18, 0, 7]),
            daddr: Ip4::from_octets([198, 19, 10, 10]),
            sport,
            dport: 443,
            proto: 17,
            _pad: [0; 3],
        }
    }

    #[test]
    fn flows_are_found_and_new_ones_take_free_idle_or_oldest_slots() {
        let idle = 100;
        let mut bucket = [FlowSlotV4::default(); WAYS];
        let index = |b: &mut [FlowSlotV4; WAYS], now| {
            let chosen: *const FlowSlotV4 = flow_slot_for_new(b, now, idle);
            b.iter().position(|s| std::ptr::eq(s, chosen)).unwrap()
        };
        assert_eq!(index(&mut bucket, 1000), 0, "an empty slot");
        for (i, seen) in [(0, 950), (1, 990), (2, 960), (3, 999)] {
            let k = key(i as u16);
            bucket[i] = FlowSlotV4::new(&k, FlowSlotV4::fold(&k), seen);
        }
        let k2 = key(2);
        let found = find_flow(&mut bucket, &k2, FlowSlotV4::fold(&k2)).map(|s| s.last_seen_ns);
        assert_eq!(found, Some(960));
        let k9 = key(9);
        assert!(find_flow(&mut bucket, &k9, FlowSlotV4::fold(&k9)).is_none());
        assert_eq!(index(&mut bucket, 1000), 0, "all active: the oldest");
        assert_eq!(index(&mut bucket, 1055), 0, "slot 0 went idle");
        bucket[0].last_seen_ns = 1040;
        assert_eq!(index(&mut bucket, 1061), 2, "slot 2 idle first");
        // A torn key fails its check.
        bucket[1].key.sport = 77;
        let k77 = key(77);
        assert!(find_flow(&mut bucket, &k77, FlowSlotV4::fold(&k77)).is_none());
    }

    #[test]
    fn dest_entries_are_per_triple_and_generation() {
        let d = Ip4::from_octets([198, 19, 10, 10]);
        let folded = DestCacheV4::fold(&d, 443, 6);
        let e = DestCacheV4::new(&d, 443, 6, 7, 3, folded);
        assert_eq!(e.policy_for(&d, 443, 6, 7, folded), Some(3));
        assert_eq!(
            e.policy_for(&d, 443, 6, 8, folded),
            None,
            "stale generation"
        );
        assert_eq!(
            e.policy_for(&d, 80, 6, 7, DestCacheV4::fold(&d, 80, 6)),
            None
        );
        let zero = Ip4::default();
        assert_eq!(
            DestCacheV4::default().policy_for(&zero, 0, 0, 0, DestCacheV4::fold(&zero, 0, 0)),
            None
        );
        let d6 = Ip6::from_octets([0x20, 1, 0xd, 0xb8, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10]);
        let f6 = DestCacheV6::fold(&d6, 53, 17);
        let mut e6 = DestCacheV6::new(&d6, 53, 17, 1, u32::MAX, f6);
        assert_eq!(e6.policy_for(&d6, 53, 17, 1, f6), Some(u32::MAX));
        e6.policy = 0; // torn
        assert_eq!(e6.policy_for(&d6, 53, 17, 1, f6), None);
        let _ = bucket(f6, 1023);
    }
}
