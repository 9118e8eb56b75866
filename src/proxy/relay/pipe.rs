//! The pipe a bulk direction splices through, and what happens when the
//! kernel will not give one.
//!
//! A pipe costs two file descriptors and counts against the per-user pipe
//! quota (`fs.pipe-user-pages-soft`), so one exists only while a direction
//! is in a bulk phase (see `splice.rs`). When none can be created (EMFILE,
//! ENFILE, the quota), the direction goes on by copying: a flow never fails
//! for want of a pipe. When the pipe cannot be enlarged (no
//! CAP_SYS_RESOURCE, or the quota is used up), splicing goes on through the
//! smaller pipe, and the log says so once.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tracing::warn;

use crate::proxy::log_limit::{LOG_INTERVAL, LogLimit};

/// Size asked for each pipe: the most one splice call moves. 1 MiB (the
/// default `fs.pipe-max-size`) against 256 KiB: +13 % one-way and +18 %
/// both-ways throughput and 24 % less proxy CPU per GB in an interleaved
/// run (docs/performance.md). Its pages are the socket's own (moved, not
/// copied), and an empty pipe holds none.
pub const PIPE_SIZE: usize = 1024 * 1024;

/// A pipe used as the in-kernel buffer of one bulk direction.
#[derive(Debug)]
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

impl Pipe {
    /// A non-blocking pipe of [`PIPE_SIZE`] if the kernel allows it, of
    /// whatever size it gives otherwise.
    pub fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        if let Err(e) = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32)) {
            size_refused(e, &write);
        }
        Ok(Pipe { read, write })
    }
}

/// Set once the refused size has been logged.
static SIZE_REFUSED_SAID: AtomicBool = AtomicBool::new(false);

/// Says once per process that pipes stay small: throughput drops (more
/// system calls per byte), nothing fails, and the fix is the operator's.
fn size_refused(e: nix::errno::Errno, write: &OwnedFd) {
    if SIZE_REFUSED_SAID.swap(true, Ordering::Relaxed) {
        return;
    }
    let got_kib = fcntl(write, FcntlArg::F_GETPIPE_SZ)
        .map(|b| b / 1024)
        .unwrap_or(0);
    warn!(
        error = %e,
        pipe_kib = got_kib,
        "the kernel refused a 1 MiB splice pipe; bulk flows splice through smaller pipes \
         (more system calls per byte). Give the proxy CAP_SYS_RESOURCE or raise \
         fs.pipe-max-size / fs.pipe-user-pages-soft. Said once"
    );
}

/// Rate limit of [`unavailable`].
static UNAVAILABLE_LOG: LogLimit = LogLimit::new(LOG_INTERVAL);

/// Logs (rate-limited) that a bulk direction could not get a pipe and is
/// copied instead.
pub fn unavailable(e: &io::Error) {
    if let Some(held_back) = UNAVAILABLE_LOG.check() {
        warn!(
            error = %e,
            held_back,
            "cannot create a splice pipe; the bulk flow is copied instead"
        );
    }
}
