//! An independent model of the program's decisions, for the random-packet tests: the
//! parsing rules the program documents (`agent-ebpf/src/parse.rs`), restated over a
//! byte slice, and first-match-by-precedence evaluated straight over the config's
//! policy list rather than over the compiled tables the program reads.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use agent_common::{
    maps::{IPPROTO_TCP, IPPROTO_UDP},
    verdict::Verdict,
};
use sessiongate::config::{Config, Identity, Protocol, UnknownDevice};

const ETH_LEN: usize = 14;
const VLAN_LEN: usize = 4;
const MAX_VLAN_TAGS: usize = 2;
const IPV4_MIN_LEN: usize = 20;
const IPV6_LEN: usize = 40;
/// Extension headers the program follows before calling a chain bogus.
const MAX_EXT_HEADERS: usize = 6;
/// The program parses no header that starts further into the frame than this.
const MAX_L4_OFFSET: usize = 1024;

const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DEST_OPTS: u8 = 60;

/// A TCP SYN or UDP datagram: what the program judges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// What a frame that opens no flow is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unjudged {
    /// It passes with this verdict.
    Pass(Verdict),
    /// Its IP header is valid but its L4 header cannot be read: judged by its
    /// destination alone where sessions are checked, else it passes with `fallback`.
    Unreadable {
        src: IpAddr,
        dst: IpAddr,
        fallback: Verdict,
    },
}

impl From<Verdict> for Unjudged {
    fn from(v: Verdict) -> Self {
        Self::Pass(v)
    }
}

/// A TCP fragment 8 bytes in would overwrite the TCP header's flags (RFC 1858).
fn rewrites_tcp_flags(fragment_offset_units: u16, proto: u8) -> bool {
    fragment_offset_units == 1 && proto == IPPROTO_TCP
}

/// The flow a frame opens, or what it is instead.
pub fn parse(frame: &[u8]) -> Result<Flow, Unjudged> {
    let mut ethertype = u16_at(frame, 12);
    let mut offset = ETH_LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != 0x8100 && ethertype != 0x88a8 {
            break;
        }
        if frame.len() < offset + VLAN_LEN {
            return Err(Verdict::PassedMalformed.into());
        }
        ethertype = u16_at(frame, offset + 2);
        offset += VLAN_LEN;
    }
    match ethertype {
        0x0800 => ipv4(frame, offset),
        0x86dd => ipv6(frame, offset),
        _ => Err(Verdict::PassedOtherProtocol.into()),
    }
}

fn ipv4(frame: &[u8], at: usize) -> Result<Flow, Unjudged> {
    let ip = frame
        .get(at..at + IPV4_MIN_LEN)
        .ok_or(Verdict::PassedMalformed)?;
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total_len = usize::from(u16_at(ip, 2));
    if ip[0] >> 4 != 4 || header_len < IPV4_MIN_LEN || total_len < header_len {
        return Err(Verdict::PassedMalformed.into());
    }
    let addr = |i: usize| IpAddr::V4(Ipv4Addr::new(ip[i], ip[i + 1], ip[i + 2], ip[i + 3]));
    let (src, dst) = (addr(12), addr(16));
    let fragment = u16_at(ip, 6) & 0x1fff;
    if fragment != 0 {
        if rewrites_tcp_flags(fragment, ip[9]) {
            return Err(Unjudged::Unreadable {
                src,
                dst,
                fallback: Verdict::PassedFragment,
            });
        }
        return Err(Verdict::PassedFragment.into());
    }
    l4(frame, at + header_len, ip[9], src, dst)
}

fn ipv6(frame: &[u8], at: usize) -> Result<Flow, Unjudged> {
    let ip = frame
        .get(at..at + IPV6_LEN)
        .ok_or(Verdict::PassedMalformed)?;
    if ip[0] >> 4 != 6 {
        return Err(Verdict::PassedMalformed.into());
    }
    let addr = |i: usize| {
        let octets: [u8; 16] = ip[i..i + 16].try_into().unwrap();
        IpAddr::V6(Ipv6Addr::from(octets))
    };
    let (src, dst) = (addr(8), addr(24));
    let unreadable = |fallback| Unjudged::Unreadable { src, dst, fallback };
    let malformed = unreadable(Verdict::PassedMalformed);
    let mut next = ip[6];
    let mut offset = at + IPV6_LEN;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            HOP_BY_HOP | ROUTING | DEST_OPTS => {
                let ext = frame.get(offset..offset + 2).ok_or(malformed)?;
                next = ext[0];
                offset += (usize::from(ext[1]) + 1) * 8;
            }
            FRAGMENT => {
                let frag = frame.get(offset..offset + 8).ok_or(malformed)?;
                let fragment = u16_at(frag, 2) >> 3;
                if fragment != 0 {
                    if rewrites_tcp_flags(fragment, frag[0]) {
                        return Err(unreadable(Verdict::PassedFragment));
                    }
                    return Err(Verdict::PassedFragment.into());
                }
                next = frag[0];
                offset += 8;
            }
            _ => break,
        }
        if offset > MAX_L4_OFFSET {
            return Err(malformed);
        }
    }
    if matches!(next, HOP_BY_HOP | ROUTING | DEST_OPTS | FRAGMENT) {
        // A chain longer than the program follows.
        return Err(malformed);
    }
    l4(frame, offset, next, src, dst)
}

/// The L4 header is read from the frame wherever the IP header says it starts; like
/// the program, the model does not hold it to the IP length fields. A TCP or UDP
/// header that is not all there, or not valid, is unreadable.
fn l4(frame: &[u8], at: usize, proto: u8, src: IpAddr, dst: IpAddr) -> Result<Flow, Unjudged> {
    let malformed = Unjudged::Unreadable {
        src,
        dst,
        fallback: Verdict::PassedMalformed,
    };
    if at > MAX_L4_OFFSET {
        return Err(malformed);
    }
    let header = |len: usize| frame.get(at..at + len).ok_or(malformed);
    let flow = |h: &[u8]| Flow {
        src,
        dst,
        proto,
        sport: u16_at(h, 0),
        dport: u16_at(h, 2),
    };
    match proto {
        IPPROTO_TCP => {
            let tcp = header(20)?;
            if tcp[12] >> 4 < 5 {
                return Err(malformed);
            }
            // Only SYN without ACK opens a connection.
            if tcp[13] & 0x12 != 0x02 {
                return Err(Verdict::PassedEstablished.into());
            }
            Ok(flow(tcp))
        }
        IPPROTO_UDP => Ok(flow(header(8)?)),
        _ => Err(Verdict::PassedOtherProtocol.into()),
    }
}

/// What first-match-by-precedence finds for a flow.
enum Match {
    Bypass,
    Policy(usize),
    Nothing,
}

/// Who a device's session says its user is: user, IdP, groups.
pub type Who = (String, String, Vec<String>);

/// The program's state as the model sees it: sessions, and the UDP flows it admitted.
pub struct Model {
    config: Config,
    /// Session age and identity per device. The tests keep ages far from every
    /// policy's duration, so the seconds a test runs for do not change a verdict.
    ages: HashMap<IpAddr, Duration>,
    identities: HashMap<IpAddr, Who>,
    tracked: HashSet<Flow>,
    /// Refusals per policy index, as `SG_POLICY_DROPS` should count them.
    pub policy_drops: Vec<u64>,
    /// The policy that refused the last judged flow, if it was refused.
    pub last_refusal: Option<(Flow, u32)>,
}

impl Model {
    pub fn new(
        config: &Config,
        sessions: impl IntoIterator<Item = (IpAddr, Duration, Who)>,
    ) -> Self {
        let (mut ages, mut identities) = (HashMap::new(), HashMap::new());
        for (device, age, who) in sessions {
            ages.insert(device, age);
            identities.insert(device, who);
        }
        Self {
            config: config.clone(),
            ages,
            identities,
            tracked: HashSet::new(),
            policy_drops: vec![0; config.policies.len()],
            last_refusal: None,
        }
    }

    /// The verdict for one frame, updating the tracked flows as the program would.
    pub fn verdict(&mut self, frame: &[u8]) -> Verdict {
        self.last_refusal = None;
        let flow = match parse(frame) {
            Ok(flow) => flow,
            Err(Unjudged::Pass(verdict)) => return verdict,
            Err(Unjudged::Unreadable { src, dst, fallback }) => {
                return self.unreadable(src, dst, fallback);
            }
        };
        if self.config.dns.ports.contains(&flow.dport) {
            return Verdict::PassedDns;
        }
        if flow.proto == IPPROTO_UDP && self.tracked.contains(&flow) {
            return Verdict::PassedEstablished;
        }
        let index = match self.first_match(&flow) {
            Match::Bypass => return Verdict::PassedBypass,
            Match::Nothing => return Verdict::PassedNoPolicy,
            Match::Policy(index) => index,
        };
        let Some(duration) = self.config.policies[index].duration() else {
            return Verdict::PassedUnlimited;
        };
        let verdict = match self.ages.get(&flow.src) {
            None if self.config.agent.unknown_device == UnknownDevice::Allow => {
                Verdict::AdmittedUnknownDevice
            }
            None => Verdict::DroppedUnknownDevice,
            Some(age) if *age <= duration.0 => Verdict::AdmittedNewFlow,
            Some(_) => Verdict::DroppedExpired,
        };
        if verdict.is_refusal() {
            self.policy_drops[index] += 1;
            self.last_refusal = Some((flow, index as u32));
        } else if flow.proto == IPPROTO_UDP {
            self.tracked.insert(flow);
        }
        verdict
    }

    /// A packet whose L4 header cannot be read: judged as a new flow against the
    /// strictest session-checked policy that some readable packet to its destination
    /// would get from some identity (shortest duration, then precedence), found by
    /// trying every protocol and every port a policy names plus one that none does.
    fn unreadable(&mut self, src: IpAddr, dst: IpAddr, fallback: Verdict) -> Verdict {
        let mut ports: Vec<u16> = self
            .config
            .policies
            .iter()
            .flat_map(|p| p.ports.iter().flatten().copied())
            .collect();
        ports.push((1..=u16::MAX).find(|p| !ports.contains(p)).unwrap());
        let mut strictest: Option<(Duration, i64, usize)> = None;
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            for &dport in &ports {
                let probe = Flow {
                    src,
                    dst,
                    proto,
                    sport: 1,
                    dport,
                };
                for index in self.reachable(&probe) {
                    let policy = &self.config.policies[index];
                    if let Some(d) = policy.duration() {
                        let candidate = (d.0, policy.precedence, index);
                        if strictest.is_none_or(|s| candidate < s) {
                            strictest = Some(candidate);
                        }
                    }
                }
            }
        }
        let Some((duration, _, index)) = strictest else {
            return fallback;
        };
        let verdict = match self.ages.get(&src) {
            None if self.config.agent.unknown_device == UnknownDevice::Allow => {
                Verdict::AdmittedUnreadable
            }
            None => Verdict::DroppedUnreadable,
            Some(age) if *age <= duration => Verdict::AdmittedUnreadable,
            Some(_) => Verdict::DroppedUnreadable,
        };
        if verdict.is_refusal() {
            self.policy_drops[index] += 1;
            let flow = Flow {
                src,
                dst,
                proto: 0,
                sport: 0,
                dport: 0,
            };
            self.last_refusal = Some((flow, index as u32));
        }
        verdict
    }

    /// The first match for the flow's device, by its identity (none without a
    /// session).
    fn first_match(&self, flow: &Flow) -> Match {
        if self.config.bypass.iter().any(|net| net.contains(&flow.dst)) {
            return Match::Bypass;
        }
        let who = self
            .identities
            .get(&flow.src)
            .map(|(user, idp, groups)| Identity { user, idp, groups });
        self.matching(flow)
            .into_iter()
            .find(|&i| self.config.policies[i].applies_to(who.as_ref()))
            .map_or(Match::Nothing, Match::Policy)
    }

    /// The policies the flow's destination, protocol and port match, by precedence.
    fn matching(&self, flow: &Flow) -> Vec<usize> {
        let proto = if flow.proto == IPPROTO_TCP {
            Protocol::Tcp
        } else {
            Protocol::Udp
        };
        let mut order: Vec<usize> = (0..self.config.policies.len()).collect();
        order.sort_by_key(|&i| self.config.policies[i].precedence);
        order.retain(|&i| self.config.policies[i].matches_packet(flow.dst, proto, flow.dport));
        order
    }

    /// The policies some identity's flow could be judged by (identity conditions taken
    /// as independent): the conditioned ones met before the first unconditional match,
    /// each condition once, and that match.
    fn reachable(&self, flow: &Flow) -> Vec<usize> {
        if self.config.bypass.iter().any(|net| net.contains(&flow.dst)) {
            return Vec::new();
        }
        let mut reached = Vec::new();
        let mut conditions = Vec::new();
        for i in self.matching(flow) {
            match &self.config.policies[i].identity {
                Some(c) if conditions.contains(&c) => {}
                Some(c) => {
                    conditions.push(c);
                    reached.push(i);
                }
                None => {
                    reached.push(i);
                    break;
                }
            }
        }
        reached
    }
}
