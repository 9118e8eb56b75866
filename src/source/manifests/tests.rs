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
