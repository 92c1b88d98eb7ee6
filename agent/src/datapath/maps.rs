//! Typed handles on the program's maps (layouts in `agent_common::maps`) and the
//! agent's writes to them.

use std::net::IpAddr;

use agent_common::{
    addr::{Ip4, Ip6},
    hashing::bucket,
    logic::flow_active,
    maps::{
        DestRule, FlowBucketV4, FlowBucketV6, FlowKeyV4, PolicyParams, PortRuleKey, Session,
        SessionBucketV4, SessionBucketV6, Settings, UNKNOWN_DEVICE_ALLOW, UNKNOWN_DEVICE_ENFORCE,
        WAYS, names,
    },
    tables::{FlowSlot, SessionSlot},
    verdict::counter,
};
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, RingBuf, lpm_trie::Key},
};
use bytemuck::Zeroable;
use ipnet::IpNet;

use std::os::fd::AsFd;

use aya::maps::IterableMap;

use super::{DatapathError, Geometry, batch};
use crate::{
    config::{Config, Limits, UnknownDevice},
    policy::PolicyTable,
};

pub struct Maps {
    settings: Array<MapData, Settings>,
    dest_v4: LpmTrie<MapData, Ip4, DestRule>,
    dest_v6: LpmTrie<MapData, Ip6, DestRule>,
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
    max_sessions: u32,
    geometry: Geometry,
    /// What `SG_SETTINGS` holds now.
    current: Settings,
}

/// Counter values summed over CPUs, indexed by slot (`agent_common::verdict`).
pub type Counters = Vec<u64>;

fn take(ebpf: &mut Ebpf, name: &'static str) -> Map {
    ebpf.take_map(name)
        .unwrap_or_else(|| panic!("the program object defines map {name}"))
}

fn typed<T: TryFrom<Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, DatapathError> {
    T::try_from(take(ebpf, name)).map_err(|source| DatapathError::Map { map: name, source })
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

impl Maps {
    pub(super) fn take(ebpf: &mut Ebpf, limits: &Limits) -> Result<Self, DatapathError> {
        Ok(Self {
            settings: typed(ebpf, names::SETTINGS)?,
            dest_v4: typed(ebpf, names::DEST_V4)?,
            dest_v6: typed(ebpf, names::DEST_V6)?,
            port_rules: typed(ebpf, names::PORT_RULES)?,
            policies: typed(ebpf, names::POLICIES)?,
            sessions_v4: typed(ebpf, names::SESSIONS_V4)?,
            sessions_v6: typed(ebpf, names::SESSIONS_V6)?,
            session_table_v4: typed(ebpf, names::SESSION_TABLE_V4)?,
            session_table_v6: typed(ebpf, names::SESSION_TABLE_V6)?,
            flows_v4: typed(ebpf, names::FLOWS_V4)?,
            flows_v6: typed(ebpf, names::FLOWS_V6)?,
            counters: typed(ebpf, names::COUNTERS)?,
            policy_drops: typed(ebpf, names::POLICY_DROPS)?,
            max_sessions: limits.max_sessions,
            geometry: Geometry::of(limits),
            current: Settings::zeroed(),
        })
    }

    pub(super) fn take_events(
        &mut self,
        ebpf: &mut Ebpf,
    ) -> Result<RingBuf<MapData>, DatapathError> {
        typed(ebpf, names::EVENTS)
    }

    /// Writes `SG_SETTINGS` from the config (keeping the policy generation).
    pub fn write_settings(&mut self, config: &Config) -> Result<(), DatapathError> {
        let mut next = settings(config);
        next.policy_generation = self.current.policy_generation.max(1);
        self.write_raw_settings(next)
    }

    /// `SG_SETTINGS` as written last.
    pub fn current_settings(&self) -> Settings {
        self.current
    }

    /// Writes `SG_SETTINGS` as given (benchmarks set values no config can); the table
    /// geometry is always the loaded one.
    pub fn write_raw_settings(&mut self, mut settings: Settings) -> Result<(), DatapathError> {
        self.geometry.apply(&mut settings);
        self.settings
            .set(0, settings, 0)
            .map_err(map_err(names::SETTINGS))?;
        self.current = settings;
        Ok(())
    }

    /// Writes a compiled policy table into empty policy maps.
    pub fn write_policies(&mut self, table: &PolicyTable) -> Result<(), DatapathError> {
        for (index, params) in table.params.iter().enumerate() {
            self.policies
                .set(index as u32, params, 0)
                .map_err(map_err(names::POLICIES))?;
        }
        for (key, policy) in &table.port_rules {
            self.port_rules
                .insert(key, policy, 0)
                .map_err(map_err(names::PORT_RULES))?;
        }
        for (net, rule) in &table.dest {
            match net {
                IpNet::V4(n) => self
                    .dest_v4
                    .insert(
                        &Key::new(u32::from(n.prefix_len()), n.network().into()),
                        rule,
                        0,
                    )
                    .map_err(map_err(names::DEST_V4))?,
                IpNet::V6(n) => self
                    .dest_v6
                    .insert(
                        &Key::new(u32::from(n.prefix_len()), n.network().into()),
                        rule,
                        0,
                    )
                    .map_err(map_err(names::DEST_V6))?,
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
                    limit: self.max_sessions,
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

    /// Loads many sessions into empty session maps at once (start-up, benchmarks):
    /// batched writes of the hash maps, then of every session-table bucket they fill.
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
                    let b = buckets4.entry(bucket(addr.fold(), mask)).or_default();
                    place_session(&mut b.slots, &addr, at);
                }
                IpAddr::V6(a) => {
                    let addr = Ip6::from(*a);
                    keys6.push(addr);
                    values6.push(*session);
                    let b = buckets6.entry(bucket(addr.fold(), mask)).or_default();
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
        let limit = self.max_sessions;
        batch::update(self.sessions_v4.map().fd().as_fd(), &keys4, &values4)
            .map_err(full("IPv4", limit))?;
        batch::update(self.sessions_v6.map().fd().as_fd(), &keys6, &values6)
            .map_err(full("IPv6", limit))?;
        let (index4, bucket4): (Vec<u32>, Vec<SessionBucketV4>) = buckets4.into_iter().unzip();
        batch::update(self.session_table_v4.map().fd().as_fd(), &index4, &bucket4).map_err(
            |source| DatapathError::Batch {
                map: names::SESSION_TABLE_V4,
                source,
            },
        )?;
        let (index6, bucket6): (Vec<u32>, Vec<SessionBucketV6>) = buckets6.into_iter().unzip();
        batch::update(self.session_table_v6.map().fd().as_fd(), &index6, &bucket6).map_err(
            |source| DatapathError::Batch {
                map: names::SESSION_TABLE_V6,
                source,
            },
        )?;
        Ok(())
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

    /// Refused new flows per policy index, for the first `count` policies.
    pub fn policy_drops(&self, count: usize) -> Result<Vec<u64>, DatapathError> {
        (0..count as u32)
            .map(|i| sum(&self.policy_drops, i).map_err(map_err(names::POLICY_DROPS)))
            .collect()
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

    /// Tracked UDP flows (IPv4, IPv6) still active at boot-clock `now_ns`. Walks the
    /// tables: for status, not hot paths.
    pub fn flow_count(&self, now_ns: u64) -> (usize, usize) {
        let idle = self.current.udp_idle_ns;
        let v4 = self
            .flows_v4
            .iter()
            .filter_map(Result::ok)
            .map(|b| active_flows(&b.slots, now_ns, idle))
            .sum();
        let v6 = self
            .flows_v6
            .iter()
            .filter_map(Result::ok)
            .map(|b| active_flows(&b.slots, now_ns, idle))
            .sum();
        (v4, v6)
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
    Geometry::of(&config.limits).apply(&mut settings);
    settings
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
