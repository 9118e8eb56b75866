//! Moving bytes between the two connections of a flow.
//!
//! Two ways, chosen with `--tcp-relay`:
//! - `splice` (default), a hybrid: each direction starts by copying through
//!   one scratch buffer per worker thread (read, then write at once; only
//!   bytes the peer cannot take yet are kept for the connection). When a
//!   read fills the whole scratch buffer the direction enters a bulk phase
//!   (`splice.rs`): socket → pipe → socket with splice(2), payload never
//!   entering user space, in a task of its own so that the two directions
//!   of a bulk flow can use two CPUs. When the source goes quiet the phase
//!   ends, the pipe is closed, and the direction copies again. Small
//!   request/response traffic never pays for a pipe (two file descriptors
//!   and a few system calls; a splice costs more than copying a few
//!   bytes); bulk traffic is not copied; an idle connection holds no buffer
//!   and no pipe, whatever it carried before. If no pipe can be had
//!   (`pipe.rs`), the direction copies.
//! - `copy`: a plain copy loop with a 64 KiB buffer per direction, for
//!   comparison in benchmarks and for kernels without splice.
//!
//! In both, an EOF on one side becomes a half-close (`shutdown(SHUT_WR)`)
//! on the other, and the opposite direction keeps running until it ends
//! too. How a failure ends the flow (`Failure`):
//! - an error *reading* a socket ends both directions: that peer is gone,
//!   and so is whatever the other direction still had to send it;
//! - an error *writing* a socket because its peer went away (reset, broken
//!   pipe) ends that direction only: the other direction still reads what
//!   that peer sent before it went (an HTTP 413 during an upload) and
//!   delivers it, as the peer itself would have.
//!
//! After a failure both sockets are reset (SO_LINGER 0: no peer waits on a
//! connection that is gone, no CLOSE_WAIT pile-up), each once the bytes
//! already written to it have been delivered, with a bound
//! (`reset_once_delivered`): a reset throws away what the peer has not
//! acknowledged. A flow cut from outside is reset at once.

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use nix::sys::socket::{MsgFlags, recv};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::debug;

use super::pipe::{self, Pipe};
use super::splice;
use super::sys;
use super::tcp_options::{LONG_LIVED, TcpOptions};

/// How bytes are moved between the two connections of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RelayMode {
    /// Zero-copy splice(2) through a pipe.
    Splice,
    /// A user-space copy loop.
    Copy,
}

/// How a flow is relayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayConfig {
    pub mode: RelayMode,
    /// A flow that moves no byte either way for this long is reset
    /// (`--tcp-idle-timeout`); `None`: never.
    pub idle_timeout: Option<Duration>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayMode::Splice.into()
    }
}

impl From<RelayMode> for RelayConfig {
    fn from(mode: RelayMode) -> Self {
        RelayConfig {
            mode,
            idle_timeout: None,
        }
    }
}

/// Bytes moved in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
}

/// The buffer of each direction in `--tcp-relay copy`.
const COPY_BUFFER: usize = 64 * 1024;
/// The per-thread scratch buffer of the hybrid relay. A read that fills it
/// starts a bulk phase.
const SCRATCH: usize = 16 * 1024;
/// After a direction could not get a pipe, how long it copies before it
/// asks again (asking costs a failing system call per 16 KiB otherwise).
const PIPE_RETRY: Duration = Duration::from_millis(100);
/// A peer that acknowledges nothing for this long gets its reset without
/// the rest of its bytes.
const DELIVERY_STALL: Duration = Duration::from_secs(1);
/// The longest a failed flow waits for its bytes to be delivered.
const DELIVERY_LIMIT: Duration = Duration::from_secs(10);

thread_local! {
    static SCRATCH_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

#[cfg(test)]
thread_local! {
    /// Copy steps on this thread whose peer could not take every byte at
    /// once (bytes kept in `unsent`): lets a test prove it reached that
    /// path. Per thread, so tests running in parallel do not mix.
    static UNSENT_STEPS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How one direction failed, which decides what happens to the other.
#[derive(Debug)]
pub(super) enum Failure {
    /// Ends both directions (an error that leaves the flow unusable).
    Flow(io::Error),
    /// Reading the source failed because its connection is dead (reset,
    /// timed out): ends both directions, and that socket has nothing left
    /// to deliver.
    SourceGone(io::Error),
    /// The destination's peer went away (reset, broken pipe): ends this
    /// direction only; the other one still delivers what that peer sent.
    PeerGone(io::Error),
}

impl Failure {
    fn into_error(self) -> io::Error {
        match self {
            Failure::Flow(e) | Failure::SourceGone(e) | Failure::PeerGone(e) => e,
        }
    }
}

/// Classifies an error reading from the source.
pub(super) fn source_failure(e: io::Error) -> Failure {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::TimedOut => {
            Failure::SourceGone(e)
        }
        _ => Failure::Flow(e),
    }
}

/// Classifies an error writing to (or half-closing) the destination.
pub(super) fn destination_failure(e: io::Error) -> Failure {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => Failure::PeerGone(e),
        _ => Failure::Flow(e),
    }
}

/// What one direction returns: the bytes it moved, until EOF.
type DirectionResult = Result<u64, Failure>;

/// How both directions ended.
enum Ending {
    Done(u64, u64),
    /// `dead`: whether the client's and the upstream's connection is known
    /// dead (nothing left to deliver on it before the reset).
    Failed {
        error: io::Error,
        dead: [bool; 2],
    },
    Cut,
    Idle(Duration),
}

/// When the flow last moved a byte, for `--tcp-idle-timeout`: shared by
/// both directions and their bulk phases.
#[derive(Debug)]
pub(super) struct Activity {
    start: Instant,
    /// Milliseconds since `start` of the last read that returned data.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// Bytes were read just now.
    pub(super) fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Marks `activity`, if the flow has an idle timeout.
pub(super) fn touch(activity: &Option<Arc<Activity>>) {
    if let Some(a) = activity {
        a.touch();
    }
}

/// The flow's timers, in one future with one sleep at a time: completes
/// (with the limit) once the flow has moved no byte for `idle_timeout`
/// (never without one); meanwhile sets `tcp` on the upstream socket once
/// the flow is [`LONG_LIVED`]. Wakes at most once per limit.
async fn watch(
    activity: Option<&Activity>,
    idle_timeout: Option<Duration>,
    tcp: &TcpOptions,
    upstream: &TcpStream,
) -> Duration {
    let arm_at = tcp.any().then(|| Instant::now() + LONG_LIVED);
    let mut armed = arm_at.is_none();
    loop {
        let idle_at = activity.zip(idle_timeout).map(|(a, l)| a.last() + l);
        let next = match (arm_at.filter(|_| !armed), idle_at) {
            (Some(a), Some(i)) => Some(a.min(i)),
            (a, i) => a.or(i),
        };
        match next {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
        let now = Instant::now();
        if !armed && arm_at.is_some_and(|t| now >= t) {
            armed = true;
            if let Err(e) = tcp.apply_to_upstream(upstream) {
                debug!(error = %e, "cannot set keepalive on the upstream socket");
            }
        }
        if let (Some(a), Some(limit)) = (activity, idle_timeout)
            && now >= a.last() + limit
        {
            return limit;
        }
    }
}

/// Relays until both directions are done or the flow fails; then closes
/// both connections (with RST after a failure).
///
/// `cut` ends the flow from outside (the shutdown grace period ran out):
/// both connections are then reset at once, never closed with a FIN, so
/// that neither peer mistakes a cut stream for a complete one.
///
/// `tcp` (keepalive, user timeout) is set on the upstream socket once the
/// flow has lived for [`LONG_LIVED`]: short flows never pay for it.
pub async fn relay(
    config: RelayConfig,
    tcp: &TcpOptions,
    client: TcpStream,
    upstream: TcpStream,
    cut: &CancellationToken,
) -> io::Result<Transferred> {
    let client = Arc::new(client);
    let upstream = Arc::new(upstream);
    let activity = config.idle_timeout.map(|_| Arc::new(Activity::new()));
    // Futures are pinned here and lent to both_ways: moved into it, each
    // would take its place twice in this flow's task (rust-lang/rust#62958).
    let mut timers = pin!(watch(
        activity.as_deref(),
        config.idle_timeout,
        tcp,
        &upstream
    ));
    let ending = match config.mode {
        RelayMode::Splice => {
            let a = pin!(hybrid_one_way(
                Arc::clone(&client),
                Arc::clone(&upstream),
                activity.clone()
            ));
            let b = pin!(hybrid_one_way(
                Arc::clone(&upstream),
                Arc::clone(&client),
                activity.clone()
            ));
            both_ways(a, b, cut, timers.as_mut()).await
        }
        // Boxed: the comparison mode does not make every flow's task larger.
        RelayMode::Copy => {
            Box::pin(async {
                let a = pin!(copy_one_way(&client, &upstream, &activity));
                let b = pin!(copy_one_way(&upstream, &client, &activity));
                both_ways(a, b, cut, timers.as_mut()).await
            })
            .await
        }
    };
    // The direction futures are gone here, and with them the task of any
    // bulk phase (AbortOnDropHandle): nothing else writes to the sockets.
    match ending {
        Ending::Done(a, b) => Ok(Transferred {
            client_to_upstream: a,
            upstream_to_client: b,
        }),
        Ending::Failed { error, dead } => {
            reset_once_delivered([&client, &upstream], dead).await;
            Err(error)
        }
        Ending::Cut => {
            reset(&client);
            reset(&upstream);
            Err(cut_error())
        }
        Ending::Idle(limit) => {
            reset(&client);
            reset(&upstream);
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("idle for {limit:?} (--tcp-idle-timeout)"),
            ))
        }
    }
}

/// Runs both directions (`a`: client → upstream, `b`: the other way) as
/// [`Failure`] says: a `Flow` failure ends both at once, a `PeerGone` one
/// only its own direction. `idle` completes when the flow has been idle
/// too long.
async fn both_ways(
    mut a: Pin<&mut impl Future<Output = DirectionResult>>,
    mut b: Pin<&mut impl Future<Output = DirectionResult>>,
    cut: &CancellationToken,
    mut idle: Pin<&mut impl Future<Output = Duration>>,
) -> Ending {
    let (mut done_a, mut done_b) = (None, None);
    let mut failed: Option<io::Error> = None;
    // [client, upstream]: direction a reads the client, b the upstream.
    let mut dead = [false; 2];
    while done_a.is_none() || done_b.is_none() {
        let (which, result) = tokio::select! {
            r = a.as_mut(), if done_a.is_none() => (0, r),
            r = b.as_mut(), if done_b.is_none() => (1, r),
            () = cut.cancelled() => return Ending::Cut,
            limit = idle.as_mut() => return Ending::Idle(limit),
        };
        let (source, destination) = (which, 1 - which);
        let moved = match result {
            Ok(n) => n,
            Err(Failure::PeerGone(e)) => {
                dead[destination] = true;
                failed.get_or_insert(e);
                0
            }
            Err(f) => {
                dead[source] |= matches!(f, Failure::SourceGone(_));
                let error = failed.unwrap_or_else(|| f.into_error());
                return Ending::Failed { error, dead };
            }
        };
        if which == 0 {
            done_a = Some(moved);
        } else {
            done_b = Some(moved);
        }
    }
    match failed {
        Some(error) => Ending::Failed { error, dead },
        None => Ending::Done(done_a.unwrap_or(0), done_b.unwrap_or(0)),
    }
}

/// The error a flow ends with when it is cut from outside.
fn cut_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "cut at the end of the shutdown grace period",
    )
}

/// Makes the close of `stream` send RST instead of FIN.
pub fn reset(stream: &TcpStream) {
    // Best effort: the socket may already be dead.
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Resets each socket once its peer has acknowledged every byte written to
/// it (an early answer must not be thrown away by the reset), or once the
/// peer stopped acknowledging for [`DELIVERY_STALL`], at the latest after
/// [`DELIVERY_LIMIT`]. A connection known dead (`dead`) has nothing left
/// to deliver: no wait, no system call. Both sockets in one loop with one
/// timer: this is on the path of every failed flow.
async fn reset_once_delivered(sockets: [&TcpStream; 2], dead: [bool; 2]) {
    let start = Instant::now();
    let mut waiting = [false; 2];
    for (i, socket) in sockets.iter().enumerate() {
        if dead[i] {
            reset(socket);
        } else {
            waiting[i] = true;
        }
    }
    let mut queued = [usize::MAX; 2];
    let mut last_progress = [start; 2];
    let mut pause = Duration::from_millis(1);
    loop {
        let now = Instant::now();
        for (i, socket) in sockets.iter().enumerate() {
            if !waiting[i] {
                continue;
            }
            let delivered = match sys::undelivered_bytes(*socket) {
                Ok(0) | Err(_) => true,
                Ok(n) => {
                    if n < queued[i] {
                        queued[i] = n;
                        last_progress[i] = now;
                    }
                    now - last_progress[i] >= DELIVERY_STALL || now - start >= DELIVERY_LIMIT
                }
            };
            if delivered {
                reset(socket);
                waiting[i] = false;
            }
        }
        if waiting == [false; 2] {
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// What one read-and-forward step did.
enum Step {
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
fn poll_copy_step(
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
async fn flush(dst: &TcpStream, unsent: &mut Vec<u8>) -> Result<(), Failure> {
    if unsent.is_empty() {
        return Ok(());
    }
    write_all(dst, unsent).await?;
    // Backpressure is rare for small flows: give the memory back.
    *unsent = Vec::new();
    Ok(())
}

/// Moves `src` → `dst` until EOF on `src`, then half-closes `dst`: by copy
/// while the flow is small, in bulk phases (splice, a task of their own,
/// aborted if this future is dropped) while it is large.
async fn hybrid_one_way(
    src: Arc<TcpStream>,
    dst: Arc<TcpStream>,
    activity: Option<Arc<Activity>>,
) -> DirectionResult {
    let mut unsent = Vec::new();
    let mut total = 0u64;
    let mut no_pipe_until: Option<Instant> = None;
    loop {
        let step =
            std::future::poll_fn(|cx| poll_copy_step(cx, &src, &dst, &mut unsent, &activity))
                .await?;
        let Step::Moved { n, full } = step else {
            flush(&dst, &mut unsent).await?;
            shutdown_write(&dst).map_err(destination_failure)?;
            return Ok(total);
        };
        total += n as u64;
        flush(&dst, &mut unsent).await?;
        if !full || no_pipe_until.is_some_and(|t| Instant::now() < t) {
            continue;
        }
        let pipe = match Pipe::new() {
            Ok(p) => p,
            Err(e) => {
                pipe::unavailable(&e);
                no_pipe_until = Some(Instant::now() + PIPE_RETRY);
                continue;
            }
        };
        let (s, d, a) = (Arc::clone(&src), Arc::clone(&dst), activity.clone());
        let phase = AbortOnDropHandle::new(tokio::spawn(async move {
            splice::bulk_phase(&s, &d, pipe, &a).await
        }));
        let end = phase
            .await
            .map_err(|e| Failure::Flow(io::Error::other(e)))??;
        total += end.moved;
        if end.eof {
            return Ok(total);
        }
    }
}

/// `--tcp-relay copy`: moves `src` → `dst` through a buffer of its own
/// until EOF on `src`, then half-closes `dst`.
async fn copy_one_way(
    src: &TcpStream,
    dst: &TcpStream,
    activity: &Option<Arc<Activity>>,
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
    }
}

/// Half-closes `stream` (EOF for its peer).
pub(super) fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write) {
        // The peer is already gone; the other direction will find out.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::pipe::PIPE_SIZE;
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// client ⇄ [proxy: relay] ⇄ server, all on loopback.
    async fn through_relay(mode: RelayMode, payload: Vec<u8>) -> (Vec<u8>, Transferred) {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        // The server reads to EOF, then answers with the length and a
        // reversed copy: only possible if half-close was passed on.
        let server_task = tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got.reverse();
            s.write_all(&got).await.unwrap();
        });
        let proxy_task = tokio::spawn(async move {
            let (c, _) = proxy.accept().await.unwrap();
            let u = TcpStream::connect(server_addr).await.unwrap();
            relay(
                mode.into(),
                &TcpOptions::default(),
                c,
                u,
                &CancellationToken::new(),
            )
            .await
            .unwrap()
        });
        let mut client = TcpStream::connect(proxy_addr).await.unwrap();
        let (mut r, mut w) = client.split();
        let send = async {
            w.write_all(&payload).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let recv = r.read_to_end(&mut back);
        let (_, n) = tokio::join!(send, recv);
        n.unwrap();
        server_task.await.unwrap();
        (back, proxy_task.await.unwrap())
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn splice_keeps_half_close_and_every_byte() {
        let payload = data(3 * 1024 * 1024 + 7);
        let (back, t) = through_relay(RelayMode::Splice, payload.clone()).await;
        let mut want = payload.clone();
        want.reverse();
        assert!(back == want, "payload corrupted through splice");
        assert_eq!(t.client_to_upstream, payload.len() as u64);
        assert_eq!(t.upstream_to_client, payload.len() as u64);
    }

    #[tokio::test]
    async fn copy_keeps_half_close_and_every_byte() {
        let payload = data(1024 * 1024 + 3);
        let (back, _) = through_relay(RelayMode::Copy, payload.clone()).await;
        let mut want = payload;
        want.reverse();
        assert!(back == want, "payload corrupted through copy");
    }

    #[tokio::test]
    async fn small_messages_go_both_ways_in_order() {
        // Many small writes in both directions at once: the copy phase. The
        // proxy's socket towards the client has a small send buffer and the
        // client a small receive buffer, and the client does not read until
        // the proxy has had to keep bytes back: the `unsent` path runs, and
        // the order must survive it. (A current-thread runtime: the relay
        // runs on this thread, whose step counter the test reads.)
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (server_addr, proxy_addr) = (server.local_addr().unwrap(), proxy.local_addr().unwrap());
        tokio::spawn(async move {
            let (c, _) = proxy.accept().await.unwrap();
            socket2::SockRef::from(&c)
                .set_send_buffer_size(4096)
                .unwrap();
            let u = TcpStream::connect(server_addr).await.unwrap();
            relay(
                RelayMode::Splice.into(),
                &TcpOptions::default(),
                c,
                u,
                &CancellationToken::new(),
            )
            .await
            .unwrap()
        });
        let echo = tokio::spawn(async move {
            let (s, _) = server.accept().await.unwrap();
            let (mut r, mut w) = s.into_split();
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(2048).unwrap();
        let client = socket.connect(proxy_addr).await.unwrap();
        let (mut r, mut w) = client.into_split();
        let msgs: Vec<Vec<u8>> = (0..2000u32)
            .map(|i| format!("{i}:{}|", "x".repeat((i % 97) as usize)).into_bytes())
            .collect();
        let want: Vec<u8> = msgs.concat();
        let writer = tokio::spawn(async move {
            for m in msgs {
                w.write_all(&m).await.unwrap();
            }
            w.shutdown().await.unwrap();
        });
        // The paused reader: wait (bounded) until a copy step kept bytes.
        let kept = || UNSENT_STEPS.with(|c| c.get());
        let paused_until = tokio::time::Instant::now() + Duration::from_secs(10);
        while kept() == 0 && tokio::time::Instant::now() < paused_until {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(kept() > 0, "no copy step ever kept bytes in `unsent`");
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        echo.await.unwrap();
        assert!(
            got == want,
            "echoed bytes differ ({} vs {})",
            got.len(),
            want.len()
        );
    }

    #[tokio::test]
    async fn upstream_reset_reaches_client_while_its_bulk_direction_is_idle() {
        // The client sends a bulk burst (its direction moves to a splice
        // task), then only waits. The server reads the burst and resets.
        // The client must learn at once: the idle splice task holding the
        // client socket has to be aborted, not left waiting for more data.
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (server_addr, proxy_addr) = (server.local_addr().unwrap(), proxy.local_addr().unwrap());
        let burst = data(256 * 1024);
        let relay_task = tokio::spawn(async move {
            let (c, _) = proxy.accept().await.unwrap();
            let u = TcpStream::connect(server_addr).await.unwrap();
            relay(
                RelayMode::Splice.into(),
                &TcpOptions::default(),
                c,
                u,
                &CancellationToken::new(),
            )
            .await
        });
        let len = burst.len();
        let server_task = tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut got = vec![0u8; len];
            s.read_exact(&mut got).await.unwrap();
            reset(&s);
            got
        });
        let mut client = TcpStream::connect(proxy_addr).await.unwrap();
        client.write_all(&burst).await.unwrap();
        let got = server_task.await.unwrap();
        assert!(got == burst, "burst corrupted");
        let mut b = [0u8; 1];
        let outcome = tokio::time::timeout(Duration::from_secs(5), client.read(&mut b)).await;
        match outcome {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(n)) => panic!("client read {n} unexpected bytes"),
            Err(_) => panic!("client still connected 5 s after the upstream reset"),
        }
        let r = tokio::time::timeout(Duration::from_secs(5), relay_task)
            .await
            .expect("relay did not end")
            .unwrap();
        assert!(r.is_err(), "relay should report the reset, got {r:?}");
    }

    /// A cut flow ends with a reset on both sides, never a FIN: a peer that
    /// reads to EOF must not take a cut stream for a complete one.
    async fn cut_resets_both_sides(mode: RelayMode) {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (server_addr, proxy_addr) = (server.local_addr().unwrap(), proxy.local_addr().unwrap());
        let cut = CancellationToken::new();
        let relay_cut = cut.clone();
        let relay_task = tokio::spawn(async move {
            let (c, _) = proxy.accept().await.unwrap();
            let u = TcpStream::connect(server_addr).await.unwrap();
            relay(mode.into(), &TcpOptions::default(), c, u, &relay_cut).await
        });
        let mut client = TcpStream::connect(proxy_addr).await.unwrap();
        let (mut server_side, _) = server.accept().await.unwrap();
        // A bulk burst first, so that in splice mode one direction runs in
        // a task of its own when the cut comes.
        let burst = data(256 * 1024);
        client.write_all(&burst).await.unwrap();
        let mut got = vec![0u8; burst.len()];
        server_side.read_exact(&mut got).await.unwrap();
        cut.cancel();
        let r = tokio::time::timeout(Duration::from_secs(5), relay_task)
            .await
            .expect("relay did not end after the cut")
            .unwrap();
        assert_eq!(
            r.map(|_| ()).unwrap_err().kind(),
            io::ErrorKind::ConnectionAborted
        );
        for (who, s) in [("client", &mut client), ("server", &mut server_side)] {
            let mut b = [0u8; 16];
            let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
                .await
                .unwrap_or_else(|_| panic!("{who} still connected 5 s after the cut"));
            match read {
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{who}: {e}"),
                Ok(n) => panic!("{who} read Ok({n}) (a FIN or data) instead of a reset"),
            }
        }
    }

    #[tokio::test]
    async fn cut_resets_both_sides_in_splice_mode() {
        cut_resets_both_sides(RelayMode::Splice).await;
    }

    #[tokio::test]
    async fn cut_resets_both_sides_in_copy_mode() {
        cut_resets_both_sides(RelayMode::Copy).await;
    }

    /// The four sockets of one flow on loopback: the client's, the proxy's
    /// two (accepted from the client, connected to the server), the server's.
    struct Flow {
        client: TcpStream,
        proxy_client: TcpStream,
        proxy_upstream: TcpStream,
        server: TcpStream,
    }

    async fn flow() -> Flow {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(proxy.local_addr().unwrap())
            .await
            .unwrap();
        let (proxy_client, _) = proxy.accept().await.unwrap();
        let proxy_upstream = TcpStream::connect(server.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = server.accept().await.unwrap();
        Flow {
            client,
            proxy_client,
            proxy_upstream,
            server,
        }
    }

    /// Starts the relay of `f`'s proxy sockets; the rest of the flow is
    /// returned as (client, server).
    fn start_relay(
        mode: RelayMode,
        f: Flow,
    ) -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<io::Result<Transferred>>,
    ) {
        let cut = CancellationToken::new();
        let task = tokio::spawn(async move {
            relay(
                mode.into(),
                &TcpOptions::default(),
                f.proxy_client,
                f.proxy_upstream,
                &cut,
            )
            .await
        });
        (f.client, f.server, task)
    }

    /// Sends `payload` from the client with a half-close; the server reads
    /// it to EOF and answers it reversed; the client reads the answer.
    async fn reversed_round_trip(client: TcpStream, mut server: TcpStream, payload: &[u8]) {
        let (mut cr, mut cw) = client.into_split();
        let to_send = payload.to_vec();
        let sender = tokio::spawn(async move {
            cw.write_all(&to_send).await.unwrap();
            cw.shutdown().await.unwrap();
        });
        let serve = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            let n = got.len();
            got.reverse();
            server.write_all(&got).await.unwrap();
            server.shutdown().await.unwrap();
            n
        });
        let mut back = Vec::new();
        cr.read_to_end(&mut back).await.unwrap();
        sender.await.unwrap();
        assert_eq!(serve.await.unwrap(), payload.len(), "the server got it all");
        let mut want = payload.to_vec();
        want.reverse();
        assert!(back == want, "answer corrupted ({} bytes)", back.len());
    }

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_pipe_that_cannot_be_created_leaves_the_bulk_flow_copying() {
        // In a child process: the open-file limit is lowered so that no fd
        // is left once the flow is connected; both directions turn bulk
        // and cannot get a pipe (EMFILE). The flow must go on by copying.
        use crate::proxy::test_support::{exhaust_fds, isolated, test_name};
        if !isolated(&test_name(
            module_path!(),
            "a_pipe_that_cannot_be_created_leaves_the_bulk_flow_copying",
        )) {
            return;
        }
        current_thread().block_on(async {
            let f = flow().await;
            let (client, server, relay_task) = start_relay(RelayMode::Splice, f);
            let _fillers = exhaust_fds();
            let err = nix::unistd::pipe2(OFlag::O_CLOEXEC)
                .map(|_| ())
                .unwrap_err();
            assert_eq!(err, nix::errno::Errno::EMFILE, "fds are not exhausted");
            let payload = data(1024 * 1024 + 13);
            reversed_round_trip(client, server, &payload).await;
            let t = relay_task.await.unwrap().expect("the relay failed");
            assert_eq!(t.client_to_upstream, payload.len() as u64);
            assert_eq!(t.upstream_to_client, payload.len() as u64);
        });
    }

    #[test]
    fn a_refused_pipe_size_is_logged_once() {
        // In a child process that drops root (as a DaemonSet without
        // CAP_SYS_RESOURCE runs) and uses up its user's pipe quota
        // (fs.pipe-user-pages-soft): every bulk direction then gets a
        // small pipe. Flows still work; the log says so once.
        use crate::proxy::test_support::{capture_logs, isolated, test_name};
        if !isolated(&test_name(
            module_path!(),
            "a_refused_pipe_size_is_logged_once",
        )) {
            return;
        }
        let soft = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if soft == 0 || !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: needs root (to drop it) and fs.pipe-user-pages-soft > 0");
            return;
        }
        // A uid nobody else uses, so the quota is ours alone.
        let uid = nix::unistd::Uid::from_raw(54_321);
        let gid = nix::unistd::Gid::from_raw(54_321);
        nix::unistd::setresgid(gid, gid, gid).unwrap();
        nix::unistd::setresuid(uid, uid, uid).unwrap();
        let mut quota = Vec::new();
        let mut refused = false;
        for _ in 0..(soft / 256 + 8) {
            let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
            refused = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32)).is_err();
            quota.push((r, w));
            if refused {
                break;
            }
        }
        assert!(refused, "the pipe quota never ran out");
        let (logs, _guard) = capture_logs();
        current_thread().block_on(async {
            for _ in 0..2 {
                let f = flow().await;
                let (client, server, relay_task) = start_relay(RelayMode::Splice, f);
                reversed_round_trip(client, server, &data(512 * 1024 + 5)).await;
                relay_task.await.unwrap().expect("the relay failed");
            }
        });
        let text = logs.text();
        assert_eq!(
            logs.count("refused a 1 MiB splice pipe"),
            1,
            "want one line about the small pipes; log:\n{text}"
        );
    }

    #[test]
    fn a_bulk_direction_that_goes_quiet_gives_its_pipe_back() {
        // A keep-alive connection carries one large response, then idles.
        // Its bulk direction must give the pipe back (an idle connection
        // holds its 2 sockets and nothing else), and the next exchanges,
        // small and large, must still work.
        use crate::proxy::test_support::{isolated, open_pipes, test_name};
        if !isolated(&test_name(
            module_path!(),
            "a_bulk_direction_that_goes_quiet_gives_its_pipe_back",
        )) {
            return;
        }
        current_thread().block_on(async {
            let f = flow().await;
            let (client, mut server, _relay_task) = start_relay(RelayMode::Splice, f);
            let before = open_pipes();
            let (mut cr, mut cw) = client.into_split();
            let burst = data(32 * 1024 * 1024);
            let sent = burst.clone();
            let writer = tokio::spawn(async move {
                cw.write_all(&sent).await.unwrap();
                cw
            });
            // Mid-transfer (more is queued than all buffers hold): the
            // direction is bulk and holds a pipe.
            let mut got = vec![0u8; burst.len()];
            server.read_exact(&mut got[..1024 * 1024]).await.unwrap();
            assert!(open_pipes() > before, "no pipe during the bulk transfer");
            server.read_exact(&mut got[1024 * 1024..]).await.unwrap();
            assert!(got == burst, "burst corrupted");
            let mut cw = writer.await.unwrap();
            // Quiet now: the pipe must go (bounded wait).
            let end = tokio::time::Instant::now() + Duration::from_secs(3);
            while open_pipes() > before && tokio::time::Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(
                open_pipes(),
                before,
                "an idle connection still holds a pipe"
            );
            // Still one working connection: small both ways, then bulk.
            cw.write_all(b"ping").await.unwrap();
            let mut b = [0u8; 4];
            server.read_exact(&mut b).await.unwrap();
            server.write_all(b"pong").await.unwrap();
            cr.read_exact(&mut b).await.unwrap();
            assert_eq!(&b, b"pong");
            let again = data(4 * 1024 * 1024 + 1);
            let sent = again.clone();
            let writer = tokio::spawn(async move { cw.write_all(&sent).await.unwrap() });
            let mut got = vec![0u8; again.len()];
            server.read_exact(&mut got).await.unwrap();
            writer.await.unwrap();
            assert!(got == again, "second burst corrupted");
        });
    }

    /// What a client receives from a server that answers early and closes
    /// while the client is still sending (an HTTP 413 during an upload):
    /// through the relay in `mode`, or directly with `None`.
    async fn early_answer(mode: Option<RelayMode>, answer: &'static [u8]) -> Vec<u8> {
        let f = flow().await;
        let (client, mut server, relay_task) = match mode {
            Some(mode) => {
                let (c, s, t) = start_relay(mode, f);
                (c, s, Some(t))
            }
            // Directly: the socket the proxy accepted plays the server.
            None => (f.client, f.proxy_client, None),
        };
        // The server reads the start of the request, answers and closes at
        // once with the rest of the upload unread: its kernel resets the
        // connection right behind the answer.
        let serve = tokio::spawn(async move {
            let mut head = [0u8; 1024];
            server.read_exact(&mut head).await.unwrap();
            server.write_all(answer).await.unwrap();
        });
        let (mut cr, mut cw) = client.into_split();
        let upload = tokio::spawn(async move {
            let chunk = data(64 * 1024);
            for _ in 0..1024 {
                if cw.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match cr.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(read.is_ok(), "the client was never told the end");
        serve.await.unwrap();
        upload.await.unwrap();
        if let Some(t) = relay_task {
            let _ = tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .expect("the relay did not end");
        }
        got
    }

    async fn an_early_answer_reaches_the_client(mode: RelayMode) {
        static ANSWER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        // Larger than the scratch buffer (a bulk phase starts), smaller
        // than the client's initial receive window: directly, the whole
        // answer is on the wire before the server's reset. (A larger one
        // is cut by the server's own reset, proxy or not.)
        let answer: &'static [u8] = ANSWER.get_or_init(|| {
            let mut a = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 32768\r\n\r\n".to_vec();
            a.extend(data(32768));
            a
        });
        let direct = early_answer(None, answer).await;
        assert!(
            direct == answer,
            "direct: {} of {} bytes",
            direct.len(),
            answer.len()
        );
        for i in 0..20 {
            let proxied = early_answer(Some(mode), answer).await;
            assert!(
                proxied == direct,
                "try {i}: through the relay the client got {} bytes, directly {}",
                proxied.len(),
                direct.len()
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_early_answer_reaches_the_client_in_splice_mode() {
        an_early_answer_reaches_the_client(RelayMode::Splice).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_early_answer_reaches_the_client_in_copy_mode() {
        an_early_answer_reaches_the_client(RelayMode::Copy).await;
    }

    /// Reads from `s` until something happens, at most `within`.
    async fn outcome(s: &mut TcpStream, within: Duration) -> Option<io::Result<usize>> {
        let mut b = [0u8; 64];
        tokio::time::timeout(within, s.read(&mut b)).await.ok()
    }

    #[tokio::test]
    async fn a_flow_idle_for_the_idle_timeout_is_reset_and_a_busy_one_is_not() {
        let config = RelayConfig {
            mode: RelayMode::Splice,
            idle_timeout: Some(Duration::from_millis(300)),
        };
        // Busy: a message every 100 ms for 1 s (over 3 idle timeouts).
        let f = flow().await;
        let (mut client, mut server) = (f.client, f.server);
        let cut = CancellationToken::new();
        let busy = tokio::spawn(async move {
            relay(
                config,
                &TcpOptions::default(),
                f.proxy_client,
                f.proxy_upstream,
                &cut,
            )
            .await
        });
        let mut idle_since = tokio::time::Instant::now();
        for i in 0..10u8 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client.write_all(&[i]).await.unwrap();
            let mut b = [0u8; 1];
            server.read_exact(&mut b).await.unwrap();
            idle_since = tokio::time::Instant::now();
            assert_eq!(b[0], i);
        }
        assert!(!busy.is_finished(), "a busy flow was cut");
        // Idle from now on: both sides are reset soon after 300 ms.
        for (who, s) in [("client", &mut client), ("server", &mut server)] {
            match outcome(s, Duration::from_secs(3)).await {
                Some(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{who}: {e}"),
                Some(Ok(n)) => panic!("{who} read Ok({n}) instead of a reset"),
                None => panic!("{who} still connected 3 s into an idle timeout of 300 ms"),
            }
        }
        assert!(idle_since.elapsed() >= Duration::from_millis(250));
        let r = busy.await.unwrap();
        assert!(r.is_err(), "the relay should report the idle timeout");
    }

    #[tokio::test]
    async fn a_long_lived_flow_gets_keepalive_on_its_upstream_and_a_young_one_not_yet() {
        use crate::proxy::tcp_options::{Keepalive, LONG_LIVED};
        use std::os::fd::AsFd;
        let tcp = TcpOptions {
            keepalive: Some(Keepalive {
                time: Duration::from_secs(7),
                interval: Duration::from_secs(3),
                count: 4,
            }),
            user_timeout: Some(Duration::from_secs(19)),
        };
        let f = flow().await;
        // The same socket as the relay's upstream, to read its options.
        let upstream = f.proxy_upstream.as_fd().try_clone_to_owned().unwrap();
        let upstream = socket2::SockRef::from(&upstream);
        let cut = CancellationToken::new();
        let (_client, _server) = (f.client, f.server);
        let _relay = tokio::spawn(async move {
            relay(
                RelayMode::Splice.into(),
                &tcp,
                f.proxy_client,
                f.proxy_upstream,
                &cut,
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !upstream.keepalive().unwrap(),
            "a young flow paid for keepalive"
        );
        tokio::time::sleep(LONG_LIVED).await;
        assert!(
            upstream.keepalive().unwrap(),
            "no keepalive on a long-lived flow"
        );
        assert_eq!(
            upstream.tcp_keepalive_time().unwrap(),
            Duration::from_secs(7)
        );
        assert_eq!(
            upstream.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(19))
        );
    }

    #[tokio::test]
    async fn the_relay_future_stays_small() {
        // Every open flow holds this future in its task, so its size is
        // most of the proxy's memory per idle connection (2.25 KiB at
        // f967322, whose relay future was 792 bytes). Rare paths are boxed
        // and futures are lent rather than moved (rust-lang/rust#62958)
        // to keep it there.
        let f = flow().await;
        let (tcp, cut) = (TcpOptions::default(), CancellationToken::new());
        let r = relay(
            RelayMode::Splice.into(),
            &tcp,
            f.proxy_client,
            f.proxy_upstream,
            &cut,
        );
        let size = std::mem::size_of_val(&r);
        assert!(size <= 1400, "the relay future grew to {size} bytes");
    }

    #[tokio::test]
    async fn empty_flow_ends_cleanly() {
        let (back, t) = through_relay(RelayMode::Splice, Vec::new()).await;
        assert!(back.is_empty());
        assert_eq!(t, Transferred::default());
    }
}
