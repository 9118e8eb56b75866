//! Socket options that find dead peers: TCP keepalive on both sockets of a
//! flow, `TCP_USER_TIMEOUT` on the upstream.
//!
//! A peer that vanishes without a FIN (a node lost, a partition, a pod
//! whose network namespace went away) leaves its connection open forever
//! unless someone asks: keepalive asks when the connection is idle, and
//! `TCP_USER_TIMEOUT` bounds how long sent data may stay unacknowledged
//! (keepalive does not probe while data is in flight). Once either gives
//! up, the socket fails, the relay sees the error and both sides of the
//! flow are released.
//!
//! The client side costs nothing per connection (accepted sockets inherit
//! the listener's keepalive). The upstream side costs five system calls,
//! paid only by flows that live for [`LONG_LIVED`] (the relay applies them
//! then): a connection-per-request flow is over long before any of these
//! timers could matter.

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

/// Age of a flow at which its upstream socket gets keepalive and
/// `TCP_USER_TIMEOUT`: far below the shortest keepalive time (1 s is the
/// kernel's unit), far above a connection-per-request flow.
pub const LONG_LIVED: Duration = Duration::from_secs(1);

/// TCP keepalive timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe.
    pub time: Duration,
    /// Between probes.
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped.
    pub count: u32,
}

/// Dead-peer detection for both sockets of every flow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpOptions {
    /// `None`: no keepalive.
    pub keepalive: Option<Keepalive>,
    /// `TCP_USER_TIMEOUT` of upstream sockets; `None`: the kernel's.
    pub user_timeout: Option<Duration>,
}

impl TcpOptions {
    /// Whether these options change anything on an upstream socket.
    pub fn any(&self) -> bool {
        self.keepalive.is_some() || self.user_timeout.is_some()
    }

    /// Keepalive and `TCP_NODELAY` on a listening socket: Linux copies
    /// both to every socket the listener accepts, so the client side of a
    /// flow costs no system call per connection for them (the relay
    /// forwards each message as it comes: Nagle would only delay it).
    pub fn apply_to_listener(&self, listener: &impl AsFd) -> io::Result<()> {
        let s = SockRef::from(listener);
        s.set_tcp_nodelay(true)?;
        self.set_keepalive(s)
    }

    /// Keepalive and `TCP_USER_TIMEOUT` on an upstream socket.
    pub fn apply_to_upstream(&self, socket: &impl AsFd) -> io::Result<()> {
        let s = SockRef::from(socket);
        self.set_keepalive(SockRef::from(socket))?;
        s.set_tcp_user_timeout(self.user_timeout)
    }

    fn set_keepalive(&self, s: SockRef<'_>) -> io::Result<()> {
        match self.keepalive {
            Some(k) => s.set_tcp_keepalive(
                &TcpKeepalive::new()
                    .with_time(k.time)
                    .with_interval(k.interval)
                    .with_retries(k.count),
            ),
            None => s.set_keepalive(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::SockRef;

    fn options() -> TcpOptions {
        TcpOptions {
            keepalive: Some(Keepalive {
                time: Duration::from_secs(7),
                interval: Duration::from_secs(3),
                count: 4,
            }),
            user_timeout: Some(Duration::from_secs(19)),
        }
    }

    fn keepalive_of(s: SockRef<'_>) -> (bool, Duration, Duration, u32) {
        (
            s.keepalive().unwrap(),
            s.tcp_keepalive_time().unwrap(),
            s.tcp_keepalive_interval().unwrap(),
            s.tcp_keepalive_retries().unwrap(),
        )
    }

    #[test]
    fn accepted_sockets_get_keepalive_from_the_listener() {
        // The client side costs no system call per connection: Linux copies
        // the listener's keepalive settings to every socket it accepts.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        options().apply_to_listener(&l).unwrap();
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (accepted, _) = l.accept().unwrap();
        assert_eq!(
            keepalive_of(SockRef::from(&accepted)),
            (true, Duration::from_secs(7), Duration::from_secs(3), 4)
        );
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY not inherited");
    }

    #[test]
    fn upstream_sockets_get_keepalive_and_a_user_timeout() {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        options().apply_to_upstream(&s).unwrap();
        assert_eq!(
            keepalive_of(SockRef::from(&s)),
            (true, Duration::from_secs(7), Duration::from_secs(3), 4)
        );
        assert_eq!(s.tcp_user_timeout().unwrap(), Some(Duration::from_secs(19)));
        // Off means off.
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        TcpOptions::default().apply_to_upstream(&s).unwrap();
        assert!(!s.keepalive().unwrap());
        assert_eq!(s.tcp_user_timeout().unwrap(), None);
    }
}
