//! Small tokio TCP and UDP servers used as Service backends in the lab.
//!
//! Each server takes a std listener or UDP socket (normally made with
//! [`Netns::tcp_listener`](super::Netns::tcp_listener) or
//! [`Netns::udp_socket`](super::Netns::udp_socket), so that it lives in a
//! backend namespace), must be started from within a tokio runtime context
//! (`rt.enter()` or inside async code), and returns a [`PeerHandle`] that
//! counts connections (UDP: datagrams received) and stops the server,
//! including its open connections, when dropped; a UDP server's socket is
//! closed shortly after (by its task, on the runtime).
//!
//! - [`whoami`]: writes `"<name>\n"` on accept, then echoes whatever it reads
//!   and keeps the connection open until the client closes its side.
//! - [`sha256`]: reads until EOF, then writes the lowercase hex SHA-256 of
//!   everything read plus `"\n"` and closes (needs a working half-close).
//! - [`echo`]: echoes until EOF, then closes.
//! - [`udp_whoami`]: answers every datagram with `"<name> <source ip:port> "`
//!   followed by the datagram itself: who answered, the address the datagram
//!   came from as this server saw it, and what it was answering.
//! - [`udp_echo`]: sends every datagram back to its source, unchanged.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

/// Connection counters of one server.
#[derive(Debug, Default)]
struct Stats {
    accepted: AtomicU64,
    open: AtomicU64,
}

/// Decrements the open count when a connection task ends, however it ends.
struct OpenGuard(Arc<Stats>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running server; dropping it stops the server and its connections.
#[derive(Debug)]
pub struct PeerHandle {
    addr: SocketAddr,
    stats: Arc<Stats>,
    cancel: CancellationToken,
}

impl PeerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many connections it has accepted so far.
    pub fn accepted(&self) -> u64 {
        self.stats.accepted.load(Ordering::SeqCst)
    }

    /// How many connections are open right now.
    pub fn open(&self) -> u64 {
        self.stats.open.load(Ordering::SeqCst)
    }

    /// Polls (blocking, every 5 ms) until `open() == n`; false on timeout.
    /// Call it from plain threads, not from async code.
    pub fn wait_open(&self, n: u64, timeout: Duration) -> bool {
        poll(timeout, || self.open() == n)
    }

    /// Polls (blocking, every 5 ms) until `accepted() >= n`; false on timeout.
    pub fn wait_accepted(&self, n: u64, timeout: Duration) -> bool {
        poll(timeout, || self.accepted() >= n)
    }

    /// Stops the server (same as dropping the handle).
    pub fn stop(self) {}
}

impl Drop for PeerHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn poll(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Starts the accept loop; `handler` serves one connection.
fn serve<F, Fut>(listener: std::net::TcpListener, handler: F) -> io::Result<PeerHandle>
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = io::Result<()>> + Send + 'static,
{
    let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
    listener.set_nonblocking(true)?;
    let listener = {
        let _guard = runtime.enter();
        TcpListener::from_std(listener)?
    };
    let addr = listener.local_addr()?;
    let stats = Arc::new(Stats::default());
    let cancel = CancellationToken::new();
    let handler = Arc::new(handler);
    {
        let stats = stats.clone();
        let cancel = cancel.clone();
        let rt = runtime.clone();
        runtime.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = cancel.cancelled() => break,
                    r = listener.accept() => r,
                };
                match accepted {
                    Ok((stream, _)) => {
                        stats.accepted.fetch_add(1, Ordering::SeqCst);
                        stats.open.fetch_add(1, Ordering::SeqCst);
                        let guard = OpenGuard(stats.clone());
                        let cancel = cancel.clone();
                        let handler = handler.clone();
                        rt.spawn(async move {
                            let _guard = guard;
                            tokio::select! {
                                _ = cancel.cancelled() => {}
                                _ = handler(stream) => {}
                            }
                        });
                    }
                    // EMFILE and friends: back off instead of spinning.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
    }
    Ok(PeerHandle {
        addr,
        stats,
        cancel,
    })
}

/// Writes `"<name>\n"` on accept, then echoes until the client closes.
pub fn whoami(listener: std::net::TcpListener, name: &str) -> io::Result<PeerHandle> {
    let greeting: Arc<[u8]> = format!("{name}\n").into_bytes().into();
    serve(listener, move |mut stream| {
        let greeting = greeting.clone();
        async move {
            stream.write_all(&greeting).await?;
            echo_stream(&mut stream).await
        }
    })
}

/// Writes `"<name> <peer ip:port>\n"` on accept — the address the
/// connection came from, as this server sees it — then echoes until the
/// client closes.
pub fn whoami_peer(listener: std::net::TcpListener, name: &str) -> io::Result<PeerHandle> {
    let name: Arc<str> = name.into();
    serve(listener, move |mut stream| {
        let name = name.clone();
        async move {
            let peer = stream.peer_addr()?;
            stream
                .write_all(format!("{name} {peer}\n").as_bytes())
                .await?;
            echo_stream(&mut stream).await
        }
    })
}

/// Reads until EOF, then writes the hex SHA-256 of the data and `"\n"`.
pub fn sha256(listener: std::net::TcpListener) -> io::Result<PeerHandle> {
    serve(listener, |mut stream| async move {
        let (_, digest) = drain(&mut stream, true).await?;
        let reply = format!("{}\n", digest.unwrap_or_default());
        stream.write_all(reply.as_bytes()).await?;
        stream.shutdown().await
    })
}

/// Echoes until EOF, then closes.
pub fn echo(listener: std::net::TcpListener) -> io::Result<PeerHandle> {
    serve(listener, |mut stream| async move {
        echo_stream(&mut stream).await
    })
}

/// The largest UDP payload over IPv4 (65535 - 20 - 8).
pub const MAX_UDP_PAYLOAD: usize = 65_507;

/// Receives datagrams until cancelled; `reply` gives the answer to each
/// (payload, source), sent back to the source.
fn serve_udp<F>(socket: std::net::UdpSocket, reply: F) -> io::Result<PeerHandle>
where
    F: Fn(&[u8], SocketAddr) -> Vec<u8> + Send + Sync + 'static,
{
    let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
    socket.set_nonblocking(true)?;
    let socket = {
        let _guard = runtime.enter();
        UdpSocket::from_std(socket)?
    };
    let addr = socket.local_addr()?;
    let stats = Arc::new(Stats::default());
    let cancel = CancellationToken::new();
    {
        let stats = stats.clone();
        let cancel = cancel.clone();
        runtime.spawn(async move {
            let mut buf = vec![0u8; MAX_UDP_PAYLOAD + 1];
            loop {
                let received = tokio::select! {
                    _ = cancel.cancelled() => break,
                    r = socket.recv_from(&mut buf) => r,
                };
                match received {
                    Ok((n, from)) => {
                        stats.accepted.fetch_add(1, Ordering::SeqCst);
                        let answer = reply(&buf[..n], from);
                        // A full buffer or an unreachable source: that
                        // answer is lost, as a real server's would be.
                        let _ = socket.send_to(&answer, from).await;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                }
            }
            // The socket closes here, when the task ends.
        });
    }
    Ok(PeerHandle {
        addr,
        stats,
        cancel,
    })
}

/// Answers every datagram with `"<name> <source ip:port> "` followed by the
/// datagram (cut to fit in one datagram): the address it came from as seen
/// here, and what it answers, so that a client can match answers to
/// questions.
pub fn udp_whoami(socket: std::net::UdpSocket, name: &str) -> io::Result<PeerHandle> {
    let name = name.to_string();
    serve_udp(socket, move |payload, from| {
        let mut answer = format!("{name} {from} ").into_bytes();
        answer.extend_from_slice(payload);
        answer.truncate(MAX_UDP_PAYLOAD);
        answer
    })
}

/// Sends every datagram back to its source, unchanged.
pub fn udp_echo(socket: std::net::UdpSocket) -> io::Result<PeerHandle> {
    serve_udp(socket, |payload, _| payload.to_vec())
}

/// Largest read buffer of [`echo_stream`] and [`drain`].
const BIG_BUF: usize = 256 * 1024;

/// Echoes until EOF, then half-closes. The buffer starts small (an idle
/// connection stays cheap) and grows once a read fills it (bulk data). The
/// lab's echo peers and the benchmark's echo backend both run this.
pub async fn echo_stream(stream: &mut TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 2048];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        stream.write_all(&buf[..n]).await?;
        if n == buf.len() && buf.len() < BIG_BUF {
            buf = vec![0u8; BIG_BUF];
        }
    }
}

/// Reads until EOF; gives the byte count and, with `hash`, the lowercase
/// hex SHA-256 of everything read. The lab's sha256 peer and the
/// benchmark's sink backend both run this.
pub async fn drain(stream: &mut TcpStream, hash: bool) -> io::Result<(u64, Option<String>)> {
    let mut hasher = hash.then(Sha256::new);
    let mut buf = vec![0u8; BIG_BUF];
    let mut count = 0u64;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        count += n as u64;
        if let Some(h) = hasher.as_mut() {
            h.update(&buf[..n]);
        }
    }
    Ok((count, hasher.map(|h| hex(&h.finalize()))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpStream as StdStream};

    fn loopback_listener() -> std::net::TcpListener {
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback")
    }

    fn connect(addr: SocketAddr) -> StdStream {
        let s = StdStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s
    }

    #[test]
    fn hex_is_lowercase_and_padded() {
        assert_eq!(hex(&[0x00, 0x0f, 0xab, 0xff]), "000fabff");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn requires_a_runtime() {
        assert!(echo(loopback_listener()).is_err());
    }

    #[test]
    fn whoami_greets_echoes_and_counts() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let server = {
            let _g = rt.enter();
            whoami(loopback_listener(), "backend7").expect("whoami")
        };
        let mut a = connect(server.local_addr());
        let mut greeting = [0u8; 9];
        a.read_exact(&mut greeting).expect("greeting");
        assert_eq!(&greeting, b"backend7\n");
        let b = connect(server.local_addr());
        assert!(
            server.wait_open(2, Duration::from_secs(5)),
            "open={}",
            server.open()
        );
        assert_eq!(server.accepted(), 2);
        a.write_all(b"hello").expect("write");
        let mut back = [0u8; 5];
        a.read_exact(&mut back).expect("echo");
        assert_eq!(&back, b"hello");
        drop(b);
        assert!(
            server.wait_open(1, Duration::from_secs(5)),
            "open={}",
            server.open()
        );
        a.shutdown(Shutdown::Write).expect("shutdown");
        let mut rest = Vec::new();
        a.read_to_end(&mut rest).expect("eof");
        assert!(rest.is_empty());
        assert!(server.wait_open(0, Duration::from_secs(5)));
    }

    #[test]
    fn sha256_hashes_until_half_close() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let server = {
            let _g = rt.enter();
            sha256(loopback_listener()).expect("sha256")
        };
        let mut s = connect(server.local_addr());
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        s.write_all(&data).expect("write");
        s.shutdown(Shutdown::Write).expect("shutdown");
        let mut reply = String::new();
        s.read_to_string(&mut reply).expect("reply");
        assert_eq!(reply, format!("{}\n", hex(&Sha256::digest(&data))));
        // empty input
        let mut s = connect(server.local_addr());
        s.shutdown(Shutdown::Write).expect("shutdown");
        let mut reply = String::new();
        s.read_to_string(&mut reply).expect("reply");
        assert_eq!(
            reply,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n"
        );
    }

    #[test]
    fn echo_echoes_and_drop_stops_everything() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let server = {
            let _g = rt.enter();
            echo(loopback_listener()).expect("echo")
        };
        let addr = server.local_addr();
        let mut s = connect(addr);
        s.write_all(b"abc").expect("write");
        let mut back = [0u8; 3];
        s.read_exact(&mut back).expect("read");
        assert_eq!(&back, b"abc");
        assert_eq!(server.open(), 1);
        drop(server);
        // the open connection is closed by the server...
        let mut rest = Vec::new();
        let r = s.read_to_end(&mut rest);
        assert!(r.is_err() || rest.is_empty(), "{r:?} {rest:?}");
        // ...and the listener is gone (bounded wait for the accept task to end)
        let refused = poll(Duration::from_secs(5), || {
            StdStream::connect_timeout(&addr, Duration::from_millis(200)).is_err()
        });
        assert!(refused, "listener still accepting after drop");
    }

    fn loopback_udp() -> std::net::UdpSocket {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind loopback");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s
    }

    #[test]
    fn udp_whoami_names_itself_and_the_source_it_saw() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let server = {
            let _g = rt.enter();
            udp_whoami(loopback_udp(), "backend3").expect("udp_whoami")
        };
        let client = loopback_udp();
        let me = client.local_addr().expect("local addr");
        let mut buf = [0u8; 256];
        for round in 1..=2 {
            client
                .send_to(format!("q{round}").as_bytes(), server.local_addr())
                .expect("send");
            let (n, from) = client.recv_from(&mut buf).expect("answer");
            assert_eq!(from, server.local_addr());
            assert_eq!(
                std::str::from_utf8(&buf[..n]).expect("utf8"),
                format!("backend3 {me} q{round}")
            );
            assert_eq!(server.accepted(), round);
        }
    }

    #[test]
    fn udp_echo_returns_the_largest_datagram_whole_and_drop_closes_the_socket() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let server = {
            let _g = rt.enter();
            udp_echo(loopback_udp()).expect("udp_echo")
        };
        let addr = server.local_addr();
        let client = loopback_udp();
        let data: Vec<u8> = (0..MAX_UDP_PAYLOAD).map(|i| (i * 13 % 251) as u8).collect();
        client.send_to(&data, addr).expect("send");
        let mut buf = vec![0u8; MAX_UDP_PAYLOAD + 1];
        let (n, from) = client.recv_from(&mut buf).expect("echo");
        assert_eq!(from, addr);
        assert_eq!(n, data.len());
        assert!(buf[..n] == data[..], "echoed payload differs");
        drop(server);
        // Once the task has ended, the port is free again (bounded wait).
        let freed = poll(Duration::from_secs(5), || {
            std::net::UdpSocket::bind(addr).is_ok()
        });
        assert!(freed, "{addr} still bound after the handle was dropped");
    }
}
