//! Readers for the kinds of field several sections share: choices, paths, addresses,
//! URLs, port and CIDR lists. Each reports its own problem and returns a value the
//! caller can go on with, so one bad field never hides the next.

use std::{net::SocketAddr, path::PathBuf};

use ipnet::IpNet;

use super::Problems;
use crate::input;

pub(super) fn listen_address(
    value: Option<String>,
    (place, field): (&str, &str),
    problems: &mut Problems,
) -> Option<SocketAddr> {
    let text = value?;
    match text.parse() {
        Ok(addr) => Some(addr),
        Err(_) => {
            problems.add(
                place,
                field,
                format!(
                    "{text:?} is not an address and port like \"127.0.0.1:9464\" or \"[::1]:9464\""
                ),
            );
            None
        }
    }
}

pub(super) fn http_url(text: &str, (place, field): (&str, &str), problems: &mut Problems) -> bool {
    let rest = text
        .strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"));
    match rest {
        Some(host)
            if !host.is_empty()
                && !host.starts_with('/')
                && !text.contains(char::is_whitespace) =>
        {
            true
        }
        _ => {
            problems.add(
                place,
                field,
                format!("{text:?} is not an http:// or https:// URL"),
            );
            false
        }
    }
}

pub(super) fn choice<T: Copy>(
    value: Option<&str>,
    options: &[(&str, T)],
    default: T,
    (place, field): (&str, &str),
    problems: &mut Problems,
) -> T {
    let Some(value) = value else {
        return default;
    };
    if let Some((_, v)) = options.iter().find(|(name, _)| *name == value) {
        return *v;
    }
    let names: Vec<String> = options.iter().map(|(n, _)| format!("{n:?}")).collect();
    problems.add(
        place,
        field,
        format!("{value:?} is not one of {}", names.join(", ")),
    );
    default
}

pub(super) fn path(
    value: Option<String>,
    default: &str,
    (place, field): (&str, &str),
    problems: &mut Problems,
) -> PathBuf {
    match value {
        None => PathBuf::from(default),
        Some(text) if text.trim().is_empty() => {
            problems.add(place, field, "empty path");
            PathBuf::from(default)
        }
        Some(text) => PathBuf::from(text),
    }
}

pub(super) fn port_list(
    ports: &[i64],
    place: &str,
    field: &str,
    problems: &mut Problems,
) -> Vec<u16> {
    let mut out: Vec<u16> = Vec::with_capacity(ports.len());
    for (i, &port) in ports.iter().enumerate() {
        match u16::try_from(port) {
            Ok(p) if p != 0 => {
                if out.contains(&p) {
                    problems.add(
                        place,
                        format!("{field}[{i}]"),
                        format!("port {p} is listed twice"),
                    );
                } else {
                    out.push(p);
                }
            }
            _ => problems.add(
                place,
                format!("{field}[{i}]"),
                format!("{port} is not a port (1 to 65535)"),
            ),
        }
    }
    out
}

/// Parses CIDRs or plain addresses (a host route), by `input::parse_net`'s rules.
pub(super) fn cidr_list(
    texts: &[String],
    place: &str,
    field: &str,
    problems: &mut Problems,
) -> Vec<IpNet> {
    let mut out = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let field = format!("{field}[{i}]");
        match input::parse_net(text.trim()) {
            Ok(net) => out.push(net),
            Err(e) => problems.add(place, field, e.to_string()),
        }
    }
    out
}
