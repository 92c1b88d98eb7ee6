//! Single loads from packet memory. Rust reads a `[u8; N]` field one byte at a time in
//! BPF code, and typed reads would assume alignment packets do not promise; these read
//! a field of any alignment in one instruction, which the verifier accepts for packet
//! pointers (only stack accesses must be aligned).

use core::arch::asm;

/// # Safety
/// `addr` must point at readable packet bytes the verifier knows are in bounds.
#[inline(always)]
pub unsafe fn load_u8(addr: usize) -> u8 {
    // SAFETY: by the caller.
    unsafe { *(addr as *const u8) }
}

/// A big-endian (network order) 16-bit field, in host order.
///
/// # Safety
/// As `load_u8`, for 2 bytes.
#[inline(always)]
pub unsafe fn load_u16_be(addr: usize) -> u16 {
    let v: u64;
    // SAFETY: by the caller; the asm only reads.
    unsafe {
        asm!("{0} = *(u16 *)({1} + 0)", out(reg) v, in(reg) addr,
            options(pure, readonly, nostack, preserves_flags));
    }
    u16::from_be(v as u16)
}

/// 4 bytes as one word, its memory image unchanged (an `Ip4`).
///
/// # Safety
/// As `load_u8`, for 4 bytes.
#[inline(always)]
pub unsafe fn load_u32(addr: usize) -> u32 {
    let v: u64;
    // SAFETY: by the caller; the asm only reads.
    unsafe {
        asm!("{0} = *(u32 *)({1} + 0)", out(reg) v, in(reg) addr,
            options(pure, readonly, nostack, preserves_flags));
    }
    v as u32
}

/// 8 bytes as one word, its memory image unchanged (half an `Ip6`).
///
/// # Safety
/// As `load_u8`, for 8 bytes.
#[inline(always)]
pub unsafe fn load_u64(addr: usize) -> u64 {
    let v: u64;
    // SAFETY: by the caller; the asm only reads.
    unsafe {
        asm!("{0} = *(u64 *)({1} + 0)", out(reg) v, in(reg) addr,
            options(pure, readonly, nostack, preserves_flags));
    }
    v
}

/// 2 bytes as one word, its memory image unchanged.
///
/// # Safety
/// As `load_u8`, for 2 bytes.
#[inline(always)]
pub unsafe fn load_u16(addr: usize) -> u16 {
    let v: u64;
    // SAFETY: by the caller; the asm only reads.
    unsafe {
        asm!("{0} = *(u16 *)({1} + 0)", out(reg) v, in(reg) addr,
            options(pure, readonly, nostack, preserves_flags));
    }
    v as u16
}

/// Stores a word's memory image (native order: pass `to_be()` values for network
/// order) in one instruction, as the loads above read them.
///
/// # Safety
/// `addr` must point at writable packet bytes the verifier knows are in bounds.
#[inline(always)]
pub unsafe fn store_u16(addr: usize, v: u16) {
    // SAFETY: by the caller.
    unsafe {
        asm!("*(u16 *)({0} + 0) = {1}", in(reg) addr, in(reg) v as u64,
            options(nostack, preserves_flags));
    }
}

/// # Safety
/// As `store_u16`, for 4 bytes.
#[inline(always)]
pub unsafe fn store_u32(addr: usize, v: u32) {
    // SAFETY: by the caller.
    unsafe {
        asm!("*(u32 *)({0} + 0) = {1}", in(reg) addr, in(reg) v as u64,
            options(nostack, preserves_flags));
    }
}

/// # Safety
/// As `store_u16`, for 8 bytes.
#[inline(always)]
pub unsafe fn store_u64(addr: usize, v: u64) {
    // SAFETY: by the caller.
    unsafe {
        asm!("*(u64 *)({0} + 0) = {1}", in(reg) addr, in(reg) v,
            options(nostack, preserves_flags));
    }
}
