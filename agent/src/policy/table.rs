//! Helpers over the compiled table: which prefixes own any address of their own, and a
//! readable rendering for `sessiongate check`.

use std::fmt::Write as _;

use agent_common::maps::{BYPASS_POLICY, NO_POLICY, PortRuleKey, identity_answer_index};
use ipnet::IpNet;

use super::PolicyTable;
use crate::config::{Config, Protocol};

/// For each prefix of a sorted, deduplicated list: whether some address has it as its
/// longest match, i.e. its longer prefixes in the list do not cover it completely.
pub(super) fn regions_nonempty(sorted: &[IpNet]) -> Vec<bool> {
    // Sorted by (address, length), every prefix comes right after its ancestors, so a
    // stack of open prefixes yields each one's nearest enclosing prefix (its parent).
    let mut covered_share: Vec<u128> = vec![0; sorted.len()];
    let mut has_children = vec![false; sorted.len()];
    let mut stack: Vec<usize> = Vec::new();
    for (i, net) in sorted.iter().enumerate() {
        while let Some(&top) = stack.last() {
            if sorted[top].contains(net) {
                break;
            }
            stack.pop();
        }
        if let Some(&parent) = stack.last() {
            // Share of the parent this child covers, in units of 2^-bits of the parent:
            // 2^(bits - depth). Children are disjoint, so the parent is covered exactly
            // when the shares sum to 2^bits (which wraps to 0 for IPv6).
            let depth = u32::from(net.prefix_len() - sorted[parent].prefix_len());
            let bits = u32::from(net.max_prefix_len());
            covered_share[parent] = covered_share[parent].wrapping_add(1u128 << (bits - depth));
            has_children[parent] = true;
        }
        stack.push(i);
    }
    sorted
        .iter()
        .enumerate()
        .map(|(i, net)| {
            let full = 1u128
                .checked_shl(u32::from(net.max_prefix_len()))
                .unwrap_or(0);
            !(has_children[i] && covered_share[i] == full)
        })
        .collect()
}

/// A policy index as people read it.
pub fn policy_label(config: &Config, index: u32) -> String {
    match index {
        NO_POLICY => "no policy (pass)".to_string(),
        BYPASS_POLICY => "bypass (pass)".to_string(),
        i => match config.policies.get(i as usize) {
            Some(p) => match p.duration() {
                Some(d) => format!(
                    "{:?} (session <= {d}, else {})",
                    p.name,
                    p.on_expired.name()
                ),
                None => format!("{:?} (unlimited)", p.name),
            },
            None => format!("policy #{i}?"),
        },
    }
}

/// What a compiled answer gives: a policy, or with an identity answer each
/// identity-conditioned policy in turn and the unconditional one.
pub fn answer_label(config: &Config, table: &PolicyTable, answer: u32) -> String {
    let Some(index) = identity_answer_index(answer) else {
        return policy_label(config, answer);
    };
    let entry = table.identity_answers[index as usize];
    let mut parts: Vec<String> = (0..table.identity_policies.len())
        .filter(|bit| entry.mask & (1 << bit) != 0)
        .map(|bit| {
            let policy = table.identity_policies[bit];
            let condition = config.policies[policy as usize]
                .identity
                .as_ref()
                .map_or_else(String::new, |c| c.describe());
            format!("{} if identity {condition}", policy_label(config, policy))
        })
        .collect();
    parts.push(format!("else {}", policy_label(config, entry.default)));
    parts.join("; ")
}

/// The compiled table, one block per prefix.
pub fn describe(config: &Config, table: &PolicyTable) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "compiled policy table: {} prefixes, {} port rules, {} policies",
        table.dest.len(),
        table.port_rules.len(),
        table.params.len()
    );
    // Each policy in evaluation order, with whom it applies to.
    let mut order: Vec<usize> = (0..config.policies.len()).collect();
    order.sort_by_key(|&i| config.policies[i].precedence);
    for i in order {
        let p = &config.policies[i];
        let who = p.identity.as_ref().map_or_else(
            || "everyone".to_string(),
            |c| format!("identity {}", c.describe()),
        );
        let _ = writeln!(
            out,
            "  precedence {:<6} {} for {who}",
            p.precedence,
            policy_label(config, i as u32)
        );
    }
    for (net, rule) in &table.dest {
        for (proto, default) in [(Protocol::Tcp, rule.tcp), (Protocol::Udp, rule.udp)] {
            let mut specific: Vec<&(PortRuleKey, u32)> = table
                .port_rules
                .iter()
                .filter(|(k, _)| {
                    rule.port_table != 0
                        && k.port_table == rule.port_table
                        && k.proto == proto.ip_proto()
                })
                .collect();
            specific.sort_by_key(|(k, _)| k.port);
            for (key, answer) in specific {
                let _ = writeln!(
                    out,
                    "  {:<22} {}/{:<6} -> {}",
                    net.to_string(),
                    proto.name(),
                    key.port,
                    answer_label(config, table, *answer)
                );
            }
            let _ = writeln!(
                out,
                "  {:<22} {}/{:<6} -> {}",
                net.to_string(),
                proto.name(),
                "*",
                answer_label(config, table, default)
            );
        }
        // Packets whose protocol and port cannot be read (short first fragments,
        // over-long IPv6 header chains) are judged against this policy.
        if rule.unreadable != NO_POLICY {
            let _ = writeln!(
                out,
                "  {:<22} {:<10} -> {}",
                net.to_string(),
                "unreadable",
                policy_label(config, rule.unreadable)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        let mut v: Vec<IpNet> = list.iter().map(|s| s.parse().unwrap()).collect();
        v.sort();
        v
    }

    #[test]
    fn a_prefix_split_into_covering_halves_owns_nothing() {
        let list = nets(&["198.18.0.0/24", "198.18.0.0/25", "198.18.0.128/25"]);
        assert_eq!(regions_nonempty(&list), [false, true, true]);
        let list = nets(&["198.18.0.0/24", "198.18.0.0/25", "198.18.0.128/26"]);
        assert_eq!(regions_nonempty(&list), [true, true, true]);
        // Only direct children count towards a prefix: the /24 is split into halves
        // and owns nothing, the /23 still owns 198.18.1.0/24.
        let list = nets(&[
            "198.18.0.0/23",
            "198.18.0.0/24",
            "198.18.0.0/25",
            "198.18.0.128/25",
        ]);
        assert_eq!(regions_nonempty(&list), [true, false, true, true]);
        // Children of unequal sizes that add up to the whole.
        let list = nets(&[
            "198.18.0.0/23",
            "198.18.0.0/24",
            "198.18.1.0/25",
            "198.18.1.128/25",
        ]);
        assert_eq!(regions_nonempty(&list), [false, true, true, true]);
    }

    #[test]
    fn ipv6_and_whole_space_prefixes_are_handled() {
        let list = nets(&["::/0", "::/1", "8000::/1"]);
        assert_eq!(regions_nonempty(&list), [false, true, true]);
        let list = nets(&["0.0.0.0/0", "0.0.0.0/1", "128.0.0.0/1", "::/0"]);
        assert_eq!(regions_nonempty(&list), [false, true, true, true]);
        let list = nets(&["2001:db8::/32", "2001:db8::/33"]);
        assert_eq!(regions_nonempty(&list), [true, true]);
    }
}
