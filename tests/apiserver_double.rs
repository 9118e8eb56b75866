//! Checks the fake API server (tests/lab/src/apiserver.rs) against the real
//! client: kube-rs's `watcher` and `Api`, the same code the Kubernetes source
//! of kube-uproxy runs. If the double and the client disagree, tests built on
//! the double would prove nothing, so each documented behaviour the proxy
//! relies on (initial list, live events, label filter, resumed watches,
//! relist after 410, paging) is exercised here end to end over HTTP.
//!
//! Every wait is bounded; nothing here needs root or leaves 127.0.0.1.

use std::fmt::Debug;
use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, VersionMatch, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::runtime::watcher::Event;
use kube::{Api, Client, Config, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use uproxy_lab::apiserver::{self, FakeApiServer};

/// kube-proxy's own informer filter.
const PROXY_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// Upper bound for any single wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

/// A client built the way the proxy builds one from `--kubeconfig PATH`.
async fn client_for(server: &FakeApiServer) -> Client {
    let dir = std::env::temp_dir().join(format!(
        "kube-uproxy-apiserver-double-{}-{}",
        std::process::id(),
        server.addr().port()
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let path = dir.join("kubeconfig");
    server.write_kubeconfig(&path).expect("write kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path).expect("read kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig accepted by kube::Config");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(config.cluster_url.to_string(), format!("{}/", server.url()));
    Client::try_from(config).expect("client")
}

fn service(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {
            "clusterIP": "10.96.0.10",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
        }
    })
}

fn slice(namespace: &str, name: &str, service: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service}
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

/// A `watcher` polled continuously in a task (as the proxy does), its
/// events forwarded to the test. Errors are forwarded too: the watcher
/// reports them and recovers on the next poll.
struct Watch<K> {
    rx: mpsc::UnboundedReceiver<Result<Event<K>, String>>,
    task: tokio::task::JoinHandle<()>,
    errors: Vec<String>,
}

impl<K> Drop for Watch<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn spawn_watcher<K>(api: Api<K>, config: watcher::Config) -> Watch<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut stream = watcher(api, config).boxed();
        let mut errors = 0;
        while let Some(item) = stream.next().await {
            let item = item.map_err(|e| e.to_string());
            let failed = item.is_err();
            if tx.send(item).is_err() {
                break;
            }
            if failed {
                // A little backoff so that a persistent error cannot spin.
                errors += 1;
                if errors > 100 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    Watch {
        rx,
        task,
        errors: Vec::new(),
    }
}

fn obj_id<K: Resource>(obj: &K) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

fn describe<K: Resource>(event: &Event<K>) -> String {
    match event {
        Event::Init => "Init".into(),
        Event::InitApply(o) => format!("InitApply {}", obj_id(o)),
        Event::InitDone => "InitDone".into(),
        Event::Apply(o) => format!("Apply {}", obj_id(o)),
        Event::Delete(o) => format!("Delete {}", obj_id(o)),
    }
}

impl<K: Resource> Watch<K> {
    /// The next event, skipping (and recording) watcher errors.
    async fn next(&mut self) -> Event<K> {
        let deadline = Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Ok(event))) => return event,
                Ok(Some(Err(e))) => self.errors.push(e),
                Ok(None) => panic!("watcher ended; errors: {:?}", self.errors),
                Err(_) => panic!(
                    "no watcher event within {WAIT:?}; errors: {:?}",
                    self.errors
                ),
            }
        }
    }

    async fn next_desc(&mut self) -> String {
        describe(&self.next().await)
    }

    /// Init, then the InitApply events (returned, sorted), then InitDone.
    async fn initial(&mut self) -> Vec<String> {
        assert_eq!(self.next_desc().await, "Init");
        let mut seen = Vec::new();
        loop {
            match self.next().await {
                Event::InitApply(o) => seen.push(obj_id(&o)),
                Event::InitDone => break,
                other => panic!("unexpected {} during initial list", describe(&other)),
            }
        }
        seen.sort();
        seen
    }

    /// Asserts that nothing arrives for a short while.
    async fn quiet(&mut self, d: Duration) {
        if let Ok(Some(Ok(event))) = timeout(d, self.rx.recv()).await {
            panic!("unexpected event {}", describe(&event));
        }
    }
}

/// Polls `cond` until it holds, failing the test after [`WAIT`].
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A raw HTTP/1.1 GET, for looking at status codes and bodies exactly.
async fn raw_request(addr: SocketAddr, method: &str, path: &str) -> (u16, Value) {
    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        conn.write_all(req.as_bytes()).await.expect("send request");
        let mut buf = Vec::new();
        conn.read_to_end(&mut buf).await.expect("read response");
        buf
    };
    let buf = timeout(WAIT, exchange)
        .await
        .expect("raw request timed out");
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let body = serde_json::from_str(body).unwrap_or(Value::Null);
    (code, body)
}

#[tokio::test]
async fn services_initial_list_live_events_and_label_filter() {
    let server = FakeApiServer::start().await;
    server.apply(service("a", json!({"app": "a"})));
    server.apply(service(
        "headless",
        json!({"service.kubernetes.io/headless": ""}),
    ));
    server.apply(service(
        "other-proxy",
        json!({"service.kubernetes.io/service-proxy-name": "foo"}),
    ));
    let client = client_for(&server).await;
    let mut w = spawn_watcher(
        Api::<Service>::all(client),
        watcher::Config::default().labels(PROXY_SELECTOR),
    );

    assert_eq!(w.initial().await, vec!["default/a"]);
    assert_eq!(server.list_requests(), 1);

    // Live create; labelled objects never show up.
    server.apply(service("b", json!({})));
    assert_eq!(w.next_desc().await, "Apply default/b");
    server.apply(service(
        "headless-2",
        json!({"service.kubernetes.io/headless": ""}),
    ));
    let mut modified = service("a", json!({"app": "a"}));
    modified["spec"]["clusterIP"] = json!("10.96.0.11");
    server.apply(modified);
    match w.next().await {
        Event::Apply(svc) => {
            assert_eq!(obj_id(&svc), "default/a");
            let ip = svc.spec.and_then(|s| s.cluster_ip);
            assert_eq!(ip.as_deref(), Some("10.96.0.11"));
        }
        other => panic!("expected Apply default/a, got {}", describe(&other)),
    }

    // A replace that changes nothing is no write at all.
    let before = server.resource_version();
    let mut same = service("a", json!({"app": "a"}));
    same["spec"]["clusterIP"] = json!("10.96.0.11");
    server.apply(same);
    assert_eq!(server.resource_version(), before);

    // Gaining a filtered label is a DELETED for this watch; losing it, ADDED.
    server.apply(service("a", json!({"service.kubernetes.io/headless": ""})));
    assert_eq!(w.next_desc().await, "Delete default/a");
    server.apply(service("headless", json!({})));
    assert_eq!(w.next_desc().await, "Apply default/headless");

    // Deletes, including of an object the watch never saw (not sent).
    server
        .delete("Service", "default", "headless-2")
        .expect("exists");
    server.delete("Service", "default", "b").expect("exists");
    assert_eq!(w.next_desc().await, "Delete default/b");
    w.quiet(Duration::from_millis(300)).await;

    assert_eq!(server.list_requests(), 1, "no relist expected");
    assert!(w.errors.is_empty(), "watch errors: {:?}", w.errors);
}

#[tokio::test]
async fn endpointslices_all_namespaced_and_paged() {
    let server = FakeApiServer::start().await;
    server.apply(slice("default", "web-1", "web", "10.0.0.1"));
    server.apply(slice("default", "web-2", "web", "10.0.0.2"));
    server.apply(slice("other", "db-1", "db", "10.0.1.1"));
    let mut mirrored = slice("default", "mirror", "web", "10.0.0.9");
    mirrored["metadata"]["labels"]["service.kubernetes.io/headless"] = json!("");
    server.apply(mirrored);
    let client = client_for(&server).await;

    // Paged initial list (one object per page) still gives the full set.
    let mut all = spawn_watcher(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default()
            .labels(PROXY_SELECTOR)
            .page_size(1),
    );
    assert_eq!(
        all.initial().await,
        vec!["default/web-1", "default/web-2", "other/db-1"]
    );
    assert_eq!(server.list_requests(), 3, "three pages of one");

    let mut ns = spawn_watcher(
        Api::<EndpointSlice>::namespaced(client.clone(), "other"),
        watcher::Config::default(),
    );
    assert_eq!(ns.initial().await, vec!["other/db-1"]);

    server.apply(slice("default", "web-1", "web", "10.0.0.3"));
    match all.next().await {
        Event::Apply(s) => {
            assert_eq!(obj_id(&s), "default/web-1");
            let endpoints = s.endpoints.unwrap_or_default();
            assert_eq!(endpoints[0].addresses, vec!["10.0.0.3".to_string()]);
        }
        other => panic!("expected Apply default/web-1, got {}", describe(&other)),
    }
    server.apply(slice("other", "db-2", "db", "10.0.1.2"));
    assert_eq!(all.next_desc().await, "Apply other/db-2");
    assert_eq!(ns.next_desc().await, "Apply other/db-2");
    server
        .delete("EndpointSlice", "other", "db-1")
        .expect("exists");
    assert_eq!(all.next_desc().await, "Delete other/db-1");
    assert_eq!(ns.next_desc().await, "Delete other/db-1");

    // Pages are one consistent snapshot: a write between pages is not in
    // the list, and every page carries the first page's version.
    let api = Api::<EndpointSlice>::all(client);
    let first = api
        .list(&ListParams::default().limit(2))
        .await
        .expect("first page");
    assert_eq!(first.items.len(), 2);
    let token = first.metadata.continue_.clone().expect("continue token");
    assert_eq!(first.metadata.remaining_item_count, Some(2));
    server.apply(slice("default", "a-new", "web", "10.0.0.4"));
    let second = api
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .expect("second page");
    assert_eq!(
        second.metadata.resource_version,
        first.metadata.resource_version
    );
    assert!(second.metadata.continue_.is_none_or(|c| c.is_empty()));
    let names: Vec<String> = first
        .items
        .iter()
        .chain(second.items.iter())
        .map(obj_id)
        .collect();
    assert_eq!(
        names,
        vec![
            "default/mirror",
            "default/web-1",
            "default/web-2",
            "other/db-2"
        ]
    );
}

#[tokio::test]
async fn dropped_watch_resumes_without_losing_events() {
    let server = FakeApiServer::start().await;
    server.apply(service("a", json!({})));
    server.apply(service("b", json!({})));
    let client = client_for(&server).await;
    let mut w = spawn_watcher(
        Api::<Service>::all(client),
        watcher::Config::default().labels(PROXY_SELECTOR),
    );
    assert_eq!(w.initial().await, vec!["default/a", "default/b"]);
    wait_for("the watch to open", || server.open_watches() == 1).await;
    assert_eq!(server.watch_requests(), 1);

    // Writes while the connection is down are replayed from the version the
    // client had; writes after the re-watch arrive live.
    server.drop_watches();
    server.apply(service("c", json!({})));
    server.delete("Service", "default", "a").expect("exists");
    wait_for("a second watch", || {
        server.watch_requests() >= 2 && server.open_watches() == 1
    })
    .await;
    server.apply(service("d", json!({})));
    assert_eq!(w.next_desc().await, "Apply default/c");
    assert_eq!(w.next_desc().await, "Delete default/a");
    assert_eq!(w.next_desc().await, "Apply default/d");

    // Bookmarks move the client's version forward without events; after
    // another drop it resumes from there, still without a relist.
    tokio::time::sleep(apiserver::BOOKMARK_INTERVAL * 2).await;
    server.drop_watches();
    wait_for("a third watch", || {
        server.watch_requests() >= 3 && server.open_watches() == 1
    })
    .await;
    server.apply(service("e", json!({})));
    assert_eq!(w.next_desc().await, "Apply default/e");
    w.quiet(Duration::from_millis(300)).await;
    assert_eq!(server.list_requests(), 1, "a resumed watch must not relist");
}

#[tokio::test]
async fn compaction_forces_a_relist_with_correct_state() {
    let server = FakeApiServer::start().await;
    server.apply(service("a", json!({})));
    server.apply(service("b", json!({})));
    let client = client_for(&server).await;
    let mut w = spawn_watcher(
        Api::<Service>::all(client),
        watcher::Config::default().labels(PROXY_SELECTOR),
    );
    assert_eq!(w.initial().await, vec!["default/a", "default/b"]);
    wait_for("the watch to open", || server.open_watches() == 1).await;
    let lists = server.list_requests();

    // `#[tokio::test]` runs on one thread: these writes all land before the
    // watcher task runs again, so the relist must already include them.
    server.compact();
    server.delete("Service", "default", "a").expect("exists");
    server.apply(service("c", json!({})));
    server.apply(service("d", json!({"service.kubernetes.io/headless": ""})));

    // The watch gets 410 Expired; the watcher starts over with a list that
    // shows the state as it is now.
    assert_eq!(w.initial().await, vec!["default/b", "default/c"]);
    assert!(
        w.errors
            .iter()
            .any(|e| e.contains("Expired") || e.contains("410")),
        "expected a 410 error, got {:?}",
        w.errors
    );
    assert_eq!(server.list_requests(), lists + 1);

    // And it watches live again from the new list's version.
    server.apply(service("e", json!({})));
    assert_eq!(w.next_desc().await, "Apply default/e");
}

#[tokio::test]
async fn rewatch_from_compacted_version_gets_410_then_relists() {
    let server = FakeApiServer::start().await;
    server.apply(service("a", json!({})));
    let client = client_for(&server).await;
    let api = Api::<Service>::all(client);
    let old_rv = server.resource_version();
    server.compact();

    // A watch from an expired version: 200 with a single ERROR event.
    let mut stream = api
        .watch(&WatchParams::default(), &old_rv)
        .await
        .expect("watch request")
        .boxed();
    match timeout(WAIT, stream.next()).await.expect("event in time") {
        Some(Ok(WatchEvent::Error(status))) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => panic!("expected ERROR 410, got {other:?}"),
    }
    assert!(
        timeout(WAIT, stream.next())
            .await
            .expect("end in time")
            .is_none()
    );

    // Exact list at an expired version: HTTP 410.
    let exact = ListParams::default()
        .at(&old_rv)
        .matching(VersionMatch::Exact);
    match api.list(&exact).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 410),
        other => panic!("expected 410, got {other:?}"),
    }
    // A version from the future: 504 "Too large resource version" (looked
    // at raw, since kube's client retries 504s by itself).
    let (code, body) = raw_request(
        server.addr(),
        "GET",
        "/api/v1/services?resourceVersion=999999",
    )
    .await;
    assert_eq!(code, 504, "{body}");
    assert_eq!(body["reason"], "Timeout");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("Too large resource version"), "{body}");
    // Not older than an expired version is fine: the current state is.
    let list = api
        .list(
            &ListParams::default()
                .at(&old_rv)
                .matching(VersionMatch::NotOlderThan),
        )
        .await
        .expect("not-older-than list");
    assert_eq!(
        list.metadata.resource_version,
        Some(server.resource_version())
    );
}

#[tokio::test]
async fn watch_semantics_initial_events_bookmarks_and_timeout() {
    let server = FakeApiServer::start().await;
    server.apply(service("a", json!({})));
    server.apply(service("b", json!({"app": "x"})));
    let client = client_for(&server).await;
    let api = Api::<Service>::all(client);
    let rv = server.resource_version();

    // resourceVersion "0": synthetic ADDED for what exists, then changes.
    let mut s = api
        .watch(&WatchParams::default().labels("!app").timeout(2), "0")
        .await
        .expect("watch")
        .boxed();
    match timeout(WAIT, s.next()).await.expect("in time") {
        Some(Ok(WatchEvent::Added(svc))) => assert_eq!(svc.name_any(), "a"),
        other => panic!("expected ADDED a, got {other:?}"),
    }

    // From an exact version: no synthetic events; a bookmark carrying the
    // current version arrives while nothing changes; timeoutSeconds ends it.
    let started = Instant::now();
    let mut s = api
        .watch(&WatchParams::default().timeout(2), &rv)
        .await
        .expect("watch")
        .boxed();
    match timeout(WAIT, s.next()).await.expect("in time") {
        Some(Ok(WatchEvent::Bookmark(bm))) => assert_eq!(bm.metadata.resource_version, rv),
        other => panic!("expected BOOKMARK, got {other:?}"),
    }
    server.apply(service("c", json!({})));
    loop {
        match timeout(WAIT, s.next()).await.expect("in time") {
            Some(Ok(WatchEvent::Bookmark(_))) => continue,
            Some(Ok(WatchEvent::Added(svc))) => {
                assert_eq!(svc.name_any(), "c");
                break;
            }
            other => panic!("expected ADDED c, got {other:?}"),
        }
    }
    while let Some(ev) = timeout(WAIT, s.next()).await.expect("stream ends in time") {
        assert!(
            matches!(ev, Ok(WatchEvent::Bookmark(_))),
            "unexpected {ev:?}"
        );
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(8),
        "timeoutSeconds=2 ended after {took:?}"
    );

    // Streaming list (sendInitialEvents): the watcher's other strategy.
    let mut w = spawn_watcher(
        api.clone(),
        watcher::Config::default().labels("!app").streaming_lists(),
    );
    assert_eq!(w.initial().await, vec!["default/a", "default/c"]);
    server.apply(service("d", json!({})));
    assert_eq!(w.next_desc().await, "Apply default/d");
}

#[tokio::test]
async fn label_selector_forms_and_field_selectors() {
    let server = FakeApiServer::start().await;
    server.apply(service("s1", json!({"app": "web", "tier": "fe"})));
    server.apply(service("s2", json!({"app": "db"})));
    server.apply(service("s3", json!({})));
    server.apply(service(
        "s4",
        json!({"app": "web", "service.kubernetes.io/headless": ""}),
    ));
    let mut elsewhere = service("s5", json!({"app": "web"}));
    elsewhere["metadata"]["namespace"] = json!("other");
    server.apply(elsewhere);
    let client = client_for(&server).await;
    let api = Api::<Service>::namespaced(client.clone(), "default");

    let cases: &[(&str, &[&str])] = &[
        ("", &["s1", "s2", "s3", "s4"]),
        ("app", &["s1", "s2", "s4"]),
        ("!app", &["s3"]),
        ("app=web", &["s1", "s4"]),
        ("app==web", &["s1", "s4"]),
        ("app!=web", &["s2", "s3"]),
        ("app=web,tier=fe", &["s1"]),
        (
            "app in (db, web),!service.kubernetes.io/headless",
            &["s1", "s2"],
        ),
        ("app notin (web)", &["s2", "s3"]),
        (PROXY_SELECTOR, &["s1", "s2", "s3"]),
    ];
    for (selector, expected) in cases {
        let list = api
            .list(&ListParams::default().labels(selector))
            .await
            .unwrap_or_else(|e| panic!("list {selector:?}: {e}"));
        let names: Vec<String> = list.items.iter().map(|s| s.name_any()).collect();
        assert_eq!(&names, expected, "selector {selector:?}");
    }

    let all = Api::<Service>::all(client);
    let list = all
        .list(&ListParams::default().fields("metadata.namespace=other"))
        .await
        .expect("field selector");
    let names: Vec<String> = list.items.iter().map(obj_id).collect();
    assert_eq!(names, vec!["other/s5"]);
    let svc = api.get("s2").await.expect("get");
    assert_eq!(svc.metadata.labels.unwrap_or_default()["app"], "db");
    match api.get("nope").await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 404),
        other => panic!("expected 404, got {other:?}"),
    }
}

#[tokio::test]
async fn malformed_requests_get_status_errors() {
    let server = FakeApiServer::start().await;
    server.apply(service("a", json!({})));
    let bad = [
        "/api/v1/services?labelSelector=app%20in%20(web",
        "/api/v1/services?labelSelector=app%3D%3D%3Dx",
        "/api/v1/services?labelSelector=bad%20key",
        "/api/v1/services?watch=maybe",
        "/api/v1/services?limit=ten",
        "/api/v1/services?limit=-1",
        "/api/v1/services?resourceVersion=abc",
        "/api/v1/services?resourceVersionMatch=Exact",
        "/api/v1/services?resourceVersion=0&resourceVersionMatch=Exact",
        "/api/v1/services?resourceVersion=1&resourceVersionMatch=Sometimes",
        "/api/v1/services?continue=garbage",
        "/api/v1/services?limit=1&continue=1.00.00&resourceVersion=5",
        "/api/v1/services?fieldSelector=spec.clusterIP%3D1.2.3.4",
        "/api/v1/services?watch=true&timeoutSeconds=soon",
        "/api/v1/services?watch=true&resourceVersionMatch=NotOlderThan",
        "/api/v1/services?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan",
    ];
    for path in bad {
        let (code, body) = raw_request(server.addr(), "GET", path).await;
        assert_eq!(code, 400, "{path}: {body}");
        assert_eq!(body["kind"], "Status", "{path}: {body}");
        assert_eq!(body["code"], 400, "{path}: {body}");
        assert_eq!(body["reason"], "BadRequest", "{path}: {body}");
    }

    let (code, body) = raw_request(server.addr(), "GET", "/api/v1/pods").await;
    assert_eq!((code, body["reason"].as_str()), (404, Some("NotFound")));
    let (code, body) = raw_request(
        server.addr(),
        "DELETE",
        "/api/v1/namespaces/default/services/a",
    )
    .await;
    assert_eq!((code, body["code"].as_u64()), (405, Some(405)));

    // Well-formed requests still work, and the list looks like the docs say.
    let (code, body) =
        raw_request(server.addr(), "GET", "/api/v1/namespaces/default/services").await;
    assert_eq!(code, 200);
    assert_eq!(body["kind"], "ServiceList");
    assert_eq!(body["apiVersion"], "v1");
    assert_eq!(
        body["metadata"]["resourceVersion"],
        json!(server.resource_version())
    );
    let item = &body["items"][0]["metadata"];
    assert!(item["uid"].is_string() && item["creationTimestamp"].is_string());
    assert!(item["resourceVersion"].is_string());
    let (code, body) = raw_request(
        server.addr(),
        "GET",
        "/apis/discovery.k8s.io/v1/endpointslices",
    )
    .await;
    assert_eq!(
        (code, body["kind"].as_str()),
        (200, Some("EndpointSliceList"))
    );
}

/// Reads a raw watch response until `drop_watches` or `timeoutSeconds`
/// ends it; returns everything received.
async fn raw_watch(server: &FakeApiServer, path: &str, drop_after_first_event: bool) -> String {
    let exchange = async {
        let addr = server.addr();
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        conn.write_all(req.as_bytes()).await.expect("send request");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut dropped = false;
        loop {
            let n = conn.read(&mut chunk).await.expect("read");
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            if drop_after_first_event && !dropped && text.contains("\"ADDED\"") {
                server.drop_watches();
                dropped = true;
            }
            if !drop_after_first_event && text.ends_with("0\r\n\r\n") {
                break;
            }
        }
        String::from_utf8_lossy(&buf).into_owned()
    };
    timeout(WAIT, exchange).await.expect("raw watch timed out")
}

#[tokio::test]
async fn raw_watch_ends_abruptly_on_drop_and_cleanly_on_timeout() {
    let server = FakeApiServer::start().await;
    server.apply(service("a", json!({})));

    // drop_watches: the connection closes inside the chunked body, with no
    // terminating zero-length chunk, as a reset connection looks.
    let text = raw_watch(&server, "/api/v1/services?watch=true", true).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"type\":\"ADDED\""), "{text}");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "expected an abrupt end: {text:?}"
    );

    // timeoutSeconds: the response ends normally.
    let text = raw_watch(
        &server,
        "/api/v1/services?watch=true&timeoutSeconds=1&resourceVersion=0",
        false,
    )
    .await;
    assert!(text.contains("\"type\":\"ADDED\""), "{text}");
    assert!(
        text.ends_with("0\r\n\r\n"),
        "expected a clean end: {text:?}"
    );
    wait_for("watches to close", || server.open_watches() == 0).await;
}
