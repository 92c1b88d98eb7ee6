//! The `[agent]` section: interfaces, local paths, listeners, re-authentication prompts
//! and the per-device reply limit.

use std::{collections::HashSet, net::SocketAddr, path::PathBuf};

use super::{
    Problems,
    fields::{choice, http_url, listen_address, path},
};
use crate::config::{
    AgentConfig, DurationError, GoDuration, NotifySettings, ReplyLimit, UnknownDevice, XdpMode,
    raw::RawAgent,
};

const PLACE: &str = "[agent]";

/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

/// Longest unix socket path: `sun_path` holds 108 bytes, NUL included.
const MAX_SOCKET_PATH: usize = 107;

pub(super) fn section(raw: RawAgent, problems: &mut Problems) -> AgentConfig {
    interfaces(&raw.interfaces, problems);
    let xdp_mode = xdp_mode(raw.xdp_mode.as_deref(), problems);
    let unknown_device = unknown_device(raw.unknown_device.as_deref(), problems);
    let api_socket = api_socket(raw.api_socket, problems);
    let state_dir = path(
        raw.state_dir,
        "/var/lib/sessiongate",
        (PLACE, "state_dir"),
        problems,
    );
    let udp_idle_timeout = udp_idle_timeout(raw.udp_idle_timeout, problems);
    let pin_dir = pin_dir(raw.pin_dir, problems);
    let metrics_listen = listen_address(raw.metrics_listen, (PLACE, "metrics_listen"), problems);
    let api_listen = listen_address(raw.api_listen, (PLACE, "api_listen"), problems);
    let api_token_file = api_token_file(raw.api_token_file, api_listen, problems);
    let reauth_url = raw.reauth_url.clone();
    let notify = notify(
        raw.notify_url,
        raw.notify_interval,
        raw.reauth_url,
        problems,
    );
    let notify_before = notify_before(raw.notify_before, problems);
    let portal_listen = listen_address(raw.portal_listen, (PLACE, "portal_listen"), problems);
    let portal_url = super::idps::portal_url(raw.portal_url, problems);
    let portal_tls = portal_tls(raw.portal_tls_cert, raw.portal_tls_key, problems);
    let replies = replies(raw.reply_rate, raw.reply_burst, problems);
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
        notify_before,
        reauth_url,
        portal_listen,
        portal_url,
        portal_tls,
        replies,
    }
}

/// At least one interface, each a name Linux could give, none twice.
fn interfaces(names: &[String], problems: &mut Problems) {
    if names.is_empty() {
        problems.add(
            PLACE,
            "interfaces",
            "list at least one interface that carries device traffic, e.g. [\"eth0\"]",
        );
    }
    let mut seen = HashSet::new();
    for (i, name) in names.iter().enumerate() {
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
}

fn xdp_mode(value: Option<&str>, problems: &mut Problems) -> XdpMode {
    choice(
        value,
        &[
            ("auto", XdpMode::Auto),
            ("native", XdpMode::Native),
            ("generic", XdpMode::Generic),
        ],
        XdpMode::Auto,
        (PLACE, "xdp_mode"),
        problems,
    )
}

fn unknown_device(value: Option<&str>, problems: &mut Problems) -> UnknownDevice {
    choice(
        value,
        &[
            ("enforce", UnknownDevice::Enforce),
            ("allow", UnknownDevice::Allow),
        ],
        UnknownDevice::Enforce,
        (PLACE, "unknown_device"),
        problems,
    )
}

/// A path the API's unix socket can be bound at.
fn api_socket(value: Option<String>, problems: &mut Problems) -> PathBuf {
    let api_socket = path(
        value,
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
    api_socket
}

fn udp_idle_timeout(value: Option<String>, problems: &mut Problems) -> GoDuration {
    let default_idle = GoDuration(std::time::Duration::from_secs(120));
    match value {
        None => default_idle,
        Some(text) => text.parse().unwrap_or_else(|e| {
            problems.add(
                PLACE,
                "udp_idle_timeout",
                format!("invalid duration {text:?}: {e}"),
            );
            default_idle
        }),
    }
}

/// The bpffs directory the datapath is pinned under: absolute, so that it never
/// depends on the directory the agent was started in.
fn pin_dir(value: Option<String>, problems: &mut Problems) -> PathBuf {
    let pin_dir = path(
        value,
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
    pin_dir
}

/// The TCP API is never open without a bearer token.
fn api_token_file(
    value: Option<String>,
    api_listen: Option<SocketAddr>,
    problems: &mut Problems,
) -> Option<PathBuf> {
    let api_token_file = value.map(PathBuf::from);
    if api_listen.is_some() && api_token_file.is_none() {
        problems.add(
            PLACE,
            "api_token_file",
            "api_listen needs a bearer token: name a file that holds it (mode 0600)",
        );
    }
    api_token_file
}

/// Prompts are off without a URL; the interval and `reauth_url` are checked all the
/// same, as the portal uses `reauth_url` too.
fn notify(
    url: Option<String>,
    interval: Option<String>,
    reauth_url: Option<String>,
    problems: &mut Problems,
) -> Option<NotifySettings> {
    let interval = notify_interval(interval, problems);
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

/// At most one prompt per device and policy per interval: zero would be no bound.
fn notify_interval(value: Option<String>, problems: &mut Problems) -> GoDuration {
    let default = GoDuration(std::time::Duration::from_secs(300));
    value.map_or(default, |text| {
        positive_duration(&text, "notify_interval", "", problems).unwrap_or(default)
    })
}

/// How long before a session runs out its devices are prompted; zero would never prompt.
fn notify_before(value: Option<String>, problems: &mut Problems) -> Option<GoDuration> {
    let hint = " (leave it out for no prompts before expiry)";
    positive_duration(&value?, "notify_before", hint, problems)
}

/// A duration that must be longer than zero, else a problem for `field`.
fn positive_duration(
    text: &str,
    field: &str,
    hint: &str,
    problems: &mut Problems,
) -> Option<GoDuration> {
    match text.parse::<GoDuration>() {
        Ok(d) if !d.0.is_zero() => Some(d),
        Ok(_) | Err(DurationError::Zero) => {
            problems.add(PLACE, field, format!("must be longer than 0s{hint}"));
            None
        }
        Err(e) => {
            problems.add(PLACE, field, format!("invalid duration {text:?}: {e}"));
            None
        }
    }
}

fn replies(rate: Option<i64>, burst: Option<i64>, problems: &mut Problems) -> ReplyLimit {
    let defaults = ReplyLimit::default();
    let mut per_device = |value: Option<i64>, field: &str, default: u32| match value {
        None => default,
        Some(n) if (1..=1000).contains(&n) => n as u32,
        Some(n) => {
            problems.add(PLACE, field, format!("{n} is out of range (1 to 1000)"));
            default
        }
    };
    ReplyLimit {
        rate: per_device(rate, "reply_rate", defaults.rate),
        burst: per_device(burst, "reply_burst", defaults.burst),
    }
}

/// `portal_tls_cert` and `portal_tls_key`: both or neither.
fn portal_tls(
    cert: Option<String>,
    key: Option<String>,
    problems: &mut Problems,
) -> Option<(PathBuf, PathBuf)> {
    match (cert, key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some((
            path(Some(cert), "", (PLACE, "portal_tls_cert"), problems),
            path(Some(key), "", (PLACE, "portal_tls_key"), problems),
        )),
        (Some(_), None) => {
            problems.add(
                PLACE,
                "portal_tls_key",
                "portal_tls_cert is set: give its key too",
            );
            None
        }
        (None, Some(_)) => {
            problems.add(
                PLACE,
                "portal_tls_cert",
                "portal_tls_key is set: give its certificate too",
            );
            None
        }
    }
}
