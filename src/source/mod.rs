//! Where the desired state comes from: the Kubernetes API or manifests files.
//!
//! A source converts objects into the model and sends [`Update`]s down one
//! channel to the reconciler. Both sources speak the same updates, so the
//! rest of the proxy does not know which one it runs with.

pub mod convert;
pub mod kube;
pub mod manifests;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tracing::{debug, warn};

use crate::model::{ObjectKey, ServiceInfo, SliceInfo};

/// A change to the desired state.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// The complete set of Services (initial list, relist, manifests reload).
    /// The first one also says the Services are synced.
    Services(Vec<ServiceInfo>),
    /// The complete set of EndpointSlices; see [`Update::Services`].
    Slices(Vec<SliceInfo>),
    ServiceApplied(ServiceInfo),
    ServiceDeleted(ObjectKey),
    SliceApplied(SliceInfo),
    SliceDeleted(ObjectKey),
}

/// The sending end sources write to.
pub type UpdateSender = tokio::sync::mpsc::Sender<Update>;

/// Converts a Service, logging why it is skipped or invalid.
pub fn service_or_log(svc: &Service) -> Option<ServiceInfo> {
    match convert::service(svc) {
        Ok(Ok(info)) => Some(info),
        Ok(Err(skip)) => {
            debug!(service = ?svc.metadata.name, namespace = ?svc.metadata.namespace, reason = ?skip, "service not proxied");
            None
        }
        Err(e) => {
            warn!(kind = e.kind, object = %e.object, field = %e.field, "invalid object skipped: {}", e.message);
            None
        }
    }
}

/// Converts an EndpointSlice, logging why it is skipped or invalid.
pub fn slice_or_log(slice: &EndpointSlice) -> Option<SliceInfo> {
    match convert::endpoint_slice(slice) {
        Ok(Ok(info)) => Some(info),
        Ok(Err(skip)) => {
            debug!(slice = ?slice.metadata.name, namespace = ?slice.metadata.namespace, reason = ?skip, "endpoint slice not used");
            None
        }
        Err(e) => {
            warn!(kind = e.kind, object = %e.object, field = %e.field, "invalid object skipped: {}", e.message);
            None
        }
    }
}
