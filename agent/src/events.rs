//! Events from the kernel's ring buffer: refusals, turned into "re-authentication
//! required" log lines and kept in a short history for the API, and use reports,
//! which the prompts before expiry (`expiry`) learn from. The event stream's records.

use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use agent_common::{
    addr::Ip6,
    maps::{ACTION_REDIRECT, ACTION_REJECT, FlowEvent, IPPROTO_TCP, IPPROTO_UDP, NO_SESSION_AGE},
    verdict::Verdict,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{clock::ClockPair, config::GoDuration, input::printable};

/// Refusals kept for `GET /v1/events`.
pub const HISTORY: usize = 256;

/// A refused new flow, with names resolved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Refusal {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// `session_expired`, `unknown_device` or `unreadable_packet` (a packet whose
    /// protocol and port could not be read: `protocol` is `ip`, `port` 0).
    pub reason: String,
    pub device: IpAddr,
    /// The device's user, when it has a session.
    pub user: Option<String>,
    pub policy: String,
    pub destination: IpAddr,
    pub port: u16,
    pub protocol: String,
    /// Age of the device's session when refused (Go format), if it has one.
    pub session_age: Option<String>,
    /// What the device got: `drop`, `reject` (RST / ICMP error) or `redirect`
    /// (the portal).
    #[serde(default)]
    pub action: String,
}

/// A line of the event stream (`GET /v1/events/stream`): `{"kind": "refused", ..}`
/// with a `Refusal`'s fields, or `{"kind": "expiring", ..}` with an `Expiring`'s.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    Refused(Refusal),
    Expiring(Expiring),
}

/// A device's session is about to run out for a policy it uses (`notify_before`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Expiring {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub device: IpAddr,
    pub user: String,
    /// The identity provider the device enrolled with, where it signs in again.
    pub idp: String,
    pub policy: String,
    /// The session's age now, and when it stops satisfying the policy (Go format,
    /// RFC 3339).
    pub session_age: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    pub seconds_remaining: u64,
    /// Where the user re-authenticates: the portal's `/refresh-identity`, else
    /// `reauth_url`.
    pub reauth_url: Option<String>,
}

/// A ring-buffer record decoded, before names are resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawEvent {
    pub at_boot_ns: i64,
    pub verdict: Verdict,
    pub device: IpAddr,
    pub destination: IpAddr,
    pub port: u16,
    pub protocol: &'static str,
    pub policy: u32,
    /// The configuration set `policy` indexes into.
    pub set: u8,
    pub session_age_ns: Option<i64>,
    pub action: &'static str,
}

/// Decodes a record; `None` for a record of the wrong size or unknown verdict.
pub fn decode(bytes: &[u8]) -> Option<RawEvent> {
    let event: FlowEvent = bytemuck::try_pod_read_unaligned(bytes).ok()?;
    let addr = |raw: Ip6| -> IpAddr {
        let o = raw.octets();
        if event.family == 4 {
            Ipv4Addr::new(o[0], o[1], o[2], o[3]).into()
        } else {
            Ipv6Addr::from(o).into()
        }
    };
    Some(RawEvent {
        at_boot_ns: event.at_ns as i64,
        verdict: Verdict::from_code(event.verdict)?,
        device: addr(event.src),
        destination: addr(event.dst),
        port: event.dport,
        protocol: match event.proto {
            IPPROTO_TCP => "tcp",
            IPPROTO_UDP => "udp",
            _ => "ip",
        },
        policy: event.policy,
        set: event.set,
        session_age_ns: (event.session_age_ns != NO_SESSION_AGE).then_some(event.session_age_ns),
        action: match u32::from(event.action) {
            ACTION_REJECT => "reject",
            ACTION_REDIRECT => "redirect",
            _ => "drop",
        },
    })
}

impl RawEvent {
    pub fn resolve(&self, clock: &ClockPair, user: Option<String>, policy: String) -> Refusal {
        Refusal {
            at: clock.wall_of(self.at_boot_ns),
            reason: match self.verdict {
                Verdict::DroppedUnknownDevice => "unknown_device",
                Verdict::DroppedUnreadable => "unreadable_packet",
                _ => "session_expired",
            }
            .to_string(),
            device: self.device,
            user,
            policy,
            destination: self.destination,
            port: self.port,
            protocol: self.protocol.to_string(),
            session_age: self.session_age_ns.map(format_age),
            action: self.action.to_string(),
        }
    }
}

/// A session age as Gateway writes durations, to the second.
pub fn format_age(ns: i64) -> String {
    let secs = u64::try_from(ns.max(0)).unwrap_or(0) / 1_000_000_000;
    if secs == 0 {
        return "0s".into();
    }
    GoDuration(std::time::Duration::from_secs(secs)).to_string()
}

/// The last `HISTORY` refusals.
#[derive(Default)]
pub struct History(VecDeque<Refusal>);

impl History {
    pub fn push(&mut self, refusal: Refusal) {
        if self.0.len() == HISTORY {
            self.0.pop_front();
        }
        self.0.push_back(refusal);
    }

    pub fn snapshot(&self) -> Vec<Refusal> {
        self.0.iter().cloned().collect()
    }
}

/// `198.19.10.10:443/tcp`, `[2001:db8::1]:443/tcp`; just the address when no port
/// could be read.
pub fn destination(refusal: &Refusal) -> String {
    if refusal.protocol == "ip" {
        return refusal.destination.to_string();
    }
    match refusal.destination {
        IpAddr::V4(a) => format!("{a}:{}/{}", refusal.port, refusal.protocol),
        IpAddr::V6(a) => format!("[{a}]:{}/{}", refusal.port, refusal.protocol),
    }
}

/// One human-readable line, for `sessiongate events`.
pub fn describe(r: &Refusal) -> String {
    let at =
        r.at.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
    format!(
        "{at} refused {} -> {} policy {:?}: {}, {} (user {}, session age {})",
        r.device,
        destination(r),
        r.policy,
        r.reason,
        r.action,
        r.user.as_deref().map_or("-".into(), printable),
        r.session_age.as_deref().unwrap_or("-"),
    )
}

/// One human-readable line, for `sessiongate events`.
pub fn describe_expiring(e: &Expiring) -> String {
    let format = &time::format_description::well_known::Rfc3339;
    format!(
        "{} expiring {} policy {:?}: session of user {} runs out at {} ({}s left, age {})",
        e.at.format(format).unwrap_or_default(),
        e.device,
        e.policy,
        printable(&e.user),
        e.expires_at.format(format).unwrap_or_default(),
        e.seconds_remaining,
        e.session_age,
    )
}

/// Logs a prompt before expiry as one line.
pub fn log_expiring(e: &Expiring) {
    tracing::info!(
        user = e.user.as_str(),
        device = %e.device,
        policy = e.policy.as_str(),
        seconds_remaining = e.seconds_remaining,
        session_age = e.session_age.as_str(),
        "session expiring soon: re-authenticate"
    );
}

/// Logs a refusal as one "re-authentication required" line.
pub fn log(refusal: &Refusal) {
    let destination = destination(refusal);
    // Names as `&str`: quoted and escaped in text logs, plain strings in JSON logs.
    tracing::warn!(
        user = refusal.user.as_deref().unwrap_or("(no session)"),
        device = %refusal.device,
        policy = refusal.policy.as_str(),
        destination = %destination,
        reason = %refusal.reason,
        action = %refusal.action,
        session_age = refusal.session_age.as_deref().unwrap_or("-"),
        "re-authentication required"
    );
}

#[cfg(test)]
mod tests {
    use agent_common::addr::Ip4;

    use super::*;

    #[test]
    fn decodes_ipv4_and_ipv6_records() {
        let mut event = FlowEvent {
            at_ns: 5_000_000_000,
            session_age_ns: 7_200_000_000_000,
            policy: 3,
            verdict: Verdict::DroppedExpired.code(),
            family: 4,
            proto: IPPROTO_TCP,
            dport: 443,
            sport: 50000,
            ..FlowEvent::default()
        };
        event.src = Ip4::from_octets([198, 18, 1, 10]).wide();
        event.dst = Ip4::from_octets([198, 19, 10, 10]).wide();
        let raw = decode(bytemuck::bytes_of(&event)).unwrap();
        assert_eq!(raw.device, "198.18.1.10".parse::<IpAddr>().unwrap());
        assert_eq!(raw.destination, "198.19.10.10".parse::<IpAddr>().unwrap());
        assert_eq!((raw.port, raw.protocol, raw.policy), (443, "tcp", 3));
        assert_eq!(raw.action, "drop");
        event.action = ACTION_REJECT as u8;
        assert_eq!(decode(bytemuck::bytes_of(&event)).unwrap().action, "reject");
        event.action = ACTION_REDIRECT as u8;
        assert_eq!(
            decode(bytemuck::bytes_of(&event)).unwrap().action,
            "redirect"
        );
        event.action = 0;
        assert_eq!(
            raw.session_age_ns.map(format_age).as_deref(),
            Some("2h0m0s")
        );

        event.family = 6;
        event.proto = IPPROTO_UDP;
        event.src = "2001:db8::10".parse::<Ipv6Addr>().unwrap().into();
        event.session_age_ns = NO_SESSION_AGE;
        event.verdict = Verdict::DroppedUnknownDevice.code();
        let raw = decode(bytemuck::bytes_of(&event)).unwrap();
        assert_eq!(raw.device, "2001:db8::10".parse::<IpAddr>().unwrap());
        assert_eq!((raw.protocol, raw.session_age_ns), ("udp", None));
        let clock = ClockPair::now();
        assert_eq!(
            raw.resolve(&clock, None, "p".into()).reason,
            "unknown_device"
        );

        // A packet whose protocol and port could not be read.
        event.family = 4;
        event.proto = 0;
        event.dport = 0;
        event.verdict = Verdict::DroppedUnreadable.code();
        let r = decode(bytemuck::bytes_of(&event))
            .unwrap()
            .resolve(&clock, None, "p".into());
        assert_eq!(
            (r.reason.as_str(), r.protocol.as_str()),
            ("unreadable_packet", "ip")
        );
        assert_eq!(destination(&r), "198.19.10.10");

        assert_eq!(decode(&[0u8; 10]), None);
    }

    #[test]
    fn history_keeps_the_latest() {
        let clock = ClockPair::now();
        let mut history = History::default();
        let raw = RawEvent {
            at_boot_ns: clock.boot_ns,
            verdict: Verdict::DroppedExpired,
            device: "198.18.1.10".parse().unwrap(),
            destination: "198.19.10.10".parse().unwrap(),
            port: 1,
            protocol: "tcp",
            policy: 0,
            set: 0,
            session_age_ns: Some(0),
            action: "drop",
        };
        for port in 0..(HISTORY as u16 + 10) {
            let mut r = raw.resolve(&clock, None, "p".into());
            r.port = port;
            history.push(r);
        }
        let snapshot = history.snapshot();
        assert_eq!(snapshot.len(), HISTORY);
        assert_eq!(snapshot[0].port, 10);
    }
}
