//! Desired state from YAML/JSON manifests on disk.
//!
//! `--manifests PATH` names a file or a directory (its `*.yaml`, `*.yml` and
//! `*.json` files, not recursive). Files hold what `kubectl get
//! svc,endpointslices -A -o yaml` prints: one `kind: List`, or a stream of
//! `---`-separated documents, or both. The path is polled; a change to any
//! file reloads everything and is sent as a full replacement, so the
//! reconciler only touches what really changed.
//!
//! A file that fails to parse keeps its last good content (an editor's
//! half-written save does not take Services down); one bad object is skipped
//! and the rest of its file is used.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Update, UpdateSender, service_or_log, slice_or_log};
use crate::model::{ServiceInfo, SliceInfo};

/// A manifests path that cannot be read at all.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid YAML: {message}")]
    Yaml { path: PathBuf, message: String },
}

/// What one file contributes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Parsed {
    pub services: Vec<ServiceInfo>,
    pub slices: Vec<SliceInfo>,
}

/// Parses one file's text. Fails only when the text is not YAML at all;
/// objects that are not valid Services or EndpointSlices are logged and
/// skipped.
pub fn parse(text: &str, origin: &Path) -> Result<Parsed, ManifestError> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| ManifestError::Yaml {
        path: origin.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut out = Parsed::default();
    for doc in docs {
        collect(doc, origin, &mut out);
    }
    Ok(out)
}

fn collect(doc: Value, origin: &Path, out: &mut Parsed) {
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let kind = kind.as_str();
    match kind {
        "List" | "ServiceList" | "EndpointSliceList" => {
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
                && let Some(info) = service_or_log(&svc)
            {
                out.services.push(info);
            }
        }
        "EndpointSlice" => {
            if let Some(slice) = deserialize::<EndpointSlice>(doc, origin, kind)
                && let Some(info) = slice_or_log(&slice)
            {
                out.slices.push(info);
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

/// Which files a path stands for, with what identifies their version.
fn scan(path: &Path) -> Result<BTreeMap<PathBuf, (SystemTime, u64)>, ManifestError> {
    let read_err = |source| ManifestError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    let files: Vec<PathBuf> = if meta.is_dir() {
        let mut v = Vec::new();
        for entry in std::fs::read_dir(path).map_err(read_err)? {
            let p = entry.map_err(read_err)?.path();
            let wanted = p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
            if wanted && p.is_file() {
                v.push(p);
            }
        }
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut out = BTreeMap::new();
    for f in files {
        // A file can vanish between listing and stat: it is simply gone.
        if let Ok(m) = std::fs::metadata(&f) {
            out.insert(f, (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        }
    }
    Ok(out)
}

/// Loads every file once, for a one-shot read (and the first poll).
pub fn load(path: &Path) -> Result<Parsed, ManifestError> {
    let mut watcher = ManifestWatcher::new(path.to_path_buf());
    watcher.poll()?;
    Ok(watcher.merged())
}

/// Keeps the last good parse of each file and notices changes.
struct ManifestWatcher {
    path: PathBuf,
    versions: BTreeMap<PathBuf, (SystemTime, u64)>,
    parsed: BTreeMap<PathBuf, Parsed>,
}

impl ManifestWatcher {
    fn new(path: PathBuf) -> Self {
        ManifestWatcher {
            path,
            versions: BTreeMap::new(),
            parsed: BTreeMap::new(),
        }
    }

    /// Re-reads changed files; returns whether anything changed.
    fn poll(&mut self) -> Result<bool, ManifestError> {
        let now = scan(&self.path)?;
        if now == self.versions {
            return Ok(false);
        }
        self.parsed.retain(|f, _| now.contains_key(f));
        for (file, version) in &now {
            if self.versions.get(file) == Some(version) {
                continue;
            }
            let text = match std::fs::read_to_string(file) {
                Ok(t) => t,
                Err(source) => {
                    warn!(file = %file.display(), error = %source, "cannot read manifests file; keeping its last good content");
                    continue;
                }
            };
            match parse(&text, file) {
                Ok(p) => {
                    self.parsed.insert(file.clone(), p);
                }
                Err(e) => warn!("{e}; keeping the file's last good content"),
            }
        }
        self.versions = now;
        Ok(true)
    }

    fn merged(&self) -> Parsed {
        let mut services: BTreeMap<_, ServiceInfo> = BTreeMap::new();
        let mut slices: BTreeMap<_, SliceInfo> = BTreeMap::new();
        for (file, p) in &self.parsed {
            for s in &p.services {
                if services.insert(s.key.clone(), s.clone()).is_some() {
                    warn!(file = %file.display(), service = %s.key, "Service defined more than once; the last definition wins");
                }
            }
            for s in &p.slices {
                if slices.insert(s.key.clone(), s.clone()).is_some() {
                    warn!(file = %file.display(), slice = %s.key, "EndpointSlice defined more than once; the last definition wins");
                }
            }
        }
        Parsed {
            services: services.into_values().collect(),
            slices: slices.into_values().collect(),
        }
    }
}

/// Polls `path` every `interval` and sends a full replacement on change,
/// until `cancel` fires. The first load is sent even when empty, so the
/// reconciler knows the source is synced.
pub async fn run(
    path: PathBuf,
    interval: Duration,
    tx: UpdateSender,
    cancel: CancellationToken,
) -> Result<(), ManifestError> {
    let mut watcher = ManifestWatcher::new(path.clone());
    watcher.poll()?;
    let mut last = watcher.merged();
    info!(
        path = %path.display(),
        services = last.services.len(),
        slices = last.slices.len(),
        "manifests loaded"
    );
    if tx
        .send(Update::Services(last.services.clone()))
        .await
        .is_err()
        || tx.send(Update::Slices(last.slices.clone())).await.is_err()
    {
        return Ok(());
    }
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        match watcher.poll() {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => {
                warn!("{e}; keeping the last good content");
                continue;
            }
        }
        let next = watcher.merged();
        if next == last {
            continue;
        }
        info!(
            path = %path.display(),
            services = next.services.len(),
            slices = next.slices.len(),
            "manifests changed"
        );
        if next.services != last.services
            && tx
                .send(Update::Services(next.services.clone()))
                .await
                .is_err()
        {
            return Ok(());
        }
        if next.slices != last.slices && tx.send(Update::Slices(next.slices.clone())).await.is_err()
        {
            return Ok(());
        }
        last = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ObjectKey;

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
        let names: Vec<_> = p.services.iter().map(|s| s.key.name.as_str()).collect();
        assert_eq!(names, vec!["a", "b"]);
    }

    #[test]
    fn unparsable_yaml_is_an_error_naming_the_file() {
        let e = parse("kind: Service\n  metadata: [", Path::new("broken.yaml")).unwrap_err();
        assert!(e.to_string().contains("broken.yaml"), "{e}");
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_content() {
        let dir = std::env::temp_dir().join(format!("ku-manifests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("svc.yaml");
        std::fs::write(&f, KUBECTL_LIST).unwrap();
        std::fs::write(dir.join("notes.txt"), "not a manifest").unwrap();
        let mut w = ManifestWatcher::new(dir.clone());
        assert!(w.poll().unwrap());
        assert_eq!(w.merged().services.len(), 1);
        assert!(!w.poll().unwrap(), "no change, no reload");
        std::fs::write(&f, "kind: [").unwrap();
        assert!(w.poll().unwrap());
        assert_eq!(w.merged().services.len(), 1, "last good content kept");
        std::fs::remove_file(&f).unwrap();
        assert!(w.poll().unwrap());
        assert_eq!(
            w.merged().services.len(),
            0,
            "a deleted file takes its objects away"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
