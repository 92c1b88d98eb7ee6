//! XDP programs used only by `cargo xtask bench`:
//! - `xdp_pass`, the do-nothing program every per-packet cost is measured against;
//! - `xdp_generate`, a packet generator. Run with BPF_PROG_TEST_RUN in live-frames mode
//!   on the client's interface, it rewrites the source address and port of each frame
//!   (with correct checksums) and transmits it, at rates no userspace generator here
//!   reaches.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
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
pub fn xdp_generate(ctx: XdpContext) -> u32 {
    match generate(&ctx) {
        Some(()) => xdp_action::XDP_TX,
        None => xdp_action::XDP_DROP,
    }
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
