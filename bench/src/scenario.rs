//! Benchmark workloads: policy sets of a given number of CIDRs with a realistic mix of
//! prefix lengths (mostly host routes and small subnets, some wide ranges, IPv4 and
//! IPv6, nested and overlapping), device populations, and tracked flows. Everything
//! stays inside 198.18.0.0/15 and 2001:db8::/32; devices live in 198.18.0.0/16 and
//! 2001:db8:1::/48, applications in 198.19.0.0/16 and 2001:db8:10::/44.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};

/// The destination every per-packet benchmark sends to: inside a /28 inside a /24
/// inside the /16 baseline, so the longest-prefix match walks a nested table.
pub const APP: Ipv4Addr = Ipv4Addr::new(198, 19, 10, 10);
pub const APP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x10);
/// A destination no policy covers.
pub const UNPROTECTED: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 1);
/// The DNS resolver, inside the protected range.
pub const RESOLVER: Ipv4Addr = Ipv4Addr::new(198, 19, 10, 53);

/// Seconds the "expired" devices' sessions are old: beyond every duration used here.
pub const EXPIRED_AGE_SECS: u64 = 30 * 86_400;

/// One session-checked application (`APP`'s /24), for the end-to-end and control-plane
/// measures.
pub const APP_POLICY: &str = r#"
[[policy]]
name = "App"
precedence = 1
destinations = ["198.19.10.0/24"]
check_session = { enforce = true, duration = "1h" }
"#;

/// Identity-conditioned policies in `policies`: as many as a config may hold.
pub const IDENTITY_POLICIES: usize = 64;
/// Where they apply: the identity-decided application the benchmarks send to.
pub const IDENTITY_APP: Ipv4Addr = Ipv4Addr::new(198, 19, 11, 10);
/// The group of the benchmark's own devices: the 41st condition of the 64.
pub const BENCH_GROUP: &str = "team-40";

/// A policy file with `cidrs` destination CIDRs in total (at least 10): the
/// application the benchmarks send to, random applications, 64 identity-conditioned
/// policies (one per group `team-N`) over `IDENTITY_APP`'s /24, and a 7-day baseline.
pub fn policies(cidrs: usize, seed: u64) -> String {
    let mut rng = StdRng::seed_from_u64(seed);
    // The nested chain the benchmark packets hit belongs to its own policy; the
    // baseline adds two more prefixes, so the random ones fill the rest.
    let chain = [
        "198.19.10.0/28",
        "198.19.10.0/24",
        "2001:db8:10::/64",
        "2001:db8:10::/48",
    ];
    let mut nets: BTreeSet<String> = BTreeSet::new();
    while nets.len() < cidrs.saturating_sub(chain.len() + 3) {
        let net = random_cidr(&mut rng);
        if !chain.contains(&net.as_str()) && net != "198.19.11.0/24" {
            nets.insert(net);
        }
    }
    let mut nets: Vec<String> = nets.into_iter().collect();
    // Shuffle so that policies own unrelated prefixes, as real lists do.
    for i in (1..nets.len()).rev() {
        nets.swap(i, rng.random_range(0..=i));
    }

    let mut out = format!(
        "[dns]\nports = [53]\n\n[[policy]]\nname = \"wiki\"\nprecedence = 1000\ndestinations = [{}]\ncheck_session = {{ enforce = true, duration = \"1h30m0s\" }}\n\n",
        chain.map(|n| format!("\"{n}\"")).join(", ")
    );
    let per_policy = (nets.len() / 200).clamp(3, 50);
    let durations = ["1h", "1h30m0s", "8h", "24h", "72h"];
    let mut precedence = 100;
    for (i, chunk) in nets.chunks(per_policy).enumerate() {
        let list = chunk
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let narrowed = i % 3 == 1;
        let _ = write!(
            out,
            "[[policy]]\nname = \"app-{i}\"\nprecedence = {precedence}\ndestinations = [{list}]\n{}check_session = {{ enforce = true, duration = \"{}\" }}\n\n",
            if narrowed {
                "protocol = \"tcp\"\nports = [443, 8443]\n"
            } else {
                ""
            },
            durations.choose(&mut rng).expect("non-empty"),
        );
        precedence += 1 + rng.random_range(0..5);
    }
    // One policy per team on one application, before everything else: an answer there
    // depends on who the device is, with all 64 bits to choose from.
    for team in 0..IDENTITY_POLICIES {
        let _ = write!(
            out,
            "[[policy]]\nname = \"ledger team-{team}\"\nprecedence = {}\ndestinations = [\"198.19.11.0/24\"]\ncheck_session = {{ enforce = true, duration = \"1h\" }}\nidentity = {{ groups = [\"team-{team}\"] }}\n\n",
            10 + team
        );
    }
    // A 7-day baseline over all applications, evaluated last (Gateway's "global timeout").
    let _ = write!(
        out,
        "[[policy]]\nname = \"baseline\"\nprecedence = 100000\ndestinations = [\"198.19.0.0/16\", \"2001:db8:10::/44\"]\ncheck_session = {{ enforce = true, duration = \"168h\" }}\n"
    );
    out
}

fn random_cidr(rng: &mut StdRng) -> String {
    if rng.random_bool(0.8) {
        // IPv4 in 198.19.0.0/16: hosts, small subnets, some /24s and wider.
        let len = *[32u8, 32, 32, 32, 30, 29, 28, 28, 27, 26, 25, 24, 24, 22, 20]
            .choose(rng)
            .expect("non-empty");
        let addr = u32::from(Ipv4Addr::new(198, 19, 0, 0)) | rng.random_range(0..=0xffff);
        let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        format!("{}/{len}", Ipv4Addr::from(addr & mask))
    } else {
        // IPv6 in 2001:db8:10::/44.
        let len = *[128u8, 128, 128, 64, 64, 56, 48]
            .choose(rng)
            .expect("non-empty");
        let addr = (0x2001_0db8_0010u128 << 80)
            | (u128::from(rng.random_range(0..16u32)) << 80)
            | (u128::from(rng.random::<u16>()) << 64)
            | u128::from(rng.random::<u16>());
        let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
        format!("{}/{len}", Ipv6Addr::from(addr & mask))
    }
}

/// `n` distinct device addresses: IPv4 from 198.18.0.0/15 first (at most 131,072),
/// then IPv6 from 2001:db8:1::/48.
pub fn devices(n: usize) -> impl Iterator<Item = IpAddr> {
    let v4 = (0..n.min(1 << 17)).map(|i| IpAddr::V4(Ipv4Addr::from(0xc612_0000u32 + i as u32)));
    let v6 = (0..n.saturating_sub(1 << 17))
        .map(|i| IpAddr::V6(Ipv6Addr::from((0x2001_0db8_0001u128 << 80) | i as u128)));
    v4.chain(v6)
}

/// The device the benchmarks send from with a fresh session, and one whose session
/// expired; both within the device population.
/// Who every benchmark device's session says its user is.
pub const IDENTITY: sessiongate::config::Identity<'static> = sessiongate::config::Identity {
    user: "bench@example.com",
    idp: "default",
    groups: &[],
};

pub const FRESH_DEVICE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 7);
pub const EXPIRED_DEVICE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 8);
pub const FRESH_DEVICE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 7);
pub const EXPIRED_DEVICE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 8);
