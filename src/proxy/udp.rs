//! UDP: one socket per Service port, one upstream socket per client.
//!
//! The legacy two-socket design: each client address (ip:port) that sends
//! to a Service port gets a *flow*, an upstream socket of its own connected
//! to the endpoint chosen for it. The endpoint sees one stable source per
//! client, and its replies arrive on that socket and are sent back from the
//! Service port's socket, which is bound to the proxy address: conntrack
//! then rewrites their source to the address the client sent to (the
//! ClusterIP, external IP or node address), whatever other addresses the
//! node has.
//!
//! ```text
//!  client 10.1.0.5:40000 ─▶ ClusterIP:53 ─DNAT─▶ 169.254.42.1:P (this socket)
//!                                                   │ flows[10.1.0.5:40000]
//!                                                   ▼
//!                                      upstream socket ──▶ endpoint 10.1.0.9:53
//!  client ◀── send_to(client) from :P ◀── reader task ◀──┘
//! ```
//!
//! - A flow lives until `timeout` passes without a datagram in either
//!   direction (checked a few times per timeout).
//! - The next datagram of a flow whose endpoint left the set, answered
//!   with an ICMP error (seen as `ECONNREFUSED` on the upstream socket) or
//!   cannot be reached (any other send or receive error on the upstream
//!   socket, e.g. `EHOSTUNREACH`, but a full buffer), opens a new flow to
//!   another endpoint, counted as a failed attempt and a retry. No conntrack entry needs
//!   flushing for it: conntrack only knows the proxy, not the endpoint.
//! - When the listener is retired (its Service port is gone or was
//!   recreated), after its linger, the conntrack entries DNATed to its
//!   port are flushed ([`super::conntrack`]), so that a client that keeps
//!   its source port reaches the new listener.
//! - The table holds at most `max_flows`; when it is full, room is made a
//!   sixteenth of the table at a time: first from the *finished
//!   exchanges*, flows whose one datagram was answered (a DNS query and
//!   its answer), however recent, the longest idle first; then from the
//!   flows idle for at least [`IN_USE`], the longest idle first. When there
//!   is neither, the new client's datagram is dropped. As conntrack drops
//!   its unassured entries first, a flood of one-shot clients (a DNS
//!   flood) thus leaves room for new clients instead of filling the table
//!   with flows that have nothing left to carry; a flow with a request
//!   still unanswered, or with more than one request (a stream, "assured"
//!   in conntrack's words) is never pushed out while in use. A flood of
//!   client addresses can exhaust neither memory nor file descriptors.
//! - Every flow also holds a share of one process-wide [`FlowBudget`]
//!   (`--udp-max-flows-total`), taken before its socket opens and given
//!   back when it closes: per-port caps alone add up to 16 384 fds per
//!   UDP Service port, and datagrams to many ports (spoofed sources cost
//!   the sender nothing) would take every fd of the process, and with
//!   them TCP accept and connect for every Service. When the budget is
//!   spent, a new flow takes the place of an idle one of its own Service
//!   port (the rule of a full table), or its datagram is dropped: a flood
//!   on one port never closes another port's flows.
//! - Datagrams are received two at a time (one `recvmmsg`), into two
//!   64 KiB buffers per worker thread, so a
//!   datagram of any size (up to 65507 bytes) passes whole and an idle flow
//!   holds no buffer.
//! - preserve-client-ip: a flow to an endpoint on this node of a port that
//!   preserves client IPs ([`Balancer::is_transparent`]) binds its upstream
//!   socket to the client's own address and port (`IP_TRANSPARENT`,
//!   marked with the upstream and the preserve mark), as a TCP connection
//!   does ([`super::connect::connect_from_client`]): the endpoint sees its
//!   real client, and its replies, addressed to the client, are routed
//!   back to that socket by the same connmark rules and policy route
//!   (docs/rules.md). The socket is connected to the endpoint, so it
//!   receives nothing else; the client is still answered from the Service
//!   port's socket. When the client's address cannot be taken (its port is
//!   held on this node, or another flow of this process already goes from
//!   it to the same endpoint) the flow comes from the node's address
//!   instead, counted as a fallback, and works as any other.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;
use tracing::{Instrument, debug, debug_span, warn};

use super::balancer::{Balancer, Lease};
use super::connect::{bind_transparent, can_come_from_client, log_fallback};
use super::metrics::{ListenerMetrics, ServicePortMetrics, UdpRefusal};
use super::stop::{RETIRE_LINGER, Stop, Timer, fire, timer};
use super::sys::{DATAGRAMS_PER_CALL, recv_datagrams, register_udp};
use crate::model::ServicePortName;

/// A flow active within this long is in use and never evicted to make
/// room for a new one.
pub const IN_USE: Duration = Duration::from_secs(1);
/// At most one "table full" warning per this interval and Service port.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A UDP socket registered with the runtime's reactor. Not tokio's
/// `UdpSocket`: that one forgets a socket's readiness only when a receive
/// says `EAGAIN`, one more system call per datagram; [`poll_datagrams`]
/// knows from a short batch that the queue is empty.
type Socket = AsyncFd<StdUdpSocket>;

/// Each worker thread's receive buffers: a datagram of any size (up to
/// 65507 bytes) passes whole, and an idle flow holds no buffer.
struct Datagrams {
    bufs: [Box<[u8]>; DATAGRAMS_PER_CALL],
    got: [(usize, Option<SocketAddr>); DATAGRAMS_PER_CALL],
}

thread_local! {
    static DATAGRAMS: RefCell<Datagrams> = RefCell::new(Datagrams {
        bufs: std::array::from_fn(|_| vec![0; 65536].into_boxed_slice()),
        got: [(0, None); DATAGRAMS_PER_CALL],
    });
}

/// Receives what `socket` has queued, up to [`DATAGRAMS_PER_CALL`]
/// datagrams in one system call, and hands each with its sender to
/// `each`; `Pending` until one is there. A batch short of full leaves the
/// socket waiting for the reactor's next edge at once: the queue was
/// empty when the call returned, and a datagram arriving after it makes a
/// new edge (tokio keeps the readiness if an edge came in between).
fn poll_datagrams(
    socket: &Socket,
    cx: &mut Context<'_>,
    mut each: impl FnMut(Option<SocketAddr>, &[u8]),
) -> Poll<io::Result<()>> {
    loop {
        let mut guard = ready!(socket.poll_read_ready(cx))?;
        let r = DATAGRAMS.with(|cell| -> io::Result<usize> {
            let d = &mut *cell.borrow_mut();
            let n = recv_datagrams(guard.get_inner(), &mut d.bufs, &mut d.got)?;
            for (buf, &(len, from)) in d.bufs.iter().zip(&d.got).take(n) {
                each(from, &buf[..len.min(buf.len())]);
            }
            Ok(n)
        });
        match r {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
            Err(e) => return Poll::Ready(Err(e)),
            Ok(n) => {
                if n < DATAGRAMS_PER_CALL {
                    guard.clear_ready();
                }
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Settings of the UDP data path.
#[derive(Debug, Clone, Copy)]
pub struct UdpConfig {
    /// Idle time after which a flow is closed.
    pub timeout: Duration,
    /// Most flows per Service port.
    pub max_flows: usize,
    /// Most flows of all Service ports together (one [`FlowBudget`]).
    pub max_flows_total: usize,
    /// `SO_MARK` of the upstream sockets (see `DataPathConfig::upstream_mark`).
    pub mark: u32,
    /// The preserve-client-ip mark (`--preserve-client-ip-mark`), added to
    /// `mark` on an upstream socket bound to the client's own address: the
    /// endpoint's replies are routed back to it by that mark. 0: client
    /// addresses are never preserved.
    pub preserve_client_ip_mark: u32,
    /// Flush the conntrack entries that point at a retired listener
    /// ([`super::conntrack`]). Off by default: unit tests must not touch
    /// the conntrack table of the machine they run on (nor count a failure
    /// per listener without `CAP_NET_ADMIN`); the binary turns it on.
    pub flush_conntrack: bool,
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig {
            timeout: Duration::from_secs(30),
            max_flows: 16384,
            max_flows_total: usize::MAX,
            mark: 0,
            preserve_client_ip_mark: 0,
            flush_conntrack: false,
        }
    }
}

/// The process's budget of UDP flows: one upstream socket (one fd) each,
/// shared by every UDP listener, so that the UDP data path as a whole
/// never takes the fds the TCP data path needs (`--udp-max-flows-total`).
#[derive(Debug)]
pub struct FlowBudget {
    max: usize,
    used: AtomicUsize,
}

impl FlowBudget {
    /// At most `max` flows open at once, over every UDP listener.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(FlowBudget {
            max,
            used: AtomicUsize::new(0),
        })
    }

    /// One flow's share, or `None` when the budget is spent. Taken before
    /// the flow's socket opens; given back when the share drops.
    fn reserve(self: &Arc<Self>) -> Option<FlowShare> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u < self.max).then_some(u + 1)
            })
            .ok()
            .map(|_| FlowShare(Arc::clone(self)))
    }

    /// Flows open now, over every listener.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// One flow's part of the [`FlowBudget`], given back when dropped, however
/// the flow ends (expired, evicted, moved, its listener retired).
#[derive(Debug)]
struct FlowShare(Arc<FlowBudget>);

impl Drop for FlowShare {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A flow's upstream socket and its share of the [`FlowBudget`], shared by
/// the flow and its reader task. The share goes back when the socket has
/// closed (fields drop in order), not when the flow leaves the table: the
/// aborted reader task still holds the socket until the runtime drops it,
/// and a budget given back early would let a flood of short flows hold
/// more fds than the budget. So a newcomer that evicts a flow while the
/// budget is spent may lose its first datagram (the share is not back
/// yet); its next one gets in.
#[derive(Debug)]
struct Upstream {
    socket: Socket,
    /// The client address and endpoint this flow's socket holds, when it
    /// is bound to the client's address; released after the socket has
    /// closed (declared after it).
    _claim: Option<TupleClaim>,
    _shares: Shares,
}

/// The (client, endpoint) pairs of the upstream sockets bound to a
/// client's own address, process-wide. Two such sockets may share a
/// client address and port (`SO_REUSEADDR`: the same client talking to
/// two endpoints, or a flow that moved while its old socket closes), but
/// not toward one endpoint: UDP connect does not refuse a four-tuple
/// already taken, and the endpoint's replies would reach either socket.
/// A B-tree: its `new` is `const`.
static TRANSPARENT_FLOWS: std::sync::Mutex<std::collections::BTreeSet<(SocketAddr, SocketAddr)>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// One pair of [`TRANSPARENT_FLOWS`], given back when dropped.
#[derive(Debug)]
struct TupleClaim(SocketAddr, SocketAddr);

impl TupleClaim {
    /// The pair, or `None` when another flow holds it.
    fn take(client: SocketAddr, endpoint: SocketAddr) -> Option<TupleClaim> {
        let mut held = TRANSPARENT_FLOWS.lock().unwrap_or_else(|p| p.into_inner());
        // Built only when inserted: a claim dropped here would lock the
        // set again (a deadlock) and give back the other flow's pair.
        if held.insert((client, endpoint)) {
            Some(TupleClaim(client, endpoint))
        } else {
            None
        }
    }
}

impl Drop for TupleClaim {
    fn drop(&mut self) {
        let mut held = TRANSPARENT_FLOWS.lock().unwrap_or_else(|p| p.into_inner());
        held.remove(&(self.0, self.1));
    }
}

/// A flow's share of its Service port's table (`--udp-max-flows`) and of
/// the process's budget, both counted until its socket has closed.
#[derive(Debug)]
struct Shares {
    _port: FlowShare,
    _process: FlowShare,
}

/// What the reader task and the socket's task share about one flow.
#[derive(Debug)]
struct FlowState {
    /// Milliseconds since the Service port's start at the last datagram.
    last: AtomicU64,
    /// The endpoint answered with an ICMP error, or cannot be reached.
    failed: AtomicBool,
    /// Datagrams sent to the endpoint (by the socket's task).
    sent: AtomicU64,
    /// Datagrams relayed back to the client (by the reader task).
    replies: AtomicU64,
}

impl FlowState {
    fn new(now: u64) -> Self {
        FlowState {
            last: AtomicU64::new(now),
            failed: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            replies: AtomicU64::new(0),
        }
    }

    /// One request, answered: a finished exchange (a DNS query and its
    /// answer) that the table may close first, even if recent, to make
    /// room. A flow with more than one request is a stream (conntrack
    /// calls it assured) and one whose request is unanswered is waiting:
    /// both are kept while in use.
    fn finished(&self) -> bool {
        self.sent.load(Ordering::Relaxed) == 1 && self.replies.load(Ordering::Relaxed) >= 1
    }

    /// Notes a failed send to the endpoint. Every error says the endpoint
    /// cannot be reached (a refusal from an earlier ICMP error, a host or
    /// network unreachable, a route gone), and the next datagram goes to
    /// another endpoint, except those that concern this datagram only: a
    /// full send buffer or a short memory drops it, as the network would,
    /// and one too large for the path would be too large for any endpoint.
    fn send_failed(&self, e: &io::Error) {
        let transient = matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted | io::ErrorKind::OutOfMemory
        ) || matches!(
            e.raw_os_error(),
            Some(libc::ENOBUFS | libc::ENOMEM | libc::EMSGSIZE)
        );
        if !transient {
            self.failed.store(true, Ordering::Relaxed);
        }
    }
}

/// One client's flow.
struct Flow {
    upstream: Arc<Upstream>,
    state: Arc<FlowState>,
    /// Counts this flow against its endpoint (least-connections).
    lease: Lease,
    /// The generation of the endpoint set the endpoint was last found in,
    /// so that membership is checked again only after an update. A
    /// generation, not the set's address: after two updates a new set can
    /// sit at a freed one's address and skip the check.
    checked: u64,
    /// The task relaying replies; aborted with the flow.
    _reader: AbortOnDropHandle<()>,
}

/// Starts serving `socket` (bound to the proxy address) until `stop` says
/// so.
pub fn spawn(
    service: Arc<ServicePortName>,
    socket: StdUdpSocket,
    balancer: Arc<Balancer>,
    config: UdpConfig,
    budget: Arc<FlowBudget>,
    stop: Stop,
    metrics: Arc<ServicePortMetrics>,
) -> io::Result<tokio::task::JoinHandle<()>> {
    socket.set_nonblocking(true)?;
    let socket = Arc::new(register_udp(socket)?);
    let port = socket.get_ref().local_addr()?.port();
    let span = debug_span!("udp", service = %service, proxy_port = port);
    let table = FlowTable {
        socket,
        service,
        balancer,
        config,
        // One eviction batch (a sixteenth of the table) of slack: the
        // sockets of flows just evicted close a moment after they leave
        // the table, and the datagram that evicted them must not wait for
        // that (a one-shot client sends one). Fds stay within 17/16 of
        // the table.
        port_sockets: FlowBudget::new(config.max_flows + config.max_flows / 16 + 1),
        budget,
        flows: HashMap::new(),
        epoch: Instant::now(),
        last_warning: None,
        dropped: 0,
        metrics: ListenerMetrics::new(metrics),
    };
    Ok(tokio::spawn(table.run(stop).instrument(span)))
}

/// The flows of one Service port, owned by its task (no lock).
struct FlowTable {
    socket: Arc<Socket>,
    service: Arc<ServicePortName>,
    balancer: Arc<Balancer>,
    config: UdpConfig,
    budget: Arc<FlowBudget>,
    /// The upstream sockets of this table still open: its flows, and
    /// those that left the table but whose socket has not closed yet.
    port_sockets: Arc<FlowBudget>,
    flows: HashMap<SocketAddr, Flow>,
    epoch: Instant,
    last_warning: Option<Instant>,
    /// Datagrams dropped for a full table or a spent budget since the last
    /// warning.
    dropped: u64,
    /// This listener's part of its Service port's gauges.
    metrics: ListenerMetrics,
}

impl FlowTable {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    async fn run(mut self, stop: Stop) {
        // Both sweeps are timers only while there is something to sweep
        // (flows; clients remembered for session affinity), boxed: an idle
        // Service port's task carries two pointers, not two timers, and
        // does not wake up at all.
        let mut expiry: Option<Timer> = None;
        let mut affinity: Option<Timer> = None;
        // Serving: until the Service port is retired (or the process
        // stops: `retire` is a child of `now`).
        loop {
            tokio::select! {
                _ = stop.retire.cancelled() => break,
                _ = fire(&mut expiry) => expiry = self.expire(),
                _ = fire(&mut affinity) => affinity = self.sweep_affinity(),
                r = self.receive() => self.received(r, &mut expiry, &mut affinity),
            }
        }
        if stop.now.is_cancelled() {
            return;
        }
        // Retired: serve a short linger more (datagrams translated just
        // before the rule change still arrive), then close; shutdown closes
        // at once.
        let mut linger = timer(RETIRE_LINGER);
        loop {
            tokio::select! {
                _ = stop.now.cancelled() => return,
                _ = &mut linger => break,
                _ = fire(&mut expiry) => expiry = self.expire(),
                r = self.receive() => self.received(r, &mut expiry, &mut affinity),
            }
        }
        // Closed, and the rules moved to another listener before the
        // retirement began (the reconciler closes a listener only after the
        // sync that took its rules away succeeded): conntrack entries that
        // still DNAT a client to this port would hold a client that keeps
        // its source port here, on a closed port, for as long as it sends.
        // Flushed now, its next datagram follows the rules to the new
        // listener. Not at shutdown: the next instance takes these ports.
        let proxy = self.socket.get_ref().local_addr();
        let flush = self.config.flush_conntrack;
        drop(self);
        match proxy {
            Ok(proxy) if flush => super::conntrack::CONNTRACK.retired(proxy),
            Ok(_) => {}
            Err(e) => debug!(error = %e, "no local address; conntrack not flushed"),
        }
    }

    /// After a datagram: the sweeps get a timer if they now have work.
    fn received(
        &mut self,
        r: io::Result<()>,
        expiry: &mut Option<Timer>,
        affinity: &mut Option<Timer>,
    ) {
        if let Err(e) = r {
            // Errors of one datagram (an ICMP error for an earlier reply)
            // concern nobody else.
            debug!(error = %e, "receive failed");
        }
        if expiry.is_none() && !self.flows.is_empty() {
            *expiry = Some(timer(self.sweep_every()));
        }
        if affinity.is_none() && self.balancer.affinity_clients() > 0 {
            *affinity = self.sweep_affinity();
        }
    }

    /// How often idle flows are looked for: a few times per timeout.
    fn sweep_every(&self) -> Duration {
        (self.config.timeout / 4).max(Duration::from_millis(100))
    }

    /// Reaps the affinity table and reports its size; the next sweep's
    /// timer while clients remain (a new flow sweeps too, when one is due).
    fn sweep_affinity(&self) -> Option<Timer> {
        let clients = self.balancer.reap_affinity();
        self.metrics.affinity_clients(clients);
        (clients > 0).then(|| timer(self.balancer.affinity_reap_interval()))
    }

    /// Waits for datagrams and forwards them.
    async fn receive(&mut self) -> io::Result<()> {
        let socket = Arc::clone(&self.socket);
        std::future::poll_fn(|cx| {
            poll_datagrams(&socket, cx, |from, data| match from {
                Some(client) => self.forward(client, data),
                None => debug!("a datagram from an address that is not IP; dropped"),
            })
        })
        .await
    }

    /// Sends one client datagram upstream, opening or replacing its flow.
    fn forward(&mut self, client: SocketAddr, data: &[u8]) {
        let now = self.now_ms();
        let stale = self.flows.get(&client).and_then(|f| self.why_replace(f));
        let mut avoid = None;
        if let Some(reason) = stale
            && let Some(old) = self.flows.remove(&client)
        {
            debug!(%client, endpoint = %old.lease.addr(), reason, "moving the flow to another endpoint");
            if old.state.failed.load(Ordering::Relaxed) {
                // Counted as a failed attempt on the endpoint, and a retry
                // on another, as a TCP connect failover is.
                self.metrics.attempt_failed(old.lease.addr());
                self.metrics.retry();
            }
            avoid = Some(old.lease.addr());
        }
        if !self.flows.contains_key(&client) {
            let share = match self.admit(now) {
                Ok(share) => share,
                Err(reason) => {
                    self.metrics.udp_flow_refused(reason);
                    self.dropped += 1;
                    self.warn_full(reason);
                    return;
                }
            };
            match self.open(client, avoid, share) {
                Ok(Some(flow)) => {
                    self.flows.insert(client, flow);
                    self.metrics.udp_flows(self.flows.len());
                }
                Ok(None) => return,
                Err(e) => {
                    debug!(%client, error = %e, "cannot open an upstream socket");
                    return;
                }
            }
        }
        if let Some(flow) = self.flows.get(&client) {
            flow.state.last.store(now, Ordering::Relaxed);
            flow.state.sent.fetch_add(1, Ordering::Relaxed);
            // Straight to the kernel: tokio's `try_send` would report "would
            // block" until the reactor has seen a new socket writable, and
            // drop the first datagram of every flow.
            let sent = socket2::SockRef::from(flow.upstream.socket.get_ref()).send(data);
            if let Err(e) = sent {
                debug!(%client, endpoint = %flow.lease.addr(), error = %e, "datagram not sent upstream");
                flow.state.send_failed(&e);
            }
        }
    }

    /// Room and a budget share for one more flow: from this port's idle
    /// flows if the table is full or the process's budget spent (never
    /// from another port's), else the cap that refuses it.
    ///
    /// Both caps count sockets, not table entries: a flow that just left
    /// the table holds its shares until its socket has closed, a moment
    /// later, so the datagram that evicted it may be dropped (the next one
    /// gets in) and a flood of short flows never holds more fds than the
    /// caps.
    fn admit(&mut self, now: u64) -> Result<Shares, UdpRefusal> {
        if self.flows.len() >= self.config.max_flows && !self.make_room(now) {
            return Err(UdpRefusal::MaxFlows);
        }
        let port = self.port_sockets.reserve().ok_or(UdpRefusal::MaxFlows)?;
        if let Some(process) = self.budget.reserve() {
            return Ok(Shares {
                _port: port,
                _process: process,
            });
        }
        // Another port's listener may take the freed share first: then
        // this datagram is dropped, the next one tries again.
        if self.make_room(now)
            && let Some(process) = self.budget.reserve()
        {
            return Ok(Shares {
                _port: port,
                _process: process,
            });
        }
        Err(UdpRefusal::MaxFlowsTotal)
    }

    /// Why a flow must move to another endpoint, if it must.
    fn why_replace(&self, flow: &Flow) -> Option<&'static str> {
        if flow.state.failed.load(Ordering::Relaxed) {
            return Some("the endpoint answered with an ICMP error");
        }
        let set = self.balancer.endpoints();
        if set.generation() != flow.checked && !set.contains(flow.lease.addr()) {
            return Some("the endpoint left the set");
        }
        None
    }

    /// Picks an endpoint and opens a flow to it. `Ok(None)`: no endpoint
    /// (the rules refuse such traffic; this is the moment until they do).
    fn open(
        &self,
        client: SocketAddr,
        avoid: Option<SocketAddr>,
        share: Shares,
    ) -> io::Result<Option<Flow>> {
        let tried: Vec<SocketAddr> = avoid.into_iter().collect();
        let set = self.balancer.endpoints();
        let Some(lease) = self.balancer.pick(client.ip(), &tried) else {
            return Ok(None);
        };
        let endpoint = lease.addr();
        // From the client's own address: an endpoint on this node of a
        // port that preserves client IPs (the reconciler's choice).
        let preserve = self.config.preserve_client_ip_mark;
        let from_client = preserve != 0
            && self.balancer.is_transparent(endpoint)
            && can_come_from_client(client, endpoint);
        let (sock, claim) = if from_client {
            match client_socket(client, endpoint, self.config.mark | preserve) {
                Ok((sock, claim)) => {
                    self.metrics.client_ip(true);
                    (sock, Some(claim))
                }
                Err(e) => {
                    log_fallback(client, endpoint, &e);
                    let sock = node_socket(endpoint, self.config.mark)?;
                    self.metrics.client_ip(false);
                    (sock, None)
                }
            }
        } else {
            (node_socket(endpoint, self.config.mark)?, None)
        };
        sock.set_nonblocking(true)?;
        let upstream = Arc::new(Upstream {
            socket: register_udp(sock)?,
            _claim: claim,
            _shares: share,
        });
        let state = Arc::new(FlowState::new(self.now_ms()));
        let reader = tokio::spawn(relay_replies(
            Arc::clone(&upstream),
            Arc::clone(&self.socket),
            client,
            Arc::clone(&state),
            self.epoch,
        ));
        Ok(Some(Flow {
            upstream,
            state,
            lease,
            checked: set.generation(),
            _reader: AbortOnDropHandle::new(reader),
        }))
    }

    /// Closes flows idle for `timeout` or longer.
    /// Closes the flows idle for the timeout; the next sweep's timer while
    /// flows remain.
    fn expire(&mut self) -> Option<Timer> {
        let now = self.now_ms();
        let limit = self.config.timeout.as_millis() as u64;
        let before = self.flows.len();
        self.flows
            .retain(|_, f| now.saturating_sub(f.state.last.load(Ordering::Relaxed)) < limit);
        let expired = before - self.flows.len();
        self.metrics.udp_flows_expired(expired);
        self.metrics.udp_flows(self.flows.len());
        if expired > 0 {
            debug!(expired, open = self.flows.len(), "idle UDP flows closed");
        }
        (!self.flows.is_empty()).then(|| timer(self.sweep_every()))
    }

    /// Evicts a sixteenth of the table (at least one flow): the finished
    /// exchanges first, then the flows idle for [`IN_USE`] or longer, the
    /// longest idle first in each group; never a flow in use that is not
    /// finished. False if none could go.
    fn make_room(&mut self, now: u64) -> bool {
        let in_use = IN_USE.as_millis() as u64;
        // (group, last activity): group 0 the finished, 1 the idle.
        let mut candidates: Vec<((u8, u64), SocketAddr)> = self
            .flows
            .iter()
            .filter_map(|(c, f)| {
                let last = f.state.last.load(Ordering::Relaxed);
                if f.state.finished() {
                    Some(((0, last), *c))
                } else if now.saturating_sub(last) >= in_use {
                    Some(((1, last), *c))
                } else {
                    None
                }
            })
            .collect();
        if candidates.is_empty() {
            return false;
        }
        let n = (self.config.max_flows / 16).clamp(1, candidates.len());
        candidates.select_nth_unstable(n - 1);
        for (_, c) in &candidates[..n] {
            self.flows.remove(c);
        }
        self.metrics.udp_flows(self.flows.len());
        true
    }

    fn warn_full(&mut self, reason: UdpRefusal) {
        let due = self.last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY);
        if due {
            match reason {
                UdpRefusal::MaxFlows => warn!(
                    service_port = %self.service,
                    max_flows = self.config.max_flows,
                    dropped = self.dropped,
                    "UDP flow table full of active flows; datagrams of new clients dropped"
                ),
                UdpRefusal::MaxFlowsTotal => warn!(
                    service_port = %self.service,
                    max_flows_total = self.config.max_flows_total,
                    open_here = self.flows.len(),
                    dropped = self.dropped,
                    "the process's UDP flow budget (--udp-max-flows-total) is spent and this Service port has no idle flow to give up; datagrams of new clients dropped"
                ),
            }
            self.last_warning = Some(Instant::now());
            self.dropped = 0;
        }
    }
}

/// A flow's upstream socket from the node's own address, connected to
/// `endpoint` and marked `mark` (0: unmarked).
fn node_socket(endpoint: SocketAddr, mark: u32) -> io::Result<StdUdpSocket> {
    let local: SocketAddr = if endpoint.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = StdUdpSocket::bind(local)?;
    // Before connect: the route is chosen then, with the mark. Marked,
    // the datagrams pass the NAT output chain untranslated: an endpoint
    // that is itself a Service destination is not looped back into this
    // proxy.
    if mark != 0 {
        socket2::SockRef::from(&sock).set_mark(mark)?;
    }
    sock.connect(endpoint)?;
    Ok(sock)
}

/// A flow's upstream socket bound to `client`'s own address and port and
/// connected to `endpoint`, marked `mark` (the upstream and the preserve
/// mark: it passes the NAT output chain untranslated, and its conntrack
/// entry keeps the preserve mark, which routes the endpoint's replies back
/// here). `SO_REUSEADDR`: other flows of the same client port toward other
/// endpoints may hold the same address ([`TRANSPARENT_FLOWS`] keeps two
/// off one endpoint); a socket of the node on that port without it
/// refuses the bind (`EADDRINUSE`), and the flow falls back.
fn client_socket(
    client: SocketAddr,
    endpoint: SocketAddr,
    mark: u32,
) -> io::Result<(StdUdpSocket, TupleClaim)> {
    let claim = TupleClaim::take(client, endpoint).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::AddrInUse,
            "another flow goes from this client address to this endpoint",
        )
    })?;
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(client),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    bind_transparent(socket2::SockRef::from(&sock), client, mark)?;
    sock.connect(&endpoint.into())?;
    Ok((sock.into(), claim))
}

/// Relays the endpoint's datagrams back to the client, from the Service
/// port's socket, until the flow is dropped.
async fn relay_replies(
    upstream: Arc<Upstream>,
    socket: Arc<Socket>,
    client: SocketAddr,
    state: Arc<FlowState>,
    epoch: Instant,
) {
    let to = socket2::SockAddr::from(client);
    loop {
        let r = std::future::poll_fn(|cx| {
            poll_datagrams(&upstream.socket, cx, |_, data| {
                state
                    .last
                    .store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                if let Err(e) = socket2::SockRef::from(socket.get_ref()).send_to(data, &to) {
                    debug!(%client, error = %e, "reply not sent");
                }
                // After the send: a flow counted as answered may be
                // closed at once, its reply must be out.
                state.replies.fetch_add(1, Ordering::Relaxed);
            })
        })
        .await;
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                state.failed.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                debug!(%client, error = %e, "upstream receive failed");
                state.failed.store(true, Ordering::Relaxed);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Algorithm, ObjectKey, Protocol, SessionAffinity};
    use tokio::net::UdpSocket;

    fn name() -> Arc<ServicePortName> {
        Arc::new(ServicePortName {
            service: ObjectKey::new("default", "dns"),
            port: String::new(),
            protocol: Protocol::Udp,
        })
    }

    /// An endpoint on loopback that answers each datagram with its tag, the
    /// source address it saw, then the payload.
    async fn who_sent_to(tag: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = s.recv_from(&mut buf).await else {
                    return;
                };
                let mut reply = format!("{from}|{tag}|").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = s.send_to(&reply, from).await;
            }
        });
        (addr, task)
    }

    async fn start(
        endpoints: &[SocketAddr],
        config: UdpConfig,
    ) -> (SocketAddr, Arc<Balancer>, Stop) {
        start_with(endpoints, config, SessionAffinity::None).await
    }

    async fn start_with(
        endpoints: &[SocketAddr],
        config: UdpConfig,
        affinity: SessionAffinity,
    ) -> (SocketAddr, Arc<Balancer>, Stop) {
        let sock = StdUdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let balancer = Arc::new(Balancer::new(Algorithm::RoundRobin));
        balancer.update(endpoints, Algorithm::RoundRobin, affinity);
        let stop = Stop::default();
        let metrics = crate::proxy::metrics::PortSeries::new(false).service_port(&name());
        spawn(
            name(),
            sock,
            Arc::clone(&balancer),
            config,
            FlowBudget::new(config.max_flows_total),
            stop.clone(),
            metrics,
        )
        .unwrap();
        (addr, balancer, stop)
    }

    async fn ask(client: &UdpSocket, msg: &[u8]) -> Vec<u8> {
        client.send(msg).await.unwrap();
        let mut buf = vec![0u8; 70000];
        let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
            .await
            .expect("no reply within 5 s")
            .unwrap();
        buf.truncate(n);
        buf
    }

    async fn who_sent() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        who_sent_to("ep").await
    }

    /// The source address the endpoint saw.
    fn seen_by_endpoint(reply: &[u8]) -> String {
        let s = String::from_utf8_lossy(reply);
        s.split('|').next().unwrap_or_default().to_string()
    }

    /// The endpoint that answered.
    fn answered_by(reply: &[u8]) -> String {
        let s = String::from_utf8_lossy(reply);
        s.split('|').nth(1).unwrap_or_default().to_string()
    }

    #[tokio::test]
    async fn a_client_keeps_its_upstream_until_idle_and_large_datagrams_pass_whole() {
        let (ep, _server) = who_sent().await;
        let config = UdpConfig {
            timeout: Duration::from_millis(400),
            max_flows: 16,
            ..UdpConfig::default()
        };
        let (proxy, _, _stop) = start(&[ep], config).await;
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(proxy).await.unwrap();
        let first = seen_by_endpoint(&ask(&client, b"a").await);
        let second = seen_by_endpoint(&ask(&client, b"b").await);
        assert_eq!(first, second, "one client, one upstream socket");
        // 65507 bytes, the largest IPv4 UDP payload, both ways.
        let big: Vec<u8> = (0..65507 - 32).map(|i| (i % 251) as u8).collect();
        let back = ask(&client, &big).await;
        assert!(
            back.ends_with(&big),
            "large datagram truncated: {} bytes back",
            back.len()
        );
        tokio::time::sleep(Duration::from_millis(900)).await;
        let third = seen_by_endpoint(&ask(&client, b"c").await);
        assert_ne!(first, third, "the idle flow was not closed");
    }

    #[tokio::test]
    async fn a_burst_is_answered_whole_the_last_datagrams_included() {
        // Datagrams are taken a batch at a time and a socket waits for the
        // next edge only after a short batch: a burst whose last datagrams
        // wait for an edge that never comes loses its tail.
        let (ep, _server) = who_sent().await;
        let (proxy, _, _stop) = start(&[ep], UdpConfig::default()).await;
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(proxy).await.unwrap();
        let _ = ask(&client, b"first").await;
        for round in 0..20 {
            let burst = 2 + round % 7;
            for i in 0..burst {
                client
                    .send(format!("#{round}.{i}").as_bytes())
                    .await
                    .unwrap();
            }
            let mut seen = std::collections::BTreeSet::new();
            let mut buf = [0u8; 256];
            while seen.len() < burst {
                let n = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
                    .await
                    .unwrap_or_else(|_| panic!("round {round}: {} of {burst} answered", seen.len()))
                    .unwrap();
                let reply = String::from_utf8_lossy(&buf[..n]).to_string();
                let tag = reply.rsplit('#').next().unwrap_or_default().to_string();
                seen.insert(tag);
            }
        }
    }

    #[tokio::test]
    async fn a_flow_moves_when_its_endpoint_leaves_or_refuses() {
        let (a, _sa) = who_sent_to("a").await;
        let (b, sb) = who_sent_to("b").await;
        let (proxy, balancer, _stop) = start(&[a], UdpConfig::default()).await;
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(proxy).await.unwrap();
        assert_eq!(answered_by(&ask(&client, b"x").await), "a");
        // `a` leaves the set: the next datagram goes to `b`.
        balancer.update(&[b], Algorithm::RoundRobin, SessionAffinity::None);
        assert_eq!(answered_by(&ask(&client, b"y").await), "b");
        // `a` comes back, `b` dies (ICMP port unreachable): the flow moves
        // to `a` within a few datagrams (the first one after the death is
        // lost, as it would be talking to `b` directly).
        balancer.update(&[b, a], Algorithm::RoundRobin, SessionAffinity::None);
        sb.abort();
        let _ = sb.await;
        let mut by = None;
        for _ in 0..5 {
            client.send(b"z").await.unwrap();
            let mut buf = [0u8; 256];
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buf)).await
            {
                by = Some(answered_by(&buf[..n]));
                break;
            }
        }
        assert_eq!(
            by.as_deref(),
            Some("a"),
            "the flow did not move off the refusing endpoint"
        );
    }

    #[tokio::test]
    async fn a_flow_moves_when_its_endpoint_left_in_one_of_two_updates_between_datagrams() {
        // Two updates between two datagrams of a flow: the set the flow was
        // opened with is freed by the first, and the second's set may be
        // allocated at its address. Membership must be checked anyway.
        let (a, _sa) = who_sent_to("a").await;
        let (b, _sb) = who_sent_to("b").await;
        let (proxy, balancer, _stop) = start(&[a], UdpConfig::default()).await;
        for round in 0..20 {
            let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            client.connect(proxy).await.unwrap();
            balancer.update(&[a], Algorithm::RoundRobin, SessionAffinity::None);
            assert_eq!(answered_by(&ask(&client, b"x").await), "a");
            // `a` leaves, then the set is published once more without it.
            balancer.update(&[b], Algorithm::RoundRobin, SessionAffinity::None);
            balancer.update(&[b], Algorithm::RoundRobin, SessionAffinity::None);
            assert_eq!(
                answered_by(&ask(&client, b"y").await),
                "b",
                "round {round}: the flow stayed on an endpoint that left"
            );
        }
    }

    #[test]
    fn one_client_address_toward_one_endpoint_is_held_by_one_flow_at_a_time() {
        // UDP connect does not refuse a four-tuple already taken: two
        // sockets bound to one client address and connected to one
        // endpoint would split its replies. The second flow falls back.
        let client: SocketAddr = "10.200.0.2:5353".parse().unwrap();
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.1.0.9:53".parse().unwrap(),
            "10.1.0.10:53".parse().unwrap(),
        );
        let first = TupleClaim::take(client, a).expect("free");
        assert!(TupleClaim::take(client, a).is_none(), "taken twice");
        // The same client port toward another endpoint is another tuple.
        let other = TupleClaim::take(client, b).expect("another endpoint");
        drop(first);
        assert!(TupleClaim::take(client, a).is_some(), "not given back");
        drop(other);
    }

    #[test]
    fn every_send_error_but_a_full_buffer_moves_the_flow_off_its_endpoint() {
        // A refusal, or the endpoint's host or network unreachable: the
        // next datagram goes elsewhere (`a_flow_moves_when_its_endpoint_
        // leaves_or_refuses` shows the table acting on `failed`). A full
        // buffer drops the one datagram only.
        let fresh = || FlowState::new(0);
        for errno in [libc::EHOSTUNREACH, libc::ENETUNREACH, libc::ECONNREFUSED] {
            let state = fresh();
            state.send_failed(&io::Error::from_raw_os_error(errno));
            assert!(
                state.failed.load(Ordering::Relaxed),
                "errno {errno} left the flow on its endpoint"
            );
        }
        let state = fresh();
        state.send_failed(&io::Error::from(io::ErrorKind::WouldBlock));
        state.send_failed(&io::Error::from_raw_os_error(libc::ENOBUFS));
        assert!(!state.failed.load(Ordering::Relaxed), "a full buffer");
    }

    #[tokio::test]
    async fn under_affinity_every_flow_of_a_client_ip_goes_to_one_endpoint() {
        // Ten client ports of one IP (127.0.0.1): ten flows, one endpoint.
        // Without affinity, round-robin spreads them over both.
        let (a, _sa) = who_sent_to("a").await;
        let (b, _sb) = who_sent_to("b").await;
        let answered = |proxy: SocketAddr| async move {
            let mut by = std::collections::BTreeSet::new();
            for _ in 0..10 {
                let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                client.connect(proxy).await.unwrap();
                by.insert(answered_by(&ask(&client, b"x").await));
            }
            by
        };
        let affinity = SessionAffinity::ClientIp {
            timeout: Duration::from_secs(10800),
        };
        let (proxy, balancer, _stop) = start_with(&[a, b], UdpConfig::default(), affinity).await;
        assert_eq!(answered(proxy).await.len(), 1);
        assert_eq!(balancer.affinity_clients(), 1);
        balancer.update(&[a, b], Algorithm::RoundRobin, SessionAffinity::None);
        assert_eq!(answered(proxy).await.len(), 2);
    }

    #[tokio::test]
    async fn one_budget_caps_the_flows_of_every_port_and_a_port_makes_room_from_its_own() {
        let (ep, _server) = who_sent().await;
        let budget = FlowBudget::new(2);
        let config = UdpConfig {
            max_flows_total: 2,
            ..UdpConfig::default()
        };
        let balancer = Arc::new(Balancer::new(Algorithm::RoundRobin));
        balancer.update(&[ep], Algorithm::RoundRobin, SessionAffinity::None);
        let series = Arc::new(crate::proxy::metrics::PortSeries::new(false));
        let stop = Stop::default();
        let mut ports = Vec::new();
        for _ in 0..2 {
            let sock = StdUdpSocket::bind("127.0.0.1:0").unwrap();
            ports.push(sock.local_addr().unwrap());
            spawn(
                name(),
                sock,
                Arc::clone(&balancer),
                config,
                Arc::clone(&budget),
                stop.clone(),
                series.service_port(&name()),
            )
            .unwrap();
        }
        let client = || UdpSocket::bind("127.0.0.1:0");
        let (a, b) = (ports[0], ports[1]);
        // One flow on each port, each with two exchanges (streams, not
        // finished exchanges): the budget is spent.
        let ca = client().await.unwrap();
        ca.connect(a).await.unwrap();
        let cb = client().await.unwrap();
        cb.connect(b).await.unwrap();
        for _ in 0..2 {
            let _ = ask(&ca, b"a").await;
            let _ = ask(&cb, b"b").await;
        }
        assert_eq!(budget.used(), 2);
        // A newcomer on port b while both flows are in use: dropped.
        let late = client().await.unwrap();
        late.connect(b).await.unwrap();
        late.send(b"late").await.unwrap();
        let mut buf = [0u8; 256];
        assert!(
            tokio::time::timeout(Duration::from_millis(300), late.recv(&mut buf))
                .await
                .is_err(),
            "a third flow opened with a budget of two"
        );
        // Port a's flow stays in use; port b's falls idle: the newcomer
        // takes its place, port a's flow is not touched.
        let end = Instant::now() + IN_USE + Duration::from_millis(500);
        while Instant::now() < end {
            let _ = ask(&ca, b"busy").await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mine = seen_by_endpoint(&ask(&ca, b"a again").await);
        // The evicted flow's share comes back once its socket has closed,
        // a moment later: the first datagram may be dropped, not the next.
        let mut answered = false;
        for _ in 0..5 {
            late.send(b"late again").await.unwrap();
            if tokio::time::timeout(Duration::from_millis(300), late.recv(&mut buf))
                .await
                .is_ok()
            {
                answered = true;
                break;
            }
        }
        assert!(answered, "the newcomer never took the idle flow's place");
        assert_eq!(budget.used(), 2);
        assert_eq!(seen_by_endpoint(&ask(&ca, b"a still").await), mine);
        let text = series.render();
        assert!(
            !text.contains("reason=\"max_flows_total\"} 0"),
            "the dropped datagram is not counted: {text}"
        );
        // Flows give their share back when their listener goes.
        stop.now.cancel();
        let end = Instant::now() + Duration::from_secs(5);
        while budget.used() > 0 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn a_table_full_of_finished_exchanges_takes_new_clients_at_once() {
        let (ep, _server) = who_sent().await;
        let config = UdpConfig {
            timeout: Duration::from_secs(60),
            max_flows: 8,
            ..UdpConfig::default()
        };
        let (proxy, _, _stop) = start(&[ep], config).await;
        // Eight one-shot clients, each answered: the table is full of
        // flows active within the last second, all finished.
        let mut clients = Vec::new();
        for i in 0..8u8 {
            let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            c.connect(proxy).await.unwrap();
            let _ = ask(&c, &[i]).await;
            clients.push(c);
        }
        // Newcomers are answered within 300 ms, long before any flow is
        // idle for a second: each takes the place of a finished exchange
        // (its first datagram may be dropped while the evicted flow's
        // socket closes).
        for i in 0..20u8 {
            let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            c.connect(proxy).await.unwrap();
            let mut answered = false;
            for _ in 0..3 {
                c.send(&[i]).await.unwrap();
                let mut buf = [0u8; 256];
                if tokio::time::timeout(Duration::from_millis(100), c.recv(&mut buf))
                    .await
                    .is_ok()
                {
                    answered = true;
                    break;
                }
            }
            assert!(
                answered,
                "newcomer {i} dropped by a table of finished exchanges"
            );
        }
    }

    #[tokio::test]
    async fn a_full_table_keeps_flows_in_use_and_drops_newcomers() {
        let (ep, _server) = who_sent().await;
        let config = UdpConfig {
            timeout: Duration::from_secs(60),
            max_flows: 8,
            ..UdpConfig::default()
        };
        let (proxy, _, _stop) = start(&[ep], config).await;
        let good = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        good.connect(proxy).await.unwrap();
        let mine = seen_by_endpoint(&ask(&good, b"hello").await);
        // A second exchange: a stream, kept while in use (one answered
        // datagram alone is a finished exchange, closed first for room).
        assert_eq!(seen_by_endpoint(&ask(&good, b"again").await), mine);
        // A flood of 200 client ports, each sending one datagram.
        let mut flood = Vec::new();
        for _ in 0..200 {
            let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            s.send_to(b"flood", proxy).await.unwrap();
            flood.push(s);
            // The well-behaved client keeps talking through it.
            if flood.len() % 20 == 0 {
                assert_eq!(seen_by_endpoint(&ask(&good, b"still").await), mine);
            }
        }
        // After the flood went idle, newcomers get flows again.
        tokio::time::sleep(IN_USE + Duration::from_millis(200)).await;
        let late = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        late.connect(proxy).await.unwrap();
        let _ = ask(&late, b"late").await;
        assert_eq!(seen_by_endpoint(&ask(&good, b"end").await), mine);
    }
}
