//! Requests to an endpoint over h2, with the h2 crate's client itself,
//! not hyper's on top of it.
//!
//! hyper's h2 client hands every request to the connection's task
//! through a channel, runs a future per request that waits for the
//! response and hands it back through a second channel, and one more
//! for the request's body. Here the request is opened on the shared
//! connection from the request's own future, which then waits on the
//! stream itself: nothing is queued, spawned or woken in between (a
//! request body that is not over by the time the response comes is the
//! one exception: its pipe then goes on in a task of its own).
//!
//! A request the endpoint did not process comes back unsent, to be tried
//! elsewhere, when it had no body: its stream refused (`REFUSED_STREAM`,
//! RFC 9113 §8.7), or above the last stream of the endpoint's GOAWAY
//! (§6.8; h2 fails only those streams with the endpoint's GOAWAY, a
//! stream cut by the connection's end gets an I/O error). A request with
//! a body may have had some of it read and is never sent twice.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::{Reason, SendStream};
use http::{Request, Response};
use http_body::Body;

use super::body::BoxError;
use super::pool::StreamGuard;

/// How one request on an h2 connection went.
pub enum H2Sent<B> {
    /// The endpoint's response; its body is the stream's.
    Answered(Response<h2::RecvStream>),
    /// Not processed by the endpoint: safe to send elsewhere.
    Unsent(Request<B>),
    /// Sent (maybe in part): never sent again.
    Failed(BoxError),
}

/// Sends `req` on `send` (a ready handle of a shared connection) and
/// waits for the response head; the request's body is piped meanwhile,
/// and after, in a task of its own, if it is not over by then.
///
/// `stream` counts the stream on its connection; the pipe's task, if
/// any, counts it too until the body is sent.
pub async fn send<B>(
    send: h2::client::SendRequest<Bytes>,
    req: Request<B>,
    stream: &StreamGuard,
) -> H2Sent<B>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut send = match send.ready().await {
        Ok(s) => s,
        Err(_) => return H2Sent::Unsent(req),
    };
    let (parts, body) = req.into_parts();
    let eos = body.is_end_stream();
    let head = Request::from_parts(parts, ());
    // A request without a body, the one kind that can go elsewhere whole:
    // a copy of its head and its (ended) body are kept for that; any
    // other body is piped.
    let (again, body) = if eos {
        (Some((copy_head(&head), body)), None)
    } else {
        (None, Some(body))
    };
    let (response, tx) = match send.send_request(head, eos) {
        Ok(r) => r,
        Err(e) => {
            // The connection went away or broke between `ready` and now:
            // nothing was sent. Anything else is the request's own fault,
            // the same at every endpoint.
            let gone = e.is_go_away() || e.is_io();
            return match again {
                Some((h, b)) if gone => H2Sent::Unsent(Request::from_parts(h, b)),
                _ => H2Sent::Failed(e.into()),
            };
        }
    };
    let mut pipe = body.map(|body| RequestPipe {
        body,
        tx,
        held: None,
    });
    let result = Head {
        response,
        pipe: &mut pipe,
    }
    .await;
    match result {
        Ok(resp) => {
            if let Some(p) = pipe {
                // Still streaming (a gRPC client stream, a large upload):
                // on its own from here, while the response streams back.
                let counted = stream.another();
                tokio::spawn(async move {
                    let _counted = counted;
                    if let Err(e) = p.await {
                        tracing::debug!(error = %e, "request body to the endpoint ended early");
                    }
                });
            }
            H2Sent::Answered(resp)
        }
        Err(e) if not_processed(&e) => match again {
            Some((h, b)) => H2Sent::Unsent(Request::from_parts(h, b)),
            None => H2Sent::Failed(e.into()),
        },
        Err(e) => H2Sent::Failed(e.into()),
    }
}

/// The endpoint did not process the stream: it refused it, or its
/// GOAWAY's last stream is below it.
fn not_processed(e: &h2::Error) -> bool {
    e.is_remote() && (e.is_go_away() || e.reason() == Some(Reason::REFUSED_STREAM) && e.is_reset())
}

/// A copy of a request's head (its extensions stay behind: request mode
/// sets none).
fn copy_head(head: &Request<()>) -> http::request::Parts {
    let mut r = Request::new(());
    *r.method_mut() = head.method().clone();
    *r.uri_mut() = head.uri().clone();
    *r.version_mut() = head.version();
    *r.headers_mut() = head.headers().clone();
    r.into_parts().0
}

/// The response head, while the request's body is piped.
struct Head<'a, B> {
    response: h2::client::ResponseFuture,
    pipe: &'a mut Option<RequestPipe<B>>,
}

impl<B> Future for Head<'_, B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<h2::RecvStream>, h2::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Some(p) = this.pipe.as_mut()
            && let Poll::Ready(r) = Pin::new(p).poll(cx)
        {
            // Done, or broken off (the endpoint reset the stream, the
            // client's body failed): the response tells the rest.
            if let Err(e) = r {
                tracing::debug!(error = %e, "request body to the endpoint ended early");
            }
            *this.pipe = None;
        }
        Pin::new(&mut this.response).poll(cx)
    }
}

/// A request's body, frame by frame onto its h2 stream, as the stream's
/// flow control allows.
struct RequestPipe<B> {
    body: B,
    tx: SendStream<Bytes>,
    /// A chunk waiting for send capacity, and whether it ends the body.
    held: Option<(Bytes, bool)>,
}

impl<B> Future for RequestPipe<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            // Woken by a reset from the endpoint while waiting below.
            if let Poll::Ready(r) = this.tx.poll_reset(cx) {
                return Poll::Ready(Err(match r {
                    Ok(reason) => h2::Error::from(reason).into(),
                    Err(e) => e.into(),
                }));
            }
            if let Some((chunk, eos)) = this.held.take() {
                while this.tx.capacity() == 0 {
                    match this.tx.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                        Poll::Ready(None) => {
                            return Poll::Ready(Err("the endpoint's stream closed".into()));
                        }
                        Poll::Pending => {
                            this.held = Some((chunk, eos));
                            return Poll::Pending;
                        }
                    }
                }
                // h2 sends what the window allows and buffers the rest
                // of this one chunk: the body is read no further until
                // the window opens again.
                this.tx.send_data(chunk, eos)?;
                if eos {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // The next frame first, capacity after: capacity reserved for
            // a body that sends nothing yet would hold the connection's
            // window from the other streams.
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(chunk) => {
                        let eos = this.body.is_end_stream();
                        if chunk.is_empty() {
                            this.tx.send_data(Bytes::new(), eos)?;
                            if eos {
                                return Poll::Ready(Ok(()));
                            }
                            continue;
                        }
                        this.tx.reserve_capacity(1);
                        this.held = Some((chunk, eos));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            this.tx.reserve_capacity(0);
                            this.tx.send_trailers(trailers)?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                },
                Some(Err(e)) => {
                    // The client's body broke off: the endpoint must not
                    // take what it has as the whole request.
                    this.tx.send_reset(Reason::CANCEL);
                    return Poll::Ready(Err(e.into()));
                }
                None => {
                    this.tx.send_data(Bytes::new(), true)?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use http_body::Frame;
    use http_body_util::{Empty, Full, StreamBody};
    use sha2::{Digest, Sha256};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    fn counted() -> (Arc<AtomicUsize>, StreamGuard) {
        let count = Arc::new(AtomicUsize::new(0));
        let guard = StreamGuard::on(&count);
        (count, guard)
    }

    /// An h2 endpoint on loopback serving every stream with `serve`, and a
    /// connection to it.
    async fn endpoint<F, Fut>(serve: F) -> h2::client::SendRequest<Bytes>
    where
        F: Fn(Request<h2::RecvStream>, h2::server::SendResponse<Bytes>) -> Fut
            + Send
            + Sync
            + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            // As the pool's connections (and an endpoint's, mostly): no
            // Nagle delay on the small frames of flow control.
            s.set_nodelay(true).unwrap();
            let mut conn = h2::server::handshake(s).await.unwrap();
            while let Some(Ok((req, respond))) = conn.accept().await {
                tokio::spawn(serve(req, respond));
            }
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (send, conn) = h2::client::handshake(stream).await.unwrap();
        tokio::spawn(conn);
        send
    }

    fn refuse(
        _: Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
    ) -> impl Future<Output = ()> {
        respond.send_reset(Reason::REFUSED_STREAM);
        std::future::ready(())
    }

    /// A refused request without a body comes back whole, for another
    /// endpoint; one with a body (read in part, maybe) is never sent again.
    #[tokio::test]
    async fn a_refused_request_comes_back_only_without_a_body() {
        let send = endpoint(refuse).await;
        let req = Request::get("http://web/a?b")
            .header("x-call", "1")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let (_, stream) = counted();
        match super::send(send.clone(), req, &stream).await {
            H2Sent::Unsent(r) => {
                assert_eq!(r.uri(), "http://web/a?b");
                assert_eq!(r.headers()["x-call"], "1");
            }
            H2Sent::Answered(_) => panic!("answered"),
            H2Sent::Failed(e) => panic!("a refused GET was not given back: {e}"),
        }
        let req = Request::post("http://web/a")
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap();
        assert!(
            matches!(super::send(send, req, &stream).await, H2Sent::Failed(_)),
            "a refused request with a body was given back for a retry"
        );
    }

    /// A body far larger than the endpoint's window (h2's default, 64 KiB)
    /// reaches it whole, trailers and all, while the endpoint has already
    /// answered: the pipe goes on after the response head. Hashes of what
    /// was sent and what arrived are compared.
    #[tokio::test]
    async fn a_large_body_streams_on_after_the_answer_with_its_trailers() {
        let send = endpoint(|req, mut respond| async move {
            // The head first, then the body is read.
            let mut tx = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            // Not read for a while: the pipe waits for the window.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let mut body = req.into_body();
            let mut hash = Sha256::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                let _ = body.flow_control().release_capacity(chunk.len());
                hash.update(&chunk);
            }
            let trailers = body.trailers().await.unwrap().unwrap_or_default();
            let mut answer = format!("{:x}", hash.finalize());
            if let Some(t) = trailers.get("x-end") {
                answer.push(' ');
                answer.push_str(t.to_str().unwrap());
            }
            tx.send_data(Bytes::from(answer), true).unwrap();
        })
        .await;
        let chunk = Bytes::from((0..64 * 1024).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        let mut expect = Sha256::new();
        for _ in 0..128 {
            expect.update(&chunk);
        }
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-end", http::HeaderValue::from_static("done"));
        let frames = futures::stream::iter(
            (0..128)
                .map(move |_| Ok::<_, BoxError>(Frame::data(chunk.clone())))
                .chain(std::iter::once(Ok(Frame::trailers(trailers)))),
        )
        // One frame at a time, as a client's body arrives.
        .then(|f| async move {
            tokio::task::yield_now().await;
            f
        });
        let req = Request::post("http://web/upload")
            .body(StreamBody::new(Box::pin(frames)))
            .unwrap();
        let (count, stream) = counted();
        let resp = match tokio::time::timeout(
            std::time::Duration::from_secs(20),
            super::send(send, req, &stream),
        )
        .await
        .expect("no answer")
        {
            H2Sent::Answered(r) => r,
            H2Sent::Unsent(_) => panic!("unsent"),
            H2Sent::Failed(e) => panic!("failed: {e}"),
        };
        // The answer came first: the body is still on its way (the
        // endpoint reads none of it for 300 ms), and its pipe counts the
        // stream as well.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(count.load(Ordering::SeqCst), 2);
        let mut body = resp.into_body();
        let mut got = Vec::new();
        while let Some(c) = tokio::time::timeout(std::time::Duration::from_secs(20), body.data())
            .await
            .expect("the body stalled")
        {
            got.extend_from_slice(&c.unwrap());
        }
        assert_eq!(
            String::from_utf8(got).unwrap(),
            format!("{:x} done", expect.finalize())
        );
        // The body's pipe counted the stream until it was done: only the
        // request's own count is left.
        assert_eq!(count.load(Ordering::SeqCst), 1);
        drop(stream);
        assert_eq!(count.load(Ordering::SeqCst), 0);
    }

    /// An endpoint that answers a request's HEADERS with GOAWAY (last
    /// stream 0: it processed none), written frame by frame: the request
    /// without a body comes back unsent.
    #[tokio::test]
    async fn a_request_above_the_goaways_last_stream_comes_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            // SETTINGS (empty), then SETTINGS ACK for the client's.
            s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
            s.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await.unwrap();
            let mut preface = [0u8; 24];
            s.read_exact(&mut preface).await.unwrap();
            loop {
                let mut head = [0u8; 9];
                if s.read_exact(&mut head).await.is_err() {
                    return;
                }
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut payload = vec![0u8; len];
                s.read_exact(&mut payload).await.unwrap();
                if head[3] == 1 {
                    // HEADERS: GOAWAY, last stream 0, NO_ERROR.
                    let goaway = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                    s.write_all(&goaway).await.unwrap();
                }
            }
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let (send, conn) = h2::client::handshake(stream).await.unwrap();
        tokio::spawn(conn);
        let req = Request::get("http://web/x")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let (_, counted) = counted();
        let outcome = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            super::send(send, req, &counted),
        )
        .await
        .expect("no outcome");
        match outcome {
            H2Sent::Unsent(r) => assert_eq!(r.uri(), "http://web/x"),
            H2Sent::Answered(_) => panic!("answered"),
            H2Sent::Failed(e) => {
                panic!("a GET above the GOAWAY's last stream was not given back: {e}")
            }
        }
    }
}
