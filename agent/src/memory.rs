//! Memory in bulk operations: loading what a pass over a large table is about to
//! touch ahead of time, and giving back what it freed.

/// Returns the heap's free pages to the system. After a million-session start,
/// snapshot or import the allocator keeps the hundreds of MiB that the parsing,
/// decoding and writing freed (much of it in the arenas of the threads that did the
/// work), and they count in the agent's RSS until reused. It walks the heap, so it is
/// for after bulk work, not for every request.
pub fn release_free_pages() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only gives back pages the allocator holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The cache line size of the CPUs the agent runs on.
const LINE: usize = 64;

/// Asks the CPU to start loading the memory of `value` (a hint: it reads nothing, cannot
/// fault, and does nothing where the target has no such instruction). A pass that
/// touches elements of a table far larger than the caches in an order the hardware
/// cannot guess then waits for many at once instead of one at a time.
#[inline(always)]
pub fn prefetch<T>(value: *const T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let first = value.cast::<i8>();
        // Every cache line the value touches (its first and last bytes included).
        let lines = (first as usize % LINE + size_of::<T>())
            .div_ceil(LINE)
            .max(1);
        for line in 0..lines {
            // SAFETY: a prefetch is a hint; it neither reads for the program nor
            // faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(first.wrapping_add(line * LINE)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}
