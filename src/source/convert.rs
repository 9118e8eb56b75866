//! Kubernetes objects → model, with validation.
//!
//! Both sources (the API and manifests files) go through these functions,
//! so an object means the same thing wherever it came from. An invalid object
//! yields an [`InvalidObject`] naming the object and the field at fault; the
//! caller logs it and skips that one object.

use std::collections::HashSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::model::{
    Algorithm, ObjectKey, PortSpec, Protocol, ServiceInfo, SliceEndpoint, SliceInfo, SlicePort,
};

/// Label that hands a Service to another proxy (kube-proxy skips these).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label on headless Services' objects (kube-proxy skips these).
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Label naming the Service an EndpointSlice belongs to.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// kube-proxy's informer label selector; we use the same.
pub const PROXY_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
/// Per-Service choice of balancing algorithm.
pub const ANNOTATION_LB_ALGORITHM: &str = "kube-uproxy.io/lb-algorithm";

/// An object the proxy cannot use, with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {object}: {field}: {message}")]
pub struct InvalidObject {
    /// `Service` or `EndpointSlice`.
    pub kind: &'static str,
    /// `namespace/name`, or what is known of it.
    pub object: String,
    /// The path of the bad field, e.g. `spec.ports[1].port`.
    pub field: String,
    pub message: String,
}

/// Why a valid object is not proxied (not an error; logged at debug).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    Headless,
    ExternalName,
    NoClusterIp,
    Labelled(&'static str),
    NoServiceLabel,
    FqdnAddresses,
}

/// The outcome of converting one object.
pub type Converted<T> = Result<Result<T, Skip>, InvalidObject>;

fn object_name(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("<unnamed>")
    )
}

fn key_of(kind: &'static str, meta: &ObjectMeta) -> Result<ObjectKey, InvalidObject> {
    let name = meta
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| InvalidObject {
            kind,
            object: object_name(meta),
            field: "metadata.name".into(),
            message: "missing".into(),
        })?;
    Ok(ObjectKey::new(
        meta.namespace.as_deref().unwrap_or("default"),
        name,
    ))
}

fn has_label(meta: &ObjectMeta, label: &str) -> bool {
    meta.labels.as_ref().is_some_and(|l| l.contains_key(label))
}

fn parse_port(value: i32) -> Option<u16> {
    u16::try_from(value).ok().filter(|p| *p != 0)
}

/// Converts a Service. `default_algorithm` is not applied here: `None` in the
/// result means "use the global default".
pub fn service(svc: &Service) -> Converted<ServiceInfo> {
    const KIND: &str = "Service";
    let meta = &svc.metadata;
    let key = key_of(KIND, meta)?;
    let bad = |field: String, message: String| InvalidObject {
        kind: KIND,
        object: key.to_string(),
        field,
        message,
    };
    for label in [LABEL_SERVICE_PROXY_NAME, LABEL_HEADLESS] {
        if has_label(meta, label) {
            return Ok(Err(Skip::Labelled(label)));
        }
    }
    let spec = svc
        .spec
        .as_ref()
        .ok_or_else(|| bad("spec".into(), "missing".into()))?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(Err(Skip::ExternalName));
    }

    // clusterIPs is authoritative when set; clusterIP is its first element.
    let raw_ips: Vec<(String, &str)> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.as_str()))
            .collect(),
        _ => spec
            .cluster_ip
            .iter()
            .map(|ip| ("spec.clusterIP".to_string(), ip.as_str()))
            .collect(),
    };
    if raw_ips.iter().any(|(_, ip)| *ip == "None") {
        return Ok(Err(Skip::Headless));
    }
    let mut cluster_ips = Vec::new();
    for (field, raw) in raw_ips {
        if raw.is_empty() {
            continue;
        }
        let ip: IpAddr = raw
            .parse()
            .map_err(|_| bad(field.clone(), format!("invalid IP address {raw:?}")))?;
        if ip.is_unspecified() {
            return Err(bad(field, format!("unspecified address {raw:?}")));
        }
        cluster_ips.push(ip);
    }
    if cluster_ips.is_empty() {
        return Ok(Err(Skip::NoClusterIp));
    }

    let raw_ports = spec.ports.as_deref().unwrap_or_default();
    let mut ports = Vec::with_capacity(raw_ports.len());
    let mut seen_names = HashSet::new();
    let mut seen_numbers = HashSet::new();
    for (i, p) in raw_ports.iter().enumerate() {
        let name = p.name.clone().unwrap_or_default();
        let protocol: Protocol = p
            .protocol
            .as_deref()
            .unwrap_or("TCP")
            .parse()
            .map_err(|e| bad(format!("spec.ports[{i}].protocol"), e))?;
        let port = parse_port(p.port).ok_or_else(|| {
            bad(
                format!("spec.ports[{i}].port"),
                format!("{} is not a port number (1-65535)", p.port),
            )
        })?;
        if !seen_names.insert((name.clone(), protocol)) {
            return Err(bad(
                format!("spec.ports[{i}].name"),
                if name.is_empty() {
                    "several ports without a name".to_string()
                } else {
                    format!("duplicate port name {name:?}")
                },
            ));
        }
        if !seen_numbers.insert((port, protocol)) {
            return Err(bad(
                format!("spec.ports[{i}].port"),
                format!("duplicate port {port}/{protocol}"),
            ));
        }
        ports.push(PortSpec {
            name,
            protocol,
            port,
        });
    }

    let algorithm = match meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_LB_ALGORITHM))
    {
        None => None,
        Some(raw) => Some(raw.parse::<Algorithm>().map_err(|e| {
            bad(
                format!("metadata.annotations[{ANNOTATION_LB_ALGORITHM}]"),
                e,
            )
        })?),
    };

    Ok(Ok(ServiceInfo {
        key,
        cluster_ips,
        ports,
        algorithm,
    }))
}

/// Converts an EndpointSlice.
pub fn endpoint_slice(slice: &EndpointSlice) -> Converted<SliceInfo> {
    const KIND: &str = "EndpointSlice";
    let meta = &slice.metadata;
    let key = key_of(KIND, meta)?;
    let bad = |field: String, message: String| InvalidObject {
        kind: KIND,
        object: key.to_string(),
        field,
        message,
    };
    if has_label(meta, LABEL_SERVICE_PROXY_NAME) {
        return Ok(Err(Skip::Labelled(LABEL_SERVICE_PROXY_NAME)));
    }
    if has_label(meta, LABEL_HEADLESS) {
        return Ok(Err(Skip::Labelled(LABEL_HEADLESS)));
    }
    let Some(service_name) = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_NAME))
        .filter(|n| !n.is_empty())
    else {
        return Ok(Err(Skip::NoServiceLabel));
    };
    match slice.address_type.as_str() {
        "IPv4" | "IPv6" => {}
        "FQDN" => return Ok(Err(Skip::FqdnAddresses)),
        other => {
            return Err(bad(
                "addressType".into(),
                format!("unknown address type {other:?}"),
            ));
        }
    }

    let raw_ports = slice.ports.as_deref().unwrap_or_default();
    let mut ports = Vec::with_capacity(raw_ports.len());
    for (i, p) in raw_ports.iter().enumerate() {
        let protocol: Protocol = p
            .protocol
            .as_deref()
            .unwrap_or("TCP")
            .parse()
            .map_err(|e| bad(format!("ports[{i}].protocol"), e))?;
        let Some(raw) = p.port else {
            // A nil port means "all ports", which only headless Services use.
            continue;
        };
        let port = parse_port(raw).ok_or_else(|| {
            bad(
                format!("ports[{i}].port"),
                format!("{raw} is not a port number (1-65535)"),
            )
        })?;
        ports.push(SlicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol,
            port,
        });
    }

    let raw_endpoints = slice.endpoints.as_deref().unwrap_or_default();
    let mut endpoints = Vec::with_capacity(raw_endpoints.len());
    for (i, ep) in raw_endpoints.iter().enumerate() {
        // Like kube-proxy, only the first address of an endpoint is used.
        let Some(raw) = ep.addresses.first() else {
            return Err(bad(
                format!("endpoints[{i}].addresses"),
                "no address".into(),
            ));
        };
        let address: IpAddr = raw.parse().map_err(|_| {
            bad(
                format!("endpoints[{i}].addresses[0]"),
                format!("invalid IP address {raw:?}"),
            )
        })?;
        let wrong_family = match slice.address_type.as_str() {
            "IPv4" => !address.is_ipv4(),
            _ => !address.is_ipv6(),
        };
        if wrong_family {
            return Err(bad(
                format!("endpoints[{i}].addresses[0]"),
                format!("{raw} is not an {} address", slice.address_type),
            ));
        }
        let cond = ep.conditions.as_ref();
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        endpoints.push(SliceEndpoint {
            address,
            ready,
            serving: cond.and_then(|c| c.serving).unwrap_or(ready),
            terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
            node_name: ep.node_name.clone(),
        });
    }

    Ok(Ok(SliceInfo {
        service: ObjectKey::new(key.namespace.clone(), service_name.clone()),
        key,
        ports,
        endpoints,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).unwrap()
    }

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn converts_a_plain_service() {
        let s = service(&svc(json!({
            "metadata": {"name": "web", "namespace": "shop",
                         "annotations": {"kube-uproxy.io/lb-algorithm": "least-connections"}},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                               {"name": "dns", "port": 53, "protocol": "UDP"}]}
        })))
        .unwrap()
        .unwrap();
        assert_eq!(s.key, ObjectKey::new("shop", "web"));
        assert_eq!(s.cluster_ips, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(s.ports.len(), 2);
        assert_eq!(s.ports[1].protocol, Protocol::Udp);
        assert_eq!(s.algorithm, Some(Algorithm::LeastConnections));
    }

    #[test]
    fn skips_what_kube_proxy_skips() {
        let base = |extra: serde_json::Value| {
            let mut v = json!({"metadata": {"name": "x"}, "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}});
            merge(&mut v, extra);
            service(&svc(v)).unwrap().unwrap_err()
        };
        assert_eq!(base(json!({"spec": {"clusterIP": "None"}})), Skip::Headless);
        assert_eq!(
            base(json!({"spec": {"type": "ExternalName"}})),
            Skip::ExternalName
        );
        assert_eq!(base(json!({"spec": {"clusterIP": ""}})), Skip::NoClusterIp);
        assert_eq!(
            base(
                json!({"metadata": {"labels": {"service.kubernetes.io/service-proxy-name": "other"}}})
            ),
            Skip::Labelled(LABEL_SERVICE_PROXY_NAME)
        );
    }

    #[test]
    fn invalid_services_name_the_field() {
        let err = |v: serde_json::Value| service(&svc(v)).unwrap_err();
        let e = err(json!({"metadata": {"name": "web", "namespace": "a"},
                           "spec": {"clusterIP": "10.96.0.300", "ports": [{"port": 80}]}}));
        assert_eq!(e.object, "a/web");
        assert_eq!(e.field, "spec.clusterIP");
        let e = err(json!({"metadata": {"name": "web"},
                           "spec": {"clusterIP": "10.96.0.3", "ports": [{"port": 0}]}}));
        assert_eq!(e.field, "spec.ports[0].port");
        let e = err(json!({"metadata": {"name": "web"},
                           "spec": {"clusterIP": "10.96.0.3", "ports": [{"port": 70000}]}}));
        assert_eq!(e.field, "spec.ports[0].port");
        let e = err(json!({"metadata": {"name": "web"},
                           "spec": {"clusterIP": "10.96.0.3",
                                    "ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]}}));
        assert_eq!(e.field, "spec.ports[1].name");
        let e = err(json!({"metadata": {"name": "web"}}));
        assert_eq!(e.field, "spec");
        let e = err(json!({"metadata": {}, "spec": {}}));
        assert_eq!(e.field, "metadata.name");
        assert!(e.to_string().contains("metadata.name"));
    }

    #[test]
    fn converts_endpoint_slices_with_conditions() {
        let s = endpoint_slice(&slice(json!({
            "metadata": {"name": "web-abc", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.1.0.1"]},
                {"addresses": ["10.1.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}}
            ]
        })))
        .unwrap()
        .unwrap();
        assert_eq!(s.service, ObjectKey::new("shop", "web"));
        assert!(s.endpoints[0].ready && s.endpoints[0].serving && !s.endpoints[0].terminating);
        assert!(!s.endpoints[1].ready && s.endpoints[1].serving && s.endpoints[1].terminating);
    }

    #[test]
    fn invalid_slices_name_the_field() {
        let e = endpoint_slice(&slice(json!({
            "metadata": {"name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": [{"addresses": ["10.1.0.1"]}, {"addresses": ["nope"]}]
        })))
        .unwrap_err();
        assert_eq!(e.field, "endpoints[1].addresses[0]");
        assert_eq!(e.object, "default/web-abc");
        let e = endpoint_slice(&slice(json!({
            "metadata": {"name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": [{"addresses": ["fd00::1"]}]
        })))
        .unwrap_err();
        assert_eq!(e.field, "endpoints[0].addresses[0]");
        let s = endpoint_slice(&slice(json!({
            "metadata": {"name": "web-abc"}, "addressType": "IPv4", "endpoints": []
        })))
        .unwrap();
        assert_eq!(s, Err(Skip::NoServiceLabel));
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }
}
