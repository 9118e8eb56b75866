//! Command-line flags, following kube-proxy's names where one exists.

pub mod file;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::model::Algorithm;
use crate::proxy::ports::PortRange;
use crate::proxy::relay::{RelayConfig, RelayMode};
use crate::proxy::tcp_options::{Keepalive, TcpOptions};
use crate::rules::conntrack::ConntrackSettings;
use crate::rules::render::LocalTraffic;

/// A userspace L4 proxy for Kubernetes Services: nftables redirects
/// ClusterIP traffic to local listeners, and every connection is relayed to
/// a ready endpoint over a second connection.
#[derive(Debug, Clone, Parser)]
#[command(name = "kube-uproxy", version, about, long_about = LONG_ABOUT)]
pub struct Args {
    /// Read Services and EndpointSlices from this YAML/JSON file or directory
    /// (as `kubectl get svc,endpointslices -A -o yaml` prints them) instead of
    /// the Kubernetes API. Changes are picked up while running.
    #[arg(long, value_name = "PATH", conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,

    /// Kubeconfig to reach the API with. Without it (and without
    /// --manifests): in-cluster config, then KUBECONFIG, then ~/.kube/config.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,

    /// Local ports for the listeners: BEGIN-END, PORT or BEGIN+OFFSET.
    /// Without it the kernel picks free ports.
    #[arg(long, value_name = "RANGE")]
    pub proxy_port_range: Option<PortRange>,

    /// The proxy address: the node-local IPv4 address every listener
    /// binds; Service traffic is DNATed to it. When the node does not have
    /// it, the proxy adds it to `lo` (a link-local /32 by default) and
    /// `--cleanup` removes it. A node's own address works too.
    #[arg(long, value_name = "IPv4", default_value = "169.254.42.1", value_parser = parse_bind_address)]
    pub proxy_address: Ipv4Addr,

    /// kube-proxy's flag, kept for compatibility: a specific address sets
    /// --proxy-address; `0.0.0.0`, `::` or empty (kube-proxy's default,
    /// which names no address) leave the default. kube-proxy's own
    /// meaning (a hint for the node's primary IP) has no use here.
    #[arg(long, value_name = "IP", value_parser = parse_bind_address_alias, conflicts_with = "proxy_address")]
    pub bind_address: Option<BindAddressAlias>,

    /// The same for IPv6 Services: a /128 the proxy adds to `lo` unless
    /// the node has it (default: an address of the unique-local prefix
    /// fd6b:7570:7278::/48, "kuprx"). Unused when the node has IPv6
    /// disabled.
    #[arg(long = "proxy-address-ipv6", visible_alias = "bind-address-ipv6", value_name = "IPv6", default_value = DEFAULT_BIND_ADDRESS_V6, value_parser = parse_bind_address_v6)]
    pub proxy_address_v6: Ipv6Addr,

    /// How often the kernel's rules are checked against what was applied,
    /// and rewritten if they drifted (a flush, a firewall reload).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = |s: &str| SYNC_PERIOD.parse(s))]
    pub sync_period: Duration,

    /// On SIGTERM: how long open connections may take to finish before the
    /// rest are reset. The rules stay in place; a second signal ends at once.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = |s: &str| SHUTDOWN_GRACE.parse(s))]
    pub shutdown_grace: Duration,

    /// Balancing for Services without the `kube-uproxy.io/lb-algorithm`
    /// annotation: round-robin or least-connections.
    #[arg(long, value_name = "ALGORITHM", default_value = "round-robin")]
    pub lb_algorithm: Algorithm,

    /// How TCP payload is moved: splice (zero-copy) or copy (user space).
    #[arg(long, value_enum, default_value = "splice")]
    pub tcp_relay: RelayMode,

    /// TCP keepalive on both sockets of every flow: how long a connection
    /// may be idle before the first probe (whole seconds). 0 turns
    /// keepalive off. With the defaults a peer that vanished without a FIN
    /// is found within 90 s of silence.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_keepalive_time)]
    pub tcp_keepalive_time: Duration,

    /// Time between two keepalive probes (whole seconds).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_keepalive_interval)]
    pub tcp_keepalive_interval: Duration,

    /// Unanswered keepalive probes after which a connection is dropped.
    #[arg(long, value_name = "N", default_value = "3", value_parser = clap::value_parser!(u32).range(1..=127))]
    pub tcp_keepalive_count: u32,

    /// TCP_USER_TIMEOUT of the connections to endpoints: data left
    /// unacknowledged this long drops the connection (a vanished endpoint
    /// is found while data is in flight, where keepalive does not probe).
    /// Default: keepalive time + interval x count; 0: the kernel's
    /// retransmission limit (about 15 minutes).
    #[arg(long, value_name = "DURATION", value_parser = |s: &str| TCP_USER_TIMEOUT.parse(s))]
    pub tcp_user_timeout: Option<Duration>,

    /// A flow that moves no byte either way for this long is reset. 0 (the
    /// default) keeps idle flows for as long as both peers are alive.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = |s: &str| TCP_IDLE_TIMEOUT.parse(s))]
    pub tcp_idle_timeout: Duration,

    /// Most proxied connections open at once; new ones beyond it are
    /// refused with a reset (and one log line per 10 s while the cap
    /// holds). 0: no cap (the open-file limit is the cap then: each
    /// connection holds 2 fds, 2 more per direction in a bulk phase).
    #[arg(long, value_name = "N", default_value = "0", value_parser = |s: &str| MAX_CONNECTIONS.parse(s))]
    pub max_connections: usize,

    /// Threads of the TCP data path, each with an event loop of its own
    /// and a listener of its own on every TCP Service port (SO_REUSEPORT):
    /// a flow lives on the thread that accepted it. 0 (the default): the
    /// TCP data path shares the main runtime's work-stealing workers,
    /// measured faster on 2 CPUs (docs/performance.md, the ledger).
    #[arg(long, value_name = "N", default_value = "0", value_parser = |s: &str| DATA_PATH_THREADS.parse(s))]
    pub data_path_threads: usize,

    /// Threads that serve request mode's client connections (ports
    /// balanced per HTTP request), each with an event loop and upstream
    /// connection pools of its own: an accepted HTTP connection is handed
    /// to one of them for good, so a connection, its streams and the
    /// upstream connections its requests use run on one thread. Default:
    /// one per CPU. 0: request mode runs on the main runtime's
    /// work-stealing workers (measured slower: docs/performance.md).
    /// Unused with --data-path-threads (each of those threads serves the
    /// connections it accepts).
    #[arg(long, value_name = "N", value_parser = |s: &str| HTTP_THREADS.parse(s))]
    pub http_threads: Option<usize>,

    /// Most splice pipes (1 MiB each) open at once, process-wide: bulk
    /// relay directions beyond them copy instead. Each pipe counts 256
    /// pages against root's shared fs.pipe-user-pages-soft for as long as
    /// it exists; past that limit every root process on the host gets
    /// small pipes. Unset: half of fs.pipe-user-pages-soft in 1 MiB pipes
    /// (32 with the default 16384 pages; 64 when there is no soft limit).
    #[arg(long, value_name = "N", value_parser = |s: &str| SPLICE_PIPES_MAX.parse(s))]
    pub splice_pipes_max: Option<usize>,

    /// Changes to --manifests are seen at once through inotify; in addition
    /// every file is stat-ed this often, in case an event was missed.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = |s: &str| MANIFESTS_RESCAN_INTERVAL.parse(s))]
    pub manifests_rescan_interval: Duration,

    /// Which node addresses NodePort traffic is caught on (kube-proxy's
    /// flag): comma-separated CIDRs (a family with none of its own is
    /// caught on all its addresses), or `primary` alone (the Node object's
    /// primary IP of each family; the default route's interface until the
    /// Node is known). Unset: every address of the node, 127.0.0.1
    /// included (iptables mode's default).
    #[arg(long, value_name = "CIDRS|primary", value_parser = parse_nodeport_addresses)]
    pub nodeport_addresses: Option<NodePortAddresses>,

    /// How traffic from this node's pods is told apart (kube-proxy's
    /// flag): ClusterCIDR (sources in --cluster-cidr), BridgeInterface
    /// (packets in on --pod-bridge-interface), InterfaceNamePrefix
    /// (packets in on an interface named --pod-interface-name-prefix…),
    /// or NodeCIDR (sources in the Node object's spec.podCIDRs; no rule
    /// is written until the Node has them, as kube-proxy waits for
    /// them). Pods calling an
    /// externalTrafficPolicy: Local Service's LB IP, externalIP or node
    /// port then reach its endpoints on every node, as with kube-proxy.
    /// Default: ClusterCIDR when --cluster-cidr is given, else no
    /// detection (pods count as external clients).
    #[arg(long, value_name = "MODE", value_enum)]
    pub detect_local_mode: Option<DetectLocalMode>,

    /// The CIDR range of the pods in the cluster (kube-proxy's flag): one,
    /// or a comma-separated dual-stack pair (one per family). With
    /// --detect-local-mode ClusterCIDR, traffic whose source is in it is
    /// from a local pod; otherwise unused.
    #[arg(long, value_name = "CIDRS", value_parser = parse_cluster_cidrs)]
    pub cluster_cidr: Option<ClusterCidrs>,

    /// A bridge interface name (kube-proxy's flag): with
    /// --detect-local-mode BridgeInterface, traffic that comes in on it is
    /// from a local pod.
    #[arg(long, value_name = "NAME", value_parser = parse_interface_name)]
    pub pod_bridge_interface: Option<String>,

    /// An interface name prefix (kube-proxy's flag): with
    /// --detect-local-mode InterfaceNamePrefix, traffic that comes in on
    /// any interface whose name begins with it is from a local pod.
    #[arg(long, value_name = "PREFIX", value_parser = parse_interface_name)]
    pub pod_interface_name_prefix: Option<String>,

    /// Maximum number of NAT connections to track per CPU core
    /// (kube-proxy's flag): net.netfilter.nf_conntrack_max is raised to
    /// this times the node's CPUs, at least --conntrack-min, never
    /// lowered. 0 to leave the limit as-is and ignore --conntrack-min.
    /// Each proxied TCP flow holds two entries (client and endpoint legs).
    #[arg(long, value_name = "N", default_value = "32768", value_parser = |s: &str| CONNTRACK_MAX_PER_CORE.parse(s))]
    pub conntrack_max_per_core: usize,

    /// Minimum number of conntrack entries to allocate, regardless of
    /// --conntrack-max-per-core (kube-proxy's flag).
    #[arg(long, value_name = "N", default_value = "131072", value_parser = |s: &str| CONNTRACK_MIN.parse(s))]
    pub conntrack_min: usize,

    /// Idle timeout for established TCP connections in conntrack
    /// (net.netfilter.nf_conntrack_tcp_timeout_established; kube-proxy's
    /// flag). 0 to leave as-is.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = |s: &str| CONNTRACK_TCP_TIMEOUT_ESTABLISHED.parse(s))]
    pub conntrack_tcp_timeout_established: Duration,

    /// NAT timeout for TCP connections in the CLOSE_WAIT state
    /// (net.netfilter.nf_conntrack_tcp_timeout_close_wait; kube-proxy's
    /// flag). 0 to leave as-is.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = |s: &str| CONNTRACK_TCP_TIMEOUT_CLOSE_WAIT.parse(s))]
    pub conntrack_tcp_timeout_close_wait: Duration,

    /// How long a UDP flow (one client address) keeps its upstream socket
    /// without a datagram in either direction. The legacy proxier's 250 ms
    /// broke DNS over slow links (kubernetes#14939).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = |s: &str| UDP_TIMEOUT.parse(s))]
    pub udp_timeout: Duration,

    /// Most UDP flows held at once, per Service port. When full, the flows
    /// idle longest make room; a flow in use is never pushed out.
    /// Finished exchanges (one datagram, answered: a DNS query) make room
    /// first, however recent.
    #[arg(long, value_name = "N", default_value = "16384", value_parser = |s: &str| UDP_MAX_FLOWS.parse(s))]
    pub udp_max_flows: usize,

    /// Most UDP flows held at once by all Service ports together: each
    /// holds a socket, and the fds they take are the TCP data path's too.
    /// When it is reached, a new client takes the place of an idle flow of
    /// its own Service port, else its datagram is dropped (and counted).
    /// Default: a quarter of the open-file limit (after it is raised to
    /// the hard limit), leaving the rest to TCP connections.
    #[arg(long, value_name = "N", value_parser = |s: &str| UDP_MAX_FLOWS_TOTAL.parse(s))]
    pub udp_max_flows_total: Option<usize>,

    /// The mark (`SO_MARK`) of the proxy's own connections and datagrams
    /// to endpoints (decimal, or `0x…`; not 0). The NAT output chain lets
    /// packets carrying every bit of it pass untranslated, so an endpoint
    /// whose address and port are themselves a Service destination (an
    /// externalIP equal to a node address, with a hostNetwork backend on
    /// that port) is reached, not looped back into the proxy. Pick another
    /// bit if 0x2000 is used on the node (docs/rules.md).
    #[arg(long, value_name = "MARK", default_value = "0x2000", value_parser = parse_mark)]
    pub upstream_mark: u32,

    /// Whether this node ever connects to its endpoints from the client's
    /// own address (preserve-client-ip). `auto`: as each Service asks (a
    /// `Local` traffic policy, or the annotation
    /// `kube-uproxy.io/preserve-client-ip`). `off`: never, whatever the
    /// Services say, and neither the policy route nor the mark rules are
    /// installed (those of an earlier instance are removed): for a node
    /// whose CNI or policy routing conflicts with them (docs/rules.md).
    #[arg(long, value_name = "MODE", value_enum, default_value = "auto")]
    pub preserve_client_ip: PreserveClientIp,

    /// The mark of the connections to this node's endpoints opened from
    /// the client's own address (preserve-client-ip: `Local` traffic
    /// policies, or the annotation `kube-uproxy.io/preserve-client-ip`).
    /// Saved in their conntrack entries and given back to the endpoints'
    /// replies, which the policy route `fwmark MARK lookup
    /// --preserve-client-ip-table` delivers to the proxy. A bit of its
    /// own: not one of --upstream-mark's, kube-proxy's (0x4000, 0x8000),
    /// Calico's (0xffff0000) or Cilium's (0x0f00) (docs/rules.md).
    #[arg(long, value_name = "MARK", default_value = "0x1000", value_parser = parse_mark)]
    pub preserve_client_ip_mark: u32,

    /// The routing table of preserve-client-ip's policy route (it holds
    /// `local default dev lo`); `--cleanup` flushes it.
    #[arg(long, value_name = "TABLE", default_value_t = 4242, value_parser = parse_route_table)]
    pub preserve_client_ip_table: u32,

    /// Balance each HTTP request, not each connection, on the Service
    /// ports that ask for it by `appProtocol` (`http`, `kubernetes.io/h2c`,
    /// `grpc`, …) or by the annotation `kube-uproxy.io/balance: request`
    /// (docs/services.md). `false`: every port is balanced per connection,
    /// as by kube-proxy.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub request_balancing: bool,

    /// On a port in request mode, how long a new connection may stay
    /// silent before it is taken for a server-speaks-first protocol and
    /// relayed as bytes. HTTP clients write at once; only a mislabelled
    /// protocol whose server speaks first waits this long once.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = |s: &str| HTTP_DETECT_TIMEOUT.parse(s))]
    pub http_detect_timeout: Duration,

    /// Idle HTTP/1.1 connections to endpoints are closed after this, before
    /// common servers close theirs (Node.js and Apache: 5 s) and race a
    /// request written at that moment.
    #[arg(long, value_name = "DURATION", default_value = "4s", value_parser = |s: &str| HTTP_UPSTREAM_IDLE_TIMEOUT.parse(s))]
    pub http_upstream_idle_timeout: Duration,

    /// Remove everything the proxy installed (the nftables table, the
    /// address on lo, the sysctl it changed) and exit.
    #[arg(long)]
    pub cleanup: bool,

    /// Log verbosity, as kube-proxy's `--v` (klog levels): 0-3 info, 4-5
    /// debug, 6 and more trace. `-v` alone is 4 and `-vv` 6, as before.
    /// RUST_LOG, when set, overrides it.
    #[arg(short = 'v', long = "v", value_name = "N", num_args = 0..=1, default_value = "0", default_missing_value = "4", value_parser = parse_verbosity)]
    pub verbosity: u8,

    /// Once this instance's rules are in the kernel (its first sync), remove
    /// kube-proxy's: its nftables tables, its iptables chains (iptables-nft
    /// and legacy, IPv4 and IPv6) and the jumps into them, and in IPVS mode
    /// the kube-ipvs0 interface, its IPVS services and KUBE-* ipsets. For
    /// taking a node over from kube-proxy without a gap (docs/operations.md).
    #[arg(long)]
    pub cleanup_kube_proxy: bool,

    /// Read settings from this YAML file: kube-proxy's own
    /// `KubeProxyConfiguration` (kubeproxy.config.k8s.io/v1alpha1, as
    /// kubeadm writes it), kube-uproxy's `KubeUproxyConfiguration`
    /// (kube-uproxy.io/v1alpha1: a field for every flag), or both as two
    /// YAML documents. Flags given on the command line override the file.
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,

    /// Where /healthz and /livez are served (IP:PORT, or IP for port
    /// 10256); empty to turn them off.
    #[arg(
        long,
        value_name = "IP:PORT",
        default_value = "0.0.0.0:10256",
        global = true
    )]
    pub healthz_bind_address: ServeAddress,

    /// Where /metrics, /proxyMode and /debug/services are served (IP:PORT,
    /// or IP for port 10249); empty to turn them off. `kube-uproxy status`
    /// reads from here.
    #[arg(
        long,
        value_name = "IP:PORT",
        default_value = "127.0.0.1:10249",
        global = true
    )]
    pub metrics_bind_address: ServeAddress,

    /// Also serve /healthz and /livez on this Unix socket. Every instance
    /// has its own (an emptyDir of its pod), so the probes of a new pod
    /// reach the new process, not the old one that shares the node's
    /// ports during a rolling update (`kube-uproxy probe` reads it).
    #[arg(long, value_name = "PATH", global = true)]
    pub healthz_socket: Option<PathBuf>,

    /// Where the sysctl files are. `/proc/sys` is read-only in a container
    /// that is not privileged: there, mount the host's `/proc/sys/net/ipv4`
    /// writable under another path and point this at its root
    /// (deploy/daemonset.yaml: `/host/proc/sys`).
    #[arg(long, value_name = "PATH", default_value = "/proc/sys")]
    pub proc_sys_dir: PathBuf,

    /// Label metrics by endpoint as well (connections and connect failures
    /// per endpoint). Off by default: endpoints come and go with pods.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", action = clap::ArgAction::Set)]
    pub metrics_per_endpoint: bool,

    /// Log line format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// The name of this node (kube-proxy's flag): EndpointSlice `nodeName`
    /// and `hints.forNodes` are compared with it, and the Node object of
    /// that name gives the zone and `/healthz`'s `nodeEligible`. Default:
    /// the host name.
    #[arg(long, value_name = "NAME")]
    pub hostname_override: Option<String>,

    /// This node's zone, compared with EndpointSlice `hints.forZones`.
    /// Default: the Node object's `topology.kubernetes.io/zone` label;
    /// this flag wins over it (manifests without a Node object need it).
    #[arg(long, value_name = "ZONE")]
    pub node_zone: Option<String>,

    #[command(subcommand)]
    pub command: Option<Command>,

    /// Fields of a kube-proxy config file that have no effect here, each
    /// with the reason (logged once at start).
    #[arg(skip)]
    pub ignored_config_fields: Vec<String>,
}

impl Args {
    /// This node's name: `--hostname-override`, else the host name
    /// (lower-cased, as kube-proxy does).
    pub fn node_name(&self) -> String {
        match self.hostname_override.as_deref().map(str::trim) {
            Some(name) if !name.is_empty() => name.to_lowercase(),
            _ => host_name().to_lowercase(),
        }
    }
}

/// The kernel's host name (empty if it cannot be read).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

const LONG_ABOUT: &str = "\
A userspace L4 proxy for Kubernetes Services: nftables redirects ClusterIP
traffic to local listeners, and every connection is relayed to a ready
endpoint over a second connection.

Run as root (nftables, an address on lo). Common ways to start it:
  kube-uproxy --kubeconfig ~/.kube/config      against a cluster, from a dev box
  kube-uproxy                                   in a pod (in-cluster config)
  kube-uproxy --manifests cluster.yaml          from a file of Services and EndpointSlices
  kube-uproxy --config /etc/kube-uproxy/config.yaml

Then: `kube-uproxy status` shows every Service port and its endpoints,
`curl 127.0.0.1:10249/metrics` the metrics, `curl 127.0.0.1:10256/healthz`
the health. `kube-uproxy --cleanup` removes everything it installed.";

/// A subcommand: talks to a running proxy instead of being one.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Print every Service port of the running proxy (read from
    /// /debug/services on --metrics-bind-address) as a table.
    Status {
        /// Print the JSON as the proxy sent it.
        #[arg(long)]
        json: bool,
    },
    /// Ask the running proxy whether it is healthy (exit 0) or not (exit 1):
    /// GET /healthz (or /livez) on --healthz-socket if given, else on
    /// --healthz-bind-address. For exec probes.
    Probe {
        /// /livez instead of /healthz (ignores node eligibility).
        #[arg(long)]
        livez: bool,
    },
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// An address an HTTP server is bound to, or none (the empty string turns
/// the server off, as in kube-proxy). An IP alone takes `default_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeAddress(pub Option<SocketAddr>);

impl ServeAddress {
    /// Parses `IP:PORT`, `IP` (with `default_port`) or the empty string.
    pub fn parse(s: &str, default_port: u16) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(ServeAddress(None));
        }
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(ServeAddress(Some(a)));
        }
        let ip = s.trim_start_matches('[').trim_end_matches(']');
        match ip.parse::<IpAddr>() {
            Ok(ip) => Ok(ServeAddress(Some(SocketAddr::new(ip, default_port)))),
            Err(_) => Err(format!(
                "{s:?} is not IP:PORT, an IP, or empty (to turn the server off)"
            )),
        }
    }
}

impl FromStr for ServeAddress {
    type Err = String;
    /// Without a port: 0, which [`Args::healthz_port`] and friends
    /// replace by the server's default.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ServeAddress::parse(s, 0)
    }
}

/// kube-proxy's default ports.
pub const HEALTHZ_PORT: u16 = 10256;
pub const METRICS_PORT: u16 = 10249;

impl Args {
    /// Where /healthz is served, if anywhere (port 0 = the default 10256).
    pub fn healthz_address(&self) -> Option<SocketAddr> {
        with_default_port(self.healthz_bind_address, HEALTHZ_PORT)
    }

    /// Where /metrics is served, if anywhere (port 0 = the default 10249).
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        with_default_port(self.metrics_bind_address, METRICS_PORT)
    }
}

fn with_default_port(a: ServeAddress, port: u16) -> Option<SocketAddr> {
    a.0.map(|mut a| {
        if a.port() == 0 {
            a.set_port(port);
        }
        a
    })
}

/// `--nodeport-addresses`, with kube-proxy's meaning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// The node's addresses within these ranges; a family with no range
    /// here (or with `0.0.0.0/0` / `::/0`) serves its node ports on every
    /// address of that family.
    Cidrs(Vec<ipnet::IpNet>),
    /// The Node object's primary IP of each family (the first
    /// `InternalIP`, else `ExternalIP`, of `status.addresses`); until the
    /// Node is known, the addresses of the interface holding the default
    /// route.
    Primary,
}

/// `--preserve-client-ip`: the node-wide switch of preserve-client-ip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PreserveClientIp {
    /// As each Service asks.
    Auto,
    /// Never on this node.
    Off,
}

/// `--detect-local-mode`: kube-proxy's `LocalMode` values, spelt as it
/// spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DetectLocalMode {
    /// Sources within `--cluster-cidr`.
    #[value(name = "ClusterCIDR")]
    ClusterCidr,
    /// Sources within the Node object's `spec.podCIDRs`.
    #[value(name = "NodeCIDR")]
    NodeCidr,
    /// Packets that come in on `--pod-bridge-interface`.
    #[value(name = "BridgeInterface")]
    BridgeInterface,
    /// Packets that come in on an interface named
    /// `--pod-interface-name-prefix`….
    #[value(name = "InterfaceNamePrefix")]
    InterfaceNamePrefix,
}

/// `--cluster-cidr`: at most one range per family, as kube-proxy takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterCidrs(pub Vec<ipnet::IpNet>);

/// One CIDR, or a dual-stack pair (one per family); a range of one family
/// twice is refused, as by kube-proxy (the detector matches one prefix per
/// family).
pub(crate) fn parse_cluster_cidrs(s: &str) -> Result<ClusterCidrs, String> {
    let mut nets: Vec<ipnet::IpNet> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let net: ipnet::IpNet = part
            .parse()
            .map_err(|_| format!("{part:?} is not a CIDR"))?;
        if nets
            .iter()
            .any(|n| n.addr().is_ipv4() == net.addr().is_ipv4())
        {
            return Err(format!(
                "{s:?}: give one CIDR, or two of different families (a dual-stack pair)"
            ));
        }
        nets.push(net.trunc());
    }
    if nets.is_empty() {
        return Err("give one CIDR, or a dual-stack pair separated by a comma".into());
    }
    Ok(ClusterCidrs(nets))
}

/// An interface name or prefix as the kernel takes it: 1 to 15 bytes, no
/// `/`, whitespace or nft wildcard.
fn parse_interface_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && !s
            .chars()
            .any(|c| c == '/' || c == '*' || c == '\\' || c == '"' || c.is_whitespace());
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not an interface name (1 to 15 characters, no '/', '*', quotes or spaces)"
        ))
    }
}

/// `--upstream-mark`: a number, `0x…` for hexadecimal, not 0 (the NAT
/// rule passes packets whose mark has every bit of it, which a mark of 0
/// would give every packet).
pub(crate) fn parse_mark(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let v = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => t.parse::<u32>(),
    }
    .map_err(|e| format!("{s:?} is not a mark (a 32-bit number, 0x… for hexadecimal): {e}"))?;
    if v == 0 {
        return Err("the mark must not be 0: every packet would pass the NAT rules".into());
    }
    Ok(v)
}

/// `--preserve-client-ip-table`: a table number other than the kernel's
/// own (0 unspec, 253 default, 254 main, 255 local).
pub(crate) fn parse_route_table(s: &str) -> Result<u32, String> {
    let v: u32 = s
        .trim()
        .parse()
        .map_err(|e| format!("{s:?} is not a routing table number: {e}"))?;
    if matches!(v, 0 | 253 | 254 | 255) {
        return Err(format!(
            "table {v} is the kernel's own (unspec, default, main or local); pick another"
        ));
    }
    Ok(v)
}

impl Args {
    /// The preserve-client-ip mark the data path and the rules use: 0
    /// (never, no mark rules) with `--preserve-client-ip off`, so that the
    /// switch is one value where it matters, not a check at each use.
    pub fn preserve_mark_in_use(&self) -> u32 {
        match self.preserve_client_ip {
            PreserveClientIp::Auto => self.preserve_client_ip_mark,
            PreserveClientIp::Off => 0,
        }
    }

    /// The mark flags together: preserve-client-ip's mark must not share a
    /// bit with the upstream mark, or every connection to an endpoint
    /// would have its replies routed to the proxy's sockets as if it came
    /// from a client's address.
    pub fn check_marks(&self) -> Result<(), String> {
        if self.preserve_client_ip_mark & self.upstream_mark != 0 {
            return Err(format!(
                "--preserve-client-ip-mark {:#x} shares bits with --upstream-mark {:#x}",
                self.preserve_client_ip_mark, self.upstream_mark
            ));
        }
        Ok(())
    }
}

/// kube-proxy's `nodePortAddresses` as its validation takes it: CIDRs of
/// either family, or the one keyword `primary`, alone (kube-proxy refuses
/// `primary` beside CIDRs, and has no other keyword).
pub(crate) fn parse_nodeport_addresses(s: &str) -> Result<NodePortAddresses, String> {
    let parts: Vec<&str> = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if parts.contains(&NODEPORT_PRIMARY) {
        if parts.len() != 1 {
            return Err(format!(
                "{s:?}: can't use both `primary` and CIDRs (as kube-proxy refuses it): give `primary` alone, or CIDRs"
            ));
        }
        return Ok(NodePortAddresses::Primary);
    }
    let mut nets = Vec::new();
    for part in parts {
        nets.push(
            part.parse::<ipnet::IpNet>()
                .map_err(|_| {
                    format!(
                        "{part:?} is neither a CIDR nor `primary` (kube-proxy's only keyword; want CIDRs separated by commas, or `primary`)"
                    )
                })?
                .trunc(),
        );
    }
    if nets.is_empty() {
        return Err("give CIDRs separated by commas, or `primary`".into());
    }
    Ok(NodePortAddresses::Cidrs(nets))
}

/// `--nodeport-addresses primary`.
const NODEPORT_PRIMARY: &str = "primary";

impl Args {
    /// Keepalive and user timeout, as the flags say.
    pub fn tcp_options(&self) -> TcpOptions {
        let keepalive = (!self.tcp_keepalive_time.is_zero()).then_some(Keepalive {
            time: self.tcp_keepalive_time,
            interval: self.tcp_keepalive_interval,
            count: self.tcp_keepalive_count,
        });
        let user_timeout = match self.tcp_user_timeout {
            Some(t) if t.is_zero() => None,
            Some(t) => Some(t),
            None => keepalive.map(|k| k.time + k.interval * k.count),
        };
        TcpOptions {
            keepalive,
            user_timeout,
        }
    }

    /// `--splice-pipes-max`, or its default from the host's pipe quota
    /// (read under `--proc-sys-dir`).
    pub fn splice_pipes_max(&self) -> usize {
        self.splice_pipes_max.unwrap_or_else(|| {
            // fs.* is not per namespace: /proc/sys has it in a container
            // too, where --proc-sys-dir may hold net.ipv4 alone.
            let soft = [
                self.proc_sys_dir.as_path(),
                std::path::Path::new("/proc/sys"),
            ]
            .iter()
            .find_map(|dir| {
                std::fs::read_to_string(dir.join("fs/pipe-user-pages-soft"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            });
            default_splice_pipes_max(soft)
        })
    }

    /// Local-traffic detection as the flags ask it (kube-proxy's rules):
    /// `None` when there is none. Errors name the flag that is missing or
    /// the mode that is not supported.
    pub fn local_traffic(&self) -> Result<Option<LocalTraffic>, String> {
        let mode = match self.detect_local_mode {
            Some(m) => m,
            // kube-proxy's default mode is ClusterCIDR, which detects
            // nothing without a cluster CIDR.
            None if self.cluster_cidr.is_some() => DetectLocalMode::ClusterCidr,
            None => return Ok(None),
        };
        match mode {
            DetectLocalMode::ClusterCidr => match &self.cluster_cidr {
                Some(c) => Ok(Some(LocalTraffic::Sources(c.0.clone()))),
                None => Err(
                    "--detect-local-mode ClusterCIDR needs --cluster-cidr (the pods' range)".into(),
                ),
            },
            // The ranges come from the Node object; none until it is known.
            DetectLocalMode::NodeCidr => Ok(Some(LocalTraffic::NodePodCidrs(Vec::new()))),
            DetectLocalMode::BridgeInterface => match &self.pod_bridge_interface {
                Some(name) => Ok(Some(LocalTraffic::Bridge(name.clone()))),
                None => {
                    Err("--detect-local-mode BridgeInterface needs --pod-bridge-interface".into())
                }
            },
            DetectLocalMode::InterfaceNamePrefix => match &self.pod_interface_name_prefix {
                Some(p) => Ok(Some(LocalTraffic::InterfacePrefix(p.clone()))),
                None => Err(
                    "--detect-local-mode InterfaceNamePrefix needs --pod-interface-name-prefix"
                        .into(),
                ),
            },
        }
    }

    /// The conntrack sysctls as the flags ask them.
    pub fn conntrack(&self) -> ConntrackSettings {
        ConntrackSettings {
            max_per_core: self.conntrack_max_per_core as u64,
            min: self.conntrack_min as u64,
            tcp_established: self.conntrack_tcp_timeout_established,
            tcp_close_wait: self.conntrack_tcp_timeout_close_wait,
        }
    }

    /// How flows are relayed.
    pub fn relay(&self) -> RelayConfig {
        RelayConfig {
            mode: self.tcp_relay,
            idle_timeout: (!self.tcp_idle_timeout.is_zero()).then_some(self.tcp_idle_timeout),
        }
    }
}

/// The range a duration setting accepts. One definition per setting serves
/// its flag as clap's value parser, and so its field of the config file too
/// (`config::file` hands every field to the flag's parser), so the two
/// refuse the same values with the same words.
/// Why bounds at all: `--sync-period 0s` turned the drift check into a
/// loop of `nft` runs on one core, `--manifests-rescan-interval 0s`
/// panicked in the timer, and a duration of centuries overflows the
/// clock's arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationBounds {
    /// The flag, named in every error (the file's errors name it too).
    pub flag: &'static str,
    pub min: Duration,
    pub max: Duration,
    /// 0 is accepted as well, and means "off".
    pub zero_is_off: bool,
}

impl DurationBounds {
    /// Parses `s` (`30s`, `1m30s`, `500ms`) and checks it against the bounds.
    pub fn parse(&self, s: &str) -> Result<Duration, String> {
        let d = humantime::parse_duration(s.trim())
            .map_err(|e| format!("{}: {s:?} is not a duration: {e}", self.flag))?;
        self.check(d)
    }

    /// `d` if it is within the bounds, else an error naming the flag and
    /// what it accepts.
    pub fn check(&self, d: Duration) -> Result<Duration, String> {
        if (d.is_zero() && self.zero_is_off) || (self.min..=self.max).contains(&d) {
            return Ok(d);
        }
        let (min, max) = (
            humantime::format_duration(self.min),
            humantime::format_duration(self.max),
        );
        let off = if self.zero_is_off { "0 (off) or " } else { "" };
        Err(format!(
            "{}: {} is out of range: want {off}{min} to {max}",
            self.flag,
            humantime::format_duration(d)
        ))
    }
}

/// The range a count setting accepts; see [`DurationBounds`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CountBounds {
    pub flag: &'static str,
    pub min: usize,
    pub max: usize,
    /// 0 is accepted as well, and means "no cap".
    pub zero_is_off: bool,
}

impl CountBounds {
    pub fn parse(&self, s: &str) -> Result<usize, String> {
        let n: usize = s
            .trim()
            .parse()
            .map_err(|_| format!("{}: {s:?} is not a whole number", self.flag))?;
        if (n == 0 && self.zero_is_off) || (self.min..=self.max).contains(&n) {
            return Ok(n);
        }
        let off = if self.zero_is_off {
            "0 (no cap) or "
        } else {
            ""
        };
        Err(format!(
            "{}: {n} is out of range: want {off}{} to {}",
            self.flag, self.min, self.max
        ))
    }
}

const SECOND: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// Each drift check runs `nft` and reads the table back: more often than
/// once a second is a busy loop, not a check.
pub const SYNC_PERIOD: DurationBounds = DurationBounds {
    flag: "--sync-period",
    min: SECOND,
    max: DAY,
    zero_is_off: false,
};
/// The safety-net stat of every manifest file; inotify sees changes at
/// once, so below 100 ms this only burns a core.
pub const MANIFESTS_RESCAN_INTERVAL: DurationBounds = DurationBounds {
    flag: "--manifests-rescan-interval",
    min: Duration::from_millis(100),
    max: HOUR,
    zero_is_off: false,
};
/// 0: open connections are reset at once on SIGTERM.
pub const SHUTDOWN_GRACE: DurationBounds = DurationBounds {
    flag: "--shutdown-grace",
    min: Duration::ZERO,
    max: DAY,
    zero_is_off: false,
};
/// The legacy proxier's 250 ms broke DNS over slow links
/// (kubernetes#14939): resolvers retry after a second or more.
pub const UDP_TIMEOUT: DurationBounds = DurationBounds {
    flag: "--udp-timeout",
    min: SECOND,
    max: DAY,
    zero_is_off: false,
};
/// Below a second, a pause in any request/response protocol resets it.
pub const TCP_IDLE_TIMEOUT: DurationBounds = DurationBounds {
    flag: "--tcp-idle-timeout",
    min: SECOND,
    max: Duration::from_secs(30 * 24 * 3600),
    zero_is_off: true,
};
/// The kernel takes milliseconds in 32 bits (49 days); below a second,
/// one retransmission drops the connection.
pub const TCP_USER_TIMEOUT: DurationBounds = DurationBounds {
    flag: "--tcp-user-timeout",
    min: SECOND,
    max: DAY,
    zero_is_off: true,
};
/// Below 100 ms a client on a slow link would lose balancing per request;
/// above 10 s a mislabelled server-first protocol waits too long.
pub const HTTP_DETECT_TIMEOUT: DurationBounds = DurationBounds {
    flag: "--http-detect-timeout",
    min: Duration::from_millis(100),
    max: Duration::from_secs(10),
    zero_is_off: false,
};
/// At least a second, or nothing is ever reused between requests.
pub const HTTP_UPSTREAM_IDLE_TIMEOUT: DurationBounds = DurationBounds {
    flag: "--http-upstream-idle-timeout",
    min: SECOND,
    max: HOUR,
    zero_is_off: false,
};
/// kube-proxy's `conntrack.tcpEstablishedTimeout`: the kernel takes whole
/// seconds (a fraction is dropped); below a second every idle flow would
/// lose its entry at once.
pub const CONNTRACK_TCP_TIMEOUT_ESTABLISHED: DurationBounds = DurationBounds {
    flag: "--conntrack-tcp-timeout-established",
    min: SECOND,
    max: Duration::from_secs(365 * 24 * 3600),
    zero_is_off: true,
};
/// kube-proxy's `conntrack.tcpCloseWaitTimeout`.
pub const CONNTRACK_TCP_TIMEOUT_CLOSE_WAIT: DurationBounds = DurationBounds {
    flag: "--conntrack-tcp-timeout-close-wait",
    min: SECOND,
    max: Duration::from_secs(365 * 24 * 3600),
    zero_is_off: true,
};
/// kube-proxy's `conntrack.maxPerCore` (an int32 there).
pub const CONNTRACK_MAX_PER_CORE: CountBounds = CountBounds {
    flag: "--conntrack-max-per-core",
    min: 1,
    max: i32::MAX as usize,
    zero_is_off: true,
};
/// kube-proxy's `conntrack.min` (an int32 there).
pub const CONNTRACK_MIN: CountBounds = CountBounds {
    flag: "--conntrack-min",
    min: 0,
    max: i32::MAX as usize,
    zero_is_off: false,
};
/// 0 flows would drop every datagram; one per fd at most.
pub const UDP_MAX_FLOWS: CountBounds = CountBounds {
    flag: "--udp-max-flows",
    min: 1,
    max: 1 << 20,
    zero_is_off: false,
};
/// One fd per flow: more than 2^24 cannot be open.
pub const UDP_MAX_FLOWS_TOTAL: CountBounds = CountBounds {
    flag: "--udp-max-flows-total",
    min: 1,
    max: 1 << 24,
    zero_is_off: false,
};
/// Each connection holds 2 fds or more: more than 2^24 cannot be open.
pub const MAX_CONNECTIONS: CountBounds = CountBounds {
    flag: "--max-connections",
    min: 1,
    max: 1 << 24,
    zero_is_off: true,
};
/// 0: the shared runtime; more threads than any node has cores is a typo.
pub const DATA_PATH_THREADS: CountBounds = CountBounds {
    flag: "--data-path-threads",
    min: 1,
    max: 1024,
    zero_is_off: true,
};
pub const HTTP_THREADS: CountBounds = CountBounds {
    flag: "--http-threads",
    min: 1,
    max: 1024,
    zero_is_off: true,
};
/// At least one pipe (`--tcp-relay copy` is the way to splice none);
/// 4096 pipes of 1 MiB are 4 GiB of pipe quota, far past any host's.
pub const SPLICE_PIPES_MAX: CountBounds = CountBounds {
    flag: "--splice-pipes-max",
    min: 1,
    max: 4096,
    zero_is_off: false,
};

/// The default of `--splice-pipes-max` for a pipe quota of `soft_pages`
/// (`fs.pipe-user-pages-soft`; `None`: unreadable): half of it in pipes of
/// 256 pages, leaving the other half to the host's other root processes.
/// 0 is no soft limit: 64, what the default quota holds whole.
pub fn default_splice_pipes_max(soft_pages: Option<u64>) -> usize {
    const PAGES_PER_PIPE: u64 = 256;
    match soft_pages {
        None => crate::proxy::relay::DEFAULT_SPLICE_PIPES_MAX,
        Some(0) => 64,
        Some(p) => usize::try_from(p / 2 / PAGES_PER_PIPE)
            .unwrap_or(SPLICE_PIPES_MAX.max)
            .clamp(SPLICE_PIPES_MAX.min, SPLICE_PIPES_MAX.max),
    }
}

/// The kernel takes keepalive times in whole seconds, up to 32767.
fn keepalive_seconds(s: &str, zero_ok: bool) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d.is_zero() && zero_ok {
        return Ok(d);
    }
    if d.subsec_nanos() != 0 || d.as_secs() == 0 || d.as_secs() > 32767 {
        return Err(format!("{s:?}: want whole seconds from 1s to 32767s"));
    }
    Ok(d)
}

fn parse_keepalive_time(s: &str) -> Result<Duration, String> {
    keepalive_seconds(s, true)
}

fn parse_keepalive_interval(s: &str) -> Result<Duration, String> {
    keepalive_seconds(s, false)
}

/// The default of `--bind-address-ipv6`.
pub const DEFAULT_BIND_ADDRESS_V6: &str = "fd6b:7570:7278::1";

/// A unicast IPv6 address DNAT can target from every hook: not the
/// wildcard, not `::1` (the kernel does not route translated packets from
/// other interfaces to loopback), not link-local (it needs a zone), not an
/// IPv4-mapped one.
pub fn parse_bind_address_v6(s: &str) -> Result<Ipv6Addr, String> {
    let a: Ipv6Addr = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv6 address"))?;
    if a.is_unspecified()
        || a.is_loopback()
        || a.is_multicast()
        || a.is_unicast_link_local()
        || a.to_ipv4_mapped().is_some()
    {
        return Err(format!(
            "{a} cannot be the IPv6 proxy address: give a unicast address that is not loopback, link-local or IPv4-mapped (default {DEFAULT_BIND_ADDRESS_V6})"
        ));
    }
    Ok(a)
}

/// A unicast IPv4 address that DNAT can target from every hook: not the
/// wildcard (DNAT needs one address), not loopback (the kernel drops
/// packets from other interfaces translated to 127.0.0.0/8 unless
/// `route_localnet` is set, which kube-proxy learned is unsafe).
pub fn parse_bind_address(s: &str) -> Result<Ipv4Addr, String> {
    let a: Ipv4Addr = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 address"))?;
    if a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast() {
        return Err(format!(
            "{a} cannot be the proxy address: give a unicast address that is not loopback (default 169.254.42.1)"
        ));
    }
    Ok(a)
}

/// `--bind-address`: kube-proxy's flag name for what is
/// `--proxy-address` here. `None`: the value names no address (kube-proxy's
/// default `0.0.0.0`, `::`, or empty), so the proxy address keeps its
/// default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindAddressAlias(pub Option<Ipv4Addr>);

/// kube-proxy writes `0.0.0.0` for "unset" in every config it renders:
/// taken as the default, not refused; any other value must be a proxy
/// address.
pub fn parse_bind_address_alias(s: &str) -> Result<BindAddressAlias, String> {
    match s.trim() {
        "" | "0.0.0.0" | "::" => Ok(BindAddressAlias(None)),
        other => parse_bind_address(other).map(|a| BindAddressAlias(Some(a))),
    }
}

/// kube-proxy's `--v`: a klog level. Also `v`, `vv`, … (what `-vv`,
/// `-vvv` give clap): the old counted form, which meant trace.
pub fn parse_verbosity(s: &str) -> Result<u8, String> {
    let t = s.trim();
    if !t.is_empty() && t.chars().all(|c| c == 'v') {
        return Ok(6);
    }
    t.parse::<u8>().map_err(|_| {
        format!("{s:?} is not a verbosity level (a number: 0-3 info, 4-5 debug, 6 or more trace)")
    })
}

/// The log level of a verbosity: klog's levels 0-3 are what an operator
/// reads in normal operation (info), 4-5 are kube-proxy's debugging
/// levels, 6 and more its request traces.
pub fn log_level(verbosity: u8) -> &'static str {
    match verbosity {
        0..=3 => "info",
        4..=5 => "debug",
        _ => "trace",
    }
}

impl Args {
    /// The IPv4 proxy address: `--proxy-address`, or a specific address
    /// given by kube-proxy's name `--bind-address`.
    pub fn proxy_address(&self) -> Ipv4Addr {
        match self.bind_address {
            Some(BindAddressAlias(Some(a))) => a,
            _ => self.proxy_address,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Every bounded duration setting: values it must refuse (on the
    /// command line and in the file), and the edge values it must take.
    pub(crate) const DURATIONS: &[(DurationBounds, &[&str], &[&str])] = &[
        (SYNC_PERIOD, &["0s", "999ms", "25h", "soon"], &["1s", "24h"]),
        (
            MANIFESTS_RESCAN_INTERVAL,
            &["0s", "99ms", "2h"],
            &["100ms", "1h"],
        ),
        (SHUTDOWN_GRACE, &["25h", "-1s"], &["0s", "24h"]),
        (UDP_TIMEOUT, &["0s", "250ms", "25h"], &["1s", "24h"]),
        (
            TCP_IDLE_TIMEOUT,
            &["500ms", "31days"],
            &["0s", "1s", "30days"],
        ),
        (TCP_USER_TIMEOUT, &["1ms", "25h"], &["0s", "1s", "24h"]),
        (
            CONNTRACK_TCP_TIMEOUT_ESTABLISHED,
            &["500ms", "366days"],
            &["0s", "1s", "24h0m0s", "365days"],
        ),
        (
            CONNTRACK_TCP_TIMEOUT_CLOSE_WAIT,
            &["500ms", "366days"],
            &["0s", "1h0m0s"],
        ),
    ];

    #[test]
    fn every_duration_and_count_flag_refuses_what_is_out_of_range() {
        for (bounds, bad, good) in DURATIONS {
            for v in *bad {
                let e =
                    Args::try_parse_from(["kube-uproxy".into(), format!("{}={v}", bounds.flag)])
                        .expect_err(&format!("{} {v} accepted", bounds.flag))
                        .to_string();
                assert!(
                    e.contains(bounds.flag) && e.contains(&bounds.parse(v).unwrap_err()),
                    "{} {v}: {e}",
                    bounds.flag
                );
            }
            for v in *good {
                Args::try_parse_from(["kube-uproxy".into(), format!("{}={v}", bounds.flag)])
                    .unwrap_or_else(|e| panic!("{} {v}: {e}", bounds.flag));
                assert_eq!(bounds.parse(v), Ok(humantime::parse_duration(v).unwrap()));
            }
        }
        for (bounds, bad, good) in [
            (
                UDP_MAX_FLOWS,
                &["0", "-1", "1048577", "many"][..],
                &["1", "1048576"][..],
            ),
            (
                MAX_CONNECTIONS,
                &["-1", "16777217"],
                &["0", "1", "16777216"],
            ),
            (SPLICE_PIPES_MAX, &["0", "-1", "4097", "x"], &["1", "4096"]),
            (DATA_PATH_THREADS, &["-1", "1025", "x"], &["0", "1", "1024"]),
            (HTTP_THREADS, &["-1", "1025", "x"], &["0", "1", "1024"]),
            (
                CONNTRACK_MAX_PER_CORE,
                &["-1", "2147483648", "x"],
                &["0", "32768", "2147483647"],
            ),
            (CONNTRACK_MIN, &["-1", "2147483648"], &["0", "131072"]),
            (
                UDP_MAX_FLOWS_TOTAL,
                &["0", "-1", "16777217", "all"],
                &["1", "16777216"],
            ),
        ] {
            for v in bad {
                let e =
                    Args::try_parse_from(["kube-uproxy".into(), format!("{}={v}", bounds.flag)])
                        .expect_err(&format!("{} {v} accepted", bounds.flag))
                        .to_string();
                assert!(
                    e.contains(bounds.flag) && e.contains(&bounds.parse(v).unwrap_err()),
                    "{} {v}: {e}",
                    bounds.flag
                );
            }
            for v in good {
                Args::try_parse_from(["kube-uproxy".into(), format!("{}={v}", bounds.flag)])
                    .unwrap_or_else(|e| panic!("{} {v}: {e}", bounds.flag));
            }
        }
        // What the flags hold.
        let a = Args::try_parse_from([
            "kube-uproxy",
            "--udp-max-flows",
            "1",
            "--tcp-user-timeout",
            "0s",
            "--manifests-rescan-interval",
            "100ms",
        ])
        .unwrap();
        assert_eq!(a.udp_max_flows, 1);
        assert_eq!(
            Args::try_parse_from(["kube-uproxy", "--splice-pipes-max", "3"])
                .unwrap()
                .splice_pipes_max(),
            3
        );
        assert_eq!(
            a.udp_max_flows_total, None,
            "default: a share of the fd limit"
        );
        assert_eq!(a.tcp_user_timeout, Some(Duration::ZERO));
        assert_eq!(a.manifests_rescan_interval, Duration::from_millis(100));
    }

    #[test]
    fn the_splice_pipe_cap_defaults_to_half_the_pipe_quota() {
        // The kernel's default quota: 16384 pages, 64 pipes of 1 MiB.
        assert_eq!(default_splice_pipes_max(Some(16384)), 32);
        assert_eq!(default_splice_pipes_max(Some(1 << 20)), 2048);
        assert_eq!(default_splice_pipes_max(Some(100)), 1);
        assert_eq!(default_splice_pipes_max(Some(u64::MAX)), 4096);
        assert_eq!(default_splice_pipes_max(Some(0)), 64);
        assert_eq!(default_splice_pipes_max(None), 32);
        let dir = std::env::temp_dir().join(format!("ku-pipes-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("fs")).unwrap();
        std::fs::write(dir.join("fs/pipe-user-pages-soft"), "8192\n").unwrap();
        let a =
            Args::try_parse_from(["kube-uproxy", "--proc-sys-dir", dir.to_str().unwrap()]).unwrap();
        assert_eq!(a.splice_pipes_max(), 16);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parses_kube_proxy_style_flags() {
        let a = Args::try_parse_from([
            "kube-uproxy",
            "--manifests",
            "x.yaml",
            "--proxy-port-range",
            "20000-20100",
            "--lb-algorithm",
            "least-connections",
            "-vv",
        ])
        .unwrap();
        assert_eq!(
            a.proxy_port_range,
            Some(PortRange {
                begin: 20000,
                end: 20100
            })
        );
        assert_eq!(a.lb_algorithm, Algorithm::LeastConnections);
        assert_eq!(a.verbosity, 6, "-vv: trace, as before");
        assert_eq!(a.tcp_relay, RelayMode::Splice);
        assert_eq!(a.proxy_address(), Ipv4Addr::new(169, 254, 42, 1));
        assert_eq!(a.sync_period, Duration::from_secs(30));
        assert_eq!(a.shutdown_grace, Duration::from_secs(30));
        assert_eq!(a.udp_timeout, Duration::from_secs(30));
        assert_eq!(a.upstream_mark, 0x2000);
        assert_eq!(a.preserve_client_ip_mark, 0x1000);
        assert_eq!(a.preserve_client_ip_table, 4242);
        assert!(a.check_marks().is_ok());
        assert!(
            Args {
                preserve_client_ip_mark: 0x3000,
                ..a.clone()
            }
            .check_marks()
            .is_err()
        );
        assert_eq!(parse_route_table("100"), Ok(100));
        assert!(parse_route_table("254").is_err());
        assert!(parse_route_table("x").is_err());
        assert_eq!(parse_mark("0x4000"), Ok(0x4000));
        assert_eq!(parse_mark("8192"), Ok(0x2000));
        assert!(parse_mark("0").is_err());
        assert!(parse_mark("0x").is_err());
        assert!(parse_mark("mark").is_err());
        assert_eq!(a.nodeport_addresses, None);
        // The errors say what kube-proxy accepts.
        let mixed = parse_nodeport_addresses("primary, 10.0.0.0/8").unwrap_err();
        assert!(mixed.contains("both `primary` and CIDRs"), "{mixed}");
        let all = parse_nodeport_addresses("all").unwrap_err();
        assert!(
            all.contains("\"all\" is neither a CIDR nor `primary`"),
            "{all}"
        );
        assert_eq!(
            parse_nodeport_addresses(" primary "),
            Ok(NodePortAddresses::Primary)
        );
        let b = Args::try_parse_from([
            "kube-uproxy",
            "--nodeport-addresses",
            "10.0.0.1/8, 192.168.1.0/24",
        ])
        .unwrap();
        assert_eq!(
            b.nodeport_addresses,
            Some(NodePortAddresses::Cidrs(vec![
                "10.0.0.0/8".parse().unwrap(),
                "192.168.1.0/24".parse().unwrap()
            ]))
        );
        let c = Args::try_parse_from(["kube-uproxy", "--nodeport-addresses", "primary"]).unwrap();
        assert_eq!(c.nodeport_addresses, Some(NodePortAddresses::Primary));
        assert_eq!(a.healthz_address(), Some("0.0.0.0:10256".parse().unwrap()));
        assert_eq!(
            a.metrics_address(),
            Some("127.0.0.1:10249".parse().unwrap())
        );
        assert!(!a.metrics_per_endpoint);
        assert_eq!(a.log_format, LogFormat::Text);
        assert!(a.command.is_none());
        // Dead peers are found by default; idle flows are kept.
        let k = a.tcp_options().keepalive.expect("keepalive on by default");
        assert_eq!(
            (k.time, k.interval, k.count),
            (Duration::from_secs(60), Duration::from_secs(10), 3)
        );
        assert_eq!(a.tcp_options().user_timeout, Some(Duration::from_secs(90)));
        assert_eq!(a.relay().idle_timeout, None);
        // kube-proxy's conntrack defaults.
        assert_eq!(
            a.conntrack(),
            ConntrackSettings {
                max_per_core: 32768,
                min: 131072,
                tcp_established: Duration::from_secs(86400),
                tcp_close_wait: Duration::from_secs(3600),
            }
        );
    }

    #[test]
    fn serving_addresses_take_a_default_port_or_turn_off() {
        let a = Args::try_parse_from([
            "kube-uproxy",
            "--healthz-bind-address",
            "127.0.0.1",
            "--metrics-bind-address",
            "",
        ])
        .unwrap();
        assert_eq!(
            a.healthz_address(),
            Some("127.0.0.1:10256".parse().unwrap())
        );
        assert_eq!(a.metrics_address(), None);
        let a = Args::try_parse_from(["kube-uproxy", "--healthz-bind-address", "[::1]:9"]).unwrap();
        assert_eq!(a.healthz_address(), Some("[::1]:9".parse().unwrap()));
        assert!(
            Args::try_parse_from(["kube-uproxy", "--metrics-bind-address", "localhost:1"]).is_err()
        );
    }

    #[test]
    fn subcommands_take_the_global_addresses() {
        let a = Args::try_parse_from([
            "kube-uproxy",
            "status",
            "--metrics-bind-address",
            "127.0.0.1:9999",
        ])
        .unwrap();
        assert!(matches!(a.command, Some(Command::Status { json: false })));
        assert_eq!(a.metrics_address(), Some("127.0.0.1:9999".parse().unwrap()));
        let a = Args::try_parse_from(["kube-uproxy", "probe", "--livez"]).unwrap();
        assert!(matches!(a.command, Some(Command::Probe { livez: true })));
    }

    #[test]
    fn timeouts_can_be_tuned_or_turned_off() {
        let a = Args::try_parse_from([
            "kube-uproxy",
            "--tcp-keepalive-time",
            "0",
            "--tcp-idle-timeout",
            "5m",
        ])
        .unwrap();
        assert_eq!(a.tcp_options(), TcpOptions::default());
        assert_eq!(a.relay().idle_timeout, Some(Duration::from_secs(300)));
        let a = Args::try_parse_from([
            "kube-uproxy",
            "--tcp-keepalive-time",
            "2s",
            "--tcp-keepalive-interval",
            "1s",
            "--tcp-keepalive-count",
            "2",
        ])
        .unwrap();
        assert_eq!(a.tcp_options().user_timeout, Some(Duration::from_secs(4)));
        let a = Args::try_parse_from(["kube-uproxy", "--tcp-user-timeout", "0"]).unwrap();
        assert_eq!(a.tcp_options().user_timeout, None);
    }

    #[test]
    fn rejects_bad_values_and_conflicts() {
        for bad in [
            vec!["kube-uproxy", "--proxy-port-range", "9-1"],
            vec!["kube-uproxy", "--lb-algorithm", "random"],
            vec!["kube-uproxy", "--manifests", "a", "--kubeconfig", "b"],
            vec!["kube-uproxy", "--proxy-address", "0.0.0.0"],
            vec!["kube-uproxy", "--proxy-address", "127.0.0.1"],
            vec!["kube-uproxy", "--bind-address", "127.0.0.1"],
            vec![
                "kube-uproxy",
                "--bind-address",
                "10.0.0.1",
                "--proxy-address",
                "10.0.0.2",
            ],
            vec!["kube-uproxy", "--v", "loud"],
            vec!["kube-uproxy", "--sync-period", "soon"],
            vec!["kube-uproxy", "--nodeport-addresses", "10.0.0.0/33"],
            vec!["kube-uproxy", "--nodeport-addresses", ""],
            // kube-proxy refuses `primary` beside CIDRs, and has no other
            // keyword.
            vec!["kube-uproxy", "--nodeport-addresses", "primary,10.0.0.0/8"],
            vec!["kube-uproxy", "--nodeport-addresses", "10.0.0.0/8,primary"],
            vec!["kube-uproxy", "--nodeport-addresses", "localhost"],
            vec!["kube-uproxy", "--nodeport-addresses", "all"],
            vec!["kube-uproxy", "--udp-max-flows", "-1"],
            vec!["kube-uproxy", "--tcp-keepalive-time", "500ms"],
            vec!["kube-uproxy", "--tcp-keepalive-interval", "0"],
            vec!["kube-uproxy", "--tcp-keepalive-count", "0"],
            vec!["kube-uproxy", "--tcp-keepalive-time", "10h"],
        ] {
            assert!(
                Args::try_parse_from(bad.clone()).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn bind_address_is_kube_proxys_name_and_its_unspecified_value_means_default() {
        for unset in ["0.0.0.0", "::", ""] {
            let a = Args::try_parse_from(["kube-uproxy", "--bind-address", unset])
                .unwrap_or_else(|e| panic!("--bind-address {unset:?}: {e}"));
            assert_eq!(
                a.proxy_address(),
                Ipv4Addr::new(169, 254, 42, 1),
                "{unset:?}"
            );
        }
        let a = Args::try_parse_from(["kube-uproxy", "--bind-address", "169.254.7.7"]).unwrap();
        assert_eq!(a.proxy_address(), Ipv4Addr::new(169, 254, 7, 7));
        let a = Args::try_parse_from(["kube-uproxy", "--proxy-address", "169.254.7.8"]).unwrap();
        assert_eq!(a.proxy_address(), Ipv4Addr::new(169, 254, 7, 8));
        // The old name of the IPv6 one is an alias.
        let a = Args::try_parse_from(["kube-uproxy", "--bind-address-ipv6", "fd00:7::1"]).unwrap();
        assert_eq!(a.proxy_address_v6.to_string(), "fd00:7::1");
    }

    #[test]
    fn v_is_kube_proxys_verbosity_level() {
        for (argv, level) in [
            (&["kube-uproxy"][..], 0),
            (&["kube-uproxy", "--v=2"], 2),
            (&["kube-uproxy", "--v", "4"], 4),
            (&["kube-uproxy", "-v", "5"], 5),
            (&["kube-uproxy", "-v=6"], 6),
            (&["kube-uproxy", "-v"], 4),
            (&["kube-uproxy", "-vv"], 6),
            (&["kube-uproxy", "-v", "--proxy-port-range", "1-2"], 4),
        ] {
            let a = Args::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            assert_eq!(a.verbosity, level, "{argv:?}");
        }
        assert_eq!(
            [0, 2, 3, 4, 5, 6, 10].map(log_level),
            ["info", "info", "info", "debug", "debug", "trace", "trace"]
        );
    }

    #[test]
    fn local_traffic_detection_follows_kube_proxys_flags() {
        let detector = |args: &[&str]| {
            let mut v = vec!["kube-uproxy"];
            v.extend_from_slice(args);
            Args::try_parse_from(v).map(|a| a.local_traffic())
        };
        // No flag: no detection (kube-proxy's ClusterCIDR without a CIDR).
        assert_eq!(detector(&[]).unwrap(), Ok(None));
        // A cluster CIDR alone: ClusterCIDR, kube-proxy's default mode.
        assert_eq!(
            detector(&["--cluster-cidr", "10.244.0.0/16,fd00:10:244::/56"]).unwrap(),
            Ok(Some(LocalTraffic::Sources(vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:10:244::/56".parse().unwrap()
            ])))
        );
        assert_eq!(
            detector(&[
                "--detect-local-mode",
                "BridgeInterface",
                "--pod-bridge-interface",
                "cni0"
            ])
            .unwrap(),
            Ok(Some(LocalTraffic::Bridge("cni0".into())))
        );
        assert_eq!(
            detector(&[
                "--detect-local-mode",
                "InterfaceNamePrefix",
                "--pod-interface-name-prefix",
                "veth",
                "--cluster-cidr",
                "10.244.0.0/16"
            ])
            .unwrap(),
            Ok(Some(LocalTraffic::InterfacePrefix("veth".into())))
        );
        // NodeCIDR: the ranges are the Node object's, none known at start
        // (--cluster-cidr plays no part).
        assert_eq!(
            detector(&[
                "--detect-local-mode",
                "NodeCIDR",
                "--cluster-cidr",
                "10.0.0.0/8"
            ])
            .unwrap(),
            Ok(Some(LocalTraffic::NodePodCidrs(Vec::new())))
        );
        // A mode without what it needs is refused at start.
        for args in [
            &["--detect-local-mode", "ClusterCIDR"][..],
            &["--detect-local-mode", "BridgeInterface"],
            &["--detect-local-mode", "InterfaceNamePrefix"],
        ] {
            let e = detector(args).unwrap().unwrap_err();
            assert!(e.contains("--"), "{args:?}: {e}");
        }
        // Bad values: two ranges of one family, not a CIDR, kube-proxy's
        // mode names only, an interface name nft would misread.
        for args in [
            &["--cluster-cidr", "10.0.0.0/8,10.1.0.0/16"][..],
            &["--cluster-cidr", "pods"],
            &["--cluster-cidr", ""],
            &["--detect-local-mode", "clustercidr"],
            &["--pod-interface-name-prefix", "veth*"],
            &["--pod-bridge-interface", "a-name-of-16-chr"],
        ] {
            assert!(detector(args).is_err(), "{args:?} accepted");
        }
    }

    #[test]
    fn the_ipv6_proxy_address_must_be_one_dnat_can_target() {
        let a = Args::try_parse_from(["kube-uproxy"]).unwrap();
        assert_eq!(a.proxy_address_v6.to_string(), DEFAULT_BIND_ADDRESS_V6);
        let b = Args::try_parse_from(["kube-uproxy", "--bind-address-ipv6", "fd00:1::5"]).unwrap();
        assert_eq!(b.proxy_address_v6, "fd00:1::5".parse::<Ipv6Addr>().unwrap());
        for bad in [
            "::",
            "::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "ff02::1",
            "10.0.0.1",
        ] {
            assert!(
                Args::try_parse_from(["kube-uproxy", "--bind-address-ipv6", bad]).is_err(),
                "{bad} accepted"
            );
        }
    }
}
