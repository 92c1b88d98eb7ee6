//! The sessions in memory, compactly: one 56-byte row per device in one vector, found
//! through a hash table of row numbers, its user, IdP, boot and groups interned
//! (`names`). A million sessions take about 70 MiB here, where a map of owned records
//! took several times that. Each row also keeps the identity slot the kernel's copy of
//! the session holds (`datapath::SessionMaps`), so that writing every device's identity
//! mask (a reload) or replacing many sessions (an import) needs no walk of the
//! kernel's maps.

use std::{
    hash::BuildHasher,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use agent_common::maps::{IDENTITY_NONE, Session};
use hashbrown::{DefaultHashBuilder, HashMap, HashTable};
use time::OffsetDateTime;

use super::{
    Enrolled, SessionRecord,
    names::{GroupLists, Names},
};
use crate::{
    clock::ClockPair,
    config::{Identity, IdentityCondition, identity::looks_at_user, identity::mask_of},
};

/// Interned names beyond twice the rows (and this slack) are rebuilt from the rows,
/// dropping those no session uses any more.
const NAMES_SLACK: usize = 4096;

/// How many devices ahead a bulk pass `warm`s the index for the one it will change.
pub const WARM_AHEAD: usize = 8;

/// A session as `SessionTable::insert_fields` takes it: a `SessionRecord`'s fields,
/// borrowed, with its groups as any list of `String`s or `&str`s (a journal line's,
/// read in place by replay, are a `Vec<&str>`).
pub struct Fields<'a, Groups> {
    pub ip: IpAddr,
    pub user: &'a str,
    pub idp: &'a str,
    pub authenticated_at: OffsetDateTime,
    pub boot_id: &'a str,
    pub authenticated_at_boot_ns: i64,
    pub groups: Groups,
}

/// One device's session. `SessionRecord` is its owned form.
#[derive(Clone, Copy)]
struct Row {
    /// An IPv4 address in the first four bytes.
    addr: [u8; 16],
    /// Wall-clock time of the authentication: Unix seconds and nanoseconds.
    at_secs: i64,
    at_boot_ns: i64,
    at_nanos: u32,
    user: u32,
    idp: u32,
    groups: u32,
    /// The kernel's identity slot for this session (`IDENTITY_NONE`: not written yet).
    slot: u32,
    /// Boot id number; 0 is the empty id (time taken from the wall clock).
    boot: u16,
    v6: bool,
}
const _: () = assert!(size_of::<Row>() == 56);

/// A device address as a row keeps it: 16 bytes (IPv4 in the first four) and the family.
type Key = ([u8; 16], bool);

fn key_of(ip: &IpAddr) -> Key {
    match ip {
        IpAddr::V4(a) => {
            let mut addr = [0; 16];
            addr[..4].copy_from_slice(&a.octets());
            (addr, false)
        }
        IpAddr::V6(a) => (a.octets(), true),
    }
}

impl Row {
    fn key(&self) -> Key {
        (self.addr, self.v6)
    }

    fn ip(&self) -> IpAddr {
        if self.v6 {
            IpAddr::V6(Ipv6Addr::from(self.addr))
        } else {
            let [a, b, c, d, ..] = self.addr;
            IpAddr::V4(Ipv4Addr::new(a, b, c, d))
        }
    }
}

pub struct SessionTable {
    rows: Vec<Row>,
    /// Row numbers, found by the hash of their device address.
    index: HashTable<u32>,
    hasher: DefaultHashBuilder,
    /// Users and IdPs.
    names: Names,
    boots: Names,
    groups: GroupLists,
}

impl Default for SessionTable {
    fn default() -> Self {
        let mut boots = Names::default();
        boots.intern("");
        Self {
            rows: Vec::new(),
            index: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            names: Names::default(),
            boots,
            groups: GroupLists::default(),
        }
    }
}

impl SessionTable {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.find(ip).is_some()
    }

    /// The device's session.
    pub fn get(&self, ip: &IpAddr) -> Option<SessionRecord> {
        Some(self.record(self.row(ip)?))
    }

    /// The user and IdP the device's session binds it to (the login rules' question).
    pub fn enrolled(&self, ip: &IpAddr) -> Option<Enrolled<'_>> {
        let row = self.row(ip)?;
        Some(Enrolled {
            user: self.names.get(row.user),
            idp: self.names.get(row.idp),
        })
    }

    /// The kernel identity slot of the device's session.
    pub fn slot(&self, ip: &IpAddr) -> Option<u32> {
        Some(self.row(ip)?.slot).filter(|&s| s != IDENTITY_NONE)
    }

    /// Whether the device's session is `other` (from the fleet's store): the same user,
    /// IdP, time and groups. Then this one, with the boot-clock time it was first
    /// applied with here, stays.
    pub fn same_session(&self, other: &SessionRecord) -> bool {
        self.row(&other.ip).is_some_and(|row| {
            self.names.get(row.user) == other.user
                && self.names.get(row.idp) == other.idp
                && row.at_secs == other.authenticated_at.unix_timestamp()
                && row.at_nanos == other.authenticated_at.nanosecond()
                && self.groups.get(row.groups) == other.groups.as_slice()
        })
    }

    /// Every session, owned, in no particular order.
    pub fn records(&self) -> impl Iterator<Item = SessionRecord> + '_ {
        self.rows.iter().map(|row| self.record(row))
    }

    /// Every device with a session, in no particular order.
    pub fn devices(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.rows.iter().map(Row::ip)
    }

    /// Makes room for `additional` more sessions at once (a replay that knows roughly
    /// how many are coming): growing a million rows step by step moves them many times.
    pub fn reserve(&mut self, additional: usize) {
        self.rows.reserve(additional);
        let (rows, hasher) = (&self.rows, &self.hasher);
        self.index
            .reserve(additional, |&i| hasher.hash_one(rows[i as usize].key()));
    }

    pub fn count_v4(&self) -> usize {
        self.rows.iter().filter(|r| !r.v6).count()
    }

    /// Records (or replaces) the device's session, whose kernel copy holds `slot`.
    pub fn insert(&mut self, record: &SessionRecord, slot: u32) {
        self.insert_fields(&record.fields(), slot);
    }

    /// `insert`, from borrowed fields.
    pub fn insert_fields<G: AsRef<str>>(
        &mut self,
        record: &Fields<'_, impl AsRef<[G]>>,
        slot: u32,
    ) {
        if self.names.len() > 2 * self.rows.len() + NAMES_SLACK
            || self.groups.len() > 2 * self.rows.len() + NAMES_SLACK
        {
            self.rebuild_names();
        }
        let key = key_of(&record.ip);
        let (addr, v6) = key;
        let boot = u16::try_from(self.boots.intern(record.boot_id)).unwrap_or(0);
        let row = Row {
            addr,
            at_secs: record.authenticated_at.unix_timestamp(),
            at_boot_ns: record.authenticated_at_boot_ns,
            at_nanos: record.authenticated_at.nanosecond(),
            user: self.names.intern(record.user),
            idp: self.names.intern(record.idp),
            groups: self.groups.intern(record.groups.as_ref()),
            slot,
            boot,
            v6,
        };
        let hash = self.hasher.hash_one(key);
        let (rows, hasher) = (&self.rows, &self.hasher);
        let entry = self.index.entry(
            hash,
            |&i| rows[i as usize].key() == key,
            |&i| hasher.hash_one(rows[i as usize].key()),
        );
        match entry {
            hashbrown::hash_table::Entry::Occupied(at) => self.rows[*at.get() as usize] = row,
            hashbrown::hash_table::Entry::Vacant(vacant) => {
                vacant.insert(self.rows.len() as u32);
                self.rows.push(row);
            }
        }
    }

    /// Notes the slot the kernel's copy of the device's session holds now.
    /// Returns the device's row, in the order of `kernel_values`, if it has one.
    pub fn set_slot(&mut self, ip: &IpAddr, slot: u32) -> Option<usize> {
        let at = self.find(ip)?;
        self.rows[at].slot = slot;
        Some(at)
    }

    /// Notes the kernel slots of every row at once, in the order of `kernel_values`
    /// (no row added or removed since): one pass instead of a lookup per device.
    pub fn set_slots_in_order(&mut self, slots: &[u32]) {
        debug_assert_eq!(slots.len(), self.rows.len());
        for (row, &slot) in self.rows.iter_mut().zip(slots) {
            row.slot = slot;
        }
    }

    /// Removes the device's session; returns it with its kernel slot.
    pub fn remove(&mut self, ip: &IpAddr) -> Option<(SessionRecord, u32)> {
        let key = key_of(ip);
        let hash = self.hasher.hash_one(key);
        let rows = &self.rows;
        let entry = self
            .index
            .find_entry(hash, |&i| rows[i as usize].key() == key)
            .ok()?;
        let (at, _) = entry.remove();
        let at = at as usize;
        let removed = self.rows.swap_remove(at);
        // The last row moved into the hole: its index entry follows it.
        if at < self.rows.len() {
            let old = self.rows.len() as u32;
            let hash = self.hasher.hash_one(self.rows[at].key());
            if let Some(i) = self.index.find_mut(hash, |&i| i == old) {
                *i = at as u32;
            }
        }
        Some((self.record(&removed), removed.slot))
    }

    /// Every session as the kernel should have it now, with who it belongs to and the
    /// slot its kernel copy holds, for one bulk write; in row order, which
    /// `set_slots_in_order` takes the new slots in.
    pub fn kernel_values(
        &self,
        clock: &ClockPair,
        current_boot: &str,
    ) -> Vec<(IpAddr, Session, Identity<'_>, Option<u32>)> {
        let current = self.boots_id(current_boot);
        self.rows
            .iter()
            .map(|row| {
                let at_boot_ns = if recorded_boot_time(row, current) {
                    row.at_boot_ns
                } else {
                    clock.boot_ns_of(wall(row))
                };
                let session = Session {
                    authenticated_at_ns: at_boot_ns,
                    identity: IDENTITY_NONE,
                    _pad: 0,
                };
                let slot = Some(row.slot).filter(|&s| s != IDENTITY_NONE);
                (row.ip(), session, self.identity(row), slot)
            })
            .collect()
    }

    /// For each session, in the order of `kernel_values`: whether its kernel time there
    /// is the one recorded for `current_boot`, rather than converted from wall-clock
    /// time with the clock readings given.
    pub fn boot_times_recorded(&self, current_boot: &str) -> Vec<bool> {
        let current = self.boots_id(current_boot);
        self.rows
            .iter()
            .map(|row| recorded_boot_time(row, current))
            .collect()
    }

    /// Each session's kernel slot and its identity mask for `conditions`, evaluated once
    /// per distinct identity (by interned numbers; the user left out when no condition
    /// looks at it).
    pub fn masks(&self, conditions: &[IdentityCondition]) -> (Vec<u32>, Vec<u64>) {
        let by_user = looks_at_user(conditions);
        let mut known: HashMap<(u32, u32, u32), u64> = HashMap::new();
        self.rows
            .iter()
            .filter(|row| row.slot != IDENTITY_NONE)
            .map(|row| {
                let user = if by_user { row.user } else { u32::MAX };
                let mask = *known
                    .entry((user, row.idp, row.groups))
                    .or_insert_with(|| mask_of(conditions, &self.identity(row)));
                (row.slot, mask)
            })
            .unzip()
    }

    fn identity(&self, row: &Row) -> Identity<'_> {
        Identity {
            user: self.names.get(row.user),
            idp: self.names.get(row.idp),
            groups: self.groups.get(row.groups),
        }
    }

    fn record(&self, row: &Row) -> SessionRecord {
        SessionRecord {
            ip: row.ip(),
            user: self.names.get(row.user).to_string(),
            idp: self.names.get(row.idp).to_string(),
            authenticated_at: wall(row),
            boot_id: self.boots.get(u32::from(row.boot)).to_string(),
            authenticated_at_boot_ns: row.at_boot_ns,
            groups: self.groups.get(row.groups).to_vec(),
        }
    }

    fn boots_id(&self, boot: &str) -> Option<u16> {
        (0..self.boots.len() as u32)
            .find(|&i| self.boots.get(i) == boot)
            .and_then(|i| u16::try_from(i).ok())
    }

    fn find(&self, ip: &IpAddr) -> Option<usize> {
        let key = key_of(ip);
        let hash = self.hasher.hash_one(key);
        self.index
            .find(hash, |&i| self.rows[i as usize].key() == key)
            .map(|&i| i as usize)
    }

    /// Looks the device up without using the answer, so that the memory an insert of
    /// it will touch is on its way. Bulk inserts (replay, import) call this a few
    /// devices ahead: at a million rows, waiting for each device's probe in turn was
    /// most of their time.
    pub fn warm(&self, ip: &IpAddr) {
        std::hint::black_box(self.find(ip));
    }

    fn row(&self, ip: &IpAddr) -> Option<&Row> {
        Some(&self.rows[self.find(ip)?])
    }

    /// Interns every row's names afresh, dropping names no row uses.
    fn rebuild_names(&mut self) {
        let mut names = Names::default();
        let mut boots = Names::default();
        boots.intern("");
        let mut groups = GroupLists::default();
        for row in &mut self.rows {
            row.user = names.intern(self.names.get(row.user));
            row.idp = names.intern(self.names.get(row.idp));
            row.boot =
                u16::try_from(boots.intern(self.boots.get(u32::from(row.boot)))).unwrap_or(0);
            row.groups = groups.intern(self.groups.get(row.groups));
        }
        (self.names, self.boots, self.groups) = (names, boots, groups);
    }
}

/// The row's wall-clock authentication time (valid by construction: it came from an
/// `OffsetDateTime`).
/// Whether a row's boot-clock time is the one recorded (a session of the boot `current`
/// names), not one to convert from its wall-clock time.
fn recorded_boot_time(row: &Row, current: Option<u16>) -> bool {
    row.boot != 0 && Some(row.boot) == current
}

fn wall(row: &Row) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(row.at_secs)
        .map(|t| t + time::Duration::nanoseconds(i64::from(row.at_nanos)))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ip: &str, user: &str, groups: &[&str]) -> SessionRecord {
        SessionRecord {
            ip: ip.parse().unwrap(),
            user: user.into(),
            idp: "okta".into(),
            authenticated_at: time::macros::datetime!(2026-12-01 10:00:00.123456789 +01:00),
            boot_id: "boot-a".into(),
            authenticated_at_boot_ns: 42,
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    #[test]
    fn sessions_read_back_as_written_through_inserts_replacements_and_removals() {
        let mut table = SessionTable::default();
        let alice = record("198.18.0.1", "alice@example.com", &["finance"]);
        let bob = record("2001:db8::2", "bob@example.com", &[]);
        let carol = record("198.18.0.3", "carol@example.com", &["finance", "staff"]);
        table.insert(&alice, 7);
        table.insert(&bob, 8);
        table.insert(&carol, 9);
        assert_eq!(table.len(), 3);
        assert_eq!(table.count_v4(), 2);
        assert_eq!(table.get(&alice.ip), Some(alice.clone()));
        assert_eq!(table.get(&bob.ip), Some(bob.clone()));
        assert_eq!(table.slot(&carol.ip), Some(9));
        assert!(table.same_session(&carol));

        // Removing the first row moves the last into its place.
        assert_eq!(table.remove(&alice.ip), Some((alice.clone(), 7)));
        assert_eq!(table.remove(&alice.ip), None);
        assert_eq!(table.get(&carol.ip), Some(carol.clone()));
        assert_eq!(table.slot(&carol.ip), Some(9));
        assert_eq!(table.get(&bob.ip), Some(bob.clone()));

        // A replacement keeps one row, with its new time and slot.
        let mut later = carol.clone();
        later.authenticated_at += time::Duration::minutes(5);
        assert!(!table.same_session(&later));
        table.insert(&later, 11);
        assert_eq!(table.len(), 2);
        assert_eq!(table.get(&carol.ip), Some(later));
        assert_eq!(table.slot(&carol.ip), Some(11));
        let enrolled = table.enrolled(&carol.ip).unwrap();
        assert_eq!((enrolled.user, enrolled.idp), ("carol@example.com", "okta"));
        assert!(table.get(&"198.18.0.99".parse().unwrap()).is_none());
    }

    #[test]
    fn names_no_session_uses_are_dropped_and_the_rest_still_read_back() {
        let mut table = SessionTable::default();
        let kept = record("198.18.0.1", "kept@example.com", &["finance"]);
        table.insert(&kept, 1);
        for i in 0..3 * NAMES_SLACK {
            let churn = record("198.18.0.2", &format!("user{i}@example.com"), &[]);
            table.insert(&churn, 2);
        }
        assert!(table.names.len() <= 2 * table.len() + NAMES_SLACK + 2);
        assert_eq!(table.get(&kept.ip), Some(kept));
        assert_eq!(
            table.get(&"198.18.0.2".parse().unwrap()).unwrap().user,
            format!("user{}@example.com", 3 * NAMES_SLACK - 1)
        );
    }

    #[test]
    fn masks_are_each_sessions_own_and_sessions_outside_the_kernel_get_none() {
        let mut table = SessionTable::default();
        table.insert(&record("198.18.0.1", "a@example.com", &["finance"]), 5);
        table.insert(&record("198.18.0.2", "b@example.com", &["staff"]), 6);
        table.insert(&record("198.18.0.3", "c@example.com", &["finance"]), 7);
        table.insert(
            &record("198.18.0.4", "d@example.com", &["finance"]),
            IDENTITY_NONE,
        );
        let conditions = vec![
            IdentityCondition {
                users: None,
                user_matches: None,
                groups: Some(vec!["finance".into()]),
                idps: None,
            },
            IdentityCondition {
                users: Some(vec!["B@example.com".into()]),
                user_matches: None,
                groups: None,
                idps: None,
            },
        ];
        let (slots, masks) = table.masks(&conditions);
        let mut pairs: Vec<(u32, u64)> = slots.into_iter().zip(masks).collect();
        pairs.sort_unstable();
        assert_eq!(pairs, [(5, 0b01), (6, 0b10), (7, 0b01)]);
    }

    #[test]
    fn kernel_values_take_this_boot_s_clock_or_else_the_wall_clock() {
        let mut table = SessionTable::default();
        let this_boot = record("198.18.0.1", "a@example.com", &[]);
        let mut other_boot = record("198.18.0.2", "b@example.com", &[]);
        other_boot.boot_id = "boot-b".into();
        table.insert(&this_boot, 3);
        table.insert(&other_boot, IDENTITY_NONE);
        let clock = ClockPair::now();
        let mut values = table.kernel_values(&clock, "boot-a");
        values.sort_unstable_by_key(|(ip, ..)| *ip);
        let expected = [
            this_boot.kernel_value(&clock, "boot-a"),
            other_boot.kernel_value(&clock, "boot-a"),
        ];
        assert_eq!(values[0].1, expected[0]);
        assert_eq!(values[1].1, expected[1]);
        assert_eq!((values[0].3, values[1].3), (Some(3), None));
        assert_eq!(values[0].2.user, "a@example.com");
    }

    #[test]
    fn slots_noted_in_order_land_on_the_devices_the_values_were_for() {
        let mut table = SessionTable::default();
        for (i, user) in ["a", "b", "c"].iter().enumerate() {
            table.insert(&record(&format!("198.18.0.{i}"), user, &[]), IDENTITY_NONE);
        }
        table.remove(&"198.18.0.0".parse().unwrap());
        table.insert(&record("2001:db8::1", "d", &[]), IDENTITY_NONE);
        let devices: Vec<IpAddr> = table
            .kernel_values(&ClockPair::now(), "boot-a")
            .iter()
            .map(|(ip, ..)| *ip)
            .collect();
        let slots: Vec<u32> = (10..).take(devices.len()).collect();
        table.set_slots_in_order(&slots);
        for (ip, slot) in devices.iter().zip(slots) {
            assert_eq!(table.slot(ip), Some(slot), "{ip}");
        }
        assert_eq!(devices.len(), 3);
    }
}
