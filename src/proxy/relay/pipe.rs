//! The pipes bulk directions splice through: a process-wide pool with a
//! cap, and what happens when no pipe can be had.
//!
//! A pipe costs two file descriptors and, for as long as it exists, its
//! size (1 MiB: 256 pages) counts against its user's pipe quota
//! (`fs.pipe-user-pages-soft`, 16 384 pages by default). The proxy runs as
//! root and shares that quota with every root process of the host: past
//! the soft limit the kernel gives every new pipe of theirs one page
//! instead of 16. So the proxy's pipes are bounded: at most
//! `--splice-pipes-max` exist at once ([`PIPES`]), whether a bulk phase
//! holds them or they wait in the pool for the next one. A bulk phase
//! takes one when it starts and gives it back when it ends; the pool keeps
//! it for the next phase if it is empty (a phase that failed midway may
//! leave bytes in it: such a pipe is closed, never handed to another
//! flow). When the cap is reached, or no pipe can be created (EMFILE,
//! ENFILE), the direction goes on by copying (counted in
//! `kubeuproxy_splice_pipe_fallbacks_total`): a flow never fails for want
//! of a pipe. When the pipe cannot be enlarged (no CAP_SYS_RESOURCE, or
//! the quota is used up), splicing goes on through the smaller pipe, and
//! the log says so once.

use std::io;
use std::ops::Deref;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

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

/// The cap until `--splice-pipes-max` sets it: half the default pipe
/// quota of a user (16 384 pages) in pipes of [`PIPE_SIZE`].
pub const DEFAULT_MAX: usize = 32;

/// The process's splice pipes, taken by bulk phases.
pub static PIPES: PipePool = PipePool::new(DEFAULT_MAX);

/// Why no pipe was given.
#[derive(Debug, thiserror::Error)]
pub enum NoPipe {
    /// `--splice-pipes-max` pipes exist already.
    #[error("all {0} splice pipes (--splice-pipes-max) are in use")]
    Exhausted(usize),
    /// The kernel gave none (EMFILE, ENFILE, memory).
    #[error("cannot create a splice pipe: {0}")]
    Create(#[from] io::Error),
}

#[derive(Debug)]
struct PoolState {
    max: usize,
    /// Pipes that exist: held by bulk phases, or idle below.
    open: usize,
    idle: Vec<Pipe>,
    /// The most pipes held by bulk phases at once (tests).
    peak: usize,
}

/// Pipes for bulk phases, at most `max` of them open at once. Taking one
/// happens once per bulk phase, so a mutex is cheap enough.
#[derive(Debug)]
pub struct PipePool {
    state: Mutex<PoolState>,
    fallbacks: AtomicU64,
}

impl PipePool {
    pub const fn new(max: usize) -> Self {
        PipePool {
            state: Mutex::new(PoolState {
                max,
                open: 0,
                idle: Vec::new(),
                peak: 0,
            }),
            fallbacks: AtomicU64::new(0),
        }
    }

    fn state(&self) -> MutexGuard<'_, PoolState> {
        // Only short, non-panicking sections hold it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the cap (`--splice-pipes-max`, at least 1). Idle pipes above
    /// it are closed at once; pipes in use above it when they come back.
    pub fn set_max(&self, max: usize) {
        let mut state = self.state();
        state.max = max.max(1);
        while state.open > state.max && state.idle.pop().is_some() {
            state.open -= 1;
        }
    }

    /// A pipe for one bulk phase: an idle one of the pool, else a new one
    /// while fewer than the cap exist. None is counted as a fallback (the
    /// direction copies instead).
    pub fn take(&self) -> Result<PooledPipe<'_>, NoPipe> {
        let taken = {
            let mut state = self.state();
            let taken = match state.idle.pop() {
                Some(pipe) => Ok(Some(pipe)),
                None if state.open < state.max => {
                    state.open += 1;
                    Ok(None)
                }
                None => Err(NoPipe::Exhausted(state.max)),
            };
            if taken.is_ok() {
                let held = state.open - state.idle.len();
                state.peak = state.peak.max(held);
            }
            taken
        };
        let pipe = match taken {
            Ok(Some(pipe)) => pipe,
            // Created outside the lock: two system calls.
            Ok(None) => match Pipe::new() {
                Ok(pipe) => pipe,
                Err(e) => {
                    self.state().open -= 1;
                    self.fallbacks.fetch_add(1, Ordering::Relaxed);
                    return Err(NoPipe::Create(e));
                }
            },
            Err(e) => {
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        Ok(PooledPipe {
            pipe: Some(pipe),
            pool: self,
        })
    }

    /// A pipe comes back: kept for the next phase if it is empty and the
    /// cap allows, closed otherwise.
    fn give_back(&self, pipe: Pipe) {
        let empty = pipe.is_empty();
        let mut state = self.state();
        if empty && state.open <= state.max {
            state.idle.push(pipe);
        } else {
            state.open -= 1;
            drop(state);
            drop(pipe);
        }
    }

    /// Pipes held by bulk phases now.
    pub fn in_use(&self) -> usize {
        let state = self.state();
        state.open - state.idle.len()
    }

    /// Pipes open now, in use or idle in the pool.
    pub fn open(&self) -> usize {
        self.state().open
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.state().max
    }

    /// Times a bulk direction asked for a pipe and got none (it copied).
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// The most pipes held by bulk phases at once so far.
    #[cfg(test)]
    pub fn peak(&self) -> usize {
        self.state().peak
    }
}

/// A pipe taken from a [`PipePool`], given back when dropped (however
/// the bulk phase ends).
#[derive(Debug)]
pub struct PooledPipe<'a> {
    /// Always `Some` until dropped.
    pipe: Option<Pipe>,
    pool: &'a PipePool,
}

impl Deref for PooledPipe<'_> {
    type Target = Pipe;
    fn deref(&self) -> &Pipe {
        // Set at creation, taken only in drop.
        self.pipe.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for PooledPipe<'_> {
    fn drop(&mut self) {
        if let Some(pipe) = self.pipe.take() {
            self.pool.give_back(pipe);
        }
    }
}

impl Pipe {
    /// Whether the pipe holds no byte: a read of one byte would block. (A
    /// byte read here is lost, but a pipe that had one is closed anyway.)
    fn is_empty(&self) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            nix::unistd::read(&self.read, &mut byte),
            Err(nix::errno::Errno::EAGAIN)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn write(pipe: &Pipe, bytes: &[u8]) {
        assert_eq!(nix::unistd::write(&pipe.write, bytes).unwrap(), bytes.len());
    }

    #[test]
    fn a_drained_pipe_is_reused_and_a_pipe_with_bytes_left_is_not() {
        let pool = PipePool::new(1);
        // Used and drained: back in the pool, and the next phase gets it.
        let first = pool.take().unwrap();
        write(&first, b"hello");
        let mut buf = [0u8; 5];
        assert_eq!(nix::unistd::read(&first.read, &mut buf).unwrap(), 5);
        let fds = (first.read.as_raw_fd(), first.write.as_raw_fd());
        drop(first);
        assert_eq!((pool.open(), pool.in_use()), (1, 0));
        let again = pool.take().unwrap();
        assert_eq!((again.read.as_raw_fd(), again.write.as_raw_fd()), fds);
        // A phase that failed with bytes still in its pipe: the pipe is
        // closed, and the next phase gets a new, empty one.
        write(&again, b"stale bytes of another flow");
        drop(again);
        assert_eq!((pool.open(), pool.in_use()), (0, 0));
        let fresh = pool.take().unwrap();
        assert!(fresh.is_empty(), "a reused pipe carried stale bytes");
        assert_eq!((pool.open(), pool.in_use()), (1, 1));
        assert_eq!(pool.fallbacks(), 0);
    }

    #[test]
    fn past_the_cap_no_pipe_is_given_and_each_refusal_is_counted() {
        let pool = PipePool::new(2);
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        assert!(matches!(pool.take(), Err(NoPipe::Exhausted(2))));
        assert!(matches!(pool.take(), Err(NoPipe::Exhausted(2))));
        assert_eq!((pool.in_use(), pool.fallbacks()), (2, 2));
        drop(a);
        let c = pool.take().unwrap();
        assert_eq!((pool.open(), pool.in_use(), pool.peak()), (2, 2, 2));
        // A lower cap closes what comes back above it.
        pool.set_max(1);
        drop(b);
        drop(c);
        assert_eq!((pool.open(), pool.in_use()), (1, 0));
    }
}
