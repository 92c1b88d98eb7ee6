//! The boot clock, read at most once per CPU per jiffy.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_boot_ns};

use crate::maps::SG_CLOCK;

/// Boot-clock nanoseconds, up to one tick behind: `bpf_ktime_get_boot_ns` is sampled
/// when this CPU's jiffies counter has moved since the last sample, else reused.
/// Sessions are judged in seconds, so a tick of lag changes nothing but the cost.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY (all): helpers without pointer arguments; the per-CPU entry is only
    // touched by this CPU, and XDP does not preempt itself.
    let jiffies = unsafe { bpf_jiffies64() };
    match SG_CLOCK.get_ptr_mut(0) {
        Some(clock) => unsafe {
            if (*clock).jiffies != jiffies {
                (*clock).jiffies = jiffies;
                (*clock).boot_ns = bpf_ktime_get_boot_ns();
            }
            (*clock).boot_ns
        },
        None => unsafe { bpf_ktime_get_boot_ns() },
    }
}
