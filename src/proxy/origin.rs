//! Where a client's connection came from and went to, told to the
//! endpoint: the relay's second connection starts at the proxy address, so
//! without this an endpoint sees the node, never the client.
//!
//! - [`original_destination`]: the address the client connected to (a
//!   ClusterIP, node address, externalIP or load-balancer IP and its
//!   port), before the rules' DNAT to the listener.
//! - [`Header`]: the PROXY protocol header (HAProxy's
//!   `proxy-protocol.txt`, versions 1 and 2; `send-proxy` /
//!   `send-proxy-v2`), written first on a connection to an endpoint of a
//!   Service annotated `kube-uproxy.io/proxy-protocol`.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};

use socket2::SockRef;
use tokio::net::TcpStream;

use crate::model::ProxyProtocol;

/// The address `client` (an accepted connection) was sent to before the
/// rules translated it to the listener: the conntrack entry's original
/// destination (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST`). A ClusterIP and
/// a node port reach one listener alike, so the listener alone cannot tell
/// which; conntrack can. Without a translation (a test connecting to the
/// listener directly, or no conntrack entry) the socket's own address.
pub fn original_destination(client: &TcpStream) -> Option<SocketAddr> {
    let local = client.local_addr().ok()?;
    let sock = SockRef::from(client);
    let original = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    };
    Some(original.ok().and_then(|a| a.as_socket()).unwrap_or(local))
}

/// The v2 header's fixed 12-byte signature.
const V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// The longest v1 line the specification allows, `\r\n` included.
const V1_MAX: usize = 107;

/// One PROXY protocol header, built on the stack (at most 107 bytes): no
/// allocation per connection.
pub struct Header {
    buf: [u8; V1_MAX],
    len: usize,
}

impl Header {
    /// The header of a TCP connection from `client` to `destination`.
    /// Addresses of two families (not expected: a listener serves one)
    /// give v1's `UNKNOWN` and v2's `LOCAL` command, which tell the
    /// endpoint to use the connection's own addresses.
    pub fn new(version: ProxyProtocol, client: SocketAddr, destination: SocketAddr) -> Header {
        let client = canonical(client);
        let destination = canonical(destination);
        let mut h = Header {
            buf: [0; V1_MAX],
            len: 0,
        };
        match version {
            ProxyProtocol::V1 => h.v1(client, destination),
            ProxyProtocol::V2 => h.v2(client, destination),
        }
        h
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// `PROXY TCP4 <src> <dst> <sport> <dport>\r\n` (`TCP6` for IPv6).
    fn v1(&mut self, client: SocketAddr, destination: SocketAddr) {
        let mut out: &mut [u8] = &mut self.buf;
        let written = match (client, destination) {
            (SocketAddr::V4(c), SocketAddr::V4(d)) => write!(
                out,
                "PROXY TCP4 {} {} {} {}\r\n",
                c.ip(),
                d.ip(),
                c.port(),
                d.port()
            ),
            (SocketAddr::V6(c), SocketAddr::V6(d)) => write!(
                out,
                "PROXY TCP6 {} {} {} {}\r\n",
                c.ip(),
                d.ip(),
                c.port(),
                d.port()
            ),
            _ => out.write_all(b"PROXY UNKNOWN\r\n"),
        };
        // Two IPv6 addresses of 39 characters, two ports and the words
        // make 104 bytes at most: the line always fits.
        let left = if written.is_ok() { out.len() } else { V1_MAX };
        self.len = V1_MAX - left;
    }

    /// The binary header: signature, version 2 and command, family and
    /// transport, the length of the addresses, then source address,
    /// destination address, source port, destination port (network order).
    fn v2(&mut self, client: SocketAddr, destination: SocketAddr) {
        self.buf[..12].copy_from_slice(&V2_SIGNATURE);
        let mut n = 16;
        let (command, family) = match (client.ip(), destination.ip()) {
            (IpAddr::V4(c), IpAddr::V4(d)) => {
                self.buf[n..n + 4].copy_from_slice(&c.octets());
                self.buf[n + 4..n + 8].copy_from_slice(&d.octets());
                n += 8;
                // PROXY; TCP over IPv4.
                (0x21, 0x11)
            }
            (IpAddr::V6(c), IpAddr::V6(d)) => {
                self.buf[n..n + 16].copy_from_slice(&c.octets());
                self.buf[n + 16..n + 32].copy_from_slice(&d.octets());
                n += 32;
                // PROXY; TCP over IPv6.
                (0x21, 0x21)
            }
            // LOCAL; unspecified family, no addresses.
            _ => (0x20, 0x00),
        };
        if family != 0 {
            self.buf[n..n + 2].copy_from_slice(&client.port().to_be_bytes());
            self.buf[n + 2..n + 4].copy_from_slice(&destination.port().to_be_bytes());
            n += 4;
        }
        self.buf[12] = command;
        self.buf[13] = family;
        // At most 36: fits in the u16 length field.
        let addresses = u16::try_from(n - 16).unwrap_or(0);
        self.buf[14..16].copy_from_slice(&addresses.to_be_bytes());
        self.len = n;
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_lines_are_the_specifications_examples() {
        let h = Header::new(
            ProxyProtocol::V1,
            sa("192.168.0.1:56324"),
            sa("192.168.0.11:443"),
        );
        assert_eq!(
            h.as_bytes(),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        );
        let h = Header::new(
            ProxyProtocol::V1,
            sa("[2001:db8::1]:40000"),
            sa("[fd00:96::10]:80"),
        );
        assert_eq!(
            h.as_bytes(),
            b"PROXY TCP6 2001:db8::1 fd00:96::10 40000 80\r\n"
        );
        // The longest line fits.
        let h = Header::new(
            ProxyProtocol::V1,
            sa("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
            sa("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe]:65535"),
        );
        assert_eq!(h.as_bytes().len(), 104);
        assert!(h.as_bytes().ends_with(b" 65535 65535\r\n"));
        let h = Header::new(ProxyProtocol::V1, sa("10.0.0.1:1"), sa("[::1]:2"));
        assert_eq!(h.as_bytes(), b"PROXY UNKNOWN\r\n");
        // A mapped address is IPv4.
        let h = Header::new(
            ProxyProtocol::V1,
            sa("[::ffff:10.200.0.2]:5000"),
            sa("10.96.0.10:80"),
        );
        assert_eq!(
            h.as_bytes(),
            b"PROXY TCP4 10.200.0.2 10.96.0.10 5000 80\r\n"
        );
    }

    #[test]
    fn v2_headers_carry_addresses_and_ports_in_network_order() {
        let h = Header::new(
            ProxyProtocol::V2,
            sa("10.200.0.2:50000"),
            sa("10.96.0.10:80"),
        );
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0x00, 0x0C]);
        want.extend_from_slice(&[10, 200, 0, 2, 10, 96, 0, 10]);
        want.extend_from_slice(&[0xC3, 0x50, 0x00, 0x50]);
        assert_eq!(h.as_bytes(), &want[..]);

        let h = Header::new(
            ProxyProtocol::V2,
            sa("[fd00:200::2]:443"),
            sa("[fd00:96::10]:8443"),
        );
        let b = h.as_bytes();
        assert_eq!(b.len(), 16 + 36);
        assert_eq!(&b[12..16], &[0x21, 0x21, 0x00, 0x24]);
        assert_eq!(&b[16..18], &[0xfd, 0x00]);
        assert_eq!(b[31], 2);
        assert_eq!(&b[32..34], &[0xfd, 0x00]);
        assert_eq!(b[47], 0x10);
        assert_eq!(&b[48..], &[0x01, 0xBB, 0x20, 0xFB]);

        let h = Header::new(ProxyProtocol::V2, sa("10.0.0.1:1"), sa("[::1]:2"));
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(h.as_bytes(), &want[..]);
    }

    #[tokio::test]
    async fn without_a_translation_the_destination_is_the_listeners_address() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _c = TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert_eq!(original_destination(&s), Some(addr));
    }
}
