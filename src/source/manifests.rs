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
    /// The same for the Nodes.
    pub node_notices: BTreeMap<ObjectKey, Vec<Notice>>,
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
                && let Some(accepted) = node_or_log(&node)
            {
                if !accepted.notices.is_empty() {
                    out.node_notices
                        .insert(accepted.info.key.clone(), accepted.notices);
                }
                out.nodes.push(accepted.info);
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
    node_notices: NoticeLog,
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
            node_notices: NoticeLog::new("Node"),
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
        for (k, _) in delta.nodes.iter().filter(|(_, v)| v.is_none()) {
            self.node_notices.forget(k);
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
        for n in &parsed.nodes {
            let notices = parsed.node_notices.get(&n.key);
            self.node_notices
                .log(&n.key, notices.map(Vec::as_slice).unwrap_or_default());
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
mod tests;
