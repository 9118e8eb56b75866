//! Desired state from the Kubernetes API, through kube-rs watchers.
//!
//! Two watchers (Services, EndpointSlices) in all namespaces, with
//! kube-proxy's label selector. A watcher's initial list, and every relist
//! after a dropped watch or a `410 Gone`, arrives as `Init … InitDone`; we
//! buffer it and send it as one full replacement, so objects deleted while
//! the watch was down disappear and everything else stays untouched (rules
//! and open connections included).

use std::fmt::Debug;
use std::path::PathBuf;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::convert::PROXY_LABEL_SELECTOR;
use super::{Update, UpdateSender, service_or_log, slice_or_log};
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
/// KUBECONFIG / ~/.kube/config) when no path is given.
pub async fn client(kubeconfig: Option<PathBuf>) -> Result<Client, KubeSourceError> {
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
    Ok(Client::try_from(config)?)
}

/// What the generic watch loop needs to know about a kind.
trait Watched: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static {
    type Info: Send;
    const KIND: &'static str;
    fn convert(&self) -> Option<Self::Info>;
    fn full(items: Vec<Self::Info>) -> Update;
    fn applied(info: Self::Info) -> Update;
    fn deleted(key: ObjectKey) -> Update;
}

impl Watched for Service {
    type Info = crate::model::ServiceInfo;
    const KIND: &'static str = "Service";
    fn convert(&self) -> Option<Self::Info> {
        service_or_log(self)
    }
    fn full(items: Vec<Self::Info>) -> Update {
        Update::Services(items)
    }
    fn applied(info: Self::Info) -> Update {
        Update::ServiceApplied(info)
    }
    fn deleted(key: ObjectKey) -> Update {
        Update::ServiceDeleted(key)
    }
}

impl Watched for EndpointSlice {
    type Info = crate::model::SliceInfo;
    const KIND: &'static str = "EndpointSlice";
    fn convert(&self) -> Option<Self::Info> {
        slice_or_log(self)
    }
    fn full(items: Vec<Self::Info>) -> Update {
        Update::Slices(items)
    }
    fn applied(info: Self::Info) -> Update {
        Update::SliceApplied(info)
    }
    fn deleted(key: ObjectKey) -> Update {
        Update::SliceDeleted(key)
    }
}

fn key_of<K: Resource>(obj: &K) -> Option<ObjectKey> {
    let meta = obj.meta();
    Some(ObjectKey::new(
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref()?,
    ))
}

/// Watches Services and EndpointSlices until `cancel` fires.
pub async fn run(client: Client, tx: UpdateSender, cancel: CancellationToken) {
    let services = watch(
        Api::<Service>::all(client.clone()),
        tx.clone(),
        cancel.clone(),
    );
    let slices = watch(Api::<EndpointSlice>::all(client), tx, cancel);
    tokio::join!(services, slices);
}

async fn watch<K>(api: Api<K>, tx: UpdateSender, cancel: CancellationToken)
where
    K: Watched,
    K::DynamicType: Default,
{
    let config = watcher::Config::default().labels(PROXY_LABEL_SELECTOR);
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let mut initial: Vec<K::Info> = Vec::new();
    let mut lists = 0u64;
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
            Some(Ok(Event::Init)) => {
                initial.clear();
                continue;
            }
            Some(Ok(Event::InitApply(obj))) => {
                if let Some(info) = obj.convert() {
                    initial.push(info);
                }
                continue;
            }
            Some(Ok(Event::InitDone)) => {
                lists += 1;
                info!(
                    kind = K::KIND,
                    objects = initial.len(),
                    list = lists,
                    "listed"
                );
                K::full(std::mem::take(&mut initial))
            }
            Some(Ok(Event::Apply(obj))) => match obj.convert() {
                Some(info) => K::applied(info),
                // Now invalid or no longer ours: forget any earlier version.
                None => match key_of(&obj) {
                    Some(key) => K::deleted(key),
                    None => continue,
                },
            },
            Some(Ok(Event::Delete(obj))) => match key_of(&obj) {
                Some(key) => K::deleted(key),
                None => continue,
            },
        };
        if tx.send(update).await.is_err() {
            return;
        }
    }
}
