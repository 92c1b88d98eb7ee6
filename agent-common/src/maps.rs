//! Layout of every map the XDP program reads or writes. Each type is `#[repr(C)]` with
//! explicit, zeroed padding (bytemuck's derives refuse hidden padding at compile time)
//! and a size assertion, so the kernel and the agent can never disagree on a layout.
//!
//! Addresses are `Ip4`/`Ip6`: their bytes in network order; ports and every other
//! integer are host order. Times are `bpf_ktime_get_boot_ns` nanoseconds (CLOCK_BOOTTIME),
//! which a wall-clock step does not move.

use bytemuck::{Pod, Zeroable};

use crate::addr::{Ip4, Ip6};

/// Map names, as the agent looks them up in the object file.
pub mod names {
    pub const GENERATION: &str = "SG_GENERATION";
    pub const SETTINGS: &str = "SG_SETTINGS";
    /// The policy tables, one per set (see `SG_GENERATION`).
    pub const DEST_V4: [&str; 2] = ["SG_DEST_V4_0", "SG_DEST_V4_1"];
    pub const DEST_V6: [&str; 2] = ["SG_DEST_V6_0", "SG_DEST_V6_1"];
    pub const PORT_RULES: &str = "SG_PORT_RULES";
    pub const POLICIES: &str = "SG_POLICIES";
    pub const SESSIONS_V4: &str = "SG_SESSIONS_V4";
    pub const SESSIONS_V6: &str = "SG_SESSIONS_V6";
    pub const SESSION_TABLE_V4: &str = "SG_SESSION_TABLE_V4";
    pub const SESSION_TABLE_V6: &str = "SG_SESSION_TABLE_V6";
    pub const DEST_CACHE_V4: &str = "SG_DEST_CACHE_V4";
    pub const DEST_CACHE_V6: &str = "SG_DEST_CACHE_V6";
    pub const CLOCK: &str = "SG_CLOCK";
    pub const FLOWS_V4: &str = "SG_FLOWS_V4";
    pub const FLOWS_V6: &str = "SG_FLOWS_V6";
    pub const COUNTERS: &str = "SG_COUNTERS";
    pub const POLICY_DROPS: &str = "SG_POLICY_DROPS";
    pub const EVENT_LIMIT: &str = "SG_EVENT_LIMIT";
    pub const EVENTS: &str = "SG_EVENTS";
    pub const REPLY_LIMIT: &str = "SG_REPLY_LIMIT";
    pub const PORTAL_HANDOFF: &str = "SG_PORTAL_HANDOFF";
    /// Identity masks and identity answers, one map per set.
    pub const IDENTITIES: [&str; 2] = ["SG_IDENTITIES_0", "SG_IDENTITIES_1"];
    pub const IDENTITY_ANSWERS: [&str; 2] = ["SG_IDENTITY_ANSWERS_0", "SG_IDENTITY_ANSWERS_1"];

    /// Every map of the programs: what the agent pins and adopts.
    pub const ALL: [&str; 27] = [
        GENERATION,
        SETTINGS,
        DEST_V4[0],
        DEST_V4[1],
        DEST_V6[0],
        DEST_V6[1],
        PORT_RULES,
        POLICIES,
        SESSIONS_V4,
        SESSIONS_V6,
        SESSION_TABLE_V4,
        SESSION_TABLE_V6,
        DEST_CACHE_V4,
        DEST_CACHE_V6,
        CLOCK,
        FLOWS_V4,
        FLOWS_V6,
        COUNTERS,
        POLICY_DROPS,
        EVENT_LIMIT,
        EVENTS,
        REPLY_LIMIT,
        PORTAL_HANDOFF,
        IDENTITIES[0],
        IDENTITIES[1],
        IDENTITY_ANSWERS[0],
        IDENTITY_ANSWERS[1],
    ];
}

/// `DestRule::tcp`/`udp` and `SG_PORT_RULES` values: no policy matches.
pub const NO_POLICY: u32 = u32::MAX;
/// `DestRule::tcp`/`udp` and `SG_PORT_RULES` values: a bypass destination matches.
pub const BYPASS_POLICY: u32 = u32::MAX - 1;
/// `DestRule::tcp`/`udp` and `SG_PORT_RULES` values whose top two bits are `01`: the
/// answer depends on the device's identity, and the low 30 bits index the set's
/// `IdentityAnswer`s (`identity_answer_index`).
pub const IDENTITY_ANSWER: u32 = 1 << 30;
const ANSWER_KIND_BITS: u32 = 0b11 << 30;

/// The `IdentityAnswer` index an answer holds, if it is one.
#[inline(always)]
pub const fn identity_answer_index(answer: u32) -> Option<u32> {
    if answer & ANSWER_KIND_BITS == IDENTITY_ANSWER {
        Some(answer & !ANSWER_KIND_BITS)
    } else {
        None
    }
}

/// Value of `SG_IDENTITY_ANSWERS_0` / `_1`: ARRAY, one per set, written by the agent
/// with the set's tables, indexed by `identity_answer_index`.
///
/// An identity-dependent first match (see `IDENTITY_ANSWER`): of the identity-conditioned
/// policies that come before the first unconditional match, those in `mask` (bit `i`:
/// the set's `i`-th identity-conditioned policy by precedence, see
/// `Settings::identity_policies`), and the
/// unconditional match itself. A device gets the policy of the lowest bit its own
/// identity mask shares with `mask`, else `default`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct IdentityAnswer {
    pub mask: u64,
    /// A policy index, `NO_POLICY` or `BYPASS_POLICY`.
    pub default: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<IdentityAnswer>() == 16);
/// Most policies a config may hold; policy indices are below this.
pub const MAX_POLICIES: u32 = 16_384;
/// Most policies with an identity condition a config may hold: each has one bit of a
/// device's identity mask.
pub const MAX_IDENTITY_POLICIES: usize = 64;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Version of the maps' layout and meaning as a whole. Pins live in a directory named
/// after it, so an agent never adopts maps it would misread. Bump it with any change
/// to a map's key, value, type or meaning.
pub const LAYOUT: u32 = 9;

/// `SG_GENERATION`: ARRAY, one `u32` entry, written by the agent. The configuration
/// generation in force: the program reads `SG_SETTINGS[g & 1]` and the policy tables of
/// set `g & 1`. A reload writes the other set, then this one value, so every packet sees
/// either the old configuration or the new one, never a mix. Never 0 once configured
/// (destination-cache entries of generation 0 are empty ones).
pub const fn config_set(generation: u32) -> u32 {
    generation & 1
}

/// `SG_SETTINGS`: ARRAY, two entries (one per set), written by the agent.
///
/// Everything the programs need from the config apart from policies and sessions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct Settings {
    /// A UDP flow idle for longer than this is judged again as a new flow.
    pub udp_idle_ns: u64,
    /// `UNKNOWN_DEVICE_ENFORCE` or `UNKNOWN_DEVICE_ALLOW`.
    pub unknown_device: u32,
    /// Index mask of `SG_REPLY_LIMIT`.
    pub reply_slot_mask: u32,
    /// Index masks of the array-backed tables: their entry counts minus one.
    pub session_bucket_mask: u32,
    pub flow_bucket_mask: u32,
    pub dest_cache_mask: u32,
    pub event_slot_mask: u32,
    /// Replies (RST, ICMP) and portal redirects per device: one every
    /// `reply_interval_ns`, with bursts within `reply_tolerance_ns`
    /// (`logic::reply_due`).
    pub reply_interval_ns: u64,
    pub reply_tolerance_ns: u64,
    /// The portal's listening port, or 0 when there is no portal: redirect policies
    /// then reject.
    pub portal_port: u16,
    /// 1 when the agent wants use reports (`FlowEvent` with `AdmittedNewFlow`): it
    /// prompts before sessions expire (`notify_before`); else 0 and none are sent.
    pub report_use: u16,
    /// The portal's listening addresses (unspecified: any), where the TC program looks
    /// the listener up.
    pub portal_v4: Ip4,
    pub portal_v6: Ip6,
    /// Bitmap of DNS destination ports: bit `p % 64` of word `p / 64` is set for port `p`.
    pub dns_ports: [u64; PORT_BITMAP_WORDS],
    /// Bitmap of every redirect policy's `redirect_ports` (the TC program follows
    /// portal connections on these ports only).
    pub redirect_ports: [u64; PORT_BITMAP_WORDS],
    /// The identity-conditioned policies: bit `i` of identity masks (`IdentityAnswer`,
    /// bits in precedence order) stands for policy `identity_policies[bit_slot(1 << i)]`
    /// (`logic::bit_slot`: the program finds a mask's lowest bit's policy in one step).
    pub identity_policies: [u32; MAX_IDENTITY_POLICIES],
}
const _: () = assert!(size_of::<Settings>() == 72 + 2 * 8192 + 4 * MAX_IDENTITY_POLICIES);

/// Words of a bitmap with one bit per port.
pub const PORT_BITMAP_WORDS: usize = 1024;

/// Whether bit `port` of a port bitmap is set.
#[inline(always)]
pub const fn port_in(bitmap: &[u64; PORT_BITMAP_WORDS], port: u16) -> bool {
    bitmap[(port >> 6) as usize] & (1u64 << (port & 63)) != 0
}

pub fn add_port(bitmap: &mut [u64; PORT_BITMAP_WORDS], port: u16) {
    bitmap[(port >> 6) as usize] |= 1u64 << (port & 63);
}

pub const UNKNOWN_DEVICE_ENFORCE: u32 = 0;
pub const UNKNOWN_DEVICE_ALLOW: u32 = 1;

impl Settings {
    pub const fn is_dns_port(&self, port: u16) -> bool {
        port_in(&self.dns_ports, port)
    }

    pub fn set_dns_port(&mut self, port: u16) {
        add_port(&mut self.dns_ports, port);
    }

    pub const fn is_redirect_port(&self, port: u16) -> bool {
        port_in(&self.redirect_ports, port)
    }
}

/// Value of `SG_DEST_V4_{0,1}` / `SG_DEST_V6_{0,1}`: LPM_TRIE keyed by destination
/// prefix (prefix length, then the address: `Ip4` / `Ip6`), written by the agent from
/// the compiled policy table (see the agent's `policy` module), one map per set.
///
/// For every address whose longest matching prefix is this one, it holds the answer of
/// first-match-by-precedence over the policy list, per protocol, for every port the
/// `port_table` does not list. Indices point into `SG_POLICIES`, or are `NO_POLICY` /
/// `BYPASS_POLICY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DestRule {
    /// Id of the port-specific answers in `SG_PORT_RULES`; 0 when there are none.
    pub port_table: u32,
    /// First-match policy for TCP to an unlisted port.
    pub tcp: u32,
    /// First-match policy for UDP to an unlisted port.
    pub udp: u32,
    /// The policy a packet whose L4 header cannot be read is judged by
    /// (`Verdict::DroppedUnreadable`): of the policies some packet to this prefix could
    /// match, the session-checked one with the shortest duration; `NO_POLICY` when
    /// none checks sessions (such packets then pass as before).
    pub unreadable: u32,
}
const _: () = assert!(size_of::<DestRule>() == 16);

/// Key of `SG_PORT_RULES`: HASH, value `u32` policy index (or `NO_POLICY`/`BYPASS_POLICY`),
/// written by the agent. Both sets share it: their port tables have distinct ids
/// (`PORT_TABLE_SET_BIT`). Holds the first-match answer for ports that some policy of a
/// destination rule names explicitly, where it differs from the rule's default.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct PortRuleKey {
    /// `DestRule::port_table` of the destination rule.
    pub port_table: u32,
    /// Destination port, host order.
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<PortRuleKey>() == 8);

/// The bit that tells set 1's port-table ids from set 0's.
pub const PORT_TABLE_SET_BIT: u32 = 1 << 31;

/// The slot of a policy of a set in `SG_POLICIES` and `SG_POLICY_DROPS`.
pub const fn policy_slot(set: u32, policy: u32) -> u32 {
    set * MAX_POLICIES + policy
}

/// Value of `SG_POLICIES`: ARRAY of `2 * MAX_POLICIES` entries (`policy_slot`), written
/// by the agent. What a matching policy asks of a new flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PolicyParams {
    /// Longest session age the policy accepts, when `POLICY_ENFORCE` is set.
    pub duration_ns: u64,
    /// `POLICY_*` bits.
    pub flags: u32,
    /// `ACTION_*`: what an expired or unknown device's new flow gets.
    pub on_expired: u32,
    /// With `ACTION_REDIRECT`: the TCP ports steered to the portal (0: unused slot);
    /// other ports are rejected.
    pub redirect_ports: [u16; MAX_REDIRECT_PORTS],
}
const _: () = assert!(size_of::<PolicyParams>() == 32);

/// Most `redirect_ports` a policy may list.
pub const MAX_REDIRECT_PORTS: usize = 8;

impl PolicyParams {
    #[inline(always)]
    pub fn redirects(&self, port: u16) -> bool {
        let mut i = 0;
        while i < MAX_REDIRECT_PORTS {
            if self.redirect_ports[i] == port && port != 0 {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// `PolicyParams::flags`: the policy checks sessions (`check_session.enforce = true`
/// with a duration). Without it the policy passes everything (unlimited session).
pub const POLICY_ENFORCE: u32 = 1;

/// `PolicyParams::on_expired`: drop the packet. Codes are stable.
pub const ACTION_DROP: u32 = 1;
/// Answer a TCP SYN with a RST, a UDP datagram with ICMP administratively prohibited.
pub const ACTION_REJECT: u32 = 2;
/// Steer TCP to the portal on `redirect_ports`; reject everything else.
pub const ACTION_REDIRECT: u32 = 3;

/// Key of `SG_PORTAL_HANDOFF`: LRU_HASH of `PORTAL_HANDOFF_ENTRIES` entries, value
/// `u64`: the boot-clock time at which the XDP program handed the SYN over.
///
/// How the XDP program asks the TC program (`sessiongate_portal`) to deliver a refused
/// SYN to the portal: it inserts the SYN's addresses and ports, and the TC program,
/// which sees that same packet moments later, looks them up, deletes the entry and
/// delivers the SYN. A map rather than XDP metadata: some kernels refuse
/// `bpf_xdp_adjust_meta` to XDP programs. The TC program honours an entry for at most
/// `PORTAL_HANDOFF_TTL_NS`, so one left behind (its packet dropped between the two
/// programs) cannot send a later connection with the same ports to the portal.
///
/// Every field is the memory image of the packet's own bytes (network order), as
/// `bpf_sock_tuple` holds them; IPv4 addresses fill the first word, the rest is zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PortalHandoff {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// The TCP header's first word: source port, then destination port.
    pub ports: u32,
    /// 4 or 6.
    pub family: u32,
}
const _: () = assert!(size_of::<PortalHandoff>() == 40);

pub const PORTAL_HANDOFF_ENTRIES: u32 = 4096;
/// A hand-over older than this (1 s) is ignored: the TC program runs on the same
/// packet within microseconds.
pub const PORTAL_HANDOFF_TTL_NS: u64 = 1_000_000_000;
/// `skb->mark` of packets delivered to the portal: a policy-routing rule looks them up
/// in `PORTAL_TABLE`, which routes everything to the local host.
pub const PORTAL_MARK: u32 = 0x5347_0511;
pub const PORTAL_TABLE: u32 = 21_323;

/// Value of `SG_SESSIONS_V4` (HASH, key: `Ip4`) and `SG_SESSIONS_V6` (HASH, key:
/// `Ip6`), written by the agent: a device's session, found by its source address. The
/// program reads it only when the session table below does not answer. Every session
/// is in the table, the hash map or both: a single login writes both; a bulk write
/// writes the hash map only for devices whose table bucket is full and for renewed
/// devices (an older copy here must not outlive a renewal).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Session {
    /// Boot-clock time of the last authentication. Negative when it happened before
    /// this boot (a back-dated or old login).
    pub authenticated_at_ns: i64,
    /// The device's slot in `SG_IDENTITIES_0/1`: its identity masks. Every write of a
    /// session takes a fresh slot, its masks written first, so a reader never pairs a
    /// session with another session's masks. 0: none (masks 0).
    pub identity: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<Session>() == 16);

/// `SG_IDENTITIES_0` / `SG_IDENTITIES_1`: ARRAY of `u64`, one per set, written by the
/// agent, indexed by `Session::identity`: the device's identity mask for that set's
/// policies (bit `i`: its identity satisfies the condition of the set's
/// `i`-th identity-conditioned policy). A reload writes every device's mask of the set
/// it is about to put in force before the flip. Slot 0 stays 0.
pub const IDENTITY_NONE: u32 = 0;

/// Entries per bucket of the session and flow tables.
pub const WAYS: usize = 4;

/// An entry of `SG_SESSION_TABLE_V4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SessionSlotV4 {
    pub addr: Ip4,
    /// `hashing::check(addr.fold(), session fields)` truncated (`tables`); 0 when empty.
    pub check: u32,
    pub authenticated_at_ns: i64,
    /// `Session::identity`.
    pub identity: u32,
    pub _pad: u32,
}

/// `SG_SESSION_TABLE_V4`: ARRAY of buckets, `session_bucket_mask + 1` entries, created
/// `BPF_F_MMAPABLE` (a bulk write places sessions in its memory), written by the agent
/// together with `SG_SESSIONS_V4`. Most sessions, where the program finds them with
/// one array lookup: a device lives in bucket `hashing::bucket(addr.fold())`, in any
/// of its `WAYS` slots. Devices whose bucket is full are only in the hash map. A
/// single login writes the hash map first and the table second, logout the other way
/// round, so a reader that meets an entry mid-write (its check word fails) finds the
/// session in the hash map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SessionBucketV4 {
    pub slots: [SessionSlotV4; WAYS],
}
const _: () = assert!(size_of::<SessionBucketV4>() == 96);

/// An entry of `SG_SESSION_TABLE_V6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SessionSlotV6 {
    pub addr: Ip6,
    pub authenticated_at_ns: i64,
    /// As `SessionSlotV4::check`.
    pub check: u32,
    pub identity: u32,
}

/// `SG_SESSION_TABLE_V6`: as `SG_SESSION_TABLE_V4`, for IPv6 devices.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SessionBucketV6 {
    pub slots: [SessionSlotV6; WAYS],
}
const _: () = assert!(size_of::<SessionBucketV6>() == 128);

/// `SG_DEST_CACHE_V4`: ARRAY, `dest_cache_mask + 1` entries, written by the program.
/// The policy a (destination, port, protocol) resolved to through `SG_DEST_V4` and
/// `SG_PORT_RULES`, cached direct-mapped at `hashing::bucket(fold_dest(..))` so that
/// repeated new flows to the same application skip the longest-prefix match. An entry
/// from another generation (`SG_GENERATION`) is stale.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DestCacheV4 {
    pub daddr: Ip4,
    pub dport: u16,
    pub proto: u8,
    pub _pad: u8,
    pub generation: u32,
    /// Policy index, `NO_POLICY` or `BYPASS_POLICY`.
    pub policy: u32,
    /// `hashing::check(fold_dest(..), generation << 32 | policy)`.
    pub check: u64,
}
const _: () = assert!(size_of::<DestCacheV4>() == 24);

/// `SG_DEST_CACHE_V6`: as `SG_DEST_CACHE_V4`, for IPv6 destinations.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DestCacheV6 {
    pub daddr: Ip6,
    pub dport: u16,
    pub proto: u8,
    pub _pad: u8,
    pub generation: u32,
    pub policy: u32,
    pub _pad2: u32,
    pub check: u64,
}
const _: () = assert!(size_of::<DestCacheV6>() == 40);

/// A flow's 5-tuple, client to server: the key of `FlowSlotV4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKeyV4 {
    pub saddr: Ip4,
    pub daddr: Ip4,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FlowKeyV4>() == 16);

/// The key of `FlowSlotV6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKeyV6 {
    pub saddr: Ip6,
    pub daddr: Ip6,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FlowKeyV6>() == 40);

/// An entry of `SG_FLOWS_V4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowSlotV4 {
    pub key: FlowKeyV4,
    /// Boot-clock time the flow last sent a packet, refreshed at most once a second
    /// (one aligned 8-byte store, so it is never torn).
    pub last_seen_ns: u64,
    /// `hashing::check(fold of key, 0)`; 0 when empty.
    pub check: u64,
}

/// `SG_FLOWS_V4`: ARRAY of buckets, `flow_bucket_mask + 1` entries, created
/// `BPF_F_MMAPABLE` (the agent counts active flows by reading its memory), written by
/// the program when it admits a new UDP flow. A flow lives in bucket
/// `hashing::bucket(fold_flow(..))`; a new flow takes a free or idle slot of its
/// bucket, else the least recently seen one (a per-bucket LRU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowBucketV4 {
    pub slots: [FlowSlotV4; WAYS],
}
const _: () = assert!(size_of::<FlowBucketV4>() == 128);

/// An entry of `SG_FLOWS_V6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowSlotV6 {
    pub key: FlowKeyV6,
    pub last_seen_ns: u64,
    pub check: u64,
}

/// `SG_FLOWS_V6`: as `SG_FLOWS_V4`, for IPv6 flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowBucketV6 {
    pub slots: [FlowSlotV6; WAYS],
}
const _: () = assert!(size_of::<FlowBucketV6>() == 224);

/// `SG_EVENT_LIMIT`: ARRAY, `event_slot_mask + 1` entries, written by the program.
/// When a (device, policy) pair last sent an event, direct-mapped at
/// `hashing::bucket(fold_event(..))`: at most one refusal per pair per second
/// (`logic::event_due`), one use report per pair per `USE_REPORT_INTERVAL_NS`
/// (`logic::use_report_due`). The two kinds mark the slot with different check words
/// (`EVENT_CHECK_REFUSAL`, `EVENT_CHECK_USE`), so neither holds the other back. Two
/// pairs sharing a slot may each report more often; that needs thousands of devices at
/// once, when the ring buffer's own bound takes over.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct EventLimitSlot {
    /// `hashing::check(fold_event(..), EVENT_CHECK_*)` of the pair and the kind.
    pub check: u64,
    pub last_event_ns: u64,
}

/// `EventLimitSlot::check`'s second field for a refusal and for a use report.
pub const EVENT_CHECK_REFUSAL: u64 = 0;
pub const EVENT_CHECK_USE: u64 = 1;
const _: () = assert!(size_of::<EventLimitSlot>() == 16);

/// `SG_REPLY_LIMIT`: ARRAY, `reply_slot_mask + 1` entries, written by the program.
/// Per device (direct-mapped at `hashing::bucket(device fold)`), the theoretical
/// arrival time of its next reply (`logic::reply_due`, a GCRA). Two devices sharing a
/// slot reset each other's state: each may then get a burst more than its share.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ReplyLimitSlot {
    /// `hashing::check(device fold, 0)`.
    pub check: u64,
    pub next_ns: u64,
}
const _: () = assert!(size_of::<ReplyLimitSlot>() == 16);

/// `SG_CLOCK`: PERCPU_ARRAY, one entry, written by the program. The boot clock read at
/// most once per CPU per jiffy: `bpf_ktime_get_boot_ns` costs about 37 ns here, the
/// jiffies counter about 3. Times are therefore up to one tick (1 to 10 ms) behind.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TickClock {
    pub jiffies: u64,
    pub boot_ns: u64,
}
const _: () = assert!(size_of::<TickClock>() == 16);

/// A record of `SG_EVENTS` (RINGBUF), written by the program for a refused new flow,
/// or, with verdict `AdmittedNewFlow`, a use report: a device's session let it open a
/// new flow under a session-checked policy (sent only when `Settings::report_use`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowEvent {
    /// Boot-clock time of the refusal or admission.
    pub at_ns: u64,
    /// Age of the device's session at that time; `i64::MIN` when it has none.
    pub session_age_ns: i64,
    /// Policy index (in the config of `set`) that judged the flow.
    pub policy: u32,
    /// `Verdict` code: `DroppedExpired`, `DroppedUnknownDevice`, `DroppedUnreadable`,
    /// or `AdmittedNewFlow` for a use report.
    pub verdict: u32,
    /// 4 or 6.
    pub family: u8,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// Destination and source ports, host order.
    pub dport: u16,
    pub sport: u16,
    /// The configuration set whose policy index `policy` is.
    pub set: u8,
    /// `ACTION_*` the refusal got: the policy's, or `ACTION_DROP` beyond the device's
    /// reply rate (and for a use report).
    pub action: u8,
    /// Device (source) address; IPv4 in the first four bytes.
    pub src: Ip6,
    /// Destination address; IPv4 in the first four bytes.
    pub dst: Ip6,
}
const _: () = assert!(size_of::<FlowEvent>() == 64);

/// Session age recorded in a `FlowEvent` for a device without a session.
pub const NO_SESSION_AGE: i64 = i64::MIN;

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY (all): plain-old-data `#[repr(C)]` types without padding, checked by
    // bytemuck's `Pod` derive above.
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for DestRule {}
    unsafe impl aya::Pod for PortRuleKey {}
    unsafe impl aya::Pod for PolicyParams {}
    unsafe impl aya::Pod for Session {}
    unsafe impl aya::Pod for FlowKeyV4 {}
    unsafe impl aya::Pod for FlowKeyV6 {}
    unsafe impl aya::Pod for SessionBucketV4 {}
    unsafe impl aya::Pod for SessionBucketV6 {}
    unsafe impl aya::Pod for DestCacheV4 {}
    unsafe impl aya::Pod for DestCacheV6 {}
    unsafe impl aya::Pod for FlowBucketV4 {}
    unsafe impl aya::Pod for FlowBucketV6 {}
    unsafe impl aya::Pod for EventLimitSlot {}
    unsafe impl aya::Pod for ReplyLimitSlot {}
    unsafe impl aya::Pod for TickClock {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for IdentityAnswer {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_port_bitmap_covers_every_port() {
        let mut s = Settings::zeroed();
        for p in [0u16, 1, 53, 63, 64, 853, 5353, 65535] {
            assert!(!s.is_dns_port(p));
            s.set_dns_port(p);
            assert!(s.is_dns_port(p), "port {p}");
        }
        assert!(!s.is_dns_port(54));
        assert!(!s.is_dns_port(65534));
    }
}
