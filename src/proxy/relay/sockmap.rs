//! `--tcp-relay sockmap`: the kernel moves a flow's bytes from one socket
//! to the other, and the proxy only watches the flow's ends.
//!
//! Two sockhash maps and one small BPF program (a stream verdict, 11
//! instructions, written out below: no compiler needed):
//! - `targets` holds, under each socket's cookie (`SO_COOKIE`), the
//!   *other* socket of its flow; no program runs on it;
//! - `armed` holds every relayed socket under its own cookie, and runs the
//!   verdict on the bytes each one receives: it looks up the socket's
//!   cookie in `targets` and redirects the bytes to that socket's send
//!   side (`bpf_sk_redirect_hash`). The kernel sends them from a worker
//!   of its own; the proxy is not woken per message.
//!
//! A flow is handed over before the proxy has read a byte of it:
//! 1. both sockets go into `targets` (the flow falls back to the
//!    user-space relay if the map is full);
//! 2. both leave tokio's reactor (its registration would wake a worker
//!    for every message the verdict moves) and join a small epoll of the
//!    flow's own that asks only for `EPOLLRDHUP` (a FIN) and errors;
//! 3. both go into `armed`; then `SO_RCVLOWAT` is set, which makes the
//!    kernel pass the bytes that arrived before (they wait in the receive
//!    queue) to the verdict at once.
//!
//! An EOF on one socket becomes a half-close of the other once every byte
//! that came before the FIN has been queued on it: the proxy compares the
//! bytes the source received (`TCP_INFO`, less what is still unread and
//! the FIN) with the bytes queued on the destination (acknowledged plus
//! `SIOCOUTQ`), and waits if the kernel's worker is not done yet. An error
//! on either socket, a cut or the idle timeout ends the flow as the
//! user-space relay does (resets). Bytes are counted in the Service
//! port's counters when the flow ends, not as they move.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use socket2::SockRef;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::count::{RelayedBytes, Tally, Way};
use super::{Ending, RelayConfig, Transferred, cut_error, reset, reset_once_delivered};
use crate::proxy::sys::{self, NestedEpoll};
use crate::proxy::tcp_options::TcpOptions;

/// Sockets each map holds at most: two per flow, so 32 768 flows at a
/// time in the kernel; more fall back to the user-space relay. A
/// sockhash allocates its entries as they come; this bounds its buckets
/// (8 bytes each).
const MAX_SOCKETS: u32 = 65_536;

/// The maps and the program, loaded once per process.
struct Maps {
    targets: OwnedFd,
    armed: OwnedFd,
    /// Attached to `armed`; kept open for the process's life.
    _verdict: OwnedFd,
}

/// Why the in-kernel relay cannot run on this host.
#[derive(Debug, thiserror::Error)]
#[error("--tcp-relay sockmap: {step}: {source}")]
pub struct SockmapError {
    step: &'static str,
    source: io::Error,
}

static MAPS: OnceLock<Result<Maps, SockmapError>> = OnceLock::new();

/// Loads the maps and the program (once): `Err` says which step the
/// kernel refused (no `CAP_BPF`/`CAP_NET_ADMIN`, a kernel without
/// `CONFIG_BPF_STREAM_PARSER`).
pub fn ready() -> Result<(), &'static SockmapError> {
    maps().map(drop)
}

fn maps() -> Result<&'static Maps, &'static SockmapError> {
    MAPS.get_or_init(load).as_ref()
}

fn load() -> Result<Maps, SockmapError> {
    let step = |step| move |source| SockmapError { step, source };
    let targets = sys::sockhash_create(MAX_SOCKETS).map_err(step("create a sockhash map"))?;
    let armed = sys::sockhash_create(MAX_SOCKETS).map_err(step("create a sockhash map"))?;
    let verdict = sys::sk_skb_load(&verdict_program(targets.as_raw_fd()))
        .map_err(step("load the stream verdict program"))?;
    sys::attach_stream_verdict(&armed, &verdict).map_err(step("attach the stream verdict"))?;
    Ok(Maps {
        targets,
        armed,
        _verdict: verdict,
    })
}

/// One eBPF instruction: opcode, registers, offset, immediate.
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    (code as u64)
        | (((dst | (src << 4)) as u64) << 8)
        | ((off as u16 as u64) << 16)
        | ((imm as u32 as u64) << 32)
}

/// The stream verdict, for a sockhash whose descriptor is `targets`:
/// `return bpf_sk_redirect_hash(skb, targets, &bpf_get_socket_cookie(skb), 0)`.
/// SK_PASS when the bytes went to the other socket, SK_DROP when it is
/// gone (closed: its flow is over).
fn verdict_program(targets: RawFd) -> [u64; 11] {
    const GET_SOCKET_COOKIE: i32 = 46;
    const SK_REDIRECT_HASH: i32 = 72;
    const PSEUDO_MAP_FD: u8 = 1;
    [
        insn(0xbf, 6, 1, 0, 0),                   // r6 = r1 (the skb)
        insn(0x85, 0, 0, 0, GET_SOCKET_COOKIE),   // r0 = cookie(skb's socket)
        insn(0x7b, 10, 0, -8, 0),                 // *(u64 *)(r10 - 8) = r0
        insn(0xbf, 1, 6, 0, 0),                   // r1 = skb
        insn(0x18, 2, PSEUDO_MAP_FD, 0, targets), // r2 = the targets map
        insn(0x00, 0, 0, 0, 0),                   // (second half of the 64-bit load)
        insn(0xbf, 3, 10, 0, 0),                  // r3 = r10
        insn(0x07, 3, 0, 0, -8),                  // r3 -= 8: the key's address
        insn(0xb7, 4, 0, 0, 0),                   // r4 = 0: to the socket's send side
        insn(0x85, 0, 0, 0, SK_REDIRECT_HASH),    // r0 = bpf_sk_redirect_hash(...)
        insn(0x95, 0, 0, 0, 0),                   // return r0
    ]
}

/// Relays `client` ⇄ `upstream` in the kernel, as the module says.
/// `Err` gives both streams back when the flow cannot be handed over
/// (the maps are full or could not be loaded, a socket already closed
/// its side: the kernel arms only established sockets), with no byte
/// moved or every byte moved delivered: the caller relays it in user
/// space.
pub(super) async fn relay(
    config: RelayConfig,
    tcp: &TcpOptions,
    client: TcpStream,
    upstream: TcpStream,
    cut: &CancellationToken,
    bytes: &RelayedBytes,
) -> Result<io::Result<Transferred>, (TcpStream, TcpStream)> {
    let Ok(maps) = maps() else {
        return Err((client, upstream));
    };
    let cookies = match (
        SockRef::from(&client).cookie(),
        SockRef::from(&upstream).cookie(),
    ) {
        (Ok(c), Ok(u)) => [c, u],
        _ => return Err((client, upstream)),
    };
    // Step 1: each socket's target, under the other's cookie.
    if sys::sockhash_insert(&maps.targets, cookies[0], &upstream).is_err() {
        return Err((client, upstream));
    }
    let untarget = || {
        let _ = sys::sockhash_remove(&maps.targets, cookies[0]);
        let _ = sys::sockhash_remove(&maps.targets, cookies[1]);
    };
    if sys::sockhash_insert(&maps.targets, cookies[1], &client).is_err() {
        untarget();
        return Err((client, upstream));
    }
    // Nothing has written to either socket yet: what is queued on each now
    // is where its count of relayed bytes starts (the SYN may count one).
    let queued_at_start = match (queued(&client), queued(&upstream)) {
        (Ok(c), Ok(u)) => [c, u],
        _ => {
            untarget();
            return Err((client, upstream));
        }
    };
    // Step 3 comes first while tokio still has both sockets (a refusal
    // leaves them as they were), then step 2.
    if sys::sockhash_insert(&maps.armed, cookies[0], &client).is_err() {
        untarget();
        return Err((client, upstream));
    }
    if sys::sockhash_insert(&maps.armed, cookies[1], &upstream).is_err() {
        // The client's verdict may have passed bytes on already: they go
        // out before the user-space relay writes any.
        let _ = sys::sockhash_remove(&maps.armed, cookies[0]);
        let start = Instant::now();
        loop {
            match drained(&client, &upstream, queued_at_start[1], false) {
                Ok(true) => break,
                Ok(false) if start.elapsed() < HANDOVER_DRAIN => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                _ => {
                    untarget();
                    reset(&client);
                    reset(&upstream);
                    return Ok(Err(io::Error::other(
                        "a flow that could not be handed over to the kernel did not drain",
                    )));
                }
            }
        }
        untarget();
        return Err((client, upstream));
    }
    Ok(in_kernel(config, tcp, client, upstream, queued_at_start, cut, bytes).await)
}

/// How long a half-armed flow may take to send on what its armed side
/// passed before it falls back to the user-space relay.
const HANDOVER_DRAIN: Duration = Duration::from_secs(1);

/// Step 2, then the flow's life.
async fn in_kernel(
    config: RelayConfig,
    tcp: &TcpOptions,
    client: TcpStream,
    upstream: TcpStream,
    queued_at_start: [u64; 2],
    cut: &CancellationToken,
    bytes: &RelayedBytes,
) -> io::Result<Transferred> {
    // The sockets close (and leave both maps) on every early return.
    let sockets = [client.into_std()?, upstream.into_std()?];
    for s in &sockets {
        sys::recheck_readable(s)?;
    }
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
    for (i, s) in sockets.iter().enumerate() {
        let event = EpollEvent::new(EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET, i as u64);
        epoll.add(s, event).map_err(io::Error::from)?;
    }
    let epoll = sys::register_epoll(epoll)?;
    if tcp.any()
        && let Err(e) = tcp.apply_to_upstream(&sockets[1])
    {
        debug!(error = %e, "cannot set keepalive on the upstream socket");
    }
    let (ending, eof) = watch(&epoll, &sockets, queued_at_start, config, cut).await;
    // [client → upstream, upstream → client]: what each source's verdict
    // took, counted once, whichever way the flow ended.
    let moved = [0, 1].map(|i| consumed(&sockets[i], eof[i]).unwrap_or(0));
    Tally::new(bytes, Way::ToEndpoint).add(moved[0] as usize);
    Tally::new(bytes, Way::ToClient).add(moved[1] as usize);
    match ending {
        Ending::Done(..) => Ok(Transferred {
            client_to_upstream: moved[0],
            upstream_to_client: moved[1],
        }),
        Ending::Failed { error, dead } => {
            reset_once_delivered([&sockets[0], &sockets[1]], dead).await;
            Err(error)
        }
        Ending::Cut => {
            sockets.iter().for_each(reset);
            Err(cut_error())
        }
        Ending::Idle(limit) => {
            sockets.iter().for_each(reset);
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("idle for {limit:?} (--tcp-idle-timeout)"),
            ))
        }
    }
}

/// Bytes written to `socket` so far, by anyone: acknowledged plus queued.
fn queued(socket: &impl AsFd) -> io::Result<u64> {
    // In this order: an acknowledgement between the two calls makes the
    // sum smaller than the truth, never larger.
    let acked = sys::tcp_counts(socket)?.acked;
    Ok(acked + sys::unacked_bytes(socket)? as u64)
}

/// Bytes of data taken from `socket`'s receive queue so far (by the
/// verdict; the proxy reads none): received, less the FIN (`fin`: the
/// flow's epoll reported it; the TCP state cannot always tell, a socket
/// that goes on to TIME_WAIT is in CLOSE to its owner) and what is still
/// unread.
fn consumed(socket: &impl AsFd, fin: bool) -> io::Result<u64> {
    let counts = sys::tcp_counts(socket)?;
    let fin = fin || counts.fin_received;
    let unread = sys::unread_bytes(socket)? as u64;
    Ok(counts.received.saturating_sub(u64::from(fin) + unread))
}

/// Whether every byte the verdict took from `src` is queued on `dst`
/// (`fin`: `src`'s FIN came).
fn drained(src: &impl AsFd, dst: &impl AsFd, dst_at_start: u64, fin: bool) -> io::Result<bool> {
    let taken = consumed(src, fin)?;
    Ok(queued(dst)?.saturating_sub(dst_at_start) >= taken)
}

/// The flow's life after the hand-over: EOFs become half-closes, an
/// error, a cut or the idle timeout ends it.
async fn watch(
    epoll: &AsyncFd<NestedEpoll>,
    sockets: &[std::net::TcpStream; 2],
    queued_at_start: [u64; 2],
    config: RelayConfig,
    cut: &CancellationToken,
) -> (Ending, [bool; 2]) {
    // eof[i]: socket i sent its FIN; passed[i]: it went on to the other.
    let mut eof = [false; 2];
    let mut passed = [false; 2];
    let mut pause = Duration::ZERO;
    let idle_check = config
        .idle_timeout
        .map(|l| l / 4 + Duration::from_millis(1));
    let mut events = [EpollEvent::empty(); 4];
    loop {
        // A FIN whose bytes are not all on their way yet: look again soon
        // (the kernel's worker is behind by microseconds, unless the
        // destination's receiver is slow).
        let waiting = (0..2).any(|i| eof[i] && !passed[i]);
        let recheck = waiting.then_some(pause).or(idle_check);
        tokio::select! {
            () = cut.cancelled() => return (Ending::Cut, eof),
            ready = epoll.readable() => {
                let mut guard = match ready {
                    Ok(g) => g,
                    Err(error) => return (Ending::Failed { error, dead: [false; 2] }, eof),
                };
                let n = match guard.get_inner().0.wait(&mut events, EpollTimeout::ZERO) {
                    Ok(n) => n,
                    Err(e) => return (Ending::Failed { error: e.into(), dead: [false; 2] }, eof),
                };
                if n == 0 {
                    guard.clear_ready();
                }
                for event in &events[..n] {
                    let i = (event.data() as usize).min(1);
                    let flags = event.events();
                    if flags.contains(EpollFlags::EPOLLERR) {
                        match SockRef::from(&sockets[i]).take_error() {
                            // The verdict passes a FIN's empty segment on
                            // too, and the kernel's worker reports sending
                            // nothing as EPIPE: after the other socket's
                            // FIN, nothing more was to be sent to this one.
                            Ok(Some(e))
                                if e.raw_os_error() == Some(nix::libc::EPIPE)
                                    && (eof[1 - i] || fin_received(&sockets[1 - i])) => {}
                            Ok(Some(error)) => {
                                let mut dead = [false; 2];
                                dead[i] = true;
                                return (Ending::Failed { error, dead }, eof);
                            }
                            Ok(None) | Err(_) => {}
                        }
                    }
                    if flags.intersects(EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP) {
                        eof[i] = true;
                    }
                }
            }
            () = sleep_or_never(recheck) => {
                if !waiting
                    && let Some(limit) = config.idle_timeout
                    && idle_for(sockets).is_some_and(|idle| idle >= limit)
                {
                    return (Ending::Idle(limit), eof);
                }
            }
        }
        for i in 0..2 {
            if !eof[i] || passed[i] {
                continue;
            }
            let j = 1 - i;
            match drained(&sockets[i], &sockets[j], queued_at_start[j], true) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(error) => {
                    return (
                        Ending::Failed {
                            error,
                            dead: [false; 2],
                        },
                        eof,
                    );
                }
            }
            passed[i] = true;
            if let Err(error) = sockets[j].shutdown(std::net::Shutdown::Write) {
                let mut dead = [false; 2];
                dead[j] = true;
                return (Ending::Failed { error, dead }, eof);
            }
        }
        if passed == [true; 2] {
            return (Ending::Done(0, 0), eof);
        }
        pause = if (0..2).any(|i| eof[i] && !passed[i]) {
            (pause * 2).clamp(Duration::from_micros(50), Duration::from_millis(20))
        } else {
            Duration::ZERO
        };
    }
}

fn fin_received(socket: &impl AsFd) -> bool {
    sys::tcp_counts(socket).is_ok_and(|c| c.fin_received)
}

/// How long neither socket has received data (the shorter of the two).
fn idle_for(sockets: &[std::net::TcpStream; 2]) -> Option<Duration> {
    let a = sys::tcp_counts(&sockets[0]).ok()?.since_data_ms;
    let b = sys::tcp_counts(&sockets[1]).ok()?.since_data_ms;
    Some(Duration::from_millis(u64::from(a.min(b))))
}

async fn sleep_or_never(after: Option<Duration>) {
    match after {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}
