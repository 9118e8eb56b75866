//! The C allocator's settings (glibc malloc): the proxy's memory is mostly
//! its Services' state, built in bursts (a cold start or a relist parses
//! every object at once) and then kept for hours.
//!
//! - Arenas: glibc gives every thread that allocates while another holds a
//!   lock its own arena, up to 8 per core; the burst of a start spreads over
//!   many of them, and memory freed in one arena is not reused by another.
//!   At 10 000 Services, 2 arenas hold the same state in 150 MB of RSS
//!   instead of 235 MB. The data path allocates almost nothing per packet
//!   (buffers are per thread), so two arenas cost it nothing measurable.
//! - Trim: after a burst, what was freed (parsed objects, the nft
//!   transaction) goes back to the kernel.
//!
//! Without glibc (musl), both are no-ops.

/// Arenas for the whole process; call before the runtime's threads start.
pub const ARENAS: i32 = 2;

/// Caps glibc's malloc arenas at [`ARENAS`]. Returns whether it took.
pub fn limit_arenas() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets an allocator parameter; M_ARENA_MAX
        // applies to arenas created from now on and is safe to call at any
        // time, from any thread.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, ARENAS) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Gives memory freed inside the heap back to the kernel (glibc's
/// `malloc_trim`, which also releases whole free pages in the middle of
/// each arena). Takes a few milliseconds at 10 000 Services: call it after
/// bursts, not per change.
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes the allocator's own locks and touches only
    // memory that is free; it is safe to call at any time, from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
