//! Is this connection HTTP? Decided from its first bytes, read with
//! `MSG_PEEK` so that nothing is consumed: a connection that is not HTTP
//! goes to the L4 relay with every byte still in the socket.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// What the first bytes of a connection say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 connection preface (h2c with prior knowledge: gRPC).
    Http2,
    /// Anything else, the end of the stream, or silence: relayed as bytes.
    Other,
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Request-line starts of the methods a client sends (RFC 9110 §9, and
/// PATCH). An extension method is relayed as bytes: still served, only
/// not balanced per request.
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// Bytes needed to tell every case apart: the whole preface.
const NEEDED: usize = PREFACE.len();

/// Classifies the first bytes of a connection; `None` while they are a
/// proper prefix of something HTTP (more bytes are needed).
pub fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    if buf.starts_with(PREFACE) {
        return Some(Detected::Http2);
    }
    if METHODS.iter().any(|m| buf.starts_with(m)) {
        // "PRI " is not among the methods: a preface is never taken for
        // HTTP/1.
        return Some(Detected::Http1);
    }
    let could_be = PREFACE.starts_with(buf) || METHODS.iter().any(|m| m.starts_with(buf));
    if could_be {
        None
    } else {
        Some(Detected::Other)
    }
}

/// Waits up to `timeout` for the client's first bytes and classifies
/// them. A client that says nothing in that time is taken for a
/// server-speaks-first protocol (a database, SMTP) behind a wrong label:
/// [`Detected::Other`]. HTTP clients write their request as soon as they
/// are connected, so the wait is only ever paid by such a protocol.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> io::Result<Detected> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; NEEDED];
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => return Ok(Detected::Other),
        };
        if n == 0 {
            // The client closed without a byte: nothing to balance.
            return Ok(Detected::Other);
        }
        if let Some(d) = classify(&buf[..n]) {
            return Ok(d);
        }
        // A prefix of something HTTP: wait for more. `peek` returns at
        // once while the bytes already seen are there, so look again a
        // little later (rare: a request line arrives in one segment).
        if n == seen && Instant::now() + Duration::from_millis(2) > deadline {
            return Ok(Detected::Other);
        }
        seen = n;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_and_the_preface_are_told_apart() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"POST /x"), Some(Detected::Http1));
        assert_eq!(classify(PREFACE), Some(Detected::Http2));
        // "P" could be POST, PUT, PATCH or the preface; "PRI * HTTP/2" only
        // the preface.
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nXX"), Some(Detected::Other));
    }

    #[test]
    fn other_protocols_are_not_http() {
        // A TLS ClientHello, a Redis command, a PostgreSQL startup packet.
        assert_eq!(classify(&[0x16, 0x03, 0x01]), Some(Detected::Other));
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Some(Detected::Other));
        assert_eq!(
            classify(&[0, 0, 0, 8, 4, 210, 22, 47]),
            Some(Detected::Other)
        );
        // Lower case is not a method.
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Detected::Other));
        assert_eq!(classify(b""), None);
    }

    #[tokio::test]
    async fn silence_is_another_protocol_and_nothing_is_consumed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let d = detect(&server, Duration::from_millis(100)).await.unwrap();
        assert_eq!(d, Detected::Other);
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        client.write_all(b"GE").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        client.write_all(b"T / HTTP/1.1\r\n").await.unwrap();
        let d = detect(&server, Duration::from_secs(2)).await.unwrap();
        assert_eq!(d, Detected::Http1);
        // Peeked, not read: every byte is still there.
        let mut server = server;
        let mut got = [0u8; 16];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\n");
    }
}
