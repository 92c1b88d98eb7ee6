//! Typed handles on the program's maps (layouts in `agent_common::maps`) and the
//! agent's writes to them: the two configuration sets, counters and flow tables. The
//! session maps have their own owner (`sessions.rs`).

mod flows;

use std::os::fd::AsFd;

use agent_common::{
    addr::{Ip4, Ip6},
    logic::bit_slot,
    maps::{
        DestRule, FlowBucketV4, FlowBucketV6, IdentityAnswer, MAX_POLICIES, PORT_TABLE_SET_BIT,
        PolicyParams, PortRuleKey, Settings, WAYS, config_set, names, policy_slot,
    },
    verdict::counter,
};
use aya::maps::{
    Array, HashMap, IterableMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues,
    RingBuf, lpm_trie::Key,
};
use ipnet::IpNet;

use super::{DatapathError, Geometry};
use crate::{config::Limits, policy::PolicyTable};

pub struct Maps {
    generation_map: Array<MapData, u32>,
    settings: Array<MapData, Settings>,
    dest_v4: [LpmTrie<MapData, Ip4, DestRule>; 2],
    dest_v6: [LpmTrie<MapData, Ip6, DestRule>; 2],
    port_rules: HashMap<MapData, PortRuleKey, u32>,
    policies: Array<MapData, PolicyParams>,
    identity_answers: [Array<MapData, IdentityAnswer>; 2],
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
    /// When `SG_GENERATION` last changed (see `SWITCH_GRACE`).
    switched_at: std::time::Instant,
}

/// Counter values summed over CPUs, indexed by slot (`agent_common::verdict`).
pub type Counters = Vec<u64>;

/// Where the maps come from: a freshly loaded object, or pins of an earlier agent.
pub(super) type MapSource<'a> = dyn FnMut(&'static str) -> Result<Map, DatapathError> + 'a;

pub(super) fn typed<T: TryFrom<Map, Error = MapError>>(
    source: &mut MapSource<'_>,
    name: &'static str,
) -> Result<T, DatapathError> {
    T::try_from(source(name)?).map_err(|source| DatapathError::Map { map: name, source })
}

pub(super) fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DatapathError {
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
            identity_answers: [
                typed(source, names::IDENTITY_ANSWERS[0])?,
                typed(source, names::IDENTITY_ANSWERS[1])?,
            ],
            flows_v4: typed(source, names::FLOWS_V4)?,
            flows_v6: typed(source, names::FLOWS_V6)?,
            counters: typed(source, names::COUNTERS)?,
            policy_drops: typed(source, names::POLICY_DROPS)?,
            limits: *limits,
            geometry: Geometry::of(limits),
            generation,
            current,
            policy_counts: [None, None],
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
    #[cfg(feature = "bench")]
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
        for (bit, &policy) in table.identity_policies.iter().enumerate() {
            settings.identity_policies[bit_slot(1 << bit)] = policy;
        }
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
        let answers = &table.identity_answers;
        let indices: Vec<u32> = (0..answers.len() as u32).collect();
        super::sys::update_batch(
            self.identity_answers[i].map().fd().as_fd(),
            &indices,
            answers,
        )
        .map_err(|source| DatapathError::Batch {
            map: names::IDENTITY_ANSWERS[i],
            source,
        })?;
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
