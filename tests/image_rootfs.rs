//! The container image without Docker (issue 22, item 9;
//! docs/operations.md, "The image"): deploy/Dockerfile's runtime image is
//! `FROM scratch` plus the file tree deploy/image-rootfs.sh assembles from
//! Debian 12's packages. These tests run that same script on this machine
//! (Debian 12, as the Dockerfile's `debian:bookworm-slim` stage) with the
//! binary under test stripped as the `dist` profile strips it, then:
//!
//! 1. run every program the proxy runs (nft, ip, the iptables tools of
//!    both backends, ipset, ipvsadm) from the tree, as a container runs
//!    it (the tree as `/`, the image's `PATH`, nothing else), and on the
//!    host, each in a fresh network namespace: the tree must behave exactly
//!    as the host (a missing library, iptables module or data file shows);
//!    names resolve through the tree's own /etc (glibc's built-in lookups,
//!    no libnss modules); and the tree packed as the image layer is
//!    (`tar | gzip -9`) stays under 30 MB;
//! 2. run the proxy itself from the tree in a namespace lab, as the
//!    DaemonSet runs it (its capabilities only, its read-only root with
//!    its mounts), with `--cleanup-kube-proxy` on a node holding kube-proxy's rules of the
//!    nftables mode and of the iptables mode with both iptables backends:
//!    it serves a ClusterIP, removes kube-proxy's rules (each step's tool
//!    from the tree); stopped, `kube-uproxy --cleanup` from the tree
//!    removes its own.
//!
//! Need root, `unshare` and `capsh` (libcap2-bin), and the packages the
//! script copies from (nftables iproute2 iptables ipset ipvsadm netbase,
//! binutils for objcopy): without root they print `SKIP …` (fail if `CI`
//! is set); as root, anything missing fails.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::Duration;

use uproxy_lab::e2e::image::{self, Tree, tree_command};
use uproxy_lab::e2e::{
    BACKEND_PORT, Backend, ProxyProcess, READY_TIMEOUT, SVC_PORT, Testbed, VIP_A, bin, kube_proxy,
    poll, vip, who,
};
use uproxy_lab::manifests::{EndpointManifest, PortManifest, ServiceManifest};
use uproxy_lab::{self as lab, Netns, backend_addr};

/// The issue's target for the image, compressed as a registry stores its
/// layers.
const IMAGE_LIMIT_BYTES: u64 = 30_000_000;

/// A scratch directory, removed at the end unless the test failed.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("kube-uproxy-image-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("creating the scratch directory");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !thread::panicking() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// Written to the real stderr, so that a passing test shows it too.
fn say(line: &str) {
    let _ = writeln!(io::stderr(), "{line}");
}

/// Runs `cmd` with `stdin` to completion.
fn run(mut cmd: Command, stdin: Option<&str>) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).expect("writing stdin");
    }
    child.wait_with_output().expect("waiting for the command")
}

/// What a run printed, for comparing the tree's run with the host's:
/// exit status, stdout and stderr, without `#` lines (iptables-save's
/// timestamps).
fn behaviour(out: &Output) -> (Option<i32>, String, String) {
    let text = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// The same for IPv6 (ip6tables), abridged further.
const KUBE_PROXY_IP6TABLES: &str = r#"*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MASQUERADE --random-fully
-A KUBE-SERVICES -d fd00:96::10/128 -p tcp -m tcp --dport 80 -j DNAT --to-destination [fd00:200::10]:8080
COMMIT
*filter
:KUBE-SERVICES - [0:0]
-A KUBE-SERVICES -d fd00:96::99/128 -p tcp -m tcp --dport 80 -j REJECT --reject-with icmp6-port-unreachable
COMMIT
"#;

/// An nft script that uses protocol and service names (/etc/protocols,
/// /etc/services); `--echo` prints what it made.
const NFT_SCRIPT: &str = "table ip t {
	chain c {
		type nat hook output priority -100; policy accept;
		meta l4proto tcp th dport 80 dnat to 10.200.1.2:8080
		ip protocol udp udp dport domain accept
		ip protocol sctp accept
	}
}
";

/// The tree's run and the host's of `program args` (the host's by the
/// same path the tree has it at), each in a fresh network namespace, as
/// root: they must behave the same.
fn same_as_host(tree: &Tree, program: &str, args: &[&str], stdin: Option<&str>) {
    let in_tree = {
        let mut cmd = tree_command(None, &tree.root, None, program);
        cmd.args(args);
        run(cmd, stdin)
    };
    let on_host = {
        let path = if program == "kube-uproxy" {
            bin().to_string()
        } else {
            image::find(&tree.root, program).expect("in the tree")
        };
        let mut cmd = Command::new("unshare");
        cmd.arg("-n").arg(path).args(args);
        run(cmd, stdin)
    };
    let (tree_b, host_b) = (behaviour(&in_tree), behaviour(&on_host));
    assert_eq!(
        tree_b,
        host_b,
        "`{program} {}` from the image's tree (left) must behave as on this machine (right)",
        args.join(" ")
    );
    say(&format!(
        "  {program} {}: exit {:?}, as on the host",
        args.join(" "),
        tree_b.0
    ));
}

/// Bytes of the tree packed as an image layer: `tar -C ROOT -c . | gzip -9`
/// (without what the test added in `/dev` for the container runtime's).
fn packed_bytes(root: &Path) -> u64 {
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(root)
        .args(["-c", "--exclude=./dev/*", "."])
        .stdout(Stdio::piped())
        .spawn()
        .expect("running tar");
    let tar_out = tar.stdout.take().expect("tar's stdout");
    let mut gzip = Command::new("gzip")
        .arg("-9")
        .stdin(tar_out)
        .stdout(Stdio::piped())
        .spawn()
        .expect("running gzip");
    let mut packed = gzip.stdout.take().expect("gzip's stdout");
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match packed.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) => panic!("reading gzip's output: {e}"),
        }
    }
    assert!(tar.wait().expect("tar").success(), "tar failed");
    assert!(gzip.wait().expect("gzip").success(), "gzip failed");
    total
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

#[test]
fn every_program_the_proxy_runs_runs_from_the_image_tree_and_the_layer_is_under_30_mb() {
    if !lab::require_root_and_nft(
        "every_program_the_proxy_runs_runs_from_the_image_tree_and_the_layer_is_under_30_mb",
    ) {
        return;
    }
    let scratch = Scratch::new("programs");
    let tree = image::build(&scratch.0.join("rootfs"));

    let packed = packed_bytes(&tree.root);
    say(&format!(
        "image layer (the tree, tar | gzip -9): {}; the binary in it (stripped of debug sections): {}",
        mb(packed),
        mb(tree.binary_bytes)
    ));
    assert!(
        packed < IMAGE_LIMIT_BYTES,
        "the image layer is {}, over {}",
        mb(packed),
        mb(IMAGE_LIMIT_BYTES)
    );

    let v4 = kube_proxy::iptables();
    same_as_host(&tree, "kube-uproxy", &["--version"], None);
    // The proxy's rules and its address on lo (src/rules).
    same_as_host(&tree, "nft", &["--version"], None);
    same_as_host(&tree, "nft", &["-j", "list", "ruleset"], None);
    same_as_host(&tree, "nft", &["--echo", "-f", "-"], Some(NFT_SCRIPT));
    same_as_host(&tree, "ip", &["-V"], None);
    same_as_host(&tree, "ip", &["-j", "addr", "show", "dev", "lo"], None);
    same_as_host(&tree, "ip", &["rule", "show"], None);
    same_as_host(&tree, "ip", &["route", "show", "table", "local"], None);
    // --cleanup-kube-proxy (src/rules/kube_proxy.rs): every tool it runs,
    // reading and (--test: parsing and building, every module loaded)
    // writing kube-proxy's rules.
    for backend in ["nft", "legacy"] {
        let (v4_tool, v6_tool) = (
            format!("iptables-{backend}"),
            format!("ip6tables-{backend}"),
        );
        same_as_host(&tree, &v4_tool, &["-V"], None);
        same_as_host(&tree, &v4_tool, &["-t", "nat", "-L", "-n"], None);
        for tool in [&v4_tool, &v6_tool] {
            same_as_host(&tree, &format!("{tool}-save"), &[], None);
        }
        same_as_host(
            &tree,
            &format!("{v4_tool}-restore"),
            &["--test", "--noflush"],
            Some(&v4),
        );
        same_as_host(
            &tree,
            &format!("{v6_tool}-restore"),
            &["--test", "--noflush"],
            Some(KUBE_PROXY_IP6TABLES),
        );
    }
    same_as_host(&tree, "ipset", &["--version"], None);
    same_as_host(&tree, "ipset", &["list", "-n"], None);
    same_as_host(&tree, "ipvsadm", &["--version"], None);
    same_as_host(&tree, "ipvsadm", &["-S", "-n"], None);

    // Names resolve through the tree's /etc (the kubelet mounts the pod's
    // /etc/hosts and /etc/resolv.conf there) with glibc's built-in lookups:
    // nft resolves a host name in a rule with getaddrinfo, as the proxy's
    // API client does.
    fs::write(
        tree.root.join("etc/hosts"),
        "127.0.0.1 localhost\n192.0.2.10 kube-apiserver.test\n",
    )
    .expect("writing the tree's /etc/hosts");
    let mut cmd = tree_command(None, &tree.root, None, "nft");
    cmd.args(["--echo", "-f", "-"]);
    let out = run(
        cmd,
        Some("table ip t {\n chain c {\n  ip daddr kube-apiserver.test accept\n }\n}\n"),
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && listed.contains("ip daddr 192.0.2.10 accept"),
        "a host name resolved in the tree: {}{listed}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What of kube-proxy's rules is on `node`, in words; empty when none.
/// Read with this machine's tools, not the tree's.
fn kube_proxy_leftovers(node: &Netns) -> Vec<String> {
    let mut left = kube_proxy::nft_tables_left(node);
    for save in [
        "iptables-nft-save",
        "ip6tables-nft-save",
        "iptables-legacy-save",
        "ip6tables-legacy-save",
    ] {
        left.extend(
            kube_proxy::chains_left(node, save)
                .into_iter()
                .map(|c| format!("{save}: {c}")),
        );
    }
    left
}

/// What deploy/daemonset.yaml's container gets that the test reproduces
/// around the tree.
struct PodShape {
    /// Its capabilities (`capabilities.add` after `drop: [ALL]`), by
    /// capsh's names.
    caps: Vec<String>,
    /// `readOnlyRootFilesystem`.
    read_only_root: bool,
    /// The container's mount paths under /run (writable: emptyDir or
    /// hostPath).
    run_mounts: Vec<String>,
}

impl PodShape {
    fn load() -> PodShape {
        let path = image::repo().join("deploy/daemonset.yaml");
        let text = fs::read_to_string(&path).expect("deploy/daemonset.yaml");
        let ds: serde_json::Value = serde_norway::from_str(&text).expect("the DaemonSet's YAML");
        let container = &ds["spec"]["template"]["spec"]["containers"][0];
        let sc = &container["securityContext"];
        let list = uproxy_lab::json_strings;
        assert_eq!(list(&sc["capabilities"]["drop"]), ["ALL"]);
        let caps = list(&sc["capabilities"]["add"])
            .iter()
            .map(|c| format!("cap_{}", c.to_ascii_lowercase()))
            .collect();
        let run_mounts = container["volumeMounts"]
            .as_array()
            .map(|m| {
                m.iter()
                    .filter(|m| m["readOnly"] != true)
                    .filter_map(|m| m["mountPath"].as_str())
                    .filter(|p| p.starts_with("/run/"))
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        PodShape {
            caps,
            read_only_root: sc["readOnlyRootFilesystem"] == true,
            run_mounts,
        }
    }

    /// Shapes the tree's /run as the pod has it: its mounts there (a
    /// directory for an emptyDir, a file for a file's hostPath such as
    /// iptables' lock, as `type: FileOrCreate` makes it), and, with a
    /// read-only root filesystem, nothing else writable: the proxy, root
    /// without CAP_DAC_OVERRIDE, cannot create files in a mode 0555
    /// directory.
    fn shape_run(&self, root: &Path) {
        let run = root.join("run");
        for mount in &self.run_mounts {
            let at = root.join(mount.trim_start_matches('/'));
            if Path::new(mount).extension().is_some() {
                fs::write(&at, "").expect("a file mount under /run");
            } else {
                fs::create_dir_all(&at).expect("a directory mount under /run");
            }
        }
        if self.read_only_root {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&run, fs::Permissions::from_mode(0o555)).expect("chmod /run");
        }
    }

    fn caps(&self) -> Vec<&str> {
        self.caps.iter().map(String::as_str).collect()
    }
}

/// kube-uproxy, run from the image's tree as deploy/daemonset.yaml runs
/// it (its capabilities only, its read-only root filesystem with its
/// mounts under /run: [`PodShape`]) with `--cleanup-kube-proxy` on a node
/// with kube-proxy's rules of every mode the test machine can hold
/// (nftables; iptables with both backends, IPv4 and IPv6): it serves,
/// every rule of kube-proxy's goes (the kubelet's KUBE-FIREWALL stays) with
/// no step failing; it stops cleanly, and `--cleanup` removes its own.
#[test]
fn the_proxy_runs_from_the_image_tree_and_removes_kube_proxys_rules() {
    if !lab::require_root_and_nft(
        "the_proxy_runs_from_the_image_tree_and_removes_kube_proxys_rules",
    ) {
        return;
    }
    let bed = Testbed::new("image", "tree", &[Backend::Whoami]);
    let tree = image::build(&bed.dir.join("rootfs"));
    let node = bed.node();

    // kube-proxy's rules, with this machine's tools.
    let nft_rules = bed.dir.join("kube-proxy.nft");
    fs::write(&nft_rules, kube_proxy::nftables()).expect("writing kube-proxy's nft rules");
    node.output("nft", ["-f", &*nft_rules.to_string_lossy()])
        .expect("installing kube-proxy's nftables rules");
    let v4 = kube_proxy::iptables();
    for backend in ["nft", "legacy"] {
        for (tool, rules) in [
            (format!("iptables-{backend}-restore"), v4.as_str()),
            (format!("ip6tables-{backend}-restore"), KUBE_PROXY_IP6TABLES),
        ] {
            let mut cmd = node.command(&tool);
            cmd.arg("--noflush");
            let out = run(cmd, Some(rules));
            assert!(
                out.status.success(),
                "installing kube-proxy's rules with {tool}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let before = kube_proxy_leftovers(node);
    assert!(
        before.iter().any(|l| l.contains("kube-proxy"))
            && before.iter().any(|l| l.starts_with("iptables-legacy-save"))
            && before.iter().any(|l| l.starts_with("ip6tables-nft-save")),
        "kube-proxy's rules installed: {before:?}"
    );

    // The manifests file, inside the tree.
    let service = ServiceManifest::new("svc-a", VIP_A)
        .with_port(PortManifest::tcp(SVC_PORT, BACKEND_PORT))
        .with_endpoints(vec![EndpointManifest::ready(backend_addr(0))]);
    fs::write(
        tree.root.join("manifests.yaml"),
        uproxy_lab::e2e::manifests(&[service]),
    )
    .expect("writing the manifests file");

    let pod = PodShape::load();
    pod.shape_run(&tree.root);
    let caps = pod.caps();
    let mut cmd = tree_command(Some(node), &tree.root, Some(&caps), "kube-uproxy");
    cmd.args([
        "--manifests",
        "/manifests.yaml",
        "--proxy-port-range",
        "20000-20999",
        "-v",
        "--cleanup-kube-proxy",
    ]);
    let mut proxy = ProxyProcess::launch(node, &bed.dir, "kube-uproxy", cmd);

    let served = poll(READY_TIMEOUT, Duration::from_millis(50), || {
        match who(bed.client(), vip(VIP_A)) {
            Ok(name) if name == "backend0" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    if let Err(last) = served {
        proxy.assert_running("serving the ClusterIP");
        panic!("the ClusterIP was never served: {last}");
    }

    kube_proxy::wait_removed(&mut proxy, READY_TIMEOUT, || kube_proxy_leftovers(node));
    for save in ["iptables-nft-save", "iptables-legacy-save"] {
        assert!(
            kube_proxy::iptables_chains(node, save)
                .iter()
                .any(|c| c == "KUBE-FIREWALL"),
            "the kubelet's KUBE-FIREWALL stays ({save})"
        );
    }
    let logged = poll(READY_TIMEOUT, Duration::from_millis(50), || {
        let log = proxy.stderr();
        if log.contains("--cleanup-kube-proxy: removed kube-proxy's")
            && log.contains("iptables-legacy")
        {
            Ok(())
        } else {
            Err("not logged yet".into())
        }
    });
    assert!(
        logged.is_ok(),
        "the removal is logged, with iptables-legacy's part"
    );
    let log = proxy.stderr();
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("a step failed"))
        .collect();
    assert!(
        failed.is_empty(),
        "no step of the cleanup failed, with the pod's capabilities {caps:?}: {failed:#?}"
    );
    assert_eq!(
        who(bed.client(), vip(VIP_A)).expect("the ClusterIP after the cleanup"),
        "backend0"
    );

    let (status, in_time) = proxy
        .child
        .terminate(Duration::from_secs(40))
        .expect("stopping the proxy");
    assert!(
        in_time && status.success(),
        "the proxy stops cleanly: {status}"
    );
    // Its rules stay when it stops (so that a restart keeps the node
    // served); `kube-uproxy --cleanup`, from the tree too, removes them and
    // its address on lo.
    // (`kubectl exec` runs it with the container's capabilities.)
    let mut cmd = tree_command(Some(node), &tree.root, Some(&caps), "kube-uproxy");
    cmd.arg("--cleanup");
    let out = run(cmd, None);
    assert!(
        out.status.success(),
        "kube-uproxy --cleanup from the tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tables = node
        .output("nft", ["list", "tables"])
        .expect("nft list tables");
    let tables = String::from_utf8_lossy(&tables.stdout);
    assert!(
        !tables.contains("kube-uproxy"),
        "--cleanup removed the proxy's tables: {tables}"
    );
    let lo = node
        .output("ip", ["-o", "addr", "show", "dev", "lo"])
        .expect("ip addr show dev lo");
    let lo = String::from_utf8_lossy(&lo.stdout);
    assert!(
        !lo.contains("169.254.42.1"),
        "--cleanup removed the proxy address from lo: {lo}"
    );
}
