//! Harness shared by the end-to-end tests of the `kube-uproxy` binary
//! (tests/e2e_*.rs and tests/kube_source.rs), compiled once here rather
//! than into every test binary.
//!
//! - [`Testbed`]: a namespace [`Lab`] with whoami / sha256 servers in its
//!   backend namespaces, the tokio runtime they run on and a scratch
//!   directory (removed at the end unless the test failed).
//! - [`ProxyProcess`]: the binary running in the node namespace, its stdout
//!   and stderr captured in a file that is printed when the test panics (or
//!   always, with `KU_E2E_SHOW_LOGS` set and `--nocapture`).
//! - Waiting for keys of the nft sets/maps of docs/rules.md, and polling.
//! - Client helpers: blocking std sockets created in a namespace, speaking
//!   to the whoami servers.
//! - [`image`]: programs run from the container image's file tree
//!   (deploy/image-rootfs.sh) as a pod runs them.
//! - [`udp`]: backends answering over TCP and UDP, UDP clients, and the
//!   reachability checks of the UDP, NodePort and external-address tests.
//! - [`http`]: the Python gRPC and HTTP/1.1 peers of `tests/lab/py/`,
//!   programs (curl, socat, grpcio clients) run bounded in a namespace, and
//!   `/debug/services` read to wait for Service ports and endpoint changes.

pub mod http;
pub mod image;
pub mod kube_proxy;
pub mod udp;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::manifests::{ServiceManifest, list_yaml};
use crate::peers::{self, PeerHandle};
use crate::{Lab, Netns, NsChild};

/// The `kube-uproxy` binary under test.
///
/// `env!("CARGO_BIN_EXE_kube-uproxy")` only exists when an integration test
/// of the product is compiled, not when this crate is: Cargo also sets it
/// at run time (`cargo test`), and a test binary run by hand finds the
/// product's binary where Cargo put both, one level above its own `deps/`.
///
/// # Panics
/// If neither gives a file that exists.
pub fn bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        let from_env = std::env::var_os("CARGO_BIN_EXE_kube-uproxy").map(PathBuf::from);
        let beside = std::env::current_exe().ok().and_then(|exe| {
            let deps = exe.parent()?;
            Some(deps.parent()?.join("kube-uproxy"))
        });
        let path = from_env
            .into_iter()
            .chain(beside)
            .find(|p| p.is_file())
            .expect("the kube-uproxy binary (run the tests with cargo test)");
        path.to_string_lossy().into_owned()
    })
}
const PORT_RANGE: &str = "20000-20999";
pub const SVC_PORT: u16 = 80;
pub const BACKEND_PORT: u16 = 8080;
/// Bound for "the proxy programmed the rules" / "the change was picked up".
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

pub const VIP_A: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const VIP_B: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
pub const VIP_C: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
pub const VIP_D: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);

static TESTBED_COUNTER: AtomicU32 = AtomicU32::new(0);

/// `ip`, Service port 80.
pub fn vip(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::from((ip, SVC_PORT))
}

/// What the whoami server of backend `i` answers: `backend<i>`.
pub fn backend_name(i: usize) -> String {
    format!("backend{i}")
}

// ---------------------------------------------------------------------------
// Lab, backend servers, scratch directory.

/// The server run in a backend namespace, on [`BACKEND_PORT`].
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    /// Greets with `backend<i>\n`, then echoes.
    Whoami,
    /// Answers the hex SHA-256 of everything read up to the half-close.
    Sha256,
    /// No server: the test starts its own (e.g. the Python peers of
    /// [`http`]), or none, for an endpoint that refuses connections.
    None,
}

pub struct Testbed {
    /// The servers started, in backend order ([`Backend::None`] has none).
    // Fields drop in this order: servers, runtime, lab (namespaces).
    pub servers: Vec<PeerHandle>,
    rt: tokio::runtime::Runtime,
    pub lab: Lab,
    pub dir: PathBuf,
}

impl Testbed {
    /// A lab with one backend namespace per entry of `backends`, running
    /// that server, and the directory `$TMPDIR/kube-uproxy-<kind>-<pid>-<n>-<tag>`.
    pub fn new(kind: &str, tag: &str, backends: &[Backend]) -> Testbed {
        let lab = Lab::new(tag, backends.len()).expect("building the namespace lab");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut servers = Vec::new();
        for (i, backend) in backends.iter().enumerate() {
            if matches!(backend, Backend::None) {
                continue;
            }
            let listener = lab.backends()[i]
                .tcp_listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, BACKEND_PORT)))
                .expect("backend listener");
            let _guard = rt.enter();
            let server = match backend {
                Backend::Whoami => peers::whoami(listener, &backend_name(i)),
                Backend::Sha256 => peers::sha256(listener),
                Backend::None => continue,
            };
            servers.push(server.expect("starting a backend server"));
        }
        let dir = std::env::temp_dir().join(format!(
            "kube-uproxy-{kind}-{}-{}-{tag}",
            std::process::id(),
            TESTBED_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).expect("creating the test directory");
        Testbed {
            servers,
            rt,
            lab,
            dir,
        }
    }

    /// The runtime the servers run on (enter it to start more).
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.rt
    }

    pub fn client(&self) -> &Netns {
        self.lab.client()
    }

    pub fn node(&self) -> &Netns {
        self.lab.node()
    }

    /// `<dir>/manifests.yaml`: the file [`Testbed::start_proxy`] writes.
    pub fn manifests_file(&self) -> PathBuf {
        self.dir.join("manifests.yaml")
    }

    /// `kube-uproxy --manifests <manifests>` with `extra` flags and `env`
    /// in the node namespace (output in `<dir>/<name>.stderr`); the
    /// manifests file is printed after its output when the test fails.
    ///
    /// The one way the e2e tests start the proxy on a manifests file, so
    /// that every failure shows what the proxy was given.
    pub fn run_proxy(
        &self,
        name: &str,
        manifests: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> ProxyProcess {
        let mut p = ProxyProcess::start_with(
            self.node(),
            &self.dir,
            name,
            "--manifests",
            manifests,
            extra,
            env,
        );
        p.show_on_failure("manifests", manifests);
        p
    }

    /// Writes `yaml` to [`Testbed::manifests_file`] and starts
    /// `kube-uproxy` on it with `extra` flags ([`Testbed::run_proxy`]);
    /// returns the proxy and the file's path, for later rewrites.
    pub fn start_proxy(&self, yaml: &str, extra: &[&str]) -> (ProxyProcess, PathBuf) {
        let path = self.manifests_file();
        fs::write(&path, yaml).expect("writing the manifests file");
        (self.run_proxy("kube-uproxy", &path, extra, &[]), path)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // Kept after a failure, for the logs and files in it.
        if !thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------
// The proxy process.

/// `kube-uproxy` running in the node namespace; killed on drop. Its stdout
/// and stderr go to `<dir>/kube-uproxy.stderr`, printed on drop when the
/// test panics (or `KU_E2E_SHOW_LOGS` is set), followed by the files added
/// with [`ProxyProcess::show_on_failure`].
pub struct ProxyProcess {
    pub child: NsChild,
    stderr: PathBuf,
    show_too: Vec<(&'static str, PathBuf)>,
}

impl ProxyProcess {
    /// Starts `kube-uproxy <source_flag> <source_path> --proxy-port-range
    /// 20000-20999 -v` in `node`, without the environment variables of
    /// HTTP proxies and KUBECONFIG (the API server, if any, is on the node's
    /// own loopback: no proxy of the test machine may be in the way).
    pub fn start(node: &Netns, dir: &Path, source_flag: &str, source_path: &Path) -> ProxyProcess {
        Self::start_with(node, dir, "kube-uproxy", source_flag, source_path, &[], &[])
    }

    /// Like [`ProxyProcess::start`], with more flags and environment
    /// variables; its output goes to `<dir>/<name>.stderr`.
    pub fn start_with(
        node: &Netns,
        dir: &Path,
        name: &str,
        source_flag: &str,
        source_path: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> ProxyProcess {
        Self::start_under(
            node,
            dir,
            name,
            &[],
            source_flag,
            source_path,
            extra_args,
            env,
        )
    }

    /// Like [`ProxyProcess::start_with`], run by the command `wrapper`
    /// (e.g. `["prlimit", "--nofile=1024:4096"]`) with the binary and its
    /// arguments appended.
    #[allow(clippy::too_many_arguments)]
    pub fn start_under(
        node: &Netns,
        dir: &Path,
        name: &str,
        wrapper: &[&str],
        source_flag: &str,
        source_path: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> ProxyProcess {
        let source_path = source_path.to_string_lossy();
        let mut args = vec![
            source_flag,
            &*source_path,
            "--proxy-port-range",
            PORT_RANGE,
            "-v",
        ];
        args.extend_from_slice(extra_args);
        Self::spawn(node, dir, name, wrapper, &args, env)
    }

    /// `kube-uproxy` with exactly `args` (no port range, no `-v`), as a
    /// user would type it.
    pub fn start_plain(node: &Netns, dir: &Path, name: &str, args: &[&str]) -> ProxyProcess {
        Self::spawn(node, dir, name, &[], args, &[])
    }

    fn spawn(
        node: &Netns,
        dir: &Path,
        name: &str,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> ProxyProcess {
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = node.command(program);
                c.args(rest).arg(bin());
                c
            }
            None => node.command(bin()),
        };
        cmd.args(args).envs(env.iter().copied());
        for var in [
            "HTTPS_PROXY",
            "https_proxy",
            "HTTP_PROXY",
            "http_proxy",
            "ALL_PROXY",
            "all_proxy",
            "KUBECONFIG",
        ] {
            cmd.env_remove(var);
        }
        Self::launch(node, dir, name, cmd)
    }

    /// Starts `cmd` (from [`Netns::command`] of `node`, running the proxy
    /// some way: e.g. [`image::tree_command`]) with stdin closed and its
    /// output in `<dir>/<name>.stderr`.
    pub fn launch(
        node: &Netns,
        dir: &Path,
        name: &str,
        mut cmd: std::process::Command,
    ) -> ProxyProcess {
        let stderr = dir.join(format!("{name}.stderr"));
        let log = File::create(&stderr).expect("creating the proxy log file");
        let log2 = log.try_clone().expect("cloning the log file handle");
        cmd.stdin(Stdio::null()).stdout(log2).stderr(log);
        let child = node
            .spawn(cmd)
            .expect("spawning kube-uproxy in the node namespace");
        ProxyProcess {
            child,
            stderr,
            show_too: Vec::new(),
        }
    }

    /// Also prints `file` (under `title`) after the stderr on failure.
    pub fn show_on_failure(&mut self, title: &'static str, file: &Path) {
        self.show_too.push((title, file.to_path_buf()));
    }

    /// What the proxy wrote to stdout and stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_else(|e| format!("<cannot read: {e}>"))
    }

    /// Panics (with the exit status) if the proxy is no longer running.
    pub fn assert_running(&mut self, what: &str) {
        if let Some(status) = self.child.try_wait().expect("try_wait on the proxy") {
            panic!("kube-uproxy exited ({status}) during: {what}");
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if thread::panicking() || std::env::var_os("KU_E2E_SHOW_LOGS").is_some() {
            eprintln!(
                "===== kube-uproxy stderr ({}) =====\n{}\n===== end of kube-uproxy stderr =====",
                self.stderr.display(),
                self.stderr()
            );
            for (title, file) in &self.show_too {
                eprintln!(
                    "===== {title} ({}) =====\n{}",
                    file.display(),
                    fs::read_to_string(file).unwrap_or_default()
                );
            }
        }
    }
}

/// A directory holding an `nft` that refuses every command while
/// `<dir>/fail` exists and otherwise runs the real one.
pub fn failing_nft(dir: &Path) -> PathBuf {
    let real = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("nft not found");
    let bin = dir.join("fake-bin");
    fs::create_dir_all(&bin).expect("fake-bin");
    let script = format!(
        "#!/bin/sh\nif [ -e '{}' ]; then echo 'Error: simulated refusal' >&2; exit 1; fi\nexec {real} \"$@\"\n",
        dir.join("fail").display()
    );
    let nft = bin.join("nft");
    fs::write(&nft, script).expect("writing the fake nft");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&nft, fs::Permissions::from_mode(0o755)).expect("chmod");
    bin
}

static RESOURCE_VERSION: AtomicU64 = AtomicU64::new(1000);

/// A `kind: List` with each Service followed by its EndpointSlice (written
/// by [`crate::manifests`]); every call gives its objects new
/// resourceVersions, as a live cluster would.
pub fn manifests(services: &[ServiceManifest]) -> String {
    let stamped: Vec<ServiceManifest> = services
        .iter()
        .map(|s| ServiceManifest {
            resource_version: RESOURCE_VERSION.fetch_add(2, Ordering::Relaxed),
            ..s.clone()
        })
        .collect();
    list_yaml(&stamped)
}

/// Replaces `path` atomically (a temporary file renamed over it), as
/// editors and `kubectl get -o yaml > tmp && mv` do.
pub fn write_by_rename(path: &Path, yaml: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, yaml).expect("writing the temporary manifests file");
    fs::rename(&tmp, path).expect("renaming over the manifests file");
}

// ---------------------------------------------------------------------------
// Waiting.

/// Calls `check` every `interval` until it returns `Ok`; once `timeout` has
/// passed, returns its last `Err` instead.
pub fn poll(
    timeout: Duration,
    interval: Duration,
    mut check: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let detail = match check() {
            Ok(()) => return Ok(()),
            Err(detail) => detail,
        };
        if Instant::now() >= deadline {
            return Err(detail);
        }
        thread::sleep(interval);
    }
}

/// The ClusterIP of an nft set/map key (as [`Netns::nft_keys`] gives it)
/// if the key is `ip . tcp . port`.
fn tcp_key_ip(key: &[Value], port: u16) -> Option<Ipv4Addr> {
    let proto_ok = key
        .iter()
        .any(|v| v.as_str() == Some("tcp") || v.as_u64() == Some(6));
    let port_ok = key.last().and_then(Value::as_u64) == Some(u64::from(port));
    if proto_ok && port_ok {
        key.first()?.as_str()?.parse().ok()
    } else {
        None
    }
}

/// ClusterIPs of the tcp/[`SVC_PORT`] keys of the nft `kind` (`"set"` or
/// `"map"`) `name` of table `ip kube-uproxy` in `node`.
pub fn nft_tcp_ips(node: &Netns, kind: &str, name: &str) -> Result<Vec<Ipv4Addr>, String> {
    let keys = node
        .nft_keys(kind, "ip", "kube-uproxy", name)
        .map_err(|e| e.to_string())?;
    Ok(keys
        .iter()
        .filter_map(|k| tcp_key_ip(k, SVC_PORT))
        .collect())
}

/// The proxy port the kernel maps `ip . tcp . 80` to, if any.
pub fn proxy_port_of(node: &Netns, ip: Ipv4Addr) -> Option<u16> {
    let out = node
        .output(
            "nft",
            ["-j", "list", "map", "ip", "kube-uproxy", "service-ports"],
        )
        .ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    let map = v["nftables"]
        .as_array()?
        .iter()
        .find_map(|o| o.get("map"))?;
    map["elem"].as_array()?.iter().find_map(|e| {
        let key = &e[0]["concat"];
        (key[0].as_str()? == ip.to_string() && key[2].as_u64()? == u64::from(SVC_PORT))
            .then(|| e[1].as_u64().and_then(|p| u16::try_from(p).ok()))
            .flatten()
    })
}

/// Waits until `ip . tcp . 80` is (`present`) or is not an element of the
/// contract's nft `kind` `name` (map `service-ports`, set `no-endpoints`)
/// in `node`, while `proxy` keeps running; panics after [`READY_TIMEOUT`].
pub fn wait_nft_key(
    proxy: &mut ProxyProcess,
    node: &Netns,
    kind: &str,
    name: &str,
    ip: Ipv4Addr,
    present: bool,
    why: &str,
) {
    let waited = poll(READY_TIMEOUT, Duration::from_millis(50), || {
        proxy.assert_running(why);
        match node.nft_keys(kind, "ip", "kube-uproxy", name) {
            Ok(keys) => {
                let found = keys.iter().any(|k| tcp_key_ip(k, SVC_PORT) == Some(ip));
                if found == present {
                    return Ok(());
                }
                Err(format!("{kind} {name} keys: {keys:?}"))
            }
            Err(e) => Err(e.to_string()),
        }
    });
    if let Err(last) = waited {
        panic!(
            "{why}: {ip} tcp {SVC_PORT} {} in nft {kind} `{name}` after {:?}; last: {last}",
            if present {
                "never appeared"
            } else {
                "still present"
            },
            READY_TIMEOUT
        );
    }
}

// ---------------------------------------------------------------------------
// Client helpers (blocking std sockets created in a namespace).

pub fn connect(ns: &Netns, addr: SocketAddr) -> io::Result<TcpStream> {
    let s = ns.tcp_connect(addr, CONNECT_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Reads one `\n`-terminated line (at most 256 bytes), without over-reading.
pub fn read_line(s: &mut TcpStream) -> io::Result<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while buf.len() < 256 {
        let n = match s.read(&mut byte) {
            // A signal to the test process (a child exiting) is not the
            // peer's doing: read again.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => r?,
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("EOF after {:?}", String::from_utf8_lossy(&buf)),
            ));
        }
        if byte[0] == b'\n' {
            break;
        }
        buf.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Opens a connection and reads the whoami greeting; keeps it open.
pub fn hold(ns: &Netns, addr: SocketAddr) -> io::Result<(TcpStream, String)> {
    let mut s = connect(ns, addr)?;
    let name = read_line(&mut s)?;
    Ok((s, name))
}

/// Closes a whoami connection cleanly: half-close, then read to EOF.
pub fn close(mut s: TcpStream) {
    let _ = s.shutdown(Shutdown::Write);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
}

/// Which backend answers a new connection (closed afterwards).
pub fn who(ns: &Netns, addr: SocketAddr) -> io::Result<String> {
    let (s, name) = hold(ns, addr)?;
    close(s);
    Ok(name)
}

pub fn who_or_panic(ns: &Netns, addr: SocketAddr, what: &str) -> String {
    who(ns, addr).unwrap_or_else(|e| panic!("{what}: connection to {addr} from {}: {e}", ns.name()))
}

/// Round trip on a held whoami connection (it echoes after the greeting).
pub fn assert_echo(s: &mut TcpStream, msg: &str, what: &str) {
    s.write_all(format!("{msg}\n").as_bytes())
        .unwrap_or_else(|e| panic!("{what}: write: {e}"));
    let back = read_line(s).unwrap_or_else(|e| panic!("{what}: read: {e}"));
    assert_eq!(back, msg, "{what}: echo mismatch");
}

/// Polls `GET /` on `addr` from `ns` every 100 ms until the connection
/// is refused (nothing listens there, or no longer), for up to
/// [`READY_TIMEOUT`]; otherwise what the last try got.
pub fn wait_http_refused(ns: &Netns, addr: SocketAddr) -> Result<(), String> {
    poll(
        READY_TIMEOUT,
        Duration::from_millis(100),
        || match http_get(ns, addr, "/") {
            Err(e) if e.contains("refused") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
}

/// `GET path` on `addr` from `ns` on a fresh connection (`Connection:
/// close`): the status and the body.
pub fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s = ns
        .tcp_connect(addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
