//! Kubernetes objects → model, with validation.
//!
//! Both sources (the API and manifests files) go through these functions,
//! so an object means the same thing wherever it came from. An invalid object
//! yields an [`InvalidObject`] naming the object and the field at fault; the
//! caller logs it and skips that one object.
//!
//! Tolerant where a smaller loss is right: a bad value of our own annotation
//! falls back to the default, a bad endpoint address skips that endpoint,
//! and fields the proxy does not honour yet are used as if absent. Each of
//! these comes back as a [`Notice`] with the object, for the caller to log
//! once per object (`super::NoticeLog`).

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::model::{
    Algorithm, BalanceOverride, ForwardedHeaders, IpFamily, NodeInfo, ObjectKey, PortMode,
    PortSpec, Protocol, ProxyProtocol, ServiceInfo, SessionAffinity, SliceEndpoint, SliceInfo,
    SlicePort,
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
/// Per-Service choice of per-request or per-connection balancing, over
/// each port's `appProtocol`.
pub const ANNOTATION_BALANCE: &str = "kube-uproxy.io/balance";
/// Per-Service PROXY protocol header toward the endpoints: `v1` or `v2`.
pub const ANNOTATION_PROXY_PROTOCOL: &str = "kube-uproxy.io/proxy-protocol";
/// Per-Service `X-Forwarded-For` and `Forwarded` on requests of ports in
/// request mode: `true` (replace the client's) or `append` (trust them).
pub const ANNOTATION_FORWARDED_HEADERS: &str = "kube-uproxy.io/forwarded-headers";
/// Per-Service choice of connecting to this node's endpoints from the
/// client's own address (`"true"`) or from the proxy's (`"false"`), over
/// the default the traffic policies give.
pub const ANNOTATION_PRESERVE_CLIENT_IP: &str = "kube-uproxy.io/preserve-client-ip";
/// Asks the EndpointSlice controller for topology hints (Kubernetes 1.27+).
pub const ANNOTATION_TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
/// The older name of [`ANNOTATION_TOPOLOGY_MODE`].
pub const ANNOTATION_TOPOLOGY_AWARE_HINTS: &str = "service.kubernetes.io/topology-aware-hints";
/// The Node label naming its zone.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// The taint the cluster autoscaler puts on a Node it is about to delete.
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";
/// At most this many skipped endpoints of one slice are named one by one;
/// the rest are counted in one more notice, so that a slice full of bad
/// addresses costs a few log lines, not thousands.
const MAX_ENDPOINT_NOTICES: usize = 8;

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

/// Something a valid object asks that the proxy does not do: a field it
/// does not honour yet, a value it replaced by the default, an endpoint it
/// skipped. The object is used without it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Notice {
    /// The path of the field, as in [`InvalidObject`].
    pub field: String,
    /// What the proxy does instead.
    pub message: String,
}

impl Notice {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Notice {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// An object the proxy uses, reduced to the model, with its notices.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted<T> {
    pub info: T,
    /// Empty for an object used exactly as it asks.
    pub notices: Vec<Notice>,
}

/// What converting a valid object gives: the object, or why the proxy
/// leaves it alone. (An invalid object is the `Err` of the conversion.)
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<T> {
    /// Used, reduced to the model.
    Accepted(Accepted<T>),
    /// Valid but not proxied (not an error).
    Skipped(Skip),
}

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
pub fn service(svc: &Service) -> Result<Outcome<ServiceInfo>, InvalidObject> {
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
            return Ok(Outcome::Skipped(Skip::Labelled(label)));
        }
    }
    let spec = svc
        .spec
        .as_ref()
        .ok_or_else(|| bad("spec".into(), "missing".into()))?;
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    if type_ == "ExternalName" {
        return Ok(Outcome::Skipped(Skip::ExternalName));
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
        return Ok(Outcome::Skipped(Skip::Headless));
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
        return Ok(Outcome::Skipped(Skip::NoClusterIp));
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
        // The API server only allocates node ports for these types; a
        // stray value elsewhere is not served.
        let node_port = match p.node_port {
            Some(n) if matches!(type_, "NodePort" | "LoadBalancer") => {
                Some(parse_port(n).ok_or_else(|| {
                    bad(
                        format!("spec.ports[{i}].nodePort"),
                        format!("{n} is not a port number (1-65535)"),
                    )
                })?)
            }
            _ => None,
        };
        ports.push(PortSpec {
            name,
            protocol,
            port,
            node_port,
            app_protocol: p.app_protocol.clone(),
        });
    }

    let mut notices = unhonoured(svc, &ports);
    let session_affinity = session_affinity(spec, &mut notices);
    let internal_local = match spec.internal_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            notices.push(Notice::new(
                "spec.internalTrafficPolicy",
                format!("unknown policy {other:?}; Cluster is used"),
            ));
            false
        }
    };
    let external_policy_local = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            notices.push(Notice::new(
                "spec.externalTrafficPolicy",
                format!("unknown policy {other:?}; Cluster is used"),
            ));
            false
        }
    };
    // As kube-proxy: the external policy matters only for a Service that
    // can be reached from outside.
    let externally_accessible = matches!(type_, "NodePort" | "LoadBalancer")
        || spec.external_ips.as_ref().is_some_and(|v| !v.is_empty());
    let external_local = external_policy_local && externally_accessible;
    let health_check_node_port = match spec.health_check_node_port {
        Some(p) if external_local => match parse_port(p) {
            Some(p) => Some(p),
            None => {
                notices.push(Notice::new(
                    "spec.healthCheckNodePort",
                    format!("{p} is not a port number (1-65535); no health check is served"),
                ));
                None
            }
        },
        _ => None,
    };
    let external_ips = addresses(
        spec.external_ips
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, ip)| (format!("spec.externalIPs[{i}]"), ip.as_str())),
        &mut notices,
    );
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    let lb_ips = addresses(
        ingress
            .into_iter()
            .flatten()
            .enumerate()
            // ipMode Proxy: the load balancer sends its traffic to the node
            // ports itself, with the node as destination (kube-proxy does the
            // same: KEP-1860).
            .filter(|(_, i)| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|(n, i)| {
                i.ip.as_deref()
                    .map(|ip| (format!("status.loadBalancer.ingress[{n}].ip"), ip))
            }),
        &mut notices,
    );
    let mut lb_source_ranges = Vec::new();
    for (i, raw) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        match raw.trim().parse::<ipnet::IpNet>() {
            Ok(net) => lb_source_ranges.push(net.trunc()),
            Err(_) => notices.push(Notice::new(
                format!("spec.loadBalancerSourceRanges[{i}]"),
                format!("{raw:?} is not a CIDR; ignored"),
            )),
        }
    }
    // A typo in our own annotation must not take the Service down: the
    // global default serves it, and the notice says so.
    let algorithm = match annotation(meta, ANNOTATION_LB_ALGORITHM) {
        None => None,
        Some(raw) => match raw.parse::<Algorithm>() {
            Ok(a) => Some(a),
            Err(e) => {
                notices.insert(
                    0,
                    Notice::new(
                        format!("metadata.annotations[{ANNOTATION_LB_ALGORITHM}]"),
                        format!("{e}; the default algorithm is used"),
                    ),
                );
                None
            }
        },
    };

    let balance = match annotation(meta, ANNOTATION_BALANCE) {
        None => None,
        Some(raw) => match raw.parse::<BalanceOverride>() {
            Ok(b) => Some(b),
            Err(e) => {
                notices.insert(
                    0,
                    Notice::new(
                        format!("metadata.annotations[{ANNOTATION_BALANCE}]"),
                        format!("{e}; each port's appProtocol decides"),
                    ),
                );
                None
            }
        },
    };

    let (proxy_protocol, forwarded_headers) = client_address(meta, &ports, balance, &mut notices);
    let preserve_client_ip = match annotation(meta, ANNOTATION_PRESERVE_CLIENT_IP) {
        None => None,
        Some(raw) => match raw.trim() {
            "true" => Some(true),
            "false" => Some(false),
            other => {
                notices.insert(
                    0,
                    Notice::new(
                        format!("metadata.annotations[{ANNOTATION_PRESERVE_CLIENT_IP}]"),
                        format!(
                            "{other:?} is neither \"true\" nor \"false\"; the traffic policies decide"
                        ),
                    ),
                );
                None
            }
        },
    };

    Ok(Outcome::Accepted(Accepted {
        info: ServiceInfo {
            key,
            cluster_ips,
            ports,
            algorithm,
            balance,
            proxy_protocol,
            forwarded_headers,
            external_ips,
            lb_ips,
            lb_source_ranges,
            session_affinity,
            internal_local,
            external_local,
            health_check_node_port,
            preserve_client_ip,
        },
        notices,
    }))
}

/// The annotations that carry the client's address to the endpoints:
/// `kube-uproxy.io/proxy-protocol` and `kube-uproxy.io/forwarded-headers`.
/// A bad value is a notice and means "off" (the endpoints get what they
/// get without the annotation); so is a part the Service's ports cannot
/// have: no PROXY protocol over UDP (HAProxy and nginx accept it on TCP
/// only), no request mode beside the PROXY protocol (see
/// `ServicePortSpec::mode_of`), no headers without request mode.
fn client_address(
    meta: &ObjectMeta,
    ports: &[PortSpec],
    balance: Option<BalanceOverride>,
    notices: &mut Vec<Notice>,
) -> (Option<ProxyProtocol>, ForwardedHeaders) {
    let pp_field = || format!("metadata.annotations[{ANNOTATION_PROXY_PROTOCOL}]");
    let fh_field = || format!("metadata.annotations[{ANNOTATION_FORWARDED_HEADERS}]");
    let proxy_protocol = match annotation(meta, ANNOTATION_PROXY_PROTOCOL) {
        None => None,
        Some(raw) => match raw.parse::<ProxyProtocol>() {
            Ok(v) => Some(v),
            Err(e) => {
                notices.push(Notice::new(pp_field(), format!("{e}; no header is sent")));
                None
            }
        },
    };
    let forwarded = match annotation(meta, ANNOTATION_FORWARDED_HEADERS) {
        None => ForwardedHeaders::Off,
        Some(raw) => match raw.parse::<ForwardedHeaders>() {
            Ok(v) => v,
            Err(e) => {
                notices.push(Notice::new(fh_field(), format!("{e}; no header is added")));
                ForwardedHeaders::Off
            }
        },
    };
    let per_request =
        |p: &PortSpec| PortMode::of(p.protocol, p.app_protocol.as_deref(), balance).per_request();
    if let Some(version) = proxy_protocol {
        for (i, p) in ports.iter().enumerate() {
            if p.protocol == Protocol::Udp {
                notices.push(Notice::new(
                    format!("spec.ports[{i}]"),
                    format!(
                        "the PROXY protocol ({version}) is not sent over UDP (endpoints accept it on TCP only); this port's datagrams go without it"
                    ),
                ));
            } else if per_request(p) {
                notices.push(Notice::new(
                    format!("spec.ports[{i}]"),
                    "balanced per connection, not per request: the PROXY protocol describes one client connection, and a pooled connection to an endpoint carries many clients' requests",
                ));
            }
        }
    }
    let forwarded = if forwarded == ForwardedHeaders::Off {
        forwarded
    } else if proxy_protocol.is_some() {
        notices.push(Notice::new(
            fh_field(),
            format!(
                "ignored: with {ANNOTATION_PROXY_PROTOCOL} every port is balanced per connection, and headers are added in request mode only"
            ),
        ));
        ForwardedHeaders::Off
    } else if !ports.iter().any(per_request) {
        notices.push(Notice::new(
            fh_field(),
            format!(
                "ignored: headers are added on ports balanced per request only (appProtocol http, h2c or grpc, or {ANNOTATION_BALANCE}: request), and this Service has none"
            ),
        ));
        ForwardedHeaders::Off
    } else {
        forwarded
    };
    (proxy_protocol, forwarded)
}

/// Parses `(field, address)` pairs; a bad address is a notice naming its
/// field, and the others are kept.
fn addresses<'a>(
    raw: impl Iterator<Item = (String, &'a str)>,
    notices: &mut Vec<Notice>,
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for (field, ip) in raw {
        match ip.parse::<IpAddr>() {
            Ok(ip) if !ip.is_unspecified() => out.push(ip),
            _ => notices.push(Notice::new(
                field,
                format!("{ip:?} is not an IP address; ignored"),
            )),
        }
    }
    out
}

/// `spec.sessionAffinity` and its `sessionAffinityConfig`, read the way
/// the API server validates and defaults them: `ClientIP` without a
/// timeout gets the default (10800 s). What the API server would refuse is
/// a notice, and the Service keeps working with the nearest valid meaning:
/// a timeout out of 1..=86400 gets the default (the Service asked for
/// affinity, so it keeps it); an unknown `sessionAffinity` is `None` (the
/// field's default); a config beside `None` is ignored.
fn session_affinity(spec: &ServiceSpec, notices: &mut Vec<Notice>) -> SessionAffinity {
    const TIMEOUT_FIELD: &str = "spec.sessionAffinityConfig.clientIP.timeoutSeconds";
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    match spec.session_affinity.as_deref() {
        None | Some("" | "None") => {
            if timeout.is_some() {
                notices.push(Notice::new(
                    TIMEOUT_FIELD,
                    "ignored: sessionAffinity is not ClientIP",
                ));
            }
            SessionAffinity::None
        }
        Some("ClientIP") => {
            let timeout = match timeout {
                None => SessionAffinity::DEFAULT_TIMEOUT,
                Some(t) if (1..=SessionAffinity::MAX_TIMEOUT_SECONDS).contains(&t) => {
                    Duration::from_secs(u64::from(t.unsigned_abs()))
                }
                Some(t) => {
                    notices.push(Notice::new(
                        TIMEOUT_FIELD,
                        format!(
                            "{t} is not between 1 and {}; ClientIP affinity uses the default, {} s",
                            SessionAffinity::MAX_TIMEOUT_SECONDS,
                            SessionAffinity::DEFAULT_TIMEOUT.as_secs()
                        ),
                    ));
                    SessionAffinity::DEFAULT_TIMEOUT
                }
            };
            SessionAffinity::ClientIp { timeout }
        }
        Some(other) => {
            notices.push(Notice::new(
                "spec.sessionAffinity",
                format!("unknown value {other:?} (want None or ClientIP); None is used"),
            ));
            SessionAffinity::None
        }
    }
}

fn annotation<'a>(meta: &'a ObjectMeta, name: &str) -> Option<&'a str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(name))
        .map(String::as_str)
}

/// The fields of a valid Service that the proxy does not honour yet, one
/// notice each: without them a user sees a Service that works and silently
/// ignores half of what it asks (no node port, no local policy). `ports`
/// are the converted `spec.ports`, in order.
fn unhonoured(svc: &Service, ports: &[PortSpec]) -> Vec<Notice> {
    let mut out = Vec::new();
    if svc.spec.is_none() {
        return out;
    }
    let hostnames: Vec<&str> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter(|i| i.ip.is_none())
        .filter_map(|i| i.hostname.as_deref())
        .collect();
    if !hostnames.is_empty() {
        out.push(Notice::new(
            "status.loadBalancer.ingress",
            format!(
                "load balancers known by hostname only are reached through the node ports: {}",
                hostnames.join(", ")
            ),
        ));
    }
    for (i, p) in ports.iter().enumerate() {
        if p.protocol == Protocol::Sctp {
            let name = if p.name.is_empty() {
                String::new()
            } else {
                format!("{} ", p.name)
            };
            out.push(Notice::new(
                format!("spec.ports[{i}]"),
                format!(
                    "{name}{}/{}: only TCP and UDP are proxied; this port is not served",
                    p.port, p.protocol
                ),
            ));
        }
    }
    out
}

/// Converts an EndpointSlice.
pub fn endpoint_slice(slice: &EndpointSlice) -> Result<Outcome<SliceInfo>, InvalidObject> {
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
        return Ok(Outcome::Skipped(Skip::Labelled(LABEL_SERVICE_PROXY_NAME)));
    }
    if has_label(meta, LABEL_HEADLESS) {
        return Ok(Outcome::Skipped(Skip::Labelled(LABEL_HEADLESS)));
    }
    let Some(service_name) = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_NAME))
        .filter(|n| !n.is_empty())
    else {
        return Ok(Outcome::Skipped(Skip::NoServiceLabel));
    };
    match slice.address_type.as_str() {
        "IPv4" | "IPv6" => {}
        "FQDN" => return Ok(Outcome::Skipped(Skip::FqdnAddresses)),
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

    let family = if slice.address_type == "IPv4" {
        IpFamily::V4
    } else {
        IpFamily::V6
    };
    let raw_endpoints = slice.endpoints.as_deref().unwrap_or_default();
    let mut endpoints = Vec::with_capacity(raw_endpoints.len());
    let mut notices = Vec::new();
    let mut skipped = 0usize;
    for (i, ep) in raw_endpoints.iter().enumerate() {
        // One bad endpoint is skipped, not its whole slice: the others
        // keep serving.
        let address = match endpoint_address(&ep.addresses, family) {
            Ok(a) => a,
            Err((field, message)) => {
                skipped += 1;
                if notices.len() < MAX_ENDPOINT_NOTICES {
                    notices.push(Notice::new(
                        format!("endpoints[{i}].{field}"),
                        format!("{message}; endpoint skipped"),
                    ));
                }
                continue;
            }
        };
        let cond = ep.conditions.as_ref();
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        endpoints.push(SliceEndpoint {
            address,
            ready,
            serving: cond.and_then(|c| c.serving).unwrap_or(ready),
            terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
            node_name: ep.node_name.clone(),
            zone_hints: ep
                .hints
                .iter()
                .flat_map(|h| h.for_zones.iter().flatten())
                .map(|z| z.name.clone())
                .collect(),
            node_hints: ep
                .hints
                .iter()
                .flat_map(|h| h.for_nodes.iter().flatten())
                .map(|n| n.name.clone())
                .collect(),
        });
    }

    if skipped > notices.len() {
        notices.push(Notice::new(
            "endpoints",
            format!(
                "{} more endpoints skipped for bad addresses",
                skipped - notices.len()
            ),
        ));
    }

    Ok(Outcome::Accepted(Accepted {
        info: SliceInfo {
            service: ObjectKey::new(key.namespace.clone(), service_name.clone()),
            key,
            ports,
            endpoints,
        },
        notices,
    }))
}

/// Converts a Node: its zone and whether it is eligible for traffic
/// (kube-proxy's `/healthz` rule: not being deleted, no
/// `ToBeDeletedByClusterAutoscaler` taint), its `InternalIP` and
/// `ExternalIP` addresses (`--nodeport-addresses primary`) and its pod
/// ranges (`--detect-local-mode NodeCIDR`). A bad address or range is a
/// notice naming its field and is left out: the rest of the Node is used.
pub fn node(node: &Node) -> Result<Accepted<NodeInfo>, InvalidObject> {
    const KIND: &str = "Node";
    let meta = &node.metadata;
    let name = meta
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| InvalidObject {
            kind: KIND,
            object: meta.name.clone().unwrap_or_else(|| "<unnamed>".into()),
            field: "metadata.name".into(),
            message: "missing".into(),
        })?;
    let zone = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_ZONE))
        .filter(|z| !z.is_empty())
        .cloned();
    let spec = node.spec.as_ref();
    let tainted = spec
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TAINT_TO_BE_DELETED));
    let mut notices = Vec::new();
    let (mut internal_ips, mut external_ips) = (Vec::new(), Vec::new());
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_deref());
    for (i, a) in addresses.unwrap_or_default().iter().enumerate() {
        let list = match a.type_.as_str() {
            "InternalIP" => &mut internal_ips,
            "ExternalIP" => &mut external_ips,
            // Hostname, InternalDNS, ExternalDNS: no use here.
            _ => continue,
        };
        match a.address.trim().parse::<IpAddr>() {
            Ok(ip) => list.push(ip),
            Err(_) => notices.push(Notice::new(
                format!("status.addresses[{i}].address"),
                format!("invalid IP address {:?}; left out", a.address),
            )),
        }
    }
    // The API server keeps `podCIDR` equal to `podCIDRs[0]`; an object
    // written by hand may have only the older field.
    let (field, ranges): (&str, Vec<&str>) = match spec {
        Some(s) if s.pod_cidrs.as_ref().is_some_and(|c| !c.is_empty()) => (
            "spec.podCIDRs",
            s.pod_cidrs.iter().flatten().map(String::as_str).collect(),
        ),
        Some(s) => ("spec.podCIDR", s.pod_cidr.as_deref().into_iter().collect()),
        None => ("spec.podCIDRs", Vec::new()),
    };
    let mut pod_cidrs = Vec::new();
    for (i, raw) in ranges.iter().enumerate() {
        match raw.trim().parse::<ipnet::IpNet>() {
            Ok(net) => pod_cidrs.push(net.trunc()),
            Err(_) => {
                let at = match field {
                    "spec.podCIDR" => field.to_string(),
                    _ => format!("{field}[{i}]"),
                };
                notices.push(Notice::new(at, format!("invalid CIDR {raw:?}; left out")));
            }
        }
    }
    Ok(Accepted {
        info: NodeInfo {
            key: ObjectKey::new("", name),
            zone,
            eligible: meta.deletion_timestamp.is_none() && !tainted,
            internal_ips,
            external_ips,
            pod_cidrs,
        },
        notices,
    })
}

/// The address of one endpoint, or the field at fault and why. Like
/// kube-proxy, only the first address is used. It must be of the slice's
/// family: an IPv4-mapped IPv6 address in an IPv6 slice would reach an IPv4
/// endpoint from an IPv6 ClusterIP, so it is refused too.
fn endpoint_address(
    addresses: &[String],
    family: IpFamily,
) -> Result<IpAddr, (&'static str, String)> {
    let Some(raw) = addresses.first() else {
        return Err(("addresses", "no address".into()));
    };
    let address: IpAddr = raw
        .parse()
        .map_err(|_| ("addresses[0]", format!("invalid IP address {raw:?}")))?;
    let mapped = matches!(address, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some());
    if IpFamily::of(address) != family || mapped {
        return Err(("addresses[0]", format!("{raw} is not an {family} address")));
    }
    Ok(address)
}

#[cfg(test)]
mod tests;
