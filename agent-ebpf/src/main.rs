//! sessiongate's programs. XDP (`sessiongate`): refuses new TCP and UDP flows to
//! session-checked destinations from devices whose session is too old, by dropping,
//! answering (`reply`) or handing them to the portal, and passes everything else.
//! TC (`sessiongate_portal`, `portal.rs`): delivers the handed-over connections to the
//! agent's portal.
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
mod portal;
mod reply;
mod report;

use agent_common::{
    maps::{ACTION_REDIRECT, ACTION_REJECT},
    verdict::Verdict,
};
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

use crate::{
    family::{V4, V6},
    judge::{judge, judge_unreadable},
    parse::{Packet, parse},
    report::count,
};

#[xdp]
pub fn sessiongate(ctx: XdpContext) -> u32 {
    let (verdict, action, l4, ipv6) = match parse(&ctx) {
        Ok(Packet::V4 { src, dst, l4 }) => {
            let (verdict, action) = judge::<V4>(&src, &dst, &l4);
            (verdict, action, l4, false)
        }
        Ok(Packet::V6 { src, dst, l4 }) => {
            let (verdict, action) = judge::<V6>(&src, &dst, &l4);
            (verdict, action, l4, true)
        }
        Ok(Packet::Unreadable4 { src, dst, verdict }) => {
            return unreadable(judge_unreadable::<V4>(&src, &dst, verdict));
        }
        Ok(Packet::Unreadable6 { src, dst, verdict }) => {
            return unreadable(judge_unreadable::<V6>(&src, &dst, verdict));
        }
        Err(verdict) => {
            count(verdict.code());
            return xdp_action::XDP_PASS;
        }
    };
    count(verdict.code());
    if !verdict.is_refusal() {
        return xdp_action::XDP_PASS;
    }
    match action {
        ACTION_REJECT => reply::reject(&ctx, &l4, ipv6),
        ACTION_REDIRECT => reply::to_portal(&ctx, &l4, ipv6),
        _ => xdp_action::XDP_DROP,
    }
}

/// A refused unreadable packet is dropped: there is no L4 header to answer.
#[inline(always)]
fn unreadable(verdict: Verdict) -> u32 {
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
