//! Flushing the conntrack entries that point at a retired UDP listener,
//! through ctnetlink (`NETLINK_NETFILTER`, subsystem `CTNETLINK`).
//!
//! Why: a UDP client's first datagram to a Service address creates a
//! conntrack entry that DNATs `client → Service address:port` to
//! `proxy address:proxy port`, and every later datagram of that client
//! address follows the entry, not the rules. When the Service port's
//! listener is retired (the Service deleted and added again, a port
//! renamed, its protocol or traffic policies changed) the rules point at a
//! new listener on another proxy port, but a client that keeps its source
//! port and keeps sending renews the old entry (UDP has no end to see) and
//! is sent to a port nobody listens on, for as long as it sends. An
//! endpoint change never needs this: conntrack only knows the proxy.
//!
//! What: the entries whose *reply* tuple comes from the retired listener's
//! `proxy address:port` over UDP (that is, the entries DNATed to it) are
//! deleted by their *original* tuple, the one the kernel gave in the dump,
//! with its zone and id (an entry that was replaced meanwhile is left
//! alone). kube-proxy picks the stale UDP entries it clears by the reply
//! tuple's source too (with the original destination): there the source
//! is a removed endpoint, here the retired listener, which is one Service
//! port's alone, so its address and port are enough.
//!
//! When: a retired listener calls [`Flusher::retired`] after its linger,
//! once its socket is closed. The reconciler closes a listener only after
//! the sync that took its rules away succeeded (src/reconcile.rs), so by
//! then no rule translates to the old port: a client's next datagram
//! creates a fresh entry toward the new listener. Flushing any earlier
//! would race with datagrams translated just before the rule change (their
//! entries may not be in the table yet), and the linger serves those. At
//! shutdown nothing is flushed: the next instance takes the same ports.
//!
//! The work runs on a blocking thread ([`tokio::task::spawn_blocking`]),
//! never on the data path's workers, one dump per family for every port
//! retired meanwhile. A failure is counted and logged (at most one line per
//! [`LOG_INTERVAL`]); it never fails a listener or a sync.
//!
//! The messages are built and read by the pure functions below, from the
//! kernel's uapi headers (`linux/netfilter/nfnetlink.h`,
//! `nfnetlink_conntrack.h`); only the socket calls touch the kernel.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::socket::{
    self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, sockopt,
};
use nix::sys::time::TimeVal;
use tracing::{debug, warn};

use super::log_limit::{LOG_INTERVAL, LogLimit};

/// The process's flusher: its queue and its counters.
pub static CONNTRACK: Flusher = Flusher::new();

/// A ctnetlink exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("cannot open a netfilter netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("netlink {what} failed: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the kernel refused the {what}: {source}")]
    Kernel {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("malformed netlink message: {0}")]
    Malformed(&'static str),
}

// ---------------------------------------------------------------------------
// Flushing: the queue and its blocking worker.

/// Queues retired UDP listeners' addresses and flushes their entries on a
/// blocking thread; counts what it did.
#[derive(Debug)]
pub struct Flusher {
    /// `proxy address:port` of listeners retired and not flushed yet.
    pending: Mutex<Vec<SocketAddr>>,
    /// A worker is draining `pending`.
    running: AtomicBool,
    /// Entries deleted.
    flushed: AtomicU64,
    /// Flushes that failed (a dump, or a deletion the kernel refused).
    errors: AtomicU64,
    log: LogLimit,
}

impl Flusher {
    pub const fn new() -> Self {
        Flusher {
            pending: Mutex::new(Vec::new()),
            running: AtomicBool::new(false),
            flushed: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            log: LogLimit::new(LOG_INTERVAL),
        }
    }

    /// Conntrack entries deleted so far (`kubeuproxy_conntrack_flushed_total`).
    pub fn flushed(&self) -> u64 {
        self.flushed.load(Ordering::Relaxed)
    }

    /// Flushes that failed so far (`kubeuproxy_conntrack_flush_errors_total`).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<SocketAddr>> {
        // Only short, non-panicking sections hold it.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The UDP listener on `proxy` (`proxy address:port`) is gone, after
    /// the rules moved off it: flush the entries that still point at it,
    /// soon, off the caller's thread.
    pub fn retired(&'static self, proxy: SocketAddr) {
        self.queue().push(proxy);
        if self.running.swap(true, Ordering::AcqRel) {
            // The running worker takes it.
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || self.drain());
            }
            // Not inside a runtime (no caller does this today): here, then.
            Err(_) => self.drain(),
        }
    }

    /// Flushes batches until the queue is empty.
    fn drain(&self) {
        loop {
            let batch = std::mem::take(&mut *self.queue());
            if batch.is_empty() {
                self.running.store(false, Ordering::Release);
                // A port queued between the take and the store would wait
                // for the next retirement: take it now unless another
                // worker already did.
                if self.queue().is_empty() || self.running.swap(true, Ordering::AcqRel) {
                    return;
                }
                continue;
            }
            self.flush_batch(&batch);
        }
    }

    fn flush_batch(&self, batch: &[SocketAddr]) {
        for family in [libc::AF_INET, libc::AF_INET6] {
            let ports: BTreeSet<SocketAddr> = batch
                .iter()
                .copied()
                .filter(|a| family_of(a.ip()) == family as u8)
                .collect();
            if ports.is_empty() {
                continue;
            }
            match flush_udp(family as u8, &ports) {
                Ok(Flushed { deleted, failed }) => {
                    self.flushed.fetch_add(deleted, Ordering::Relaxed);
                    if deleted > 0 {
                        debug!(
                            ?ports,
                            deleted, "conntrack entries of retired UDP listeners flushed"
                        );
                    }
                    if let Some(e) = failed {
                        self.failed(&ports, &e);
                    }
                }
                Err(e) => self.failed(&ports, &e),
            }
        }
    }

    fn failed(&self, ports: &BTreeSet<SocketAddr>, e: &ConntrackError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Some(held_back) = self.log.check() {
            warn!(
                ?ports,
                error = %e,
                held_back,
                "cannot flush the conntrack entries of retired UDP listeners; clients that keep their source port stay on the old port until their entry times out"
            );
        }
    }
}

impl Default for Flusher {
    fn default() -> Self {
        Flusher::new()
    }
}

/// What one flush did.
#[derive(Debug)]
struct Flushed {
    deleted: u64,
    /// The first deletion the kernel refused (others were still tried).
    failed: Option<ConntrackError>,
}

/// Deletes the UDP entries of `family` whose reply comes from one of
/// `ports`.
fn flush_udp(family: u8, ports: &BTreeSet<SocketAddr>) -> Result<Flushed, ConntrackError> {
    let socket = Ctnetlink::open()?;
    let stale = socket.dump(family, |e| {
        e.protocol == Some(libc::IPPROTO_UDP as u8)
            && e.reply_source.is_some_and(|s| ports.contains(&s))
    })?;
    let mut flushed = Flushed {
        deleted: 0,
        failed: None,
    };
    for entry in &stale {
        match socket.delete(entry) {
            Ok(true) => flushed.deleted += 1,
            // Gone meanwhile (timed out, or replaced).
            Ok(false) => {}
            Err(e) => {
                flushed.failed.get_or_insert(e);
            }
        }
    }
    Ok(flushed)
}

// ---------------------------------------------------------------------------
// The socket.

/// How long one receive may wait for the kernel.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// One receive: dump messages come in pages (`NLMSG_GOODSIZE`); this holds
/// several.
const RECV_BUFFER: usize = 64 * 1024;

/// A netfilter netlink socket talking to ctnetlink.
struct Ctnetlink {
    fd: OwnedFd,
    seq: std::cell::Cell<u32>,
}

impl Ctnetlink {
    fn open() -> Result<Self, ConntrackError> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(|e| ConntrackError::Socket(e.into()))?;
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))
            .map_err(|e| ConntrackError::Socket(e.into()))?;
        let timeout = TimeVal::new(
            RECV_TIMEOUT.as_secs() as _,
            RECV_TIMEOUT.subsec_micros() as _,
        );
        socket::setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)
            .map_err(|e| ConntrackError::Socket(e.into()))?;
        Ok(Ctnetlink {
            fd,
            seq: std::cell::Cell::new(1),
        })
    }

    fn next_seq(&self) -> u32 {
        let s = self.seq.get();
        self.seq.set(s.wrapping_add(1));
        s
    }

    fn send(&self, message: &[u8], what: &'static str) -> Result<(), ConntrackError> {
        loop {
            match socket::send(self.fd.as_raw_fd(), message, MsgFlags::empty()) {
                Ok(_) => return Ok(()),
                Err(nix::Error::EINTR) => continue,
                Err(e) => {
                    return Err(ConntrackError::Io {
                        what,
                        source: e.into(),
                    });
                }
            }
        }
    }

    fn recv<'b>(&self, buf: &'b mut [u8], what: &'static str) -> Result<&'b [u8], ConntrackError> {
        loop {
            match socket::recv(self.fd.as_raw_fd(), buf, MsgFlags::empty()) {
                Ok(n) => return Ok(&buf[..n]),
                Err(nix::Error::EINTR) => continue,
                Err(e) => {
                    return Err(ConntrackError::Io {
                        what,
                        source: e.into(),
                    });
                }
            }
        }
    }

    /// The entries of `family` that `keep` selects, from a whole dump
    /// (deleting while the kernel dumps could make it skip entries).
    fn dump(
        &self,
        family: u8,
        keep: impl Fn(&Entry<'_>) -> bool,
    ) -> Result<Vec<Stale>, ConntrackError> {
        let seq = self.next_seq();
        self.send(&dump_request(family, seq), "dump request")?;
        let mut buf = vec![0u8; RECV_BUFFER];
        let mut stale = Vec::new();
        loop {
            let received = self.recv(&mut buf, "dump")?;
            for message in messages(received) {
                let message = message?;
                if message.seq != seq {
                    continue;
                }
                match message.kind {
                    Kind::Done => return Ok(stale),
                    Kind::Error(0) => {}
                    Kind::Error(errno) => {
                        return Err(ConntrackError::Kernel {
                            what: "dump",
                            source: io::Error::from_raw_os_error(errno),
                        });
                    }
                    Kind::Conntrack => {
                        let entry = parse_entry(message.payload)?;
                        if keep(&entry) {
                            stale.extend(entry.stale());
                        }
                    }
                    Kind::Other => {}
                }
            }
        }
    }

    /// Deletes one entry; `false` if it was gone already.
    fn delete(&self, entry: &Stale) -> Result<bool, ConntrackError> {
        let seq = self.next_seq();
        self.send(&delete_request(entry, seq), "delete request")?;
        let mut buf = vec![0u8; 4096];
        // Bounded: the kernel answers a request with one acknowledgement.
        for _ in 0..16 {
            let received = self.recv(&mut buf, "delete")?;
            for message in messages(received) {
                let message = message?;
                if message.seq != seq {
                    continue;
                }
                match message.kind {
                    Kind::Error(0) => return Ok(true),
                    Kind::Error(errno) if errno == libc::ENOENT => return Ok(false),
                    Kind::Error(errno) => {
                        return Err(ConntrackError::Kernel {
                            what: "delete",
                            source: io::Error::from_raw_os_error(errno),
                        });
                    }
                    _ => {}
                }
            }
        }
        Err(ConntrackError::Malformed("no acknowledgement of a delete"))
    }
}

// ---------------------------------------------------------------------------
// The messages (pure).

/// `struct nlmsghdr`: length, type, flags, sequence, port id.
const NLMSG_HDRLEN: usize = 16;
/// `struct nfgenmsg`: family, version, resource id.
const NFGENMSG_LEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
/// `NLM_F_ROOT | NLM_F_MATCH`.
const NLM_F_DUMP: u16 = 0x300;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const NFNETLINK_V0: u8 = 0;
/// `enum cntl_msg_types`.
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
/// `enum ctattr_type`.
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
/// `enum ctattr_tuple`.
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
/// `enum ctattr_ip`.
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V6_SRC: u16 = 3;
/// `enum ctattr_l4proto`.
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
/// `NLA_F_NESTED | NLA_F_NET_BYTEORDER`: flags, not part of the type.
const NLA_TYPE_MASK: u16 = !0xc000;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn family_of(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

/// A ctnetlink request: header, `nfgenmsg` for `family`, then `attrs`
/// (already laid out, aligned).
fn request(message: u16, flags: u16, family: u8, seq: u32, attrs: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | message).to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    // Port id 0: the kernel fills in ours.
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, NFNETLINK_V0, 0, 0]);
    m.extend_from_slice(attrs);
    m
}

/// Asks for every conntrack entry of `family`.
fn dump_request(family: u8, seq: u32) -> Vec<u8> {
    request(
        IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_DUMP,
        family,
        seq,
        &[],
    )
}

/// Deletes the one entry `stale` names, acknowledged. Never without a
/// tuple: a delete without one flushes the whole table of the family, so
/// a [`Stale`] exists only with the original tuple of a dumped entry.
fn delete_request(stale: &Stale, seq: u32) -> Vec<u8> {
    request(
        IPCTNL_MSG_CT_DELETE,
        NLM_F_REQUEST | NLM_F_ACK,
        stale.family,
        seq,
        &stale.attrs,
    )
}

/// What a received message is.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    /// A conntrack entry (a dump's part).
    Conntrack,
    /// An acknowledgement (0) or an error (a positive errno).
    Error(i32),
    /// The end of a dump.
    Done,
    Other,
}

/// One received netlink message.
#[derive(Debug)]
struct Message<'a> {
    kind: Kind,
    seq: u32,
    /// What follows the netlink header.
    payload: &'a [u8],
}

/// The messages of one receive, in order.
fn messages(mut buf: &[u8]) -> impl Iterator<Item = Result<Message<'_>, ConntrackError>> {
    std::iter::from_fn(move || {
        if buf.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            buf = &[];
            return Some(Err(ConntrackError::Malformed("message length")));
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let seq = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
        let payload = &buf[NLMSG_HDRLEN..len];
        buf = buf.get(align4(len)..).unwrap_or(&[]);
        let kind = match kind {
            NLMSG_DONE => Kind::Done,
            NLMSG_ERROR => match payload.get(..4) {
                // `struct nlmsgerr`: a negative errno, then the request.
                Some(e) => Kind::Error(-i32::from_ne_bytes([e[0], e[1], e[2], e[3]])),
                None => return Some(Err(ConntrackError::Malformed("error message"))),
            },
            k if k == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW => Kind::Conntrack,
            _ => Kind::Other,
        };
        Some(Ok(Message { kind, seq, payload }))
    })
}

/// One attribute: its type (flags masked off), its value, and its whole
/// bytes (header and value, without padding).
#[derive(Debug, Clone, Copy)]
struct Attr<'a> {
    kind: u16,
    value: &'a [u8],
    whole: &'a [u8],
}

/// The attributes laid out in `buf`.
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = Result<Attr<'_>, ConntrackError>> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        if len < 4 || len > buf.len() {
            buf = &[];
            return Some(Err(ConntrackError::Malformed("attribute length")));
        }
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        let attr = Attr {
            kind,
            value: &buf[4..len],
            whole: &buf[..len],
        };
        buf = buf.get(align4(len)..).unwrap_or(&[]);
        Some(Ok(attr))
    })
}

fn find<'a>(buf: &'a [u8], kind: u16) -> Result<Option<Attr<'a>>, ConntrackError> {
    for a in attrs(buf) {
        let a = a?;
        if a.kind == kind {
            return Ok(Some(a));
        }
    }
    Ok(None)
}

/// A dumped entry, as far as choosing it needs.
#[derive(Debug)]
struct Entry<'a> {
    family: u8,
    /// `CTA_TUPLE_ORIG`, `CTA_ZONE`, `CTA_ID` as the kernel gave them: what
    /// names this one entry in a delete.
    orig: Option<Attr<'a>>,
    zone: Option<Attr<'a>>,
    id: Option<Attr<'a>>,
    /// The layer 4 protocol number.
    protocol: Option<u8>,
    /// Where replies come from: for a DNATed entry, the address and port
    /// it was translated to.
    reply_source: Option<SocketAddr>,
}

impl Entry<'_> {
    /// What deleting this entry takes; `None` without an original tuple.
    fn stale(&self) -> Option<Stale> {
        let orig = self.orig?;
        let mut attrs = Vec::new();
        for a in [Some(orig), self.zone, self.id].into_iter().flatten() {
            attrs.extend_from_slice(a.whole);
            attrs.resize(align4(attrs.len()), 0);
        }
        Some(Stale {
            family: self.family,
            attrs,
        })
    }
}

/// An entry to delete: its family and its identifying attributes, copied
/// from the dump.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stale {
    family: u8,
    attrs: Vec<u8>,
}

/// Reads a conntrack message's payload (after the netlink header).
fn parse_entry(payload: &[u8]) -> Result<Entry<'_>, ConntrackError> {
    let Some((head, body)) = payload.split_at_checked(NFGENMSG_LEN) else {
        return Err(ConntrackError::Malformed(
            "conntrack message without nfgenmsg",
        ));
    };
    let mut entry = Entry {
        family: head[0],
        orig: None,
        zone: None,
        id: None,
        protocol: None,
        reply_source: None,
    };
    for a in attrs(body) {
        let a = a?;
        match a.kind {
            CTA_TUPLE_ORIG => entry.orig = Some(a),
            CTA_ZONE => entry.zone = Some(a),
            CTA_ID => entry.id = Some(a),
            CTA_TUPLE_REPLY => {
                let (protocol, source) = parse_reply(a.value)?;
                entry.protocol = protocol;
                entry.reply_source = source;
            }
            _ => {}
        }
    }
    Ok(entry)
}

/// The protocol and source (address and port) of a tuple.
fn parse_reply(tuple: &[u8]) -> Result<(Option<u8>, Option<SocketAddr>), ConntrackError> {
    let mut ip = None;
    if let Some(t) = find(tuple, CTA_TUPLE_IP)? {
        for a in attrs(t.value) {
            let a = a?;
            ip = match (a.kind, a.value.len()) {
                (CTA_IP_V4_SRC, 4) => {
                    let o: [u8; 4] = a.value.try_into().unwrap_or_default();
                    Some(IpAddr::V4(Ipv4Addr::from(o)))
                }
                (CTA_IP_V6_SRC, 16) => {
                    let o: [u8; 16] = a.value.try_into().unwrap_or_default();
                    Some(IpAddr::V6(Ipv6Addr::from(o)))
                }
                _ => continue,
            };
        }
    }
    let (mut protocol, mut port) = (None, None);
    if let Some(p) = find(tuple, CTA_TUPLE_PROTO)? {
        for a in attrs(p.value) {
            let a = a?;
            match (a.kind, a.value) {
                (CTA_PROTO_NUM, [n, ..]) => protocol = Some(*n),
                (CTA_PROTO_SRC_PORT, [hi, lo, ..]) => port = Some(u16::from_be_bytes([*hi, *lo])),
                _ => {}
            }
        }
    }
    let source = ip.zip(port).map(|(ip, port)| SocketAddr::new(ip, port));
    Ok((protocol, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An attribute as the kernel lays it out: length, type, value, padding.
    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        a.resize(align4(a.len()), 0);
        a
    }

    /// A nested attribute (`NLA_F_NESTED`, as the kernel sets it).
    fn nest(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        nla(kind | 0x8000, &parts.concat())
    }

    fn tuple(kind: u16, src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16) -> Vec<u8> {
        let (s, d, ks, kd) = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => (s.octets().to_vec(), d.octets().to_vec(), 1, 2),
            (IpAddr::V6(s), IpAddr::V6(d)) => (s.octets().to_vec(), d.octets().to_vec(), 3, 4),
            _ => unreachable!(),
        };
        nest(
            kind,
            &[
                nest(CTA_TUPLE_IP, &[nla(ks, &s), nla(kd, &d)]),
                nest(
                    CTA_TUPLE_PROTO,
                    &[
                        nla(CTA_PROTO_NUM, &[proto]),
                        nla(CTA_PROTO_SRC_PORT, &sport.to_be_bytes()),
                        nla(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
                    ],
                ),
            ],
        )
    }

    const CTA_PROTO_DST_PORT: u16 = 3;
    const CTA_STATUS: u16 = 3;
    const CTA_TIMEOUT: u16 = 7;

    /// A dumped entry: client → service DNATed to proxy (reply proxy →
    /// client), with status, timeout and id, as `ctnetlink_fill_info`
    /// orders them.
    fn dumped(
        seq: u32,
        proto: u8,
        client: SocketAddr,
        service: SocketAddr,
        proxy: SocketAddr,
        id: u32,
    ) -> Vec<u8> {
        let body = [
            tuple(
                CTA_TUPLE_ORIG,
                client.ip(),
                service.ip(),
                proto,
                client.port(),
                service.port(),
            ),
            tuple(
                CTA_TUPLE_REPLY,
                proxy.ip(),
                client.ip(),
                proto,
                proxy.port(),
                client.port(),
            ),
            nla(CTA_STATUS, &0x18eu32.to_be_bytes()),
            nla(CTA_TIMEOUT, &29u32.to_be_bytes()),
            nla(CTA_ID, &id.to_be_bytes()),
        ]
        .concat();
        let mut m = request(
            IPCTNL_MSG_CT_NEW,
            0x2, // NLM_F_MULTI
            family_of(client.ip()),
            seq,
            &body,
        );
        // A message of the kernel carries our port id; nothing reads it.
        m[12..16].copy_from_slice(&4242u32.to_ne_bytes());
        m
    }

    fn done(seq: u32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&20u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        m.extend_from_slice(&0x2u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&0i32.to_ne_bytes());
        m
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_dump_request_is_a_ctnetlink_get_with_the_dump_flags() {
        let m = dump_request(libc::AF_INET as u8, 7);
        assert_eq!(m.len(), 20);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 20);
        // (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), 0x0101);
        // NLM_F_REQUEST | NLM_F_ROOT | NLM_F_MATCH
        assert_eq!(u16::from_ne_bytes(m[6..8].try_into().unwrap()), 0x0301);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7);
        // nfgenmsg: AF_INET, NFNETLINK_V0, res_id 0.
        assert_eq!(&m[16..20], &[2, 0, 0, 0]);
    }

    #[test]
    fn a_dump_yields_the_udp_entries_dnated_to_the_retired_port_and_nothing_else() {
        let proxy = sa("169.254.42.1:40001");
        let other_port = sa("169.254.42.1:40002");
        let service = sa("10.96.0.10:53");
        let client = sa("10.1.0.5:33333");
        let mut buf = [
            dumped(9, 17, client, service, proxy, 0x1111),
            // The same listener port, but TCP: not a UDP listener's.
            dumped(9, 6, client, service, proxy, 0x2222),
            // Another listener.
            dumped(9, 17, client, service, other_port, 0x3333),
            // Not translated: the reply comes from the service address.
            dumped(9, 17, sa("10.1.0.6:5000"), service, service, 0x4444),
        ]
        .concat();
        // An answer to another request on the same socket is skipped.
        buf.extend(dumped(8, 17, client, service, proxy, 0x5555));
        buf.extend(done(9));

        let ports: BTreeSet<SocketAddr> = [proxy].into();
        let mut chosen = Vec::new();
        let mut finished = false;
        for m in messages(&buf) {
            let m = m.unwrap();
            if m.seq != 9 {
                continue;
            }
            match m.kind {
                Kind::Conntrack => {
                    let e = parse_entry(m.payload).unwrap();
                    if e.protocol == Some(17) && e.reply_source.is_some_and(|s| ports.contains(&s))
                    {
                        chosen.push(e.stale().unwrap());
                    }
                }
                Kind::Done => finished = true,
                other => panic!("{other:?}"),
            }
        }
        assert!(finished);
        assert_eq!(chosen.len(), 1, "{chosen:?}");

        // The delete names the entry by its original tuple and its id,
        // byte for byte as dumped.
        let del = delete_request(&chosen[0], 10);
        let expected_attrs = [
            tuple(CTA_TUPLE_ORIG, client.ip(), service.ip(), 17, 33333, 53),
            nla(CTA_ID, &0x1111u32.to_be_bytes()),
        ]
        .concat();
        assert_eq!(&del[20..], &expected_attrs[..]);
        assert_eq!(
            u32::from_ne_bytes(del[0..4].try_into().unwrap()) as usize,
            del.len()
        );
        // (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK
        assert_eq!(u16::from_ne_bytes(del[4..6].try_into().unwrap()), 0x0102);
        assert_eq!(u16::from_ne_bytes(del[6..8].try_into().unwrap()), 0x0005);
        assert_eq!(&del[16..20], &[2, 0, 0, 0]);
    }

    #[test]
    fn ipv6_entries_and_zones_are_read_and_kept() {
        let proxy = sa("[fd6b:7570:7278::1]:40001");
        let mut m = dumped(
            3,
            17,
            sa("[fd00::5]:33333"),
            sa("[fd00:96::10]:53"),
            proxy,
            7,
        );
        let zone = nla(CTA_ZONE, &5u16.to_be_bytes());
        m.extend_from_slice(&zone);
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        let msg = messages(&m).next().unwrap().unwrap();
        let e = parse_entry(msg.payload).unwrap();
        assert_eq!(e.family, libc::AF_INET6 as u8);
        assert_eq!(e.reply_source, Some(proxy));
        let stale = e.stale().unwrap();
        assert!(
            stale
                .attrs
                .ends_with(&[zone, nla(CTA_ID, &7u32.to_be_bytes())].concat())
        );
    }

    #[test]
    fn an_entry_without_an_original_tuple_is_never_deleted() {
        // A delete without a tuple would flush the whole table.
        let mut payload = vec![2, 0, 0, 0];
        payload.extend(nla(CTA_ID, &1u32.to_be_bytes()));
        let e = parse_entry(&payload).unwrap();
        assert!(e.stale().is_none());
    }

    #[test]
    fn errors_acks_and_truncated_messages_are_told_apart() {
        let mut ack = Vec::new();
        ack.extend_from_slice(&36u32.to_ne_bytes());
        ack.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack.extend_from_slice(&0u16.to_ne_bytes());
        ack.extend_from_slice(&5u32.to_ne_bytes());
        ack.extend_from_slice(&0u32.to_ne_bytes());
        ack.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        ack.extend_from_slice(&[0; 16]);
        let m = messages(&ack).next().unwrap().unwrap();
        assert_eq!((m.kind, m.seq), (Kind::Error(libc::ENOENT), 5));

        let mut short = ack.clone();
        short.truncate(30);
        assert!(matches!(
            messages(&short).next(),
            Some(Err(ConntrackError::Malformed(_)))
        ));
        // An attribute longer than its message.
        let mut payload = vec![2, 0, 0, 0];
        payload.extend_from_slice(&200u16.to_ne_bytes());
        payload.extend_from_slice(&CTA_TUPLE_REPLY.to_ne_bytes());
        assert!(parse_entry(&payload).is_err());
    }
}
