//! What the connections of one request-mode listener share.

use std::sync::{Arc, Weak};

use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use super::super::DataPathConfig;
use super::super::balancer::Balancer;
use super::super::metrics::ServicePortMetrics;
use super::pool;
use crate::model::ServicePortName;

/// What the connections of one request-mode listener share: above all,
/// the pool of connections to the endpoints.
pub struct HttpPort {
    pub(super) service: Arc<ServicePortName>,
    pub(super) balancer: Arc<Balancer>,
    pub(super) config: Arc<DataPathConfig>,
    pub(super) metrics: Arc<ServicePortMetrics>,
    pub(super) pool: Arc<pool::Pool>,
    /// `--max-connections`' cut (shutdown grace over): tunnels end too.
    pub(super) cut: CancellationToken,
    /// Upgraded connections (tunnels), drained at shutdown like
    /// connections.
    pub(super) tunnels: TaskTracker,
    /// Stops [`prune_on_change`] with this port.
    _pruning: DropGuard,
}

impl HttpPort {
    pub fn new(
        service: Arc<ServicePortName>,
        balancer: Arc<Balancer>,
        config: Arc<DataPathConfig>,
        metrics: Arc<ServicePortMetrics>,
        cut: CancellationToken,
        tunnels: TaskTracker,
    ) -> Self {
        let pool = Arc::new(pool::Pool::new(
            config.http.upstream_idle_timeout,
            config.http.max_header_bytes,
            config.upstream_mark,
            Arc::clone(&metrics),
        ));
        let pruning = CancellationToken::new();
        tokio::spawn(prune_on_change(
            Arc::clone(&balancer),
            Arc::downgrade(&pool),
            pruning.clone(),
        ));
        HttpPort {
            service,
            balancer,
            config,
            metrics,
            pool,
            cut,
            tunnels,
            _pruning: pruning.drop_guard(),
        }
    }
}

/// Closes the pool's connections to an endpoint as soon as it leaves the
/// set, instead of at the pool's next request: the pool of an HTTP thread
/// that gets no more requests on this port would keep them open.
/// Connections carrying requests close when those are done.
async fn prune_on_change(balancer: Arc<Balancer>, pool: Weak<pool::Pool>, stop: CancellationToken) {
    loop {
        let changed = balancer.changed().notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        match pool.upgrade() {
            Some(pool) => pool.prune(&balancer.endpoints()),
            None => return,
        }
        tokio::select! {
            _ = changed => {}
            _ = stop.cancelled() => return,
        }
    }
}

impl HttpPort {
    pub fn service(&self) -> &Arc<ServicePortName> {
        &self.service
    }
    pub fn balancer(&self) -> &Arc<Balancer> {
        &self.balancer
    }
    pub fn config(&self) -> &Arc<DataPathConfig> {
        &self.config
    }
    pub fn metrics(&self) -> &Arc<ServicePortMetrics> {
        &self.metrics
    }
    pub fn cut(&self) -> &CancellationToken {
        &self.cut
    }
}
