//! Shaped SYNs from an expired device, as an attacker would send them to slip past the
//! kernel's judgement: split into IPv4 fragments whose first carries 8 or 16 bytes of
//! the TCP header (RFC 1858's tiny fragment attack), or behind 8 IPv6
//! destination-options headers. The server reassembles or walks them into a real SYN,
//! so each one must be refused at the gateway: the server never answers it. The same
//! packet from a device with a valid session is answered, which shows the packets are
//! ones the server takes.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    thread,
    time::Duration,
};

use netlab::{shaped, *};

/// Whether `frames` (captured on `cli0`) hold a SYN-ACK from `app:443` to port `sport`.
fn syn_ack_from(frames: &[Vec<u8>], app: IpAddr, sport: u16) -> bool {
    frames.iter().any(|f| {
        let tcp = match (app, u16::from_be_bytes([f[12], f[13]])) {
            (IpAddr::V4(a), 0x0800) if f.len() >= 54 && f[23] == 6 && f[26..30] == a.octets() => {
                14 + usize::from(f[14] & 0x0f) * 4
            }
            (IpAddr::V6(a), 0x86dd) if f.len() >= 74 && f[20] == 6 && f[22..38] == a.octets() => 54,
            _ => return false,
        };
        f.len() >= tcp + 14
            && f[tcp..tcp + 2] == 443u16.to_be_bytes()
            && f[tcp + 2..tcp + 4] == sport.to_be_bytes()
            && f[tcp + 13] & 0x12 == 0x12
    })
}

/// Sends `packets` from the client and says whether the application answered with a
/// SYN-ACK within a second.
fn answered(lab: &Lab, app: IpAddr, sport: u16, packets: &[Vec<u8>]) -> bool {
    let capture = lab.client_link();
    let watcher = thread::spawn(move || capture.capture(Duration::from_millis(1500)));
    thread::sleep(Duration::from_millis(100));
    lab.send_ip_packets(app, packets);
    syn_ack_from(&watcher.join().unwrap(), app, sport)
}

fn v4(addr: IpAddr) -> Ipv4Addr {
    match addr {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => unreachable!("an IPv4 address"),
    }
}

fn v6(addr: IpAddr) -> Ipv6Addr {
    match addr {
        IpAddr::V6(a) => a,
        IpAddr::V4(_) => unreachable!("an IPv6 address"),
    }
}

#[test]
fn a_syn_split_into_tiny_fragments_is_refused() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let agent = lab.start_agent(&lab.config("", APP_POLICY));
    let (fresh, stale) = (device(0), device(1));
    agent.login(fresh, ALICE, NOW);
    agent.login(stale, BOB, 2 * HOUR);
    for (first_bytes, sport) in [(8, 41008), (16, 41016)] {
        let syn = |src| shaped::fragmented_syn(v4(src), v4(APP), sport, 443, first_bytes);
        assert!(
            !answered(&lab, APP, sport, &syn(stale)),
            "the server answered an expired device's SYN split after {first_bytes} bytes"
        );
        assert!(
            answered(&lab, APP, sport, &syn(fresh)),
            "the server did not answer a valid device's SYN split after {first_bytes} bytes: the test proves nothing"
        );
    }
    assert!(agent.counter("dropped_unreadable") >= 2);
    agent.wait_for_log(&["re-authentication required", "reason=unreadable_packet"]);
}

#[test]
fn a_syn_behind_a_long_ipv6_header_chain_is_refused() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let agent = lab.start_agent(&lab.config("", APP_POLICY));
    let (fresh, stale) = (device6(0), device6(1));
    agent.login(fresh, ALICE, NOW);
    agent.login(stale, BOB, 2 * HOUR);
    let syn = |src, sport| shaped::syn_behind_extension_headers(v6(src), v6(APP6), sport, 443, 8);
    assert!(
        !answered(&lab, APP6, 42008, &[syn(stale, 42008)]),
        "the server answered an expired device's SYN behind 8 extension headers"
    );
    assert!(
        answered(&lab, APP6, 42009, &[syn(fresh, 42009)]),
        "the server did not answer a valid device's SYN behind 8 extension headers: the test proves nothing"
    );
    assert!(agent.counter("dropped_unreadable") >= 1);
}
