//! Connections to a Service port's endpoints, kept for the requests that
//! follow: HTTP/1.1 connections reused one request at a time (never
//! pipelined), h2 connections shared by many streams.
//!
//! - HTTP/1.1: a connection goes back to the pool when its response body
//!   has been read to the end (a response cut short closes it); one idle
//!   longer than the idle timeout is closed rather than reused, before
//!   common servers close theirs (Node.js and Apache after 5 s), which
//!   would race with a request written at that moment.
//! - h2 (the h2 crate's client: [`super::h2_upstream`]): one connection
//!   per endpoint, another when each open one carries as many streams as
//!   the endpoint's `SETTINGS_MAX_CONCURRENT_STREAMS` allows, at most
//!   [`H2_STREAMS_PER_CONNECTION`] (a request over the endpoint's limit
//!   would only wait). A connection the endpoint sent GOAWAY on is not
//!   used again: the next request opens a new one.
//! - An endpoint that leaves the Service port's set takes no new request;
//!   its idle connections close at once (the port's pools watch the
//!   balancer: [`super::port::HttpPort`]), and the ones carrying requests
//!   close once those are done (dropping the last handle of an h2
//!   connection ends it with GOAWAY).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use super::super::balancer::EndpointSet;
use super::super::connect::connect_marked;
use super::super::metrics::ServicePortMetrics;

/// Streams on one h2 connection before the next request opens another,
/// when the endpoint allows more.
pub const H2_STREAMS_PER_CONNECTION: usize = 100;

/// hyper's defaults for its h2 client, kept: the windows a stream and a
/// connection open to the endpoint (2 MiB and 5 MiB: bulk transfers are
/// not held back by the 64 KiB of the protocol's default), and the most
/// it buffers to send (1 MiB). The endpoints' header blocks are held to
/// the limit the clients' are (`max_header_bytes`).
const H2_STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const H2_CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const H2_SEND_BUFFER: usize = 1024 * 1024;

/// A handle on an h2 connection to an endpoint: opens streams on it.
pub type H2Send = h2::client::SendRequest<Bytes>;

/// The protocol spoken to endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Http2,
}

/// A connection handed out for one request.
pub enum Conn {
    Http1 {
        send: http1::SendRequest<Incoming>,
    },
    Http2 {
        send: H2Send,
        /// Counts the stream against its connection while held.
        stream: StreamGuard,
    },
}

/// One stream counted on an h2 connection.
#[derive(Debug)]
pub struct StreamGuard(Arc<AtomicUsize>);

impl StreamGuard {
    /// Counts one more stream on the connection whose count `streams` is.
    pub fn on(streams: &Arc<AtomicUsize>) -> StreamGuard {
        streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard(Arc::clone(streams))
    }

    /// The same stream counted once more, for a part of it that outlives
    /// the response (a request body still being sent): counted twice for
    /// a while rather than not at all, so that the connection is never
    /// taken for having room it has not.
    pub fn another(&self) -> StreamGuard {
        StreamGuard::on(&self.0)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct H2Conn {
    send: H2Send,
    streams: Arc<AtomicUsize>,
}

impl H2Conn {
    /// New streams can be opened: no GOAWAY received, no error, not
    /// closed.
    fn usable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        matches!(self.send.poll_ready(&mut cx), Poll::Ready(Ok(())))
    }

    /// Room for one more stream.
    fn has_room(&self) -> bool {
        let limit = self
            .send
            .current_max_send_streams()
            .clamp(1, H2_STREAMS_PER_CONNECTION);
        self.streams.load(Ordering::Relaxed) < limit
    }
}

#[derive(Default)]
struct Entry {
    /// Idle HTTP/1.1 connections, most recently used last.
    idle: Vec<(http1::SendRequest<Incoming>, Instant)>,
    h2: Vec<H2Conn>,
    /// Serialises opening h2 connections to this endpoint: the requests
    /// that arrive while one is being opened share it instead of each
    /// opening their own.
    dialing: Arc<tokio::sync::Mutex<()>>,
}

/// The upstream connections of one Service port's listener.
pub struct Pool {
    idle_timeout: Duration,
    /// The largest header block taken from an h2 endpoint.
    max_header_bytes: u32,
    /// `SO_MARK` of the connections (see `connect_marked`).
    mark: u32,
    metrics: Arc<ServicePortMetrics>,
    entries: Mutex<HashMap<SocketAddr, Entry>>,
    /// The generation of the endpoint set last pruned against.
    pruned: AtomicU64,
}

impl Pool {
    pub fn new(
        idle_timeout: Duration,
        max_header_bytes: usize,
        mark: u32,
        metrics: Arc<ServicePortMetrics>,
    ) -> Self {
        Pool {
            idle_timeout,
            max_header_bytes: u32::try_from(max_header_bytes).unwrap_or(u32::MAX),
            mark,
            metrics,
            entries: Mutex::new(HashMap::new()),
            pruned: AtomicU64::new(0),
        }
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<SocketAddr, Entry>> {
        // Held for short, non-panicking sections only.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the connections of endpoints no longer in `set` (their
    /// requests in flight hold their own handles and finish). Cheap when
    /// the set has not changed since the last call.
    pub fn prune(&self, set: &EndpointSet) {
        if self.pruned.swap(set.generation(), Ordering::Relaxed) == set.generation() {
            return;
        }
        self.entries().retain(|addr, _| set.contains(*addr));
    }

    /// A connection to `endpoint` for one request: an idle or shared one
    /// if there is one, else a new one (opened within `timeout`).
    pub async fn checkout(
        &self,
        endpoint: SocketAddr,
        proto: Proto,
        timeout: Duration,
    ) -> io::Result<Conn> {
        let pooled = match proto {
            Proto::Http1 => self.idle_http1(endpoint).map(|send| Conn::Http1 { send }),
            Proto::Http2 => self.shared_http2(endpoint),
        };
        match pooled {
            Some(c) => Ok(c),
            // Boxed: dialing and the protocol's handshake are large
            // futures, which every request's future would otherwise
            // carry (and copy) for the rare request that opens a
            // connection.
            None => Box::pin(self.open(endpoint, proto, timeout)).await,
        }
    }

    /// A new connection to `endpoint` (HTTP/1.1), or the h2 connection
    /// another request opened meanwhile.
    async fn open(
        &self,
        endpoint: SocketAddr,
        proto: Proto,
        timeout: Duration,
    ) -> io::Result<Conn> {
        match proto {
            Proto::Http1 => {
                let stream = self.dial(endpoint, timeout).await?;
                let send = self.start_http1(endpoint, stream, false).await?;
                Ok(Conn::Http1 { send })
            }
            Proto::Http2 => {
                let dialing = Arc::clone(&self.entries().entry(endpoint).or_default().dialing);
                let _turn = dialing.lock().await;
                // Opened by whoever had the turn before?
                if let Some(c) = self.shared_http2(endpoint) {
                    return Ok(c);
                }
                let stream = self.dial(endpoint, timeout).await?;
                let send = self.start_http2(endpoint, stream).await?;
                let streams = Arc::new(AtomicUsize::new(0));
                let stream = StreamGuard::on(&streams);
                self.entries().entry(endpoint).or_default().h2.push(H2Conn {
                    send: send.clone(),
                    streams,
                });
                Ok(Conn::Http2 { send, stream })
            }
        }
    }

    /// Puts an HTTP/1.1 connection whose exchange is complete back.
    pub fn checkin(&self, endpoint: SocketAddr, send: http1::SendRequest<Incoming>) {
        if send.is_closed() {
            return;
        }
        let mut entries = self.entries();
        // Only for an endpoint still in the pool: one pruned meanwhile
        // has left the set.
        if let Some(e) = entries.get_mut(&endpoint) {
            e.idle.push((send, Instant::now()));
        }
    }

    fn idle_http1(&self, endpoint: SocketAddr) -> Option<http1::SendRequest<Incoming>> {
        let mut entries = self.entries();
        // Made here, so that the connection opened next can come back
        // (`checkin` keeps only endpoints the pool knows).
        let entry = entries.entry(endpoint).or_default();
        let now = Instant::now();
        // Too old ones are closed (dropped) on the way.
        while let Some((send, since)) = entry.idle.pop() {
            if now.saturating_duration_since(since) < self.idle_timeout && !send.is_closed() {
                return Some(send);
            }
        }
        None
    }

    fn shared_http2(&self, endpoint: SocketAddr) -> Option<Conn> {
        let mut entries = self.entries();
        let entry = entries.get_mut(&endpoint)?;
        // Closed ones (GOAWAY, endpoint gone) leave the list.
        entry.h2.retain_mut(H2Conn::usable);
        let c = entry.h2.iter().find(|c| c.has_room())?;
        Some(Conn::Http2 {
            send: c.send.clone(),
            stream: StreamGuard::on(&c.streams),
        })
    }

    /// A TCP connection to `endpoint`, marked, without Nagle.
    pub async fn dial(&self, endpoint: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        let stream = tokio::time::timeout(timeout, connect_marked(endpoint, self.mark))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Starts HTTP/1.1 on `stream`; `upgrades`: the connection may be
    /// taken over by a protocol upgrade (it is then never pooled).
    pub async fn start_http1(
        &self,
        endpoint: SocketAddr,
        stream: TcpStream,
        upgrades: bool,
    ) -> io::Result<http1::SendRequest<Incoming>> {
        let (send, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        let metrics = Arc::clone(&self.metrics);
        metrics.http().upstream(endpoint, 1);
        tokio::spawn(async move {
            let r = if upgrades {
                conn.with_upgrades().await
            } else {
                conn.await
            };
            if let Err(e) = r {
                debug!(%endpoint, error = %e, "HTTP/1.1 connection to the endpoint ended");
            }
            metrics.http().upstream(endpoint, -1);
        });
        Ok(send)
    }

    async fn start_http2(&self, endpoint: SocketAddr, stream: TcpStream) -> io::Result<H2Send> {
        let (send, conn) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_send_buffer_size(H2_SEND_BUFFER)
            .max_header_list_size(self.max_header_bytes)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(io::Error::other)?;
        let metrics = Arc::clone(&self.metrics);
        metrics.http().upstream(endpoint, 1);
        // The connection's frames, read and written in this one task;
        // it ends (GOAWAY) once the pool and every request have let go of
        // it.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%endpoint, error = %e, "h2 connection to the endpoint ended");
            }
            metrics.http().upstream(endpoint, -1);
        });
        Ok(send)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ObjectKey, Protocol, ServicePortName};
    use crate::proxy::metrics::PortSeries;
    use tokio::net::TcpListener;

    fn pool() -> Pool {
        let name = ServicePortName {
            service: ObjectKey::new("default", "web"),
            port: "grpc".into(),
            protocol: Protocol::Tcp,
        };
        let metrics = PortSeries::new(false).service_port(&name);
        Pool::new(Duration::from_secs(4), 64 * 1024, 0, metrics)
    }

    /// An h2 endpoint on loopback that allows `streams` at a time on a
    /// connection; counts the connections it accepted.
    async fn endpoint(streams: u32) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut conn = h2::server::Builder::new()
                        .max_concurrent_streams(streams)
                        .handshake::<_, Bytes>(s)
                        .await
                        .unwrap();
                    // Streams are accepted and never answered: they stay open.
                    let mut held = Vec::new();
                    while let Some(Ok(stream)) = conn.accept().await {
                        held.push(stream);
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// Opens one stream on a checked-out h2 connection and keeps it open.
    async fn open_stream(pool: &Pool, ep: SocketAddr) -> (h2::client::ResponseFuture, StreamGuard) {
        let Conn::Http2 { send, stream } = pool
            .checkout(ep, Proto::Http2, Duration::from_secs(5))
            .await
            .unwrap()
        else {
            panic!("not h2");
        };
        let mut send = send.ready().await.unwrap();
        let req = http::Request::get(format!("http://{ep}/"))
            .body(())
            .unwrap();
        let (resp, _) = send.send_request(req, true).unwrap();
        (resp, stream)
    }

    /// Requests share one h2 connection until it carries as many streams
    /// as the endpoint's SETTINGS_MAX_CONCURRENT_STREAMS allows; the next
    /// opens a second connection instead of waiting.
    #[tokio::test]
    async fn a_second_h2_connection_opens_at_the_endpoints_stream_limit() {
        let (ep, accepted) = endpoint(2).await;
        let pool = pool();
        let mut held = Vec::new();
        held.push(open_stream(&pool, ep).await);
        // The endpoint's SETTINGS arrive with the handshake's first
        // exchange: let them be read.
        tokio::time::sleep(Duration::from_millis(100)).await;
        held.push(open_stream(&pool, ep).await);
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "two streams, one connection"
        );
        held.push(open_stream(&pool, ep).await);
        // Dialled; let the endpoint's accept loop see it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the third stream did not get a connection of its own"
        );
        // A stream that ends makes room on the first connection again:
        // with it, the two connections take two more streams (the second
        // had room for one only).
        drop(held.remove(0));
        tokio::time::sleep(Duration::from_millis(100)).await;
        held.push(open_stream(&pool, ep).await);
        held.push(open_stream(&pool, ep).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
