//! Endpoint selection for one Service port.
//!
//! The control plane publishes a new [`EndpointSet`] with [`Balancer::update`];
//! the data path reads the current one with a single atomic load (no lock)
//! and picks an endpoint. Per-endpoint open-connection counters survive
//! updates, so least-connections keeps counting connections opened before an
//! endpoint change — also across an update that drops an endpoint and a
//! later one that brings it back (a readiness flap, an endpoint moving
//! between EndpointSlices): its connections stayed open meanwhile.
//!
//! With `sessionAffinity: ClientIP` the balancer also remembers, per client
//! IP, the endpoint the client's last new connection went to ([`Affinity`]):
//! a new connection (or UDP flow) within the timeout of the previous one
//! goes there again and restarts the timeout, as kube-proxy's rules do
//! (iptables: `recent --rcheck --seconds T --reap` in the Service chain,
//! `recent --set` in the endpoint's; nftables: a per-endpoint set with
//! `timeout T`, `update @set { ip saddr }` in the endpoint's chain). Only
//! clients without a live entry are balanced by the algorithm.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::log_limit::LogLimit;

use crate::model::{Algorithm, ForwardedHeaders, PortMode, ProxyProtocol, SessionAffinity};

/// Most client IPs one Service port remembers for session affinity. When
/// a new client finds the table full, expired entries go first, then the
/// sixteenth of the table least recently used. An entry costs about 64
/// bytes with the hash table's slack, so a full table is about 1 MiB.
pub const MAX_AFFINITY_CLIENTS: usize = 16384;

/// Peak-EWMA's guess of a response time not yet measured (Linkerd's
/// default): a new endpoint is neither flooded nor starved before its
/// first answer; the first measurement replaces the guess.
const DEFAULT_RTT_NS: f64 = 30_000_000.0;

/// Peak-EWMA's decay: a measurement loses weight with a time constant of
/// 10 s (Linkerd's default), so a slow endpoint that recovered is tried
/// again within tens of seconds even if nothing is sent to it.
const DECAY_NS: f64 = 10_000_000_000.0;

/// One endpoint and the connections (on request-mode ports, the
/// requests) currently open to it through us.
#[derive(Debug)]
pub struct EndpointStats {
    pub addr: SocketAddr,
    active: AtomicUsize,
    /// Peak-EWMA response time, ns, as `f64` bits; 0: not measured yet.
    rtt: AtomicU64,
    /// When `rtt` was last written, in ns since `born`.
    rtt_at: AtomicU64,
    born: Instant,
    /// Connect failures to this endpoint are logged once per interval.
    connect_log: LogLimit,
}

impl EndpointStats {
    fn new(addr: SocketAddr) -> Self {
        EndpointStats {
            addr,
            active: AtomicUsize::new(0),
            rtt: AtomicU64::new(0),
            rtt_at: AtomicU64::new(0),
            born: Instant::now(),
            connect_log: LogLimit::default(),
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    fn since_born(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.born).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The response-time estimate at `now`, decayed since it was written
    /// (an endpoint nothing is sent to drifts back toward being tried).
    fn rtt_estimate(&self, now: Instant) -> f64 {
        let rtt = f64::from_bits(self.rtt.load(Ordering::Relaxed));
        if rtt == 0.0 {
            return DEFAULT_RTT_NS;
        }
        let elapsed = self
            .since_born(now)
            .saturating_sub(self.rtt_at.load(Ordering::Relaxed)) as f64;
        rtt * (-elapsed / DECAY_NS).exp()
    }

    /// Peak-EWMA's cost: the response-time estimate times the work in
    /// flight (plus the one being placed).
    fn cost(&self, now: Instant) -> f64 {
        self.rtt_estimate(now) * (self.active() + 1) as f64
    }

    /// Folds one response time in: a slower one than the estimate is taken
    /// whole (the peak), a faster one moves the estimate by the weight of
    /// the time since the last. Two concurrent writers may lose one
    /// measurement; the estimate stays a measured value.
    fn observe(&self, rtt: Duration, now: Instant) {
        let sample = rtt.as_nanos() as f64;
        let old = f64::from_bits(self.rtt.load(Ordering::Relaxed));
        let at = self.since_born(now);
        let next = if old == 0.0 || sample > old {
            sample
        } else {
            let elapsed = at.saturating_sub(self.rtt_at.load(Ordering::Relaxed)) as f64;
            let decay = (-elapsed / DECAY_NS).exp();
            old * decay + sample * (1.0 - decay)
        };
        // Never 0: that means "not measured".
        self.rtt.store(next.max(1.0).to_bits(), Ordering::Relaxed);
        self.rtt_at.store(at, Ordering::Relaxed);
    }
}

/// The endpoints new connections may use, as published by the control plane.
#[derive(Debug, Default)]
pub struct EndpointSet {
    endpoints: Box<[Arc<EndpointStats>]>,
    /// Which update published this set (0: the empty set a balancer
    /// starts with). Holders compare generations, never addresses: a set
    /// freed after two updates can be allocated again at the same address,
    /// so an address says nothing about whether the set changed.
    generation: u64,
}

impl EndpointSet {
    /// Which update published this set; a later update has a larger one.
    pub fn generation(&self) -> u64 {
        self.generation
    }
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }
    /// Whether `addr` is one of the endpoints (a linear scan: called once
    /// per flow and endpoint update, not per packet).
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.endpoints.iter().any(|e| e.addr == addr)
    }

    /// The endpoints' addresses, in the order they were published.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.endpoints.iter().map(|e| e.addr)
    }

    /// Each endpoint with its open-connection count (status reports).
    pub fn iter(&self) -> impl Iterator<Item = &EndpointStats> {
        self.endpoints.iter().map(|e| &**e)
    }
}

/// A chosen endpoint; holding it counts as one open connection to it.
#[derive(Debug)]
pub struct Lease {
    stats: Arc<EndpointStats>,
}

impl Lease {
    pub fn addr(&self) -> SocketAddr {
        self.stats.addr
    }

    /// The rate limit of this endpoint's connect-failure lines.
    pub(crate) fn connect_log(&self) -> &LogLimit {
        &self.stats.connect_log
    }

    /// Tells peak-EWMA how long the endpoint took to answer.
    pub fn observe(&self, rtt: Duration) {
        self.stats.observe(rtt, Instant::now());
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One client IP's endpoint under session affinity.
#[derive(Debug)]
struct Sticky {
    /// Always an endpoint of the current set: [`Balancer::update`] drops
    /// the entries of endpoints that leave it.
    endpoint: Arc<EndpointStats>,
    /// Milliseconds since the balancer's epoch at the client's last new
    /// connection.
    last: u64,
}

/// The client IP → endpoint table of `sessionAffinity: ClientIP`.
#[derive(Debug, Default)]
struct Affinity {
    clients: HashMap<IpAddr, Sticky>,
    /// When (ms since the epoch) expired entries are next swept out.
    next_reap: u64,
}

impl Affinity {
    /// Drops entries unused for `timeout` ms or more.
    fn reap(&mut self, now: u64, timeout: u64) {
        self.clients
            .retain(|_, s| now.saturating_sub(s.last) < timeout);
        self.next_reap = now + reap_interval_ms(timeout);
    }

    /// Makes room for one more client: expired entries first, then the
    /// least recently used sixteenth of the table.
    fn make_room(&mut self, now: u64, timeout: u64, max: usize) {
        if self.clients.len() < max {
            return;
        }
        self.reap(now, timeout);
        if self.clients.len() < max {
            return;
        }
        let mut by_age: Vec<(u64, IpAddr)> =
            self.clients.iter().map(|(ip, s)| (s.last, *ip)).collect();
        let n = (max / 16).clamp(1, by_age.len());
        by_age.select_nth_unstable(n - 1);
        for (_, ip) in &by_age[..n] {
            self.clients.remove(ip);
        }
    }
}

/// How often expired affinity entries are swept out: a quarter of the
/// timeout, between 1 s and 10 s.
fn reap_interval_ms(timeout_ms: u64) -> u64 {
    (timeout_ms / 4).clamp(1000, 10_000)
}

/// Picks endpoints for one Service port.
#[derive(Debug)]
pub struct Balancer {
    set: ArcSwap<EndpointSet>,
    /// Woken at every new endpoint set, for those that hold something per
    /// endpoint (request mode's pools close their connections to the
    /// endpoints that left).
    changed: tokio::sync::Notify,
    algorithm: AtomicU8,
    /// [`PortMode`], encoded.
    mode: AtomicU8,
    /// The PROXY protocol header each connection to an endpoint starts
    /// with: 0 none, 1 v1, 2 v2.
    proxy_protocol: AtomicU8,
    /// [`ForwardedHeaders`] of request mode: 0 off, 1 replace, 2 append.
    forwarded: AtomicU8,
    /// `sessionAffinity: ClientIP`'s timeout in ms; 0: no affinity (the
    /// data path then takes no lock).
    affinity_timeout: AtomicU64,
    /// Client IP → endpoint, under affinity. [`Balancer::update`] publishes
    /// a new set while holding this lock, and a pick under affinity loads
    /// the set while holding it: an entry can never be written for an
    /// endpoint that has just left.
    affinity: Mutex<Affinity>,
    /// Clients in `affinity`, readable without its lock (metrics, status).
    affinity_clients: AtomicUsize,
    /// Most entries of `affinity` ([`MAX_AFFINITY_CLIENTS`]; smaller in
    /// tests).
    affinity_max: usize,
    /// Time zero of the affinity entries' timestamps.
    epoch: Instant,
    /// Round-robin position, and the starting point of least-connections'
    /// scan so that ties rotate instead of always hitting the first endpoint.
    next: AtomicUsize,
    /// The generation of the last set published (see
    /// [`EndpointSet::generation`]); written under the `departed` lock.
    generation: AtomicU64,
    /// Counters of endpoints that left the set while connections to them
    /// were still open (their leases hold the counter). If the endpoint
    /// comes back, it takes its counter back instead of starting at 0.
    /// Touched by the control plane only ([`Balancer::update`]); an entry
    /// goes once its last lease is gone.
    departed: Mutex<HashMap<SocketAddr, Weak<EndpointStats>>>,
    /// Clients reset because every attempt failed are logged once per
    /// interval for the Service port (a dead Service at 10 000 connections
    /// per second would write as many lines).
    failover_log: LogLimit,
    /// The endpoints connected to from the client's own address (on this
    /// node, for a port that preserves client IPs), as last published;
    /// usually none. Apart from the set: it changes with the annotation
    /// and the policies, not with the endpoints' counters.
    transparent: ArcSwap<Vec<SocketAddr>>,
}

fn encode(a: Algorithm) -> u8 {
    match a {
        Algorithm::RoundRobin => 0,
        Algorithm::LeastConnections => 1,
        Algorithm::PeakEwma => 2,
    }
}

fn encode_mode(m: PortMode) -> u8 {
    match m {
        PortMode::Connection => 0,
        PortMode::Http1 => 1,
        PortMode::Http2 => 2,
    }
}

impl Balancer {
    /// A balancer with no endpoints. The round-robin start is random, so that
    /// proxies on many nodes do not all send their first connection to the
    /// same endpoint.
    pub fn new(algorithm: Algorithm) -> Self {
        let start = RandomState::new().hash_one(std::process::id()) as usize;
        Balancer {
            set: ArcSwap::from_pointee(EndpointSet::default()),
            changed: tokio::sync::Notify::new(),
            algorithm: AtomicU8::new(encode(algorithm)),
            mode: AtomicU8::new(0),
            proxy_protocol: AtomicU8::new(0),
            forwarded: AtomicU8::new(0),
            affinity_timeout: AtomicU64::new(0),
            affinity: Mutex::new(Affinity::default()),
            affinity_clients: AtomicUsize::new(0),
            affinity_max: MAX_AFFINITY_CLIENTS,
            epoch: Instant::now(),
            next: AtomicUsize::new(start),
            generation: AtomicU64::new(0),
            departed: Mutex::new(HashMap::new()),
            failover_log: LogLimit::default(),
            transparent: ArcSwap::from_pointee(Vec::new()),
        }
    }

    /// Publishes the endpoints to connect to from the client's own address
    /// (control plane); connections already open are not touched.
    pub fn set_transparent(&self, endpoints: &[SocketAddr]) {
        self.transparent.store(Arc::new(endpoints.to_vec()));
    }

    /// The endpoints connected to from the client's own address.
    pub fn transparent(&self) -> Arc<Vec<SocketAddr>> {
        self.transparent.load_full()
    }

    /// Whether a connection to `endpoint` should come from the client's
    /// own address (one atomic load; a scan of a list that is empty on
    /// most ports and short on the rest).
    pub fn is_transparent(&self, endpoint: SocketAddr) -> bool {
        self.transparent.load().contains(&endpoint)
    }

    pub fn algorithm(&self) -> Algorithm {
        match self.algorithm.load(Ordering::Relaxed) {
            1 => Algorithm::LeastConnections,
            2 => Algorithm::PeakEwma,
            _ => Algorithm::RoundRobin,
        }
    }

    /// Per connection or per request, as last published; read by the
    /// accept loop for each new connection, so a change applies to the
    /// connections that follow it.
    pub fn mode(&self) -> PortMode {
        match self.mode.load(Ordering::Relaxed) {
            1 => PortMode::Http1,
            2 => PortMode::Http2,
            _ => PortMode::Connection,
        }
    }

    /// Publishes the port's mode (control plane).
    pub fn set_mode(&self, mode: PortMode) {
        self.mode.store(encode_mode(mode), Ordering::Relaxed);
    }

    /// The PROXY protocol header to send first on each new connection to
    /// an endpoint, as last published; read at each accepted connection.
    pub fn proxy_protocol(&self) -> Option<ProxyProtocol> {
        match self.proxy_protocol.load(Ordering::Relaxed) {
            1 => Some(ProxyProtocol::V1),
            2 => Some(ProxyProtocol::V2),
            _ => None,
        }
    }

    /// Publishes the port's PROXY protocol (control plane).
    pub fn set_proxy_protocol(&self, version: Option<ProxyProtocol>) {
        let v = match version {
            None => 0,
            Some(ProxyProtocol::V1) => 1,
            Some(ProxyProtocol::V2) => 2,
        };
        self.proxy_protocol.store(v, Ordering::Relaxed);
    }

    /// The forwarded headers of request mode, as last published; read at
    /// each request-mode connection.
    pub fn forwarded_headers(&self) -> ForwardedHeaders {
        match self.forwarded.load(Ordering::Relaxed) {
            1 => ForwardedHeaders::Replace,
            2 => ForwardedHeaders::Append,
            _ => ForwardedHeaders::Off,
        }
    }

    /// Publishes the port's forwarded headers (control plane).
    pub fn set_forwarded_headers(&self, f: ForwardedHeaders) {
        let v = match f {
            ForwardedHeaders::Off => 0,
            ForwardedHeaders::Replace => 1,
            ForwardedHeaders::Append => 2,
        };
        self.forwarded.store(v, Ordering::Relaxed);
    }

    /// The rate limit of this Service port's "no endpoint accepted" lines.
    pub(crate) fn failover_log(&self) -> &LogLimit {
        &self.failover_log
    }

    /// Notified after every [`Balancer::update`]: create the `Notified`
    /// (and `enable` it) before reading [`Balancer::endpoints`], so that
    /// an update in between is not missed.
    pub fn changed(&self) -> &tokio::sync::Notify {
        &self.changed
    }

    pub fn endpoints(&self) -> Arc<EndpointSet> {
        self.set.load_full()
    }

    /// The Service's session affinity, as last published.
    pub fn session_affinity(&self) -> SessionAffinity {
        match self.affinity_timeout.load(Ordering::Relaxed) {
            0 => SessionAffinity::None,
            ms => SessionAffinity::ClientIp {
                timeout: Duration::from_millis(ms),
            },
        }
    }

    /// Client IPs remembered for session affinity now (expired entries
    /// included until the next sweep).
    pub fn affinity_clients(&self) -> usize {
        self.affinity_clients.load(Ordering::Relaxed)
    }

    fn affinity(&self) -> MutexGuard<'_, Affinity> {
        // A poisoned lock only means a holder panicked; the table holds
        // nothing that can be half-written.
        self.affinity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn now_ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// Publishes a new endpoint list (control plane). Endpoints that stay,
    /// or come back while connections to them are open, keep their
    /// counters; connections already open are not touched.
    ///
    /// Session affinity: the clients of an endpoint that leaves the list
    /// are forgotten (their next connection is balanced again, and stays
    /// on its new endpoint); turning affinity off forgets every client, so
    /// turning it back on starts afresh; a new timeout applies to the
    /// clients already remembered.
    pub fn update(&self, addrs: &[SocketAddr], algorithm: Algorithm, affinity: SessionAffinity) {
        self.algorithm.store(encode(algorithm), Ordering::Relaxed);
        // A poisoned lock only means an earlier update panicked; the map
        // holds nothing that can be half-written.
        let mut departed = self
            .departed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut sticky = self.affinity();
        let timeout_ms = match affinity {
            SessionAffinity::None => 0,
            // At least 1 ms: 0 means off.
            SessionAffinity::ClientIp { timeout } => u64::try_from(timeout.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
        };
        self.affinity_timeout.store(timeout_ms, Ordering::Relaxed);
        let current = self.set.load();
        let old: HashMap<SocketAddr, &Arc<EndpointStats>> =
            current.endpoints.iter().map(|e| (e.addr, e)).collect();
        let endpoints: Box<[Arc<EndpointStats>]> = addrs
            .iter()
            .map(|a| {
                old.get(a)
                    .map(|e| Arc::clone(e))
                    .or_else(|| departed.remove(a).and_then(|w| w.upgrade()))
                    .unwrap_or_else(|| Arc::new(EndpointStats::new(*a)))
            })
            .collect();
        let staying: HashSet<SocketAddr> = addrs.iter().copied().collect();
        for gone in current
            .endpoints
            .iter()
            .filter(|e| !staying.contains(&e.addr))
        {
            departed.insert(gone.addr, Arc::downgrade(gone));
        }
        drop(current);
        // Updates are serialised by the `departed` lock.
        let generation = self.generation.load(Ordering::Relaxed) + 1;
        self.generation.store(generation, Ordering::Relaxed);
        self.set.store(Arc::new(EndpointSet {
            endpoints,
            generation,
        }));
        self.changed.notify_waiters();
        if timeout_ms == 0 {
            sticky.clients = HashMap::new();
        } else {
            sticky
                .clients
                .retain(|_, s| staying.contains(&s.endpoint.addr));
        }
        self.affinity_clients
            .store(sticky.clients.len(), Ordering::Relaxed);
        drop(sticky);
        // Forget the departed whose connections have all ended (a pick that
        // still holds the old set keeps one alive until the next update).
        departed.retain(|_, w| w.strong_count() > 0);
    }

    /// Sweeps out affinity entries unused for the timeout, if a sweep is
    /// due (see [`Balancer::affinity_reap_interval`]); returns the clients
    /// remembered. The listener's task calls it periodically, so that the
    /// table of an idle Service port empties too.
    pub fn reap_affinity(&self) -> usize {
        self.reap_affinity_at(Instant::now())
    }

    fn reap_affinity_at(&self, now: Instant) -> usize {
        let timeout = self.affinity_timeout.load(Ordering::Relaxed);
        if timeout == 0 {
            return self.affinity_clients();
        }
        let now = self.now_ms(now);
        let mut sticky = self.affinity();
        if now >= sticky.next_reap {
            sticky.reap(now, timeout);
            self.affinity_clients
                .store(sticky.clients.len(), Ordering::Relaxed);
        }
        sticky.clients.len()
    }

    /// How often [`Balancer::reap_affinity`] should be called: a quarter of
    /// the affinity timeout, between 1 s and 10 s; 10 s without affinity.
    pub fn affinity_reap_interval(&self) -> Duration {
        match self.affinity_timeout.load(Ordering::Relaxed) {
            0 => Duration::from_secs(10),
            ms => Duration::from_millis(reap_interval_ms(ms)),
        }
    }

    /// Picks an endpoint for a new connection from `client`, avoiding those
    /// in `tried` while any other is left. `None` when there are no
    /// endpoints.
    ///
    /// Under session affinity, the endpoint the client's last connection
    /// went to, if that was within the timeout and it is not in `tried`;
    /// otherwise the algorithm's choice. Either way the client is
    /// remembered with the endpoint returned, as of now.
    pub fn pick(&self, client: IpAddr, tried: &[SocketAddr]) -> Option<Lease> {
        self.pick_at(client, tried, Instant::now())
    }

    fn pick_at(&self, client: IpAddr, tried: &[SocketAddr], now: Instant) -> Option<Lease> {
        let timeout = self.affinity_timeout.load(Ordering::Relaxed);
        if timeout == 0 {
            return self.choose(&self.set.load(), tried);
        }
        let now = self.now_ms(now);
        let mut sticky = self.affinity();
        // Loaded under the lock: see `affinity`.
        let set = self.set.load();
        if let Some(s) = sticky.clients.get_mut(&client)
            && now.saturating_sub(s.last) < timeout
            && !tried.contains(&s.endpoint.addr)
        {
            s.last = now;
            let endpoint = Arc::clone(&s.endpoint);
            endpoint.active.fetch_add(1, Ordering::Relaxed);
            return Some(Lease { stats: endpoint });
        }
        let lease = self.choose(&set, tried)?;
        if now >= sticky.next_reap {
            sticky.reap(now, timeout);
        }
        if !sticky.clients.contains_key(&client) {
            sticky.make_room(now, timeout, self.affinity_max);
        }
        sticky.clients.insert(
            client,
            Sticky {
                endpoint: Arc::clone(&lease.stats),
                last: now,
            },
        );
        self.affinity_clients
            .store(sticky.clients.len(), Ordering::Relaxed);
        Some(lease)
    }

    /// The algorithm's choice among `set`, avoiding `tried` while another
    /// endpoint is left.
    fn choose(&self, set: &EndpointSet, tried: &[SocketAddr]) -> Option<Lease> {
        let eps = &set.endpoints;
        if eps.is_empty() {
            return None;
        }
        let n = eps.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let candidates = || {
            (0..n)
                .map(move |i| &eps[(start + i) % n])
                .filter(|e| !tried.contains(&e.addr))
        };
        let chosen = match self.algorithm() {
            Algorithm::RoundRobin => candidates().next(),
            // min_by_key keeps the first minimum, and the scan starts at a
            // rotating offset: ties are broken fairly.
            Algorithm::LeastConnections => candidates().min_by_key(|e| e.active()),
            Algorithm::PeakEwma => self.two_choices(eps, tried, start),
        }
        .unwrap_or(&eps[start]);
        chosen.active.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            stats: Arc::clone(chosen),
        })
    }

    /// Power of two choices: two different endpoints not in `tried`, the
    /// one of lower peak-EWMA cost. The first is `start`'s candidate (the
    /// rotating position), the second a pseudo-random other one, so that
    /// every pair comes up without a random-number generator per pick.
    fn two_choices<'a>(
        &self,
        eps: &'a [Arc<EndpointStats>],
        tried: &[SocketAddr],
        start: usize,
    ) -> Option<&'a Arc<EndpointStats>> {
        let n = eps.len();
        // The endpoints not tried, from the rotating position (no
        // allocation: this runs for every request).
        let open = || {
            (0..n)
                .map(move |i| (start + i) % n)
                .filter(|i| !tried.contains(&eps[*i].addr))
        };
        let first = open().next()?;
        let count = open().count();
        if count == 1 {
            return Some(&eps[first]);
        }
        // A multiplicative hash of the rotating counter: another
        // candidate, spread over the rest of the open ones.
        let mix = (start as u64 ^ self.generation.load(Ordering::Relaxed))
            .wrapping_add(self.next.load(Ordering::Relaxed) as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let second = open().nth(1 + (mix >> 33) as usize % (count - 1))?;
        let now = Instant::now();
        let (a, b) = (&eps[first], &eps[second]);
        Some(if b.cost(now) < a.cost(now) { b } else { a })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 200, 0, 2));

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
            .collect()
    }

    #[test]
    fn round_robin_spreads_evenly() {
        let b = Balancer::new(Algorithm::RoundRobin);
        b.update(&addrs(3), Algorithm::RoundRobin, SessionAffinity::None);
        let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
        for _ in 0..30 {
            let l = b.pick(CLIENT, &[]).unwrap();
            *counts.entry(l.addr()).or_default() += 1;
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|c| *c == 10), "{counts:?}");
    }

    /// Peak-EWMA: an endpoint that answers in 50 ms while the others
    /// answer in 1 ms gets a small share; round-robin gives it a third.
    #[test]
    fn peak_ewma_steers_around_a_slow_endpoint() {
        let share_of_slow = |algorithm: Algorithm| {
            let b = Balancer::new(algorithm);
            b.update(&addrs(3), algorithm, SessionAffinity::None);
            let slow = addrs(3)[1];
            let mut to_slow = 0;
            for _ in 0..300 {
                let l = b.pick(CLIENT, &[]).unwrap();
                if l.addr() == slow {
                    to_slow += 1;
                    l.observe(Duration::from_millis(50));
                } else {
                    l.observe(Duration::from_millis(1));
                }
            }
            to_slow
        };
        let rr = share_of_slow(Algorithm::RoundRobin);
        let ewma = share_of_slow(Algorithm::PeakEwma);
        assert_eq!(rr, 100);
        assert!(
            ewma < 15,
            "peak-ewma sent {ewma} of 300 to the slow endpoint"
        );
    }

    /// Requests in flight weigh too: with equal response times, the
    /// endpoint holding the most outstanding requests is avoided.
    #[test]
    fn peak_ewma_weighs_requests_in_flight() {
        let b = Balancer::new(Algorithm::PeakEwma);
        b.update(&addrs(2), Algorithm::PeakEwma, SessionAffinity::None);
        let mut held = Vec::new();
        for _ in 0..20 {
            held.push(b.pick(CLIENT, &[]).unwrap());
        }
        let on_first = held.iter().filter(|l| l.addr() == addrs(2)[0]).count();
        assert!(
            (8..=12).contains(&on_first),
            "{on_first} of 20 on the first endpoint"
        );
    }

    #[test]
    fn least_connections_prefers_the_idle_endpoint() {
        let b = Balancer::new(Algorithm::LeastConnections);
        b.update(
            &addrs(2),
            Algorithm::LeastConnections,
            SessionAffinity::None,
        );
        let held: Vec<Lease> = (0..4).map(|_| b.pick(CLIENT, &[]).unwrap()).collect();
        // Ties rotate: 2 and 2.
        let on_first = held.iter().filter(|l| l.addr() == addrs(2)[0]).count();
        assert_eq!(on_first, 2);
        // Release both connections on the first endpoint: the next two new
        // connections must go there.
        let mut held: Vec<Lease> = held
            .into_iter()
            .filter(|l| l.addr() != addrs(2)[0])
            .collect();
        for _ in 0..2 {
            let l = b.pick(CLIENT, &[]).unwrap();
            assert_eq!(l.addr(), addrs(2)[0]);
            held.push(l);
        }
    }

    #[test]
    fn counters_survive_updates_and_leases_release() {
        let b = Balancer::new(Algorithm::LeastConnections);
        b.update(
            &addrs(2),
            Algorithm::LeastConnections,
            SessionAffinity::None,
        );
        let l1 = b.pick(CLIENT, &[]).unwrap();
        let busy = l1.addr();
        // Same endpoints plus a new one: the busy one keeps its count.
        b.update(
            &addrs(3),
            Algorithm::LeastConnections,
            SessionAffinity::None,
        );
        let set = b.endpoints();
        let stat = set.endpoints.iter().find(|e| e.addr == busy).unwrap();
        assert_eq!(stat.active(), 1);
        drop(l1);
        assert_eq!(stat.active(), 0);
    }

    #[test]
    fn least_connections_keeps_counting_an_endpoint_that_leaves_and_comes_back() {
        // A readiness flap (or an endpoint moving between slices): A leaves
        // the set for one update and comes back, while two connections to
        // it stay open. They must still count.
        let b = Balancer::new(Algorithm::LeastConnections);
        let [a, other] = [addrs(2)[0], addrs(2)[1]];
        b.update(
            &[a, other],
            Algorithm::LeastConnections,
            SessionAffinity::None,
        );
        let held: Vec<Lease> = (0..2).map(|_| b.pick(CLIENT, &[other]).unwrap()).collect();
        assert!(held.iter().all(|l| l.addr() == a));
        b.update(&[other], Algorithm::LeastConnections, SessionAffinity::None);
        b.update(
            &[a, other],
            Algorithm::LeastConnections,
            SessionAffinity::None,
        );
        let set = b.endpoints();
        let stat = set.endpoints.iter().find(|e| e.addr == a).unwrap();
        assert_eq!(stat.active(), 2, "A's open connections were forgotten");
        // So both new connections go to the other endpoint (0, then 1 < 2).
        for i in 0..2 {
            let l = b.pick(CLIENT, &[]).unwrap();
            assert_eq!(l.addr(), other, "new connection {i}");
            std::mem::forget(l);
        }
        drop(held);
        assert_eq!(stat.active(), 0);
        // Once nothing holds it, a departed endpoint is forgotten.
        drop(set);
        b.update(&[other], Algorithm::LeastConnections, SessionAffinity::None);
        assert!(b.departed.lock().unwrap().is_empty());
    }

    #[test]
    fn pick_avoids_tried_endpoints_while_others_remain() {
        let b = Balancer::new(Algorithm::RoundRobin);
        b.update(&addrs(2), Algorithm::RoundRobin, SessionAffinity::None);
        let all = addrs(2);
        for _ in 0..5 {
            assert_eq!(b.pick(CLIENT, &all[..1]).unwrap().addr(), all[1]);
        }
        // Every endpoint tried: still returns one rather than none.
        assert!(b.pick(CLIENT, &all).is_some());
        b.update(&[], Algorithm::RoundRobin, SessionAffinity::None);
        assert!(b.pick(CLIENT, &[]).is_none());
    }

    // Session affinity. Time is injected: `at(b, s)` is `s` seconds after
    // the balancer's epoch.

    fn at(b: &Balancer, secs: f64) -> Instant {
        b.epoch + Duration::from_secs_f64(secs)
    }

    fn client(i: u8) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::new(10, 200, 0, i))
    }

    fn sticky(secs: u64) -> SessionAffinity {
        SessionAffinity::ClientIp {
            timeout: Duration::from_secs(secs),
        }
    }

    /// The endpoint `client` gets at `secs` (the lease is released).
    fn pick_at(b: &Balancer, client: IpAddr, secs: f64) -> SocketAddr {
        b.pick_at(client, &[], at(b, secs)).unwrap().addr()
    }

    #[test]
    fn affinity_keeps_each_client_on_its_endpoint_and_new_clients_are_balanced() {
        let b = Balancer::new(Algorithm::RoundRobin);
        b.update(&addrs(3), Algorithm::RoundRobin, sticky(10800));
        let first: Vec<SocketAddr> = (1..=3).map(|c| pick_at(&b, client(c), 0.0)).collect();
        // Three new clients, round-robin: three endpoints.
        let distinct: HashSet<&SocketAddr> = first.iter().collect();
        assert_eq!(distinct.len(), 3, "{first:?}");
        for i in 0..20 {
            for c in 1..=3u8 {
                assert_eq!(
                    pick_at(&b, client(c), f64::from(i)),
                    first[usize::from(c) - 1],
                    "client {c}, connection {i}"
                );
            }
        }
        assert_eq!(b.affinity_clients(), 3);
        // Without affinity the same client is spread.
        b.update(&addrs(3), Algorithm::RoundRobin, SessionAffinity::None);
        let spread: HashSet<SocketAddr> = (0..3)
            .map(|i| pick_at(&b, client(1), 30.0 + f64::from(i)))
            .collect();
        assert_eq!(spread.len(), 3);
    }

    #[test]
    fn affinity_comes_before_least_connections_and_is_refreshed_by_each_new_connection() {
        // Least-connections would send every new connection to the idle
        // endpoint; affinity keeps the client where it is while its
        // connections come less than the timeout apart.
        let b = Balancer::new(Algorithm::LeastConnections);
        b.update(&addrs(2), Algorithm::LeastConnections, sticky(10));
        let c = client(1);
        let mut held = vec![b.pick_at(c, &[], at(&b, 0.0)).unwrap()];
        let home = held[0].addr();
        for t in [9.0, 18.0, 27.999] {
            let l = b.pick_at(c, &[], at(&b, t)).unwrap();
            assert_eq!(
                l.addr(),
                home,
                "at {t} s (the last connection was < 10 s before)"
            );
            held.push(l);
        }
        // 10 s after the last new connection (the open ones do not count,
        // as in kube-proxy): expired, balanced again, to the idle endpoint.
        let l = b.pick_at(c, &[], at(&b, 37.999)).unwrap();
        assert_ne!(l.addr(), home, "the entry did not expire");
        // ... and the client stays there.
        let other = l.addr();
        held.push(l);
        assert_eq!(pick_at(&b, c, 40.0), other);
    }

    #[test]
    fn affinity_expires_exactly_at_the_timeout() {
        let b = Balancer::new(Algorithm::RoundRobin);
        b.update(&addrs(2), Algorithm::RoundRobin, sticky(2));
        let c = client(1);
        let home = pick_at(&b, c, 0.0);
        assert_eq!(pick_at(&b, c, 1.999), home);
        // 2 s after 1.999: rebalanced; round-robin's next is the other one.
        assert_ne!(pick_at(&b, c, 3.999), home);
    }

    #[test]
    fn clients_of_an_endpoint_that_leaves_are_balanced_again_and_stay_on_their_new_endpoint() {
        let b = Balancer::new(Algorithm::RoundRobin);
        let all = addrs(3);
        b.update(&all, Algorithm::RoundRobin, sticky(10800));
        let c = client(1);
        let home = pick_at(&b, c, 0.0);
        let rest: Vec<SocketAddr> = all.iter().copied().filter(|a| *a != home).collect();
        // The endpoint leaves (deleted, or no longer ready: the reconciler
        // publishes usable endpoints only).
        b.update(&rest, Algorithm::RoundRobin, sticky(10800));
        assert_eq!(b.affinity_clients(), 0, "its client was not released");
        let moved = pick_at(&b, c, 1.0);
        assert_ne!(moved, home);
        // It comes back: the client stays where it moved.
        b.update(&all, Algorithm::RoundRobin, sticky(10800));
        for t in 2..10 {
            assert_eq!(pick_at(&b, c, f64::from(t)), moved);
        }
        // Endpoints that stay keep their clients across updates.
        b.update(&all[..], Algorithm::LeastConnections, sticky(10800));
        assert_eq!(pick_at(&b, c, 11.0), moved);
    }

    #[test]
    fn affinity_off_forgets_every_client_and_a_new_timeout_applies_to_those_remembered() {
        let b = Balancer::new(Algorithm::RoundRobin);
        b.update(&addrs(3), Algorithm::RoundRobin, sticky(10800));
        for c in 1..=5 {
            pick_at(&b, client(c), 0.0);
        }
        assert_eq!(b.affinity_clients(), 5);
        b.update(&addrs(3), Algorithm::RoundRobin, SessionAffinity::None);
        assert_eq!(b.affinity_clients(), 0);
        assert_eq!(b.session_affinity(), SessionAffinity::None);
        // On again: clients start afresh.
        b.update(&addrs(3), Algorithm::RoundRobin, sticky(10800));
        let home = pick_at(&b, client(1), 1.0);
        assert_eq!(pick_at(&b, client(1), 2.0), home);
        // The timeout shrinks to 2 s: the entry, 1 s old, lives 1 s more.
        b.update(&addrs(3), Algorithm::RoundRobin, sticky(2));
        assert_eq!(b.session_affinity(), sticky(2));
        assert_eq!(pick_at(&b, client(1), 3.5), home);
        assert_ne!(pick_at(&b, client(1), 5.5), home);
    }

    #[test]
    fn a_failed_endpoint_moves_the_client_to_the_one_that_answered() {
        // Connect failover: the client's endpoint is in `tried`; the next
        // pick goes elsewhere and the client is remembered there.
        let b = Balancer::new(Algorithm::RoundRobin);
        b.update(&addrs(2), Algorithm::RoundRobin, sticky(10800));
        let c = client(1);
        let home = pick_at(&b, c, 0.0);
        let other = b.pick_at(c, &[home], at(&b, 1.0)).unwrap().addr();
        assert_ne!(other, home);
        assert_eq!(pick_at(&b, c, 2.0), other);
    }

    #[test]
    fn the_affinity_table_is_bounded_and_evicts_the_least_recently_used() {
        let mut b = Balancer::new(Algorithm::RoundRobin);
        b.affinity_max = 32;
        b.update(&addrs(2), Algorithm::RoundRobin, sticky(10800));
        let many = |i: u32| IpAddr::V4(std::net::Ipv4Addr::from(0x0a01_0000 + i));
        for i in 0..32 {
            pick_at(&b, many(i), f64::from(i));
        }
        // Client 0 comes back: now the most recently used.
        let zero = pick_at(&b, many(0), 40.0);
        // Client 32 finds the table full: the least recently used sixteenth
        // (2 entries: clients 1 and 2) make room.
        pick_at(&b, many(32), 41.0);
        assert_eq!(b.affinity_clients(), 31);
        let kept: HashSet<IpAddr> = b.affinity().clients.keys().copied().collect();
        assert!(kept.contains(&many(0)) && kept.contains(&many(32)));
        assert!(!kept.contains(&many(1)) && !kept.contains(&many(2)));
        assert_eq!(pick_at(&b, many(0), 42.0), zero);
        // A flood of 10 000 new clients: never more than the cap.
        for i in 100..10_100 {
            pick_at(&b, many(i), 50.0);
            assert!(b.affinity_clients() <= 32);
        }
    }

    #[test]
    fn expired_clients_are_swept_out_periodically_and_before_evicting_live_ones() {
        let mut b = Balancer::new(Algorithm::RoundRobin);
        b.affinity_max = 8;
        b.update(&addrs(2), Algorithm::RoundRobin, sticky(2));
        assert_eq!(b.affinity_reap_interval(), Duration::from_secs(1));
        for c in 1..=4 {
            pick_at(&b, client(c), 0.0);
        }
        // A sweep before the entries expire keeps them; after, drops them.
        assert_eq!(b.reap_affinity_at(at(&b, 1.5)), 4);
        assert_eq!(b.reap_affinity_at(at(&b, 2.6)), 0);
        assert_eq!(b.affinity_clients(), 0);
        // A full table with expired entries not swept yet: they make room,
        // not a live one. (Swept at 20.0 and 21.5, next at 22.5.)
        for c in 1..=4 {
            pick_at(&b, client(c), 20.0);
        }
        for c in 5..=7 {
            pick_at(&b, client(c), 21.5);
        }
        pick_at(&b, client(8), 22.1);
        assert_eq!(b.affinity_clients(), 8);
        pick_at(&b, client(9), 22.2);
        let kept: Vec<IpAddr> = {
            let mut k: Vec<IpAddr> = b.affinity().clients.keys().copied().collect();
            k.sort();
            k
        };
        assert_eq!(kept, (5..=9).map(client).collect::<Vec<_>>());
    }
}
