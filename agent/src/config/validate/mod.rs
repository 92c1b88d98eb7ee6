//! From `RawConfig` to `Config`, collecting every problem instead of stopping at the
//! first one.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
};

use agent_common::maps::{MAX_POLICIES, MAX_REDIRECT_PORTS};
use ipnet::IpNet;

use super::{
    AgentConfig, CheckSession, Config, DEFAULT_ETCD_PREFIX, DEFAULT_REDIRECT_PORTS, DnsConfig,
    EtcdConfig, EtcdTls, GoDuration, Limits, NotifySettings, OnExpired, Policy, Problem, Protocol,
    ReplyLimit, StoreConfig, UnknownDevice, XdpMode,
    raw::{RawAgent, RawBypass, RawConfig, RawDns, RawLimits, RawPolicy, RawStore},
};
use crate::input::{self, Spaces, check_name, name::preview};

/// Largest capacity accepted for any map: beyond it, preallocation alone would take
/// gigabytes of kernel memory.
const MAX_CAPACITY: i64 = 1 << 26;
/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, place: &str, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            place: place.to_string(),
            field: field.into(),
            message: message.into(),
        });
    }
}

pub(super) fn validate(raw: RawConfig, source: &str) -> Result<Config, Vec<Problem>> {
    let mut problems = Problems::default();
    let agent = agent(raw.agent, &mut problems);
    let dns = dns(raw.dns, &mut problems);
    let bypass = bypass(raw.bypass, &mut problems);
    let limits = limits(raw.limits, &mut problems);
    let store = store(raw.store, &mut problems);
    let policies = policies(raw.policies, &mut problems);
    portal_needs(&agent, &policies, &mut problems);
    if problems.0.is_empty() {
        Ok(Config {
            source: source.to_string(),
            agent,
            dns,
            bypass,
            limits,
            store,
            policies,
        })
    } else {
        Err(problems.0)
    }
}

fn agent(raw: RawAgent, problems: &mut Problems) -> AgentConfig {
    const PLACE: &str = "[agent]";
    if raw.interfaces.is_empty() {
        problems.add(
            PLACE,
            "interfaces",
            "list at least one interface that carries device traffic, e.g. [\"eth0\"]",
        );
    }
    let mut seen = HashSet::new();
    for (i, name) in raw.interfaces.iter().enumerate() {
        let field = format!("interfaces[{i}]");
        if name.is_empty() || name.len() > MAX_IFNAME || name.contains(['/', ' ']) {
            problems.add(
                PLACE,
                field,
                format!(
                    "{name:?} is not a valid interface name (1 to 15 characters, no '/' or spaces)"
                ),
            );
        } else if !seen.insert(name) {
            problems.add(PLACE, field, format!("{name:?} is listed twice"));
        }
    }
    let xdp_mode = choice(
        raw.xdp_mode.as_deref(),
        &[
            ("auto", XdpMode::Auto),
            ("native", XdpMode::Native),
            ("generic", XdpMode::Generic),
        ],
        XdpMode::Auto,
        (PLACE, "xdp_mode"),
        problems,
    );
    let unknown_device = choice(
        raw.unknown_device.as_deref(),
        &[
            ("enforce", UnknownDevice::Enforce),
            ("allow", UnknownDevice::Allow),
        ],
        UnknownDevice::Enforce,
        (PLACE, "unknown_device"),
        problems,
    );
    let api_socket = path(
        raw.api_socket,
        "/run/sessiongate/api.sock",
        (PLACE, "api_socket"),
        problems,
    );
    // A unix socket's path lives in `sockaddr_un.sun_path`: 108 bytes with its NUL.
    let socket_len = api_socket.as_os_str().len();
    if socket_len > MAX_SOCKET_PATH {
        problems.add(
            PLACE,
            "api_socket",
            format!(
                "{} is {socket_len} bytes long; a unix socket path holds at most {MAX_SOCKET_PATH}",
                api_socket.display()
            ),
        );
    }
    let state_dir = path(
        raw.state_dir,
        "/var/lib/sessiongate",
        (PLACE, "state_dir"),
        problems,
    );
    let default_idle = GoDuration(std::time::Duration::from_secs(120));
    let udp_idle_timeout = match raw.udp_idle_timeout {
        None => default_idle,
        Some(text) => text.parse().unwrap_or_else(|e| {
            problems.add(
                PLACE,
                "udp_idle_timeout",
                format!("invalid duration {text:?}: {e}"),
            );
            default_idle
        }),
    };
    let pin_dir = path(
        raw.pin_dir,
        "/sys/fs/bpf/sessiongate",
        (PLACE, "pin_dir"),
        problems,
    );
    if !pin_dir.is_absolute() {
        problems.add(
            PLACE,
            "pin_dir",
            "must be an absolute path on a bpf filesystem",
        );
    }
    let metrics_listen = listen_address(raw.metrics_listen, (PLACE, "metrics_listen"), problems);
    let api_listen = listen_address(raw.api_listen, (PLACE, "api_listen"), problems);
    let api_token_file = raw.api_token_file.map(PathBuf::from);
    if api_listen.is_some() && api_token_file.is_none() {
        problems.add(
            PLACE,
            "api_token_file",
            "api_listen needs a bearer token: name a file that holds it (mode 0600)",
        );
    }
    let reauth_url = raw.reauth_url.clone();
    let notify = notify(
        raw.notify_url,
        raw.notify_interval,
        raw.reauth_url,
        problems,
    );
    let portal_listen = listen_address(raw.portal_listen, (PLACE, "portal_listen"), problems);
    let defaults = ReplyLimit::default();
    let mut per_device = |value: Option<i64>, field: &str, default: u32| match value {
        None => default,
        Some(n) if (1..=1000).contains(&n) => n as u32,
        Some(n) => {
            problems.add(PLACE, field, format!("{n} is out of range (1 to 1000)"));
            default
        }
    };
    let replies = ReplyLimit {
        rate: per_device(raw.reply_rate, "reply_rate", defaults.rate),
        burst: per_device(raw.reply_burst, "reply_burst", defaults.burst),
    };
    AgentConfig {
        interfaces: raw.interfaces,
        xdp_mode,
        unknown_device,
        api_socket,
        state_dir,
        udp_idle_timeout,
        pin_dir,
        metrics_listen,
        api_listen,
        api_token_file,
        notify,
        reauth_url,
        portal_listen,
        replies,
    }
}

fn store(raw: RawStore, problems: &mut Problems) -> StoreConfig {
    const PLACE: &str = "[store]";
    let kind = choice(
        raw.kind.as_deref(),
        &[("local", false), ("etcd", true)],
        false,
        (PLACE, "kind"),
        problems,
    );
    if !kind {
        for (field, given) in [
            ("endpoints", raw.endpoints.is_some()),
            ("prefix", raw.prefix.is_some()),
            ("ca_file", raw.ca_file.is_some()),
            ("cert_file", raw.cert_file.is_some()),
            ("key_file", raw.key_file.is_some()),
        ] {
            if given && matches!(raw.kind.as_deref(), None | Some("local")) {
                problems.add(PLACE, field, "only applies with kind = \"etcd\"");
            }
        }
        return StoreConfig::Local;
    }
    let endpoints = raw.endpoints.unwrap_or_default();
    if endpoints.is_empty() {
        problems.add(
            PLACE,
            "endpoints",
            "list the etcd members' client URLs, e.g. [\"https://10.0.0.1:2379\"]",
        );
    }
    let mut https = Vec::new();
    for (i, url) in endpoints.iter().enumerate() {
        match etcd_endpoint(url) {
            Ok(secure) => https.push(secure),
            Err(reason) => problems.add(
                PLACE,
                format!("endpoints[{i}]"),
                format!("{url:?} {reason}"),
            ),
        }
    }
    let secure = https.first().copied().unwrap_or(false);
    if https.iter().any(|&s| s != secure) {
        problems.add(
            PLACE,
            "endpoints",
            "mixes http:// and https:// URLs; use one scheme for every member",
        );
    }
    let prefix = raw
        .prefix
        .unwrap_or_else(|| DEFAULT_ETCD_PREFIX.to_string());
    if !prefix.starts_with('/')
        || prefix.len() < 2
        || prefix.ends_with('/')
        || prefix.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        problems.add(
            PLACE,
            "prefix",
            format!("{prefix:?} is not a key prefix like \"/sessiongate\" (starts with '/', no trailing '/', no spaces)"),
        );
    }
    let ca_file = raw.ca_file.map(PathBuf::from);
    let client = match (raw.cert_file, raw.key_file) {
        (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
        (None, None) => None,
        (Some(_), None) => {
            problems.add(
                PLACE,
                "key_file",
                "cert_file needs the key that goes with it",
            );
            None
        }
        (None, Some(_)) => {
            problems.add(
                PLACE,
                "cert_file",
                "key_file needs the certificate that goes with it",
            );
            None
        }
    };
    let tls = match (secure, ca_file) {
        (true, Some(ca_file)) => Some(EtcdTls { ca_file, client }),
        (true, None) => {
            problems.add(
                PLACE,
                "ca_file",
                "https endpoints need the CA certificate (PEM) that signed the members' certificates",
            );
            None
        }
        (false, ca) => {
            if ca.is_some() || client.is_some() {
                problems.add(
                    PLACE,
                    "endpoints",
                    "ca_file, cert_file and key_file need https:// endpoints",
                );
            }
            None
        }
    };
    StoreConfig::Etcd(EtcdConfig {
        endpoints,
        prefix,
        tls,
    })
}

/// Whether an etcd client URL is https (`Ok(true)`) or http; why it is neither.
fn etcd_endpoint(url: &str) -> Result<bool, &'static str> {
    let (secure, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err("must start with http:// or https://");
    };
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or("needs a port, e.g. http://10.0.0.1:2379")?;
    if host.is_empty() || host.contains(['/', ' ', '@']) {
        return Err("needs a host, e.g. http://10.0.0.1:2379");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(secure),
        _ => Err("needs a port from 1 to 65535 and no path"),
    }
}

/// A redirect policy needs the portal, and the portal a place to send users to.
fn portal_needs(agent: &AgentConfig, policies: &[Policy], problems: &mut Problems) {
    let redirecting = policies
        .iter()
        .enumerate()
        .filter(|(_, p)| p.on_expired == OnExpired::Redirect);
    for (i, p) in redirecting {
        if agent.portal_listen.is_none() {
            problems.add(
                &format!("policy {:?} (#{})", p.name, i + 1),
                "on_expired",
                "\"redirect\" steers HTTP to the re-authentication portal: set [agent] portal_listen, e.g. \"[::]:8511\"",
            );
        }
    }
    if agent.portal_listen.is_some() && agent.reauth_url.is_none() {
        problems.add(
            "[agent]",
            "reauth_url",
            "portal_listen is set: the portal's page links to reauth_url, where users sign in again; set it",
        );
    }
}

fn dns(raw: RawDns, problems: &mut Problems) -> DnsConfig {
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

fn bypass(raw: RawBypass, problems: &mut Problems) -> Vec<IpNet> {
    cidr_list(&raw.destinations, "[bypass]", "destinations", problems)
}

fn limits(raw: RawLimits, problems: &mut Problems) -> Limits {
    const PLACE: &str = "[limits]";
    let defaults = Limits::default();
    let mut capacity = |value: Option<i64>, field: &str, default: u32| match value {
        None => default,
        Some(n) if (1..=MAX_CAPACITY).contains(&n) => n as u32,
        Some(n) => {
            problems.add(
                PLACE,
                field,
                format!("{n} is out of range (1 to {MAX_CAPACITY})"),
            );
            default
        }
    };
    Limits {
        max_sessions: capacity(raw.max_sessions, "max_sessions", defaults.max_sessions),
        max_flows: capacity(raw.max_flows, "max_flows", defaults.max_flows),
        max_policy_cidrs: capacity(
            raw.max_policy_cidrs,
            "max_policy_cidrs",
            defaults.max_policy_cidrs,
        ),
        max_port_rules: capacity(
            raw.max_port_rules,
            "max_port_rules",
            defaults.max_port_rules,
        ),
    }
}

fn policies(raw: Vec<RawPolicy>, problems: &mut Problems) -> Vec<Policy> {
    if raw.len() > MAX_POLICIES as usize {
        problems.add(
            "[[policy]]",
            "policy",
            format!(
                "{} policies, at most {MAX_POLICIES} are supported",
                raw.len()
            ),
        );
    }
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut precedences: HashMap<i64, String> = HashMap::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, p) in raw.into_iter().enumerate() {
        let place = match &p.name {
            Some(name) if !name.trim().is_empty() => {
                format!("policy {} (#{})", preview(name), i + 1)
            }
            _ => format!("policy #{}", i + 1),
        };
        let name = match p.name {
            Some(name) if !name.trim().is_empty() => {
                // Names go into metric labels, log lines and the portal's page.
                if let Err(problem) = check_name(&name, Spaces::Allowed) {
                    problems.add(&place, "name", problem.to_string());
                } else if let Some(first) = names.insert(name.clone(), i + 1) {
                    problems.add(
                        &place,
                        "name",
                        format!("policy #{first} already has this name; names must be unique"),
                    );
                }
                name
            }
            _ => {
                problems.add(&place, "name", "missing: every policy needs a name");
                String::new()
            }
        };
        let precedence = match p.precedence {
            Some(n) if n >= 0 => {
                if let Some(other) = precedences.insert(n, place.clone()) {
                    problems.add(
                        &place,
                        "precedence",
                        format!(
                            "{n} is also the precedence of {other}; precedences must be unique"
                        ),
                    );
                }
                n
            }
            Some(n) => {
                problems.add(&place, "precedence", format!("{n} is negative"));
                0
            }
            None => {
                problems.add(
                    &place,
                    "precedence",
                    "missing: policies are evaluated in precedence order, lower first",
                );
                0
            }
        };
        if p.destinations.is_empty() {
            problems.add(&place, "destinations", "list at least one CIDR or address");
        }
        let destinations = cidr_list(&p.destinations, &place, "destinations", problems);
        let protocol = p.protocol.as_deref().and_then(|text| match text {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            _ => {
                problems.add(
                    &place,
                    "protocol",
                    format!("{text:?} is not \"tcp\" or \"udp\" (leave it out for both)"),
                );
                None
            }
        });
        let ports = p.ports.map(|ports| {
            if ports.is_empty() {
                problems.add(&place, "ports", "empty: leave it out to match every port");
            }
            port_list(&ports, &place, "ports", problems)
        });
        let check_session = check_session(p.check_session, &place, problems);
        let on_expired = choice(
            p.on_expired.as_deref(),
            &[
                ("drop", OnExpired::Drop),
                ("reject", OnExpired::Reject),
                ("redirect", OnExpired::Redirect),
            ],
            OnExpired::Drop,
            (&place, "on_expired"),
            problems,
        );
        let redirect_ports = match (on_expired, p.redirect_ports) {
            (OnExpired::Redirect, None) => DEFAULT_REDIRECT_PORTS.to_vec(),
            (OnExpired::Redirect, Some(ports)) => {
                if ports.is_empty() || ports.len() > MAX_REDIRECT_PORTS {
                    problems.add(
                        &place,
                        "redirect_ports",
                        format!("list 1 to {MAX_REDIRECT_PORTS} ports (the default is [80])"),
                    );
                }
                let mut ports = port_list(&ports, &place, "redirect_ports", problems);
                ports.sort_unstable();
                ports.dedup();
                ports.truncate(MAX_REDIRECT_PORTS);
                ports
            }
            (_, Some(_)) => {
                problems.add(
                    &place,
                    "redirect_ports",
                    "only a policy with on_expired = \"redirect\" steers ports to the portal",
                );
                Vec::new()
            }
            (_, None) => Vec::new(),
        };
        if on_expired == OnExpired::Redirect && protocol == Some(Protocol::Udp) {
            problems.add(
                &place,
                "on_expired",
                "\"redirect\" steers TCP (HTTP) to the portal, and this policy matches only UDP: use \"reject\"",
            );
        }
        out.push(Policy {
            name,
            precedence,
            destinations,
            protocol,
            ports,
            check_session,
            on_expired,
            redirect_ports,
        });
    }
    out
}

fn check_session(
    raw: Option<super::raw::RawCheckSession>,
    place: &str,
    problems: &mut Problems,
) -> CheckSession {
    let Some(raw) = raw else {
        return CheckSession::Unlimited {
            enforce_without_duration: false,
        };
    };
    let duration = raw.duration.as_deref().and_then(|text| {
        text.parse::<GoDuration>()
            .map_err(|e| {
                problems.add(
                    place,
                    "check_session.duration",
                    format!("invalid duration {text:?}: {e}"),
                );
            })
            .ok()
    });
    match (raw.enforce, raw.duration.is_some(), duration) {
        (Some(false), _, _) => CheckSession::Unlimited {
            enforce_without_duration: false,
        },
        (None, false, _) => {
            problems.add(
                place,
                "check_session",
                "give a duration, as in { enforce = true, duration = \"1h30m0s\" }",
            );
            CheckSession::Unlimited {
                enforce_without_duration: false,
            }
        }
        (_, true, Some(d)) => CheckSession::Enforce(d),
        // An invalid duration was reported above.
        (_, true, None) => CheckSession::Unlimited {
            enforce_without_duration: false,
        },
        (Some(true), false, _) => CheckSession::Unlimited {
            enforce_without_duration: true,
        },
    }
}

fn listen_address(
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

fn http_url(text: &str, (place, field): (&str, &str), problems: &mut Problems) -> bool {
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

fn notify(
    url: Option<String>,
    interval: Option<String>,
    reauth_url: Option<String>,
    problems: &mut Problems,
) -> Option<NotifySettings> {
    const PLACE: &str = "[agent]";
    let default = GoDuration(std::time::Duration::from_secs(300));
    let interval = match &interval {
        None => default,
        Some(text) => match text.parse::<GoDuration>() {
            Ok(d) if d.0.is_zero() => {
                problems.add(PLACE, "notify_interval", "must be longer than 0s");
                default
            }
            Ok(d) => d,
            Err(e) => {
                problems.add(
                    PLACE,
                    "notify_interval",
                    format!("invalid duration {text:?}: {e}"),
                );
                default
            }
        },
    };
    if let Some(url) = &reauth_url {
        http_url(url, (PLACE, "reauth_url"), problems);
    }
    let url = url?;
    http_url(&url, (PLACE, "notify_url"), problems).then_some(NotifySettings {
        url,
        interval,
        reauth_url,
    })
}

fn choice<T: Copy>(
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

/// Longest unix socket path: `sun_path` holds 108 bytes, NUL included.
const MAX_SOCKET_PATH: usize = 107;

fn path(
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

fn port_list(ports: &[i64], place: &str, field: &str, problems: &mut Problems) -> Vec<u16> {
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
fn cidr_list(texts: &[String], place: &str, field: &str, problems: &mut Problems) -> Vec<IpNet> {
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

#[cfg(test)]
mod tests;
