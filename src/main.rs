//! `kube-uproxy`: wires the flags, the source, the reconciler and the
//! shutdown path together. The logic lives in the library.

use std::collections::HashMap;
use std::net::IpAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use kube_uproxy::admin::status;
use kube_uproxy::admin::{self, AdminState};
use kube_uproxy::config::file::{self as config_file, ArgsError};
use kube_uproxy::config::{Args, Command, LogFormat, NodePortAddresses};
use kube_uproxy::health::{ProxyHealth, ServiceHealthServers};
use kube_uproxy::metrics::Metrics;
use kube_uproxy::model::IpFamily;
use kube_uproxy::model::NodeTopology;
use kube_uproxy::proxy::DataPathConfig;
use kube_uproxy::proxy::HttpConfig;
use kube_uproxy::proxy::connections::Connections;
use kube_uproxy::proxy::listeners::SocketListeners;
use kube_uproxy::proxy::ports::{self, ProxyPortAllocator};
use kube_uproxy::proxy::threads::DataPathThreads;
use kube_uproxy::proxy::udp::UdpConfig;
use kube_uproxy::reconcile::{Reconciler, ReconcilerConfig, Telemetry};
use kube_uproxy::rules::render::LocalTraffic;
use kube_uproxy::rules::{self, Instance, Key, Layout, Nft, NftCommand, RuleTable};
use kube_uproxy::serve;
use kube_uproxy::source;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Logs to stderr at `--v`'s level, unless RUST_LOG says otherwise: it
/// names levels per module, which a kube-proxy verbosity cannot.
fn init_logging(verbosity: u8, format: LogFormat) {
    let default = kube_uproxy::config::log_level(verbosity);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().init(),
    }
}

/// Raises the open-file soft limit to the hard limit and says what it got:
/// every proxied connection holds two sockets (and two more fds per
/// direction in a bulk phase).
///
/// Returns the soft limit now, if known.
fn raise_fd_limit(max_connections: usize) -> Option<u64> {
    match kube_uproxy::proxy::limit::raise_open_file_limit() {
        Ok(l) => {
            info!(
                soft = l.now,
                was = l.was,
                hard = l.hard,
                "open-file limit {} (was {}; hard limit {}): room for about {} idle connections",
                l.now,
                l.was,
                l.hard,
                l.now.saturating_sub(100) / 2
            );
            if max_connections > 0 && (max_connections as u64).saturating_mul(2) > l.now {
                warn!(
                    max_connections,
                    open_file_limit = l.now,
                    "--max-connections is above what the open-file limit allows (2 fds per connection)"
                );
            }
            Some(l.now)
        }
        Err(e) => {
            warn!(error = %e, "cannot raise the open-file limit");
            None
        }
    }
}

/// jemalloc, configured in [`kube_uproxy::memory`].
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let args = match config_file::parse_args(std::env::args_os()) {
        Ok(a) => a,
        // --help, --version and command-line errors: clap prints and exits.
        Err(ArgsError::Clap(e)) => e.exit(),
        Err(e) => {
            eprintln!("kube-uproxy: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(args.verbosity, args.log_format);
    if !args.ignored_config_fields.is_empty() {
        // Once, at start: what an operator's kube-proxy file asks that
        // this proxy does not do, and why.
        info!(
            "config file: kube-proxy fields without effect here: {}",
            args.ignored_config_fields.join("; ")
        );
    }
    match kube_uproxy::memory::allocator_state() {
        Some(a) if a.background_thread => tracing::debug!(
            narenas = a.narenas,
            config = ?kube_uproxy::memory::MALLOC_CONF,
            "allocator: jemalloc"
        ),
        // The configuration string was not linked in: memory freed after a
        // burst stays resident longer (10 s), nothing worse.
        Some(a) => warn!(
            narenas = a.narenas,
            "allocator: jemalloc without its configuration"
        ),
        None if cfg!(feature = "jemalloc") => warn!("cannot read the allocator's settings"),
        None => tracing::debug!("allocator: the system's malloc"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.command.clone() {
        Some(Command::Status { json }) => runtime.block_on(status_command(&args, json)),
        Some(Command::Probe { livez }) => runtime.block_on(probe_command(&args, livez)),
        None => runtime.block_on(run(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `kube-uproxy status`: the running proxy's Service ports as a table.
async fn status_command(args: &Args, json: bool) -> anyhow::Result<()> {
    let addr = args
        .metrics_address()
        .context("--metrics-bind-address is empty: the proxy serves no /debug/services")?;
    let (report, raw) = status::fetch_report(status::connect_address(addr)).await?;
    if json {
        println!("{raw}");
    } else {
        print!("{}", status::render_table(&report));
    }
    Ok(())
}

/// `kube-uproxy probe`: exit 0 when the running proxy is healthy.
async fn probe_command(args: &Args, livez: bool) -> anyhow::Result<()> {
    let path = if livez { "/livez" } else { "/healthz" };
    let r = match (&args.healthz_socket, args.healthz_address()) {
        (Some(socket), _) => status::get_unix(socket, path).await?,
        (None, Some(addr)) => status::get_tcp(status::connect_address(addr), path).await?,
        (None, None) => anyhow::bail!("neither --healthz-socket nor --healthz-bind-address is set"),
    };
    println!("{}", r.body.trim_end());
    anyhow::ensure!(r.status == 200, "{path} answered {}", r.status);
    Ok(())
}

/// `--cleanup`: everything the proxy installed goes.
///
/// While the instance that wrote the rules still runs (its marker is held),
/// only its rules go: they are replaced by a table without chains that
/// names that instance as released ([`release`]). It stands down, keeps
/// serving the connections it holds, and removes the rest itself when it
/// stops. That is the way back to kube-proxy without a gap: kube-uproxy's
/// nat chains run first (docs/rules.md), so kube-proxy's rules serve new
/// connections only once kube-uproxy's are gone, and the listeners must
/// still be there for the connections translated just before.
async fn cleanup(args: &Args) -> anyhow::Result<()> {
    let (proc_sys, address_v6) = (args.proc_sys_dir.as_path(), args.proxy_address_v6);
    let mut nft = NftCommand;
    let table = match nft.read(IpFamily::V4).await {
        Ok(t) => t,
        Err(e) => {
            warn!(error = %e, "cannot read the table before removing it");
            None
        }
    };
    let note = table.as_ref().and_then(|t| t.note.clone());
    let writer = table.as_ref().and_then(|t| {
        t.instance
            .map(|id| rules::Writer::new(id, t.note.as_deref()))
    });
    if let Some(writer) = writer
        && writer.marker.is_some()
        && writer.alive()
    {
        return release(&mut nft, &writer, note.as_deref().unwrap_or_default()).await;
    }
    if let Some(released) = note
        .as_deref()
        .and_then(|n| rules::alive::noted(n, rules::render::RELEASED_KEY))
    {
        let draining = rules::Writer {
            id: 0,
            marker: Some(released.clone()),
        };
        if draining.alive() {
            info!(
                instance = %released,
                "the released instance still runs (its connections drain); it removes its proxy address and restores the sysctl when it stops"
            );
            return Ok(());
        }
    }
    nft.apply(&rules::render::delete_table(IpFamily::V4))
        .await
        .context("removing the kube-uproxy nftables table")?;
    info!("nftables table removed");
    match nft.apply(&rules::render::delete_table(IpFamily::V6)).await {
        Ok(()) => info!("ip6 nftables table removed"),
        // A kernel without IPv6 has no ip6 table to remove.
        Err(e) if rules::host::ipv6_disabled().is_some() => {
            info!(error = %e, "no ip6 table removed (IPv6 is disabled)")
        }
        Err(e) => return Err(e).context("removing the kube-uproxy ip6 nftables table"),
    }
    rules::host::cleanup(note.as_deref(), address_v6, proc_sys)
        .context("removing the proxy address")?;
    rules::host::cleanup_preserve_route(
        args.preserve_client_ip_mark,
        args.upstream_mark,
        args.preserve_client_ip_table,
    )
    .context("removing the policy route of preserve-client-ip")?;
    Ok(())
}

/// `--cleanup` while `writer` runs: its tables are replaced by ones without
/// chains whose note keeps the sysctl's original value and names `writer`
/// as released (`released=<its marker>`, no `alive=`: a writer that cannot
/// be checked is taken to run, so `writer` never takes the rules back).
async fn release(nft: &mut NftCommand, writer: &rules::Writer, note: &str) -> anyhow::Result<()> {
    let marker = writer.marker.clone().unwrap_or_default();
    let mut kept: Vec<&str> = note
        .split(';')
        .map(str::trim)
        .filter(|kv| !kv.is_empty() && !kv.starts_with(rules::alive::NOTE_KEY))
        .collect();
    let released = format!("{}={marker}", rules::render::RELEASED_KEY);
    kept.push(&released);
    let families: &[IpFamily] = if rules::host::ipv6_disabled().is_some() {
        &[IpFamily::V4]
    } else {
        &[IpFamily::V4, IpFamily::V6]
    };
    let instance = Instance {
        id: instance_id(),
        note: kept.join("; "),
    };
    nft.apply(&rules::render::released_table(families, &instance))
        .await
        .context("removing the running instance's rules")?;
    info!(
        writer = format_args!("{:08x}", writer.id),
        "kube-uproxy instance {:08x} runs: its rules are removed, so new connections take the node's other Service rules (kube-proxy's, on the way back); it keeps serving the connections it holds. Stop it: once they have drained it removes its proxy address and restores the sysctl",
        writer.id
    );
    Ok(())
}

/// Removes kube-proxy's rules once this instance's own are in the kernel
/// (`--cleanup-kube-proxy`). Before that, kube-proxy's rules are what
/// serves the node; after it, this instance's nat chains run first, so the
/// removal changes nothing for new connections.
async fn cleanup_kube_proxy(health: Arc<ProxyHealth>, cancel: CancellationToken) {
    while !health.rules_installed() {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
        }
    }
    let report = match tokio::task::spawn_blocking(rules::kube_proxy::cleanup).await {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "removing kube-proxy's rules failed");
            return;
        }
    };
    if report.nothing_found() {
        info!("--cleanup-kube-proxy: no kube-proxy rules on this node, nothing to remove");
    }
    for what in &report.removed {
        info!("--cleanup-kube-proxy: removed kube-proxy's {what}");
    }
    for note in &report.notes {
        info!("--cleanup-kube-proxy: {note}");
    }
    for e in &report.errors {
        warn!(error = %e, "--cleanup-kube-proxy: a step failed; the others ran");
    }
}

/// Whether the table names instance `id` as released by `--cleanup`.
async fn released_by_cleanup(id: u32) -> bool {
    let mut nft = NftCommand;
    match nft.read(IpFamily::V4).await {
        Ok(Some(t)) => {
            t.note
                .as_deref()
                .and_then(|n| rules::alive::noted(n, rules::render::RELEASED_KEY))
                == Some(rules::alive::marker_name(id))
        }
        _ => false,
    }
}

/// A random id for this process's writes to the table.
fn instance_id() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::process::id()) as u32
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.cleanup {
        return cleanup(&args).await;
    }
    let local_traffic = args
        .local_traffic()
        .map_err(|e| anyhow::anyhow!("local-traffic detection: {e}"))?;
    match &local_traffic {
        Some(LocalTraffic::NodePodCidrs(_)) => info!(
            "--detect-local-mode NodeCIDR: traffic from the pod ranges of this node's Node object (spec.podCIDRs) to externalTrafficPolicy: Local Services' external addresses and node ports goes to their cluster-wide endpoints; no rule is written until the Node has them"
        ),
        Some(d) => {
            info!(detector = ?d, "traffic from this node's pods to externalTrafficPolicy: Local Services' external addresses and node ports goes to their cluster-wide endpoints")
        }
        None => info!(
            "no local-traffic detection (--detect-local-mode, --cluster-cidr): pods are external clients of externalTrafficPolicy: Local Services"
        ),
    }
    args.check_marks().map_err(anyhow::Error::msg)?;
    let open_file_limit = raise_fd_limit(args.max_connections);
    let udp_max_flows_total =
        kube_uproxy::proxy::limit::udp_flow_budget(args.udp_max_flows_total, open_file_limit);
    info!(
        udp_max_flows_total,
        "UDP flows of all Service ports together: at most {udp_max_flows_total}"
    );
    let missing = rules::host::missing_capabilities();
    if !missing.is_empty() {
        warn!(
            ?missing,
            "capabilities missing: nft and `ip` will be refused"
        );
    }
    let node = NodeTopology {
        name: args.node_name(),
        zone: args.node_zone.clone().filter(|z| !z.is_empty()),
    };
    if node.name.is_empty() {
        warn!("no node name (--hostname-override, or the host name): no endpoint counts as local");
    }
    info!(node = %node.name, zone = ?node.zone, "this node");

    // Health and metrics first: /healthz says 503 while the rest starts.
    let metrics = Arc::new(Metrics::new(args.metrics_per_endpoint));
    let health = Arc::new(ProxyHealth::new(args.sync_period));
    let (report_tx, report_rx) = tokio::sync::mpsc::channel(8);
    let admin_state = AdminState {
        health: Arc::clone(&health),
        metrics: Arc::clone(&metrics),
        reports: report_tx,
    };
    // Stopped last: health and metrics answer while connections drain.
    let admin_stop = CancellationToken::new();
    let _admin_stop = admin_stop.clone().drop_guard();
    if let Some(addr) = args.healthz_address() {
        serve::spawn_tcp(
            "healthz",
            addr,
            admin::healthz_router(admin_state.clone()),
            admin_stop.clone(),
        );
    }
    if let Some(path) = &args.healthz_socket {
        serve::spawn_unix(
            "healthz",
            path,
            admin::healthz_router(admin_state.clone()),
            admin_stop.clone(),
        )?;
    }
    if let Some(addr) = args.metrics_address() {
        serve::spawn_tcp(
            "metrics",
            addr,
            admin::metrics_router(admin_state.clone()),
            admin_stop.clone(),
        );
    }

    // First signal: stop accepting and drain. Second: cut what is left now.
    let cancel = CancellationToken::new();
    let hurry = CancellationToken::new();
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    {
        let (cancel, hurry) = (cancel.clone(), hurry.clone());
        tokio::spawn(async move {
            for token in [cancel, hurry] {
                tokio::select! {
                    _ = sigterm.recv() => info!("SIGTERM received"),
                    _ = sigint.recv() => info!("SIGINT received"),
                }
                token.cancel();
            }
        });
    }

    if args.cleanup_kube_proxy {
        tokio::spawn(cleanup_kube_proxy(Arc::clone(&health), cancel.clone()));
    }

    // What an earlier instance left: its proxy ports go back to the same
    // Service ports, so that unchanged Services see no rule change.
    // IPv6 Services are served when the node has IPv6; otherwise IPv4
    // goes on alone and each IPv6 Service is logged once as not served.
    let bind_v6 = match rules::host::ipv6_disabled() {
        Some(why) => {
            warn!(reason = %why, "IPv6 is disabled on this node: IPv6 Services are not served");
            None
        }
        None => Some(args.proxy_address_v6),
    };
    let mut nft = NftCommand;
    let mut earlier = HashMap::new();
    let families: &[IpFamily] = if bind_v6.is_some() {
        &[IpFamily::V4, IpFamily::V6]
    } else {
        &[IpFamily::V4]
    };
    for family in families {
        match nft.read(*family).await {
            Ok(Some(t)) => {
                earlier.insert(*family, t);
            }
            Ok(None) => {}
            Err(e) => {
                warn!(error = %e, %family, "cannot read an earlier instance's table; starting afresh")
            }
        }
    }
    let note = rules::host::prepare(
        args.proxy_address(),
        bind_v6,
        earlier
            .get(&IpFamily::V4)
            .and_then(|t: &rules::KernelTable| t.note.as_deref()),
        &args.proc_sys_dir,
    )
    .context("preparing the node")?;
    rules::conntrack::apply_and_log(&args.conntrack(), &args.proc_sys_dir);
    if args.preserve_mark_in_use() != 0 {
        rules::host::prepare_preserve_route(
            args.preserve_client_ip_mark,
            args.upstream_mark,
            args.preserve_client_ip_table,
            bind_v6.is_some(),
        )
        .context("installing the policy route of preserve-client-ip")?;
    } else if let Err(e) = rules::host::cleanup_preserve_route(
        args.preserve_client_ip_mark,
        args.upstream_mark,
        args.preserve_client_ip_table,
    ) {
        // --preserve-client-ip off: an earlier instance's route goes.
        // Not fatal: nothing here uses it, and --cleanup removes it too.
        warn!(error = %e, "cannot remove an earlier policy route of preserve-client-ip");
    }
    let proxy_address_of = |family: IpFamily| match family {
        IpFamily::V4 => Some(IpAddr::V4(args.proxy_address())),
        IpFamily::V6 => bind_v6.map(IpAddr::V6),
    };
    let adopted: HashMap<Key, u16> = earlier
        .iter()
        .filter(|(family, t)| {
            t.proxy_address.is_some() && t.proxy_address == proxy_address_of(**family)
        })
        .flat_map(|(_, t)| t.redirects())
        .collect();
    let port_range = match args.proxy_port_range {
        Some(range) => Some(range),
        None => match ports::ephemeral_port_range(&args.proc_sys_dir) {
            Ok(range) => {
                info!(%range, "proxy ports from the kernel's ephemeral range (net.ipv4.ip_local_port_range, for both families); --proxy-port-range sets another");
                Some(range)
            }
            Err(e) => {
                warn!(error = %e, "cannot read the ephemeral port range: the kernel picks each proxy port (slow with thousands of Service ports)");
                None
            }
        },
    };
    let mut ports = ProxyPortAllocator::new(IpAddr::V4(args.proxy_address()), port_range);
    let mut ports_v6 = bind_v6.map(|a| ProxyPortAllocator::new(IpAddr::V6(a), port_range));
    for (key, port) in &adopted {
        match (key.family(), &mut ports_v6) {
            (IpFamily::V4, _) => ports.reserve(key.protocol(), *port),
            (IpFamily::V6, Some(p)) => p.reserve(key.protocol(), *port),
            (IpFamily::V6, None) => {}
        }
    }
    if !adopted.is_empty() {
        info!(
            destinations = adopted.len(),
            "found an earlier instance's table; taking its proxy ports back"
        );
    }

    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let source_task: tokio::task::JoinHandle<anyhow::Result<()>> = match &args.manifests {
        Some(path) => {
            // Fail at once on a path that cannot be read; the source parses it.
            std::fs::metadata(path)
                .with_context(|| format!("reading --manifests {}", path.display()))?;
            let (path, interval, cancel) =
                (path.clone(), args.manifests_rescan_interval, cancel.clone());
            tokio::spawn(async move {
                source::manifests::run(path, interval, tx, cancel)
                    .await
                    .context("reading --manifests")
            })
        }
        None => {
            let client = source::kube::client(args.kubeconfig.clone(), metrics.api_client())
                .await
                .context("connecting to the Kubernetes API")?;
            let cancel = cancel.clone();
            let node_name = node.name.clone();
            tokio::spawn(async move {
                source::kube::run(client, &node_name, tx, cancel).await;
                Ok(())
            })
        }
    };

    // Bounds the pipe quota the proxy takes from root's shared
    // fs.pipe-user-pages-soft (docs/operations.md).
    kube_uproxy::proxy::relay::SPLICE_PIPES.set_max(args.splice_pipes_max());
    let connections =
        Connections::with_limit((args.max_connections > 0).then_some(args.max_connections));
    // Arming a connect timeout must not wake the I/O driver (issue 21).
    tokio::spawn(kube_uproxy::proxy::timer_floor());
    // Request mode's threads (`--http-threads`, default one per CPU); the
    // data-path threads serve their own connections instead.
    let http_threads = match (args.data_path_threads, args.http_threads) {
        (0, n) => {
            let n = n.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
            });
            (n > 0)
                .then(|| DataPathThreads::start_named(n, "http"))
                .transpose()
                .context("starting the HTTP threads")?
                .map(Arc::new)
        }
        _ => None,
    };
    let mut listeners = SocketListeners::new(
        ports,
        Arc::new(DataPathConfig {
            relay: args.relay(),
            tcp: args.tcp_options(),
            udp: UdpConfig {
                timeout: args.udp_timeout,
                max_flows: args.udp_max_flows.max(1),
                max_flows_total: udp_max_flows_total,
                mark: args.upstream_mark,
                preserve_client_ip_mark: args.preserve_mark_in_use(),
                flush_conntrack: true,
            },
            upstream_mark: args.upstream_mark,
            preserve_client_ip_mark: args.preserve_mark_in_use(),
            http: HttpConfig {
                detect_timeout: args.http_detect_timeout,
                upstream_idle_timeout: args.http_upstream_idle_timeout,
                ..HttpConfig::default()
            },
            http_threads,
            ..DataPathConfig::default()
        }),
        connections.clone(),
    )
    .with_metrics(metrics.service_ports());
    if let Some(p) = ports_v6 {
        listeners = listeners.with_ipv6(p);
    }
    let data_path_threads = args.data_path_threads;
    if data_path_threads > 0 {
        let threads =
            DataPathThreads::start(data_path_threads).context("starting the data-path threads")?;
        listeners = listeners.with_data_path_threads(Arc::new(threads));
    }
    let nodeport_addresses = match &args.nodeport_addresses {
        None => None,
        Some(NodePortAddresses::Cidrs(nets)) => Some(nets.clone()),
        Some(NodePortAddresses::Primary) => {
            // kube-proxy reads the Node's primary IPs before it starts;
            // here the Node comes through the source, later. Until then,
            // the interface of the default route stands in for it.
            let primary = rules::host::primary_addresses()
                .context("finding the primary addresses for --nodeport-addresses")?;
            info!(addresses = ?primary, "--nodeport-addresses primary: node ports served on the default route's interface addresses until this node's Node object gives its primary IPs");
            Some(primary.into_iter().map(ipnet::IpNet::from).collect())
        }
    };
    let id = instance_id();
    // Held while this instance writes rules: an older instance that this
    // one supersedes takes the table back once the name is free
    // (rules/alive.rs). Without it, that instance keeps waiting, as before.
    let (marker, note) = match rules::alive::Marker::hold(id) {
        Ok(m) => (
            Some(m),
            format!(
                "{note}; {}={}",
                rules::alive::NOTE_KEY,
                rules::alive::marker_name(id)
            ),
        ),
        Err(e) => {
            warn!(error = %e, "cannot hold this instance's marker socket; an instance this one supersedes will not take the table back if this one dies");
            (None, note)
        }
    };
    let layout = Layout {
        proxy_address: args.proxy_address(),
        proxy_address_v6: bind_v6,
        nodeport_addresses,
        instance: Instance { id, note },
        upstream_mark: args.upstream_mark,
        local_traffic,
        preserve_client_ip_mark: args.preserve_mark_in_use(),
    };
    let config = ReconcilerConfig {
        default_algorithm: args.lb_algorithm,
        sync_period: args.sync_period,
        node,
        request_balancing: args.request_balancing,
        nodeport_primary: matches!(args.nodeport_addresses, Some(NodePortAddresses::Primary)),
    };
    // kube-proxy's rule: health check node ports on the node's addresses
    // within --nodeport-addresses when given (with `primary`, followed by
    // the reconciler once the Node is known).
    let health_check_addresses = rules::host::health_check_addresses(&layout)
        .context("listing the node's addresses for the health check node ports")?;
    if let Some(within) = &health_check_addresses {
        info!(addresses = ?within, "health check node ports served on these addresses");
    }
    let service_health = ServiceHealthServers::new(
        Arc::clone(&health),
        admin_stop.clone(),
        health_check_addresses,
    );
    info!(
        source = if args.manifests.is_some() { "manifests" } else { "kubernetes" },
        algorithm = %args.lb_algorithm,
        relay = ?args.tcp_relay,
        proxy_address = %args.proxy_address(),
        proxy_address_v6 = ?bind_v6,
        "kube-uproxy starting"
    );
    // On a worker thread: the listener tasks it spawns then go to that
    // worker's local queue instead of waking a worker each time.
    let reconciler = tokio::spawn(
        Reconciler::new(config, RuleTable::new(nft, layout), listeners, adopted)
            .with_telemetry(Telemetry {
                metrics,
                health,
                reports: report_rx,
            })
            .with_service_health(service_health)
            .run(rx, cancel.clone()),
    );
    if let Err(e) = reconciler.await {
        error!(error = %e, "the reconciler task failed");
    }
    // No more rule writes from here: an instance this one superseded may
    // take the table back while this one drains.
    drop(marker);
    cancel.cancel();
    let source_result = match source_task.await {
        Ok(r) => r,
        Err(e) => Err(anyhow::anyhow!("the source task failed: {e}")),
    };

    // The listeners are closed; the rules stay, for the next instance.
    let open = connections.open();
    if open > 0 {
        info!(
            open,
            grace_s = args.shutdown_grace.as_secs_f64(),
            "listeners closed; waiting for open connections to finish"
        );
    }
    let drained = connections.drain(args.shutdown_grace, hurry).await;
    if drained.cut > 0 {
        warn!(cut = drained.cut, "connections still open were reset");
    }
    // Released by `--cleanup` while running (the way back): the rest of
    // the cleanup is ours, now that no connection uses the proxy address.
    if released_by_cleanup(id).await {
        info!("released by --cleanup: removing the proxy address and the rest");
        cleanup(&args).await?;
        info!("stopped and cleaned up");
        return source_result;
    }
    info!("stopped; the rules stay in place (`kube-uproxy --cleanup` removes them)");
    source_result
}

#[cfg(test)]
mod tests {
    /// The binary's allocator is jemalloc with the settings of
    /// `kube_uproxy::memory` (its `malloc_conf` symbol was linked in and
    /// read): a background purge thread, two arenas.
    #[cfg(feature = "jemalloc")]
    #[test]
    fn the_allocator_is_jemalloc_with_its_configuration() {
        let a = kube_uproxy::memory::allocator_state().expect("jemalloc answers");
        assert!(a.background_thread, "malloc_conf was not applied: {a:?}");
        assert_eq!(a.narenas, 2, "{a:?}");
    }
}
