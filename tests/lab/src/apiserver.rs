//! An in-process fake kube-apiserver for tests of the Kubernetes source.
//!
//! No kube-apiserver can be installed on the machines this project is built
//! on, so the list/watch code paths (initial list, paging, resumed watches,
//! bookmarks, `410 Gone` and the relist that must follow) would otherwise go
//! untested. This double serves the read side of the Kubernetes API over plain
//! HTTP on 127.0.0.1, with semantics taken from the Kubernetes API
//! documentation ("Kubernetes API Concepts": efficient detection of changes,
//! resource versions, watch bookmarks, streaming lists, retrieving large
//! results in chunks, 410 Gone), not from what any particular client does.
//!
//! What it implements:
//! - Resource types: Services, Endpoints and Nodes (core/v1) and
//!   EndpointSlices (discovery.k8s.io/v1), cluster-wide and, for namespaced
//!   types, per namespace; GET of a collection (list), of a collection with
//!   `watch=true` (watch) and of a single object (get).
//! - One global resourceVersion counter (like etcd's revision). Every write
//!   sets `metadata.resourceVersion`, and `uid`/`creationTimestamp` when the
//!   object has none. A replace that changes nothing is a no-op (no new
//!   version, no event), as on a real server.
//! - List: `labelSelector` (`k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (..)`,
//!   `k notin (..)`, `k>n`, `k<n`), `fieldSelector` (`metadata.name`,
//!   `metadata.namespace`), `resourceVersion` + `resourceVersionMatch` per the
//!   documented table (Most Recent / Any / Not older than / Exact), `limit`
//!   and `continue` with consistent snapshots (every page carries the
//!   resourceVersion of the first one), `remainingItemCount` only when no
//!   selector is given, `410 Gone` for an expired exact version or continue
//!   token, `504` "Too large resource version" for a version from the future.
//! - Watch: newline-delimited `{"type","object"}` events after the given
//!   version; unset/`"0"` start with synthetic ADDED events; an object that
//!   stops matching the selector is sent as DELETED, one that starts matching
//!   as ADDED; `allowWatchBookmarks=true` gives a BOOKMARK every
//!   [`BOOKMARK_INTERVAL`]; `timeoutSeconds` ends the response normally; a
//!   version at or before the compaction point (see
//!   [`FakeApiServer::compact`]) gives a 200 response whose only event is an
//!   ERROR carrying a `Status` with code 410, reason `Expired` (and an open
//!   watch gets the same event when a compaction overtakes it);
//!   `sendInitialEvents=true` (with `resourceVersionMatch=NotOlderThan` and
//!   bookmarks) gives the initial state then a bookmark annotated
//!   `k8s.io/initial-events-end`; [`FakeApiServer::drop_watches`] cuts every
//!   stream off in the middle of the chunked body;
//!   [`FakeApiServer::pause_watches`] holds new watch requests (as a slow or
//!   restarting apiserver would) until [`FakeApiServer::resume_watches`], so
//!   a test can make changes while a client's watch is certainly down.
//! - Malformed or contradictory query parameters: `400` with a `Status` body.
//!
//! Writes are made by the test through [`FakeApiServer`] methods, not HTTP.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

/// How often an open watch that asked for bookmarks gets a BOOKMARK event.
///
/// A real server sends them about once a minute; the API makes no promise
/// about the interval, and a short one lets tests see the watcher's version
/// advance without writes.
pub const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// Server-side watch timeout when the request gives no `timeoutSeconds`
/// (kube-apiserver's default `--min-request-timeout`).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// A resource type served by the double.
struct ResourceType {
    kind: &'static str,
    list_kind: &'static str,
    api_version: &'static str,
    /// Path prefix of the group/version, e.g. `/api/v1`.
    prefix: &'static str,
    /// The resource name used in URLs.
    plural: &'static str,
    namespaced: bool,
}

const RESOURCES: &[ResourceType] = &[
    ResourceType {
        kind: "Service",
        list_kind: "ServiceList",
        api_version: "v1",
        prefix: "/api/v1",
        plural: "services",
        namespaced: true,
    },
    ResourceType {
        kind: "Endpoints",
        list_kind: "EndpointsList",
        api_version: "v1",
        prefix: "/api/v1",
        plural: "endpoints",
        namespaced: true,
    },
    ResourceType {
        kind: "Node",
        list_kind: "NodeList",
        api_version: "v1",
        prefix: "/api/v1",
        plural: "nodes",
        namespaced: false,
    },
    ResourceType {
        kind: "EndpointSlice",
        list_kind: "EndpointSliceList",
        api_version: "discovery.k8s.io/v1",
        prefix: "/apis/discovery.k8s.io/v1",
        plural: "endpointslices",
        namespaced: true,
    },
];

fn resource_by_kind(kind: &str) -> Option<&'static ResourceType> {
    RESOURCES.iter().find(|r| r.kind == kind)
}

/// Identity of a stored object. Ordered like etcd keys
/// (`/registry/<type>/<namespace>/<name>`), which is the order lists use.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ObjKey {
    kind: &'static str,
    namespace: String,
    name: String,
}

impl ObjKey {
    /// The key of `kind` `namespace/name`; the namespace is ignored for
    /// cluster-scoped kinds. None for a kind the double does not serve.
    fn of(kind: &str, namespace: &str, name: &str) -> Option<ObjKey> {
        let res = resource_by_kind(kind)?;
        Some(ObjKey {
            kind: res.kind,
            namespace: if res.namespaced {
                namespace.to_string()
            } else {
                String::new()
            },
            name: name.to_string(),
        })
    }
}

/// One write, kept so that watches can replay changes after a version and
/// lists can be served at an exact (older) version.
struct Change {
    rv: u64,
    key: ObjKey,
    /// The object before the write (None for a create).
    prev: Option<Value>,
    /// The object after the write; for a delete, the last state with the
    /// deletion's resourceVersion (what a DELETED event carries).
    obj: Value,
    deleted: bool,
}

struct Store {
    /// The latest resourceVersion handed out.
    rv: u64,
    /// Every version `<= compacted` is expired: no watch, exact list or
    /// continue token may start from it.
    compacted: u64,
    objects: BTreeMap<ObjKey, Value>,
    /// How many times `compact` ran; lets each open watch notice one.
    compactions: u64,
    /// All changes, in version order. Never trimmed (compaction only moves
    /// `compacted`), so a list at any still-valid version can be rebuilt.
    log: Vec<Change>,
    next_uid: u64,
}

impl Store {
    /// Objects of one type as they were at version `rv` (which must not be
    /// newer than `self.rv`), by undoing the later changes.
    fn snapshot(&self, kind: &'static str, rv: u64) -> BTreeMap<ObjKey, Value> {
        let mut objs: BTreeMap<ObjKey, Value> = self
            .objects
            .iter()
            .filter(|(k, _)| k.kind == kind)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for change in self.log.iter().rev().take_while(|c| c.rv > rv) {
            if change.key.kind != kind {
                continue;
            }
            match &change.prev {
                Some(prev) => {
                    objs.insert(change.key.clone(), prev.clone());
                }
                None => {
                    objs.remove(&change.key);
                }
            }
        }
        objs
    }
}

struct Shared {
    store: Mutex<Store>,
    /// Carries the latest resourceVersion; every write wakes the watches.
    changed: watch::Sender<u64>,
    /// Bumped by `drop_watches`; every open watch aborts its connection.
    drops: watch::Sender<u64>,
    lists: AtomicU64,
    watches: AtomicU64,
    open_watches: AtomicUsize,
    /// `true` while new watch requests are held (see `pause_watches`).
    watch_gate: watch::Sender<bool>,
    /// Watch requests waiting at the gate right now.
    held_watches: AtomicUsize,
}

impl Shared {
    /// The store is only touched by short, non-panicking critical sections,
    /// but a panicking test thread must not take the server down with it.
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Handle on a running fake API server; the control surface for tests.
///
/// Dropping it stops accepting connections and ends every open watch.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeApiServer {
    /// Starts a server on 127.0.0.1 with an ephemeral port, serving until the
    /// handle is dropped. The store starts empty at resourceVersion "1".
    ///
    /// # Panics
    /// If no loopback port can be bound (a broken test machine, not a test
    /// failure the caller could handle).
    pub async fn start() -> FakeApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0 for the fake API server");
        Self::serve(listener)
    }

    /// Like [`start`](Self::start), but serves on a listener the caller
    /// bound, e.g. one created inside a network namespace (a socket stays in
    /// the namespace it was created in, whichever thread serves it), so that
    /// a process running in that namespace can reach the server.
    ///
    /// Must be called from within a tokio runtime (async code, or under
    /// `Runtime::enter`); the server runs on that runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime, or if the listener cannot be handed to tokio.
    pub fn start_on(listener: std::net::TcpListener) -> FakeApiServer {
        listener
            .set_nonblocking(true)
            .expect("making the fake API server's listener non-blocking");
        let listener = tokio::net::TcpListener::from_std(listener)
            .expect("registering the fake API server's listener with tokio");
        Self::serve(listener)
    }

    fn serve(listener: tokio::net::TcpListener) -> FakeApiServer {
        let (changed, _) = watch::channel(1);
        let (drops, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                rv: 1,
                compacted: 0,
                compactions: 0,
                objects: BTreeMap::new(),
                log: Vec::new(),
                next_uid: 1,
            }),
            changed,
            drops,
            lists: AtomicU64::new(0),
            watches: AtomicU64::new(0),
            open_watches: AtomicUsize::new(0),
            watch_gate: watch::channel(false).0,
            held_watches: AtomicUsize::new(0),
        });
        let addr = listener
            .local_addr()
            .expect("local address of the fake API server");
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("fake apiserver stopped: {e}");
            }
        });
        FakeApiServer {
            addr,
            shared,
            server,
        }
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server URL as a kubeconfig or `kube::Config` wants it.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig (one cluster, context and user, no credentials)
    /// pointing at this server, so the code under test can be started with
    /// `--kubeconfig PATH` or `KUBECONFIG=PATH` exactly as against a cluster.
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n  cluster:\n    server: {url}\n\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n\
             preferences: {{}}\n\
             users:\n\
             - name: fake\n  user: {{}}\n",
            url = self.url()
        );
        std::fs::write(path, text)
    }

    /// Creates the object, or replaces the stored one with the same kind,
    /// namespace and name, and notifies watches. Returns the stored object
    /// (with its new `metadata.resourceVersion`).
    ///
    /// `kind` selects the resource type; `apiVersion` is filled in if
    /// missing; a namespaced object without `metadata.namespace` goes to
    /// `default`. An incoming `metadata.resourceVersion` is ignored (this is
    /// a forced replace, not an optimistic-concurrency update). `uid` and
    /// `creationTimestamp` of an existing object are kept. A replace that
    /// changes nothing creates no new version and no event.
    ///
    /// # Panics
    /// If the object has no known `kind` or no `metadata.name`: that is a bug
    /// in the test, not input from the code under test.
    pub fn apply(&self, obj: Value) -> Value {
        let mut obj = obj;
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
        let res = resource_by_kind(kind)
            .unwrap_or_else(|| panic!("FakeApiServer::apply: unsupported kind {kind:?} in {obj}"));
        let Some(map) = obj.as_object_mut() else {
            panic!("FakeApiServer::apply: not a JSON object")
        };
        map.insert("apiVersion".into(), json!(res.api_version));
        let Some(meta) = map
            .entry("metadata")
            .or_insert_with(|| json!({}))
            .as_object_mut()
        else {
            panic!("FakeApiServer::apply: metadata is not an object")
        };
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => panic!("FakeApiServer::apply: {} without metadata.name", res.kind),
        };
        let namespace = if res.namespaced {
            let ns = meta
                .get("namespace")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .unwrap_or("default")
                .to_string();
            meta.insert("namespace".into(), json!(ns));
            ns
        } else {
            meta.remove("namespace");
            String::new()
        };
        meta.remove("resourceVersion");
        let key = ObjKey {
            kind: res.kind,
            namespace,
            name,
        };

        let rv = {
            let mut store = self.shared.lock();
            let prev = store.objects.get(&key).cloned();
            let mut identity = Map::new();
            for field in ["uid", "creationTimestamp"] {
                let kept = prev
                    .as_ref()
                    .and_then(|p| p.get("metadata"))
                    .and_then(|m| m.get(field))
                    .or_else(|| obj.get("metadata").and_then(|m| m.get(field)));
                if let Some(v) = kept {
                    identity.insert(field.into(), v.clone());
                }
            }
            if !identity.contains_key("uid") {
                let n = store.next_uid;
                store.next_uid += 1;
                identity.insert(
                    "uid".into(),
                    json!(format!("00000000-0000-4000-8000-{n:012x}")),
                );
            }
            if !identity.contains_key("creationTimestamp") {
                identity.insert("creationTimestamp".into(), json!(rfc3339_now()));
            }
            if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.extend(identity);
            }
            if let Some(prev) = &prev {
                let mut unversioned = prev.clone();
                if let Some(m) = unversioned
                    .get_mut("metadata")
                    .and_then(Value::as_object_mut)
                {
                    m.remove("resourceVersion");
                }
                if unversioned == obj {
                    return prev.clone();
                }
            }
            store.rv += 1;
            let rv = store.rv;
            set_resource_version(&mut obj, rv);
            store.objects.insert(key.clone(), obj.clone());
            store.log.push(Change {
                rv,
                key,
                prev,
                obj: obj.clone(),
                deleted: false,
            });
            rv
        };
        self.shared.changed.send_replace(rv);
        obj
    }

    /// Deletes an object (namespace `""` for cluster-scoped kinds) and
    /// notifies watches. Returns the last state, carrying the deletion's
    /// resourceVersion as a DELETED event does, or None if there was none.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = ObjKey::of(kind, namespace, name)?;
        let (rv, tombstone) = {
            let mut store = self.shared.lock();
            let prev = store.objects.remove(&key)?;
            store.rv += 1;
            let rv = store.rv;
            let mut tombstone = prev.clone();
            set_resource_version(&mut tombstone, rv);
            store.log.push(Change {
                rv,
                key,
                prev: Some(prev),
                obj: tombstone.clone(),
                deleted: true,
            });
            (rv, tombstone)
        };
        self.shared.changed.send_replace(rv);
        Some(tombstone)
    }

    /// The stored object, if any (namespace `""` for cluster-scoped kinds).
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = ObjKey::of(kind, namespace, name)?;
        self.shared.lock().objects.get(&key).cloned()
    }

    /// The latest resourceVersion (what a list would return now).
    pub fn resource_version(&self) -> String {
        self.shared.lock().rv.to_string()
    }

    /// Abruptly ends every open watch stream: the connection is closed in the
    /// middle of the chunked response, as when a load balancer or the
    /// apiserver itself goes away. A correct client re-watches from the last
    /// version it saw and loses no events.
    pub fn drop_watches(&self) {
        self.shared.drops.send_modify(|g| *g += 1);
    }

    /// Expires every resourceVersion handed out so far, as etcd compaction
    /// does once its history window has moved past them. From now on a watch,
    /// an exact list or a continue token that starts at one of those versions
    /// gets `410 Gone` (reason `Expired`), and the client must relist.
    ///
    /// Every open watch is positioned at one of those versions, so, as etcd
    /// does with watchers behind the compacted revision, each one gets an
    /// ERROR event with a 410 `Status` and its response ends. (A watch that
    /// was asked to start at a future version is left alone.) The version
    /// counter then moves one step, so a relist returns a valid version.
    pub fn compact(&self) {
        let rv = {
            let mut store = self.shared.lock();
            store.compacted = store.rv;
            store.compactions += 1;
            store.rv += 1;
            store.rv
        };
        self.shared.changed.send_replace(rv);
    }

    /// How many list requests (GET of a collection without `watch`) were
    /// served, including rejected ones: a relist shows up as an increase.
    pub fn list_requests(&self) -> u64 {
        self.shared.lists.load(Ordering::SeqCst)
    }

    /// How many watch requests were received, including those answered with
    /// an error: a re-watch shows up as an increase.
    pub fn watch_requests(&self) -> u64 {
        self.shared.watches.load(Ordering::SeqCst)
    }

    /// How many watch streams are open right now, so a test can wait until a
    /// client is watching before it disturbs the stream.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// From now on, new watch requests (not lists or gets) are held before
    /// they are served, until [`resume_watches`](Self::resume_watches): the
    /// client's watch stays down for as long as the test wants. Combined
    /// with [`drop_watches`](Self::drop_watches), every change made while
    /// paused certainly happens while no watch is open; a held request is
    /// then served from the version it asked for (replaying those changes,
    /// or `410 Gone` if [`compact`](Self::compact) expired that version).
    /// Open watches are not affected.
    pub fn pause_watches(&self) {
        self.shared.watch_gate.send_replace(true);
    }

    /// Serves the watch requests held since [`pause_watches`](Self::pause_watches)
    /// and stops holding new ones.
    pub fn resume_watches(&self) {
        self.shared.watch_gate.send_replace(false);
    }

    /// How many watch requests are held by [`pause_watches`](Self::pause_watches)
    /// right now, so a test can wait until a client is trying to re-watch.
    /// Held requests are counted by [`watch_requests`](Self::watch_requests)
    /// only once they are served.
    pub fn held_watches(&self) -> usize {
        self.shared.held_watches.load(Ordering::SeqCst)
    }
}

/// Counts a request held at the watch gate; the count drops with it (also
/// when the client gives up and the request future is dropped).
struct HeldWatch<'a>(&'a Shared);

impl<'a> HeldWatch<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.held_watches.fetch_add(1, Ordering::SeqCst);
        HeldWatch(shared)
    }
}

impl Drop for HeldWatch<'_> {
    fn drop(&mut self) {
        self.0.held_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.server.abort();
        self.drop_watches();
    }
}

fn set_resource_version(obj: &mut Value, rv: u64) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
    }
}

/// The current UTC time as RFC 3339 with second precision, as Kubernetes
/// writes `creationTimestamp`.
fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// ---------------------------------------------------------------------------
// HTTP side
// ---------------------------------------------------------------------------

/// An error answer: HTTP status plus a `Status` object as body.
struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
    retry_after: Option<u32>,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            code: StatusCode::BAD_REQUEST,
            reason: "BadRequest",
            message: message.into(),
            retry_after: None,
        }
    }

    fn gone(message: impl Into<String>) -> Self {
        ApiError {
            code: StatusCode::GONE,
            reason: "Expired",
            message: message.into(),
            retry_after: None,
        }
    }

    fn too_large(requested: u64, current: u64) -> Self {
        ApiError {
            code: StatusCode::GATEWAY_TIMEOUT,
            reason: "Timeout",
            message: format!("Too large resource version: {requested}, current: {current}"),
            retry_after: Some(1),
        }
    }

    fn into_response(self) -> Response {
        let mut body = status_object(self.code.as_u16(), self.reason, &self.message);
        if self.code == StatusCode::GATEWAY_TIMEOUT {
            body["details"] = json!({
                "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                "retryAfterSeconds": self.retry_after.unwrap_or(1),
            });
        }
        let mut resp = json_response(self.code, &body);
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Where a request points: a collection (optionally in one namespace) or
/// one object.
struct Route {
    res: &'static ResourceType,
    namespace: Option<String>,
    name: Option<String>,
}

fn route(path: &str) -> Option<Route> {
    RESOURCES.iter().find_map(|res| {
        let rest = path.strip_prefix(res.prefix)?.strip_prefix('/')?;
        let segs: Vec<&str> = rest.split('/').collect();
        if segs.iter().any(|s| s.is_empty()) {
            return None;
        }
        let (namespace, plural, name) = match segs.as_slice() {
            ["namespaces", ns, plural] if res.namespaced => (Some(*ns), *plural, None),
            ["namespaces", ns, plural, name] if res.namespaced => (Some(*ns), *plural, Some(*name)),
            [plural] => (None, *plural, None),
            [plural, name] if !res.namespaced => (None, *plural, Some(*name)),
            _ => return None,
        };
        (plural == res.plural).then(|| Route {
            res,
            namespace: namespace.map(str::to_string),
            name: name.map(str::to_string),
        })
    })
}

/// Query parameters; the first occurrence of a name wins, as in Go's
/// `url.Values.Get`. Unknown parameters are ignored, as the apiserver does.
struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A boolean as Go's `strconv.ParseBool` reads it; an empty value (as in
    /// `?watch`) counts as true, like the apiserver's query decoder.
    fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some("" | "1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(Some(true)),
            Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(Some(false)),
            Some(v) => Err(ApiError::bad_request(format!(
                "invalid value {v:?} for query parameter {name}: not a boolean"
            ))),
        }
    }

    fn int(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None | Some("") => Ok(None),
            Some(v) => v.parse::<i64>().map(Some).map_err(|_| {
                ApiError::bad_request(format!(
                    "invalid value {v:?} for query parameter {name}: not an integer"
                ))
            }),
        }
    }
}

/// What the `resourceVersion` parameter said.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RvParam {
    Unset,
    Zero,
    At(u64),
}

fn parse_rv(params: &Params) -> Result<RvParam, ApiError> {
    match params.get("resourceVersion") {
        None | Some("") => Ok(RvParam::Unset),
        Some("0") => Ok(RvParam::Zero),
        Some(v) => match v.parse::<u64>() {
            Ok(n) if n > 0 => Ok(RvParam::At(n)),
            _ => Err(ApiError::bad_request(format!(
                "invalid resource version {v:?}: not a resource version this server issued"
            ))),
        },
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RvMatch {
    Exact,
    NotOlderThan,
}

fn parse_rv_match(params: &Params) -> Result<Option<RvMatch>, ApiError> {
    match params.get("resourceVersionMatch") {
        None | Some("") => Ok(None),
        Some("Exact") => Ok(Some(RvMatch::Exact)),
        Some("NotOlderThan") => Ok(Some(RvMatch::NotOlderThan)),
        Some(v) => Err(ApiError::bad_request(format!(
            "resourceVersionMatch: Unsupported value: {v:?}: supported values: \"Exact\", \"NotOlderThan\""
        ))),
    }
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let paused = *shared.watch_gate.borrow();
    if paused && wants_watch(&req) {
        let mut gate = shared.watch_gate.subscribe();
        let _held = HeldWatch::new(&shared);
        // Err only if the sender is gone, which cannot happen while
        // `shared` is alive.
        let _ = gate.wait_for(|paused| !*paused).await;
    }
    match serve(&shared, &req) {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

/// Whether a request asks for a watch (malformed ones are left to `serve`).
fn wants_watch(req: &Request) -> bool {
    Query::<Vec<(String, String)>>::try_from_uri(req.uri())
        .map(|Query(v)| Params(v).bool("watch").ok().flatten() == Some(true))
        .unwrap_or(false)
}

fn serve(shared: &Arc<Shared>, req: &Request) -> Result<Response, ApiError> {
    let Some(route) = route(req.uri().path()) else {
        return Err(ApiError {
            code: StatusCode::NOT_FOUND,
            reason: "NotFound",
            message: "the server could not find the requested resource".into(),
            retry_after: None,
        });
    };
    if req.method() != Method::GET {
        return Err(ApiError {
            code: StatusCode::METHOD_NOT_ALLOWED,
            reason: "MethodNotAllowed",
            message: format!(
                "the fake apiserver only serves GET; tests write through FakeApiServer (got {})",
                req.method()
            ),
            retry_after: None,
        });
    }
    let params = Query::<Vec<(String, String)>>::try_from_uri(req.uri())
        .map(|Query(v)| Params(v))
        .map_err(|e| ApiError::bad_request(format!("malformed query string: {e}")))?;
    let watching = params.bool("watch")?.unwrap_or(false);
    if watching {
        shared.watches.fetch_add(1, Ordering::SeqCst);
        serve_watch(shared, &route, &params)
    } else if let Some(name) = &route.name {
        serve_get(shared, &route, name, &params)
    } else {
        shared.lists.fetch_add(1, Ordering::SeqCst);
        serve_list(shared, &route, &params)
    }
}

/// Label and field selectors plus the namespace/name scope of a request.
struct Filter {
    kind: &'static str,
    namespace: Option<String>,
    name: Option<String>,
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

impl Filter {
    fn new(route: &Route, params: &Params) -> Result<Self, ApiError> {
        Ok(Filter {
            kind: route.res.kind,
            namespace: route.namespace.clone(),
            name: route.name.clone(),
            labels: parse_label_selector(params.get("labelSelector").unwrap_or(""))
                .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?,
            fields: parse_field_selector(params.get("fieldSelector").unwrap_or(""))
                .map_err(ApiError::bad_request)?,
        })
    }

    fn in_scope(&self, key: &ObjKey) -> bool {
        key.kind == self.kind
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| *ns == key.namespace)
            && self.name.as_ref().is_none_or(|n| *n == key.name)
    }

    fn matches(&self, obj: &Value) -> bool {
        let meta = obj.get("metadata");
        let labels = meta
            .and_then(|m| m.get("labels"))
            .and_then(Value::as_object);
        let field = |f: &str| {
            meta.and_then(|m| m.get(f))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        self.labels.iter().all(|r| r.matches(labels))
            && self.fields.iter().all(|r| r.matches(&field(r.field)))
    }

    fn has_selectors(&self) -> bool {
        !self.labels.is_empty() || !self.fields.is_empty()
    }
}

fn serve_get(
    shared: &Arc<Shared>,
    route: &Route,
    name: &str,
    params: &Params,
) -> Result<Response, ApiError> {
    // get: unset = Most Recent, "0" = Any, other = Not older than.
    let rv = parse_rv(params)?;
    let store = shared.lock();
    if let RvParam::At(n) = rv
        && n > store.rv
    {
        return Err(ApiError::too_large(n, store.rv));
    }
    let key = ObjKey {
        kind: route.res.kind,
        namespace: route.namespace.clone().unwrap_or_default(),
        name: name.to_string(),
    };
    match store.objects.get(&key) {
        Some(obj) => Ok(json_response(StatusCode::OK, obj)),
        None => {
            let mut body = status_object(
                404,
                "NotFound",
                &format!("{} \"{name}\" not found", route.res.plural),
            );
            body["details"] = json!({"name": name, "kind": route.res.plural});
            Ok(json_response(StatusCode::NOT_FOUND, &body))
        }
    }
}

fn serve_list(shared: &Arc<Shared>, route: &Route, params: &Params) -> Result<Response, ApiError> {
    let filter = Filter::new(route, params)?;
    let rv = parse_rv(params)?;
    let rv_match = parse_rv_match(params)?;
    let limit = match params.int("limit")? {
        None => None,
        Some(n) if n < 0 => {
            return Err(ApiError::bad_request(format!(
                "limit: Invalid value: {n}: must be >= 0"
            )));
        }
        Some(0) => None,
        Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
    };
    if params.bool("sendInitialEvents")?.is_some() {
        return Err(ApiError::bad_request(
            "sendInitialEvents: Forbidden: sendInitialEvents is forbidden for list",
        ));
    }
    let token = params.get("continue").filter(|t| !t.is_empty());

    let store = shared.lock();
    // (version to serve at, key to start after)
    let (snap_rv, after): (u64, Option<(String, String)>) = if let Some(token) = token {
        // "Continuation": the version comes from the token.
        if let RvParam::At(_) = rv {
            return Err(ApiError::bad_request(
                "specifying resource version is not allowed when using continue",
            ));
        }
        if rv_match.is_some() {
            return Err(ApiError::bad_request(
                "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden when continue is provided",
            ));
        }
        let (snap, ns, name) = decode_continue(token)
            .ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
        if snap <= store.compacted {
            return Err(ApiError::gone(
                "The provided continue parameter is too old to display a consistent list result. \
                 You can start a new list without the continue parameter.",
            ));
        }
        if snap > store.rv {
            return Err(ApiError::bad_request("continue key is not valid"));
        }
        (snap, Some((ns, name)))
    } else {
        let snap = match (rv, rv_match) {
            (RvParam::Unset, None) => store.rv, // Most Recent
            (RvParam::Unset, Some(_)) => {
                return Err(ApiError::bad_request(
                    "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
                ));
            }
            (RvParam::Zero, Some(RvMatch::Exact)) => {
                return Err(ApiError::bad_request(
                    "resourceVersionMatch: Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
                ));
            }
            (RvParam::Zero, _) => store.rv, // Any: the newest is preferred
            (RvParam::At(n), m) => {
                let exact = m == Some(RvMatch::Exact) || (m.is_none() && limit.is_some());
                if n > store.rv {
                    return Err(ApiError::too_large(n, store.rv));
                }
                if exact {
                    if n <= store.compacted {
                        return Err(ApiError::gone(format!(
                            "too old resource version: {n} ({})",
                            store.compacted + 1
                        )));
                    }
                    n
                } else {
                    store.rv // Not older than: the newest satisfies it
                }
            }
        };
        (snap, None)
    };

    let objs = store.snapshot(route.res.kind, snap_rv);
    drop(store);
    let mut matching = objs
        .iter()
        .filter(|(k, v)| filter.in_scope(k) && filter.matches(v))
        .filter(|(k, _)| match &after {
            Some((ns, name)) => (&k.namespace, &k.name) > (ns, name),
            None => true,
        });
    let mut items: Vec<Value> = Vec::new();
    let mut last: Option<&ObjKey> = None;
    let mut more = false;
    for (k, v) in matching.by_ref() {
        if limit.is_some_and(|l| items.len() >= l) {
            more = true;
            break;
        }
        items.push(v.clone());
        last = Some(k);
    }
    let mut metadata = Map::new();
    metadata.insert("resourceVersion".into(), json!(snap_rv.to_string()));
    if more && let Some(last) = last {
        metadata.insert(
            "continue".into(),
            json!(encode_continue(snap_rv, &last.namespace, &last.name)),
        );
        if !filter.has_selectors() {
            // The one item looked at to detect `more`, plus the rest.
            metadata.insert("remainingItemCount".into(), json!(1 + matching.count()));
        }
    }
    let body = json!({
        "kind": route.res.list_kind,
        "apiVersion": route.res.api_version,
        "metadata": metadata,
        "items": items,
    });
    Ok(json_response(StatusCode::OK, &body))
}

fn encode_continue(rv: u64, namespace: &str, name: &str) -> String {
    format!("{rv}.{}.{}", hex_encode(namespace), hex_encode(name))
}

fn decode_continue(token: &str) -> Option<(u64, String, String)> {
    let mut parts = token.split('.');
    let rv = parts.next()?.parse::<u64>().ok()?;
    let ns = hex_decode(parts.next()?)?;
    let name = hex_decode(parts.next()?)?;
    parts.next().is_none().then_some((rv, ns, name))
}

fn hex_encode(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

// ---------------------------------------------------------------------------
// Watch
// ---------------------------------------------------------------------------

fn serve_watch(shared: &Arc<Shared>, route: &Route, params: &Params) -> Result<Response, ApiError> {
    let filter = Filter::new(route, params)?;
    let rv = parse_rv(params)?;
    let rv_match = parse_rv_match(params)?;
    let bookmarks = params.bool("allowWatchBookmarks")?.unwrap_or(false);
    let send_initial = params.bool("sendInitialEvents")?;
    let timeout = match params.int("timeoutSeconds")? {
        None => DEFAULT_WATCH_TIMEOUT,
        Some(n) if n < 0 => {
            return Err(ApiError::bad_request(format!(
                "timeoutSeconds: Invalid value: {n}: must be >= 0"
            )));
        }
        Some(0) => DEFAULT_WATCH_TIMEOUT,
        Some(n) => Duration::from_secs(n.unsigned_abs()),
    };
    if params.get("continue").is_some_and(|c| !c.is_empty()) {
        return Err(ApiError::bad_request(
            "continue: Forbidden: continue is not supported when watch is true",
        ));
    }
    match (send_initial, rv_match) {
        (None, Some(_)) => {
            return Err(ApiError::bad_request(
                "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            ));
        }
        (Some(_), m) if m != Some(RvMatch::NotOlderThan) => {
            return Err(ApiError::bad_request(
                "resourceVersionMatch: Unsupported value: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            ));
        }
        (Some(true), _) if !bookmarks => {
            return Err(ApiError::bad_request(
                "allowWatchBookmarks: Forbidden: allowWatchBookmarks must be set to true when sendInitialEvents is true",
            ));
        }
        _ => {}
    }
    // Synthetic ADDED events: by default for unset and "0" ("Get State and
    // Start at Most Recent/Any"), otherwise as sendInitialEvents says.
    let initial = send_initial.unwrap_or(matches!(rv, RvParam::Unset | RvParam::Zero));

    // Subscribe before looking at the store so that no write is missed.
    let changed_rx = shared.changed.subscribe();
    let drop_rx = shared.drops.subscribe();
    let mut pending: VecDeque<Bytes> = VecDeque::new();
    let mut done = false;
    let store = shared.lock();
    let cursor = match rv {
        RvParam::At(n) if send_initial == Some(true) => {
            // Not older than n: the current state qualifies once it reaches n.
            if n > store.rv {
                return Err(ApiError::too_large(n, store.rv));
            }
            store.rv
        }
        RvParam::At(n) => {
            // Start at Exact. A version from the future is waited for.
            if n <= store.compacted {
                let status = status_object(
                    410,
                    "Expired",
                    &format!("too old resource version: {n} ({})", store.compacted + 1),
                );
                pending.push_back(event_line("ERROR", &status));
                done = true;
            }
            n
        }
        RvParam::Unset | RvParam::Zero => store.rv,
    };
    if initial && !done {
        for (key, obj) in &store.objects {
            if filter.in_scope(key) && filter.matches(obj) {
                pending.push_back(event_line("ADDED", obj));
            }
        }
        if send_initial == Some(true) {
            let mut bm = bookmark_object(route.res, cursor);
            bm["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            pending.push_back(event_line("BOOKMARK", &bm));
        }
    }
    let compactions = store.compactions;
    drop(store);

    shared.open_watches.fetch_add(1, Ordering::SeqCst);
    let now = Instant::now();
    let state = WatchState {
        shared: shared.clone(),
        res: route.res,
        filter,
        cursor,
        pending,
        done,
        bookmarks,
        deadline: now + timeout,
        next_bookmark: now + BOOKMARK_INTERVAL,
        changed_rx,
        drop_rx,
        compactions,
    };
    let stream = futures::stream::unfold(state, WatchState::next);
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

fn bookmark_object(res: &ResourceType, rv: u64) -> Value {
    json!({
        "kind": res.kind,
        "apiVersion": res.api_version,
        "metadata": {"resourceVersion": rv.to_string()},
    })
}

fn event_line(kind: &str, obj: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": obj})
        .to_string()
        .into_bytes();
    line.push(b'\n');
    Bytes::from(line)
}

/// One open watch stream.
struct WatchState {
    shared: Arc<Shared>,
    res: &'static ResourceType,
    filter: Filter,
    /// Every change with a version `<= cursor` has been looked at.
    cursor: u64,
    pending: VecDeque<Bytes>,
    /// End the stream once `pending` is empty.
    done: bool,
    bookmarks: bool,
    deadline: Instant,
    next_bookmark: Instant,
    changed_rx: watch::Receiver<u64>,
    drop_rx: watch::Receiver<u64>,
    /// The store's compaction count when this watch last looked.
    compactions: u64,
}

impl Drop for WatchState {
    fn drop(&mut self) {
        self.shared.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

impl WatchState {
    async fn next(mut self) -> Option<(Result<Bytes, std::io::Error>, Self)> {
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Some((Ok(line), self));
            }
            if self.done {
                return None;
            }
            tokio::select! {
                biased;
                _ = self.drop_rx.changed() => {
                    // An error from the body stream makes hyper close the
                    // connection without the final chunk: an abrupt reset.
                    self.done = true;
                    let err = std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "watch dropped by FakeApiServer::drop_watches",
                    );
                    return Some((Err(err), self));
                }
                _ = tokio::time::sleep_until(self.deadline) => {
                    // timeoutSeconds elapsed: end the response normally.
                    self.done = true;
                }
                r = self.changed_rx.changed() => {
                    if r.is_err() {
                        self.done = true;
                    } else {
                        self.collect();
                    }
                }
                _ = tokio::time::sleep_until(self.next_bookmark), if self.bookmarks => {
                    self.next_bookmark = Instant::now() + BOOKMARK_INTERVAL;
                    let current = self.collect();
                    // A bookmark promises that everything up to its version
                    // has been sent; only give one once the store has caught
                    // up with the version the watch started from.
                    if !self.done && current >= self.cursor {
                        let bm = bookmark_object(self.res, self.cursor);
                        self.pending.push_back(event_line("BOOKMARK", &bm));
                    }
                }
            }
        }
    }

    /// Queues the events for every change after `cursor` and advances it.
    /// Returns the store's current version.
    fn collect(&mut self) -> u64 {
        let store = self.shared.lock();
        if store.compactions != self.compactions {
            self.compactions = store.compactions;
            if self.cursor <= store.compacted {
                // This watch's position is gone: like etcd cancelling a
                // watcher behind the compacted revision.
                let status = status_object(
                    410,
                    "Expired",
                    &format!(
                        "too old resource version: {} ({})",
                        self.cursor,
                        store.compacted + 1
                    ),
                );
                self.pending.push_back(event_line("ERROR", &status));
                self.done = true;
                return store.rv;
            }
        }
        let start = store.log.partition_point(|c| c.rv <= self.cursor);
        for change in &store.log[start..] {
            if !self.filter.in_scope(&change.key) {
                continue;
            }
            let was = change.prev.as_ref().is_some_and(|p| self.filter.matches(p));
            let is = !change.deleted && self.filter.matches(&change.obj);
            let kind = match (was, is) {
                (false, true) => "ADDED",
                (true, true) => "MODIFIED",
                (true, false) => "DELETED",
                (false, false) => continue,
            };
            self.pending.push_back(event_line(kind, &change.obj));
        }
        self.cursor = self.cursor.max(store.rv);
        store.rv
    }
}

// ---------------------------------------------------------------------------
// Selectors
// ---------------------------------------------------------------------------

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq)]
enum LabelReq {
    Exists(String),
    NotExists(String),
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Gt(String, i64),
    Lt(String, i64),
}

impl LabelReq {
    fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        match self {
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            LabelReq::Gt(k, n) => get(k)
                .and_then(|x| x.parse::<i64>().ok())
                .is_some_and(|x| x > *n),
            LabelReq::Lt(k, n) => get(k)
                .and_then(|x| x.parse::<i64>().ok())
                .is_some_and(|x| x < *n),
        }
    }
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("unbalanced ')' in {s:?}"))?;
            }
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced '(' in {s:?}"));
    }
    parts.push(&s[start..]);
    Ok(parts)
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

/// A label key: optional DNS-subdomain prefix and `/`, then a name of at
/// most 63 characters that starts and ends with an alphanumeric.
fn validate_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'))
    });
    if name_ok && prefix_ok {
        Ok(())
    } else {
        Err(format!("invalid label key {key:?}"))
    }
}

/// A label value: empty, or at most 63 characters of `[A-Za-z0-9._-]` that
/// start and end with an alphanumeric.
fn validate_value(value: &str) -> Result<(), String> {
    let ok = value.is_empty()
        || (value.len() <= 63
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && value.starts_with(|c: char| c.is_ascii_alphanumeric())
            && value.ends_with(|c: char| c.is_ascii_alphanumeric()));
    if ok {
        Ok(())
    } else {
        Err(format!("invalid label value {value:?}"))
    }
}

fn parse_value_set(rest: &str) -> Result<Vec<String>, String> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected '(' values ')' but found {rest:?}"))?;
    let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
    for v in &values {
        validate_value(v)?;
    }
    Ok(values)
}

/// Parses a label selector in the syntax of the Kubernetes "Labels and
/// Selectors" documentation: comma-separated requirements, each `key`,
/// `!key`, `key=value`, `key==value`, `key!=value`, `key in (v1,v2)`,
/// `key notin (v1,v2)`, or (as the apiserver also accepts) `key>n`, `key<n`.
fn parse_label_selector(selector: &str) -> Result<Vec<LabelReq>, String> {
    if selector.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut reqs = Vec::new();
    for term in split_top_level(selector)? {
        let term = term.trim();
        if term.is_empty() {
            return Err(format!("empty requirement in {selector:?}"));
        }
        if let Some(key) = term.strip_prefix('!') {
            let key = key.trim();
            validate_key(key)?;
            reqs.push(LabelReq::NotExists(key.to_string()));
            continue;
        }
        let key_len = term.find(|c: char| !is_key_char(c)).unwrap_or(term.len());
        let key = &term[..key_len];
        validate_key(key)?;
        let key = key.to_string();
        let rest = term[key_len..].trim_start();
        let req = if rest.is_empty() {
            LabelReq::Exists(key)
        } else if let Some(v) = rest.strip_prefix("!=") {
            let v = v.trim();
            validate_value(v)?;
            LabelReq::NotEq(key, v.to_string())
        } else if let Some(v) = rest.strip_prefix("==").or_else(|| rest.strip_prefix('=')) {
            let v = v.trim();
            validate_value(v)?;
            LabelReq::Eq(key, v.to_string())
        } else if let Some(v) = rest.strip_prefix('>') {
            let n = v
                .trim()
                .parse::<i64>()
                .map_err(|_| format!("{v:?}: not an integer"))?;
            LabelReq::Gt(key, n)
        } else if let Some(v) = rest.strip_prefix('<') {
            let n = v
                .trim()
                .parse::<i64>()
                .map_err(|_| format!("{v:?}: not an integer"))?;
            LabelReq::Lt(key, n)
        } else if let Some(v) = rest
            .strip_prefix("notin")
            .filter(|v| v.starts_with(|c: char| c.is_whitespace() || c == '('))
        {
            LabelReq::NotIn(key, parse_value_set(v)?)
        } else if let Some(v) = rest
            .strip_prefix("in")
            .filter(|v| v.starts_with(|c: char| c.is_whitespace() || c == '('))
        {
            LabelReq::In(key, parse_value_set(v)?)
        } else {
            return Err(format!("unknown operator in {term:?}"));
        };
        reqs.push(req);
    }
    Ok(reqs)
}

/// One requirement of a field selector.
struct FieldReq {
    field: &'static str,
    value: String,
    negate: bool,
}

impl FieldReq {
    fn matches(&self, actual: &str) -> bool {
        (actual == self.value) != self.negate
    }
}

/// Parses a field selector. Every resource type supports `metadata.name` and
/// `metadata.namespace`; the double supports only those, and rejects others
/// as the apiserver rejects fields a type does not index.
fn parse_field_selector(selector: &str) -> Result<Vec<FieldReq>, String> {
    if selector.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut reqs = Vec::new();
    for term in selector.split(',') {
        let term = term.trim();
        let (field, value, negate) = if let Some((f, v)) = term.split_once("!=") {
            (f, v, true)
        } else if let Some((f, v)) = term.split_once("==") {
            (f, v, false)
        } else if let Some((f, v)) = term.split_once('=') {
            (f, v, false)
        } else {
            return Err(format!("invalid field selector requirement {term:?}"));
        };
        let field = match field.trim() {
            "metadata.name" => "name",
            "metadata.namespace" => "namespace",
            other => return Err(format!("field label not supported: {other}")),
        };
        reqs.push(FieldReq {
            field,
            value: value.trim().to_string(),
            negate,
        });
    }
    Ok(reqs)
}
