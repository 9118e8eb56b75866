//! `kube-uproxy`: wires the flags, the source, the reconciler and the
//! shutdown path together. The logic lives in the library.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use kube_uproxy::config::Args;
use kube_uproxy::proxy::DataPathConfig;
use kube_uproxy::proxy::ports::ProxyPortAllocator;
use kube_uproxy::reconcile::{Reconciler, ReconcilerConfig};
use kube_uproxy::rules::RuleTable;
use kube_uproxy::source;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// Raises the open-file soft limit to the hard limit: every proxied
/// connection holds two sockets (and up to two pipes).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!(error = %e, soft, hard, "cannot raise the open-file limit");
            }
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot read the open-file limit"),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.verbose);
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
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.cleanup {
        RuleTable::delete()
            .await
            .context("removing the kube-uproxy nftables table")?;
        info!("nftables table removed");
        return Ok(());
    }
    raise_fd_limit();

    let cancel = CancellationToken::new();
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = sigterm.recv() => info!("SIGTERM received; shutting down"),
                _ = sigint.recv() => info!("SIGINT received; shutting down"),
            }
            cancel.cancel();
        });
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
            let client = source::kube::client(args.kubeconfig.clone())
                .await
                .context("connecting to the Kubernetes API")?;
            let cancel = cancel.clone();
            tokio::spawn(async move {
                source::kube::run(client, tx, cancel).await;
                Ok(())
            })
        }
    };

    let config = ReconcilerConfig {
        default_algorithm: args.lb_algorithm,
        data_path: Arc::new(DataPathConfig {
            relay: args.tcp_relay,
            ..DataPathConfig::default()
        }),
    };
    let ports = ProxyPortAllocator::new(args.bind_address, args.proxy_port_range);
    info!(
        source = if args.manifests.is_some() { "manifests" } else { "kubernetes" },
        algorithm = %args.lb_algorithm,
        relay = ?args.tcp_relay,
        "kube-uproxy starting"
    );
    // On a worker thread: the listener tasks it spawns then go to that
    // worker's local queue instead of waking a worker each time.
    let reconciler = tokio::spawn(Reconciler::new(config, ports).run(rx, cancel.clone()));
    if let Err(e) = reconciler.await {
        error!(error = %e, "the reconciler task failed");
    }
    cancel.cancel();
    let source_result = match source_task.await {
        Ok(r) => r,
        Err(e) => Err(anyhow::anyhow!("the source task failed: {e}")),
    };

    RuleTable::delete()
        .await
        .context("removing the kube-uproxy nftables table on shutdown")?;
    info!("nftables table removed; bye");
    source_result
}
