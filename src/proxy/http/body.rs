//! The body of a response sent to a client: the endpoint's, streamed
//! frame by frame (data and trailers, with hyper's back-pressure both
//! ways, never buffered), or a short one of the proxy's own. It carries
//! what the request holds until the response is over: the endpoint's
//! lease (least-connections counts requests in flight), the HTTP/1.1
//! connection that goes back to the pool at the end of the body, and the
//! h2 stream's count.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;

use super::super::balancer::Lease;
use super::super::metrics::ServicePortMetrics;
use super::super::metrics::http::Outcome;
use super::pool::{Pool, StreamGuard};

/// What a body that breaks off reports (hyper's or h2's error).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a response to a client.
pub struct ProxyBody {
    kind: Kind,
    done: Done,
}

enum Kind {
    /// The proxy's own answer (an error), sent in one frame.
    Full(Option<Bytes>),
    /// The endpoint's answer over HTTP/1.1.
    Http1(Incoming),
    /// The endpoint's answer over h2: its stream; `data_done` once its
    /// data is over (the trailers may follow).
    H2 {
        recv: h2::RecvStream,
        data_done: bool,
    },
}

/// An endpoint's response body, as it came.
pub enum UpstreamBody {
    Http1(Incoming),
    H2(h2::RecvStream),
}

/// What a request holds until its response is over; counts the request
/// out when it goes.
pub struct Done {
    pub metrics: Arc<ServicePortMetrics>,
    pub outcome: Outcome,
    /// A gRPC request: `grpc-status` is looked for in the trailers.
    pub grpc: bool,
    pub lease: Option<Lease>,
    /// The HTTP/1.1 connection, back to the pool once the body has been
    /// read to its end.
    pub back: Option<(Arc<Pool>, SocketAddr, http1::SendRequest<Incoming>)>,
    pub stream: Option<StreamGuard>,
}

impl Done {
    /// The response was read to its end: the connection can carry
    /// another request.
    fn complete(&mut self) {
        if let Some((pool, endpoint, send)) = self.back.take() {
            pool.checkin(endpoint, send);
        }
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        // A connection whose body was not read to the end is dropped
        // with `back` (it closes: its next bytes are this response's).
        self.metrics.http().ended(self.outcome);
    }
}

impl ProxyBody {
    /// The proxy's own body.
    pub fn full(text: impl Into<Bytes>, done: Done) -> Self {
        let text = text.into();
        ProxyBody {
            kind: Kind::Full((!text.is_empty()).then_some(text)),
            done,
        }
    }

    /// The endpoint's body, streamed.
    pub fn upstream(body: UpstreamBody, done: Done) -> Self {
        let kind = match body {
            UpstreamBody::Http1(b) => Kind::Http1(b),
            UpstreamBody::H2(recv) => Kind::H2 {
                recv,
                data_done: false,
            },
        };
        let mut b = ProxyBody { kind, done };
        // A body that is over before it starts (204, 304, HEAD) may never
        // be polled: its connection is free now.
        if b.kind_is_end() {
            b.finish();
        }
        b
    }

    fn kind_is_end(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Http1(b) => b.is_end_stream(),
            Kind::H2 { recv, .. } => recv.is_end_stream(),
        }
    }

    fn finish(&mut self) {
        self.done.complete();
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Http1(body) => {
                let polled = Pin::new(body).poll_frame(cx).map_err(BoxError::from);
                this.after(&polled);
                polled
            }
            Kind::H2 { recv, data_done } => {
                let polled = poll_h2(recv, data_done, cx);
                this.after(&polled);
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.kind_is_end()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Http1(b) => b.size_hint(),
            // The stream's `content-length` passes on as a header.
            Kind::H2 { .. } => SizeHint::default(),
        }
    }
}

impl ProxyBody {
    /// Bookkeeping after each poll of the endpoint's body: the gRPC
    /// status of its trailers, and its end.
    fn after(&mut self, polled: &Poll<Option<Result<Frame<Bytes>, BoxError>>>) {
        match polled {
            Poll::Ready(None) => self.finish(),
            Poll::Ready(Some(Ok(frame))) => {
                let d = &mut self.done;
                if let Some(t) = frame.trailers_ref()
                    && d.grpc
                    && let Some(s) = grpc_status(t)
                {
                    d.outcome.grpc_status = Some(s);
                }
                if self.kind_is_end() {
                    self.finish();
                }
            }
            Poll::Ready(Some(Err(_))) => {
                // Broken off: the connection goes with `done`.
                self.done.back = None;
            }
            Poll::Pending => {}
        }
    }
}

/// The next frame of an endpoint's h2 stream: its data (the window
/// given back as it is passed on), then its trailers.
fn poll_h2(
    recv: &mut h2::RecvStream,
    data_done: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    if !*data_done {
        match ready!(recv.poll_data(cx)) {
            Some(Ok(data)) => {
                let _ = recv.flow_control().release_capacity(data.len());
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
            None => *data_done = true,
        }
    }
    match ready!(recv.poll_trailers(cx)) {
        Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
        Ok(None) => Poll::Ready(None),
        Err(e) => Poll::Ready(Some(Err(e.into()))),
    }
}

/// The `grpc-status` in `headers` (trailers, or the headers of a
/// trailers-only answer).
pub fn grpc_status(headers: &http::HeaderMap) -> Option<u8> {
    headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}
