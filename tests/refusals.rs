//! Visible refusals with real traffic: `on_expired = "reject"` answers a refused SYN
//! with a RST and a refused datagram with an ICMP error, which the client's own kernel
//! must accept (so sequence numbers and checksums are right); replies are rate-limited
//! per device; `on_expired = "redirect"` sends HTTP to the agent's portal, which answers
//! 511 with the re-authentication link, while established connections and fresh devices
//! keep reaching the real application.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use netlab::{packets::Packet, *};

/// `APP_POLICY` with an action for expired devices.
fn app_policy(on_expired: &str) -> String {
    format!("{APP_POLICY}on_expired = \"{on_expired}\"\n")
}

/// Replies leave the gateway's veth back towards the client (XDP_TX). In native mode
/// a veth hands such frames to its peer only when the peer runs an XDP program of its
/// own (the kernel's veth does not wake a peer that merely has GRO on); a physical NIC
/// has no such condition. Generic mode sends them through the stack: every test here
/// attaches in it.
const GENERIC: &str = "xdp_mode = \"generic\"";
const REAUTH_URL: &str = "https://sso.example.com/refresh-identity";
const PORTAL: &str = "xdp_mode = \"generic\"\nportal_listen = \"[::]:8511\"\nreauth_url = \"https://sso.example.com/refresh-identity\"";

#[derive(Clone, Copy)]
struct Family {
    device: fn(u8) -> IpAddr,
    app: IpAddr,
    /// A host under no policy.
    open: IpAddr,
    /// What a connected UDP socket reports for the ICMP error this family gets.
    icmp_errno: i32,
}

const V4: Family = Family {
    device,
    app: APP,
    open: OPEN,
    // ICMP destination unreachable, code 13.
    icmp_errno: libc::EHOSTUNREACH,
};
const V6: Family = Family {
    device: device6,
    app: APP6,
    open: OPEN6,
    // ICMPv6 destination unreachable, code 1 (administratively prohibited).
    icmp_errno: libc::EACCES,
};

for_each_family!(reject_refuses_at_once: reject_refuses_at_once_v4, reject_refuses_at_once_v6);

fn reject_refuses_at_once(f: Family) {
    let lab = lab!();
    let agent = lab.start_agent(&lab.config(GENERIC, &app_policy("reject")));
    let (fresh, stale) = ((f.device)(0), (f.device)(1));
    agent.login(fresh, ALICE, NOW);
    agent.login(stale, BOB, 2 * HOUR);

    // TCP: the RST makes connect() fail at once.
    let started = Instant::now();
    let refused = lab.tcp_connect(stale, f.app, 443, SHOULD_PASS);
    let took = started.elapsed();
    match refused {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}"),
        Ok(_) => panic!("an expired device connected"),
    }
    assert!(took < Duration::from_millis(500), "refused after {took:?}");

    // UDP: the ICMP error reaches a connected socket.
    let socket = lab.udp_socket(stale);
    socket.connect(SocketAddr::new(f.app, 4433)).unwrap();
    socket.set_read_timeout(Some(SHOULD_PASS)).unwrap();
    let started = Instant::now();
    socket.send(b"hello?").unwrap();
    let error = socket
        .recv(&mut [0u8; 64])
        .expect_err("an expired device got an answer");
    assert_eq!(
        error.raw_os_error(),
        Some(f.icmp_errno),
        "the ICMP error, not a timeout: {error}"
    );
    assert!(started.elapsed() < Duration::from_millis(500));

    // Nothing changes for a device with a fresh session.
    assert!(lab.tcp_works(fresh, f.app, 443));
    assert!(udp_works(&lab.udp_socket(fresh), f.app, 4433));
    assert!(agent.counter("replies_tcp_reset") >= 1);
    assert!(agent.counter("replies_icmp") >= 1);
    assert_eq!(agent.counter("replies_failed"), 0);
    // The refusal is reported with what the device got.
    agent.wait_for_log(&["re-authentication required", "action=reject"]);
}

#[test]
fn replies_on_a_native_veth_are_warned_about() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let mut agent = lab.start_agent(&lab.config("xdp_mode = \"native\"", &app_policy("reject")));
    agent.wait_for_log(&["WARN", "native XDP mode", "xdp_mode = \"generic\""]);
    agent.stop();
    // Drop policies send nothing back: no warning.
    let quiet = lab.start_agent_with(
        &lab.config("xdp_mode = \"native\"", &app_policy("drop")),
        &[],
    );
    assert!(!quiet.log_text().contains("native XDP mode"));
}

/// Frames on `cli0` that are TCP resets from `app`.
fn resets_from(frames: &[Vec<u8>], app: IpAddr) -> usize {
    let IpAddr::V4(app) = app else {
        unreachable!("IPv4 only")
    };
    frames
        .iter()
        .filter(|f| {
            f.len() >= 54
                && f[12..14] == [0x08, 0x00]
                && f[23] == 6
                && f[26..30] == app.octets()
                && f[47] & 0x04 != 0
        })
        .count()
}

#[test]
fn a_syn_flood_gets_resets_only_at_the_configured_rate() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let agent = lab.start_agent(&lab.config(
        &format!("{GENERIC}\nreply_rate = 5\nreply_burst = 5"),
        &app_policy("reject"),
    ));
    let (stale, other) = (device(1), device(2));
    agent.login(stale, BOB, 2 * HOUR);
    agent.login(other, CAROL, 2 * HOUR);

    // A generator's flood from one device: 2,000 SYNs in 0.2 s, then 2,000 more a
    // second later. Paced in runs of 100: the kernel's per-CPU receive backlog (1,000
    // packets) is shared with the other tests' namespaces, whose packets an unpaced
    // burst would push out.
    let link = lab.client_link();
    let capture = lab.client_link();
    let watcher = thread::spawn(move || capture.capture(Duration::from_millis(3500)));
    thread::sleep(Duration::from_millis(100));
    let syn = Packet::syn(stale, APP, 443).bytes();
    let started = Instant::now();
    for _ in 0..2 {
        for _ in 0..20 {
            for _ in 0..100 {
                link.send(&syn).unwrap();
            }
            thread::sleep(Duration::from_millis(10));
        }
        thread::sleep(Duration::from_secs(1));
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Another device is not held back by the first one's flood.
    link.send(&Packet::syn(other, APP, 443).bytes()).unwrap();
    let frames = watcher.join().unwrap();

    let sent = agent.counter("replies_tcp_reset");
    let limited = agent.counter("replies_rate_limited");
    let seen = resets_from(&frames, APP);
    let allowed = 5 + (5.0 * elapsed).ceil() as u64 + 1 + 1;
    println!(
        "flood: 4,000 SYNs over {elapsed:.2} s: {sent} resets sent, {seen} seen by the client, {limited} dropped by the limit"
    );
    assert!(
        sent > 5,
        "the burst of 5 and the other device's one were answered"
    );
    assert!(sent <= allowed, "{sent} resets, at most {allowed} allowed");
    assert_eq!(
        sent + limited,
        4001,
        "every refused SYN is answered or counted"
    );
    assert_eq!(seen as u64, sent, "every reset sent reached the client");
    assert_eq!(agent.counter("dropped_expired"), 4001);
}

/// `curl -i` from device address `src`; the status code and the whole response.
fn curl(lab: &Lab, src: IpAddr, url: &str) -> (u16, String, Duration) {
    let started = Instant::now();
    let out = lab
        .client
        .command("curl")
        .args(["-sS", "-i", "-g", "--max-time", "3", "--interface"])
        .arg(src.to_string())
        .arg(url)
        .output()
        .expect("curl");
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (
        status,
        format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
        took,
    )
}

fn url(app: IpAddr) -> String {
    match app {
        IpAddr::V4(a) => format!("http://{a}/"),
        IpAddr::V6(a) => format!("http://[{a}]/"),
    }
}

for_each_family!(redirect_sends_http_to_the_portal: redirect_sends_http_to_the_portal_v4, redirect_sends_http_to_the_portal_v6);

fn redirect_sends_http_to_the_portal(f: Family) {
    let lab = lab!();
    let mut agent = lab.start_agent(&lab.config(PORTAL, &app_policy("redirect")));
    let (fresh, stale, long) = ((f.device)(0), (f.device)(1), (f.device)(2));
    let app = url(f.app);
    agent.login(fresh, ALICE, NOW);
    agent.login(stale, BOB, 2 * HOUR);
    // A connection opened while the session was fresh, which then expires.
    agent.login(long, CAROL, NOW);
    let mut established = lab.tcp_connect(long, f.app, 80, SHOULD_PASS).unwrap();
    echo_tcp(&mut established, b"before").unwrap();
    agent.login(long, CAROL, 2 * HOUR);
    // The expired device has been using the network (so the gateway has its link-layer
    // address, as for any device that talks through it): the first IPv6 portal
    // connection of a device the gateway has never heard from sometimes waits for the
    // client's SYN retransmission (1 s) under parallel test load.
    assert!(lab.tcp_works(stale, f.open, 443));

    // The expired device's browser gets the portal's page, at once.
    let (status, page, took) = curl(&lab, stale, &app);
    assert_eq!(status, 511, "{page}");
    assert!(
        took < Duration::from_secs(1),
        "the portal answered after {took:?}"
    );
    assert!(page.contains(&format!("href=\"{REAUTH_URL}\"")), "{page}");
    assert!(page.contains(BOB), "the page names the user: {page}");
    // The portal saw the device's own address, and the policy that refused it.
    assert!(page.contains(&stale.to_string()), "{page}");
    assert!(page.contains("App"), "{page}");
    assert!(!page.contains(APP_PAGE), "{page}");
    // So does the device whose connection predates the expiry, for a new one...
    assert_eq!(curl(&lab, long, &app).0, 511);
    // ...while that connection keeps talking to the real application.
    echo_tcp(&mut established, b"after").expect("the established connection still echoes");

    // A fresh device reaches the application; other ports of the policy are rejected.
    let (status, page, _) = curl(&lab, fresh, &app);
    assert_eq!(status, 200, "{page}");
    assert!(page.contains(APP_PAGE), "{page}");
    let refused = lab.tcp_connect(stale, f.app, 443, SHOULD_PASS);
    assert_eq!(
        refused.map(|_| ()).unwrap_err().kind(),
        io::ErrorKind::ConnectionRefused
    );

    // After re-authenticating, the same request reaches the application.
    agent.login(stale, BOB, NOW);
    let (status, page, _) = curl(&lab, stale, &app);
    assert_eq!(status, 200, "{page}");
    assert!(page.contains(APP_PAGE), "{page}");
    assert!(agent.counter("portal_delivered") >= 2);
    agent.wait_for_log(&["re-authentication required", "action=redirect"]);

    // With the agent gone, the pinned programs keep an expired device's HTTP away
    // from the application: no portal, no way through.
    agent.login(stale, BOB, 2 * HOUR);
    agent.kill();
    let (status, page, _) = curl(&lab, stale, &app);
    assert_eq!(status, 0, "nothing answers without the portal: {page}");
    assert!(!page.contains(APP_PAGE), "{page}");
    let (status, _, _) = curl(&lab, fresh, &app);
    assert_eq!(status, 200, "fresh devices are unaffected");
    let _agent = lab.start_agent(&lab.config(PORTAL, &app_policy("redirect")));
    assert_eq!(
        curl(&lab, stale, &app).0,
        511,
        "the restarted portal answers"
    );
}

#[test]
fn auto_mode_picks_a_mode_in_which_replies_arrive_on_a_veth() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    // xdp_mode is left to its default, auto.
    let agent = lab.start_agent(&lab.config("", &app_policy("reject")));
    let stale = device(1);
    agent.login(stale, BOB, 2 * HOUR);
    let started = Instant::now();
    match lab.tcp_connect(stale, APP, 443, SHOULD_PASS) {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}"),
        Ok(_) => panic!("an expired device connected"),
    }
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "no reset arrived"
    );
    let stats = agent.cli_ok(&["stats"]);
    assert!(stats.contains("(generic)"), "{stats}");
    agent.wait_for_log(&["xdp_mode auto: generic mode on this veth"]);
    // With only drop policies, auto still prefers native.
    drop(agent);
    let lab = lab!();
    let agent = lab.start_agent(&lab.config("", &app_policy("drop")));
    assert!(agent.cli_ok(&["stats"]).contains("(native)"));
}

#[test]
fn a_device_flooding_the_portal_with_idle_connections_starves_no_one() {
    if !privileged!() {
        return;
    }
    let lab = lab!();
    let agent = lab.start_agent(&lab.config(PORTAL, &app_policy("redirect")));
    let portal = SocketAddr::new("198.18.1.1".parse().unwrap(), 8511);
    let (flooder, other) = (device(1), device(2));
    // One device opens 200 connections to the portal and sends nothing.
    let mut held: Vec<std::net::TcpStream> = (0..200)
        .filter_map(|_| {
            lab.tcp_connect(flooder, portal.ip(), portal.port(), SHOULD_PASS)
                .ok()
        })
        .collect();
    assert!(!held.is_empty(), "no connection to the portal at all");
    thread::sleep(Duration::from_millis(500));
    let open = |held: &mut Vec<std::net::TcpStream>| {
        held.iter_mut()
            .filter_map(|s| {
                s.set_nonblocking(true).unwrap();
                // Still open: nothing to read yet (WouldBlock), no EOF and no reset.
                matches!(
                    io::Read::read(s, &mut [0u8; 1]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock
                )
                .then_some(())
            })
            .count()
    };
    let still_open = open(&mut held);
    assert!(
        still_open <= 16,
        "{still_open} connections of one device kept open"
    );
    // The API, another device's portal page and the log are unaffected.
    let started = Instant::now();
    agent.cli_ok(&["stats"]);
    assert!(started.elapsed() < Duration::from_secs(2));
    let (status, _, _) = curl(&lab, other, &format!("http://{portal}/"));
    assert_eq!(status, 511);
    agent.wait_for_log(&[
        "connection limit reached",
        "portal_listen",
        "most one client may",
    ]);
    let warnings = agent.log_text().matches("connection limit reached").count();
    assert!(warnings <= 2, "{warnings} warnings: the log is flooded");
    // The idle ones are closed after the portal's idle limit (10 s).
    thread::sleep(Duration::from_secs(11));
    assert_eq!(open(&mut held), 0, "idle portal connections were kept");
}
