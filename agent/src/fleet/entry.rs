//! The etcd layout of a fleet's sessions, which identity-provider hooks may write too:
//!
//! ```text
//! {prefix}/devices/{ip}  ->  {"user": "alice@example.com", "idp": "okta",
//!                             "authenticated_at": "2026-11-23T09:30:00Z",
//!                             "groups": ["staff"]}
//! ```
//! `ip` is the device address in its canonical text form (`198.18.1.10`, `2001:db8::10`).
//! `idp` may be left out (`"default"`), and `groups` (none); unknown fields are ignored. A deleted key is a
//! logout. An entry that breaks these rules is no session: the device is refused, as one
//! without a session, and the agent logs and counts it.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{
    clock::ClockPair,
    input::address,
    sessions::{DEFAULT_IDP, LoginRequest, SessionRecord, plan_login},
};

/// The JSON value of a device key.
#[derive(Debug, Serialize, Deserialize)]
struct DeviceEntry {
    user: String,
    #[serde(default = "default_idp")]
    idp: String,
    #[serde(with = "time::serde::rfc3339")]
    authenticated_at: OffsetDateTime,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    groups: Vec<String>,
}

fn default_idp() -> String {
    DEFAULT_IDP.to_string()
}

/// Where a fleet's keys live under its prefix.
#[derive(Clone, Debug)]
pub struct Layout {
    /// `{prefix}/devices/`
    devices: String,
}

impl Layout {
    pub fn new(prefix: &str) -> Self {
        Self {
            devices: format!("{prefix}/devices/"),
        }
    }

    /// The prefix every device key starts with (what agents watch).
    pub fn devices(&self) -> &str {
        &self.devices
    }

    pub fn key(&self, ip: IpAddr) -> String {
        format!("{}{ip}", self.devices)
    }

    /// The device a key names, if it is a device key in canonical form. Any other
    /// spelling of an address (`2001:DB8::10`, `::ffff:198.18.1.10`, leading zeros) is
    /// refused rather than read as that device: two keys must never hold one device.
    pub fn device(&self, key: &[u8]) -> Result<IpAddr, String> {
        let text = std::str::from_utf8(key).map_err(|_| "the key is not UTF-8".to_string())?;
        let rest = text
            .strip_prefix(&self.devices)
            .ok_or_else(|| format!("{text:?} is outside {}", self.devices))?;
        let ip = address::parse_device(rest).map_err(|e| e.to_string())?;
        if !address::is_canonical_text(rest, ip) {
            return Err(format!(
                "{rest:?} is not the canonical form of {ip} (write {:?})",
                self.key(ip)
            ));
        }
        Ok(ip)
    }
}

/// A record's value in etcd. The boot-clock fields stay on the host that made it.
pub fn encode(record: &SessionRecord) -> Vec<u8> {
    serde_json::to_vec(&DeviceEntry {
        user: record.user.clone(),
        idp: record.idp.clone(),
        authenticated_at: record.authenticated_at,
        groups: record.groups.clone(),
    })
    .expect("entries always serialize")
}

/// A device key's value as this host's session record: the wall-clock time placed on
/// this host's boot clock now. A time a little ahead of ours is taken as now (clock
/// skew between hosts); further ahead is refused, as a login would be.
pub fn decode(
    ip: IpAddr,
    value: &[u8],
    clock: &ClockPair,
    boot_id: &str,
) -> Result<SessionRecord, String> {
    let entry: DeviceEntry = serde_json::from_slice(value).map_err(|e| {
        format!("the value is not {{\"user\", \"idp\", \"authenticated_at\"}} JSON: {e}")
    })?;
    // The login rules' checks of names and times, against no previous session.
    let as_login = LoginRequest {
        ip,
        user: entry.user,
        idp: Some(entry.idp),
        at: Some(entry.authenticated_at),
        groups: entry.groups,
    };
    plan_login(None, &as_login, clock, boot_id).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock() -> ClockPair {
        ClockPair::now()
    }

    #[test]
    fn keys_are_canonical_addresses_under_the_prefix() {
        let layout = Layout::new("/sg");
        let ip: IpAddr = "2001:db8::10".parse().unwrap();
        assert_eq!(layout.key(ip), "/sg/devices/2001:db8::10");
        assert_eq!(layout.device(layout.key(ip).as_bytes()), Ok(ip));
        assert_eq!(
            layout.device(b"/sg/devices/198.18.1.10"),
            Ok("198.18.1.10".parse().unwrap())
        );
        let upper = layout.device(b"/sg/devices/2001:DB8::10").unwrap_err();
        assert!(upper.contains("canonical") && upper.contains("/sg/devices/2001:db8::10"));
        assert!(
            layout
                .device(b"/sg/devices/host")
                .unwrap_err()
                .contains("not an IPv4 or IPv6 address")
        );
        assert!(
            layout
                .device(b"/other/198.18.1.10")
                .unwrap_err()
                .contains("outside")
        );
    }

    #[test]
    fn other_spellings_of_a_device_and_non_devices_are_not_device_keys() {
        let layout = Layout::new("/sg");
        let mapped = layout
            .device(b"/sg/devices/::ffff:198.18.1.10")
            .unwrap_err();
        assert!(
            mapped.contains("canonical") && mapped.contains("\"/sg/devices/198.18.1.10\""),
            "{mapped}"
        );
        let zeros = layout.device(b"/sg/devices/198.018.1.10").unwrap_err();
        assert!(zeros.contains("leading zero"), "{zeros}");
        for key in [
            "224.0.0.1",
            "255.255.255.255",
            "0.0.0.0",
            "127.0.0.1",
            "::1",
            "ff02::1",
        ] {
            let e = layout
                .device(format!("/sg/devices/{key}").as_bytes())
                .unwrap_err();
            assert!(e.contains("cannot be a device"), "{key}: {e}");
        }
    }

    #[test]
    fn values_with_invisible_or_oversized_names_are_not_sessions() {
        let clock = clock();
        let ip: IpAddr = "198.18.1.10".parse().unwrap();
        let at = "2020-01-01T00:00:00Z";
        for (user, idp, needle) in [
            ("alice\\u202e", "okta", "U+202E"),
            ("alice\\u200b", "okta", "U+200B"),
            ("\\ufeffalice", "okta", "U+FEFF"),
            ("alice", "ok\\nta", "U+000A"),
            ("alice", "ok\\u001bta", "U+001B"),
        ] {
            let value = format!(r#"{{"user":"{user}","idp":"{idp}","authenticated_at":"{at}"}}"#);
            let e = decode(ip, value.as_bytes(), &clock, "boot").unwrap_err();
            assert!(e.contains(needle), "{value}: {e}");
            assert!(!e.contains('\n') && !e.contains('\u{1b}'), "{e:?}");
        }
        let long = "a".repeat(300);
        let value = format!(r#"{{"user":"{long}","authenticated_at":"{at}"}}"#);
        let e = decode(ip, value.as_bytes(), &clock, "boot").unwrap_err();
        assert!(e.contains("300 bytes long") && e.len() < 200, "{e}");
    }

    #[test]
    fn values_round_trip_and_idp_defaults() {
        let clock = clock();
        let ip: IpAddr = "198.18.1.10".parse().unwrap();
        let at = clock.wall - time::Duration::minutes(5);
        let text = format!(
            r#"{{"user":"alice@example.com","authenticated_at":"{}","extra":1}}"#,
            at.format(&time::format_description::well_known::Rfc3339)
                .unwrap()
        );
        let record = decode(ip, text.as_bytes(), &clock, "boot").unwrap();
        assert_eq!(record.user, "alice@example.com");
        assert_eq!(record.idp, DEFAULT_IDP);
        assert_eq!(record.authenticated_at, at);
        assert_eq!(record.authenticated_at_boot_ns, clock.boot_ns_of(at));
        let again = decode(ip, &encode(&record), &clock, "boot").unwrap();
        assert_eq!(again, record);
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        let clock = clock();
        let ip: IpAddr = "198.18.1.10".parse().unwrap();
        let bad = |v: &str| decode(ip, v.as_bytes(), &clock, "boot").unwrap_err();
        assert!(bad("not json").contains("JSON"));
        assert!(
            bad(r#"{"user":"a b","authenticated_at":"2020-01-01T00:00:00Z"}"#).contains("user")
        );
        assert!(bad(r#"{"user":"a","authenticated_at":"yesterday"}"#).contains("JSON"));
        assert!(
            bad(r#"{"user":"a","authenticated_at":"2999-01-01T00:00:00Z"}"#).contains("future")
        );
    }
}
