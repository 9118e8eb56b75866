//! Desired state from YAML/JSON manifests on disk.
//!
//! `--manifests PATH` names a file or a directory (its `*.yaml`, `*.yml` and
//! `*.json` files, not recursive). Files hold what `kubectl get
//! svc,endpointslices -A -o yaml` prints: one `kind: List`, or a stream of
//! `---`-separated documents, or both. Changes are seen through inotify
//! (with a periodic stat of every file as a safety net); only changed files
//! are re-read, and only the objects that changed are sent on. A relative
//! path is made absolute first: inotify reports absolute paths.
//!
//! A file that fails to parse keeps its last good content (an editor's
//! half-written save does not take Services down); one bad object is skipped
//! and the rest of its file is used.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::convert::Notice;
use super::{NoticeLog, Update, UpdateSender, node_or_log, service_or_log, slice_or_log};
use crate::model::{NodeInfo, ObjectKey, ServiceInfo, SliceInfo};
use crate::vecmap::VecMap;

/// A manifests path that cannot be read at all.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid YAML or JSON: {message}")]
    Yaml { path: PathBuf, message: String },
}

/// What one file contributes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Parsed {
    pub services: Vec<Arc<ServiceInfo>>,
    pub slices: Vec<Arc<SliceInfo>>,
    /// Node objects (the proxy uses the one named like its node).
    pub nodes: Vec<NodeInfo>,
    /// The notices of those Services that have any. Not logged by
    /// [`parse`]: the caller logs them once per Service (a [`NoticeLog`]),
    /// not each time the file is read.
    pub service_notices: BTreeMap<ObjectKey, Vec<Notice>>,
    /// The same for the EndpointSlices.
    pub slice_notices: BTreeMap<ObjectKey, Vec<Notice>>,
}

/// Parses one file's text. Fails only when the text is not YAML at all;
/// objects that are not valid Services or EndpointSlices are logged and
/// skipped.
pub fn parse(text: &str, origin: &Path) -> Result<Parsed, ManifestError> {
    let docs = if looks_like_json(text) {
        parse_json(text, origin)?
    } else {
        parse_yaml(text, origin)?
    };
    let mut out = Parsed::default();
    for doc in docs {
        collect(doc, origin, &mut out);
    }
    Ok(out)
}

/// JSON (what `kubectl get -o json` prints) is YAML too, but a JSON parser
/// reads it about ten times faster: worth it for large clusters.
fn looks_like_json(text: &str) -> bool {
    matches!(text.trim_start().as_bytes().first(), Some(b'{' | b'['))
}

/// One or more JSON values, one after the other.
fn parse_json(text: &str, origin: &Path) -> Result<Vec<Value>, ManifestError> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ManifestError::Yaml {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })
}

/// Every document of a YAML stream. serde_norway (libyaml) reads YAML 1.2
/// scalars, so `namespace: no` stays a string, and it refuses alias
/// expansion bombs; it reads a 10 000-Service dump about twice as fast as
/// the YAML parser kube's client uses.
fn parse_yaml(text: &str, origin: &Path) -> Result<Vec<Value>, ManifestError> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(text)
        .map(Value::deserialize)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ManifestError::Yaml {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })
}

fn collect(doc: Value, origin: &Path, out: &mut Parsed) {
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let kind = kind.as_str();
    match kind {
        "List" | "ServiceList" | "EndpointSliceList" | "NodeList" => {
            if let Value::Object(mut map) = doc
                && let Some(Value::Array(items)) = map.remove("items")
            {
                for item in items {
                    collect(item, origin, out);
                }
            }
        }
        "Service" => {
            if let Some(svc) = deserialize::<Service>(doc, origin, kind)
                && let Some(accepted) = service_or_log(&svc)
            {
                if !accepted.notices.is_empty() {
                    out.service_notices
                        .insert(accepted.info.key.clone(), accepted.notices);
                }
                out.services.push(Arc::new(accepted.info));
            }
        }
        "EndpointSlice" => {
            if let Some(slice) = deserialize::<EndpointSlice>(doc, origin, kind)
                && let Some(accepted) = slice_or_log(&slice)
            {
                if !accepted.notices.is_empty() {
                    out.slice_notices
                        .insert(accepted.info.key.clone(), accepted.notices);
                }
                out.slices.push(Arc::new(accepted.info));
            }
        }
        "Node" => {
            if let Some(node) = deserialize::<Node>(doc, origin, kind)
                && let Some(info) = node_or_log(&node)
            {
                out.nodes.push(info);
            }
        }
        "" if doc.is_null() => {} // an empty document, e.g. a trailing `---`
        other => debug!(file = %origin.display(), kind = other, "object of another kind ignored"),
    }
}

fn deserialize<T: serde::de::DeserializeOwned>(doc: Value, origin: &Path, kind: &str) -> Option<T> {
    let object = format!(
        "{}/{}",
        doc.pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default"),
        doc.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("<unnamed>")
    );
    match serde_path_to_error::deserialize::<_, T>(doc) {
        Ok(v) => Some(v),
        Err(e) => {
            warn!(
                file = %origin.display(),
                kind,
                object,
                field = %e.path(),
                "invalid object skipped: {}",
                e.inner()
            );
            None
        }
    }
}

fn is_manifest_file(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
}

/// A file's version: what tells us, without reading it, that it may have
/// changed. Size and modification time alone miss a rewrite of the same
/// length within one tick of the file-system clock, or one that sets the
/// old modification time back; the inode change time cannot be set back,
/// and a file renamed over another is another inode. Two writes within one
/// tick still look alike here: the inotify event sent at each write's close
/// is what sees those (an event always re-reads, see
/// [`ManifestWatcher::reload`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Version {
    len: u64,
    /// Modification time: seconds, nanoseconds.
    mtime: (i64, i64),
    /// Inode change time: seconds, nanoseconds.
    ctime: (i64, i64),
    dev: u64,
    ino: u64,
}

impl Version {
    fn of(m: &std::fs::Metadata) -> Version {
        Version {
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

/// SHA-256 of a file's content: whether a file read again really changed
/// (parsing is what costs; hashing a large dump costs a few per cent of it).
type ContentDigest = [u8; 32];

/// What the watcher knows of one file.
#[derive(Clone, Copy, Debug)]
struct FileState {
    /// At the last read.
    version: Version,
    /// Of the content at the last read, parsed or not; `None` if the file
    /// could never be read.
    digest: Option<ContentDigest>,
}

/// Which files a path stands for, with their versions.
fn scan(path: &Path) -> Result<BTreeMap<PathBuf, Version>, ManifestError> {
    let read_err = |source| ManifestError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    let files: Vec<PathBuf> = if meta.is_dir() {
        let mut v = Vec::new();
        for entry in std::fs::read_dir(path).map_err(read_err)? {
            let p = entry.map_err(read_err)?.path();
            if is_manifest_file(&p) && p.is_file() {
                v.push(p);
            }
        }
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut out = BTreeMap::new();
    for f in files {
        if let Some(v) = version(&f) {
            out.insert(f, v);
        }
    }
    Ok(out)
}

/// `None` when the file is gone (it can vanish between listing and stat).
fn version(file: &Path) -> Option<Version> {
    std::fs::metadata(file).ok().map(|m| Version::of(&m))
}

/// Loads every file once (a one-shot read, and a check at start-up).
pub fn load(path: &Path) -> Result<Parsed, ManifestError> {
    let mut watcher = ManifestWatcher::new(path.to_path_buf());
    watcher.rescan()?;
    Ok(watcher.current())
}

/// Every definition of each object, by file: the effective one is the one
/// from the last file in path order ("the last definition wins").
type Definitions<T> = BTreeMap<ObjectKey, VecMap<PathBuf, T>>;

/// Object-level changes caused by re-reading some files.
#[derive(Debug, Default, PartialEq)]
struct Delta {
    services: Vec<(ObjectKey, Option<Arc<ServiceInfo>>)>,
    slices: Vec<(ObjectKey, Option<Arc<SliceInfo>>)>,
    nodes: Vec<(ObjectKey, Option<NodeInfo>)>,
}

impl Delta {
    fn is_empty(&self) -> bool {
        self.services.is_empty() && self.slices.is_empty() && self.nodes.is_empty()
    }

    fn into_updates(self) -> impl Iterator<Item = Update> {
        let services = self.services.into_iter().map(|(k, v)| match v {
            Some(s) => Update::ServiceApplied(s),
            None => Update::ServiceDeleted(k),
        });
        let slices = self.slices.into_iter().map(|(k, v)| match v {
            Some(s) => Update::SliceApplied(s),
            None => Update::SliceDeleted(k),
        });
        let nodes = self.nodes.into_iter().map(|(k, v)| match v {
            Some(n) => Update::NodeApplied(n),
            None => Update::NodeDeleted(k),
        });
        services.chain(slices).chain(nodes)
    }
}

/// The Services, EndpointSlices and Nodes one file defines.
type Owned = (Vec<ObjectKey>, Vec<ObjectKey>, Vec<ObjectKey>);

/// Keeps the last good parse of each file, and turns file changes into
/// object changes: re-reading one file costs that file, not the whole path.
struct ManifestWatcher {
    /// The manifests path, absolute: inotify names the files it reports by
    /// absolute paths (notify joins a relative watch path to the working
    /// directory), and [`ManifestWatcher::concerns`] compares those with
    /// this.
    root: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    services: Definitions<Arc<ServiceInfo>>,
    slices: Definitions<Arc<SliceInfo>>,
    nodes: Definitions<NodeInfo>,
    /// Which objects each file defined at its last good parse.
    owned: BTreeMap<PathBuf, Owned>,
    /// Notices logged once per Service, not at each re-read of its file.
    service_notices: NoticeLog,
    slice_notices: NoticeLog,
}

impl ManifestWatcher {
    fn new(root: PathBuf) -> Self {
        // Fails only without a working directory; the path as given then
        // still works, changes being seen by the periodic rescan.
        let root = std::path::absolute(&root).unwrap_or(root);
        ManifestWatcher {
            root,
            files: BTreeMap::new(),
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            nodes: BTreeMap::new(),
            owned: BTreeMap::new(),
            service_notices: NoticeLog::new("Service"),
            slice_notices: NoticeLog::new("EndpointSlice"),
        }
    }

    /// The directory to watch: the path itself, or the directory of the
    /// file (so that a file replaced by rename is still seen).
    fn watch_dir(&self) -> PathBuf {
        if self.root.is_dir() {
            return self.root.clone();
        }
        self.root
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    }

    /// Whether a path named by a change event concerns us.
    fn concerns(&self, p: &Path) -> bool {
        if p == self.root {
            return true;
        }
        p.parent() == Some(self.root.as_path()) && is_manifest_file(p)
    }

    /// Stats every file and re-reads those whose version changed.
    fn rescan(&mut self) -> Result<Delta, ManifestError> {
        let now = scan(&self.root)?;
        let changed: Vec<PathBuf> = now
            .iter()
            .filter(|(f, v)| self.files.get(*f).map(|s| &s.version) != Some(v))
            .map(|(f, _)| f.clone())
            .chain(self.files.keys().filter(|f| !now.contains_key(*f)).cloned())
            .collect();
        Ok(self.reload(changed))
    }

    /// Re-reads these files (a file that is gone takes its objects away).
    ///
    /// Every file named is read, whatever its version says: an inotify
    /// event names a file whose content may have changed even though its
    /// size and times did not (two writes of the same length within one
    /// clock tick). Only content that differs from the last read is parsed.
    fn reload(&mut self, files: impl IntoIterator<Item = PathBuf>) -> Delta {
        let mut before_services = BTreeMap::new();
        let mut before_slices = BTreeMap::new();
        let mut before_nodes = BTreeMap::new();
        for file in files {
            let parsed = match self.read_if_changed(&file) {
                Read::Gone => Parsed::default(),
                Read::Unchanged => continue,
                Read::Changed(p) => p,
            };
            self.log_notices(&parsed);
            let (old_services, old_slices, old_nodes) =
                self.owned.remove(&file).unwrap_or_default();
            let keys = (
                replace_file(
                    &mut self.services,
                    &file,
                    old_services,
                    parsed.services,
                    &mut before_services,
                ),
                replace_file(
                    &mut self.slices,
                    &file,
                    old_slices,
                    parsed.slices,
                    &mut before_slices,
                ),
                replace_file(
                    &mut self.nodes,
                    &file,
                    old_nodes,
                    parsed.nodes,
                    &mut before_nodes,
                ),
            );
            self.owned.insert(file, keys);
        }
        let delta = Delta {
            services: changes(&mut self.services, before_services),
            slices: changes(&mut self.slices, before_slices),
            nodes: changes(&mut self.nodes, before_nodes),
        };
        for (k, _) in delta.services.iter().filter(|(_, v)| v.is_none()) {
            self.service_notices.forget(k);
        }
        for (k, _) in delta.slices.iter().filter(|(_, v)| v.is_none()) {
            self.slice_notices.forget(k);
        }
        delta
    }

    /// Reads a file and parses it if its content changed since the last
    /// read. A file that cannot be read or parsed keeps its last good
    /// content (and warns once per content, not at every event).
    fn read_if_changed(&mut self, file: &Path) -> Read {
        let Some(version) = version(file) else {
            if self.files.remove(file).is_some() || self.owned.contains_key(file) {
                return Read::Gone;
            }
            return Read::Unchanged;
        };
        let before = self.files.get(file).and_then(|s| s.digest);
        let bytes = match std::fs::read(file) {
            Ok(b) => b,
            Err(source) => {
                warn!(file = %file.display(), error = %source, "cannot read manifests file; keeping its last good content");
                // Not read again by the rescan until it changes: one
                // warning per change, not one per rescan interval.
                let state = FileState {
                    version,
                    digest: before,
                };
                self.files.insert(file.to_path_buf(), state);
                return Read::Unchanged;
            }
        };
        let digest: ContentDigest = Sha256::digest(&bytes).into();
        let state = FileState {
            version,
            digest: Some(digest),
        };
        self.files.insert(file.to_path_buf(), state);
        if before == Some(digest) {
            return Read::Unchanged;
        }
        let parsed = std::str::from_utf8(&bytes)
            .map_err(|e| ManifestError::Yaml {
                path: file.to_path_buf(),
                message: e.to_string(),
            })
            .and_then(|text| parse(text, file));
        match parsed {
            Ok(p) => Read::Changed(p),
            Err(e) => {
                warn!("{e}; keeping the file's last good content");
                Read::Unchanged
            }
        }
    }

    /// Logs the notices of the objects of one file read, those not logged
    /// yet for the same object.
    fn log_notices(&mut self, parsed: &Parsed) {
        for s in &parsed.services {
            let notices = parsed.service_notices.get(&s.key);
            self.service_notices
                .log(&s.key, notices.map(Vec::as_slice).unwrap_or_default());
        }
        for s in &parsed.slices {
            let notices = parsed.slice_notices.get(&s.key);
            self.slice_notices
                .log(&s.key, notices.map(Vec::as_slice).unwrap_or_default());
        }
    }

    /// The effective objects of every file.
    fn current(&self) -> Parsed {
        Parsed {
            services: self
                .services
                .values()
                .filter_map(|d| d.values().next_back().cloned())
                .collect(),
            slices: self
                .slices
                .values()
                .filter_map(|d| d.values().next_back().cloned())
                .collect(),
            nodes: self
                .nodes
                .values()
                .filter_map(|d| d.values().next_back().cloned())
                .collect(),
            ..Parsed::default()
        }
    }
}

/// What reading one file gave.
enum Read {
    /// The file is gone: its objects go too.
    Gone,
    /// Same content as at the last read, or nothing usable: keep what it
    /// defined.
    Unchanged,
    Changed(Parsed),
}

/// What the manifests source needs of an object.
trait Keyed: Clone + PartialEq {
    const KIND: &'static str;
    fn key(&self) -> &ObjectKey;
}

impl Keyed for Arc<ServiceInfo> {
    const KIND: &'static str = "Service";
    fn key(&self) -> &ObjectKey {
        &self.key
    }
}

impl Keyed for NodeInfo {
    const KIND: &'static str = "Node";
    fn key(&self) -> &ObjectKey {
        &self.key
    }
}

impl Keyed for Arc<SliceInfo> {
    const KIND: &'static str = "EndpointSlice";
    fn key(&self) -> &ObjectKey {
        &self.key
    }
}

fn effective<T: Clone>(defs: &Definitions<T>, k: &ObjectKey) -> Option<T> {
    defs.get(k).and_then(|d| d.values().next_back().cloned())
}

/// Replaces what `file` defines (`old` keys) by `new`, remembering in
/// `before` each touched object's effective value before the first change.
/// Returns the keys `file` now defines.
fn replace_file<T: Keyed>(
    defs: &mut Definitions<T>,
    file: &Path,
    old: Vec<ObjectKey>,
    new: Vec<T>,
    before: &mut BTreeMap<ObjectKey, Option<T>>,
) -> Vec<ObjectKey> {
    for k in old {
        before
            .entry(k.clone())
            .or_insert_with(|| effective(defs, &k));
        if let Some(d) = defs.get_mut(&k) {
            d.remove(file);
        }
    }
    let mut keys = Vec::with_capacity(new.len());
    for obj in new {
        let k = obj.key().clone();
        before
            .entry(k.clone())
            .or_insert_with(|| effective(defs, &k));
        let d = defs.entry(k.clone()).or_default();
        if d.insert(file.to_path_buf(), obj).is_some() || d.len() > 1 {
            warn!(file = %file.display(), kind = T::KIND, object = %k, "defined more than once; the last definition wins");
        }
        keys.push(k);
    }
    keys
}

/// The touched objects whose effective value differs from `before`.
fn changes<T: Keyed>(
    defs: &mut Definitions<T>,
    before: BTreeMap<ObjectKey, Option<T>>,
) -> Vec<(ObjectKey, Option<T>)> {
    let mut out = Vec::new();
    for (k, old) in before {
        let now = effective(defs, &k);
        if now.is_none() {
            defs.remove(&k);
        }
        if old != now {
            out.push((k, now));
        }
    }
    out
}

/// Which file-system events mean "a file may have new content". Plain data
/// writes are ignored (the file is half-written); the close after writing,
/// a rename or a creation is what counts.
fn is_content_event(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Create(_)
            | EventKind::Modify(ModifyKind::Name(_))
            | EventKind::Modify(ModifyKind::Any)
            | EventKind::Remove(_)
            | EventKind::Any
            | EventKind::Other
    )
}

/// What a change notification asks the watcher to do.
enum Work {
    /// Stat every file (periodic safety net, or inotify lost events).
    Rescan,
    /// Re-read these files.
    Reload(BTreeSet<PathBuf>),
}

impl Work {
    fn run(self, w: &mut ManifestWatcher) -> Result<Delta, ManifestError> {
        match self {
            Work::Rescan => w.rescan(),
            Work::Reload(files) => Ok(w.reload(files)),
        }
    }
}

/// Runs `f` on the watcher on a blocking thread and hands the watcher back.
async fn blocking<T: Send + 'static>(
    mut watcher: ManifestWatcher,
    f: impl FnOnce(&mut ManifestWatcher) -> T + Send + 'static,
) -> Result<(ManifestWatcher, T), ManifestError> {
    tokio::task::spawn_blocking(move || {
        let out = f(&mut watcher);
        (watcher, out)
    })
    .await
    .map_err(|e| ManifestError::Read {
        path: PathBuf::new(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Watches `path` and sends changes until `cancel` fires. The first load is
/// sent as full replacements (even when empty, so the reconciler knows the
/// source is synced); afterwards only the objects that changed are sent.
///
/// Changes are noticed through inotify at once; every `rescan_interval` the
/// files are also stat-ed, in case an event was missed (e.g. a network file
/// system, or a writer that never closes the file).
pub async fn run(
    path: PathBuf,
    rescan_interval: Duration,
    tx: UpdateSender,
    cancel: CancellationToken,
) -> Result<(), ManifestError> {
    let mut watcher = ManifestWatcher::new(path.clone());
    // Reading and parsing can take a second for a large cluster: never on
    // an async worker, where it would stall the connections it runs.
    let first;
    (watcher, first) = blocking(watcher, |w| w.rescan().map(|_| w.current())).await?;
    let first = first?;
    info!(
        path = %path.display(),
        services = first.services.len(),
        slices = first.slices.len(),
        "manifests loaded"
    );
    if tx.send(Update::Nodes(first.nodes)).await.is_err()
        || tx.send(Update::Services(first.services)).await.is_err()
        || tx.send(Update::Slices(first.slices)).await.is_err()
    {
        return Ok(());
    }

    // inotify: the callback runs on notify's thread and only forwards.
    let (ev_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let watch_dir = watcher.watch_dir();
    let _inotify = match notify::recommended_watcher(move |ev| {
        let _ = ev_tx.send(ev);
    })
    .and_then(|mut w| w.watch(&watch_dir, RecursiveMode::NonRecursive).map(|()| w))
    {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(path = %watch_dir.display(), error = %e, "cannot watch for changes; polling only");
            None
        }
    };

    let mut ticker = tokio::time::interval(rescan_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        let work = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = ticker.tick() => Work::Rescan,
            Some(first) = events.recv() => {
                // Take every event already queued: one reload per burst.
                let mut files = BTreeSet::new();
                let mut full = false;
                let mut next = Some(first);
                while let Some(ev) = next {
                    match ev {
                        Ok(ev) if ev.need_rescan() => full = true,
                        Ok(ev) if is_content_event(&ev.kind) => {
                            files.extend(ev.paths.into_iter().filter(|p| watcher.concerns(p)));
                        }
                        Ok(_) => {}
                        Err(e) => {
                            debug!(error = %e, "file watch error; rescanning");
                            full = true;
                        }
                    }
                    next = events.try_recv().ok();
                }
                if full {
                    Work::Rescan
                } else if files.is_empty() {
                    continue;
                } else {
                    Work::Reload(files)
                }
            }
        };
        let delta;
        (watcher, delta) = match blocking(watcher, move |w| work.run(w)).await {
            Ok(r) => r,
            Err(e) => {
                warn!("{e}");
                return Err(e);
            }
        };
        let delta = match delta {
            Ok(d) => d,
            Err(e) => {
                warn!("{e}; keeping the last good content");
                continue;
            }
        };
        if delta.is_empty() {
            continue;
        }
        info!(
            path = %path.display(),
            services = delta.services.len(),
            slices = delta.slices.len(),
            "manifests changed"
        );
        for update in delta.into_updates() {
            if tx.send(update).await.is_err() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ObjectKey;
    use crate::source::captured_log;
    use std::time::SystemTime;

    const KUBECTL_LIST: &str = r#"
apiVersion: v1
items:
- apiVersion: v1
  kind: Service
  metadata:
    name: web
    namespace: shop
    resourceVersion: "123"
  spec:
    clusterIP: 10.96.0.10
    clusterIPs: [10.96.0.10]
    ports:
    - name: http
      port: 80
      protocol: TCP
      targetPort: 8080
    type: ClusterIP
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata:
    name: web-x1
    namespace: shop
    labels:
      kubernetes.io/service-name: web
  addressType: IPv4
  endpoints:
  - addresses: [10.1.0.1]
    conditions: {ready: true}
  ports:
  - name: http
    port: 8080
    protocol: TCP
kind: List
metadata:
  resourceVersion: ""
"#;

    #[test]
    fn parses_kubectl_list_output() {
        let p = parse(KUBECTL_LIST, Path::new("t.yaml")).unwrap();
        assert_eq!(p.services.len(), 1);
        assert_eq!(p.services[0].key, ObjectKey::new("shop", "web"));
        assert_eq!(p.slices.len(), 1);
        assert_eq!(p.slices[0].service, ObjectKey::new("shop", "web"));
    }

    #[test]
    fn parses_multi_document_streams_and_skips_bad_objects() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: bad-port}
spec: {clusterIP: 10.96.0.2, ports: [{port: "eighty"}]}
---
apiVersion: v1
kind: Service
metadata: {name: bad-ip}
spec: {clusterIP: 10.96.0.999, ports: [{port: 80}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored}
---
apiVersion: v1
kind: Service
metadata: {name: b}
spec: {clusterIP: 10.96.0.3, ports: [{port: 81}]}
---
"#;
        let p = parse(text, Path::new("t.yaml")).unwrap();
        let names: Vec<_> = p.services.iter().map(|s| &*s.key.name).collect();
        assert_eq!(names, vec!["a", "b"]);
    }

    #[test]
    fn large_cluster_dumps_parse() {
        // 3 000 Services + slices: as large as a `kubectl get -A -o yaml`
        // of a big cluster, and over the node budget that rejected such
        // dumps with the YAML parser used before (serde-saphyr).
        let mut text = String::from("apiVersion: v1\nkind: List\nitems:\n");
        for i in 0..3000 {
            text.push_str(&format!(
                "- apiVersion: v1\n  kind: Service\n  metadata: {{name: s{i}, namespace: big}}\n  spec: {{clusterIP: 10.96.{}.{}, ports: [{{name: a, port: 80}}, {{name: b, port: 81}}]}}\n\
                 - apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata: {{name: s{i}-x, namespace: big, labels: {{kubernetes.io/service-name: s{i}}}}}\n  addressType: IPv4\n  endpoints: [{{addresses: [10.1.0.1]}}, {{addresses: [10.1.0.2]}}]\n  ports: [{{name: a, port: 8080}}, {{name: b, port: 8081}}]\n",
                i / 250,
                i % 250 + 1
            ));
        }
        let p = parse(&text, Path::new("big.yaml")).unwrap();
        assert_eq!((p.services.len(), p.slices.len()), (3000, 3000));
        // Separate documents too.
        let docs = (0..2000)
            .map(|i| one_service(&format!("d{i}"), "10.96.0.1", 80))
            .collect::<Vec<_>>()
            .join("---\n");
        assert_eq!(
            parse(&docs, Path::new("docs.yaml")).unwrap().services.len(),
            2000
        );
    }

    #[test]
    fn parses_kubectl_json_output() {
        // `kubectl get -o json` output; also a stream of two JSON values.
        let list: Value = parse_yaml(KUBECTL_LIST, Path::new("t.yaml"))
            .unwrap()
            .remove(0);
        let text = serde_json::to_string_pretty(&list).unwrap();
        let p = parse(&text, Path::new("t.json")).unwrap();
        assert_eq!((p.services.len(), p.slices.len()), (1, 1));
        let two = format!("{text}\n{text}");
        assert_eq!(parse(&two, Path::new("t.json")).unwrap().services.len(), 2);
        let e = parse("{\"kind\": ", Path::new("bad.json")).unwrap_err();
        assert!(e.to_string().contains("bad.json"), "{e}");
    }

    #[test]
    fn yaml_1_2_scalars_keep_short_words_as_strings() {
        // YAML 1.1 reads `no`, `n`, `off` as booleans (the "Norway problem").
        let p = parse(
            "apiVersion: v1\nkind: Service\nmetadata: {name: off, namespace: no}\n\
             spec: {clusterIP: 10.96.0.1, ports: [{name: n, port: 80}]}\n",
            Path::new("t.yaml"),
        )
        .unwrap();
        assert_eq!(p.services[0].key, ObjectKey::new("no", "off"));
        assert_eq!(p.services[0].ports[0].name, "n");
    }

    #[test]
    fn alias_bombs_are_still_refused() {
        let bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]\n";
        assert!(parse(bomb, Path::new("bomb.yaml")).is_err());
    }

    #[test]
    fn unparsable_yaml_is_an_error_naming_the_file() {
        let e = parse("kind: Service\n  metadata: [", Path::new("broken.yaml")).unwrap_err();
        assert!(e.to_string().contains("broken.yaml"), "{e}");
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ku-manifests-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn one_service(name: &str, ip: &str, port: u16) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: {port}}}]}}\n"
        )
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_content() {
        let dir = temp_dir("broken");
        let f = dir.join("svc.yaml");
        std::fs::write(&f, KUBECTL_LIST).unwrap();
        std::fs::write(dir.join("notes.txt"), "not a manifest").unwrap();
        let mut w = ManifestWatcher::new(dir.clone());
        let d = w.rescan().unwrap();
        assert_eq!((d.services.len(), d.slices.len()), (1, 1));
        assert_eq!(w.current().services.len(), 1);
        assert!(w.rescan().unwrap().is_empty(), "no change, no delta");
        std::fs::write(&f, "kind: [").unwrap();
        assert!(
            w.rescan().unwrap().is_empty(),
            "a broken file changes nothing"
        );
        assert_eq!(w.current().services.len(), 1, "last good content kept");
        std::fs::remove_file(&f).unwrap();
        let d = w.rescan().unwrap();
        assert_eq!(d.services, vec![(ObjectKey::new("shop", "web"), None)]);
        assert_eq!(d.slices, vec![(ObjectKey::new("shop", "web-x1"), None)]);
        assert!(w.current().services.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_changed_objects_are_reported() {
        let dir = temp_dir("delta");
        let a = dir.join("a.yaml");
        let b = dir.join("b.yaml");
        std::fs::write(
            &a,
            one_service("one", "10.96.0.1", 80) + "---\n" + &one_service("two", "10.96.0.2", 80),
        )
        .unwrap();
        std::fs::write(&b, one_service("three", "10.96.0.3", 80)).unwrap();
        let mut w = ManifestWatcher::new(dir.clone());
        assert_eq!(w.rescan().unwrap().services.len(), 3);
        // Rewrite a.yaml with "two" changed: only "two" is reported.
        std::fs::write(
            &a,
            one_service("one", "10.96.0.1", 80) + "---\n" + &one_service("two", "10.96.0.2", 8080),
        )
        .unwrap();
        let d = w.reload([a.clone()]);
        assert_eq!(d.services.len(), 1);
        assert_eq!(&*d.services[0].0.name, "two");
        assert_eq!(d.services[0].1.as_ref().unwrap().ports[0].port, 8080);
        // Re-reading an unchanged file reports nothing.
        assert!(w.reload([b.clone()]).is_empty());
        // Moving "three" from b.yaml into a.yaml (same content) is no change
        // once both files are read.
        std::fs::write(
            &a,
            one_service("one", "10.96.0.1", 80)
                + "---\n"
                + &one_service("two", "10.96.0.2", 8080)
                + "---\n"
                + &one_service("three", "10.96.0.3", 80),
        )
        .unwrap();
        std::fs::remove_file(&b).unwrap();
        assert!(w.reload([a.clone(), b.clone()]).is_empty());
        assert_eq!(w.current().services.len(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_last_file_wins_for_duplicates_and_its_removal_restores_the_other() {
        let dir = temp_dir("dup");
        let a = dir.join("a.yaml");
        let b = dir.join("b.yaml");
        std::fs::write(&a, one_service("web", "10.96.0.1", 80)).unwrap();
        std::fs::write(&b, one_service("web", "10.96.0.1", 81)).unwrap();
        let mut w = ManifestWatcher::new(dir.clone());
        w.rescan().unwrap();
        assert_eq!(w.current().services[0].ports[0].port, 81);
        std::fs::remove_file(&b).unwrap();
        let d = w.rescan().unwrap();
        assert_eq!(d.services.len(), 1);
        assert_eq!(d.services[0].1.as_ref().unwrap().ports[0].port, 80);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Loads `text` as the one file of a directory, as the source does, and
    /// returns what it defines with what was logged.
    fn load_logged(tag: &str, text: &str) -> (Parsed, String) {
        let dir = temp_dir(tag);
        std::fs::write(dir.join("m.yaml"), text).unwrap();
        let mut w = ManifestWatcher::new(dir.clone());
        let (r, log) = captured_log(|| w.rescan().map(|_| w.current()));
        std::fs::remove_dir_all(&dir).unwrap();
        (r.unwrap(), log)
    }

    #[test]
    fn unknown_lb_algorithm_falls_back_to_the_default_and_keeps_the_service() {
        let text = "apiVersion: v1\nkind: Service\n\
                    metadata: {name: web, annotations: {kube-uproxy.io/lb-algorithm: fastest}}\n\
                    spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
        let (p, log) = load_logged("algorithm", text);
        assert_eq!(p.services.len(), 1, "the Service is kept");
        assert_eq!(p.services[0].algorithm, None, "the default is used");
        assert!(
            log.contains("default/web") && log.contains("kube-uproxy.io/lb-algorithm"),
            "no warning naming the Service and the annotation:\n{log}"
        );
    }

    #[test]
    fn one_bad_address_skips_the_endpoint_not_the_slice() {
        let text = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                    metadata: {name: web-x, labels: {kubernetes.io/service-name: web}}\n\
                    addressType: IPv4\nports: [{port: 8080}]\n\
                    endpoints: [{addresses: [10.1.0.1]}, {addresses: [nope]}, {addresses: ['fd00::1']},\n\
                    {addresses: []}, {addresses: ['::ffff:10.1.0.9']}, {addresses: [10.1.0.2]}]\n";
        let (p, log) = load_logged("bad-address", text);
        assert_eq!(p.slices.len(), 1, "the slice is kept");
        let kept: Vec<String> = p.slices[0]
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        assert_eq!(kept, vec!["10.1.0.1", "10.1.0.2"]);
        for field in [
            "endpoints[1].addresses[0]",
            "endpoints[2].addresses[0]",
            "endpoints[3].addresses",
            "endpoints[4].addresses[0]",
        ] {
            assert!(
                log.lines()
                    .any(|l| l.contains("default/web-x") && l.contains(field)),
                "no warning naming {field}:\n{log}"
            );
        }
    }

    /// A Service using every field the proxy does not honour yet (and an
    /// unknown `sessionAffinity`).
    fn unhonoured_service(name: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
             spec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.5\n  externalIPs: [192.0.2.7]\n\
             \x20 sessionAffinity: Sticky\n  internalTrafficPolicy: Local\n\
             \x20 externalTrafficPolicy: Local\n  trafficDistribution: PreferSameZone\n\
             \x20 ports: [{{name: http, port: 80, nodePort: 30080}}, {{name: sctp, port: 53, protocol: SCTP, nodePort: 30053}}]\n\
             status: {{loadBalancer: {{ingress: [{{hostname: lb.example}}]}}}}\n"
        )
    }

    const UNHONOURED_FIELDS: [&str; 3] = [
        "status.loadBalancer.ingress",
        "spec.sessionAffinity",
        "spec.ports[1]",
    ];

    fn count_lines(log: &str, object: &str, field: &str) -> usize {
        log.lines()
            .filter(|l| l.contains(object) && l.contains(field))
            .count()
    }

    #[test]
    fn unhonoured_fields_are_logged_once_per_service() {
        let dir = temp_dir("unhonoured");
        let f = dir.join("svc.yaml");
        let with_other =
            |port| unhonoured_service("lb") + "---\n" + &one_service("other", "10.96.0.6", port);
        std::fs::write(&f, with_other(80)).unwrap();
        let mut w = ManifestWatcher::new(dir.clone());
        let (_, log) = captured_log(|| w.rescan().unwrap());
        for field in UNHONOURED_FIELDS {
            assert_eq!(
                count_lines(&log, "default/lb", field),
                1,
                "{field} not logged once:\n{log}"
            );
        }
        // The file is re-read because another Service changed: the
        // unchanged one logs nothing again.
        std::fs::write(&f, with_other(81)).unwrap();
        let (d, log) = captured_log(|| w.reload([f.clone()]));
        assert_eq!(d.services.len(), 1);
        assert_eq!(count_lines(&log, "default/lb", ""), 0, "{log}");
        // Deleted, then created again: logged again.
        std::fs::write(&f, one_service("other", "10.96.0.6", 81)).unwrap();
        let (_, log) = captured_log(|| w.reload([f.clone()]));
        assert_eq!(count_lines(&log, "default/lb", ""), 0, "{log}");
        std::fs::write(&f, with_other(81)).unwrap();
        let (_, log) = captured_log(|| w.reload([f.clone()]));
        assert_eq!(
            count_lines(&log, "default/lb", "spec.sessionAffinity"),
            1,
            "{log}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_rescan_sees_a_rewrite_that_keeps_length_and_mtime() {
        let dir = temp_dir("same-mtime");
        let f = dir.join("svc.yaml");
        std::fs::write(&f, one_service("web", "10.96.0.1", 80)).unwrap();
        let mut w = ManifestWatcher::new(dir.clone());
        w.rescan().unwrap();
        let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
        // Past the coarse clock's tick, so the inode change time moves.
        std::thread::sleep(Duration::from_millis(50));
        rewrite_keeping_mtime(&f, &one_service("web", "10.96.0.1", 81), mtime);
        let d = w.rescan().unwrap();
        assert_eq!(d.services.len(), 1, "the rewrite was not seen");
        assert_eq!(d.services[0].1.as_ref().unwrap().ports[0].port, 81);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Rewrites `f` in place and sets its modification time back to `mtime`
    /// before closing it, as if the write had happened in the same tick of
    /// the file system's clock as the previous one.
    fn rewrite_keeping_mtime(f: &Path, text: &str, mtime: SystemTime) {
        use std::io::Write;
        let mut file = std::fs::File::create(f).unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file.set_modified(mtime).unwrap();
        drop(file);
        assert_eq!(std::fs::metadata(f).unwrap().modified().unwrap(), mtime);
    }

    /// The next update other than the Node list (sent first, before the
    /// Services).
    async fn next(rx: &mut tokio::sync::mpsc::Receiver<Update>) -> Update {
        loop {
            let u = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("an update within 10 s")
                .expect("the channel open");
            if !matches!(u, Update::Nodes(_)) {
                return u;
            }
        }
    }

    #[tokio::test]
    async fn run_sends_the_first_load_then_changes_seen_by_inotify() {
        let dir = temp_dir("run");
        let f = dir.join("svc.yaml");
        std::fs::write(&f, one_service("one", "10.96.0.1", 80)).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let cancel = CancellationToken::new();
        // A long rescan interval: only inotify can deliver the change in time.
        let task = tokio::spawn(run(
            f.clone(),
            Duration::from_secs(3600),
            tx,
            cancel.clone(),
        ));
        assert!(matches!(next(&mut rx).await, Update::Services(v) if v.len() == 1));
        assert!(matches!(next(&mut rx).await, Update::Slices(v) if v.is_empty()));
        // Replace by rename, as editors and `kubectl ... > tmp && mv` do.
        let tmp = dir.join(".svc.yaml.tmp");
        std::fs::write(
            &tmp,
            one_service("one", "10.96.0.1", 80) + "---\n" + &one_service("two", "10.96.0.2", 80),
        )
        .unwrap();
        std::fs::rename(&tmp, &f).unwrap();
        match next(&mut rx).await {
            Update::ServiceApplied(s) => assert_eq!(&*s.key.name, "two"),
            other => panic!("unexpected {other:?}"),
        }
        cancel.cancel();
        task.await.unwrap().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Starts the source on `path` with a rescan interval of an hour, so
    /// only inotify can deliver a change within the tests' waits, and
    /// takes the first load.
    async fn start(
        path: PathBuf,
    ) -> (
        tokio::sync::mpsc::Receiver<Update>,
        CancellationToken,
        tokio::task::JoinHandle<Result<(), ManifestError>>,
    ) {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(path, Duration::from_secs(3600), tx, cancel.clone()));
        assert!(matches!(next(&mut rx).await, Update::Services(_)));
        assert!(matches!(next(&mut rx).await, Update::Slices(_)));
        (rx, cancel, task)
    }

    fn applied_port(u: Update) -> u16 {
        match u {
            Update::ServiceApplied(s) => s.ports[0].port,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_relative_manifests_path_sees_changes_through_inotify() {
        // Relative to the tests' working directory (the package root).
        let rel = PathBuf::from(format!("target/ku-manifests-rel-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&rel);
        std::fs::create_dir_all(&rel).unwrap();
        assert!(rel.is_relative());
        let f = rel.join("svc.yaml");
        std::fs::write(&f, one_service("web", "10.96.0.1", 80)).unwrap();
        // The file itself, then its directory.
        for path in [f.clone(), rel.clone()] {
            let (mut rx, cancel, task) = start(path.clone()).await;
            std::fs::write(&f, one_service("web", "10.96.0.1", 81)).unwrap();
            assert_eq!(applied_port(next(&mut rx).await), 81, "{}", path.display());
            std::fs::write(&f, one_service("web", "10.96.0.1", 80)).unwrap();
            assert_eq!(applied_port(next(&mut rx).await), 80, "{}", path.display());
            cancel.cancel();
            task.await.unwrap().unwrap();
        }
        std::fs::remove_dir_all(&rel).unwrap();
    }

    #[tokio::test]
    async fn same_length_writes_within_one_timestamp_tick_are_both_seen() {
        let dir = temp_dir("same-tick");
        let f = dir.join("svc.yaml");
        std::fs::write(&f, one_service("web", "10.96.0.1", 80)).unwrap();
        let (mut rx, cancel, task) = start(f.clone()).await;
        std::fs::write(&f, one_service("web", "10.96.0.1", 81)).unwrap();
        assert_eq!(applied_port(next(&mut rx).await), 81);
        // Same length, and the same modification time as the write before.
        let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
        rewrite_keeping_mtime(&f, &one_service("web", "10.96.0.1", 82), mtime);
        assert_eq!(applied_port(next(&mut rx).await), 82);
        cancel.cancel();
        task.await.unwrap().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
