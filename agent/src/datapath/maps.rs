//! Typed handles on the program's maps (layouts in `agent_common::maps`) and the
//! agent's writes to them.

use std::net::IpAddr;

use std::os::fd::AsFd;

use agent_common::{
    addr::{Ip4, Ip6},
    hashing::bucket,
    logic::{flow_active, reply_tolerance},
    maps::{
        DestRule, FlowBucketV4, FlowBucketV6, FlowKeyV4, MAX_POLICIES, PORT_TABLE_SET_BIT,
        PolicyParams, PortRuleKey, Session, SessionBucketV4, SessionBucketV6, Settings,
        UNKNOWN_DEVICE_ALLOW, UNKNOWN_DEVICE_ENFORCE, WAYS, add_port, config_set, names,
        policy_slot,
    },
    tables::{FlowSlot, SessionSlot},
    verdict::counter,
};
use aya::maps::{
    Array, HashMap, IterableMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues,
    RingBuf, lpm_trie::Key,
};
use bytemuck::Zeroable;
use ipnet::IpNet;

use super::{DatapathError, Geometry, sys};
use crate::{
    config::{Config, Limits, OnExpired, UnknownDevice},
    policy::PolicyTable,
};

pub struct Maps {
    generation_map: Array<MapData, u32>,
    settings: Array<MapData, Settings>,
    dest_v4: [LpmTrie<MapData, Ip4, DestRule>; 2],
    dest_v6: [LpmTrie<MapData, Ip6, DestRule>; 2],
    port_rules: HashMap<MapData, PortRuleKey, u32>,
    policies: Array<MapData, PolicyParams>,
    sessions_v4: HashMap<MapData, Ip4, Session>,
    sessions_v6: HashMap<MapData, Ip6, Session>,
    session_table_v4: Array<MapData, SessionBucketV4>,
    session_table_v6: Array<MapData, SessionBucketV6>,
    flows_v4: Array<MapData, FlowBucketV4>,
    flows_v6: Array<MapData, FlowBucketV6>,
    counters: PerCpuArray<MapData, u64>,
    policy_drops: PerCpuArray<MapData, u64>,
    limits: Limits,
    geometry: Geometry,
    /// What `SG_GENERATION` holds now.
    generation: u32,
    /// The settings of the set in force.
    current: Settings,
    /// Policies written to each set, when known (not for sets found pinned).
    policy_counts: [Option<u32>; 2],
    /// The session maps are known to be empty (a new datapath before its first load).
    sessions_empty: bool,
    /// When `SG_GENERATION` last changed (see `SWITCH_GRACE`).
    switched_at: std::time::Instant,
}

/// Counter values summed over CPUs, indexed by slot (`agent_common::verdict`).
pub type Counters = Vec<u64>;

/// Where the maps come from: a freshly loaded object, or pins of an earlier agent.
pub(super) type MapSource<'a> = dyn FnMut(&'static str) -> Result<Map, DatapathError> + 'a;

fn typed<T: TryFrom<Map, Error = MapError>>(
    source: &mut MapSource<'_>,
    name: &'static str,
) -> Result<T, DatapathError> {
    T::try_from(source(name)?).map_err(|source| DatapathError::Map { map: name, source })
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

/// The generation after `g`; 0 is skipped (it marks empty destination-cache entries).
pub const fn next_generation(g: u32) -> u32 {
    match g.wrapping_add(1) {
        // u32::MAX is odd: the next set is set 0, and 0 itself is reserved.
        0 => 2,
        n => n,
    }
}

/// How long after a switch the set it left may be rewritten: far longer than any
/// packet's run of the program, which reads the generation once and finishes with the
/// set it read.
const SWITCH_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

impl Maps {
    pub(super) fn open(source: &mut MapSource<'_>, limits: &Limits) -> Result<Self, DatapathError> {
        let generation_map: Array<MapData, u32> = typed(source, names::GENERATION)?;
        let settings: Array<MapData, Settings> = typed(source, names::SETTINGS)?;
        let generation = generation_map
            .get(&0, 0)
            .map_err(map_err(names::GENERATION))?;
        let current = settings
            .get(&config_set(generation), 0)
            .map_err(map_err(names::SETTINGS))?;
        Ok(Self {
            generation_map,
            settings,
            dest_v4: [
                typed(source, names::DEST_V4[0])?,
                typed(source, names::DEST_V4[1])?,
            ],
            dest_v6: [
                typed(source, names::DEST_V6[0])?,
                typed(source, names::DEST_V6[1])?,
            ],
            port_rules: typed(source, names::PORT_RULES)?,
            policies: typed(source, names::POLICIES)?,
            sessions_v4: typed(source, names::SESSIONS_V4)?,
            sessions_v6: typed(source, names::SESSIONS_V6)?,
            session_table_v4: typed(source, names::SESSION_TABLE_V4)?,
            session_table_v6: typed(source, names::SESSION_TABLE_V6)?,
            flows_v4: typed(source, names::FLOWS_V4)?,
            flows_v6: typed(source, names::FLOWS_V6)?,
            counters: typed(source, names::COUNTERS)?,
            policy_drops: typed(source, names::POLICY_DROPS)?,
            limits: *limits,
            geometry: Geometry::of(limits),
            generation,
            current,
            policy_counts: [None, None],
            // Generation 0: never configured, so never given sessions either.
            sessions_empty: generation == 0,
            // Unknown for adopted pins: assume just now.
            switched_at: std::time::Instant::now(),
        })
    }

    pub(super) fn open_events(
        source: &mut MapSource<'_>,
    ) -> Result<RingBuf<MapData>, DatapathError> {
        typed(source, names::EVENTS)
    }

    /// The configuration generation in force; 0 before the first `apply`.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// `SG_SETTINGS` of the set in force.
    pub fn current_settings(&self) -> Settings {
        self.current
    }

    /// Overwrites the settings of the set in force as given (benchmarks set values no
    /// config can); the table geometry is always the loaded one.
    pub fn write_raw_settings(&mut self, mut settings: Settings) -> Result<(), DatapathError> {
        self.geometry.apply(&mut settings);
        self.settings
            .set(config_set(self.generation), settings, 0)
            .map_err(map_err(names::SETTINGS))?;
        self.current = settings;
        Ok(())
    }

    /// Puts a configuration in force atomically: writes its settings and compiled
    /// policy table into the set not in force, then switches `SG_GENERATION` to it, a
    /// single value the program reads once per packet. The overwritten set's per-policy
    /// refusal counts restart from zero (`outgoing_policy_drops` reads them first).
    pub fn apply(
        &mut self,
        mut settings: Settings,
        table: &PolicyTable,
    ) -> Result<(), DatapathError> {
        self.settle()?;
        let next = next_generation(self.generation);
        let set = config_set(next);
        self.zero_policy_drops(set)?;
        self.clear_set(set)?;
        self.write_set(set, table)?;
        self.geometry.apply(&mut settings);
        self.settings
            .set(set, settings, 0)
            .map_err(map_err(names::SETTINGS))?;
        // The switch: from here on every new packet uses set `set`.
        self.generation_map
            .set(0, next, 0)
            .map_err(map_err(names::GENERATION))?;
        self.generation = next;
        self.switched_at = std::time::Instant::now();
        self.current = settings;
        self.policy_counts[set as usize] = Some(table.params.len() as u32);
        Ok(())
    }

    /// Before `apply`: the generation it will switch to, and the refusal counts of the
    /// first `count` policies of the set it will overwrite, final by then (no packet
    /// counts into a set not in force once the switch grace has passed).
    pub fn outgoing_policy_drops(
        &mut self,
        count: usize,
    ) -> Result<(u32, Vec<u64>), DatapathError> {
        self.settle()?;
        let next = next_generation(self.generation);
        Ok((next, self.set_policy_drops(config_set(next), count)?))
    }

    /// The kernel id of `SG_POLICY_DROPS`: which datapath counted.
    pub fn policy_drops_map_id(&self) -> Result<u32, DatapathError> {
        Ok(self
            .policy_drops
            .map()
            .info()
            .map_err(map_err(names::POLICY_DROPS))?
            .id())
    }

    /// Makes sure this agent alone writes the sets, and that the set not in force is
    /// no longer read by any packet.
    fn settle(&mut self) -> Result<(), DatapathError> {
        // Another agent on the same pins would have moved the generation on: writing
        // "our" inactive set would then overwrite the set in force.
        let in_force = self
            .generation_map
            .get(&0, 0)
            .map_err(map_err(names::GENERATION))?;
        if in_force != self.generation {
            return Err(DatapathError::Incomplete {
                dir: std::path::PathBuf::from("(pinned maps)"),
                what: format!(
                    "the configuration generation is {in_force}, not {} as this agent left it: another agent is using these pins",
                    self.generation
                ),
            });
        }
        if let Some(left) = SWITCH_GRACE.checked_sub(self.switched_at.elapsed()) {
            std::thread::sleep(left);
        }
        Ok(())
    }

    /// Zeroes a set's per-policy refusal counters.
    fn zero_policy_drops(&mut self, set: u32) -> Result<(), DatapathError> {
        let count = self.policy_counts[set as usize].unwrap_or(MAX_POLICIES);
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| DatapathError::Batch {
            map: names::POLICY_DROPS,
            source,
        })?;
        for policy in 0..count {
            let slot = policy_slot(set, policy);
            let n = sum(&self.policy_drops, slot).map_err(map_err(names::POLICY_DROPS))?;
            if n != 0 {
                self.policy_drops
                    .set(
                        slot,
                        PerCpuValues::try_from(vec![0u64; cpus]).expect("one per CPU"),
                        0,
                    )
                    .map_err(map_err(names::POLICY_DROPS))?;
            }
        }
        Ok(())
    }

    /// Empties a set's destination tables and port rules (its policies and settings
    /// are simply overwritten).
    fn clear_set(&mut self, set: u32) -> Result<(), DatapathError> {
        let i = set as usize;
        let keys4: Vec<_> = self.dest_v4[i]
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(names::DEST_V4[i]))?;
        for key in keys4 {
            ignore_missing(self.dest_v4[i].remove(&key)).map_err(map_err(names::DEST_V4[i]))?;
        }
        let keys6: Vec<_> = self.dest_v6[i]
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(names::DEST_V6[i]))?;
        for key in keys6 {
            ignore_missing(self.dest_v6[i].remove(&key)).map_err(map_err(names::DEST_V6[i]))?;
        }
        let rules: Vec<PortRuleKey> = self
            .port_rules
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(names::PORT_RULES))?
            .into_iter()
            .filter(|k| port_table_set(k.port_table) == set)
            .collect();
        for key in rules {
            ignore_missing(self.port_rules.remove(&key)).map_err(map_err(names::PORT_RULES))?;
        }
        Ok(())
    }

    /// Writes a compiled policy table into a set's (empty) maps.
    fn write_set(&mut self, set: u32, table: &PolicyTable) -> Result<(), DatapathError> {
        let i = set as usize;
        let port_table = |id: u32| match (id, set) {
            (0, _) | (_, 0) => id,
            _ => id | PORT_TABLE_SET_BIT,
        };
        for (index, params) in table.params.iter().enumerate() {
            self.policies
                .set(policy_slot(set, index as u32), params, 0)
                .map_err(map_err(names::POLICIES))?;
        }
        for (key, policy) in &table.port_rules {
            let key = PortRuleKey {
                port_table: port_table(key.port_table),
                ..*key
            };
            self.port_rules
                .insert(key, policy, 0)
                .map_err(map_err(names::PORT_RULES))?;
        }
        for (net, rule) in &table.dest {
            let rule = DestRule {
                port_table: port_table(rule.port_table),
                ..*rule
            };
            match net {
                IpNet::V4(n) => self.dest_v4[i]
                    .insert(
                        &Key::new(u32::from(n.prefix_len()), n.network().into()),
                        rule,
                        0,
                    )
                    .map_err(map_err(names::DEST_V4[i]))?,
                IpNet::V6(n) => self.dest_v6[i]
                    .insert(
                        &Key::new(u32::from(n.prefix_len()), n.network().into()),
                        rule,
                        0,
                    )
                    .map_err(map_err(names::DEST_V6[i]))?,
            }
        }
        Ok(())
    }

    /// Writes (or replaces) a device's session: the authoritative hash map first, then
    /// its copy in the session table, so a reader always finds one of them.
    pub fn set_session(&mut self, ip: IpAddr, session: Session) -> Result<(), DatapathError> {
        let result = match ip {
            IpAddr::V4(a) => self.sessions_v4.insert(Ip4::from(a), session, 0),
            IpAddr::V6(a) => self.sessions_v6.insert(Ip6::from(a), session, 0),
        };
        result.map_err(|source| match &source {
            MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                DatapathError::SessionsFull {
                    family: if ip.is_ipv4() { "IPv4" } else { "IPv6" },
                    limit: self.limits.max_sessions,
                }
            }
            _ => DatapathError::Map {
                map: session_map_name(ip),
                source,
            },
        })?;
        self.update_session_table(ip, Some(session.authenticated_at_ns))
    }

    /// Removes a device's session (absent is fine): the table copy first, then the
    /// hash map.
    pub fn remove_session(&mut self, ip: IpAddr) -> Result<(), DatapathError> {
        self.update_session_table(ip, None)?;
        let result = match ip {
            IpAddr::V4(a) => self.sessions_v4.remove(&Ip4::from(a)),
            IpAddr::V6(a) => self.sessions_v6.remove(&Ip6::from(a)),
        };
        match result {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DatapathError::Map {
                map: session_map_name(ip),
                source,
            }),
        }
    }

    /// Writes many sessions at once (start-up, bulk import, benchmarks): batched writes
    /// of the session-table buckets they fall in, then of the hash maps. Buckets are
    /// rebuilt from the sessions given plus the sessions already in them.
    pub fn load_sessions(&mut self, sessions: &[(IpAddr, Session)]) -> Result<(), DatapathError> {
        let mask = self.geometry.session_buckets - 1;
        let (mut keys4, mut values4, mut keys6, mut values6) = (vec![], vec![], vec![], vec![]);
        let mut buckets4: std::collections::HashMap<u32, SessionBucketV4> = Default::default();
        let mut buckets6: std::collections::HashMap<u32, SessionBucketV6> = Default::default();
        for (ip, session) in sessions {
            let at = Some(session.authenticated_at_ns);
            match ip {
                IpAddr::V4(a) => {
                    let addr = Ip4::from(*a);
                    keys4.push(addr);
                    values4.push(*session);
                    let index = bucket(addr.fold(), mask);
                    let b = buckets4.entry(index).or_insert_with(|| {
                        existing(&self.session_table_v4, index, self.sessions_empty)
                    });
                    place_session(&mut b.slots, &addr, at);
                }
                IpAddr::V6(a) => {
                    let addr = Ip6::from(*a);
                    keys6.push(addr);
                    values6.push(*session);
                    let index = bucket(addr.fold(), mask);
                    let b = buckets6.entry(index).or_insert_with(|| {
                        existing(&self.session_table_v6, index, self.sessions_empty)
                    });
                    place_session(&mut b.slots, &addr, at);
                }
            }
        }
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
        self.sessions_empty = false;
        // The session table first: the program looks there before the hash map, so a
        // renewed device's old (perhaps expired) copy must not outlive the batch.
        let (index4, bucket4): (Vec<u32>, Vec<SessionBucketV4>) = buckets4.into_iter().unzip();
        sys::update_batch(self.session_table_v4.map().fd().as_fd(), &index4, &bucket4).map_err(
            |source| DatapathError::Batch {
                map: names::SESSION_TABLE_V4,
                source,
            },
        )?;
        let (index6, bucket6): (Vec<u32>, Vec<SessionBucketV6>) = buckets6.into_iter().unzip();
        sys::update_batch(self.session_table_v6.map().fd().as_fd(), &index6, &bucket6).map_err(
            |source| DatapathError::Batch {
                map: names::SESSION_TABLE_V6,
                source,
            },
        )?;
        let limit = self.limits.max_sessions;
        sys::update_batch(self.sessions_v4.map().fd().as_fd(), &keys4, &values4)
            .map_err(full("IPv4", limit))?;
        sys::update_batch(self.sessions_v6.map().fd().as_fd(), &keys6, &values6)
            .map_err(full("IPv6", limit))?;
        Ok(())
    }

    /// Makes the kernel's sessions equal to `sessions` (an adopted datapath, whose maps
    /// may hold a change the journal never recorded): removes devices not listed, then
    /// writes every listed one. Every device listed has a session throughout.
    pub fn sync_sessions(
        &mut self,
        sessions: &[(IpAddr, Session)],
    ) -> Result<usize, DatapathError> {
        let listed: std::collections::HashSet<IpAddr> =
            sessions.iter().map(|(ip, _)| *ip).collect();
        let extra: Vec<IpAddr> = self
            .session_devices()?
            .into_iter()
            .filter(|ip| !listed.contains(ip))
            .collect();
        for ip in &extra {
            self.remove_session(*ip)?;
        }
        self.load_sessions(sessions)?;
        Ok(extra.len())
    }

    /// Places, refreshes (`Some`) or clears (`None`) a device's entry in the session
    /// table. A device whose bucket is full stays in the hash map only.
    fn update_session_table(&mut self, ip: IpAddr, at: Option<i64>) -> Result<(), DatapathError> {
        let mask = self.geometry.session_buckets - 1;
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

    /// Every counter slot, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        (0..counter::SLOTS)
            .map(|slot| sum(&self.counters, slot).map_err(map_err(names::COUNTERS)))
            .collect()
    }

    /// Refused new flows per policy index of the configuration in force (since it was
    /// applied), for its first `count` policies.
    pub fn policy_drops(&self, count: usize) -> Result<Vec<u64>, DatapathError> {
        self.set_policy_drops(config_set(self.generation), count)
    }

    /// Refused new flows per policy index of configuration set `set`, for its first
    /// `count` policies.
    pub fn set_policy_drops(&self, set: u32, count: usize) -> Result<Vec<u64>, DatapathError> {
        (0..count as u32)
            .map(|i| {
                sum(&self.policy_drops, policy_slot(set, i)).map_err(map_err(names::POLICY_DROPS))
            })
            .collect()
    }

    /// Devices with a session in the kernel (both families). Walks the hash maps.
    pub fn session_devices(&self) -> Result<Vec<IpAddr>, DatapathError> {
        let v4: Vec<Ip4> = self
            .sessions_v4
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(names::SESSIONS_V4))?;
        let v6: Vec<Ip6> = self
            .sessions_v6
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(names::SESSIONS_V6))?;
        Ok(v4
            .into_iter()
            .map(|a| IpAddr::V4(a.into()))
            .chain(v6.into_iter().map(|a| IpAddr::V6(a.into())))
            .collect())
    }

    /// Entries in use and capacity of each sized table, for metrics, from the counts of
    /// tracked flows (`flow_count`) and sessions per family, and the table in force.
    pub fn occupancy(
        &self,
        (flows4, flows6): (usize, usize),
        sessions: (usize, usize),
        table: &PolicyTable,
    ) -> Vec<(&'static str, usize, usize)> {
        let flow_capacity = self.geometry.flow_buckets as usize * WAYS;
        let prefixes4 = table
            .dest
            .iter()
            .filter(|(n, _)| n.addr().is_ipv4())
            .count();
        let limits = &self.limits;
        vec![
            ("sessions_v4", sessions.0, limits.max_sessions as usize),
            ("sessions_v6", sessions.1, limits.max_sessions as usize),
            (
                "policy_prefixes_v4",
                prefixes4,
                limits.max_policy_cidrs as usize,
            ),
            (
                "policy_prefixes_v6",
                table.dest.len() - prefixes4,
                limits.max_policy_cidrs as usize,
            ),
            (
                "port_rules",
                table.port_rules.len(),
                limits.max_port_rules as usize,
            ),
            ("udp_flows_v4", flows4, flow_capacity),
            ("udp_flows_v6", flows6, flow_capacity),
        ]
    }

    /// Adds tracked IPv4 UDP flows as the program would have admitted them at
    /// `last_seen_ns` (benchmarks fill the table with this). Flows whose bucket is
    /// full are left out, as the program would have evicted them.
    pub fn track_flows_v4(
        &mut self,
        flows: impl IntoIterator<Item = FlowKeyV4>,
        last_seen_ns: u64,
    ) -> Result<(), DatapathError> {
        let mask = self.geometry.flow_buckets - 1;
        let mut buckets: std::collections::HashMap<u32, FlowBucketV4> =
            std::collections::HashMap::new();
        for key in flows {
            let folded = <agent_common::maps::FlowSlotV4 as FlowSlot>::fold(&key);
            let b = buckets.entry(bucket(folded, mask)).or_default();
            if let Some(free) = b.slots.iter_mut().find(|s| s.check == 0) {
                *free = FlowSlot::new(&key, folded, last_seen_ns);
            }
        }
        for (index, b) in buckets {
            self.flows_v4
                .set(index, b, 0)
                .map_err(map_err(names::FLOWS_V4))?;
        }
        Ok(())
    }

    /// Copies the tracked UDP flows of another datapath of this layout (pinned in
    /// `flows_v4`/`flows_v6`, any size) into these flow tables, each into its bucket
    /// under this geometry; a bucket that overflows keeps its most recently seen flows.
    /// Returns how many flows were copied.
    pub fn copy_flows_from(
        &mut self,
        flows_v4: &Array<MapData, FlowBucketV4>,
        flows_v6: &Array<MapData, FlowBucketV6>,
    ) -> Result<usize, DatapathError> {
        let mask = self.geometry.flow_buckets - 1;
        let read_error = |map| move |source| DatapathError::Batch { map, source };
        let mut buckets4: std::collections::HashMap<u32, FlowBucketV4> = Default::default();
        sys::read_array(flows_v4.map().fd().as_fd(), |chunk: &[FlowBucketV4]| {
            for slot in chunk.iter().flat_map(|b| b.slots) {
                rehash(&mut buckets4, slot, mask, |b| &mut b.slots);
            }
        })
        .map_err(read_error(names::FLOWS_V4))?;
        let mut buckets6: std::collections::HashMap<u32, FlowBucketV6> = Default::default();
        sys::read_array(flows_v6.map().fd().as_fd(), |chunk: &[FlowBucketV6]| {
            for slot in chunk.iter().flat_map(|b| b.slots) {
                rehash(&mut buckets6, slot, mask, |b| &mut b.slots);
            }
        })
        .map_err(read_error(names::FLOWS_V6))?;
        let copied = buckets4
            .values()
            .map(|b| b.slots.iter().filter(|s| s.check != 0).count())
            .sum::<usize>()
            + buckets6
                .values()
                .map(|b| b.slots.iter().filter(|s| s.check != 0).count())
                .sum::<usize>();
        let (index4, values4): (Vec<u32>, Vec<FlowBucketV4>) = buckets4.into_iter().unzip();
        sys::update_batch(self.flows_v4.map().fd().as_fd(), &index4, &values4)
            .map_err(read_error(names::FLOWS_V4))?;
        let (index6, values6): (Vec<u32>, Vec<FlowBucketV6>) = buckets6.into_iter().unzip();
        sys::update_batch(self.flows_v6.map().fd().as_fd(), &index6, &values6)
            .map_err(read_error(names::FLOWS_V6))?;
        Ok(copied)
    }

    /// Tracked UDP flows (IPv4, IPv6) still active at boot-clock `now_ns`. Reads the
    /// flow tables with batched lookups: cheap enough for every metrics scrape.
    pub fn flow_count(&self, now_ns: u64) -> (usize, usize) {
        let idle = self.current.udp_idle_ns;
        let mut v4 = 0;
        let read4 = sys::read_array(self.flows_v4.map().fd().as_fd(), |b: &[FlowBucketV4]| {
            v4 += b
                .iter()
                .map(|b| active_flows(&b.slots, now_ns, idle))
                .sum::<usize>();
        });
        let mut v6 = 0;
        let read6 = sys::read_array(self.flows_v6.map().fd().as_fd(), |b: &[FlowBucketV6]| {
            v6 += b
                .iter()
                .map(|b| active_flows(&b.slots, now_ns, idle))
                .sum::<usize>();
        });
        if let Err(e) = read4.and(read6) {
            tracing::warn!(error = %e, "cannot read the flow tables; flow counts are partial");
        }
        (v4, v6)
    }
}

/// A session-table bucket as the kernel holds it (empty when the table is known empty
/// or unreadable: the hash map stays authoritative either way).
fn existing<B: aya::Pod + Default>(table: &Array<MapData, B>, index: u32, empty: bool) -> B {
    if empty {
        return B::default();
    }
    table.get(&index, 0).unwrap_or_default()
}

/// Puts a flow slot (if in use) into its bucket under `mask`, replacing the least
/// recently seen slot when the bucket is full.
fn rehash<B: Default, S: FlowSlot>(
    buckets: &mut std::collections::HashMap<u32, B>,
    slot: S,
    mask: u32,
    slots: impl Fn(&mut B) -> &mut [S; WAYS],
) {
    if slot.check() == 0 {
        return;
    }
    let index = bucket(S::fold(slot.key()), mask);
    let ways = slots(buckets.entry(index).or_default());
    let target = ways.iter().position(|s| s.check() == 0).or_else(|| {
        let (oldest, s) = ways
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.last_seen_ns())?;
        (s.last_seen_ns() < slot.last_seen_ns()).then_some(oldest)
    });
    if let Some(i) = target {
        ways[i] = slot;
    }
}

fn active_flows<S: FlowSlot>(slots: &[S], now_ns: u64, idle_ns: u64) -> usize {
    slots
        .iter()
        .filter(|s| s.check() != 0 && flow_active(now_ns, s.last_seen_ns(), idle_ns))
        .count()
}

/// Puts `at` (or, with `None`, nothing) in `addr`'s slot of a session-table bucket;
/// returns whether the bucket changed. A new device takes a free slot if there is one.
fn place_session<S: SessionSlot + Default>(
    slots: &mut [S; WAYS],
    addr: &S::Addr,
    at: Option<i64>,
) -> bool {
    let own = slots.iter().position(|s| s.is_valid() && s.addr() == addr);
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

/// `SG_SETTINGS` for a config.
pub fn settings(config: &Config) -> Settings {
    let mut settings = Settings::zeroed();
    settings.udp_idle_ns = config.agent.udp_idle_timeout.as_nanos_u64();
    settings.unknown_device = match config.agent.unknown_device {
        UnknownDevice::Enforce => UNKNOWN_DEVICE_ENFORCE,
        UnknownDevice::Allow => UNKNOWN_DEVICE_ALLOW,
    };
    for &port in &config.dns.ports {
        settings.set_dns_port(port);
    }
    let replies = config.agent.replies;
    settings.reply_interval_ns = 1_000_000_000 / u64::from(replies.rate.max(1));
    settings.reply_tolerance_ns = reply_tolerance(settings.reply_interval_ns, replies.burst);
    if let Some(portal) = config.agent.portal_listen {
        settings.portal_port = portal.port();
        // The TC program looks the listener up by this address; a `[::]` listener
        // takes IPv4 too.
        match portal.ip() {
            IpAddr::V4(v4) => settings.portal_v4 = Ip4::from_octets(v4.octets()),
            IpAddr::V6(v6) => {
                settings.portal_v6 = Ip6::from_octets(v6.octets());
                if let Some(v4) = v6.to_ipv4_mapped() {
                    settings.portal_v4 = Ip4::from_octets(v4.octets());
                }
            }
        }
        let redirecting = config
            .policies
            .iter()
            .filter(|p| p.on_expired == OnExpired::Redirect);
        for port in redirecting.flat_map(|p| &p.redirect_ports) {
            add_port(&mut settings.redirect_ports, *port);
        }
    }
    Geometry::of(&config.limits).apply(&mut settings);
    settings
}

/// The set a port-table id belongs to.
const fn port_table_set(id: u32) -> u32 {
    (id & PORT_TABLE_SET_BIT != 0) as u32
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

fn sum(map: &PerCpuArray<MapData, u64>, slot: u32) -> Result<u64, MapError> {
    Ok(map.get(&slot, 0)?.iter().sum())
}

const fn session_map_name(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => names::SESSIONS_V4,
        IpAddr::V6(_) => names::SESSIONS_V6,
    }
}
