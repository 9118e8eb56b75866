use std::sync::{Arc, Mutex};

use super::*;
use crate::model::{NodeInfo, PortSpec, ServiceInfo, SliceEndpoint, SliceInfo, SlicePort};

impl<N: Nft, L: Listeners> Reconciler<N, L> {
    fn observer_health_eligible(&self) -> bool {
        self.observer.health_check().node_eligible
    }
}
use crate::rules::fake::FakeNft;
use crate::rules::{Action, Destination, Instance, Layout};

/// Listeners without sockets: ports from a counter (or the adopted one),
/// and a record of what was opened and closed.
#[derive(Clone, Default)]
struct FakeListeners {
    log: Arc<Mutex<ListenerLog>>,
}

#[derive(Default)]
struct ListenerLog {
    next: u16,
    open: BTreeMap<u16, ListenerKey>,
    closed: Vec<u16>,
    adopted: Vec<u16>,
    adoption_done: bool,
    /// Per opened port: the endpoints its balancer held when `open` was
    /// called (the kernel may hand it connections from then on).
    endpoints_at_open: BTreeMap<u16, Vec<std::net::SocketAddr>>,
}

impl FakeListeners {
    fn log(&self) -> std::sync::MutexGuard<'_, ListenerLog> {
        self.log.lock().unwrap()
    }
}

impl Listeners for FakeListeners {
    fn open(
        &mut self,
        key: &ListenerKey,
        balancer: Arc<Balancer>,
        adopt: Option<u16>,
    ) -> Result<Listener, ListenError> {
        let mut log = self.log();
        let at_open = balancer.endpoints().addrs().collect();
        let port = match adopt {
            Some(p) => {
                log.adopted.push(p);
                p
            }
            None => {
                log.next += 1;
                30000 + log.next
            }
        };
        log.open.insert(port, key.clone());
        log.endpoints_at_open.insert(port, at_open);
        Ok(Listener::detached(port))
    }

    fn close(&mut self, _key: &ListenerKey, listener: Listener) {
        let mut log = self.log();
        log.open.remove(&listener.port);
        log.closed.push(listener.port);
    }

    fn adoption_done(&mut self) {
        self.log().adoption_done = true;
    }
}

pub(super) fn service(name: &str, ip: &str) -> ServiceInfo {
    ServiceInfo {
        key: ObjectKey::new("default", name),
        cluster_ips: vec![ip.parse().unwrap()],
        ports: vec![PortSpec {
            port: 80,
            ..PortSpec::default()
        }],
        ..ServiceInfo::default()
    }
}

fn slice(service: &str, ip: &str) -> SliceInfo {
    SliceInfo {
        key: ObjectKey::new("default", format!("{service}-abc")),
        service: ObjectKey::new("default", service),
        ports: vec![SlicePort {
            name: String::new(),
            protocol: Protocol::Tcp,
            port: 8080,
        }],
        endpoints: vec![SliceEndpoint {
            address: ip.parse().unwrap(),
            ready: true,
            serving: true,
            terminating: false,
            node_name: None,
            zone_hints: Vec::new(),
            node_hints: Vec::new(),
        }],
    }
}

fn dest(ip: &str) -> Key {
    Key::Service(Destination {
        ip: ip.parse().unwrap(),
        protocol: Protocol::Tcp,
        port: 80,
    })
}

fn reconciler(
    fake: &FakeNft,
    listeners: &FakeListeners,
    adopted: HashMap<Key, u16>,
) -> Reconciler<FakeNft, FakeListeners> {
    reconciler_v6(fake, listeners, adopted, false)
}

/// With `ipv6`: the node serves IPv6 too (an ip6 table).
fn reconciler_v6(
    fake: &FakeNft,
    listeners: &FakeListeners,
    adopted: HashMap<Key, u16>,
    ipv6: bool,
) -> Reconciler<FakeNft, FakeListeners> {
    let layout = Layout {
        proxy_address: "169.254.42.1".parse().unwrap(),
        proxy_address_v6: ipv6.then(|| "fd6b:7570:7278::1".parse().unwrap()),
        nodeport_addresses: None,
        instance: Instance {
            id: 9,
            note: String::new(),
        },
        upstream_mark: 0x2000,
        local_traffic: None,
        preserve_client_ip_mark: 0x1000,
    };
    Reconciler::new(
        ReconcilerConfig {
            default_algorithm: Algorithm::RoundRobin,
            sync_period: Duration::from_secs(30),
            node: NodeTopology {
                name: "node-a".into(),
                zone: None,
            },
            request_balancing: true,
            nodeport_primary: false,
        },
        RuleTable::new(fake.clone(), layout),
        listeners.clone(),
        adopted,
    )
}

/// Feeds a complete list of Services and slices, then syncs.
async fn load(
    r: &mut Reconciler<FakeNft, FakeListeners>,
    svcs: Vec<ServiceInfo>,
    slices: Vec<SliceInfo>,
) {
    r.apply(Update::Services(svcs.into_iter().map(Arc::new).collect()));
    r.apply(Update::Slices(slices.into_iter().map(Arc::new).collect()));
    r.sync().await;
}

fn kernel_port(fake: &FakeNft, ip: &str) -> Option<u16> {
    match fake.table()?.elements.get(&dest(ip)) {
        Some(Action::Redirect(p)) => Some(*p),
        _ => None,
    }
}

/// The value of an unlabelled (or `ip_family`-only) series.
fn metric(r: &Reconciler<FakeNft, FakeListeners>, series: &str) -> f64 {
    let text = r.observer.metrics.render();
    text.lines()
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            let name = name.strip_suffix("{ip_family=\"IPv4\"}").unwrap_or(name);
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[tokio::test]
async fn pending_changes_and_sync_kinds_are_counted_as_kube_proxy_does() {
    let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
    let mut r = reconciler(&fake, &listeners, HashMap::new());
    let pending = |r: &Reconciler<FakeNft, FakeListeners>| {
        (
            metric(r, "kubeproxy_sync_proxy_rules_service_changes_pending"),
            metric(r, "kubeproxy_sync_proxy_rules_endpoint_changes_pending"),
        )
    };
    assert_eq!(
        metric(
            &r,
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds"
        ),
        0.0
    );
    r.receive(Update::Services(vec![
        Arc::new(service("a", "10.96.0.10")),
        Arc::new(service("b", "10.96.0.11")),
    ]));
    r.receive(Update::Slices(vec![Arc::new(slice("a", "10.1.0.1"))]));
    assert_eq!(pending(&r), (2.0, 1.0));
    assert!(
        metric(
            &r,
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds"
        ) > 1.0e9
    );
    r.sync().await;
    assert_eq!(pending(&r), (0.0, 0.0));
    // The first sync writes the table whole; an endpoint change after
    // it sends one element.
    assert_eq!(
        metric(&r, "kubeproxy_sync_full_proxy_rules_duration_seconds_count"),
        1.0
    );
    assert_eq!(
        metric(
            &r,
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count"
        ),
        0.0
    );
    r.receive(Update::Slices(vec![
        Arc::new(slice("a", "10.1.0.1")),
        Arc::new(slice("b", "10.1.0.2")),
    ]));
    assert_eq!(pending(&r), (0.0, 1.0));
    r.sync().await;
    assert_eq!(pending(&r), (0.0, 0.0));
    assert_eq!(
        metric(&r, "kubeproxy_sync_full_proxy_rules_duration_seconds_count"),
        1.0
    );
    assert_eq!(
        metric(
            &r,
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count"
        ),
        1.0
    );
    assert_eq!(
        metric(&r, "kubeproxy_sync_proxy_rules_duration_seconds_count"),
        2.0
    );
}

#[tokio::test]
async fn a_service_renamed_in_one_sync_keeps_its_cluster_ip_rule() {
    let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
    let mut r = reconciler(&fake, &listeners, HashMap::new());
    // Each name takes the ClusterIP from the previous one in one sync:
    // "a-new" sorts before "b-old", so its claim comes before the old
    // one's release; "z-next" sorts after, so the release comes first.
    for name in ["b-old", "a-new", "z-next"] {
        load(
            &mut r,
            vec![service(name, "10.96.0.10")],
            vec![slice(name, "10.1.0.1")],
        )
        .await;
        let port = kernel_port(&fake, "10.96.0.10").expect("the ClusterIP lost its rule");
        let holder = listeners
            .log()
            .open
            .get(&port)
            .map(|n| n.port.service.name.clone());
        assert_eq!(holder.as_deref(), Some(name));
    }
}

#[tokio::test]
async fn a_failed_sync_keeps_listeners_until_one_succeeds() {
    let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
    let mut r = reconciler(&fake, &listeners, HashMap::new());
    load(
        &mut r,
        vec![service("web", "10.96.0.10")],
        vec![slice("web", "10.1.0.1")],
    )
    .await;
    let port = kernel_port(&fake, "10.96.0.10").unwrap();

    fake.fail_next(2, "Error: simulated");
    load(&mut r, vec![], vec![]).await;
    // The kernel still sends 10.96.0.10 to `port`: its listener stays.
    assert_eq!(kernel_port(&fake, "10.96.0.10"), Some(port));
    assert!(listeners.log().open.contains_key(&port));
    assert!(listeners.log().closed.is_empty());
    assert!(r.needs_retry());

    r.sync().await;
    assert_eq!(kernel_port(&fake, "10.96.0.10"), None);
    assert_eq!(listeners.log().closed, [port]);
    // The closed port leaves the guard set at the sync after that.
    r.sync().await;
    assert!(!r.needs_retry());
    assert!(fake.table().unwrap().proxy_ports.is_empty());
}

#[tokio::test]
async fn a_flushed_table_is_written_again_at_the_next_check() {
    let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
    let mut r = reconciler(&fake, &listeners, HashMap::new());
    load(
        &mut r,
        vec![service("web", "10.96.0.10")],
        vec![slice("web", "10.1.0.1")],
    )
    .await;
    let port = kernel_port(&fake, "10.96.0.10").unwrap();
    fake.flush();
    r.verify().await;
    r.sync().await;
    assert_eq!(kernel_port(&fake, "10.96.0.10"), Some(port));
    // Nothing else moved: the listener is the same one.
    assert!(listeners.log().closed.is_empty());
}

#[tokio::test]
async fn an_earlier_instances_ports_are_taken_back_and_its_leftovers_removed() {
    let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
    // The earlier instance's table: web on 31234, and a Service that is
    // gone since, on 31235.
    let mut earlier = reconciler(&fake, &FakeListeners::default(), HashMap::new());
    earlier.rules.claim(
        dest("10.96.0.10"),
        &ServicePortName {
            service: ObjectKey::new("default", "web"),
            port: String::new(),
            protocol: Protocol::Tcp,
        },
        Action::Redirect(31234),
    );
    earlier.rules.claim(
        dest("10.96.0.99"),
        &ServicePortName {
            service: ObjectKey::new("default", "gone"),
            port: String::new(),
            protocol: Protocol::Tcp,
        },
        Action::Redirect(31235),
    );
    earlier.rules.sync().await.unwrap();
    let adopted: HashMap<Key, u16> = fake.table().unwrap().redirects().collect();

    let mut r = reconciler(&fake, &listeners, adopted);
    load(
        &mut r,
        vec![service("web", "10.96.0.10")],
        vec![slice("web", "10.1.0.1")],
    )
    .await;
    assert_eq!(listeners.log().adopted, [31234]);
    assert!(listeners.log().adoption_done);
    assert_eq!(kernel_port(&fake, "10.96.0.10"), Some(31234));
    assert_eq!(kernel_port(&fake, "10.96.0.99"), None);
    assert_eq!(fake.table().unwrap().instance, Some(9));
}

/// A listener joins the port's `SO_REUSEPORT` group when it is opened;
/// from then on the kernel may hand it connections (at a handover, the
/// earlier instance's share of an adopted port). Its balancer must have
/// the endpoints by then, or those connections find none and are reset.
#[tokio::test]
async fn a_listener_is_opened_with_its_endpoints_already_published() {
    let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
    // An earlier instance's table maps web to 31234: the port is adopted.
    let mut earlier = reconciler(&fake, &FakeListeners::default(), HashMap::new());
    earlier.rules.claim(
        dest("10.96.0.10"),
        &ServicePortName {
            service: ObjectKey::new("default", "web"),
            port: String::new(),
            protocol: Protocol::Tcp,
        },
        Action::Redirect(31234),
    );
    earlier.rules.sync().await.unwrap();
    let adopted: HashMap<Key, u16> = fake.table().unwrap().redirects().collect();

    let mut r = reconciler(&fake, &listeners, adopted);
    load(
        &mut r,
        vec![service("web", "10.96.0.10"), service("api", "10.96.0.11")],
        vec![slice("web", "10.1.0.1"), slice("api", "10.1.0.2")],
    )
    .await;
    let log = listeners.log();
    assert_eq!(log.adopted, [31234]);
    let at_open = &log.endpoints_at_open;
    assert_eq!(
        at_open.get(&31234).map(Vec::as_slice),
        Some(&["10.1.0.1:8080".parse().unwrap()][..]),
        "the adopted port's listener opened before its endpoints were published: {at_open:?}"
    );
    assert_eq!(at_open.len(), 2, "{at_open:?}");
    for (port, endpoints) in at_open {
        assert_eq!(endpoints.len(), 1, "port {port} opened with {endpoints:?}");
    }
}

pub(super) fn dual_stack(name: &str, node_port: Option<u16>) -> ServiceInfo {
    let mut s = service(name, "10.96.0.10");
    s.cluster_ips.push("fd00:96::10".parse().unwrap());
    s.ports[0].node_port = node_port;
    s
}

fn slice_of(service: &str, slice: &str, ip: &str, ready: bool) -> SliceInfo {
    let mut s = self::slice(service, ip);
    s.key.name = slice.into();
    s.endpoints[0].ready = ready;
    s.endpoints[0].serving = ready;
    s
}

fn action_of(fake: &FakeNft, key: &Key) -> Option<Action> {
    fake.table_of(key.family())?.elements.get(key).copied()
}

fn node_port(family: IpFamily) -> Key {
    Key::NodePort(
        family,
        ProxyPort {
            protocol: Protocol::Tcp,
            port: 30080,
        },
    )
}

#[tokio::test]
async fn a_dual_stack_service_has_a_listener_per_family_each_with_its_own_endpoints() {
    let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
    let mut r = reconciler_v6(&fake, &listeners, HashMap::new(), true);
    // A ready IPv4 endpoint; the IPv6 one is not ready.
    let slices = |v6_ready| {
        vec![
            slice_of("web", "web-v4", "10.1.0.1", true),
            slice_of("web", "web-v6", "fd00:1::1", v6_ready),
        ]
    };
    load(&mut r, vec![dual_stack("web", Some(30080))], slices(false)).await;
    let open: Vec<ListenerKey> = listeners.log().open.values().cloned().collect();
    assert_eq!(
        open.iter().map(|k| k.family).collect::<Vec<_>>(),
        [IpFamily::V4, IpFamily::V6]
    );
    let p4 = kernel_port(&fake, "10.96.0.10").expect("the IPv4 ClusterIP is redirected");
    assert_eq!(listeners.log().open[&p4].family, IpFamily::V4);
    // No usable IPv6 endpoint: the IPv6 side refuses, whatever IPv4 has.
    assert_eq!(action_of(&fake, &dest("fd00:96::10")), Some(Action::Reject));
    assert_eq!(
        action_of(&fake, &node_port(IpFamily::V4)),
        Some(Action::Redirect(p4))
    );
    assert_eq!(
        action_of(&fake, &node_port(IpFamily::V6)),
        Some(Action::Reject)
    );

    load(&mut r, vec![dual_stack("web", Some(30080))], slices(true)).await;
    let Some(Action::Redirect(p6)) = action_of(&fake, &dest("fd00:96::10")) else {
        panic!("the IPv6 ClusterIP is not redirected");
    };
    assert_ne!(p4, p6);
    assert_eq!(listeners.log().open[&p6].family, IpFamily::V6);
    assert_eq!(
        action_of(&fake, &node_port(IpFamily::V6)),
        Some(Action::Redirect(p6))
    );
    let guarded = |f| fake.table_of(f).unwrap().proxy_ports;
    assert!(guarded(IpFamily::V4).iter().any(|p| p.port == p4));
    assert!(guarded(IpFamily::V6).iter().any(|p| p.port == p6));
    assert!(!guarded(IpFamily::V6).iter().any(|p| p.port == p4));
    let report = r.report();
    assert_eq!(report.service_ports.len(), 2);
    assert_eq!(report.service_ports[1].ip_family, "IPv6");
    assert_eq!(report.service_ports[1].cluster_ips, ["fd00:96::10"]);
    assert_eq!(report.service_ports[1].endpoints.len(), 1);

    // The Service drops its IPv6 ClusterIP: the IPv6 listener goes,
    // the IPv4 one and its rules stay as they were.
    let mut single = dual_stack("web", Some(30080));
    single.cluster_ips.truncate(1);
    load(&mut r, vec![single], slices(true)).await;
    assert_eq!(listeners.log().closed, [p6]);
    assert_eq!(kernel_port(&fake, "10.96.0.10"), Some(p4));
    assert_eq!(action_of(&fake, &dest("fd00:96::10")), None);
    assert_eq!(action_of(&fake, &node_port(IpFamily::V6)), None);
}

#[tokio::test]
async fn without_ipv6_the_ipv4_side_is_served_and_ipv6_only_services_are_not() {
    let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
    let mut r = reconciler_v6(&fake, &listeners, HashMap::new(), false);
    let mut v6_only = service("six", "fd00:96::11");
    v6_only.ports[0].node_port = Some(30081);
    load(
        &mut r,
        vec![dual_stack("web", Some(30080)), v6_only],
        vec![
            slice_of("web", "web-v4", "10.1.0.1", true),
            slice_of("web", "web-v6", "fd00:1::1", true),
            slice_of("six", "six-v6", "fd00:1::2", true),
        ],
    )
    .await;
    let open: Vec<ListenerKey> = listeners.log().open.values().cloned().collect();
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0].family, IpFamily::V4);
    assert!(kernel_port(&fake, "10.96.0.10").is_some());
    assert!(fake.table_of(IpFamily::V6).is_none());
    // Nothing to retry, and each Service is logged once.
    assert!(!r.needs_retry());
    assert_eq!(r.family_off_logged.len(), 2);
}

#[tokio::test]
async fn an_earlier_instances_ipv6_ports_are_taken_back() {
    let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
    let mut earlier = reconciler_v6(&fake, &FakeListeners::default(), HashMap::new(), true);
    let web = ServicePortName {
        service: ObjectKey::new("default", "web"),
        port: String::new(),
        protocol: Protocol::Tcp,
    };
    earlier
        .rules
        .claim(dest("10.96.0.10"), &web, Action::Redirect(31234));
    earlier
        .rules
        .claim(dest("fd00:96::10"), &web, Action::Redirect(31236));
    earlier.rules.sync().await.unwrap();
    let adopted: HashMap<Key, u16> = [IpFamily::V4, IpFamily::V6]
        .into_iter()
        .flat_map(|f| fake.table_of(f).unwrap().redirects().collect::<Vec<_>>())
        .collect();

    let mut r = reconciler_v6(&fake, &listeners, adopted, true);
    load(
        &mut r,
        vec![dual_stack("web", None)],
        vec![
            slice_of("web", "web-v4", "10.1.0.1", true),
            slice_of("web", "web-v6", "fd00:1::1", true),
        ],
    )
    .await;
    assert_eq!(listeners.log().adopted, [31234, 31236]);
    assert_eq!(
        action_of(&fake, &dest("fd00:96::10")),
        Some(Action::Redirect(31236))
    );
    assert_eq!(listeners.log().open[&31236].family, IpFamily::V6);
}

pub(super) fn slice_on(service: &str, endpoints: &[(&str, &str, bool)]) -> SliceInfo {
    let mut s = slice(service, "10.1.0.1");
    s.endpoints = endpoints
        .iter()
        .map(|(ip, node, ready)| SliceEndpoint {
            address: ip.parse().unwrap(),
            ready: *ready,
            serving: true,
            terminating: !*ready,
            node_name: Some(node.to_string()),
            zone_hints: Vec::new(),
            node_hints: Vec::new(),
        })
        .collect();
    s
}

fn node_port_v4(port: u16) -> Key {
    Key::NodePort(
        IpFamily::V4,
        ProxyPort {
            protocol: Protocol::Tcp,
            port,
        },
    )
}

pub(super) fn with_node_port(mut s: ServiceInfo) -> ServiceInfo {
    s.ports[0].node_port = Some(30080);
    s
}

fn kernel(fake: &FakeNft, key: &Key) -> Option<Action> {
    fake.table()?.elements.get(key).copied()
}

#[tokio::test]
async fn internal_local_without_local_endpoints_drops_and_without_any_rejects() {
    let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
    let mut r = reconciler(&fake, &listeners, HashMap::new());
    let mut svc = service("web", "10.96.0.10");
    svc.internal_local = true;
    load(
        &mut r,
        vec![svc.clone()],
        vec![slice_on("web", &[("10.1.0.2", "node-b", true)])],
    )
    .await;
    assert_eq!(kernel(&fake, &dest("10.96.0.10")), Some(Action::Drop));
    assert_eq!(r.no_local_internal.len(), 1);
    // A local endpoint: served by it alone.
    load(
        &mut r,
        vec![svc.clone()],
        vec![slice_on(
            "web",
            &[("10.1.0.2", "node-b", true), ("10.1.0.1", "node-a", true)],
        )],
    )
    .await;
    assert!(matches!(
        kernel(&fake, &dest("10.96.0.10")),
        Some(Action::Redirect(_))
    ));
    assert!(r.no_local_internal.is_empty());
    // No usable endpoint anywhere: refused, as without the policy.
    load(&mut r, vec![svc], vec![slice_on("web", &[])]).await;
    assert_eq!(kernel(&fake, &dest("10.96.0.10")), Some(Action::Reject));
}

#[tokio::test]
async fn external_local_gets_a_listener_of_its_own_with_local_endpoints() {
    let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
    let mut r = reconciler(&fake, &listeners, HashMap::new());
    let mut svc = with_node_port(service("web", "10.96.0.10"));
    svc.external_local = true;
    svc.health_check_node_port = Some(32000);
    load(
        &mut r,
        vec![svc.clone()],
        vec![slice_on("web", &[("10.1.0.2", "node-b", true)])],
    )
    .await;
    // ClusterIP traffic goes to the remote endpoint; the node port is
    // dropped (no local endpoint).
    assert!(matches!(
        kernel(&fake, &dest("10.96.0.10")),
        Some(Action::Redirect(_))
    ));
    assert_eq!(kernel(&fake, &node_port_v4(30080)), Some(Action::Drop));
    assert_eq!(r.no_local_external.len(), 1);
    assert_eq!(
        r.health_checks.get(&ObjectKey::new("default", "web")),
        Some(&(32000, 0))
    );
    assert_eq!(listeners.log().open.len(), 2);

    load(
        &mut r,
        vec![svc.clone()],
        vec![slice_on(
            "web",
            &[("10.1.0.2", "node-b", true), ("10.1.0.1", "node-a", true)],
        )],
    )
    .await;
    let (Some(Action::Redirect(cluster)), Some(Action::Redirect(external))) = (
        kernel(&fake, &dest("10.96.0.10")),
        kernel(&fake, &node_port_v4(30080)),
    ) else {
        panic!("both redirected: {:?}", fake.table());
    };
    assert_ne!(cluster, external, "external traffic has its own listener");
    let ext = r
        .active
        .values()
        .find(|p| p.listener.port == external)
        .unwrap();
    assert_eq!(ext.endpoints(), ["10.1.0.1:8080".parse().unwrap()]);
    assert_eq!(
        r.health_checks.get(&ObjectKey::new("default", "web")),
        Some(&(32000, 1))
    );

    // Back to Cluster: one listener again, the other closes after the
    // sync that moved the node port.
    svc.external_local = false;
    load(
        &mut r,
        vec![svc],
        vec![slice_on("web", &[("10.1.0.2", "node-b", true)])],
    )
    .await;
    assert_eq!(
        kernel(&fake, &node_port_v4(30080)),
        Some(Action::Redirect(cluster))
    );
    assert_eq!(listeners.log().closed, [external]);
    assert!(r.health_checks.is_empty());
    assert!(r.no_local_external.is_empty());
}

#[tokio::test]
async fn the_local_set_falls_back_to_terminating_local_endpoints() {
    let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
    let mut r = reconciler(&fake, &listeners, HashMap::new());
    let mut svc = service("web", "10.96.0.10");
    svc.internal_local = true;
    load(
        &mut r,
        vec![svc],
        vec![slice_on(
            "web",
            &[("10.1.0.2", "node-b", true), ("10.1.0.1", "node-a", false)],
        )],
    )
    .await;
    let port = r.active.values().next().unwrap();
    assert_eq!(port.endpoints(), ["10.1.0.1:8080".parse().unwrap()]);
}

#[tokio::test]
async fn a_node_object_sets_the_zone_and_eligibility() {
    let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
    let mut r = reconciler(&fake, &listeners, HashMap::new());
    // A list without this node's object: not seen, eligible.
    r.receive(Update::Nodes(vec![]));
    assert!(r.node_eligible);
    let mut s = slice_on(
        "web",
        &[("10.1.0.1", "node-a", true), ("10.1.0.2", "node-b", true)],
    );
    s.endpoints[0].zone_hints = vec!["z1".into()];
    s.endpoints[1].zone_hints = vec!["z2".into()];
    load(&mut r, vec![service("web", "10.96.0.10")], vec![s]).await;
    assert_eq!(r.active.values().next().unwrap().endpoints().len(), 2);
    r.receive(Update::Nodes(vec![NodeInfo {
        key: ObjectKey::new("", "node-a"),
        zone: Some("z2".into()),
        eligible: false,
        ..NodeInfo::default()
    }]));
    r.sync().await;
    assert_eq!(
        r.active.values().next().unwrap().endpoints(),
        ["10.1.0.2:8080".parse().unwrap()]
    );
    assert!(!r.node_eligible);
    assert!(!r.observer_health_eligible());
    // Another node's object changes nothing.
    r.receive(Update::NodeApplied(NodeInfo {
        key: ObjectKey::new("", "node-b"),
        zone: Some("z1".into()),
        eligible: true,
        ..NodeInfo::default()
    }));
    r.sync().await;
    assert!(!r.node_eligible);
    // Eligible again, then deleted: not eligible.
    r.receive(Update::NodeApplied(NodeInfo {
        key: ObjectKey::new("", "node-a"),
        zone: Some("z2".into()),
        eligible: true,
        ..NodeInfo::default()
    }));
    assert!(r.node_eligible);
    r.receive(Update::NodeDeleted(ObjectKey::new("", "node-a")));
    assert!(!r.node_eligible);
}

/// kube-proxy counts a health check's local endpoints per family: a
/// dual-stack pod is one endpoint on the node, not one per family.
#[tokio::test]
async fn a_dual_stack_health_check_counts_local_endpoints_once_per_family() {
    let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
    let mut r = reconciler_v6(&fake, &listeners, HashMap::new(), true);
    let mut svc = dual_stack("web", Some(30080));
    svc.external_local = true;
    svc.health_check_node_port = Some(32000);
    let local = |slice: &str, ip: &str| {
        let mut s = slice_of("web", slice, ip, true);
        s.endpoints[0].node_name = Some("node-a".into());
        s
    };
    let both = vec![local("web-v4", "10.1.0.1"), local("web-v6", "fd00:1::1")];
    load(&mut r, vec![svc.clone()], both).await;
    assert_eq!(
        r.health_checks.get(&ObjectKey::new("default", "web")),
        Some(&(32000, 1)),
        "one dual-stack pod on the node is one local endpoint"
    );
    // Only the IPv6 side has one: still one, not zero.
    load(&mut r, vec![svc], vec![local("web-v6", "fd00:1::1")]).await;
    assert_eq!(
        r.health_checks.get(&ObjectKey::new("default", "web")),
        Some(&(32000, 1))
    );
}

/// `--nodeport-addresses primary` and `--detect-local-mode NodeCIDR`
/// follow this node's Node object: nothing is written before its pod
/// ranges are known (as kube-proxy waits for them), then the table holds
/// its primary IPs; a change of them rewrites it; a Node that lists none
/// keeps what was known.
#[tokio::test]
async fn node_cidr_waits_for_the_node_and_primary_follows_its_addresses() {
    let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
    let mut r = reconciler(&fake, &listeners, HashMap::new());
    r.config.nodeport_primary = true;
    r.rules.update_layout(|l| {
        // What main starts with: the default route's interface.
        l.nodeport_addresses = Some(vec!["192.168.0.9/32".parse().unwrap()]);
        l.local_traffic = Some(LocalTraffic::NodePodCidrs(Vec::new()));
    });
    load(
        &mut r,
        vec![service("web", "10.96.0.10")],
        vec![slice("web", "10.1.0.1")],
    )
    .await;
    assert!(
        fake.table().is_none(),
        "rules written before the Node's podCIDRs"
    );
    assert!(!r.first_sync_done);
    // Another node's object changes nothing.
    let other = NodeInfo {
        key: ObjectKey::new("", "node-b"),
        pod_cidrs: vec!["10.244.9.0/24".parse().unwrap()],
        ..NodeInfo::default()
    };
    r.receive(Update::NodeApplied(other));
    r.sync().await;
    assert!(fake.table().is_none());

    let mine = NodeInfo {
        key: ObjectKey::new("", "node-a"),
        eligible: true,
        internal_ips: vec!["127.0.0.1".parse().unwrap(), "fd00::7".parse().unwrap()],
        external_ips: vec!["203.0.113.7".parse().unwrap()],
        pod_cidrs: vec![
            "10.244.1.0/24".parse().unwrap(),
            "10.244.2.0/24".parse().unwrap(),
            "fd00:244::/64".parse().unwrap(),
        ],
        ..NodeInfo::default()
    };
    r.receive(Update::Nodes(vec![mine.clone()]));
    r.sync().await;
    assert!(r.first_sync_done);
    assert!(kernel_port(&fake, "10.96.0.10").is_some());
    // The first range of each family; a loopback primary IP is left out
    // (kube-proxy: that family then serves every address).
    let layout = r.rules.layout();
    assert_eq!(
        layout.local_traffic,
        Some(LocalTraffic::NodePodCidrs(vec![
            "10.244.1.0/24".parse().unwrap(),
            "fd00:244::/64".parse().unwrap()
        ]))
    );
    assert_eq!(
        layout.nodeport_addresses,
        Some(vec!["fd00::7/128".parse().unwrap()])
    );
    assert_eq!(fake.table().unwrap().nodeport_addresses, None);

    // The Node's InternalIP changes: the table follows.
    let moved = NodeInfo {
        internal_ips: vec!["192.168.7.7".parse().unwrap()],
        ..mine.clone()
    };
    r.receive(Update::NodeApplied(moved));
    r.sync().await;
    assert_eq!(
        fake.table().unwrap().nodeport_addresses,
        Some(vec!["192.168.7.7/32".parse().unwrap()])
    );
    // A Node without addresses or ranges (or deleted) keeps what was known.
    r.receive(Update::NodeApplied(NodeInfo {
        key: ObjectKey::new("", "node-a"),
        ..NodeInfo::default()
    }));
    r.receive(Update::NodeDeleted(ObjectKey::new("", "node-a")));
    r.sync().await;
    assert_eq!(
        fake.table().unwrap().nodeport_addresses,
        Some(vec!["192.168.7.7/32".parse().unwrap()])
    );
    assert!(matches!(
        &r.rules.layout().local_traffic,
        Some(LocalTraffic::NodePodCidrs(n)) if n.len() == 2
    ));
}
