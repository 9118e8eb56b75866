//! Opening and closing the listeners of Service ports.
//!
//! The reconciler talks to listeners only through the [`Listeners`] trait,
//! so that it is unit-tested without sockets; [`SocketListeners`] is the
//! real thing.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::balancer::Balancer;
use super::connections::Connections;
use super::metrics::PortSeries;
use super::ports::{PortError, ProxyPortAllocator};
use super::stop::Stop;
use super::threads::DataPathThreads;
use super::{DataPathConfig, tcp, udp};
use crate::model::{IpFamily, ListenerKey, Protocol};

/// A running listener of one Service port.
#[derive(Debug)]
pub struct Listener {
    /// The local port it accepts on.
    pub port: u16,
    /// Ends the accept loop (open connections are not affected).
    stop: Stop,
}

/// A listener could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(transparent)]
    Port(#[from] PortError),
    #[error("cannot start accepting on port {port}: {source}")]
    Start {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} Service ports are not proxied yet")]
    Unsupported(Protocol),
    #[error("{0} is not served on this node")]
    FamilyOff(IpFamily),
}

/// Opens and closes Service port listeners.
pub trait Listeners: Send {
    /// Opens a listener for `key` (on the proxy address of its family), on
    /// `adopt` if given and still possible (a port an earlier instance used
    /// for the same Service port).
    fn open(
        &mut self,
        key: &ListenerKey,
        balancer: Arc<Balancer>,
        adopt: Option<u16>,
    ) -> Result<Listener, ListenError>;

    /// Retires a listener whose rules are gone: it stops accepting after a
    /// short linger, and the port goes back to the pool.
    fn close(&mut self, key: &ListenerKey, listener: Listener);

    /// Stops accepting at once (shutdown: with [`SocketListeners`], every
    /// listener stops, as they share the shutdown token).
    fn close_now(&mut self, key: &ListenerKey, listener: Listener) {
        listener.stop.now.cancel();
        self.close(key, listener);
    }

    /// Ports kept in reserve for adoption that nobody took: free them.
    fn adoption_done(&mut self) {}
}

/// Listeners on real sockets.
#[derive(Debug)]
pub struct SocketListeners {
    /// Ports on the IPv4 proxy address.
    ports: ProxyPortAllocator,
    /// Ports on the IPv6 proxy address; `None` when IPv6 is not served.
    ports_v6: Option<ProxyPortAllocator>,
    config: Arc<DataPathConfig>,
    connections: Connections,
    /// Each listener gets its Service port's metric handles from here (the
    /// per-port series only, not the process's registry).
    metrics: Arc<PortSeries>,
    /// Every listener's [`Stop::now`].
    shutdown: CancellationToken,
    /// The UDP flows of every UDP listener (`--udp-max-flows-total`): one
    /// budget for the process, so that no number of UDP Service ports
    /// takes the fds the TCP data path needs.
    udp_budget: Arc<udp::FlowBudget>,
    /// Where TCP listeners accept: one listener per data-path thread on
    /// each TCP Service port; `None`: one listener, on the runtime `open`
    /// is called on.
    threads: Option<Arc<DataPathThreads>>,
}

impl SocketListeners {
    /// `ports` may hold reservations for adoption ([`ProxyPortAllocator::reserve`]).
    pub fn new(
        ports: ProxyPortAllocator,
        config: Arc<DataPathConfig>,
        connections: Connections,
    ) -> Self {
        SocketListeners {
            ports,
            ports_v6: None,
            udp_budget: udp::FlowBudget::new(config.udp.max_flows_total),
            config,
            connections,
            metrics: Arc::new(PortSeries::new(false)),
            shutdown: CancellationToken::new(),
            threads: None,
        }
    }

    /// Accepts TCP connections on `threads`, a listener on each.
    pub fn with_data_path_threads(mut self, threads: Arc<DataPathThreads>) -> Self {
        self.threads = Some(threads);
        self
    }

    /// Serves IPv6 Service ports too, with ports from `ports`.
    pub fn with_ipv6(mut self, ports: ProxyPortAllocator) -> Self {
        self.ports_v6 = Some(ports);
        self
    }

    fn ports_of(&mut self, family: IpFamily) -> Result<&mut ProxyPortAllocator, ListenError> {
        match family {
            IpFamily::V4 => Ok(&mut self.ports),
            IpFamily::V6 => self.ports_v6.as_mut().ok_or(ListenError::FamilyOff(family)),
        }
    }

    /// Counts into `metrics`, the series the process's registry renders
    /// (otherwise into series nobody renders).
    pub fn with_metrics(mut self, metrics: Arc<PortSeries>) -> Self {
        self.metrics = metrics;
        self
    }
}

impl SocketListeners {
    /// Starts the TCP listener(s) of `key` on `socket` (bound to `port`):
    /// one per data-path thread when there are threads, the first on
    /// `socket` and the others on sockets bound beside it.
    fn start_tcp(
        &mut self,
        key: &ListenerKey,
        socket: socket2::Socket,
        port: u16,
        balancer: Arc<Balancer>,
        stop: &Stop,
    ) -> std::io::Result<()> {
        let name = Arc::new(key.port.clone());
        let metrics = self.metrics.service_port(&key.port);
        let Some(threads) = self.threads.clone() else {
            let config = Arc::clone(&self.config);
            let connections = self.connections.clone();
            return tcp::spawn(
                name,
                socket.into(),
                balancer,
                config,
                connections,
                stop.clone(),
                metrics,
            )
            .map(drop);
        };
        let mut sockets = vec![socket];
        if let Ok(ports) = self.ports_of(key.family) {
            for _ in 1..threads.handles().len() {
                match ports.bind_more(key.port.protocol, port) {
                    Ok(s) => sockets.push(s),
                    Err(e) => {
                        // Fewer listeners: fewer threads serve the port.
                        warn!(service_port = %key.port, port, error = %e,
                            "cannot open a listener for every data-path thread");
                        break;
                    }
                }
            }
        }
        for (i, (socket, handle)) in sockets.into_iter().zip(threads.handles()).enumerate() {
            // The listener registers with, and its accept loop and flows
            // run on, this thread's runtime.
            let _on_thread = handle.enter();
            // The first listener sweeps the shared affinity table.
            tcp::spawn_one(
                Arc::clone(&name),
                socket.into(),
                Arc::clone(&balancer),
                Arc::clone(&self.config),
                self.connections.clone(),
                stop.clone(),
                Arc::clone(&metrics),
                i == 0,
            )?;
        }
        Ok(())
    }
}

impl Listeners for SocketListeners {
    fn open(
        &mut self,
        key: &ListenerKey,
        balancer: Arc<Balancer>,
        adopt: Option<u16>,
    ) -> Result<Listener, ListenError> {
        let name = &key.port;
        if name.protocol == Protocol::Sctp {
            return Err(ListenError::Unsupported(name.protocol));
        }
        let ports = self.ports_of(key.family)?;
        let adopted = adopt.and_then(|p| match ports.bind_reserved(name.protocol, p) {
            Ok(sock) => Some((sock, p)),
            Err(e) => {
                warn!(service_port = %name, family = %key.family, port = p, error = %e, "cannot take the port back; taking another");
                None
            }
        });
        let (socket, port) = match adopted {
            Some(s) => s,
            None => ports.bind(name.protocol)?,
        };
        let stop = Stop::under(&self.shutdown);
        let started = match name.protocol {
            Protocol::Udp => udp::spawn(
                Arc::new(name.clone()),
                socket.into(),
                balancer,
                self.config.udp,
                Arc::clone(&self.udp_budget),
                stop.clone(),
                self.metrics.service_port(name),
            )
            .map(drop),
            _ => self.start_tcp(key, socket, port, balancer, &stop),
        };
        if let Err(source) = started {
            // Listeners already started on other threads stop too.
            stop.now.cancel();
            self.ports_of(key.family)?.release(name.protocol, port);
            self.metrics.release_service_port(name);
            return Err(ListenError::Start { port, source });
        }
        Ok(Listener { port, stop })
    }

    fn close(&mut self, key: &ListenerKey, listener: Listener) {
        listener.stop.retire.cancel();
        // The socket lingers a moment; the allocator's probe bind keeps the
        // port from being handed out while it does.
        if let Ok(ports) = self.ports_of(key.family) {
            ports.release(key.port.protocol, listener.port);
        }
        // The metrics are the Service port's, shared by its listeners of
        // both families (counted references).
        self.metrics.release_service_port(&key.port);
    }

    fn adoption_done(&mut self) {
        self.ports.clear_reservations();
        if let Some(p) = &mut self.ports_v6 {
            p.clear_reservations();
        }
    }
}

impl Listener {
    /// A listener record without an accept loop (test doubles).
    pub fn detached(port: u16) -> Self {
        Listener {
            port,
            stop: Stop::default(),
        }
    }
}
