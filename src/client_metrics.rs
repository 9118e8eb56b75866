//! The Kubernetes API client's metrics, under client-go's names: every
//! request to the API server counted by status code
//! (`rest_client_requests_total{code,method,host}`) and timed
//! (`rest_client_request_duration_seconds{verb,host}`, client-go's
//! buckets).
//!
//! Why client-go's names: the kube-proxy dashboards and alerts that
//! operators already run (kubernetes-mixin, kube-prometheus) read them to
//! tell a proxy that cannot reach the API server from one that has nothing
//! to do. A leaf module, so that the source (which owns the client, and
//! records through [`ApiClientLayer`]) and the registry (which renders the
//! families, [`crate::metrics`]) both use it without the source depending
//! on the registry.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

/// client-go's buckets for `rest_client_request_duration_seconds`
/// (k8s.io/component-base/metrics/prometheus/restclient).
pub const DURATION_BUCKETS: [f64; 12] = [
    0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0,
];

/// What client-go puts in `code` when a request got no response.
pub const NO_RESPONSE: &str = "<error>";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub code: String,
    pub method: String,
    pub host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    pub verb: String,
    pub host: String,
}

fn histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// The two families. Clones share their series: the registry holds one
/// clone, the client's layer another.
#[derive(Clone)]
pub struct ApiClientMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<DurationLabels, Histogram, fn() -> Histogram>,
}

impl std::fmt::Debug for ApiClientMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClientMetrics").finish_non_exhaustive()
    }
}

impl Default for ApiClientMetrics {
    fn default() -> Self {
        ApiClientMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(histogram),
        }
    }
}

impl ApiClientMetrics {
    /// One request to `host` (the API server's `host:port`, as client-go
    /// labels it) answered with `code` (or [`NO_RESPONSE`]) after `took`.
    pub fn record(&self, method: &str, host: &str, code: &str, took: std::time::Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                code: code.to_string(),
                method: method.to_string(),
                host: host.to_string(),
            })
            .inc();
        self.duration
            .get_or_create(&DurationLabels {
                verb: method.to_string(),
                host: host.to_string(),
            })
            .observe(took.as_secs_f64());
    }
}

/// A tower layer for kube's client ([`kube::client::ClientBuilder`]) that
/// records every request into [`ApiClientMetrics`]. The duration is until
/// the response's head (for a watch: until the watch is established), as
/// client-go measures it.
#[derive(Clone, Debug)]
pub struct ApiClientLayer {
    metrics: ApiClientMetrics,
    /// The API server's `host:port`: the layer sits above the one that
    /// adds the server to each request's URI, so it is given here.
    host: String,
}

impl ApiClientLayer {
    pub fn new(metrics: ApiClientMetrics, host: impl Into<String>) -> Self {
        ApiClientLayer {
            metrics,
            host: host.into(),
        }
    }
}

impl<S> tower_layer::Layer<S> for ApiClientLayer {
    type Service = ApiClientService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ApiClientService {
            inner,
            metrics: self.metrics.clone(),
            host: self.host.clone(),
        }
    }
}

/// The service [`ApiClientLayer`] wraps the client's stack in.
#[derive(Clone, Debug)]
pub struct ApiClientService<S> {
    inner: S,
    metrics: ApiClientMetrics,
    host: String,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for ApiClientService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    /// Boxed: API requests are few (lists, watches, their retries), a
    /// future's allocation is nothing beside them.
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.method().as_str().to_string();
        let (metrics, host) = (self.metrics.clone(), self.host.clone());
        let start = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let result = response.await;
            let code = match &result {
                Ok(r) => r.status().as_u16().to_string(),
                Err(_) => NO_RESPONSE.to_string(),
            };
            metrics.record(&method, &host, &code, start.elapsed());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_layer::Layer;
    use tower_service::Service;

    /// Answers every request with `status`, or fails when it is 0.
    struct Fake(u16);

    impl Service<http::Request<()>> for Fake {
        type Response = http::Response<()>;
        type Error = std::io::Error;
        type Future = std::future::Ready<Result<http::Response<()>, std::io::Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            std::future::ready(match self.0 {
                0 => Err(std::io::Error::other("connection refused")),
                s => {
                    let mut r = http::Response::new(());
                    *r.status_mut() = http::StatusCode::from_u16(s).unwrap_or_default();
                    Ok(r)
                }
            })
        }
    }

    fn get() -> http::Request<()> {
        http::Request::get("/api/v1/services?watch=true")
            .body(())
            .unwrap()
    }

    #[tokio::test]
    async fn every_request_is_counted_by_code_and_timed_by_verb() {
        let m = ApiClientMetrics::default();
        let layer = ApiClientLayer::new(m.clone(), "10.0.0.1:6443");
        for (status, n) in [(200, 2), (410, 1), (0, 1)] {
            let mut svc = layer.layer(Fake(status));
            for _ in 0..n {
                let _ = svc.call(get()).await;
            }
        }
        let count = |code: &str| {
            m.requests
                .get_or_create(&RequestLabels {
                    code: code.into(),
                    method: "GET".into(),
                    host: "10.0.0.1:6443".into(),
                })
                .get()
        };
        assert_eq!((count("200"), count("410"), count(NO_RESPONSE)), (2, 1, 1));
        let mut text = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register(
            "rest_client_request_duration_seconds",
            "d",
            m.duration.clone(),
        );
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                "rest_client_request_duration_seconds_count{verb=\"GET\",host=\"10.0.0.1:6443\"} 4"
            ),
            "{text}"
        );
        assert!(
            text.contains("le=\"0.005\"") && text.contains("le=\"60.0\""),
            "{text}"
        );
    }
}
