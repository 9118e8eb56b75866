use super::*;
use serde_json::json;

impl<T: std::fmt::Debug> Outcome<T> {
    /// The accepted object; panics on a skip.
    fn accepted(self) -> Accepted<T> {
        match self {
            Outcome::Accepted(a) => a,
            Outcome::Skipped(skip) => panic!("skipped: {skip:?}"),
        }
    }

    /// Why the object was skipped; panics if it was accepted.
    fn skipped(self) -> Skip {
        match self {
            Outcome::Skipped(skip) => skip,
            Outcome::Accepted(a) => panic!("accepted: {a:?}"),
        }
    }
}

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
    .accepted();
    let Accepted { info: s, notices } = s;
    assert_eq!(s.key, ObjectKey::new("shop", "web"));
    assert_eq!(s.cluster_ips, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
    assert_eq!(s.ports.len(), 2);
    assert_eq!(s.ports[1].protocol, Protocol::Udp);
    assert_eq!(s.algorithm, Some(Algorithm::LeastConnections));
    // The UDP port is served like the TCP one.
    assert_eq!(notices, vec![]);
}

/// The session affinity of a Service with these `spec` fields, and the
/// fields its notices name.
fn affinity(fields: serde_json::Value) -> (SessionAffinity, Vec<String>) {
    let mut v = json!({
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}
    });
    merge(&mut v["spec"], fields);
    let a = service(&svc(v)).unwrap().accepted();
    let fields = a.notices.iter().map(|n| n.field.clone()).collect();
    (a.info.session_affinity, fields)
}

#[test]
fn session_affinity_is_read_with_the_api_servers_default_and_range() {
    let secs = |s| SessionAffinity::ClientIp {
        timeout: Duration::from_secs(s),
    };
    let none: Vec<String> = vec![];
    assert_eq!(affinity(json!({})), (SessionAffinity::None, none.clone()));
    assert_eq!(
        affinity(json!({"sessionAffinity": "None"})),
        (SessionAffinity::None, none.clone())
    );
    // No config (or no timeout in it): the API server's 10800 s.
    assert_eq!(
        affinity(json!({"sessionAffinity": "ClientIP"})),
        (secs(10800), none.clone())
    );
    assert_eq!(
        affinity(json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {}}})),
        (secs(10800), none.clone())
    );
    for t in [1, 2, 86400] {
        assert_eq!(
            affinity(json!({"sessionAffinity": "ClientIP",
                                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": t}}})),
            (secs(t as u64), none.clone()),
            "timeoutSeconds {t}"
        );
    }
}

#[test]
fn bad_session_affinity_values_name_the_field_and_keep_the_service() {
    let timeout_field = "spec.sessionAffinityConfig.clientIP.timeoutSeconds".to_string();
    // Out of the API server's range: affinity stays on, with the default.
    for t in [0, -5, 86401] {
        assert_eq!(
            affinity(json!({"sessionAffinity": "ClientIP",
                                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": t}}})),
            (
                SessionAffinity::ClientIp {
                    timeout: SessionAffinity::DEFAULT_TIMEOUT
                },
                vec![timeout_field.clone()]
            ),
            "timeoutSeconds {t}"
        );
    }
    // An unknown mode: None, the field's default.
    assert_eq!(
        affinity(json!({"sessionAffinity": "clientip"})),
        (
            SessionAffinity::None,
            vec!["spec.sessionAffinity".to_string()]
        )
    );
    // A timeout beside None means nothing: said, and ignored.
    assert_eq!(
        affinity(json!({"sessionAffinity": "None",
                            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}})),
        (SessionAffinity::None, vec![timeout_field])
    );
}

#[test]
fn a_service_using_only_honoured_fields_has_no_notices() {
    let s = service(&svc(json!({
            "metadata": {"name": "web", "annotations": {"service.kubernetes.io/topology-mode": "Disabled"}},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "sessionAffinity": "None",
                     "internalTrafficPolicy": "Cluster", "externalTrafficPolicy": "Cluster",
                     "externalIPs": [], "ports": [{"port": 80}]},
            "status": {"loadBalancer": {}}
        })))
        .unwrap()
        .accepted();
    assert_eq!(s.notices, vec![]);
}

#[test]
fn traffic_policies_and_health_check_port_are_read() {
    let s = service(&svc(json!({
        "metadata": {"name": "web", "annotations": {"service.kubernetes.io/topology-mode": "Auto"}},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                 "internalTrafficPolicy": "Local", "externalTrafficPolicy": "Local",
                 "healthCheckNodePort": 32000, "trafficDistribution": "PreferSameZone",
                 "ports": [{"port": 80, "nodePort": 30080}]}
    })))
    .unwrap()
    .accepted();
    assert_eq!(s.notices, vec![], "topology and policies are honoured");
    assert!(s.info.internal_local && s.info.external_local);
    assert_eq!(s.info.health_check_node_port, Some(32000));
    // A ClusterIP Service without externalIPs cannot be reached from
    // outside: its external policy does not matter (kube-proxy).
    let s = service(&svc(json!({
        "metadata": {"name": "web"},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10",
                 "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
                 "ports": [{"port": 80}]}
    })))
    .unwrap()
    .accepted();
    assert!(!s.info.external_local);
    assert_eq!(s.info.health_check_node_port, None);
    // An unknown policy is a notice, and Cluster serves.
    let s = service(&svc(json!({
        "metadata": {"name": "web"},
        "spec": {"clusterIP": "10.96.0.10", "internalTrafficPolicy": "Nearby",
                 "ports": [{"port": 80}]}
    })))
    .unwrap()
    .accepted();
    assert!(!s.info.internal_local);
    assert_eq!(s.notices[0].field, "spec.internalTrafficPolicy");
}

#[test]
fn the_preserve_client_ip_annotation_is_read_and_a_bad_value_is_a_notice() {
    let with = |v: &str| {
        service(&svc(json!({
            "metadata": {"name": "web",
                         "annotations": {"kube-uproxy.io/preserve-client-ip": v}},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}
        })))
        .unwrap()
        .accepted()
    };
    assert_eq!(with("true").info.preserve_client_ip, Some(true));
    assert_eq!(with("false").info.preserve_client_ip, Some(false));
    let bad = with("yes");
    assert_eq!(bad.info.preserve_client_ip, None);
    assert_eq!(
        bad.notices[0].field,
        "metadata.annotations[kube-uproxy.io/preserve-client-ip]"
    );
    let none = service(&svc(json!({
        "metadata": {"name": "web"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}
    })))
    .unwrap()
    .accepted();
    assert_eq!(none.info.preserve_client_ip, None);
}

#[test]
fn endpoint_hints_and_nodes_are_read() {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "web-a", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.0.1"], "nodeName": "node-a",
                       "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "node-a"}]}}],
        "ports": [{"port": 80}]
    }))
    .unwrap();
    let s = endpoint_slice(&slice).unwrap().accepted();
    let e = &s.info.endpoints[0];
    assert_eq!(e.zone_hints, ["z1"]);
    assert_eq!(e.node_hints, ["node-a"]);
    let n: Node = serde_json::from_value(json!({
        "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "z1"}},
        "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}
    }))
    .unwrap();
    let info = node(&n).unwrap().info;
    assert_eq!(info.zone.as_deref(), Some("z1"));
    assert!(!info.eligible);
    let n: Node = serde_json::from_value(json!({
        "metadata": {"name": "node-a", "deletionTimestamp": "2026-01-01T00:00:00Z"}
    }))
    .unwrap();
    assert!(!node(&n).unwrap().info.eligible);
    let n: Node = serde_json::from_value(json!({"metadata": {"name": "node-a"}})).unwrap();
    assert!(node(&n).unwrap().info.eligible);
}

#[test]
fn node_addresses_and_pod_cidrs_are_read_and_a_bad_entry_is_a_notice() {
    let n: Node = serde_json::from_value(json!({
        "metadata": {"name": "node-a"},
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.7/24", "fd00:244:1::/64", "nonsense"]},
        "status": {"addresses": [
            {"type": "Hostname", "address": "node-a"},
            {"type": "ExternalIP", "address": "203.0.113.7"},
            {"type": "InternalIP", "address": "192.168.1.10"},
            {"type": "InternalIP", "address": "192.168.1.999"},
            {"type": "InternalIP", "address": "fd00::10"},
            {"type": "InternalIP", "address": "192.168.2.10"}
        ]}
    }))
    .unwrap();
    let a = node(&n).unwrap();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(
        a.info.internal_ips,
        [ip("192.168.1.10"), ip("fd00::10"), ip("192.168.2.10")]
    );
    assert_eq!(a.info.external_ips, [ip("203.0.113.7")]);
    // Truncated to the network, as kube-proxy parses a CIDR.
    assert_eq!(
        a.info.pod_cidrs,
        [
            "10.244.1.0/24".parse::<ipnet::IpNet>().unwrap(),
            "fd00:244:1::/64".parse().unwrap()
        ]
    );
    let fields: Vec<&str> = a.notices.iter().map(|n| n.field.as_str()).collect();
    assert_eq!(fields, ["status.addresses[3].address", "spec.podCIDRs[2]"]);
    assert!(a.notices[1].message.contains("nonsense"), "{:?}", a.notices);
    // kube-proxy's GetNodeHostIPs: the first InternalIP, then the first of
    // the other family.
    assert_eq!(a.info.primary_ips(), [ip("192.168.1.10"), ip("fd00::10")]);

    // Only the older podCIDR, and ExternalIPs only: the first of them.
    let n: Node = serde_json::from_value(json!({
        "metadata": {"name": "node-b"},
        "spec": {"podCIDR": "10.244.2.0/24"},
        "status": {"addresses": [{"type": "ExternalIP", "address": "203.0.113.8"}]}
    }))
    .unwrap();
    let b = node(&n).unwrap();
    assert!(b.notices.is_empty(), "{:?}", b.notices);
    assert_eq!(
        b.info.pod_cidrs,
        ["10.244.2.0/24".parse::<ipnet::IpNet>().unwrap()]
    );
    assert_eq!(b.info.primary_ips(), [ip("203.0.113.8")]);
    let n: Node = serde_json::from_value(json!({
        "metadata": {"name": "node-c"}, "spec": {"podCIDR": "10.244.3.0/33"}
    }))
    .unwrap();
    let c = node(&n).unwrap();
    assert!(c.info.pod_cidrs.is_empty() && c.info.primary_ips().is_empty());
    assert_eq!(c.notices[0].field, "spec.podCIDR");
}

#[test]
fn node_ports_external_and_load_balancer_addresses_are_read() {
    let s = service(&svc(json!({
            "metadata": {"name": "web"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                     "externalIPs": ["192.0.2.7", "bogus"],
                     "loadBalancerSourceRanges": ["10.0.0.0/8", " 192.0.2.1/24 ", "nope"],
                     "ports": [{"port": 80, "nodePort": 30080}, {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}]},
            "status": {"loadBalancer": {"ingress": [
                {"ip": "203.0.113.1"}, {"ip": "203.0.113.2", "ipMode": "Proxy"},
                {"ip": "203.0.113.3", "ipMode": "VIP"}, {"hostname": "lb.example"}]}}
        })))
        .unwrap()
        .accepted();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(s.info.external_ips, vec![ip("192.0.2.7")]);
    assert_eq!(s.info.lb_ips, vec![ip("203.0.113.1"), ip("203.0.113.3")]);
    assert_eq!(
        s.info.lb_source_ranges,
        vec![
            "10.0.0.0/8".parse::<ipnet::IpNet>().unwrap(),
            "192.0.2.0/24".parse().unwrap()
        ]
    );
    assert_eq!(s.info.ports[1].node_port, Some(30053));
    let fields: Vec<&str> = s.notices.iter().map(|n| n.field.as_str()).collect();
    assert_eq!(
        fields,
        vec![
            "status.loadBalancer.ingress",
            "spec.externalIPs[1]",
            "spec.loadBalancerSourceRanges[2]"
        ]
    );
    // A node port on a ClusterIP Service is not served.
    let c = service(&svc(json!({
        "metadata": {"name": "c"},
        "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 80, "nodePort": 30081}]}
    })))
    .unwrap()
    .accepted();
    assert_eq!(c.info.ports[0].node_port, None);
    // A bad node port names its field.
    let bad = service(&svc(json!({
            "metadata": {"name": "b"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.12", "ports": [{"port": 80, "nodePort": 70000}]}
        })))
        .unwrap_err();
    assert_eq!(bad.field, "spec.ports[0].nodePort");
}

#[test]
fn skips_what_kube_proxy_skips() {
    let base = |extra: serde_json::Value| {
        let mut v = json!({"metadata": {"name": "x"}, "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}});
        merge(&mut v, extra);
        service(&svc(v)).unwrap().skipped()
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
        .accepted()
        .info;
    assert_eq!(s.service, ObjectKey::new("shop", "web"));
    assert!(s.endpoints[0].ready && s.endpoints[0].serving && !s.endpoints[0].terminating);
    assert!(!s.endpoints[1].ready && s.endpoints[1].serving && s.endpoints[1].terminating);
}

#[test]
fn invalid_slices_name_the_field() {
    let e = endpoint_slice(&slice(json!({
        "metadata": {"name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"port": 0}],
        "endpoints": [{"addresses": ["10.1.0.1"]}]
    })))
    .unwrap_err();
    assert_eq!(e.field, "ports[0].port");
    assert_eq!(e.object, "default/web-abc");
    let e = endpoint_slice(&slice(json!({
        "metadata": {"name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv5",
        "endpoints": []
    })))
    .unwrap_err();
    assert_eq!(e.field, "addressType");
    let s = endpoint_slice(&slice(json!({
        "metadata": {"name": "web-abc"}, "addressType": "IPv4", "endpoints": []
    })))
    .unwrap();
    assert_eq!(s, Outcome::Skipped(Skip::NoServiceLabel));
}

#[test]
fn bad_endpoints_are_skipped_with_a_notice_each_up_to_a_bound() {
    let mut endpoints = vec![json!({"addresses": ["fd00::2"]})];
    for i in 0..20 {
        endpoints.push(json!({"addresses": [format!("10.1.0.{i}")]}));
    }
    let s = endpoint_slice(&slice(json!({
        "metadata": {"name": "web-v6", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv6",
        "ports": [{"port": 8080}],
        "endpoints": endpoints
    })))
    .unwrap()
    .accepted();
    assert_eq!(s.info.endpoints.len(), 1);
    assert_eq!(s.notices.len(), MAX_ENDPOINT_NOTICES + 1);
    assert_eq!(s.notices[0].field, "endpoints[1].addresses[0]");
    assert!(s.notices[0].message.contains("not an IPv6 address"));
    let last = &s.notices[MAX_ENDPOINT_NOTICES];
    assert_eq!(last.field, "endpoints");
    assert!(last.message.starts_with("12 more"), "{}", last.message);
    // An IPv4-mapped address is IPv4 traffic: not in an IPv6 slice.
    assert!(endpoint_address(&["::ffff:10.1.0.1".into()], IpFamily::V6).is_err());
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

/// A Service with these annotations and ports (`[name, protocol,
/// appProtocol]`): its PROXY protocol, forwarded headers and the fields
/// its notices name.
fn client_address_of(
    annotations: serde_json::Value,
    ports: serde_json::Value,
) -> (Option<ProxyProtocol>, ForwardedHeaders, Vec<String>) {
    let a = service(&svc(json!({
        "metadata": {"name": "web", "annotations": annotations},
        "spec": {"clusterIP": "10.96.0.10", "ports": ports}
    })))
    .unwrap()
    .accepted();
    let fields = a.notices.iter().map(|n| n.field.clone()).collect();
    (a.info.proxy_protocol, a.info.forwarded_headers, fields)
}

#[test]
fn proxy_protocol_annotation_is_read_and_left_off_udp_and_request_mode() {
    let pp = "metadata.annotations[kube-uproxy.io/proxy-protocol]";
    let tcp = json!([{"name": "a", "port": 80}]);
    assert_eq!(
        client_address_of(json!({ANNOTATION_PROXY_PROTOCOL: "v2"}), tcp.clone()),
        (Some(ProxyProtocol::V2), ForwardedHeaders::Off, vec![])
    );
    assert_eq!(
        client_address_of(json!({ANNOTATION_PROXY_PROTOCOL: " V1 "}), tcp.clone()),
        (Some(ProxyProtocol::V1), ForwardedHeaders::Off, vec![])
    );
    // A typo: no header, and a notice naming the Service's field.
    assert_eq!(
        client_address_of(json!({ANNOTATION_PROXY_PROTOCOL: "v3"}), tcp.clone()),
        (None, ForwardedHeaders::Off, vec![pp.to_string()])
    );
    // UDP is proxied without it; an HTTP port goes per connection.
    let (v, _, fields) = client_address_of(
        json!({ANNOTATION_PROXY_PROTOCOL: "v1"}),
        json!([{"name": "a", "port": 80, "appProtocol": "http"},
               {"name": "b", "port": 53, "protocol": "UDP"}]),
    );
    assert_eq!(v, Some(ProxyProtocol::V1));
    assert_eq!(fields, vec!["spec.ports[0]", "spec.ports[1]"]);
}

#[test]
fn forwarded_headers_annotation_needs_a_port_in_request_mode() {
    let fh = "metadata.annotations[kube-uproxy.io/forwarded-headers]";
    let http = json!([{"name": "a", "port": 80, "appProtocol": "http"}]);
    assert_eq!(
        client_address_of(json!({ANNOTATION_FORWARDED_HEADERS: "true"}), http.clone()),
        (None, ForwardedHeaders::Replace, vec![])
    );
    assert_eq!(
        client_address_of(
            json!({ANNOTATION_FORWARDED_HEADERS: "append"}),
            http.clone()
        ),
        (None, ForwardedHeaders::Append, vec![])
    );
    assert_eq!(
        client_address_of(json!({ANNOTATION_FORWARDED_HEADERS: "yes"}), http.clone()),
        (None, ForwardedHeaders::Off, vec![fh.to_string()])
    );
    // No port in request mode: nothing to add them to.
    assert_eq!(
        client_address_of(
            json!({ANNOTATION_FORWARDED_HEADERS: "true"}),
            json!([{"name": "a", "port": 80}])
        ),
        (None, ForwardedHeaders::Off, vec![fh.to_string()])
    );
    // `balance: request` makes a port without appProtocol HTTP.
    assert_eq!(
        client_address_of(
            json!({ANNOTATION_FORWARDED_HEADERS: "true", ANNOTATION_BALANCE: "request"}),
            json!([{"name": "a", "port": 80}])
        ),
        (None, ForwardedHeaders::Replace, vec![])
    );
    // Beside the PROXY protocol every port is per connection.
    let (_, f, fields) = client_address_of(
        json!({ANNOTATION_FORWARDED_HEADERS: "true", ANNOTATION_PROXY_PROTOCOL: "v2"}),
        http,
    );
    assert_eq!(f, ForwardedHeaders::Off);
    assert_eq!(fields, vec!["spec.ports[0]".to_string(), fh.to_string()]);
}
