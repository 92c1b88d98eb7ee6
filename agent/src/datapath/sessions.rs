//! The kernel's session maps, with the devices' identity masks (`identities`). Each
//! family has two (layouts in `agent_common::maps`): the bucketed session table
//! (`SG_SESSION_TABLE_V4/V6`), which the program reads first, and the hash map
//! (`SG_SESSIONS_V4/V6`) it falls back to. Every session is in at least one of them,
//! and a device that has a session always has a valid copy a reader can find, even
//! while it is rewritten. A bulk write (start-up, import, fleet resync) places sessions
//! in the table's own memory and writes the hash map only for what the table cannot
//! take safely (`Bulk`); a single login writes both, the hash map first. A hash-map
//! copy shadowed by a table entry may be stale: nothing reads it while the entry is
//! valid, and a removal takes it first. Split from `Maps` so that they have one owner,
//! the session mirror (`sessions::SessionMirror`).

use std::{net::IpAddr, os::fd::AsFd};

use agent_common::{
    hashing::bucket,
    maps::{Session, SessionBucketV4, SessionBucketV6, names},
    tables::{
        Placement, SessionBucket, SessionSlot, clear_others, find_session, place_session, placement,
    },
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
    /// The session tables' bucket mask (buckets are a power of two).
    mask: u32,
    pub identities: Identities,
    /// The sessions `open` read from maps an earlier agent left, until the first write
    /// makes the list stale: an adoption takes it (`take_kernel_sessions`) instead of
    /// reading a million entries a second time.
    read_at_open: Option<Vec<(IpAddr, Session)>>,
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
    /// Devices it may hold (`max_sessions`).
    limit: u32,
}

impl SessionMaps {
    /// `empty`: the datapath was never configured, so never given sessions either.
    pub(super) fn open(
        source: &mut MapSource<'_>,
        limits: &Limits,
        empty: bool,
    ) -> Result<Self, DatapathError> {
        let limit = limits.max_sessions;
        let v4 = FamilyMaps::open(
            source,
            names::SESSIONS_V4,
            names::SESSION_TABLE_V4,
            "IPv4",
            limit,
        )?;
        let v6 = FamilyMaps::open(
            source,
            names::SESSIONS_V6,
            names::SESSION_TABLE_V6,
            "IPv6",
            limit,
        )?;
        let mask = Geometry::of(limits).session_buckets - 1;
        let held = if empty {
            Vec::new()
        } else {
            sessions_in(&v4, &v6, mask)?
        };
        let used: Vec<u32> = held.iter().map(|(_, s)| s.identity).collect();
        let mut maps = Self {
            v4,
            v6,
            mask,
            identities: Identities::open(source, limits, &used)?,
            read_at_open: None,
        };
        maps.count(&held);
        if !empty {
            maps.read_at_open = Some(held);
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
        self.read_at_open = None;
        let previous = self.session(ip)?.map(|s| s.identity);
        if previous.is_none() {
            match ip {
                IpAddr::V4(_) => self.v4.room_for(1)?,
                IpAddr::V6(_) => self.v6.room_for(1)?,
            }
        }
        session.identity = self.identities.claim(who, previous)?;
        let mask = self.mask;
        let in_hash = match ip {
            IpAddr::V4(a) => self.v4.insert(&a.into(), &session),
            IpAddr::V6(a) => self.v6.insert(&a.into(), &session),
        };
        if let Err(e) = in_hash {
            self.identities.release(session.identity);
            return Err(e);
        }
        // From here the hash map's copy holds the new slot: it stays taken on error.
        match ip {
            IpAddr::V4(a) => self.v4.place(&a.into(), Some(&session), mask)?,
            IpAddr::V6(a) => self.v6.place(&a.into(), Some(&session), mask)?,
        }
        match previous {
            Some(old) => self.identities.release(old),
            None => *self.devices_of(ip) += 1,
        }
        Ok(session.identity)
    }

    /// Removes a device's session (absent is fine): the hash map's copy first, then the
    /// table entry; then its identity slot is freed.
    pub fn remove_session(&mut self, ip: IpAddr) -> Result<(), DatapathError> {
        self.read_at_open = None;
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

    /// Every device with a session in the kernel and that session, once each (a
    /// device an agent killed mid-write left two table entries is listed with both):
    /// the session tables read in place, then the hash maps in batches.
    pub fn kernel_sessions(&self) -> Result<Vec<(IpAddr, Session)>, DatapathError> {
        sessions_in(&self.v4, &self.v6, self.mask)
    }

    /// `kernel_sessions`, or the same list as `open` read it if nothing was written
    /// since (once).
    pub fn take_kernel_sessions(&mut self) -> Result<Vec<(IpAddr, Session)>, DatapathError> {
        match self.read_at_open.take() {
            Some(held) => Ok(held),
            None => self.kernel_sessions(),
        }
    }

    /// Writes many sessions at once (start-up, bulk import, benchmarks), each with a
    /// fresh identity slot for its identity (their masks written first): placed in the
    /// session tables' own memory, then what the tables could not take safely in
    /// batched writes of the hash maps (`Bulk`). Each comes with the slot its
    /// device's session holds now (the caller's record of the kernel: `SessionTable`),
    /// freed last; returns the new slots. A batch that would take a family past
    /// `max_sessions` changes nothing; should a write fail part-way, what the kernel
    /// holds is read back from it.
    pub fn load_sessions(
        &mut self,
        sessions: &[(IpAddr, Session, Identity<'_>, Option<u32>)],
    ) -> Result<Vec<u32>, DatapathError> {
        self.read_at_open = None;
        let new = |v4: bool| {
            sessions
                .iter()
                .filter(|s| s.0.is_ipv4() == v4 && s.3.is_none())
                .count() as u32
        };
        let (new4, new6) = (new(true), new(false));
        self.v4.room_for(new4)?;
        self.v6.room_for(new6)?;
        let who: Vec<(Identity<'_>, Option<u32>)> = sessions
            .iter()
            .map(|(_, _, who, previous)| (*who, *previous))
            .collect();
        let slots = self.identities.claim_many(&who)?;
        if let Err(e) = self.write_sessions(sessions, &slots) {
            match self.kernel_sessions() {
                Ok(held) => {
                    self.count(&held);
                    let used: Vec<u32> = held.into_iter().map(|(_, s)| s.identity).collect();
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
        let mask = self.mask;
        let (mut v4, mut v6) = (Bulk::default(), Bulk::default());
        // The tables are mapped for this pass only.
        let (mut table4, mut table6) = (self.v4.mapped(true)?, self.v6.mapped(true)?);
        for (i, ((ip, session, _, _), slot)) in sessions.iter().zip(slots).enumerate() {
            // Each session lands in a random bucket of a table far larger than the
            // caches: waiting for each bucket in turn was most of a bulk write.
            if let Some((ahead, ..)) = sessions.get(i + PREFETCH_AHEAD) {
                match ahead {
                    IpAddr::V4(a) => {
                        table4.prefetch(bucket_of::<SessionBucketV4>(&(*a).into(), mask))
                    }
                    IpAddr::V6(a) => {
                        table6.prefetch(bucket_of::<SessionBucketV6>(&(*a).into(), mask))
                    }
                }
            }
            let session = Session {
                identity: *slot,
                ..*session
            };
            match ip {
                IpAddr::V4(a) => v4.place(&mut table4, (*a).into(), session, mask),
                IpAddr::V6(a) => v6.place(&mut table6, (*a).into(), session, mask),
            }
        }
        drop((table4, table6));
        self.v4.write_hash(&v4)?;
        self.v6.write_hash(&v6)?;
        // Entries renewed in place come last, their sessions in the hash maps by now.
        if !v4.over.is_empty() {
            v4.place_over(&mut self.v4.mapped(true)?, mask);
        }
        if !v6.over.is_empty() {
            v6.place_over(&mut self.v6.mapped(true)?, mask);
        }
        Ok(())
    }

    /// The kernel's session for a device, if any: as the program finds it.
    pub fn session(&self, ip: IpAddr) -> Result<Option<Session>, DatapathError> {
        match ip {
            IpAddr::V4(a) => self.v4.session(&a.into(), self.mask),
            IpAddr::V6(a) => self.v6.session(&a.into(), self.mask),
        }
    }

    fn devices_of(&mut self, ip: IpAddr) -> &mut u32 {
        match ip {
            IpAddr::V4(_) => &mut self.v4.devices,
            IpAddr::V6(_) => &mut self.v6.devices,
        }
    }

    /// Counts the devices of `held` (what the kernel holds) by family.
    fn count(&mut self, held: &[(IpAddr, Session)]) {
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
        limit: u32,
    ) -> Result<Self, DatapathError> {
        Ok(Self {
            hash: typed(source, hash_name)?,
            table: typed(source, table_name)?,
            hash_name,
            table_name,
            family,
            devices: 0,
            limit,
        })
    }

    /// Whether this family has room for `more` devices.
    fn room_for(&self, more: u32) -> Result<(), DatapathError> {
        if self.devices + more > self.limit {
            return Err(self.full());
        }
        Ok(())
    }

    /// The error that says this family is full.
    fn full(&self) -> DatapathError {
        DatapathError::SessionsFull {
            family: self.family,
            limit: self.limit,
        }
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

    fn insert(&mut self, addr: &Addr<B>, session: &Session) -> Result<(), DatapathError> {
        self.hash
            .insert(addr, session, 0)
            .map_err(|source| match &source {
                MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                    self.full()
                }
                _ => DatapathError::Map {
                    map: self.hash_name,
                    source,
                },
            })
    }

    /// The hash map's copy first (absent is fine; a stale one must not outlive the
    /// table entry that shadows it), then the table entry.
    fn remove_one(&mut self, addr: &Addr<B>, mask: u32) -> Result<(), DatapathError> {
        match self.hash.remove(addr) {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(source) => Err(DatapathError::Map {
                map: self.hash_name,
                source,
            }),
        }?;
        self.place(addr, None, mask)
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

    /// Writes a bulk write's hash-map sessions in batches.
    fn write_hash(&mut self, bulk: &Bulk<Addr<B>>) -> Result<(), DatapathError> {
        sys::update_batch(self.hash.map().fd().as_fd(), &bulk.keys, &bulk.values).map_err(|e| {
            match e.raw_os_error() {
                Some(libc::E2BIG) => self.full(),
                _ => DatapathError::Batch {
                    map: self.hash_name,
                    source: e,
                },
            }
        })
    }

    /// Appends every device with a session and that session: the table's valid
    /// entries, then the hash map's devices that the table does not hold.
    fn walk(
        &self,
        mask: u32,
        ip: impl Fn(Addr<B>) -> IpAddr,
        all: &mut Vec<(IpAddr, Session)>,
    ) -> Result<(), DatapathError> {
        let table = self.mapped(false)?;
        for index in 0..table.len() {
            for slot in table.get(index).slots() {
                let addr = slot.addr();
                if let Some(session) = slot.session_of(addr, B::Slot::fold(addr)) {
                    all.push((ip(*addr), session));
                }
            }
        }
        sys::read_map::<Addr<B>, Session>(self.hash.map().fd().as_fd(), |keys, values| {
            for (addr, session) in keys.iter().zip(values) {
                let folded = B::Slot::fold(addr);
                let in_table = table.get(bucket(folded, mask) as usize);
                if find_session(in_table.slots(), addr, folded).is_none() {
                    all.push((ip(*addr), *session));
                }
            }
        })
        .map_err(|source| DatapathError::Batch {
            map: self.hash_name,
            source,
        })
    }
}

/// Both families' sessions and their entries, read in place from the tables, then the
/// hash maps' devices the tables do not hold.
fn sessions_in(
    v4: &FamilyMaps<SessionBucketV4>,
    v6: &FamilyMaps<SessionBucketV6>,
    mask: u32,
) -> Result<Vec<(IpAddr, Session)>, DatapathError> {
    let mut all = Vec::new();
    v4.walk(mask, |a| IpAddr::V4(a.into()), &mut all)?;
    v6.walk(mask, |a| IpAddr::V6(a.into()), &mut all)?;
    Ok(all)
}

/// How many sessions ahead a bulk write asks for its bucket: enough to keep the CPU's
/// outstanding loads busy, few enough that the buckets are still cached when placed.
const PREFETCH_AHEAD: usize = 16;

/// The session-table bucket of `addr`.
fn bucket_of<B: SessionBucket>(addr: &Addr<B>, mask: u32) -> usize {
    bucket(B::Slot::fold(addr), mask) as usize
}

/// One family's part of a bulk write (`A`: its address type). A session goes beside
/// its device's old entry when its bucket has a free slot (both stay valid until a
/// second write clears the old one), so that a reader never finds a device without a
/// valid entry. Otherwise it goes to the hash map: a new device whose bucket is full
/// stays there, and a device whose entry is in a full bucket has it renewed in place
/// once the hash map holds its session (`place_over`).
struct Bulk<A> {
    keys: Vec<A>,
    values: Vec<Session>,
    /// Of `keys`, those whose entry is renewed in place after the hash-map write.
    over: Vec<usize>,
}

impl<A> Default for Bulk<A> {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            values: Vec::new(),
            over: Vec::new(),
        }
    }
}

impl<A: Copy + PartialEq> Bulk<A> {
    fn place<B>(&mut self, table: &mut sys::MappedArray<B>, addr: A, session: Session, mask: u32)
    where
        B: SessionBucket + aya::Pod,
        B::Slot: SessionSlot<Addr = A>,
    {
        let index = bucket_of::<B>(&addr, mask);
        let mut b = table.get(index);
        match placement(b.slots(), &addr) {
            Placement::Beside(free) => {
                b.slots_mut()[free] = B::Slot::new(&addr, &session);
                table.set(index, b);
                if clear_others(b.slots_mut(), &addr, Some(free)) {
                    table.set(index, b);
                }
            }
            Placement::Over(_) => {
                self.over.push(self.keys.len());
                self.keys.push(addr);
                self.values.push(session);
            }
            Placement::Full => {
                self.keys.push(addr);
                self.values.push(session);
            }
        }
    }

    /// Renews in place the entries left for after the hash-map write.
    fn place_over<B>(&self, table: &mut sys::MappedArray<B>, mask: u32)
    where
        B: SessionBucket + aya::Pod,
        B::Slot: SessionSlot<Addr = A>,
    {
        for &i in &self.over {
            let (addr, session) = (&self.keys[i], &self.values[i]);
            let index = bucket_of::<B>(addr, mask);
            let mut b = table.get(index);
            if place_session(b.slots_mut(), addr, Some(session)) {
                table.set(index, b);
            }
        }
    }
}
