//! Signing in at the portal: how soon a device whose session expired is let through
//! once its identity provider sends the browser back (the callback request to the
//! first SYN the kernel admits), and how many callbacks the portal completes per
//! second. A real OpenID provider (`oidc-provider`, as in the tests) answers the
//! agent's code exchanges; the sign-ins at the provider are made beforehand, without a
//! browser (`tests/oidc/codes.mjs`), so that the user's part is not measured.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};

use crate::{control::probe_until_admitted, stats::Sample};

const PORTAL: &str = "http://198.18.1.1:8511";
const PORTAL_ADDR: &str = "198.18.1.1:8511";
const ISSUER: &str = "http://198.19.20.10:9000";
const SECRET: &str = "bench-client-secret-0123456789";
/// Callbacks sent at once when measuring the rate.
const CONCURRENT: usize = 8;

#[derive(Clone, Debug, Serialize)]
pub struct SigninReport {
    /// Milliseconds from sending the provider's callback to the portal to the first
    /// SYN the kernel admits from the device.
    pub callback_to_admitted: Sample,
    /// Callbacks completed (code exchanged, token verified, login durable) per second,
    /// `CONCURRENT` at a time.
    pub callbacks_per_second: f64,
    pub callbacks: usize,
}

pub fn run(quick: bool, agent: &Path) -> anyhow::Result<SigninReport> {
    let (runs, rate_count) = if quick { (3, 16) } else { (20, 200) };
    eprintln!("bench: sign-in at the portal ({runs} timed callbacks, {rate_count} for the rate)");
    let lab = netlab::Lab::new(agent);
    let _idp = netlab::oidc::Provider::start(
        &lab.server,
        &netlab::oidc::ProviderOptions {
            listen: "198.19.20.10:9000",
            issuer: ISSUER,
            redirect_uri: &format!("{PORTAL}/callback"),
            client_id: "sessiongate",
            client_secret: SECRET,
            groups: &[],
            tls: None,
        },
    );
    let secrets = tempfile::tempdir()?;
    let secret = secrets.path().join("idp-secret");
    std::fs::write(&secret, SECRET)?;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;
    let agent = lab.start_agent(&lab.config(
        &format!("xdp_mode = \"generic\"\nportal_listen = \"[::]:8511\"\nportal_url = \"{PORTAL}\""),
        &format!(
            "{}on_expired = \"redirect\"\n\n[[idp]]\nname = \"corp\"\nissuer = \"{ISSUER}\"\nclient_id = \"sessiongate\"\nclient_secret_file = \"{}\"\n",
            netlab::APP_POLICY,
            secret.display()
        ),
    ));
    // The sign-ins at the provider, made by the namespace's first address: the device.
    let device = netlab::device(0);
    let callbacks = callbacks(&lab, runs + rate_count)?;
    let (timed, rest) = callbacks.split_at(runs);
    let mut latencies = Vec::with_capacity(runs);
    for url in timed {
        // The device's session has expired: signed in two hours ago, through this IdP.
        let at = netlab::time_ago(Duration::from_secs(7200));
        let ip = device.to_string();
        agent.cli_ok(&[
            "session",
            "login",
            &ip,
            "--user",
            "alice@example.com",
            "--idp",
            "corp",
            "--at",
            &at,
        ]);
        // Neighbour entries on both sides first, so the measurement is the agent's.
        if !lab.tcp_works(device, netlab::OPEN, 443) {
            bail!("{device} cannot reach the unprotected host");
        }
        let latency = lab
            .client
            .run(|| probe_until_admitted(device, || callback(device, url)))?;
        latencies.push(latency.as_secs_f64() * 1e3);
    }
    let started = Instant::now();
    lab.client.run(|| {
        std::thread::scope(|s| {
            let threads: Vec<_> = rest
                .chunks(rest.len().div_ceil(CONCURRENT))
                .map(|share| {
                    s.spawn(move || share.iter().try_for_each(|url| callback(device, url)))
                })
                .collect();
            threads
                .into_iter()
                .try_for_each(|t| t.join().expect("a callback thread panicked"))
        })
    })?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(SigninReport {
        callback_to_admitted: Sample::of(&latencies),
        callbacks_per_second: rest.len() as f64 / seconds,
        callbacks: rest.len(),
    })
}

/// `count` callback addresses, from sign-ins made at the provider by the client
/// namespace's first address.
fn callbacks(lab: &netlab::Lab, count: usize) -> anyhow::Result<Vec<String>> {
    let out = lab
        .client
        .command("node")
        .current_dir(netlab::oidc::dir())
        .arg("codes.mjs")
        .args([
            "--portal",
            PORTAL,
            "--login",
            "alice",
            "--count",
            &count.to_string(),
        ])
        .output()
        .context("node (installed by cargo xtask setup)")?;
    if !out.status.success() {
        bail!("codes.mjs failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let urls: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    if urls.len() != count {
        bail!("codes.mjs gave {} callbacks of {count}", urls.len());
    }
    Ok(urls)
}

/// Sends one callback to the portal from `device` (inside the client namespace) and
/// waits for its answer, which must be the signed-in page.
fn callback(device: IpAddr, url: &str) -> anyhow::Result<()> {
    let path = url
        .strip_prefix(PORTAL)
        .context("a callback to the portal")?;
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&SocketAddr::new(device, 0).into())?;
    let portal: SocketAddr = PORTAL_ADDR.parse()?;
    socket.connect_timeout(&portal.into(), Duration::from_secs(5))?;
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {PORTAL_ADDR}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    if !answer.starts_with("HTTP/1.1 200") {
        bail!(
            "the portal refused a callback: {}",
            answer.lines().next().unwrap_or_default()
        );
    }
    Ok(())
}
