//! End-to-end tests of the migration from kube-proxy and back (issue 22,
//! item 7; docs/operations.md, "Migrating from kube-proxy"). Each test
//! builds its own namespace lab (tests/lab/src/e2e.rs) and runs the release
//! binary with `--manifests`.
//!
//! The node first holds kube-proxy-shaped rules that DNAT the ClusterIP
//! 10.96.0.10:80 to backend 0, in nftables mode (a small faithful copy of
//! kube-proxy's `ip kube-proxy` table: `services` map, service and endpoint
//! chains, masquerading, the filter chains) or in iptables mode (KUBE-SERVICES
//! → KUBE-SVC → KUBE-SEP with iptables-nft, and kube-proxy's filter chains
//! beside the kubelet's KUBE-FIREWALL). kube-uproxy's manifests send the same
//! Service to backend 1, so which backend answers tells which rules served a
//! connection. A client opens short connections in a loop (bounded in count
//! and time), each reading the backend's greeting, through:
//!
//! 1. kube-uproxy starting with `--cleanup-kube-proxy`: new connections go
//!    to it from its first sync on, kube-proxy's rules are then removed
//!    (the kubelet's chain stays), and a connection kube-proxy's rules
//!    translated before keeps working;
//! 2. the way back: kube-proxy's rules installed again while kube-uproxy
//!    runs (its nat chains still run first), `kube-uproxy --cleanup`
//!    releases the node to them while the proxy keeps the connections it
//!    holds, then SIGTERM: the proxy drains and removes the rest itself.
//!
//! Not one connection of the loop may fail.
//!
//! A third test: `--cleanup-kube-proxy` on a node without kube-proxy's rules
//! changes nothing and says so.
//!
//! Need root and `nft` (and iptables-nft for the iptables test): without
//! root they print `SKIP …` (fail if `CI` is set).

use std::fs;
use std::net::TcpStream;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use uproxy_lab::e2e::{
    self, BACKEND_PORT, Backend, ProxyProcess, SVC_PORT, Testbed, VIP_A, assert_echo, bin, close,
    hold, kube_proxy, poll, vip, wait_nft_key, who,
};
use uproxy_lab::manifests::{EndpointManifest, PortManifest, ServiceManifest};
use uproxy_lab::{self as lab, Netns, backend_addr};

/// The longest the client loop runs, and the most connections it opens.
const LOOP_TIME: Duration = Duration::from_secs(150);
const LOOP_MAX: usize = 30_000;
/// Bound for one phase change to be seen by the loop.
const PHASE_TIMEOUT: Duration = Duration::from_secs(30);

/// kube-proxy's mode, as the test installs and checks it.
#[derive(Clone, Copy)]
enum Mode {
    Nftables,
    Iptables,
}

impl Mode {
    /// Installs kube-proxy's rules on `node` (again: the way back).
    fn install(self, bed: &Testbed) {
        let (file, program, args) = match self {
            Mode::Nftables => ("kube-proxy.nft", "nft", vec!["-f"]),
            Mode::Iptables => ("kube-proxy.iptables", "sh", vec!["-c"]),
        };
        let path = bed.dir.join(file);
        let text = match self {
            Mode::Nftables => kube_proxy::nftables(),
            Mode::Iptables => kube_proxy::iptables(),
        };
        fs::write(&path, text).expect("writing kube-proxy's rules");
        let arg = match self {
            Mode::Nftables => path.display().to_string(),
            Mode::Iptables => format!("iptables-nft-restore --noflush < {}", path.display()),
        };
        let mut all = args;
        all.push(&arg);
        bed.node()
            .output(program, &all)
            .unwrap_or_else(|e| panic!("installing kube-proxy's rules: {e}"));
    }

    /// What of kube-proxy's rules is on `node`, in words; empty when none.
    fn leftovers(self, node: &Netns) -> Vec<String> {
        match self {
            Mode::Nftables => kube_proxy::nft_tables_left(node),
            Mode::Iptables => kube_proxy::chains_left(node, "iptables-nft-save"),
        }
    }
}

/// The chains `iptables-nft-save` lists on `node`.
fn iptables_chains(node: &Netns) -> Vec<String> {
    kube_proxy::iptables_chains(node, "iptables-nft-save")
}

fn lo_has_proxy_address(node: &Netns) -> bool {
    node.output("ip", ["-o", "addr", "show", "dev", "lo"])
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("169.254.42.1/32"))
        .unwrap_or(false)
}

fn uproxy_table_has_chains(node: &Netns) -> bool {
    node.output("nft", ["list", "table", "ip", "kube-uproxy"])
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("chain "))
        .unwrap_or(false)
}

/// The client loop's answers: the backend's name, or what failed.
type Answers = Mutex<Vec<Result<String, String>>>;

/// Opens short connections to the ClusterIP from the client namespace
/// until `stop` (or [`LOOP_TIME`] / [`LOOP_MAX`]), each reading the
/// backend's greeting.
fn client_loop(client: &Netns, stop: &AtomicBool, answers: &Answers) {
    let started = Instant::now();
    for _ in 0..LOOP_MAX {
        if stop.load(Ordering::Relaxed) || started.elapsed() > LOOP_TIME {
            break;
        }
        let r = who(client, vip(VIP_A)).map_err(|e| e.to_string());
        answers.lock().unwrap_or_else(|e| e.into_inner()).push(r);
        thread::sleep(Duration::from_millis(5));
    }
}

/// Sets the flag when dropped (also while panicking): the loop stops.
struct StopOnDrop<'a>(&'a AtomicBool);
impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// How many answers so far.
fn seen(answers: &Answers) -> usize {
    answers.lock().unwrap_or_else(|e| e.into_inner()).len()
}

/// Waits until 5 answers in a row after the first `from` come from
/// `backend`; panics (with the proxy's log) after [`PHASE_TIMEOUT`].
fn wait_backend(
    answers: &Answers,
    from: usize,
    backend: &str,
    proxy: Option<&mut ProxyProcess>,
    why: &str,
) {
    let waited = poll(PHASE_TIMEOUT, Duration::from_millis(20), || {
        let a = answers.lock().unwrap_or_else(|e| e.into_inner());
        let tail: Vec<&Result<String, String>> = a.iter().skip(from).rev().take(5).collect();
        if tail.len() == 5 && tail.iter().all(|r| r.as_deref() == Ok(backend)) {
            Ok(())
        } else {
            Err(format!("last answers: {tail:?}"))
        }
    });
    if let Err(last) = waited {
        if let Some(p) = proxy {
            p.assert_running(why);
        }
        panic!("{why}: {backend} never answered 5 times in a row; {last}");
    }
}

fn service() -> ServiceManifest {
    ServiceManifest::new("svc-a", VIP_A)
        .with_port(PortManifest::tcp(SVC_PORT, BACKEND_PORT))
        .with_endpoints(vec![EndpointManifest::ready(backend_addr(1))])
}

/// The whole migration and the way back with kube-proxy's rules of `mode`.
fn migrate_and_back(mode: Mode, tag: &str) {
    let bed = Testbed::new("migration", tag, &[Backend::Whoami, Backend::Whoami]);
    mode.install(&bed);
    assert!(
        !mode.leftovers(bed.node()).is_empty(),
        "kube-proxy's rules installed"
    );
    let (kube_proxy, kube_uproxy) = (e2e::backend_name(0), e2e::backend_name(1));

    let stop = AtomicBool::new(false);
    let answers: Answers = Mutex::new(Vec::new());
    thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        s.spawn(|| client_loop(bed.client(), &stop, &answers));
        wait_backend(&answers, 0, &kube_proxy, None, "kube-proxy's rules serve");

        // A connection kube-proxy's rules translated, held through it all.
        let (mut through_kube_proxy, name) =
            hold(bed.client(), vip(VIP_A)).expect("a connection through kube-proxy's rules");
        assert_eq!(name, kube_proxy);

        // 1. kube-uproxy takes over, then removes kube-proxy's rules.
        let yaml = e2e::manifests(&[service()]);
        let (mut proxy, _) = bed.start_proxy(&yaml, &["--cleanup-kube-proxy"]);
        wait_nft_key(
            &mut proxy,
            bed.node(),
            "map",
            "service-ports",
            VIP_A,
            true,
            "kube-uproxy's first sync",
        );
        let at = seen(&answers);
        wait_backend(
            &answers,
            at,
            &kube_uproxy,
            Some(&mut proxy),
            "new connections go to kube-uproxy",
        );
        kube_proxy::wait_removed(&mut proxy, PHASE_TIMEOUT, || mode.leftovers(bed.node()));
        if let Mode::Iptables = mode {
            let chains = iptables_chains(bed.node());
            assert!(
                chains.iter().any(|c| c == "KUBE-FIREWALL"),
                "the kubelet's KUBE-FIREWALL must stay: {chains:?}"
            );
        }
        // Logged once the removal returns (just after the rules are gone).
        let logged = poll(PHASE_TIMEOUT, Duration::from_millis(20), || {
            if proxy
                .stderr()
                .contains("--cleanup-kube-proxy: removed kube-proxy's")
            {
                Ok(())
            } else {
                Err("not logged".into())
            }
        });
        assert!(logged.is_ok(), "the removal is logged");
        assert_echo(
            &mut through_kube_proxy,
            "still-there",
            "a connection kube-proxy's rules translated, after they are gone",
        );
        close(through_kube_proxy);
        let at = seen(&answers);
        wait_backend(
            &answers,
            at,
            &kube_uproxy,
            Some(&mut proxy),
            "kube-uproxy serves",
        );

        // 2. The way back: kube-proxy's rules again, while kube-uproxy runs:
        //    its nat chains still come first.
        mode.install(&bed);
        let at = seen(&answers);
        wait_backend(
            &answers,
            at,
            &kube_uproxy,
            Some(&mut proxy),
            "kube-proxy's rules installed again beside kube-uproxy's",
        );
        let held: (TcpStream, String) =
            hold(bed.client(), vip(VIP_A)).expect("a connection through kube-uproxy");
        let (mut through_uproxy, name) = held;
        assert_eq!(name, kube_uproxy, "kube-uproxy's rules still come first");

        // `--cleanup` while it runs: the node goes back to kube-proxy's rules.
        let out = bed
            .node()
            .output(bin(), ["--cleanup"])
            .unwrap_or_else(|e| panic!("kube-uproxy --cleanup while it runs: {e}"));
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(said.contains("its rules are removed"), "{said}");
        assert!(
            !uproxy_table_has_chains(bed.node()),
            "kube-uproxy's chains are gone"
        );
        let at = seen(&answers);
        wait_backend(
            &answers,
            at,
            &kube_proxy,
            Some(&mut proxy),
            "after --cleanup, kube-proxy's rules serve",
        );
        proxy.assert_running("released: it keeps serving what it holds");
        assert!(
            lo_has_proxy_address(bed.node()),
            "the held connection needs it"
        );
        assert_echo(
            &mut through_uproxy,
            "held",
            "a connection through kube-uproxy, after its rules are gone",
        );
        close(through_uproxy);

        // SIGTERM: it drains and removes the rest itself.
        let (status, in_time) = proxy
            .child
            .terminate(Duration::from_secs(40))
            .expect("stopping kube-uproxy");
        assert!(status.success() && in_time, "kube-uproxy exits 0: {status}");
        let out = bed
            .node()
            .output("nft", ["list", "tables"])
            .expect("nft list tables");
        let tables = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            !tables.contains("kube-uproxy"),
            "its tables are gone: {tables}"
        );
        assert!(!lo_has_proxy_address(bed.node()), "169.254.42.1 left on lo");
        let at = seen(&answers);
        wait_backend(
            &answers,
            at,
            &kube_proxy,
            None,
            "kube-proxy's rules serve after",
        );

        stop.store(true, Ordering::Relaxed);
    });

    let answers = answers.into_inner().unwrap_or_else(|e| e.into_inner());
    let failed: Vec<(usize, &String)> = answers
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| (i, e)))
        .collect();
    let by = |b: &str| answers.iter().filter(|r| r.as_deref() == Ok(b)).count();
    eprintln!(
        "{} connections: {} by kube-proxy's rules, {} by kube-uproxy, {} failed",
        answers.len(),
        by(&kube_proxy),
        by(&kube_uproxy),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} connections failed during the migration, e.g. {:?}",
        failed.len(),
        answers.len(),
        &failed[..failed.len().min(5)]
    );
}

#[test]
fn takeover_from_kube_proxy_nftables_mode_and_back_without_a_failed_connection() {
    if !lab::require_root_and_nft(
        "takeover_from_kube_proxy_nftables_mode_and_back_without_a_failed_connection",
    ) {
        return;
    }
    migrate_and_back(Mode::Nftables, "kp-nft");
}

#[test]
fn takeover_from_kube_proxy_iptables_mode_and_back_without_a_failed_connection() {
    if !lab::require_root_and_nft(
        "takeover_from_kube_proxy_iptables_mode_and_back_without_a_failed_connection",
    ) {
        return;
    }
    migrate_and_back(Mode::Iptables, "kp-ipt");
}

#[test]
fn cleanup_kube_proxy_on_a_node_without_its_rules_changes_nothing() {
    if !lab::require_root_and_nft("cleanup_kube_proxy_on_a_node_without_its_rules_changes_nothing")
    {
        return;
    }
    let bed = Testbed::new("migration", "kp-none", &[Backend::Whoami, Backend::Whoami]);
    let before = iptables_chains(bed.node());
    let yaml = e2e::manifests(&[service()]);
    let (mut proxy, _) = bed.start_proxy(&yaml, &["--cleanup-kube-proxy"]);
    let said = poll(PHASE_TIMEOUT, Duration::from_millis(50), || {
        proxy.assert_running("--cleanup-kube-proxy with nothing to clean");
        if proxy.stderr().contains("no kube-proxy rules on this node") {
            Ok(())
        } else {
            Err("not said yet".into())
        }
    });
    assert!(said.is_ok(), "the proxy says there was nothing to remove");
    assert_eq!(iptables_chains(bed.node()), before, "iptables untouched");
    assert_eq!(
        who(bed.client(), vip(VIP_A)).expect("the Service answers"),
        e2e::backend_name(1)
    );
}
