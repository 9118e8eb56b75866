//! Where the desired state comes from: the Kubernetes API or manifests files.
//!
//! A source converts objects into the model and sends [`Update`]s down one
//! channel to the reconciler. Both sources speak the same updates, so the
//! rest of the proxy does not know which one it runs with.

pub mod convert;
pub mod kube;
pub mod manifests;

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tracing::{debug, warn};

use crate::model::{NodeInfo, ObjectKey, ServiceInfo, SliceInfo};
use convert::{Accepted, Notice, Outcome};

/// A change to the desired state.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// The complete set of Services (initial list, relist, manifests reload).
    /// The first one also says the Services are synced.
    ///
    /// Objects are shared (`Arc`): a source that keeps what it sent (the
    /// manifests source) and the model hold one copy between them.
    Services(Vec<Arc<ServiceInfo>>),
    /// The complete set of EndpointSlices; see [`Update::Services`].
    Slices(Vec<Arc<SliceInfo>>),
    ServiceApplied(Arc<ServiceInfo>),
    ServiceDeleted(ObjectKey),
    SliceApplied(Arc<SliceInfo>),
    SliceDeleted(ObjectKey),
    /// The complete set of Node objects the source sees (the API source
    /// watches only this node's; a manifests file may hold several).
    Nodes(Vec<NodeInfo>),
    NodeApplied(NodeInfo),
    NodeDeleted(ObjectKey),
}

/// The sending end sources write to.
pub type UpdateSender = tokio::sync::mpsc::Sender<Update>;

/// Converts a Service, logging why it is skipped or invalid. Its notices
/// are left to the caller, which logs them through a [`NoticeLog`] so that
/// a relist does not repeat them.
pub fn service_or_log(svc: &Service) -> Option<Accepted<ServiceInfo>> {
    match convert::service(svc) {
        Ok(Outcome::Accepted(accepted)) => Some(accepted),
        Ok(Outcome::Skipped(skip)) => {
            debug!(service = ?svc.metadata.name, namespace = ?svc.metadata.namespace, reason = ?skip, "service not proxied");
            None
        }
        Err(e) => {
            warn!(kind = e.kind, object = %e.object, field = %e.field, "invalid object skipped: {}", e.message);
            None
        }
    }
}

/// Converts an EndpointSlice, logging why it is skipped or invalid; see
/// [`service_or_log`] for its notices.
pub fn slice_or_log(slice: &EndpointSlice) -> Option<Accepted<SliceInfo>> {
    match convert::endpoint_slice(slice) {
        Ok(Outcome::Accepted(accepted)) => Some(accepted),
        Ok(Outcome::Skipped(skip)) => {
            debug!(slice = ?slice.metadata.name, namespace = ?slice.metadata.namespace, reason = ?skip, "endpoint slice not used");
            None
        }
        Err(e) => {
            warn!(kind = e.kind, object = %e.object, field = %e.field, "invalid object skipped: {}", e.message);
            None
        }
    }
}

/// Converts a Node, logging why it is invalid; see [`service_or_log`]
/// for its notices.
pub fn node_or_log(node: &Node) -> Option<Accepted<NodeInfo>> {
    match convert::node(node) {
        Ok(accepted) => Some(accepted),
        Err(e) => {
            warn!(kind = e.kind, object = %e.object, field = %e.field, "invalid object skipped: {}", e.message);
            None
        }
    }
}

/// Logs the [`Notice`]s of each object once. Sources see the same object
/// again and again (a watch relist, a resync, a manifests file re-read
/// because a neighbour changed); repeating "externalIPs not served" at each
/// of them would bury everything else. An object logs a notice when it
/// first has it; an object whose notices change logs only the new ones.
///
/// Memory: one fingerprint per notice of each object that has notices now.
/// An object is forgotten when it is deleted, dropped by a full list, or
/// left with no notices, so the memory follows the objects alive, not the
/// history; and one created again logs its notices again.
#[derive(Debug)]
pub struct NoticeLog {
    /// `Service` or `EndpointSlice`: the kind every key here is of.
    kind: &'static str,
    /// Fingerprints of the notices last logged, per object.
    logged: HashMap<ObjectKey, Vec<u64>>,
}

impl NoticeLog {
    pub fn new(kind: &'static str) -> Self {
        NoticeLog {
            kind,
            logged: HashMap::new(),
        }
    }

    /// Logs the notices of `key` that were not logged for it last time;
    /// returns how many it logged. `notices` are all the object has now.
    pub fn log(&mut self, key: &ObjectKey, notices: &[Notice]) -> usize {
        if notices.is_empty() {
            self.logged.remove(key);
            return 0;
        }
        let prints: Vec<u64> = notices.iter().map(fingerprint).collect();
        let before = self.logged.get(key).map(Vec::as_slice).unwrap_or_default();
        let mut count = 0;
        for (notice, print) in notices.iter().zip(&prints) {
            if !before.contains(print) {
                warn!(kind = self.kind, object = %key, field = %notice.field, "{}", notice.message);
                count += 1;
            }
        }
        self.logged.insert(key.clone(), prints);
        count
    }

    /// The object is gone: if it comes back, its notices are logged again.
    pub fn forget(&mut self, key: &ObjectKey) {
        self.logged.remove(key);
    }

    /// Forgets every object `alive` says is gone (after a full list).
    pub fn retain(&mut self, mut alive: impl FnMut(&ObjectKey) -> bool) {
        self.logged.retain(|k, _| alive(k));
    }

    /// How many objects it remembers.
    pub fn remembered(&self) -> usize {
        self.logged.len()
    }
}

/// A notice's identity for [`NoticeLog`]: 8 bytes instead of its text. Only
/// compared within one process, so the hasher's unspecified algorithm does
/// not matter; a collision would only hide one log line.
fn fingerprint(n: &Notice) -> u64 {
    let mut h = DefaultHasher::new();
    n.hash(&mut h);
    h.finish()
}

/// Captures what is logged while a test runs some code on its own thread.
#[cfg(test)]
pub(crate) fn captured_log<T>(f: impl FnOnce() -> T) -> (T, String) {
    use std::sync::{Arc, Mutex};
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    (out, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(field: &str) -> Notice {
        Notice {
            field: field.into(),
            message: "not honoured yet".into(),
        }
    }

    #[test]
    fn notices_are_logged_once_per_object_and_forgotten_with_it() {
        let mut log = NoticeLog::new("Service");
        let web = ObjectKey::new("default", "web");
        let db = ObjectKey::new("default", "db");
        let (a, b) = (notice("spec.externalIPs"), notice("spec.sessionAffinity"));
        assert_eq!(log.log(&web, std::slice::from_ref(&a)), 1);
        assert_eq!(
            log.log(&web, std::slice::from_ref(&a)),
            0,
            "sent again unchanged"
        );
        assert_eq!(
            log.log(&web, &[a.clone(), b.clone()]),
            1,
            "only the new one"
        );
        assert_eq!(log.log(&db, std::slice::from_ref(&a)), 1, "per object");
        assert_eq!(log.log(&db, &[]), 0);
        assert_eq!(log.remembered(), 1, "no notices left, nothing kept");
        assert_eq!(log.log(&db, std::slice::from_ref(&a)), 1, "came back");
        log.forget(&web);
        assert_eq!(
            log.log(&web, &[a.clone(), b.clone()]),
            2,
            "deleted and created again"
        );
        log.retain(|k| k == &web);
        assert_eq!(log.remembered(), 1);
        let (n, text) = captured_log(|| log.log(&db, &[b]));
        assert_eq!(n, 1);
        assert!(
            text.contains("default/db") && text.contains("spec.sessionAffinity"),
            "{text}"
        );
    }
}
