//! Moving bytes between the two connections of a flow.
//!
//! Two ways, chosen with `--tcp-relay`:
//! - `splice` (default): each direction moves data socket → pipe → socket
//!   with splice(2), so payload never enters user space. The pipe of a
//!   direction is made only when that direction first carries data, so an
//!   idle connection costs no pipe.
//! - `copy`: tokio's `copy_bidirectional` with 64 KiB buffers, for
//!   comparison in benchmarks and for kernels without splice.
//!
//! In both, an EOF on one side becomes a half-close (`shutdown(SHUT_WR)`) on
//! the other and the opposite direction keeps running until it ends too; an
//! error on either side ends both, and both sockets are then reset so that
//! neither peer waits on a connection that is gone (no CLOSE_WAIT pile-up).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

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
const PIPE_SIZE: usize = 256 * 1024;
const COPY_BUFFER: usize = 64 * 1024;

/// Relays until both directions are done or one fails.
pub async fn relay(
    mode: RelayMode,
    client: &mut TcpStream,
    upstream: &mut TcpStream,
) -> io::Result<Transferred> {
    let result = match mode {
        RelayMode::Splice => {
            let (a, b) = tokio::try_join!(
                splice_one_way(client, upstream),
                splice_one_way(upstream, client)
            )?;
            Ok(Transferred {
                client_to_upstream: a,
                upstream_to_client: b,
            })
        }
        RelayMode::Copy => {
            tokio::io::copy_bidirectional_with_sizes(client, upstream, COPY_BUFFER, COPY_BUFFER)
                .await
                .map(|(a, b)| Transferred {
                    client_to_upstream: a,
                    upstream_to_client: b,
                })
        }
    };
    if result.is_err() {
        reset(client);
        reset(upstream);
    }
    result
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

/// Moves `src` → `dst` until EOF on `src`, then half-closes `dst`.
async fn splice_one_way(src: &TcpStream, dst: &TcpStream) -> io::Result<u64> {
    let mut pipe: Option<Pipe> = None;
    let mut total = 0u64;
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
            let (mut c, _) = proxy.accept().await.unwrap();
            let mut u = TcpStream::connect(server_addr).await.unwrap();
            relay(mode, &mut c, &mut u).await.unwrap()
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
    async fn empty_flow_ends_cleanly() {
        let (back, t) = through_relay(RelayMode::Splice, Vec::new()).await;
        assert!(back.is_empty());
        assert_eq!(t, Transferred::default());
    }
}
