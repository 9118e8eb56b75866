//! Moving bytes between the two connections of a flow.
//!
//! Two ways, chosen with `--tcp-relay`:
//! - `splice` (default), a hybrid: each direction starts by copying through
//!   one scratch buffer per worker thread (read, then write at once; only
//!   bytes the peer cannot take yet are kept for the connection). When a
//!   read fills the whole scratch buffer the direction enters a bulk phase
//!   (`relay/splice.rs`): socket → pipe → socket with splice(2), payload
//!   never entering user space, in a task of its own so that the two
//!   directions of a bulk flow can use two CPUs. When the source goes quiet the phase
//!   ends, the pipe goes back to the process's pool, and the direction copies again. Small
//!   request/response traffic never pays for a pipe (two file descriptors
//!   and a few system calls; a splice costs more than copying a few
//!   bytes); bulk traffic is not copied; an idle connection holds no buffer
//!   and no pipe, whatever it carried before. If no pipe can be had
//!   (`relay/pipe.rs`: at most `--splice-pipes-max` exist, for the host's
//!   pipe quota), the direction copies. The copy steps live in
//!   `relay/copy.rs`; they and the bulk phases speak one per-direction
//!   vocabulary (`relay/direction.rs`: how a direction fails, when it last
//!   moved a byte, the half-close), so that neither imports this file.
//! - `copy` (`relay/copy.rs`): a plain copy loop with a 64 KiB buffer per
//!   direction, for comparison in benchmarks and for kernels without
//!   splice.
//!
//! In both, an EOF on one side becomes a half-close (`shutdown(SHUT_WR)`)
//! on the other, and the opposite direction keeps running until it ends
//! too; with `splice`, the second EOF of a flow read by the copy steps
//! is passed on by the close of both sockets instead, which sends the
//! same FIN. How a failure ends the flow (`Failure`):
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

mod copy;
mod count;
mod direction;
mod pipe;
mod splice;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::debug;

use self::copy::{Step, copy_one_way, flush, poll_copy_step};
use self::count::Tally;
pub use self::count::{RelayedBytes, Way};
use self::direction::{Activity, DirectionResult, Failure, destination_failure, shutdown_write};
use self::pipe::NoPipe;
pub use self::pipe::{DEFAULT_MAX as DEFAULT_SPLICE_PIPES_MAX, PIPES as SPLICE_PIPES, PipePool};
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

/// After a direction could not get a pipe, how long it copies before it
/// asks again (asking costs a failing system call per 16 KiB otherwise).
const PIPE_RETRY: Duration = Duration::from_millis(100);
/// A peer that acknowledges nothing for this long gets its reset without
/// the rest of its bytes.
const DELIVERY_STALL: Duration = Duration::from_secs(1);
/// The longest a failed flow waits for its bytes to be delivered.
const DELIVERY_LIMIT: Duration = Duration::from_secs(10);

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
///
/// `bytes` (the Service port's counters) count the bytes as they move
/// (`relay/count.rs`), whichever way the flow ends; the [`Transferred`]
/// returned is for the flow's own log line.
pub async fn relay(
    config: RelayConfig,
    tcp: &TcpOptions,
    client: TcpStream,
    upstream: TcpStream,
    cut: &CancellationToken,
    bytes: &RelayedBytes,
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
    // Set by the first direction to end with EOF: see hybrid_one_way.
    let one_ended = AtomicBool::new(false);
    let ending = match config.mode {
        RelayMode::Splice => {
            let a = pin!(hybrid_one_way(
                Arc::clone(&client),
                Arc::clone(&upstream),
                activity.clone(),
                Tally::new(bytes, Way::ToEndpoint),
                &one_ended,
            ));
            let b = pin!(hybrid_one_way(
                Arc::clone(&upstream),
                Arc::clone(&client),
                activity.clone(),
                Tally::new(bytes, Way::ToClient),
                &one_ended,
            ));
            both_ways(a, b, cut, timers.as_mut()).await
        }
        // Boxed: the comparison mode does not make every flow's task larger.
        RelayMode::Copy => {
            Box::pin(async {
                let a = pin!(copy_one_way(
                    &client,
                    &upstream,
                    &activity,
                    Tally::new(bytes, Way::ToEndpoint)
                ));
                let b = pin!(copy_one_way(
                    &upstream,
                    &client,
                    &activity,
                    Tally::new(bytes, Way::ToClient)
                ));
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
/// to deliver and nothing to reset: no wait, no system call. Both sockets in one loop with one
/// timer: this is on the path of every failed flow.
async fn reset_once_delivered(sockets: [&TcpStream; 2], dead: [bool; 2]) {
    let start = Instant::now();
    // A dead socket is in TCP_CLOSE already (the peer's RST, a timeout):
    // its close sends nothing, so SO_LINGER on it would be a system call
    // for nothing (one per RST-closed flow: issue 21's ledger).
    let mut waiting = [!dead[0], !dead[1]];
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

/// Moves `src` → `dst` until EOF on `src`, then half-closes `dst`: by copy
/// while the flow is small, in bulk phases (splice, a task of their own,
/// aborted if this future is dropped) while it is large. Counts into
/// `tally` as bytes move; a bulk phase counts into a tally of its own.
///
/// `one_ended` is shared by the flow's two directions: set once one has
/// half-closed its destination. The second to read EOF in the copy steps
/// does not half-close: the flow is then done, [`relay`] returns and
/// drops both sockets, and each one's close sends the FIN a `shutdown`
/// would (neither has unread bytes: each direction read its source to
/// EOF). One system call less per FIN-closed flow (issue 21's ledger:
/// nginx half-closes once too). A bulk phase that reads EOF half-closes
/// itself.
async fn hybrid_one_way(
    src: Arc<TcpStream>,
    dst: Arc<TcpStream>,
    activity: Option<Arc<Activity>>,
    mut tally: Tally,
    one_ended: &AtomicBool,
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
            // Nothing is awaited between the load and the store: the two
            // directions run in one task, so the flag means "a FIN went".
            if !one_ended.load(Ordering::Relaxed) {
                shutdown_write(&dst).map_err(destination_failure)?;
                one_ended.store(true, Ordering::Relaxed);
            }
            return Ok(total);
        };
        total += n as u64;
        tally.add(n);
        flush(&dst, &mut unsent).await?;
        if !full || no_pipe_until.is_some_and(|t| Instant::now() < t) {
            continue;
        }
        let pipe = match pipe::PIPES.take() {
            Ok(p) => p,
            Err(e) => {
                // At the cap, copying is what the operator chose; the
                // metric counts it. A pipe the kernel refuses is news.
                if let NoPipe::Create(e) = &e {
                    pipe::unavailable(e);
                }
                no_pipe_until = Some(Instant::now() + PIPE_RETRY);
                continue;
            }
        };
        // What the copy steps moved shows before the phase, which may be
        // long.
        tally.flush();
        let (s, d, a) = (Arc::clone(&src), Arc::clone(&dst), activity.clone());
        let phase_tally = tally.sibling();
        let phase = AbortOnDropHandle::new(tokio::spawn(async move {
            splice::bulk_phase(&s, &d, pipe, &a, phase_tally).await
        }));
        let end = phase
            .await
            .map_err(|e| Failure::Flow(io::Error::other(e)))??;
        total += end.moved;
        if end.eof {
            // The phase half-closed `dst` itself.
            one_ended.store(true, Ordering::Relaxed);
            return Ok(total);
        }
    }
}
