//! The `[dns]` section: the ports never session-checked, and the resolvers `check`
//! warns about.

use super::{Problems, fields::port_list};
use crate::{
    config::{DnsConfig, raw::RawDns},
    input,
};

pub(super) fn section(raw: RawDns, problems: &mut Problems) -> DnsConfig {
    const PLACE: &str = "[dns]";
    let ports = match raw.ports {
        None => vec![53],
        Some(ports) if ports.is_empty() => {
            problems.add(
                PLACE,
                "ports",
                "list at least one port: DNS must never be session-checked (the default is [53])",
            );
            vec![]
        }
        Some(ports) => port_list(&ports, PLACE, "ports", problems),
    };
    let resolvers = raw
        .resolvers
        .iter()
        .enumerate()
        .filter_map(|(i, text)| match input::parse_ip(text.trim()) {
            Ok(ip) => Some(ip),
            Err(e) => {
                problems.add(PLACE, format!("resolvers[{i}]"), e.to_string());
                None
            }
        })
        .collect();
    DnsConfig { ports, resolvers }
}
