//! Giving memory that a bulk operation freed back to the system.

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
