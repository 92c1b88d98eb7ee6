//! Typed handles on the program's maps (layouts in `agent_common::maps`) and the
//! agent's writes to them.

use std::net::IpAddr;

use agent_common::{
    maps::{
        DestRule, FlowKeyV4, FlowKeyV6, FlowState, PolicyParams, PortRuleKey, Session, Settings,
        UNKNOWN_DEVICE_ALLOW, UNKNOWN_DEVICE_ENFORCE, names,
    },
    verdict::counter,
};
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, RingBuf, lpm_trie::Key},
};
use bytemuck::Zeroable;
use ipnet::IpNet;

use super::DatapathError;
use crate::{
    config::{Config, Limits, UnknownDevice},
    policy::PolicyTable,
};

pub struct Maps {
    settings: Array<MapData, Settings>,
    dest_v4: LpmTrie<MapData, [u8; 4], DestRule>,
    dest_v6: LpmTrie<MapData, [u8; 16], DestRule>,
    port_rules: HashMap<MapData, PortRuleKey, u32>,
    policies: Array<MapData, PolicyParams>,
    sessions_v4: HashMap<MapData, [u8; 4], Session>,
    sessions_v6: HashMap<MapData, [u8; 16], Session>,
    flows_v4: HashMap<MapData, FlowKeyV4, FlowState>,
    flows_v6: HashMap<MapData, FlowKeyV6, FlowState>,
    counters: PerCpuArray<MapData, u64>,
    policy_drops: PerCpuArray<MapData, u64>,
    max_sessions: u32,
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
            flows_v4: typed(ebpf, names::FLOWS_V4)?,
            flows_v6: typed(ebpf, names::FLOWS_V6)?,
            counters: typed(ebpf, names::COUNTERS)?,
            policy_drops: typed(ebpf, names::POLICY_DROPS)?,
            max_sessions: limits.max_sessions,
        })
    }

    pub(super) fn take_events(
        &mut self,
        ebpf: &mut Ebpf,
    ) -> Result<RingBuf<MapData>, DatapathError> {
        typed(ebpf, names::EVENTS)
    }

    /// Writes `SG_SETTINGS` from the config.
    pub fn write_settings(&mut self, config: &Config) -> Result<(), DatapathError> {
        let mut settings = Settings::zeroed();
        settings.udp_idle_ns = config.agent.udp_idle_timeout.as_nanos_u64();
        settings.unknown_device = match config.agent.unknown_device {
            UnknownDevice::Enforce => UNKNOWN_DEVICE_ENFORCE,
            UnknownDevice::Allow => UNKNOWN_DEVICE_ALLOW,
        };
        for &port in &config.dns.ports {
            settings.set_dns_port(port);
        }
        self.settings
            .set(0, settings, 0)
            .map_err(map_err(names::SETTINGS))
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
                        &Key::new(u32::from(n.prefix_len()), n.network().octets()),
                        rule,
                        0,
                    )
                    .map_err(map_err(names::DEST_V4))?,
                IpNet::V6(n) => self
                    .dest_v6
                    .insert(
                        &Key::new(u32::from(n.prefix_len()), n.network().octets()),
                        rule,
                        0,
                    )
                    .map_err(map_err(names::DEST_V6))?,
            }
        }
        Ok(())
    }

    /// Writes (or replaces) a device's session.
    pub fn set_session(&mut self, ip: IpAddr, session: Session) -> Result<(), DatapathError> {
        let result = match ip {
            IpAddr::V4(a) => self.sessions_v4.insert(a.octets(), session, 0),
            IpAddr::V6(a) => self.sessions_v6.insert(a.octets(), session, 0),
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

    /// Removes a device's session; absent is fine.
    pub fn remove_session(&mut self, ip: IpAddr) -> Result<(), DatapathError> {
        let result = match ip {
            IpAddr::V4(a) => self.sessions_v4.remove(&a.octets()),
            IpAddr::V6(a) => self.sessions_v6.remove(&a.octets()),
        };
        match result {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DatapathError::Map {
                map: session_map_name(ip),
                source,
            }),
        }
    }

    /// The kernel's session for a device, if any.
    pub fn session(&self, ip: IpAddr) -> Result<Option<Session>, DatapathError> {
        let result = match ip {
            IpAddr::V4(a) => self.sessions_v4.get(&a.octets(), 0),
            IpAddr::V6(a) => self.sessions_v6.get(&a.octets(), 0),
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

    /// Tracked UDP flows (IPv4, IPv6). Walks the tables: for status, not hot paths.
    pub fn flow_count(&self) -> (usize, usize) {
        (self.flows_v4.keys().count(), self.flows_v6.keys().count())
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
