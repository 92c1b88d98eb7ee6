//! sessiongate's XDP program: refuses new TCP and UDP flows to session-checked
//! destinations from devices whose session is too old, and passes everything else.
#![no_std]
#![no_main]
// Inline BPF assembly for single packet loads (`packet.rs`).
#![feature(asm_experimental_arch)]

mod clock;
mod family;
mod judge;
mod maps;
mod packet;
mod parse;
mod report;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

use crate::{
    family::{V4, V6},
    judge::judge,
    parse::{Packet, parse},
    report::count,
};

#[xdp]
pub fn sessiongate(ctx: XdpContext) -> u32 {
    let verdict = match parse(&ctx) {
        Ok(Packet::V4 { src, dst, l4 }) => judge::<V4>(&src, &dst, &l4),
        Ok(Packet::V6 { src, dst, l4 }) => judge::<V6>(&src, &dst, &l4),
        Err(verdict) => verdict,
    };
    count(verdict.code());
    if verdict.is_refusal() {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
