//! The kernel's session maps, with the devices' identity masks (`identities`). Each
//! family has two (layouts in `agent_common::maps`): the bucketed session table
//! (`SG_SESSION_TABLE_V4/V6`), which the program reads first, and the hash map
//! (`SG_SESSIONS_V4/V6`) it falls back to. Every session is in at least one of them.
//! A bulk write (start-up, import, fleet resync) places sessions in the table's own
//! memory and writes the hash map only for devices whose bucket is full and for renewed
//! ones (so that no older hash copy outlives a renewal); a single login writes both.
//! Split from `Maps` so that they have one owner, the session mirror
//! (`sessions::SessionMirror`).

use std::{net::IpAddr, os::fd::AsFd};

use agent_common::{
    hashing::bucket,
    maps::{Session, SessionBucketV4, SessionBucketV6, names},
    tables::{SessionBucket, SessionSlot, find_session, place_session},
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
    v4: FamilyMaps<SessionBucketV4>,
    v6: FamilyMaps<SessionBucketV6>,
    /// Devices each family may hold, for the error that says it is full.
    max_sessions: u32,
    /// The session tables' bucket mask (buckets are a power of two).
    mask: u32,
    pub identities: Identities,
}

/// A session-table entry's address type: `Ip4` or `Ip6`.
type Addr<B> = <<B as SessionBucket>::Slot as SessionSlot>::Addr;

/// One family's session table and hash map.
struct FamilyMaps<B>
where
    B: SessionBucket + aya::Pod,
    Addr<B>: aya::Pod,
{
    hash: HashMap<MapData, Addr<B>, Session>,
    table: Array<MapData, B>,
    hash_name: &'static str,
    table_name: &'static str,
    family: &'static str,
    /// Devices with a session, wherever it is (kept by this owner, as no map counts
    /// them all).
    devices: u32,
}

impl SessionMaps {
    /// `empty`: the datapath was never configured, so never given sessions either.
    pub(super) fn open(
        source: &mut MapSource<'_>,
        limits: &Limits,
        empty: bool,
    ) -> Result<Self, DatapathError> {
        let mut maps = Self {
            v4: FamilyMaps::open(source, names::SESSIONS_V4, names::SESSION_TABLE_V4, "IPv4")?,
            v6: FamilyMaps::open(source, names::SESSIONS_V6, names::SESSION_TABLE_V6, "IPv6")?,
            max_sessions: limits.max_sessions,
            mask: Geometry::of(limits).session_buckets - 1,
            identities: Identities::open(source, limits, &[])?,
        };
        if !empty {
            let held = maps.kernel_slots()?;
            maps.count(&held);
            let used: Vec<u32> = held.iter().map(|(_, slot)| *slot).collect();
            maps.identities.reset_used(&used);
        }
        Ok(maps)
    }

    /// Writes (or replaces) a device's session with a fresh identity slot for `who`: the
    /// slot's masks first, then the hash map, then the session table (where a reader
    /// that meets the entry mid-write falls back to the hash map's copy); the previous
    /// slot is freed last. Returns the new slot.
    pub fn set_session(
        &mut self,
        ip: IpAddr,
        mut session: Session,
        who: &Identity<'_>,
    ) -> Result<u32, DatapathError> {
        let previous = self.session(ip)?.map(|s| s.identity);
        if previous.is_none() {
            self.room_for(ip.is_ipv4().into(), (!ip.is_ipv4()).into())?;
        }
        session.identity = self.identities.claim(who, previous)?;
        let (limit, mask) = (self.max_sessions, self.mask);
        let written = match ip {
            IpAddr::V4(a) => self.v4.write_one(&a.into(), &session, mask, limit),
            IpAddr::V6(a) => self.v6.write_one(&a.into(), &session, mask, limit),
        };
        if let Err(e) = written {
            self.identities.release(session.identity);
            return Err(e);
        }
        match previous {
            Some(old) => self.identities.release(old),
            None => *self.devices_of(ip) += 1,
        }
        Ok(session.identity)
    }

    /// Removes a device's session (absent is fine): the table entry first, then the
    /// hash map's; then its identity slot is freed.
    pub fn remove_session(&mut self, ip: IpAddr) -> Result<(), DatapathError> {
        let previous = self.session(ip)?.map(|s| s.identity);
        let mask = self.mask;
        match ip {
            IpAddr::V4(a) => self.v4.remove_one(&a.into(), mask)?,
            IpAddr::V6(a) => self.v6.remove_one(&a.into(), mask)?,
        }
        if let Some(old) = previous {
            self.identities.release(old);
            let devices = self.devices_of(ip);
            *devices = devices.saturating_sub(1);
        }
        Ok(())
    }

    /// Every device with a session in the kernel and its identity slot, once each:
    /// the session tables read in place, then the hash maps in batches.
    pub fn kernel_slots(&self) -> Result<Vec<(IpAddr, u32)>, DatapathError> {
        let mut all = Vec::new();
        self.v4
            .walk(self.mask, |a| IpAddr::V4(a.into()), &mut all)?;
        self.v6
            .walk(self.mask, |a| IpAddr::V6(a.into()), &mut all)?;
        Ok(all)
    }

    /// Writes many sessions at once (start-up, bulk import, benchmarks), each with a
    /// fresh identity slot for its identity (their masks written first): placed in the
    /// session tables' own memory, then the few the tables did not take, and the
    /// renewed ones, in batched writes of the hash maps. Each comes with the slot its
    /// device's session holds now (the caller's record of the kernel: `SessionTable`),
    /// freed last; returns the new slots. A batch that would take a family past
    /// `max_sessions` changes nothing; should a write fail part-way, what the kernel
    /// holds is read back from it.
    pub fn load_sessions(
        &mut self,
        sessions: &[(IpAddr, Session, Identity<'_>, Option<u32>)],
    ) -> Result<Vec<u32>, DatapathError> {
        let new = |v4: bool| {
            sessions
                .iter()
                .filter(|s| s.0.is_ipv4() == v4 && s.3.is_none())
                .count() as u32
        };
        let (new4, new6) = (new(true), new(false));
        self.room_for(new4, new6)?;
        let who: Vec<(Identity<'_>, Option<u32>)> = sessions
            .iter()
            .map(|(_, _, who, previous)| (*who, *previous))
            .collect();
        let slots = self.identities.claim_many(&who)?;
        if let Err(e) = self.write_sessions(sessions, &slots) {
            match self.kernel_slots() {
                Ok(held) => {
                    self.count(&held);
                    let used: Vec<u32> = held.into_iter().map(|(_, slot)| slot).collect();
                    self.identities.reset_used(&used);
                }
                Err(read) => {
                    tracing::error!(error = %read, "could not read the session maps back after a failed batch; its identity slots stay taken");
                }
            }
            return Err(e);
        }
        self.v4.devices += new4;
        self.v6.devices += new6;
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
        let (mask, limit) = (self.mask, self.max_sessions);
        let given = || {
            sessions
                .iter()
                .zip(slots)
                .map(|((ip, session, _, previous), slot)| {
                    let session = Session {
                        identity: *slot,
                        ..*session
                    };
                    (*ip, session, previous.is_some())
                })
        };
        // Renewed devices' hash-map copies first: a reader that meets their table entry
        // mid-write falls back on them.
        let (mut renewed4, mut renewed6) = (HashWrites::default(), HashWrites::default());
        for (ip, session, _) in given().filter(|(_, _, renewed)| *renewed) {
            match ip {
                IpAddr::V4(a) => renewed4.push(a.into(), session),
                IpAddr::V6(a) => renewed6.push(a.into(), session),
            }
        }
        self.v4.write_hash(renewed4, limit)?;
        self.v6.write_hash(renewed6, limit)?;
        // Then the tables, in place; new devices whose bucket is full go to the hash
        // maps.
        let (mut table4, mut table6) = (self.v4.mapped(true)?, self.v6.mapped(true)?);
        let (mut full4, mut full6) = (HashWrites::default(), HashWrites::default());
        for (ip, session, renewed) in given() {
            match ip {
                IpAddr::V4(a) => {
                    let addr = a.into();
                    if !place_mapped(&mut table4, &addr, &session, mask) && !renewed {
                        full4.push(addr, session);
                    }
                }
                IpAddr::V6(a) => {
                    let addr = a.into();
                    if !place_mapped(&mut table6, &addr, &session, mask) && !renewed {
                        full6.push(addr, session);
                    }
                }
            }
        }
        drop((table4, table6));
        self.v4.write_hash(full4, limit)?;
        self.v6.write_hash(full6, limit)
    }

    /// The kernel's session for a device, if any: as the program finds it.
    pub fn session(&self, ip: IpAddr) -> Result<Option<Session>, DatapathError> {
        match ip {
            IpAddr::V4(a) => self.v4.session(&a.into(), self.mask),
            IpAddr::V6(a) => self.v6.session(&a.into(), self.mask),
        }
    }

    /// Whether each family has room for this many more devices.
    fn room_for(&self, v4: u32, v6: u32) -> Result<(), DatapathError> {
        for (maps, more) in [
            (self.v4.family, self.v4.devices + v4),
            (self.v6.family, self.v6.devices + v6),
        ] {
            if more > self.max_sessions {
                return Err(DatapathError::SessionsFull {
                    family: maps,
                    limit: self.max_sessions,
                });
            }
        }
        Ok(())
    }

    fn devices_of(&mut self, ip: IpAddr) -> &mut u32 {
        match ip {
            IpAddr::V4(_) => &mut self.v4.devices,
            IpAddr::V6(_) => &mut self.v6.devices,
        }
    }

    /// Counts the devices of `held` (what the kernel holds) by family.
    fn count(&mut self, held: &[(IpAddr, u32)]) {
        let v4 = held.iter().filter(|(ip, _)| ip.is_ipv4()).count() as u32;
        self.v4.devices = v4;
        self.v6.devices = held.len() as u32 - v4;
    }
}

impl<B> FamilyMaps<B>
where
    B: SessionBucket + aya::Pod,
    Addr<B>: aya::Pod + Default + Sync,
{
    fn open(
        source: &mut MapSource<'_>,
        hash_name: &'static str,
        table_name: &'static str,
        family: &'static str,
    ) -> Result<Self, DatapathError> {
        Ok(Self {
            hash: typed(source, hash_name)?,
            table: typed(source, table_name)?,
            hash_name,
            table_name,
            family,
            devices: 0,
        })
    }

    fn session(&self, addr: &Addr<B>, mask: u32) -> Result<Option<Session>, DatapathError> {
        let folded = B::Slot::fold(addr);
        let in_table = self
            .table
            .get(&bucket(folded, mask), 0)
            .map_err(map_err(self.table_name))?;
        if let Some(session) = find_session(in_table.slots(), addr, folded) {
            return Ok(Some(session));
        }
        match self.hash.get(addr, 0) {
            Ok(s) => Ok(Some(s)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DatapathError::Map {
                map: self.hash_name,
                source,
            }),
        }
    }

    /// The hash map first, then the table entry.
    fn write_one(
        &mut self,
        addr: &Addr<B>,
        session: &Session,
        mask: u32,
        limit: u32,
    ) -> Result<(), DatapathError> {
        self.hash
            .insert(addr, session, 0)
            .map_err(|source| match &source {
                MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                    DatapathError::SessionsFull {
                        family: self.family,
                        limit,
                    }
                }
                _ => DatapathError::Map {
                    map: self.hash_name,
                    source,
                },
            })?;
        self.place(addr, Some(session), mask)
    }

    /// The table entry first, then the hash map's copy (absent is fine).
    fn remove_one(&mut self, addr: &Addr<B>, mask: u32) -> Result<(), DatapathError> {
        self.place(addr, None, mask)?;
        match self.hash.remove(addr) {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(source) => Err(DatapathError::Map {
                map: self.hash_name,
                source,
            }),
        }
    }

    /// Places, renews (`Some`) or clears (`None`) a device's entry in the session table.
    fn place(
        &mut self,
        addr: &Addr<B>,
        at: Option<&Session>,
        mask: u32,
    ) -> Result<(), DatapathError> {
        let index = bucket(B::Slot::fold(addr), mask);
        let mut b = self
            .table
            .get(&index, 0)
            .map_err(map_err(self.table_name))?;
        if place_session(b.slots_mut(), addr, at) {
            self.table
                .set(index, b, 0)
                .map_err(map_err(self.table_name))?;
        }
        Ok(())
    }

    /// The table mapped into the agent's memory for one bulk operation.
    fn mapped(&self, writable: bool) -> Result<sys::MappedArray<B>, DatapathError> {
        sys::MappedArray::open(self.table.map(), writable).map_err(|source| DatapathError::Batch {
            map: self.table_name,
            source,
        })
    }

    /// Writes sessions to the hash map in batches.
    fn write_hash(&mut self, writes: HashWrites<Addr<B>>, limit: u32) -> Result<(), DatapathError> {
        sys::update_batch(self.hash.map().fd().as_fd(), &writes.keys, &writes.values).map_err(|e| {
            match e.raw_os_error() {
                Some(libc::E2BIG) => DatapathError::SessionsFull {
                    family: self.family,
                    limit,
                },
                _ => DatapathError::Batch {
                    map: self.hash_name,
                    source: e,
                },
            }
        })
    }

    /// Appends every device with a session and its identity slot: the table's valid
    /// entries, then the hash map's devices that the table does not hold.
    fn walk(
        &self,
        mask: u32,
        ip: impl Fn(Addr<B>) -> IpAddr,
        all: &mut Vec<(IpAddr, u32)>,
    ) -> Result<(), DatapathError> {
        let table = self.mapped(false)?;
        for index in 0..table.len() {
            for slot in table.get(index).slots() {
                let addr = slot.addr();
                if let Some(session) = slot.session_of(addr, B::Slot::fold(addr)) {
                    all.push((ip(*addr), session.identity));
                }
            }
        }
        sys::read_map::<Addr<B>, Session>(self.hash.map().fd().as_fd(), |keys, values| {
            for (addr, session) in keys.iter().zip(values) {
                let folded = B::Slot::fold(addr);
                let in_table = table.get(bucket(folded, mask) as usize);
                if find_session(in_table.slots(), addr, folded).is_none() {
                    all.push((ip(*addr), session.identity));
                }
            }
        })
        .map_err(|source| DatapathError::Batch {
            map: self.hash_name,
            source,
        })
    }
}

/// Sessions for one `BPF_MAP_UPDATE_BATCH` of a hash map.
struct HashWrites<K> {
    keys: Vec<K>,
    values: Vec<Session>,
}

impl<K> Default for HashWrites<K> {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            values: Vec::new(),
        }
    }
}

impl<K> HashWrites<K> {
    fn push(&mut self, key: K, session: Session) {
        self.keys.push(key);
        self.values.push(session);
    }
}

/// Places a session in its bucket of a mapped session table; returns whether it
/// found room (its own entry or a free one).
fn place_mapped<B: SessionBucket + aya::Pod>(
    table: &mut sys::MappedArray<B>,
    addr: &Addr<B>,
    session: &Session,
    mask: u32,
) -> bool {
    let index = bucket(B::Slot::fold(addr), mask) as usize;
    let mut b = table.get(index);
    let placed = place_session(b.slots_mut(), addr, Some(session));
    if placed {
        table.set(index, b);
    }
    placed
}
