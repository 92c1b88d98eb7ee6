//! Policy compilation: from the config's precedence-ordered, possibly overlapping
//! policies to the tables the kernel reads, so that one longest-prefix match on the
//! destination (plus, where policies name ports, one hash lookup) gives the same
//! answer as first-match-by-precedence over the whole policy list.
//!
//! Why this is exact: every policy CIDR that contains an address is an ancestor (or
//! equal) of the longest policy CIDR `P` that contains it, so the policies that can
//! match the address are exactly those owning `P` or one of its ancestors. For each
//! distinct `P` we keep that list in precedence order and precompute its first match
//! per protocol: for each port some policy in the list names explicitly, and for all
//! other ports (which only port-less policies can match).
//!
//! Identity: a policy with an identity condition matches only some devices, so a first
//! match that meets such policies before the first unconditional one depends on who the
//! device is. Each identity-conditioned policy gets one bit (in precedence order), each
//! device a mask of the bits whose conditions its identity satisfies (`identity_mask`),
//! and such an answer becomes an `IdentityAnswer`: the bits met on the way and the
//! unconditional match. The device's first match is the policy of the lowest bit both
//! masks share, else the unconditional one: the scan's result, in constant time.

mod lint;
mod settings;
mod table;

use std::collections::{BTreeSet, HashMap};

use agent_common::maps::{
    ACTION_DROP, ACTION_REDIRECT, ACTION_REJECT, BYPASS_POLICY, DestRule, IDENTITY_ANSWER,
    IdentityAnswer, MAX_REDIRECT_PORTS, NO_POLICY, POLICY_ENFORCE, PolicyParams, PortRuleKey,
    identity_answer_index,
};
use ipnet::IpNet;
use thiserror::Error;

use crate::config::{CheckSession, Config, Identity, IdentityCondition, OnExpired, Protocol};

pub use lint::{Warning, lint};
pub use settings::settings;
pub use table::describe;

/// The compiled tables, ready to be written to the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyTable {
    /// `SG_DEST_V4` / `SG_DEST_V6` entries, one per distinct prefix.
    pub dest: Vec<(IpNet, DestRule)>,
    /// `SG_PORT_RULES` entries.
    pub port_rules: Vec<(PortRuleKey, u32)>,
    /// `SG_POLICIES`, indexed by the policy's position in the config.
    pub params: Vec<PolicyParams>,
    /// Per policy: whether some packet can reach it (it is not completely shadowed by
    /// policies of higher precedence or bypass destinations) for some identity.
    pub reachable: Vec<bool>,
    /// The identity-conditioned policies in precedence order: bit `i` of identity masks
    /// is policy `identity_policies[i]`.
    pub identity_policies: Vec<u32>,
    /// The answers that depend on identity (`IDENTITY_ANSWER | index`).
    pub identity_answers: Vec<IdentityAnswer>,
}

impl PolicyTable {
    /// The policy an answer gives a device with this identity mask.
    pub fn resolve(&self, answer: u32, device_mask: u64) -> u32 {
        let Some(index) = identity_answer_index(answer) else {
            return answer;
        };
        let entry = &self.identity_answers[index as usize];
        let hit = entry.mask & device_mask;
        if hit == 0 {
            return entry.default;
        }
        self.identity_policies[hit.trailing_zeros() as usize]
    }
}

/// The conditions of `table.identity_policies`, in bit order: what devices' identity
/// masks are computed from (`config::identity::mask_of`).
pub fn identity_conditions(config: &Config, table: &PolicyTable) -> Vec<IdentityCondition> {
    table
        .identity_policies
        .iter()
        .filter_map(|&p| config.policies[p as usize].identity.clone())
        .collect()
}

/// The identity mask of a device: bit `i` set when its identity satisfies the condition
/// of `table.identity_policies[i]`. A device without a session has mask 0.
pub fn identity_mask(config: &Config, table: &PolicyTable, who: &Identity<'_>) -> u64 {
    crate::config::identity::mask_of(&identity_conditions(config, table), who)
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CompileError {
    #[error(
        "the policies need {needed} {family} prefixes but [limits] max_policy_cidrs is {limit}; raise it"
    )]
    TooManyPrefixes {
        family: &'static str,
        needed: usize,
        limit: u32,
    },
    #[error(
        "the policies need {needed} port rules but [limits] max_port_rules is {limit}; raise it"
    )]
    TooManyPortRules { needed: usize, limit: u32 },
}

/// Something that can match a packet, in evaluation order: the bypass destinations
/// first, then the policies by precedence.
struct Candidate<'a> {
    /// Policy index, or `BYPASS_POLICY`.
    index: u32,
    protocol: Option<Protocol>,
    ports: Option<&'a [u16]>,
    /// With an identity condition: it, and the policy's bit in identity masks.
    identity: Option<(&'a IdentityCondition, u32)>,
}

impl Candidate<'_> {
    fn matches(&self, proto: Protocol, port: Option<u16>) -> bool {
        self.protocol.is_none_or(|p| p == proto)
            && match (self.ports, port) {
                (None, _) => true,
                (Some(ports), Some(port)) => ports.contains(&port),
                (Some(_), None) => false,
            }
    }
}

/// Compiles the config's bypass destinations and policies.
pub fn compile(config: &Config) -> Result<PolicyTable, CompileError> {
    let candidates = Candidates::in_evaluation_order(config);
    let prefixes = candidates.prefixes();
    let nonempty = table::regions_nonempty(&prefixes);

    let mut table = PolicyTable {
        reachable: vec![false; config.policies.len()],
        identity_policies: candidates.identity_policies.clone(),
        ..PolicyTable::default()
    };
    let mut port_tables = PortTables::default();
    let mut answers = IdentityAnswers::default();
    for (prefix, region_nonempty) in prefixes.iter().zip(nonempty) {
        // The candidates that can match an address whose longest policy CIDR is `prefix`.
        let ranks = matching_ranks(prefix, &candidates.owners);
        let list: Vec<&Candidate<'_>> = ranks.iter().map(|&r| &candidates.list[r]).collect();
        let matches = FirstMatches::of(&list, &mut answers);
        if region_nonempty {
            for &answer in &matches.reached {
                mark_reachable(&mut table.reachable, answer);
            }
        }
        let port_table = if matches.by_port.is_empty() {
            0
        } else {
            port_tables.id(ranks, &matches.by_port, &mut table.port_rules)
        };
        let rule = DestRule {
            port_table,
            tcp: matches.tcp,
            udp: matches.udp,
            unreadable: strictest(config, matches.reached),
        };
        table.dest.push((*prefix, rule));
    }

    table.params = config.policies.iter().map(params).collect();
    table.identity_answers = answers.list;
    check_capacity(config, &table)?;
    Ok(table)
}

/// The candidates in evaluation order, and for each CIDR some candidate names, the
/// ranks (positions in that order) of the candidates owning it.
struct Candidates<'a> {
    list: Vec<Candidate<'a>>,
    owners: HashMap<IpNet, Vec<usize>>,
    /// The identity-conditioned policies in precedence order (their bits).
    identity_policies: Vec<u32>,
}

impl<'a> Candidates<'a> {
    fn in_evaluation_order(config: &'a Config) -> Self {
        let mut order: Vec<usize> = (0..config.policies.len()).collect();
        order.sort_by_key(|&i| config.policies[i].precedence);

        let mut list = Vec::with_capacity(order.len() + 1);
        let mut owners: HashMap<IpNet, Vec<usize>> = HashMap::new();
        if !config.bypass.is_empty() {
            for net in &config.bypass {
                owners.entry(*net).or_default().push(list.len());
            }
            list.push(Candidate {
                index: BYPASS_POLICY,
                protocol: None,
                ports: None,
                identity: None,
            });
        }
        let mut identity_policies = Vec::new();
        for &i in &order {
            let policy = &config.policies[i];
            for net in &policy.destinations {
                owners.entry(*net).or_default().push(list.len());
            }
            let identity = policy.identity.as_ref().map(|condition| {
                identity_policies.push(i as u32);
                (condition, identity_policies.len() as u32 - 1)
            });
            list.push(Candidate {
                index: i as u32,
                protocol: policy.protocol,
                ports: policy.ports.as_deref(),
                identity,
            });
        }
        Self {
            list,
            owners,
            identity_policies,
        }
    }

    /// Every distinct CIDR, sorted: one kernel table entry each.
    fn prefixes(&self) -> Vec<IpNet> {
        let mut prefixes: Vec<IpNet> = self.owners.keys().copied().collect();
        prefixes.sort();
        prefixes
    }
}

/// The first match per protocol among the candidates that can match an address under
/// one prefix.
struct FirstMatches {
    /// For the ports no candidate names.
    tcp: u32,
    udp: u32,
    /// (port, protocol, policy) for each named port whose first match differs from the
    /// one for other ports: the port table's entries.
    by_port: Vec<(u16, Protocol, u32)>,
    /// Every answer some packet to the prefix gets.
    reached: Vec<u32>,
}

impl FirstMatches {
    /// `list` in evaluation order.
    fn of(list: &[&Candidate<'_>], answers: &mut IdentityAnswers) -> Self {
        let mut reached = Vec::new();
        let mut first = |proto: Protocol, port: Option<u16>| {
            let (answer, policies) = first_match(list, proto, port);
            reached.extend(policies);
            answers.encode(answer)
        };
        let tcp = first(Protocol::Tcp, None);
        let udp = first(Protocol::Udp, None);
        let named_ports: BTreeSet<u16> = list
            .iter()
            .filter_map(|c| c.ports)
            .flatten()
            .copied()
            .collect();
        let mut by_port = Vec::new();
        for port in named_ports {
            for (proto, default) in [(Protocol::Tcp, tcp), (Protocol::Udp, udp)] {
                let answer = first(proto, Some(port));
                if answer != default {
                    by_port.push((port, proto, answer));
                }
            }
        }
        Self {
            tcp,
            udp,
            by_port,
            reached,
        }
    }
}

/// The first match of a packet among `list` (in evaluation order) as an identity
/// answer (mask 0 when no identity-conditioned policy comes first), and every policy it
/// can give some device. A conditioned policy whose very condition an earlier one in
/// the answer has already can never be the match: it is left out.
fn first_match(
    list: &[&Candidate<'_>],
    proto: Protocol,
    port: Option<u16>,
) -> (IdentityAnswer, Vec<u32>) {
    let mut answer = IdentityAnswer::default();
    let mut policies = Vec::new();
    let mut conditions: Vec<&IdentityCondition> = Vec::new();
    for candidate in list.iter().filter(|c| c.matches(proto, port)) {
        match candidate.identity {
            Some((condition, bit)) => {
                if !conditions.contains(&condition) {
                    conditions.push(condition);
                    answer.mask |= 1 << bit;
                    policies.push(candidate.index);
                }
            }
            None => {
                answer.default = candidate.index;
                policies.push(candidate.index);
                return (answer, policies);
            }
        }
    }
    answer.default = NO_POLICY;
    policies.push(NO_POLICY);
    (answer, policies)
}

/// The identity answers of a table, each stored once.
#[derive(Default)]
struct IdentityAnswers {
    list: Vec<IdentityAnswer>,
    index: HashMap<IdentityAnswer, u32>,
}

impl IdentityAnswers {
    /// The value the kernel's tables hold for an answer: the policy itself when no
    /// identity decides it, else `IDENTITY_ANSWER | index`.
    fn encode(&mut self, answer: IdentityAnswer) -> u32 {
        if answer.mask == 0 {
            return answer.default;
        }
        let next = self.list.len() as u32;
        let index = *self.index.entry(answer).or_insert(next);
        if index == next {
            self.list.push(answer);
        }
        IDENTITY_ANSWER | index
    }
}

/// Port tables by the candidate list they were computed from: prefixes with the same
/// list get the same answers, so they share one table.
#[derive(Default)]
struct PortTables(HashMap<Vec<usize>, u32>);

impl PortTables {
    /// The id of the port table for the candidates `ranks`, adding its entries
    /// (`by_port`) to `port_rules` the first time. Ids start at 1: 0 means none.
    fn id(
        &mut self,
        ranks: Vec<usize>,
        by_port: &[(u16, Protocol, u32)],
        port_rules: &mut Vec<(PortRuleKey, u32)>,
    ) -> u32 {
        let next_id = self.0.len() as u32 + 1;
        *self.0.entry(ranks).or_insert_with(|| {
            for &(port, proto, answer) in by_port {
                port_rules.push((
                    PortRuleKey {
                        port_table: next_id,
                        port,
                        proto: proto.ip_proto(),
                        _pad: 0,
                    },
                    answer,
                ));
            }
            next_id
        })
    }
}

/// The policy a packet whose protocol and port cannot be read is judged by: of the
/// `answers` some packet to the prefix gets, the session-checked policy with the
/// shortest duration (the earliest by precedence on a tie); `NO_POLICY` if none.
fn strictest(config: &Config, answers: impl IntoIterator<Item = u32>) -> u32 {
    answers
        .into_iter()
        .filter_map(|index| {
            let policy = config.policies.get(index as usize)?;
            Some((policy.duration()?, policy.precedence, index))
        })
        .min()
        .map_or(NO_POLICY, |(_, _, index)| index)
}

/// Ranks (positions in evaluation order) of every candidate owning `prefix` or one of
/// its ancestors, in order.
fn matching_ranks(prefix: &IpNet, owners: &HashMap<IpNet, Vec<usize>>) -> Vec<usize> {
    let mut ranks = Vec::new();
    for len in (0..=prefix.prefix_len()).rev() {
        let ancestor = IpNet::new(prefix.network(), len)
            .expect("shorter than a valid prefix")
            .trunc();
        if let Some(found) = owners.get(&ancestor) {
            ranks.extend_from_slice(found);
        }
    }
    ranks.sort_unstable();
    ranks.dedup();
    ranks
}

fn mark_reachable(reachable: &mut [bool], answer: u32) {
    if let Some(r) = reachable.get_mut(answer as usize) {
        *r = true;
    }
}

fn params(policy: &crate::config::Policy) -> PolicyParams {
    let on_expired = match policy.on_expired {
        OnExpired::Drop => ACTION_DROP,
        OnExpired::Reject => ACTION_REJECT,
        OnExpired::Redirect => ACTION_REDIRECT,
    };
    // Validation allows at most `MAX_REDIRECT_PORTS`.
    let mut redirect_ports = [0; MAX_REDIRECT_PORTS];
    for (slot, port) in redirect_ports.iter_mut().zip(&policy.redirect_ports) {
        *slot = *port;
    }
    let (duration_ns, flags) = match policy.check_session {
        CheckSession::Enforce(d) => (d.as_nanos_u64(), POLICY_ENFORCE),
        CheckSession::Unlimited { .. } => (0, 0),
    };
    PolicyParams {
        duration_ns,
        flags,
        on_expired,
        redirect_ports,
    }
}

fn check_capacity(config: &Config, table: &PolicyTable) -> Result<(), CompileError> {
    let limit = config.limits.max_policy_cidrs;
    for (family, is_v4) in [("IPv4", true), ("IPv6", false)] {
        let needed = table
            .dest
            .iter()
            .filter(|(net, _)| matches!(net, IpNet::V4(_)) == is_v4)
            .count();
        if needed > limit as usize {
            return Err(CompileError::TooManyPrefixes {
                family,
                needed,
                limit,
            });
        }
    }
    if table.port_rules.len() > config.limits.max_port_rules as usize {
        return Err(CompileError::TooManyPortRules {
            needed: table.port_rules.len(),
            limit: config.limits.max_port_rules,
        });
    }
    Ok(())
}

#[cfg(test)]
mod random_tests;
#[cfg(test)]
mod tests;
