//! Desired state from the Kubernetes API, through kube-rs watchers.
//!
//! Two watchers (Services, EndpointSlices) in all namespaces, with
//! kube-proxy's label selector. A watcher's initial list, and every relist
//! after a dropped watch or a `410 Gone`, arrives as `Init … InitDone`; we
//! buffer it and send it as one full replacement, so objects deleted while
//! the watch was down disappear and everything else stays untouched (rules
//! and open connections included). Notices (fields not honoured yet, bad
//! endpoints skipped) are logged once per object, not at every relist.

use std::collections::HashSet;
use std::fmt::Debug;
use std::path::PathBuf;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::convert::{Accepted, PROXY_LABEL_SELECTOR};
use super::{NoticeLog, Update, UpdateSender, node_or_log, service_or_log, slice_or_log};
use crate::client_metrics::{ApiClientLayer, ApiClientMetrics};
use crate::model::ObjectKey;

/// The API cannot be reached or configured.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error(
        "cannot infer a Kubernetes client config (no in-cluster environment, KUBECONFIG or ~/.kube/config): {0}"
    )]
    Infer(#[from] kube::config::InferConfigError),
    #[error("cannot create a Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// Builds a client from `--kubeconfig`, or infers one (in-cluster, then
/// KUBECONFIG / ~/.kube/config) when no path is given. Every request it
/// sends is counted and timed into `metrics` (client-go's
/// `rest_client_*`, which kube-proxy's dashboards read).
pub async fn client(
    kubeconfig: Option<PathBuf>,
    metrics: ApiClientMetrics,
) -> Result<Client, KubeSourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc =
                Kubeconfig::read_from(&path).map_err(|source| KubeSourceError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| KubeSourceError::Kubeconfig { path, source })?
        }
        None => kube::Config::infer().await?,
    };
    // client-go's `host` label: the server's host:port as the URL has it.
    let host = config
        .cluster_url
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_default();
    let builder = kube::client::ClientBuilder::try_from(config)?;
    Ok(builder
        .with_layer(&ApiClientLayer::new(metrics, host))
        .build())
}

/// What the generic watch loop needs to know about a kind.
trait Watched: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static {
    type Info: Send;
    const KIND: &'static str;
    /// Whether objects of the kind live in a namespace (a Node does not).
    const NAMESPACED: bool = true;
    fn convert(&self) -> Option<Accepted<Self::Info>>;
    fn key(info: &Self::Info) -> &ObjectKey;
    fn full(items: Vec<Self::Info>) -> Update;
    fn applied(info: Self::Info) -> Update;
    fn deleted(key: ObjectKey) -> Update;
}

impl Watched for Service {
    type Info = crate::model::ServiceInfo;
    const KIND: &'static str = "Service";
    fn convert(&self) -> Option<Accepted<Self::Info>> {
        service_or_log(self)
    }
    fn key(info: &Self::Info) -> &ObjectKey {
        &info.key
    }
    fn full(items: Vec<Self::Info>) -> Update {
        Update::Services(items.into_iter().map(std::sync::Arc::new).collect())
    }
    fn applied(info: Self::Info) -> Update {
        Update::ServiceApplied(std::sync::Arc::new(info))
    }
    fn deleted(key: ObjectKey) -> Update {
        Update::ServiceDeleted(key)
    }
}

impl Watched for EndpointSlice {
    type Info = crate::model::SliceInfo;
    const KIND: &'static str = "EndpointSlice";
    fn convert(&self) -> Option<Accepted<Self::Info>> {
        slice_or_log(self)
    }
    fn key(info: &Self::Info) -> &ObjectKey {
        &info.key
    }
    fn full(items: Vec<Self::Info>) -> Update {
        Update::Slices(items.into_iter().map(std::sync::Arc::new).collect())
    }
    fn applied(info: Self::Info) -> Update {
        Update::SliceApplied(std::sync::Arc::new(info))
    }
    fn deleted(key: ObjectKey) -> Update {
        Update::SliceDeleted(key)
    }
}

impl Watched for Node {
    type Info = crate::model::NodeInfo;
    const KIND: &'static str = "Node";
    const NAMESPACED: bool = false;
    fn convert(&self) -> Option<Accepted<Self::Info>> {
        node_or_log(self)
    }
    fn key(info: &Self::Info) -> &ObjectKey {
        &info.key
    }
    fn full(items: Vec<Self::Info>) -> Update {
        Update::Nodes(items)
    }
    fn applied(info: Self::Info) -> Update {
        Update::NodeApplied(info)
    }
    fn deleted(key: ObjectKey) -> Update {
        Update::NodeDeleted(key)
    }
}

fn key_of<K: Watched>(obj: &K) -> Option<ObjectKey> {
    let meta = obj.meta();
    // A Node has no namespace; the model keys it with an empty one.
    let namespace = match K::NAMESPACED {
        true => meta.namespace.as_deref().unwrap_or("default"),
        false => "",
    };
    Some(ObjectKey::new(namespace, meta.name.as_deref()?))
}

/// Watches Services, EndpointSlices and this node's Node object (named
/// `node_name`, as kube-proxy: a field selector on its name) until
/// `cancel` fires.
pub async fn run(client: Client, node_name: &str, tx: UpdateSender, cancel: CancellationToken) {
    let selected = || watcher::Config::default().labels(PROXY_LABEL_SELECTOR);
    let services = watch(
        Api::<Service>::all(client.clone()),
        selected(),
        tx.clone(),
        cancel.clone(),
    );
    let slices = watch(
        Api::<EndpointSlice>::all(client.clone()),
        selected(),
        tx.clone(),
        cancel.clone(),
    );
    let node = watch(
        Api::<Node>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        tx,
        cancel,
    );
    tokio::join!(services, slices, node);
}

async fn watch<K>(api: Api<K>, config: watcher::Config, tx: UpdateSender, cancel: CancellationToken)
where
    K: Watched,
    K::DynamicType: Default,
{
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let mut events = EventHandler::<K>::new();
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return,
            ev = stream.next() => ev,
        };
        let update = match event {
            None => return,
            Some(Err(e)) => {
                warn!(kind = K::KIND, error = %e, "watch failed; retrying with backoff");
                continue;
            }
            Some(Ok(event)) => match events.handle(event) {
                Some(update) => update,
                None => continue,
            },
        };
        if tx.send(update).await.is_err() {
            return;
        }
    }
}

/// Turns one kind's watcher events into updates: buffers a list until it
/// is complete, converts objects, and logs their notices once per object.
struct EventHandler<K: Watched> {
    /// The list in progress (between `Init` and `InitDone`).
    initial: Vec<K::Info>,
    /// Lists completed, for the log.
    lists: u64,
    notices: NoticeLog,
}

impl<K: Watched> EventHandler<K> {
    fn new() -> Self {
        EventHandler {
            initial: Vec::new(),
            lists: 0,
            notices: NoticeLog::new(K::KIND),
        }
    }

    /// Converts an object and logs its notices (those not logged yet).
    fn accept(&mut self, obj: &K) -> Option<K::Info> {
        let accepted = obj.convert()?;
        self.notices.log(K::key(&accepted.info), &accepted.notices);
        Some(accepted.info)
    }

    /// The update an event makes, if any.
    fn handle(&mut self, event: Event<K>) -> Option<Update> {
        match event {
            Event::Init => {
                self.initial.clear();
                None
            }
            Event::InitApply(obj) => {
                if let Some(info) = self.accept(&obj) {
                    self.initial.push(info);
                }
                None
            }
            Event::InitDone => {
                self.lists += 1;
                info!(
                    kind = K::KIND,
                    objects = self.initial.len(),
                    list = self.lists,
                    "listed"
                );
                // Objects deleted while the watch was down are not listed:
                // forget them, as a delete event would have.
                let listed: HashSet<&ObjectKey> = self.initial.iter().map(K::key).collect();
                self.notices.retain(|k| listed.contains(k));
                Some(K::full(std::mem::take(&mut self.initial)))
            }
            Event::Apply(obj) => match self.accept(&obj) {
                Some(info) => Some(K::applied(info)),
                // Now invalid or no longer ours: forget any earlier version.
                None => {
                    let key = key_of(&obj)?;
                    self.notices.forget(&key);
                    Some(K::deleted(key))
                }
            },
            Event::Delete(obj) => {
                let key = key_of(&obj)?;
                self.notices.forget(&key);
                Some(K::deleted(key))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::captured_log;
    use serde_json::json;

    /// A Service, with `sessionAffinity` if given (an unknown value makes
    /// a notice).
    fn service(name: &str, affinity: Option<&str>) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}],
                     "sessionAffinity": affinity.unwrap_or("None")}
        }))
        .unwrap()
    }

    /// Feeds one list (Init, InitApply..., InitDone) and returns the log.
    fn relist(h: &mut EventHandler<Service>, objects: &[Service]) -> String {
        captured_log(|| {
            assert!(h.handle(Event::Init).is_none());
            for o in objects {
                assert!(h.handle(Event::InitApply(o.clone())).is_none());
            }
            assert!(matches!(h.handle(Event::InitDone), Some(Update::Services(v)) if v.len() == objects.len()));
        })
        .1
    }

    fn lines_about(log: &str, object: &str) -> usize {
        log.lines().filter(|l| l.contains(object)).count()
    }

    #[test]
    fn a_relisted_unchanged_service_logs_its_notices_once() {
        let mut h = EventHandler::<Service>::new();
        let lb = service("lb", Some("Sticky"));
        let plain = service("plain", None);
        let log = relist(&mut h, &[lb.clone(), plain.clone()]);
        assert_eq!(lines_about(&log, "default/lb"), 1, "{log}");
        assert!(log.contains("spec.sessionAffinity"), "{log}");
        // A relist (a dropped watch, a 410 Gone) and an unchanged event.
        let log = relist(&mut h, &[lb.clone(), plain.clone()]);
        assert_eq!(lines_about(&log, "default/lb"), 0, "{log}");
        let (u, log) = captured_log(|| h.handle(Event::Apply(lb.clone())));
        assert!(matches!(u, Some(Update::ServiceApplied(_))));
        assert_eq!(lines_about(&log, "default/lb"), 0, "{log}");
        // Deleted, then created again: logged again.
        assert!(h.handle(Event::Delete(lb.clone())).is_some());
        assert_eq!(h.notices.remembered(), 0);
        let (_, log) = captured_log(|| h.handle(Event::Apply(lb.clone())));
        assert_eq!(lines_about(&log, "default/lb"), 1, "{log}");
        // Deleted while the watch was down: the relist forgets it.
        relist(&mut h, std::slice::from_ref(&plain));
        assert_eq!(h.notices.remembered(), 0);
        let log = relist(&mut h, &[lb, plain]);
        assert_eq!(lines_about(&log, "default/lb"), 1, "{log}");
    }
}
