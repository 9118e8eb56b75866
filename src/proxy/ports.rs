//! Choosing the local port each Service port's listener binds.
//!
//! `--proxy-port-range` takes kube-proxy's format (`BEGIN-END`, `PORT`, or
//! `BEGIN+OFFSET`). With a range, ports are handed out in turn (next-fit, so
//! a port just released is not reused at once) and a port some other
//! program holds is skipped. Without one, the proxy hands out ports the same
//! way from the kernel's ephemeral range (`net.ipv4.ip_local_port_range`,
//! [`ephemeral_port_range`]), the ports a `bind` to port 0 would get:
//! binding a chosen port costs the kernel one bucket lookup, while a `bind`
//! to port 0 searches for a free port and slows down with every socket
//! already bound on the address (10 000 listeners took 25 s that way, 0.5 s
//! this way).
//!
//! Every socket is bound with `SO_REUSEPORT`, so that the next instance of
//! the proxy can bind the same port beside this one during a rolling update
//! and take over without refusing a connection (docs/rules.md). A port that
//! is not being handed over must still be ours alone: before a fresh port is
//! used, a probe socket *without* `SO_REUSEPORT` checks that nobody (an
//! older instance included) holds it. Ports an earlier instance left in the
//! rules are *reserved* at start, so they go back to the same Service ports
//! and to no other.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use socket2::{Domain, Socket, Type};

use crate::model::Protocol;

/// An inclusive range of local ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub begin: u16,
    pub end: u16,
}

impl PortRange {
    pub fn len(&self) -> usize {
        usize::from(self.end - self.begin) + 1
    }
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.begin, self.end)
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let num = |p: &str| -> Result<u32, String> {
            p.trim()
                .parse::<u32>()
                .map_err(|_| format!("invalid port range {s:?}: {p:?} is not a number"))
        };
        let (begin, end) = if let Some((a, b)) = s.split_once('-') {
            (num(a)?, num(b)?)
        } else if let Some((a, off)) = s.split_once('+') {
            let a = num(a)?;
            (a, a + num(off)?)
        } else {
            let p = num(s)?;
            (p, p)
        };
        if begin == 0 || end > 65535 || begin > end {
            return Err(format!(
                "invalid port range {s:?}: want BEGIN-END, PORT or BEGIN+OFFSET with 1 <= BEGIN <= END <= 65535"
            ));
        }
        Ok(PortRange {
            begin: begin as u16,
            end: end as u16,
        })
    }
}

/// The kernel's ephemeral port range, from `ip_local_port_range` under
/// `proc_sys` (`--proc-sys-dir`).
pub fn ephemeral_port_range(proc_sys: &std::path::Path) -> io::Result<PortRange> {
    let path = proc_sys.join("net/ipv4/ip_local_port_range");
    let text = std::fs::read_to_string(&path)?;
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {text:?} is not two port numbers", path.display()),
        )
    };
    let mut nums = text.split_whitespace().map(str::parse::<u16>);
    match (nums.next(), nums.next(), nums.next()) {
        (Some(Ok(begin)), Some(Ok(end)), None) if 0 < begin && begin <= end => {
            Ok(PortRange { begin, end })
        }
        _ => Err(bad()),
    }
}

/// No port could be bound.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("no free port in the proxy port range {range} ({in_use} held by this proxy)")]
    Exhausted { range: PortRange, in_use: usize },
    #[error("{protocol} port {port} is not reserved for this Service port, or already in use")]
    NotReserved { protocol: Protocol, port: u16 },
    #[error("cannot bind {protocol} {addr}: {source}")]
    Bind {
        protocol: Protocol,
        addr: SocketAddr,
        source: io::Error,
    },
}

/// Hands out proxy ports and binds the sockets on them.
#[derive(Debug)]
pub struct ProxyPortAllocator {
    bind_ip: IpAddr,
    range: Option<PortRange>,
    /// Where the next search starts (next-fit).
    cursor: u16,
    /// Ports (per protocol) this proxy holds.
    in_use: HashSet<(Protocol, u16)>,
    /// Ports kept for the Service ports that had them in an earlier
    /// instance's rules; handed out only by [`Self::bind_reserved`].
    reserved: HashSet<(Protocol, u16)>,
}

impl ProxyPortAllocator {
    pub fn new(bind_ip: IpAddr, range: Option<PortRange>) -> Self {
        ProxyPortAllocator {
            bind_ip,
            range,
            cursor: range.map_or(0, |r| r.begin),
            in_use: HashSet::new(),
            reserved: HashSet::new(),
        }
    }

    /// Keeps `port` for [`Self::bind_reserved`]: fresh allocations skip it.
    pub fn reserve(&mut self, protocol: Protocol, port: u16) {
        self.reserved.insert((protocol, port));
    }

    /// Forgets every reservation not taken (after the first sync).
    pub fn clear_reservations(&mut self) {
        self.reserved.clear();
    }

    /// Binds a reserved port, beside the earlier instance's socket if it
    /// still runs.
    pub fn bind_reserved(&mut self, protocol: Protocol, port: u16) -> Result<Socket, PortError> {
        if self.in_use.contains(&(protocol, port)) || !self.reserved.remove(&(protocol, port)) {
            return Err(PortError::NotReserved { protocol, port });
        }
        let (sock, _) = self.bind_port(protocol, port)?;
        self.in_use.insert((protocol, port));
        Ok(sock)
    }

    fn taken(&self, protocol: Protocol, port: u16) -> bool {
        self.in_use.contains(&(protocol, port)) || self.reserved.contains(&(protocol, port))
    }

    /// Binds a new socket for `protocol` (a listening TCP socket, or a UDP
    /// socket) on a free port, and records the port as held.
    pub fn bind(&mut self, protocol: Protocol) -> Result<(Socket, u16), PortError> {
        let Some(range) = self.range else {
            // The kernel never hands out a port that is bound already; it
            // may hand out a reserved one that is free: keep that socket
            // until another port comes, so the kernel does not offer it again.
            let mut refused = Vec::new();
            for _ in 0..16 {
                let (sock, port) = self.bind_port(protocol, 0)?;
                if self.taken(protocol, port) {
                    refused.push(sock);
                    continue;
                }
                self.in_use.insert((protocol, port));
                return Ok((sock, port));
            }
            return Err(PortError::NotReserved { protocol, port: 0 });
        };
        for _ in 0..range.len() {
            let port = self.cursor;
            self.cursor = if port >= range.end {
                range.begin
            } else {
                port + 1
            };
            if self.taken(protocol, port) || !self.port_is_free(protocol, port) {
                continue;
            }
            match self.bind_port(protocol, port) {
                Ok((sock, port)) => {
                    self.in_use.insert((protocol, port));
                    return Ok((sock, port));
                }
                Err(PortError::Bind { source, .. })
                    if source.kind() == io::ErrorKind::AddrInUse =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        Err(PortError::Exhausted {
            range,
            in_use: self.in_use.iter().filter(|(p, _)| *p == protocol).count(),
        })
    }

    /// Marks a port free again (its socket has been closed).
    pub fn release(&mut self, protocol: Protocol, port: u16) {
        self.in_use.remove(&(protocol, port));
    }

    /// Whether nobody holds `port`: a bind without `SO_REUSEPORT` fails on
    /// any port that is bound, by another program or another instance of
    /// this proxy (whose sockets our `SO_REUSEPORT` bind would join).
    fn port_is_free(&self, protocol: Protocol, port: u16) -> bool {
        let addr = SocketAddr::new(self.bind_ip, port);
        let ty = match protocol {
            Protocol::Udp => Type::DGRAM,
            _ => Type::STREAM,
        };
        Socket::new(Domain::for_address(addr), ty, None)
            .and_then(|s| s.bind(&addr.into()))
            .is_ok()
    }

    /// One more socket on `port`, a port this allocator handed out and
    /// still holds: bound beside the first with `SO_REUSEPORT` (a listener
    /// per data-path thread, proxy/threads.rs). No bookkeeping: the port is
    /// released once, with the first.
    pub fn bind_more(&self, protocol: Protocol, port: u16) -> Result<Socket, PortError> {
        self.bind_port(protocol, port).map(|(s, _)| s)
    }

    fn bind_port(&self, protocol: Protocol, port: u16) -> Result<(Socket, u16), PortError> {
        let addr = SocketAddr::new(self.bind_ip, port);
        let err = |source| PortError::Bind {
            protocol,
            addr,
            source,
        };
        let ty = match protocol {
            Protocol::Udp => Type::DGRAM,
            _ => Type::STREAM,
        };
        let sock = Socket::new(Domain::for_address(addr), ty, None).map_err(err)?;
        // Lets a restarted proxy take its ports back while connections of
        // the previous run linger in TIME_WAIT.
        sock.set_reuse_address(true).map_err(err)?;
        // Lets the next instance bind beside this one (a handover).
        sock.set_reuse_port(true).map_err(err)?;
        sock.set_nonblocking(true).map_err(err)?;
        sock.bind(&addr.into()).map_err(err)?;
        if ty == Type::STREAM {
            sock.listen(4096).map_err(err)?;
        }
        let bound = sock
            .local_addr()
            .map_err(err)?
            .as_socket()
            .map_or(port, |a| a.port());
        Ok((sock, bound))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kube_proxy_range_formats() {
        assert_eq!(
            "20000-20010".parse::<PortRange>().unwrap(),
            PortRange {
                begin: 20000,
                end: 20010
            }
        );
        assert_eq!(
            "20000+5".parse::<PortRange>().unwrap(),
            PortRange {
                begin: 20000,
                end: 20005
            }
        );
        assert_eq!(
            "30000".parse::<PortRange>().unwrap(),
            PortRange {
                begin: 30000,
                end: 30000
            }
        );
        for bad in ["", "0-10", "10-5", "1-70000", "a-b", "65535+1"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad} accepted");
        }
    }

    /// A listening socket on `127.0.0.1:port` with `SO_REUSEPORT`, as
    /// another program (or an older instance of this proxy) could hold it:
    /// our own `SO_REUSEPORT` bind would join it, so only the allocator's
    /// probe keeps it from being handed out.
    fn reuseport_listener(port: u16) -> io::Result<Socket> {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        s.set_reuse_port(true)?;
        s.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())?;
        s.listen(8)?;
        Ok(s)
    }

    /// A port `p` held by a [`reuseport_listener`] with `p + 1` free (at
    /// the time of the check), so that the range `p..=p+1` has exactly
    /// one busy port whatever else runs on the machine.
    fn busy_port_with_a_free_neighbour() -> (Socket, u16) {
        for _ in 0..50 {
            let blocker = reuseport_listener(0).expect("a listener on a kernel-chosen port");
            let port = blocker
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .map(|a| a.port())
                .expect("its port");
            if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
                return (blocker, port);
            }
        }
        panic!("no busy port with a free neighbour found in 50 tries");
    }

    #[test]
    fn hands_out_ports_in_range_and_skips_busy_ones() {
        let (_blocker, busy) = busy_port_with_a_free_neighbour();
        let range = PortRange {
            begin: busy,
            end: busy + 1,
        };
        let mut alloc = ProxyPortAllocator::new("127.0.0.1".parse().unwrap(), Some(range));
        let (sock, port) = alloc.bind(Protocol::Tcp).unwrap();
        assert_eq!(
            port,
            busy + 1,
            "the port held by another program must be skipped"
        );
        assert!(matches!(
            alloc.bind(Protocol::Tcp),
            Err(PortError::Exhausted { .. })
        ));
        // Release it: it can be bound again once its socket is closed.
        drop(sock);
        alloc.release(Protocol::Tcp, port);
        assert_eq!(alloc.bind(Protocol::Tcp).unwrap().1, port);
    }

    #[test]
    fn handover_binds_beside_the_old_instance_and_fresh_ports_avoid_it() {
        let base = 45000 + (std::process::id() % 2000) as u16 * 3;
        let range = PortRange {
            begin: base,
            end: base + 2,
        };
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        // The old instance holds `base` and `base + 1` (SO_REUSEPORT).
        let mut old = ProxyPortAllocator::new(lo, Some(range));
        let (_old_a, held) = old.bind(Protocol::Tcp).unwrap();
        let (_old_b, other) = old.bind(Protocol::Tcp).unwrap();
        assert_eq!((held, other), (base, base + 1));
        // The new instance adopts `base` for the same Service port...
        let mut new = ProxyPortAllocator::new(lo, Some(range));
        new.reserve(Protocol::Tcp, held);
        let adopted = new.bind_reserved(Protocol::Tcp, held).unwrap();
        assert_eq!(
            adopted.local_addr().unwrap().as_socket().unwrap().port(),
            held
        );
        // ...only once...
        assert!(new.bind_reserved(Protocol::Tcp, held).is_err());
        // ...and a fresh allocation never joins a port the old instance
        // holds for another Service port: `base + 2` is all that is left.
        let (_s, fresh) = new.bind(Protocol::Tcp).unwrap();
        assert_eq!(fresh, base + 2);
        assert!(matches!(
            new.bind(Protocol::Tcp),
            Err(PortError::Exhausted { .. })
        ));
    }

    #[test]
    fn reserved_ports_are_skipped_until_released() {
        let base = 47000 + (std::process::id() % 2000) as u16 * 2;
        let range = PortRange {
            begin: base,
            end: base + 1,
        };
        let mut a = ProxyPortAllocator::new("127.0.0.1".parse().unwrap(), Some(range));
        a.reserve(Protocol::Tcp, base);
        let (_s, p) = a.bind(Protocol::Tcp).unwrap();
        assert_eq!(p, base + 1);
        assert!(a.bind(Protocol::Tcp).is_err());
        a.clear_reservations();
        assert_eq!(a.bind(Protocol::Tcp).unwrap().1, base);
    }

    #[test]
    fn the_ephemeral_range_is_read_from_the_sysctl_file() {
        let dir = std::env::temp_dir().join(format!("ku-ports-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("net/ipv4")).unwrap();
        let file = dir.join("net/ipv4/ip_local_port_range");
        std::fs::write(&file, "32768\t60999\n").unwrap();
        assert_eq!(
            ephemeral_port_range(&dir).unwrap(),
            PortRange {
                begin: 32768,
                end: 60999
            }
        );
        for bad in ["", "1", "9 1", "0 10", "a b", "1 2 3"] {
            std::fs::write(&file, bad).unwrap();
            assert!(ephemeral_port_range(&dir).is_err(), "{bad:?} accepted");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn kernel_chooses_without_a_range() {
        let mut alloc = ProxyPortAllocator::new("127.0.0.1".parse().unwrap(), None);
        let (_a, pa) = alloc.bind(Protocol::Tcp).unwrap();
        let (_b, pb) = alloc.bind(Protocol::Tcp).unwrap();
        assert_ne!(pa, 0);
        assert_ne!(pa, pb);
    }
}
