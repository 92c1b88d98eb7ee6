//! XDP programs used only by `cargo xtask bench`:
//! - `xdp_pass`, the do-nothing program every per-packet cost is measured against;
//! - `xdp_drop`, which reads each frame's Ethernet header and drops it: the least a
//!   refusal can cost end to end (any filter reads the header), the floor of the
//!   flood's measurements;
//! - `xdp_generate`, a packet generator. Run with BPF_PROG_TEST_RUN in live-frames mode
//!   on the client's interface, it rewrites the source address and port of each frame
//!   (with correct checksums) and transmits it, at rates no userspace generator here
//!   reaches;
//! - `part_*`, the parts of sessiongate's refusal path each alone (`refusal_parts`), so
//!   that the bench can say what each costs above the floor.
#![no_std]
#![no_main]

use agent_common::{
    hashing::{bucket, check, fold_event},
    logic::event_due,
    maps::{EVENT_CHECK_REFUSAL, EventLimitSlot, FlowEvent, MAX_POLICIES},
    verdict::counter,
};
use aya_ebpf::{
    bindings::{BPF_F_BROADCAST, xdp_action},
    macros::{map, xdp},
    maps::{Array, DevMap, PerCpuArray, RingBuf},
    programs::XdpContext,
};

/// `GEN_CONFIG`: ARRAY, one entry, written by the benchmark before each run.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GenConfig {
    /// First source address, host order; frames cycle through `src_count` of them.
    pub src_base: u32,
    pub src_count: u32,
    /// First source port; each pass over the addresses moves to the next port, over
    /// `sport_count` ports.
    pub sport_base: u16,
    pub sport_count: u16,
    pub _pad: u32,
}

#[map]
static GEN_CONFIG: Array<GenConfig> = Array::with_max_entries(1, 0);

/// Frames generated on each CPU so far: the sequence that picks address and port.
#[map]
static GEN_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

const ETH_HLEN: usize = 14;
const IP_HLEN: usize = 20;
const L4: usize = ETH_HLEN + IP_HLEN;
const IPPROTO_TCP: u8 = 6;

#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn xdp_drop(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + ETH_HLEN > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: within the frame, checked above.
    let ethertype = unsafe { core::ptr::read_unaligned((start + 12) as *const u16) };
    // The header is read, so its cache miss is paid as a filter pays it.
    if ethertype == 0 {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

#[xdp]
pub fn xdp_generate(ctx: XdpContext) -> u32 {
    match generate(&ctx) {
        Some(()) => xdp_action::XDP_TX,
        None => xdp_action::XDP_DROP,
    }
}

// The refusal path's parts, with maps shaped and sized as sessiongate's
// (`SG_POLICY_DROPS`, `SG_COUNTERS`, `SG_EVENT_LIMIT` at the agent's size for a
// million sessions, `SG_EVENTS`).
#[map]
static PART_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2 * MAX_POLICIES, 0);

#[map]
static PART_EVENT_LIMIT: Array<EventLimitSlot> = Array::with_max_entries(1 << 20, 0);

#[map]
static PART_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// `RELAY_TO`: DEVMAP, every entry set by the benchmark to the client's veth: a frame
/// broadcast to all of them leaves it `RELAY_FANOUT` times.
#[map]
static RELAY_TO: DevMap = DevMap::with_max_entries(RELAY_FANOUT, 0);

/// Frames the relay sends per frame it receives: enough that its rate exceeds what the
/// gateway takes in, whatever the userspace sender feeding it manages.
pub const RELAY_FANOUT: u32 = 32;

#[xdp]
pub fn xdp_relay(ctx: XdpContext) -> u32 {
    match generate(&ctx) {
        Some(()) => RELAY_TO
            .redirect(0, u64::from(BPF_F_BROADCAST))
            .unwrap_or(xdp_action::XDP_DROP),
        None => xdp_action::XDP_DROP,
    }
}

/// A policy's refusal counter: one per-CPU array increment.
#[xdp]
pub fn part_counter(ctx: XdpContext) -> u32 {
    let slot = source_word(&ctx) & (MAX_POLICIES - 1);
    bump(slot);
    xdp_action::XDP_PASS
}

/// The event limiter as a refusal flood meets it: the pair's slot says an event went
/// out within the second, so none is sent and the rate-limited counter moves.
#[xdp]
pub fn part_limiter(ctx: XdpContext) -> u32 {
    // A fixed "now": the refusal path has read the clock already.
    const NOW_NS: u64 = 1 << 40;
    let folded = fold_event(u64::from(source_word(&ctx)), 3, 4);
    let pair = check(folded, EVENT_CHECK_REFUSAL);
    let Some(slot) = PART_EVENT_LIMIT.get_ptr_mut(bucket(folded, (1 << 20) - 1)) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: a live array element.
    unsafe {
        let last = ((*slot).check == pair).then_some((*slot).last_event_ns);
        if event_due(NOW_NS, last) {
            (*slot).check = pair;
            (*slot).last_event_ns = NOW_NS;
        } else {
            bump(counter::EVENTS_RATE_LIMITED);
        }
    }
    xdp_action::XDP_PASS
}

/// A refusal event's ring buffer reservation, given back unsent.
#[xdp]
pub fn part_ring(_ctx: XdpContext) -> u32 {
    if let Some(entry) = PART_EVENTS.reserve::<FlowEvent>(0) {
        entry.discard(0);
    }
    xdp_action::XDP_PASS
}

#[inline(always)]
fn bump(slot: u32) {
    if let Some(c) = PART_COUNTS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot.
        unsafe { *c += 1 };
    }
}

/// The IPv4 source address of an untagged frame (0 if it is too short), as the
/// refusal path's device.
#[inline(always)]
fn source_word(ctx: &XdpContext) -> u32 {
    let start = ctx.data();
    if start + ETH_HLEN + IP_HLEN > ctx.data_end() {
        return 0;
    }
    // SAFETY: within the frame, checked above.
    unsafe { core::ptr::read_unaligned((start + ETH_HLEN + 12) as *const u32) }
}

/// One's-complement sum of big-endian 16-bit words, folded.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

#[inline(always)]
fn generate(ctx: &XdpContext) -> Option<()> {
    let config = GEN_CONFIG.get(0)?;
    let seq_ptr = GEN_SEQ.get_ptr_mut(0)?;
    // SAFETY: per-CPU, not preempted.
    let seq = unsafe {
        let s = *seq_ptr;
        *seq_ptr = s + 1;
        s
    };
    let start = ctx.data();
    // Untagged IPv4 with a 20-byte header; TCP needs 20 bytes, UDP 8: check for 20.
    if start + L4 + 20 > ctx.data_end() {
        return None;
    }
    let p = start as *mut u8;
    let count = u64::from(config.src_count.max(1));
    let src = config
        .src_base
        .wrapping_add((seq % count) as u32)
        .to_be_bytes();
    let ports = u64::from(config.sport_count.max(1));
    let sport = config
        .sport_base
        .wrapping_add(((seq / count) % ports) as u16)
        .to_be_bytes();
    // SAFETY (all accesses): offsets below L4 + 20, checked against data_end above.
    unsafe {
        let word = |at: usize| u32::from(u16::from_be_bytes([*p.add(at), *p.add(at + 1)]));
        let proto = *p.add(ETH_HLEN + 9);
        // TCP covers the source address (pseudo-header) and port: update incrementally
        // (RFC 1624) from the words being replaced.
        if proto == IPPROTO_TCP {
            let old = [word(ETH_HLEN + 12), word(ETH_HLEN + 14), word(L4)];
            let new = [
                u32::from(u16::from_be_bytes([src[0], src[1]])),
                u32::from(u16::from_be_bytes([src[2], src[3]])),
                u32::from(u16::from_be_bytes(sport)),
            ];
            let mut sum = u32::from(!u16::from_be_bytes([*p.add(L4 + 16), *p.add(L4 + 17)]));
            for i in 0..3 {
                sum += u32::from(!(old[i] as u16)) + new[i];
            }
            let csum = (!fold(sum)).to_be_bytes();
            *p.add(L4 + 16) = csum[0];
            *p.add(L4 + 17) = csum[1];
        }
        for (i, b) in src.iter().enumerate() {
            *p.add(ETH_HLEN + 12 + i) = *b;
        }
        *p.add(L4) = sport[0];
        *p.add(L4 + 1) = sport[1];
        // The IPv4 header checksum, from scratch: ten words.
        *p.add(ETH_HLEN + 10) = 0;
        *p.add(ETH_HLEN + 11) = 0;
        let mut sum = 0u32;
        for i in 0..10 {
            sum += word(ETH_HLEN + 2 * i);
        }
        let csum = (!fold(sum)).to_be_bytes();
        *p.add(ETH_HLEN + 10) = csum[0];
        *p.add(ETH_HLEN + 11) = csum[1];
    }
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
