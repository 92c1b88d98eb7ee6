//! The loaded program with its maps filled from a config, the addresses the tests use,
//! and running one packet while watching which verdict counter moves.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use agent_common::{maps::Session, verdict::Verdict};
use aya::{
    maps::{MapData, RingBuf},
    programs::{TestRun, TestRunOptions},
};
use netlab::packets::Packet;
use sessiongate::{
    clock::boot_now_ns,
    config::{Config, Identity, Limits},
    datapath::{Datapath, SessionMaps},
    events::{RawEvent, decode},
    policy::{self, settings},
};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

pub const HOUR: Duration = Duration::from_secs(3600);

/// Policies over 198.19.0.0/16 and 2001:db8::/32, overlapping on purpose: narrower
/// prefixes inside wider ones with better and worse precedence, protocol- and
/// port-narrowed policies inside ones for every protocol and port.
pub const POLICIES: &str = r#"
[bypass]
destinations = ["198.19.99.1/32", "2001:db8:99::1/128"]

[[policy]]
name = "App"
precedence = 10
destinations = ["198.19.10.0/24", "2001:db8:10::/48"]
check_session = { enforce = true, duration = "1h" }

[[policy]]
name = "Open app"
precedence = 20
destinations = ["198.19.30.0/24"]

[[policy]]
name = "Web"
precedence = 5
destinations = ["198.19.40.0/24"]
protocol = "tcp"
ports = [443]
check_session = { enforce = true, duration = "1h" }

[[policy]]
name = "Baseline"
precedence = 50
destinations = ["198.19.0.0/16"]
check_session = { enforce = true, duration = "168h" }

[[policy]]
name = "Admin ports"
precedence = 1
destinations = ["198.19.60.0/22"]
protocol = "tcp"
ports = [22, 3389]

[[policy]]
name = "Lab"
precedence = 30
destinations = ["198.19.61.0/24", "2001:db8:61::/48"]
check_session = { enforce = true, duration = "1h" }

[[policy]]
name = "Voice"
precedence = 7
destinations = ["198.19.40.0/24"]
protocol = "udp"
ports = [3478, 5060]
check_session = { enforce = true, duration = "30m" }

# Identity-conditioned policies: none applies to `DEFAULT_USER`, so without
# `login_as` every device meets only the policies above.
[[policy]]
name = "Finance"
precedence = 2
destinations = ["198.19.10.0/24", "2001:db8:10::/48"]
check_session = { enforce = true, duration = "8h" }
identity = { groups = ["finance"] }

[[policy]]
name = "Contractors"
precedence = 3
destinations = ["198.19.10.0/24", "198.19.62.0/24"]
check_session = { enforce = true, duration = "90m" }
identity = { user_matches = ".*@contractor\\.org" }

[[policy]]
name = "Okta staff"
precedence = 4
destinations = ["198.19.40.0/24", "2001:db8:61::/48"]
protocol = "tcp"
ports = [443, 22]
check_session = { enforce = true, duration = "45m" }
identity = { idps = ["okta"], groups = ["staff"] }
"#;
/// Policy indices: positions in `POLICIES`.
pub const APP_POLICY: u32 = 0;
pub const WEB_POLICY: u32 = 2;
pub const BASELINE_POLICY: u32 = 3;
pub const LAB_POLICY: u32 = 5;
pub const VOICE_POLICY: u32 = 6;
pub const CONTRACTORS_POLICY: u32 = 8;
pub const POLICY_COUNT: usize = 10;

/// Who `login` says every device's user is: no identity condition of `POLICIES`
/// matches it.
pub const DEFAULT_USER: (&str, &str, &[&str]) = ("user@example.com", "default", &[]);

/// Devices: authenticated now, 2 hours ago, 200 hours ago, and never.
pub const FRESH: u8 = 10;
pub const EXPIRED: u8 = 11;
pub const ANCIENT: u8 = 12;
pub const UNKNOWN: u8 = 13;
/// Each device with its session age, `None` for no session.
pub const DEVICES: [(u8, Option<Duration>); 4] = [
    (FRESH, Some(Duration::ZERO)),
    (EXPIRED, Some(Duration::from_secs(2 * 3600))),
    (ANCIENT, Some(Duration::from_secs(200 * 3600))),
    (UNKNOWN, None),
];

/// A device's IPv4 address.
pub fn v4(d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 1, d))
}

/// A device's IPv6 address.
pub fn v6(d: u8) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, u16::from(d)))
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub struct Harness {
    pub dp: Datapath,
    pub sessions: SessionMaps,
    pub config: Config,
    events: RingBuf<MapData>,
}

/// The tests' config, with `agent_extra` in `[agent]` and `policies`, and its
/// compiled policy table.
pub fn compiled(agent_extra: &str, policies: &str) -> (Config, policy::PolicyTable) {
    let text = format!("[agent]\ninterfaces = [\"t0\"]\n{agent_extra}\n{policies}");
    let config = Config::parse(&text, "datapath-test").expect("valid config");
    let table = policy::compile(&config).expect("compiles");
    (config, table)
}

/// Room for `sessions` sessions and `flows` flows per family.
pub fn limits(sessions: u32, flows: u32) -> Limits {
    Limits {
        max_sessions: sessions,
        max_flows: flows,
        max_policy_cidrs: 1024,
        max_port_rules: 1024,
    }
}

impl Harness {
    pub fn new(agent_extra: &str) -> Self {
        Self::sized(agent_extra, 1024, 1024)
    }

    /// With room for `sessions` sessions and `flows` flows per family.
    pub fn sized(agent_extra: &str, sessions: u32, flows: u32) -> Self {
        Self::build(agent_extra, POLICIES, sessions, flows)
    }

    /// With `policies` instead of `POLICIES`.
    pub fn with_policies(agent_extra: &str, policies: &str) -> Self {
        Self::build(agent_extra, policies, 1024, 1024)
    }

    fn build(agent_extra: &str, policies: &str, sessions: u32, flows: u32) -> Self {
        let (config, table) = compiled(agent_extra, policies);
        let mut dp =
            Datapath::load(&limits(sessions, flows)).expect("the kernel accepts the program");
        dp.maps.apply(settings(&config), &table).unwrap();
        let events = dp.take_events().unwrap();
        let mut sessions = dp.take_sessions().unwrap();
        let conditions = policy::identity_conditions(&config, &table);
        sessions
            .identities
            .set_conditions([Some(conditions.clone()), Some(conditions)]);
        let mut h = Self {
            dp,
            sessions,
            config,
            events,
        };
        for (device, age) in DEVICES {
            if let Some(age) = age {
                h.login(v4(device), age);
                h.login(v6(device), age);
            }
        }
        h
    }

    /// Gives a device a session authenticated `age` ago.
    pub fn login(&mut self, device: IpAddr, age: Duration) {
        let nobody = Identity {
            user: DEFAULT_USER.0,
            idp: DEFAULT_USER.1,
            groups: &[],
        };
        self.login_as(device, age, &nobody);
    }

    /// Gives a device a session authenticated `age` ago, for `who`.
    pub fn login_as(&mut self, device: IpAddr, age: Duration, who: &Identity<'_>) {
        self.sessions.set_session(device, aged(age), who).unwrap();
    }

    /// The XDP action for one packet.
    pub fn action(&self, packet: &[u8]) -> u32 {
        let result = self
            .dp
            .program()
            .test_run(TestRunOptions {
                data_in: Some(packet),
                repeat: 1,
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        result.return_value
    }

    /// The XDP action for one packet, and the packet as the program left it.
    pub fn reply(&self, packet: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; 4096];
        let result = self
            .dp
            .program()
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// Runs a packet; returns the XDP action and the one verdict counter that moved.
    pub fn run(&self, packet: &[u8]) -> (u32, Verdict) {
        let before = self.dp.maps.counters().unwrap();
        let action = self.action(packet);
        let after = self.dp.maps.counters().unwrap();
        let moved: Vec<(Verdict, u64)> = Verdict::ALL
            .iter()
            .map(|v| (*v, after[v.code() as usize] - before[v.code() as usize]))
            .filter(|(_, d)| *d != 0)
            .collect();
        assert!(
            moved.len() == 1 && moved[0].1 == 1,
            "exactly one verdict per packet, got {moved:?} for {packet:02x?}"
        );
        (action, moved[0].0)
    }

    /// Asserts the action and verdict of a packet.
    pub fn expect(&self, packet: &Packet, action: u32, verdict: Verdict) {
        assert_eq!(self.run(&packet.bytes()), (action, verdict), "{packet:?}");
    }

    pub fn counter(&self, slot: u32) -> u64 {
        self.dp.maps.counters().unwrap()[slot as usize]
    }

    pub fn policy_drops(&self) -> Vec<u64> {
        self.dp.maps.policy_drops(POLICY_COUNT).unwrap()
    }

    /// Every refusal event waiting in the ring buffer.
    pub fn events(&mut self) -> Vec<RawEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            out.push(decode(&item).expect("a well-formed event"));
        }
        out
    }
}

pub fn passes(h: &Harness, p: &Packet, v: Verdict) {
    h.expect(p, XDP_PASS, v);
}

pub fn drops(h: &Harness, p: &Packet, v: Verdict) {
    h.expect(p, XDP_DROP, v);
}

/// A session authenticated `age` ago (its identity slot is the kernel's to give).
pub fn aged(age: Duration) -> Session {
    Session {
        authenticated_at_ns: boot_now_ns() - age.as_nanos() as i64,
        ..Session::default()
    }
}
