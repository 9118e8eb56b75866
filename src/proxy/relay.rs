//! Moving bytes between the two connections of a flow.
//!
//! Two ways, chosen with `--tcp-relay`:
//! - `splice` (default), a hybrid: each direction starts by copying through
//!   one scratch buffer per worker thread (read, then write at once; only
//!   bytes the peer cannot take yet are kept for the connection). When a
//!   read fills the whole scratch buffer the flow is bulk, and that
//!   direction switches to splice(2): socket → pipe → socket, payload never
//!   entering user space. Small request/response traffic never pays for a
//!   pipe (two file descriptors and a few system calls per direction, and a
//!   splice costs more than copying a few bytes); bulk traffic never pays
//!   for the copy. An idle connection holds no buffer and no pipe. A
//!   direction that turns bulk runs its splice loop as a task of its own,
//!   so the two directions of a bulk flow can use two CPUs, while the small
//!   exchanges of both directions stay in the connection's one task (no
//!   wake-up crosses threads between a request and its response).
//! - `copy`: tokio's `copy_bidirectional` with 64 KiB buffers per
//!   connection, for comparison in benchmarks and for kernels without splice.
//!
//! In both, an EOF on one side becomes a half-close (`shutdown(SHUT_WR)`) on
//! the other and the opposite direction keeps running until it ends too; an
//! error on either side ends both, and both sockets are then reset so that
//! neither peer waits on a connection that is gone (no CLOSE_WAIT pile-up).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use nix::sys::socket::{MsgFlags, recv};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

/// How bytes are moved between the two connections of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RelayMode {
    /// Zero-copy splice(2) through a pipe.
    Splice,
    /// A user-space copy loop.
    Copy,
}

/// Bytes moved in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
}

/// Size asked for each direction's pipe: the most one splice call moves.
/// 1 MiB (the default `fs.pipe-max-size`) against 256 KiB: +13 % one-way
/// and +18 % both-ways throughput and 24 % less proxy CPU per GB in an
/// interleaved run (docs/performance.md). Only bulk directions have a
/// pipe, and its pages are the socket's own (moved, not copied).
const PIPE_SIZE: usize = 1024 * 1024;
const COPY_BUFFER: usize = 64 * 1024;
/// The per-thread scratch buffer of the hybrid relay. A read that fills it
/// marks the flow as bulk.
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
    static UNSENT_STEPS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Relays until both directions are done or one fails; then closes both
/// connections (with RST after a failure).
///
/// `cut` ends the flow from outside (the shutdown grace period ran out):
/// both connections are then reset, never closed with a FIN, so that
/// neither peer mistakes a cut stream for a complete one.
pub async fn relay(
    mode: RelayMode,
    mut client: TcpStream,
    mut upstream: TcpStream,
    cut: &CancellationToken,
) -> io::Result<Transferred> {
    match mode {
        RelayMode::Splice => {
            let client = Arc::new(client);
            let upstream = Arc::new(upstream);
            let result = tokio::select! {
                r = async {
                    tokio::try_join!(
                        hybrid_one_way(Arc::clone(&client), Arc::clone(&upstream)),
                        hybrid_one_way(Arc::clone(&upstream), Arc::clone(&client))
                    )
                } => r,
                _ = cut.cancelled() => Err(cut_error()),
            };
            // On failure try_join drops the other direction, and with it
            // the task of a bulk direction (AbortOnDropHandle): the last
            // reference to each socket goes away and the RST is sent.
            finish(result, &client, &upstream)
        }
        RelayMode::Copy => {
            let result = tokio::select! {
                r = tokio::io::copy_bidirectional_with_sizes(
                    &mut client,
                    &mut upstream,
                    COPY_BUFFER,
                    COPY_BUFFER,
                ) => r,
                _ = cut.cancelled() => Err(cut_error()),
            };
            finish(result, &client, &upstream)
        }
    }
}

/// The error a flow ends with when it is cut from outside.
fn cut_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "cut at the end of the shutdown grace period",
    )
}

/// After a failure both sockets are set to close with RST; the counts of
/// a flow that ended well are returned.
fn finish(
    result: io::Result<(u64, u64)>,
    client: &TcpStream,
    upstream: &TcpStream,
) -> io::Result<Transferred> {
    if result.is_err() {
        reset(client);
        reset(upstream);
    }
    result.map(|(a, b)| Transferred {
        client_to_upstream: a,
        upstream_to_client: b,
    })
}

/// Makes the close of `stream` send RST instead of FIN.
pub fn reset(stream: &TcpStream) {
    // Best effort: the socket may already be dead.
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// A pipe used as the in-kernel buffer of one direction.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // A larger pipe moves more per call; the default (64 KiB) still
        // works if the system refuses (fs.pipe-max-size, user limits).
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
        Ok(Pipe { read, write })
    }
}

fn splice_flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE
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
) -> Poll<io::Result<Step>> {
    SCRATCH_BUF.with(|cell| {
        let mut buf = cell.borrow_mut();
        let n = match poll_read_drained(cx, src, &mut buf[..]) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(n)) => n,
        };
        if n == 0 {
            return Poll::Ready(Ok(Step::Eof));
        }
        let mut written = 0;
        while written < n {
            match dst.try_write(&buf[written..n]) {
                Ok(w) => written += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Poll::Ready(Err(e)),
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

/// Writes all of `unsent` to `dst`, waiting for room, then frees it.
async fn flush(dst: &TcpStream, unsent: &mut Vec<u8>) -> io::Result<()> {
    let mut done = 0;
    while done < unsent.len() {
        dst.writable().await?;
        match dst.try_write(&unsent[done..]) {
            Ok(w) => done += w,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    // Backpressure is rare for small flows: give the memory back.
    *unsent = Vec::new();
    Ok(())
}

/// Moves `src` → `dst` until EOF on `src`, then half-closes `dst`: by copy
/// while the flow looks small, by splice once it looks bulk. The splice
/// loop is a task of its own, aborted if this future is dropped.
async fn hybrid_one_way(src: Arc<TcpStream>, dst: Arc<TcpStream>) -> io::Result<u64> {
    let mut unsent = Vec::new();
    let mut total = 0u64;
    loop {
        let step = std::future::poll_fn(|cx| poll_copy_step(cx, &src, &dst, &mut unsent)).await?;
        match step {
            Step::Eof => {
                flush(&dst, &mut unsent).await?;
                shutdown_write(&dst)?;
                return Ok(total);
            }
            Step::Moved { n, full } => {
                total += n as u64;
                flush(&dst, &mut unsent).await?;
                if full {
                    let task = AbortOnDropHandle::new(tokio::spawn(async move {
                        splice_one_way(&src, &dst, total).await
                    }));
                    return task.await.map_err(io::Error::other)?;
                }
            }
        }
    }
}

/// Moves `src` → `dst` with splice(2) until EOF on `src`, then half-closes
/// `dst`. `total` is what was moved before.
async fn splice_one_way(src: &TcpStream, dst: &TcpStream, mut total: u64) -> io::Result<u64> {
    let mut pipe: Option<Pipe> = None;
    loop {
        src.readable().await?;
        let pipe_ref = match &pipe {
            Some(p) => p,
            None => pipe.insert(Pipe::new()?),
        };
        // The pipe is empty here, so EAGAIN can only mean "socket has no
        // data", which is what try_io needs to clear the readiness.
        let moved = match src.try_io(Interest::READABLE, || {
            splice(
                src.as_fd(),
                None,
                &pipe_ref.write,
                None,
                PIPE_SIZE,
                splice_flags(),
            )
            .map_err(io::Error::from)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if moved == 0 {
            shutdown_write(dst)?;
            return Ok(total);
        }
        let mut pending = moved;
        while pending > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(
                    &pipe_ref.read,
                    None,
                    dst.as_fd(),
                    None,
                    pending,
                    splice_flags(),
                )
                .map_err(io::Error::from)
            }) {
                Ok(n) => {
                    pending -= n;
                    total += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write) {
        // The peer is already gone; the other direction will find out.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            relay(mode, c, u, &CancellationToken::new()).await.unwrap()
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
            relay(RelayMode::Splice, c, u, &CancellationToken::new())
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
            relay(RelayMode::Splice, c, u, &CancellationToken::new()).await
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
            relay(mode, c, u, &relay_cut).await
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

    #[tokio::test]
    async fn empty_flow_ends_cleanly() {
        let (back, t) = through_relay(RelayMode::Splice, Vec::new()).await;
        assert!(back.is_empty());
        assert_eq!(t, Transferred::default());
    }
}
