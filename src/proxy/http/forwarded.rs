//! `X-Forwarded-For` and `Forwarded` (RFC 7239) on the requests of a port
//! in request mode whose Service asks for them
//! (`kube-uproxy.io/forwarded-headers`): the endpoint's connection comes
//! from the proxy, and these headers are how an HTTP endpoint learns the
//! client's address instead.
//!
//! What depends on the connection only (the client's address, the Service
//! address it connected to) is built once per client connection; a request
//! costs one header value more (`Forwarded` with its `host`), or two when
//! the client's chain is appended to.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::model::ForwardedHeaders;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The headers of one client connection's requests.
#[derive(Debug)]
pub struct Forwarding {
    /// Replace or append (never `Off`: then there is no `Forwarding`).
    mode: ForwardedHeaders,
    /// The client's address: `X-Forwarded-For`'s element.
    xff: HeaderValue,
    /// `for=…;by=…;proto=http`: `Forwarded`'s element without `host`.
    element: String,
}

impl Forwarding {
    /// The headers for requests from `client`, sent to `destination` (the
    /// Service address it connected to, if known); `None` when the port
    /// adds none.
    pub fn new(
        mode: ForwardedHeaders,
        client: SocketAddr,
        destination: Option<SocketAddr>,
    ) -> Option<Forwarding> {
        if mode == ForwardedHeaders::Off {
            return None;
        }
        let ip = client.ip().to_canonical();
        let xff = HeaderValue::from_maybe_shared(Bytes::from(ip.to_string())).ok()?;
        let mut element = String::with_capacity(96);
        // RFC 7239 §6: an IPv6 node is bracketed, and then quoted (`[`
        // and `:` are not token characters); so is one with a port.
        let _ = match ip {
            IpAddr::V4(v4) => write!(element, "for={v4}"),
            IpAddr::V6(v6) => write!(element, "for=\"[{v6}]\""),
        };
        if let Some(d) = destination {
            let _ = match d.ip().to_canonical() {
                IpAddr::V4(v4) => write!(element, ";by=\"{v4}:{}\"", d.port()),
                IpAddr::V6(v6) => write!(element, ";by=\"[{v6}]:{}\"", d.port()),
            };
        }
        element.push_str(";proto=http");
        Some(Forwarding { mode, xff, element })
    }

    /// Sets both headers on a request about to go to an endpoint: the
    /// client's own replaced (`Replace`: a client can write anything in
    /// them) or extended (`Append`: the client is a trusted proxy).
    /// `host` is the request's `Host` (or h2 `:authority`), as received.
    pub fn apply(&self, headers: &mut HeaderMap, authority: Option<&str>) {
        let append = self.mode == ForwardedHeaders::Append;
        // X-Forwarded-For: the client's address alone, shared by every
        // request of the connection (no allocation), or after the chain.
        let xff = match append.then(|| chain(headers, &X_FORWARDED_FOR)).flatten() {
            Some(prior) => {
                let mut v = prior;
                v.push_str(", ");
                v.push_str(self.xff.to_str().unwrap_or_default());
                HeaderValue::from_maybe_shared(Bytes::from(v)).ok()
            }
            None => Some(self.xff.clone()),
        };
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or(authority);
        let prior = append.then(|| chain(headers, &header::FORWARDED)).flatten();
        let mut forwarded = String::with_capacity(
            prior.as_ref().map_or(0, |p| p.len() + 2)
                + self.element.len()
                + 8
                + host.map_or(0, str::len),
        );
        if let Some(p) = prior {
            forwarded.push_str(&p);
            forwarded.push_str(", ");
        }
        forwarded.push_str(&self.element);
        if let Some(h) = host {
            push_host(&mut forwarded, h);
        }
        headers.remove(&X_FORWARDED_FOR);
        headers.remove(header::FORWARDED);
        if let Some(v) = xff {
            headers.insert(X_FORWARDED_FOR, v);
        }
        if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(forwarded)) {
            headers.insert(header::FORWARDED, v);
        }
    }
}

/// Every line of header `name`, joined as one list (RFC 9110 §5.3); `None`
/// without any (or with one that is not text).
fn chain(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut out: Option<String> = None;
    for v in headers.get_all(name) {
        let v = v.to_str().ok()?.trim();
        if v.is_empty() {
            continue;
        }
        match &mut out {
            Some(o) => {
                o.push_str(", ");
                o.push_str(v);
            }
            None => out = Some(v.to_string()),
        }
    }
    out
}

/// `;host=<host>`: a token as is, else a quoted string (a port's `:` is
/// not a token character); a host that cannot be quoted is left out.
fn push_host(out: &mut String, host: &str) {
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if host.is_empty() || !host.chars().all(|c| c == '\t' || (' '..='~').contains(&c)) {
        return;
    }
    out.push_str(";host=");
    if host.chars().all(tchar) {
        out.push_str(host);
        return;
    }
    out.push('"');
    for c in host.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn get(h: &HeaderMap, name: &str) -> Vec<String> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn off_adds_nothing() {
        assert!(Forwarding::new(ForwardedHeaders::Off, sa("10.0.0.1:1"), None).is_none());
    }

    #[test]
    fn replace_drops_what_the_client_wrote() {
        let f = Forwarding::new(
            ForwardedHeaders::Replace,
            sa("10.200.0.2:40000"),
            Some(sa("10.96.0.10:80")),
        )
        .unwrap();
        let mut h = headers(&[
            ("host", "web.default"),
            ("x-forwarded-for", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6"),
        ]);
        f.apply(&mut h, None);
        assert_eq!(get(&h, "x-forwarded-for"), ["10.200.0.2"]);
        assert_eq!(
            get(&h, "forwarded"),
            ["for=10.200.0.2;by=\"10.96.0.10:80\";proto=http;host=web.default"]
        );
    }

    #[test]
    fn append_extends_every_line_of_the_chain() {
        let f = Forwarding::new(
            ForwardedHeaders::Append,
            sa("10.200.0.2:40000"),
            Some(sa("10.96.0.10:80")),
        )
        .unwrap();
        let mut h = headers(&[
            ("x-forwarded-for", "192.0.2.1"),
            ("x-forwarded-for", "192.0.2.2"),
            ("forwarded", "for=192.0.2.1"),
        ]);
        f.apply(&mut h, Some("web:8080"));
        assert_eq!(
            get(&h, "x-forwarded-for"),
            ["192.0.2.1, 192.0.2.2, 10.200.0.2"]
        );
        assert_eq!(
            get(&h, "forwarded"),
            ["for=192.0.2.1, for=10.200.0.2;by=\"10.96.0.10:80\";proto=http;host=\"web:8080\""]
        );
        // Nothing to append to: as replace.
        let mut h = HeaderMap::new();
        f.apply(&mut h, None);
        assert_eq!(get(&h, "x-forwarded-for"), ["10.200.0.2"]);
        assert_eq!(
            get(&h, "forwarded"),
            ["for=10.200.0.2;by=\"10.96.0.10:80\";proto=http"]
        );
    }

    #[test]
    fn ipv6_nodes_are_bracketed_and_quoted() {
        let f = Forwarding::new(
            ForwardedHeaders::Replace,
            sa("[fd00:200::2]:40000"),
            Some(sa("[fd00:96::10]:80")),
        )
        .unwrap();
        let mut h = HeaderMap::new();
        f.apply(&mut h, Some("[fd00:96::10]"));
        assert_eq!(get(&h, "x-forwarded-for"), ["fd00:200::2"]);
        assert_eq!(
            get(&h, "forwarded"),
            ["for=\"[fd00:200::2]\";by=\"[fd00:96::10]:80\";proto=http;host=\"[fd00:96::10]\""]
        );
        // A mapped address is the IPv4 client it is.
        let f =
            Forwarding::new(ForwardedHeaders::Replace, sa("[::ffff:10.0.0.1]:1"), None).unwrap();
        let mut h = HeaderMap::new();
        f.apply(&mut h, None);
        assert_eq!(get(&h, "forwarded"), ["for=10.0.0.1;proto=http"]);
    }
}
