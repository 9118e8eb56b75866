//! The memory allocator: jemalloc, set up for a process whose memory is
//! mostly its Services' state, built in bursts (a cold start or a relist
//! parses every object at once) and then kept for hours.
//!
//! glibc's malloc kept freed memory in whichever of its arenas the burst
//! happened to run on, so the same live heap gave a very different RSS
//! from one run to the next, even with two arenas and a `malloc_trim`
//! after each burst. jemalloc, with a background thread that hands pages
//! nobody uses back to the kernel within a second, holds the same state in
//! the same RSS run after run (the figures: docs/performance.md, "Memory
//! per Service: under 8 KiB").
//!
//! The binary installs it (`#[global_allocator]` in main.rs); the settings
//! below are read by jemalloc when it starts, before `main`. Built without
//! the `jemalloc` feature, the binary uses the system's malloc, which heap
//! profilers that hook malloc (heaptrack, valgrind) can see.

use std::ffi::c_char;

/// jemalloc's options, as its `malloc_conf` string:
/// - `background_thread`: purging runs on jemalloc's own thread, not in
///   the allocations of the data path, and happens when the process is idle
///   after a burst too;
/// - `dirty_decay_ms:1000`, `muzzy_decay_ms:0`: pages freed and not reused
///   go back to the kernel within a second (the default, 10 s, holds a
///   start's parsing garbage for that long; a steady data path reuses its
///   pages long before either);
/// - `narenas:2`: one arena per core of the machines this is sized for is
///   plenty for a data path that allocates per connection, not per packet,
///   and fewer arenas strand less memory.
pub const MALLOC_CONF: &std::ffi::CStr =
    c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,narenas:2";

/// A pointer jemalloc reads as its `malloc_conf` global.
#[repr(transparent)]
pub struct ConfPtr(*const c_char);

// SAFETY: the pointer is to a `'static` C string that nothing writes.
unsafe impl Sync for ConfPtr {}

/// jemalloc (as linked by tikv-jemalloc-sys, whose symbols carry the
/// `_rjem_` prefix) reads this global once, when it initialises.
// SAFETY: the symbol is jemalloc's documented configuration hook, defined
// nowhere else in the program; its type is what jemalloc declares
// (`const char *`), and the string it points to is NUL-terminated and
// lives for the whole program.
#[cfg(feature = "jemalloc")]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static JEMALLOC_CONF: ConfPtr = ConfPtr(MALLOC_CONF.as_ptr());

/// What the allocator runs with, for the start-up log line: whether the
/// configuration above took (jemalloc's `opt.background_thread` reads back
/// true) and its arenas.
#[derive(Debug, Clone, Copy)]
pub struct AllocatorState {
    pub background_thread: bool,
    pub narenas: u32,
}

/// Reads jemalloc's settings; `None` when it cannot (or is not built in).
pub fn allocator_state() -> Option<AllocatorState> {
    #[cfg(feature = "jemalloc")]
    {
        use tikv_jemalloc_ctl::opt;
        Some(AllocatorState {
            background_thread: opt::background_thread::read().ok()?,
            // The option, not `arenas.narenas`: that one counts the arena
            // jemalloc adds for huge allocations too.
            narenas: opt::narenas::read().ok()?,
        })
    }
    #[cfg(not(feature = "jemalloc"))]
    {
        None
    }
}
