//! Endpoint selection for one Service port.
//!
//! The control plane publishes a new [`EndpointSet`] with [`Balancer::update`];
//! the data path reads the current one with a single atomic load (no lock)
//! and picks an endpoint. Per-endpoint open-connection counters survive
//! updates, so least-connections keeps counting connections opened before an
//! endpoint change — also across an update that drops an endpoint and a
//! later one that brings it back (a readiness flap, an endpoint moving
//! between EndpointSlices): its connections stayed open meanwhile.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;

use super::log_limit::LogLimit;

use crate::model::Algorithm;

/// One endpoint and the connections currently open to it through us.
#[derive(Debug)]
pub struct EndpointStats {
    pub addr: SocketAddr,
    active: AtomicUsize,
    /// Connect failures to this endpoint are logged once per interval.
    connect_log: LogLimit,
}

impl EndpointStats {
    fn new(addr: SocketAddr) -> Self {
        EndpointStats {
            addr,
            active: AtomicUsize::new(0),
            connect_log: LogLimit::default(),
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// The endpoints new connections may use, as published by the control plane.
#[derive(Debug, Default)]
pub struct EndpointSet {
    endpoints: Box<[Arc<EndpointStats>]>,
}

impl EndpointSet {
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
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Picks endpoints for one Service port.
#[derive(Debug)]
pub struct Balancer {
    set: ArcSwap<EndpointSet>,
    algorithm: AtomicU8,
    /// Round-robin position, and the starting point of least-connections'
    /// scan so that ties rotate instead of always hitting the first endpoint.
    next: AtomicUsize,
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
}

fn encode(a: Algorithm) -> u8 {
    match a {
        Algorithm::RoundRobin => 0,
        Algorithm::LeastConnections => 1,
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
            algorithm: AtomicU8::new(encode(algorithm)),
            next: AtomicUsize::new(start),
            departed: Mutex::new(HashMap::new()),
            failover_log: LogLimit::default(),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        match self.algorithm.load(Ordering::Relaxed) {
            1 => Algorithm::LeastConnections,
            _ => Algorithm::RoundRobin,
        }
    }

    /// The rate limit of this Service port's "no endpoint accepted" lines.
    pub(crate) fn failover_log(&self) -> &LogLimit {
        &self.failover_log
    }

    pub fn endpoints(&self) -> Arc<EndpointSet> {
        self.set.load_full()
    }

    /// Publishes a new endpoint list (control plane). Endpoints that stay,
    /// or come back while connections to them are open, keep their
    /// counters; connections already open are not touched.
    pub fn update(&self, addrs: &[SocketAddr], algorithm: Algorithm) {
        self.algorithm.store(encode(algorithm), Ordering::Relaxed);
        // A poisoned lock only means an earlier update panicked; the map
        // holds nothing that can be half-written.
        let mut departed = self
            .departed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
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
        self.set.store(Arc::new(EndpointSet { endpoints }));
        // Forget the departed whose connections have all ended (a pick that
        // still holds the old set keeps one alive until the next update).
        departed.retain(|_, w| w.strong_count() > 0);
    }

    /// Picks an endpoint for a new connection, avoiding those in `tried`
    /// while any other is left. `None` when there are no endpoints.
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<Lease> {
        let set = self.set.load();
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
        }
        .unwrap_or(&eps[start]);
        chosen.active.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            stats: Arc::clone(chosen),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
            .collect()
    }

    #[test]
    fn round_robin_spreads_evenly() {
        let b = Balancer::new(Algorithm::RoundRobin);
        b.update(&addrs(3), Algorithm::RoundRobin);
        let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
        for _ in 0..30 {
            let l = b.pick(&[]).unwrap();
            *counts.entry(l.addr()).or_default() += 1;
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|c| *c == 10), "{counts:?}");
    }

    #[test]
    fn least_connections_prefers_the_idle_endpoint() {
        let b = Balancer::new(Algorithm::LeastConnections);
        b.update(&addrs(2), Algorithm::LeastConnections);
        let held: Vec<Lease> = (0..4).map(|_| b.pick(&[]).unwrap()).collect();
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
            let l = b.pick(&[]).unwrap();
            assert_eq!(l.addr(), addrs(2)[0]);
            held.push(l);
        }
    }

    #[test]
    fn counters_survive_updates_and_leases_release() {
        let b = Balancer::new(Algorithm::LeastConnections);
        b.update(&addrs(2), Algorithm::LeastConnections);
        let l1 = b.pick(&[]).unwrap();
        let busy = l1.addr();
        // Same endpoints plus a new one: the busy one keeps its count.
        b.update(&addrs(3), Algorithm::LeastConnections);
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
        b.update(&[a, other], Algorithm::LeastConnections);
        let held: Vec<Lease> = (0..2).map(|_| b.pick(&[other]).unwrap()).collect();
        assert!(held.iter().all(|l| l.addr() == a));
        b.update(&[other], Algorithm::LeastConnections);
        b.update(&[a, other], Algorithm::LeastConnections);
        let set = b.endpoints();
        let stat = set.endpoints.iter().find(|e| e.addr == a).unwrap();
        assert_eq!(stat.active(), 2, "A's open connections were forgotten");
        // So both new connections go to the other endpoint (0, then 1 < 2).
        for i in 0..2 {
            let l = b.pick(&[]).unwrap();
            assert_eq!(l.addr(), other, "new connection {i}");
            std::mem::forget(l);
        }
        drop(held);
        assert_eq!(stat.active(), 0);
        // Once nothing holds it, a departed endpoint is forgotten.
        drop(set);
        b.update(&[other], Algorithm::LeastConnections);
        assert!(b.departed.lock().unwrap().is_empty());
    }

    #[test]
    fn pick_avoids_tried_endpoints_while_others_remain() {
        let b = Balancer::new(Algorithm::RoundRobin);
        b.update(&addrs(2), Algorithm::RoundRobin);
        let all = addrs(2);
        for _ in 0..5 {
            assert_eq!(b.pick(&all[..1]).unwrap().addr(), all[1]);
        }
        // Every endpoint tried: still returns one rather than none.
        assert!(b.pick(&all).is_some());
        b.update(&[], Algorithm::RoundRobin);
        assert!(b.pick(&[]).is_none());
    }
}
