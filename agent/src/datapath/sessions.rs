//! The kernel's session maps (`SG_SESSIONS_V4/V6`, the authoritative hash maps, and
//! their copies in the bucketed session tables `SG_SESSION_TABLE_V4/V6` that the
//! program reads first; layouts in `agent_common::maps`), with the devices' identity
//! masks (`identities`). Split from `Maps` so that they have one owner, the session
//! mirror (`sessions::SessionMirror`).

use std::{net::IpAddr, os::fd::AsFd};

use agent_common::{
    addr::{Ip4, Ip6},
    hashing::bucket,
    maps::{Session, SessionBucketV4, SessionBucketV6, WAYS, names},
    tables::SessionSlot,
};
use aya::maps::{Array, HashMap, IterableMap, MapData, MapError};

use super::{
    DatapathError, Geometry,
    identities::Identities,
    maps::{MapSource, map_err, typed},
    sys,
};
use crate::config::{Identity, Limits};

pub struct SessionMaps {
    sessions_v4: HashMap<MapData, Ip4, Session>,
    sessions_v6: HashMap<MapData, Ip6, Session>,
    session_table_v4: Array<MapData, SessionBucketV4>,
    session_table_v6: Array<MapData, SessionBucketV6>,
    /// Capacity of each hash map, for the error that says it is full.
    max_sessions: u32,
    /// Buckets of each session table (a power of two).
    buckets: u32,
    pub identities: Identities,
}

impl SessionMaps {
    /// `empty`: the datapath was never configured, so never given sessions either.
    pub(super) fn open(
        source: &mut MapSource<'_>,
        limits: &Limits,
        empty: bool,
    ) -> Result<Self, DatapathError> {
        let sessions_v4: HashMap<MapData, Ip4, Session> = typed(source, names::SESSIONS_V4)?;
        let sessions_v6: HashMap<MapData, Ip6, Session> = typed(source, names::SESSIONS_V6)?;
        let used: Vec<u32> = if empty {
            Vec::new()
        } else {
            walk(&sessions_v4, &sessions_v6)?
                .into_iter()
                .map(|(_, slot)| slot)
                .collect()
        };
        Ok(Self {
            sessions_v4,
            sessions_v6,
            session_table_v4: typed(source, names::SESSION_TABLE_V4)?,
            session_table_v6: typed(source, names::SESSION_TABLE_V6)?,
            max_sessions: limits.max_sessions,
            buckets: Geometry::of(limits).session_buckets,
            identities: Identities::open(source, limits, &used)?,
        })
    }

    /// Writes (or replaces) a device's session with a fresh identity slot for `who`: the
    /// slot's masks first, then the authoritative hash map, then its copy in the
    /// session table, so a reader always finds one of them; the previous slot is freed
    /// last.
    /// Returns the new slot.
    pub fn set_session(
        &mut self,
        ip: IpAddr,
        mut session: Session,
        who: &Identity<'_>,
    ) -> Result<u32, DatapathError> {
        let previous = self.session(ip)?.map(|s| s.identity);
        session.identity = self.identities.claim(who, previous)?;
        if let Err(e) = self.insert(ip, session) {
            self.identities.release(session.identity);
            return Err(e);
        }
        self.update_session_table(ip, Some(&session))?;
        if let Some(old) = previous {
            self.identities.release(old);
        }
        Ok(session.identity)
    }

    fn insert(&mut self, ip: IpAddr, session: Session) -> Result<(), DatapathError> {
        let result = match ip {
            IpAddr::V4(a) => self.sessions_v4.insert(Ip4::from(a), session, 0),
            IpAddr::V6(a) => self.sessions_v6.insert(Ip6::from(a), session, 0),
        };
        result.map_err(|source| match &source {
            MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                DatapathError::SessionsFull {
                    family: if ip.is_ipv4() { "IPv4" } else { "IPv6" },
                    limit: self.max_sessions,
                }
            }
            _ => DatapathError::Map {
                map: session_map_name(ip),
                source,
            },
        })
    }

    /// Removes a device's session (absent is fine): the table copy first, then the
    /// hash map; then its identity slot is freed.
    pub fn remove_session(&mut self, ip: IpAddr) -> Result<(), DatapathError> {
        let previous = self.session(ip)?.map(|s| s.identity);
        self.update_session_table(ip, None)?;
        let result = match ip {
            IpAddr::V4(a) => self.sessions_v4.remove(&Ip4::from(a)),
            IpAddr::V6(a) => self.sessions_v6.remove(&Ip6::from(a)),
        };
        match result {
            Ok(()) | Err(MapError::KeyNotFound) => {
                if let Some(old) = previous {
                    self.identities.release(old);
                }
                Ok(())
            }
            Err(source) => Err(DatapathError::Map {
                map: session_map_name(ip),
                source,
            }),
        }
    }

    /// Every device with a session in the kernel and its identity slot, read in
    /// batches.
    pub fn kernel_slots(&self) -> Result<Vec<(IpAddr, u32)>, DatapathError> {
        walk(&self.sessions_v4, &self.sessions_v6)
    }

    /// Writes many sessions at once (start-up, bulk import, benchmarks), each with a
    /// fresh identity slot for its identity (their masks written first): the
    /// session-table buckets they fall in, in the tables' own memory, then batched
    /// writes of the hash maps. Each comes
    /// with the slot its device's session holds now (the caller's record of the
    /// kernel: `SessionTable`), freed last; returns the new slots. Should a write fail
    /// part-way, which slots are in use is read back from the kernel.
    pub fn load_sessions(
        &mut self,
        sessions: &[(IpAddr, Session, Identity<'_>, Option<u32>)],
    ) -> Result<Vec<u32>, DatapathError> {
        let who: Vec<(Identity<'_>, Option<u32>)> = sessions
            .iter()
            .map(|(_, _, who, previous)| (*who, *previous))
            .collect();
        let slots = self.identities.claim_many(&who)?;
        if let Err(e) = self.write_sessions(sessions, &slots) {
            match self.kernel_slots() {
                Ok(in_use) => {
                    let used: Vec<u32> = in_use.into_iter().map(|(_, slot)| slot).collect();
                    self.identities.reset_used(&used);
                }
                Err(read) => {
                    tracing::error!(error = %read, "could not read the session maps back after a failed batch; its identity slots stay taken");
                }
            }
            return Err(e);
        }
        for previous in sessions.iter().filter_map(|s| s.3) {
            self.identities.release(previous);
        }
        Ok(slots)
    }

    fn write_sessions(
        &mut self,
        sessions: &[(IpAddr, Session, Identity<'_>, Option<u32>)],
        slots: &[u32],
    ) -> Result<(), DatapathError> {
        let mask = self.buckets - 1;
        let v4 = sessions.iter().filter(|s| s.0.is_ipv4()).count();
        let v6 = sessions.len() - v4;
        let (mut keys4, mut values4) = (Vec::with_capacity(v4), Vec::with_capacity(v4));
        let (mut keys6, mut values6) = (Vec::with_capacity(v6), Vec::with_capacity(v6));
        let mapped = |name| move |source| DatapathError::Batch { map: name, source };
        // The session table first, in place: the program looks there before the hash
        // map, so a renewed device's old (perhaps expired) copy must not outlive the
        // batch.
        let mut table4 =
            sys::MappedArray::<SessionBucketV4>::open(self.session_table_v4.map(), true)
                .map_err(mapped(names::SESSION_TABLE_V4))?;
        let mut table6 =
            sys::MappedArray::<SessionBucketV6>::open(self.session_table_v6.map(), true)
                .map_err(mapped(names::SESSION_TABLE_V6))?;
        for ((ip, session, _, _), slot) in sessions.iter().zip(slots) {
            let session = &Session {
                identity: *slot,
                ..*session
            };
            match ip {
                IpAddr::V4(a) => {
                    let addr = Ip4::from(*a);
                    keys4.push(addr);
                    values4.push(*session);
                    let index = bucket(addr.fold(), mask) as usize;
                    let mut b = table4.get(index);
                    if place_session(&mut b.slots, &addr, Some(session)) {
                        table4.set(index, b);
                    }
                }
                IpAddr::V6(a) => {
                    let addr = Ip6::from(*a);
                    keys6.push(addr);
                    values6.push(*session);
                    let index = bucket(addr.fold(), mask) as usize;
                    let mut b = table6.get(index);
                    if place_session(&mut b.slots, &addr, Some(session)) {
                        table6.set(index, b);
                    }
                }
            }
        }
        drop((table4, table6));
        let full = |family: &'static str, limit: u32| {
            move |e: std::io::Error| match e.raw_os_error() {
                Some(libc::E2BIG) => DatapathError::SessionsFull { family, limit },
                _ => DatapathError::Batch {
                    map: if family == "IPv4" {
                        names::SESSIONS_V4
                    } else {
                        names::SESSIONS_V6
                    },
                    source: e,
                },
            }
        };
        let limit = self.max_sessions;
        sys::update_batch(self.sessions_v4.map().fd().as_fd(), &keys4, &values4)
            .map_err(full("IPv4", limit))?;
        sys::update_batch(self.sessions_v6.map().fd().as_fd(), &keys6, &values6)
            .map_err(full("IPv6", limit))?;
        Ok(())
    }

    /// Places, refreshes (`Some`) or clears (`None`) a device's entry in the session
    /// table. A device whose bucket is full stays in the hash map only.
    fn update_session_table(
        &mut self,
        ip: IpAddr,
        at: Option<&Session>,
    ) -> Result<(), DatapathError> {
        let mask = self.buckets - 1;
        match ip {
            IpAddr::V4(a) => {
                let addr = Ip4::from(a);
                let index = bucket(addr.fold(), mask);
                let table = &mut self.session_table_v4;
                let mut b = table
                    .get(&index, 0)
                    .map_err(map_err(names::SESSION_TABLE_V4))?;
                if place_session(&mut b.slots, &addr, at) {
                    table
                        .set(index, b, 0)
                        .map_err(map_err(names::SESSION_TABLE_V4))?;
                }
            }
            IpAddr::V6(a) => {
                let addr = Ip6::from(a);
                let index = bucket(addr.fold(), mask);
                let table = &mut self.session_table_v6;
                let mut b = table
                    .get(&index, 0)
                    .map_err(map_err(names::SESSION_TABLE_V6))?;
                if place_session(&mut b.slots, &addr, at) {
                    table
                        .set(index, b, 0)
                        .map_err(map_err(names::SESSION_TABLE_V6))?;
                }
            }
        }
        Ok(())
    }

    /// Clears every session-table entry whose device `keep` refuses; returns how many.
    /// An adopted datapath needs it: a bulk write places its sessions in the tables
    /// before the hash maps, so an agent stopped between the two leaves table copies
    /// that no walk of the hash maps (`kernel_slots`) finds.
    pub fn clear_table_except(
        &mut self,
        keep: &dyn Fn(&IpAddr) -> bool,
    ) -> Result<usize, DatapathError> {
        let mapped = |name| move |source| DatapathError::Batch { map: name, source };
        let mut table4 =
            sys::MappedArray::<SessionBucketV4>::open(self.session_table_v4.map(), true)
                .map_err(mapped(names::SESSION_TABLE_V4))?;
        let mut cleared = clear_buckets(
            &mut table4,
            |b| &mut b.slots,
            |a: &Ip4| keep(&IpAddr::V4((*a).into())),
        );
        let mut table6 =
            sys::MappedArray::<SessionBucketV6>::open(self.session_table_v6.map(), true)
                .map_err(mapped(names::SESSION_TABLE_V6))?;
        cleared += clear_buckets(
            &mut table6,
            |b| &mut b.slots,
            |a: &Ip6| keep(&IpAddr::V6((*a).into())),
        );
        Ok(cleared)
    }

    /// The kernel's session for a device, if any.
    pub fn session(&self, ip: IpAddr) -> Result<Option<Session>, DatapathError> {
        let result = match ip {
            IpAddr::V4(a) => self.sessions_v4.get(&Ip4::from(a), 0),
            IpAddr::V6(a) => self.sessions_v6.get(&Ip6::from(a), 0),
        };
        match result {
            Ok(s) => Ok(Some(s)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DatapathError::Map {
                map: session_map_name(ip),
                source,
            }),
        }
    }
}

/// Puts `at` (or, with `None`, nothing) in `addr`'s slot of a session-table bucket;
/// returns whether the bucket changed. A new device takes a free slot if there is one.
fn place_session<S: SessionSlot + Default>(
    slots: &mut [S; WAYS],
    addr: &S::Addr,
    at: Option<&Session>,
) -> bool {
    // The address first: checking a slot's word costs a hash.
    let own = slots.iter().position(|s| s.addr() == addr && s.is_valid());
    match (at, own) {
        (Some(at), Some(i)) => slots[i] = S::new(addr, at),
        (Some(at), None) => match slots.iter().position(|s| !s.is_valid()) {
            Some(free) => slots[free] = S::new(addr, at),
            None => return false,
        },
        (None, Some(i)) => slots[i] = S::default(),
        (None, None) => return false,
    }
    true
}

/// Clears the valid entries of a mapped session table whose address `keep` refuses
/// (`slots`: a bucket's entries); returns how many.
fn clear_buckets<B: aya::Pod, S: SessionSlot + Default>(
    table: &mut sys::MappedArray<B>,
    slots: impl Fn(&mut B) -> &mut [S; WAYS],
    keep: impl Fn(&S::Addr) -> bool,
) -> usize {
    let mut cleared = 0;
    for index in 0..table.len() {
        let mut bucket = table.get(index);
        let mut changed = false;
        for slot in slots(&mut bucket) {
            if slot.is_valid() && !keep(slot.addr()) {
                *slot = S::default();
                changed = true;
                cleared += 1;
            }
        }
        if changed {
            table.set(index, bucket);
        }
    }
    cleared
}

/// Both session maps' devices and identity slots, read in batches.
fn walk(
    v4: &HashMap<MapData, Ip4, Session>,
    v6: &HashMap<MapData, Ip6, Session>,
) -> Result<Vec<(IpAddr, u32)>, DatapathError> {
    let mut all = Vec::new();
    walk_into(v4, names::SESSIONS_V4, |a| IpAddr::V4(a.into()), &mut all)?;
    walk_into(v6, names::SESSIONS_V6, |a| IpAddr::V6(a.into()), &mut all)?;
    Ok(all)
}

/// One session map's devices and identity slots, appended to `all` with their
/// address made an `IpAddr`.
fn walk_into<K: aya::Pod + Default>(
    map: &HashMap<MapData, K, Session>,
    name: &'static str,
    ip: impl Fn(K) -> IpAddr,
    all: &mut Vec<(IpAddr, u32)>,
) -> Result<(), DatapathError> {
    sys::read_map::<K, Session>(map.map().fd().as_fd(), |keys, values| {
        all.extend(keys.iter().zip(values).map(|(k, v)| (ip(*k), v.identity)));
    })
    .map_err(|source| DatapathError::Batch { map: name, source })
}

const fn session_map_name(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => names::SESSIONS_V4,
        IpAddr::V6(_) => names::SESSIONS_V6,
    }
}
