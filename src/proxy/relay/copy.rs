//! Moving one direction's bytes through user space: the copy steps of the
//! hybrid relay (through one scratch buffer per worker thread; only what
//! the peer cannot take yet is kept for the connection), and the whole of
//! `--tcp-relay copy` (a buffer of its own per direction).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use nix::sys::socket::{MsgFlags, recv};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::count::Tally;
use super::direction::{
    Activity, DirectionResult, Failure, destination_failure, shutdown_write, source_failure, touch,
};

/// The buffer of each direction in `--tcp-relay copy`.
const COPY_BUFFER: usize = 64 * 1024;
/// The per-thread scratch buffer of the hybrid relay. A read that fills it
/// starts a bulk phase.
const SCRATCH: usize = 16 * 1024;

thread_local! {
    static SCRATCH_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

#[cfg(test)]
thread_local! {
    /// Copy steps on this thread whose peer could not take every byte at
    /// once (bytes kept in `unsent`): lets a test prove it reached that
    /// path. Per thread, so tests running in parallel do not mix.
    pub(super) static UNSENT_STEPS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// What one read-and-forward step did.
pub(super) enum Step {
    /// The source sent EOF.
    Eof,
    /// `n` bytes read; `full` when they filled the scratch buffer.
    Moved { n: usize, full: bool },
}

/// Reads once from `src`, waiting for data. A short read is taken as
/// proof that the socket is drained and clears its readiness (as tokio's
/// own `poll_read` does), so the next message costs no read that only
/// returns EAGAIN. `Ok(0)` is EOF.
fn poll_read_drained(
    cx: &mut Context<'_>,
    src: &TcpStream,
    buf: &mut [u8],
) -> Poll<io::Result<usize>> {
    loop {
        ready!(src.poll_read_ready(cx))?;
        let mut short = None;
        let fd = src.as_raw_fd();
        let result = src.try_io(Interest::READABLE, || {
            let n = recv(fd, buf, MsgFlags::empty()).map_err(io::Error::from)?;
            if n > 0 && n < buf.len() {
                // Report "would block" so that try_io clears the
                // readiness; the bytes are handed over through `short`.
                short = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match result {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Some(n) = short {
                    return Poll::Ready(Ok(n));
                }
                // Drained: poll_read_ready registers the waker.
            }
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// Reads once from `src` into the thread's scratch buffer and writes what
/// it can to `dst` at once; what `dst` cannot take yet goes to `unsent`.
///
/// The scratch buffer is borrowed only within one poll, so the next poll
/// may run on another thread with another buffer.
pub(super) fn poll_copy_step(
    cx: &mut Context<'_>,
    src: &TcpStream,
    dst: &TcpStream,
    unsent: &mut Vec<u8>,
    activity: &Option<Arc<Activity>>,
) -> Poll<Result<Step, Failure>> {
    SCRATCH_BUF.with(|cell| {
        let mut buf = cell.borrow_mut();
        let n = match poll_read_drained(cx, src, &mut buf[..]) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(source_failure(e))),
            Poll::Ready(Ok(n)) => n,
        };
        if n == 0 {
            return Poll::Ready(Ok(Step::Eof));
        }
        touch(activity);
        let mut written = 0;
        while written < n {
            match dst.try_write(&buf[written..n]) {
                Ok(w) => written += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Poll::Ready(Err(destination_failure(e))),
            }
        }
        #[cfg(test)]
        if written < n {
            UNSENT_STEPS.with(|c| c.set(c.get() + 1));
        }
        unsent.extend_from_slice(&buf[written..n]);
        Poll::Ready(Ok(Step::Moved {
            n,
            full: n == buf.len(),
        }))
    })
}

/// Writes all of `bytes` to `dst`, waiting for room.
async fn write_all(dst: &TcpStream, bytes: &[u8]) -> Result<(), Failure> {
    let mut done = 0;
    while done < bytes.len() {
        dst.writable().await.map_err(Failure::Flow)?;
        match dst.try_write(&bytes[done..]) {
            Ok(w) => done += w,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(destination_failure(e)),
        }
    }
    Ok(())
}

/// Writes all of `unsent` to `dst`, then frees it.
pub(super) async fn flush(dst: &TcpStream, unsent: &mut Vec<u8>) -> Result<(), Failure> {
    if unsent.is_empty() {
        return Ok(());
    }
    write_all(dst, unsent).await?;
    // Backpressure is rare for small flows: give the memory back.
    *unsent = Vec::new();
    Ok(())
}

/// `--tcp-relay copy`: moves `src` → `dst` through a buffer of its own
/// until EOF on `src`, then half-closes `dst`; counts into `tally` as
/// bytes move.
pub(super) async fn copy_one_way(
    src: &TcpStream,
    dst: &TcpStream,
    activity: &Option<Arc<Activity>>,
    mut tally: Tally,
) -> DirectionResult {
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut total = 0u64;
    loop {
        let n = std::future::poll_fn(|cx| poll_read_drained(cx, src, &mut buf))
            .await
            .map_err(source_failure)?;
        if n == 0 {
            shutdown_write(dst).map_err(destination_failure)?;
            return Ok(total);
        }
        touch(activity);
        write_all(dst, &buf[..n]).await?;
        total += n as u64;
        tally.add(n);
    }
}
