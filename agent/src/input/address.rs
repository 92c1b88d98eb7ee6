//! Addresses as they enter the agent: one reading of every text form, so that one
//! device has one identity whether it arrives through the API, the CLI, an import
//! file, an etcd key or the config.
//!
//! - IPv4 is dotted decimal with no leading zeros: `198.010.2.010` is refused, since
//!   some tools read `010` as octal (8) and others as decimal (10).
//! - An IPv4-mapped IPv6 address (`::ffff:198.18.1.2`) is the IPv4 address it maps:
//!   the kernel sees that device's packets as IPv4, so a second identity for it would
//!   be one its traffic never meets.
//! - A device is an address packets can come from: not unspecified, broadcast,
//!   multicast or loopback, and not in the deprecated IPv4-compatible form (`::a.b.c.d`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net};
use thiserror::Error;

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("{text:?} is not an IPv4 or IPv6 address")]
    Syntax { text: String },
    #[error(
        "{text:?} has a leading zero in an IPv4 part, which some tools read as octal and others as decimal; write each part without leading zeros (e.g. {fixed})"
    )]
    LeadingZero { text: String, fixed: String },
    #[error("{text:?} is not a CIDR (like 198.18.0.0/24) or an IP address")]
    NetSyntax { text: String },
    #[error("{text:?} has host bits set; did you mean {suggestion}?")]
    HostBits { text: String, suggestion: IpNet },
    #[error("{ip} cannot be a device: {reason}")]
    NotADevice { ip: IpAddr, reason: &'static str },
    #[error("{ip} is the IPv4 device {canonical}; name it so")]
    NotCanonical { ip: IpAddr, canonical: IpAddr },
}

/// An address in any accepted text form, IPv4-mapped IPv6 read as IPv4.
pub fn parse_ip(text: &str) -> Result<IpAddr, AddressError> {
    parse_exact(text).map(|ip| ip.to_canonical())
}

/// A device's address: `parse_ip`, then `device`.
pub fn parse_device(text: &str) -> Result<IpAddr, AddressError> {
    device(parse_ip(text)?)
}

/// The device `ip` names (its IPv4 address if it is IPv4-mapped), or why no packet
/// can come from it.
pub fn device(ip: IpAddr) -> Result<IpAddr, AddressError> {
    let ip = ip.to_canonical();
    let reason = match ip {
        IpAddr::V4(a) if a.is_unspecified() => Some("it is the unspecified address"),
        IpAddr::V4(a) if a.is_broadcast() => Some("it is the limited broadcast address"),
        IpAddr::V4(a) if a.is_multicast() => Some("it is a multicast address"),
        IpAddr::V4(a) if a.is_loopback() => {
            Some("it is a loopback address, which never arrives on an interface")
        }
        IpAddr::V6(a) if a.is_unspecified() => Some("it is the unspecified address"),
        IpAddr::V6(a) if a.is_multicast() => Some("it is a multicast address"),
        IpAddr::V6(a) if a.is_loopback() => {
            Some("it is a loopback address, which never arrives on an interface")
        }
        IpAddr::V6(a) if is_ipv4_compatible(a) => {
            Some("it is in the deprecated IPv4-compatible form (::a.b.c.d); write the IPv4 address")
        }
        _ => None,
    };
    match reason {
        Some(reason) => Err(AddressError::NotADevice { ip, reason }),
        None => Ok(ip),
    }
}

/// Whether `text` is the one form the agent writes for `ip` (etcd keys, the journal):
/// canonical, and IPv4 for an IPv4-mapped address.
pub fn is_canonical_text(text: &str, ip: IpAddr) -> bool {
    ip == ip.to_canonical() && ip.to_string() == text
}

/// A CIDR, or an address as a host route. IPv4-mapped networks (`::ffff:198.18.0.0/120`)
/// are the IPv4 networks they map; a network with host bits set is refused rather than
/// silently widened or narrowed.
pub fn parse_net(text: &str) -> Result<IpNet, AddressError> {
    let Some((addr, len)) = text.split_once('/') else {
        return match parse_ip(text) {
            Ok(ip) => Ok(IpNet::from(ip)),
            Err(AddressError::Syntax { .. }) => Err(AddressError::NetSyntax { text: text.into() }),
            Err(e) => Err(e),
        };
    };
    let syntax = || AddressError::NetSyntax { text: text.into() };
    let ip = match parse_exact(addr) {
        Ok(ip) => ip,
        Err(AddressError::LeadingZero { fixed, .. }) => {
            return Err(AddressError::LeadingZero {
                text: text.into(),
                fixed: format!("{fixed}/{len}"),
            });
        }
        Err(_) => return Err(syntax()),
    };
    let len = prefix_len(len).ok_or_else(syntax)?;
    let net = IpNet::new(ip, len).map_err(|_| syntax())?;
    let net = match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(Ipv4Net::new(v4, v6.prefix_len() - 96).map_err(|_| syntax())?),
            None => net,
        },
        _ => net,
    };
    if net.trunc() != net {
        return Err(AddressError::HostBits {
            text: text.into(),
            suggestion: net.trunc(),
        });
    }
    Ok(net)
}

/// The standard library's reading (RFC 4291 for IPv6; dotted decimal with no leading
/// zeros and exactly four parts for IPv4), with a clearer error for leading zeros.
fn parse_exact(text: &str) -> Result<IpAddr, AddressError> {
    text.parse().map_err(|_| match without_leading_zeros(text) {
        Some(fixed) => AddressError::LeadingZero {
            text: text.into(),
            fixed,
        },
        None => AddressError::Syntax { text: text.into() },
    })
}

/// `text` with the leading zeros of its dotted IPv4 part removed, if that is what made
/// it unreadable.
fn without_leading_zeros(text: &str) -> Option<String> {
    let dotted_from = text.rfind(':').map_or(0, |i| i + 1);
    let (head, dotted) = text.split_at(dotted_from);
    let parts: Vec<&str> = dotted.split('.').collect();
    let padded = |p: &&str| p.len() > 1 && p.starts_with('0');
    if parts.len() != 4
        || !parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        || !parts.iter().any(padded)
    {
        return None;
    }
    let trimmed: Vec<&str> = parts
        .iter()
        .map(|p| match p.trim_start_matches('0') {
            "" => "0",
            rest => rest,
        })
        .collect();
    let fixed = format!("{head}{}", trimmed.join("."));
    fixed.parse::<IpAddr>().is_ok().then_some(fixed)
}

/// A prefix length in plain decimal (no sign, no leading zeros).
fn prefix_len(text: &str) -> Option<u8> {
    let plain = !text.is_empty()
        && text.len() <= 3
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    plain.then(|| text.parse().ok()).flatten()
}

/// `::a.b.c.d` (RFC 4291 2.5.5.1), other than `::` and `::1`.
fn is_ipv4_compatible(a: Ipv6Addr) -> bool {
    let o = a.octets();
    o[..12].iter().all(|&b| b == 0)
        && Ipv4Addr::new(o[12], o[13], o[14], o[15]) > Ipv4Addr::new(0, 0, 0, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn an_ipv4_mapped_address_is_the_ipv4_address() {
        assert_eq!(parse_ip("::ffff:198.18.1.2"), Ok(ip("198.18.1.2")));
        assert_eq!(parse_ip("::FFFF:c612:0102"), Ok(ip("198.18.1.2")));
        assert_eq!(parse_device("::ffff:198.18.1.2"), Ok(ip("198.18.1.2")));
        assert_eq!(device(ip("::ffff:198.18.1.2")), Ok(ip("198.18.1.2")));
        assert_eq!(parse_ip("2001:db8::10"), Ok(ip("2001:db8::10")));
        assert_eq!(parse_ip("2001:0db8:0000::0010"), Ok(ip("2001:db8::10")));
    }

    #[test]
    fn leading_zeros_in_ipv4_are_refused_everywhere_with_the_fix() {
        for (text, fixed) in [
            ("198.010.2.010", "198.10.2.10"),
            ("010.0.0.1", "10.0.0.1"),
            ("198.18.1.00", "198.18.1.0"),
            ("::ffff:198.018.1.2", "::ffff:198.18.1.2"),
        ] {
            let e = parse_ip(text).unwrap_err();
            assert_eq!(
                e,
                AddressError::LeadingZero {
                    text: text.into(),
                    fixed: fixed.into()
                }
            );
            assert!(e.to_string().contains("octal"), "{e}");
            assert!(parse_device(text).is_err());
        }
        let e = parse_net("198.010.2.0/24").unwrap_err();
        assert!(e.to_string().contains("e.g. 198.10.2.0/24"), "{e}");
        assert!(matches!(
            parse_net("198.010.2.10"),
            Err(AddressError::LeadingZero { .. })
        ));
        // Zero itself is not a leading zero.
        assert_eq!(parse_ip("198.18.0.0"), Ok(ip("198.18.0.0")));
    }

    #[test]
    fn other_malformed_text_is_a_syntax_error() {
        for text in [
            "",
            "host",
            "198.18.1",
            "198.18.1.2.3",
            "198.18.1.256",
            " 198.18.1.2",
            "0x7f.0.0.1",
            "fe80::1%eth0",
            "198.18.1.2/32",
        ] {
            assert_eq!(
                parse_ip(text),
                Err(AddressError::Syntax { text: text.into() }),
                "{text:?}"
            );
        }
    }

    #[test]
    fn addresses_no_packet_comes_from_are_not_devices() {
        for (text, needle) in [
            ("0.0.0.0", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("224.0.0.1", "multicast"),
            ("239.1.2.3", "multicast"),
            ("127.0.0.1", "loopback"),
            ("127.1.2.3", "loopback"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:0.0.0.0", "unspecified"),
            ("::198.18.1.2", "IPv4-compatible"),
        ] {
            let e = parse_device(text).unwrap_err();
            let message = e.to_string();
            assert!(
                message.contains("cannot be a device") && message.contains(needle),
                "{text}: {message}"
            );
        }
        // The error names the device as it is understood.
        assert!(
            parse_device("::ffff:127.0.0.1")
                .unwrap_err()
                .to_string()
                .starts_with("127.0.0.1 ")
        );
        for text in [
            "198.18.1.2",
            "2001:db8::10",
            "fe80::1",
            "10.0.0.255",
            "198.18.255.255",
        ] {
            assert_eq!(parse_device(text), Ok(ip(text)));
        }
    }

    #[test]
    fn canonical_text_is_the_agents_own_form() {
        assert!(is_canonical_text("198.18.1.2", ip("198.18.1.2")));
        assert!(is_canonical_text("2001:db8::10", ip("2001:db8::10")));
        assert!(!is_canonical_text("2001:DB8::10", ip("2001:db8::10")));
        assert!(!is_canonical_text(
            "::ffff:198.18.1.2",
            ip("::ffff:198.18.1.2")
        ));
    }

    #[test]
    fn networks_are_read_as_strictly_as_addresses() {
        let net = |t: &str| t.parse::<IpNet>().unwrap();
        assert_eq!(parse_net("198.19.10.0/24"), Ok(net("198.19.10.0/24")));
        assert_eq!(parse_net("198.19.10.10"), Ok(net("198.19.10.10/32")));
        assert_eq!(parse_net("2001:db8:10::/48"), Ok(net("2001:db8:10::/48")));
        assert_eq!(parse_net("0.0.0.0/0"), Ok(net("0.0.0.0/0")));
        assert_eq!(
            parse_net("::ffff:198.19.10.0/120"),
            Ok(net("198.19.10.0/24"))
        );
        assert_eq!(parse_net("::ffff:198.19.10.10"), Ok(net("198.19.10.10/32")));
        assert_eq!(parse_net("::ffff:0:0/96"), Ok(net("0.0.0.0/0")));
        // Wider than the mapped range: an IPv6 network.
        assert_eq!(parse_net("::/64"), Ok(net("::/64")));
        assert_eq!(
            parse_net("::ffff:198.19.10.1/120").unwrap_err().to_string(),
            "\"::ffff:198.19.10.1/120\" has host bits set; did you mean 198.19.10.0/24?"
        );
        for text in [
            "198.19.10.0/024",
            "198.19.10.0/+24",
            "198.19.10.0/33",
            "198.19.10.0/",
            "/24",
            "host/24",
            "2001:db8::/129",
            "198.19.10.0/24/1",
        ] {
            assert_eq!(
                parse_net(text),
                Err(AddressError::NetSyntax { text: text.into() }),
                "{text:?}"
            );
        }
    }
}
