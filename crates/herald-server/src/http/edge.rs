//! Who the client is: its real address behind a load balancer (the PROXY protocol
//! header, v1 text or v2 binary, at the start of a connection, and `X-Forwarded-For`
//! from trusted proxies only), and the bearer credential it presents.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hyper::header::HeaderMap;
use ipnet::IpNet;
use ppp::{v1, v2, HeaderResult};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The longest PROXY header accepted: v1 is at most 107 bytes; v2 carries 12 (IPv4)
/// or 36 (IPv6) address bytes plus TLVs, which HAProxy keeps small.
const MAX_HEADER: usize = 512;

/// Why a connection that had to start with a PROXY header is dropped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    /// The connection began with something else, or a malformed header.
    #[error("no PROXY protocol header: {0}")]
    Invalid(String),
    /// No complete header within `limits.handshake_timeout`.
    #[error("the PROXY protocol header did not arrive in time")]
    Timeout,
    /// The socket failed while the header was read.
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the PROXY header off `stream` (and nothing after it) and returns the client
/// address it names; for a v2 `LOCAL` or v1 `UNKNOWN` header (the proxy's own health
/// checks) the connection's own peer address.
pub(crate) async fn read_proxy_header(
    stream: &mut TcpStream,
    peer: SocketAddr,
    limit: Duration,
) -> Result<SocketAddr, ProxyError> {
    tokio::time::timeout(limit, read(stream, peer))
        .await
        .map_err(|_| ProxyError::Timeout)?
}

/// The longest v1 header (the spec's bound, CRLF included).
const MAX_V1: usize = 107;

/// Reads exactly the header's bytes, never one past it (they are HTTP's), each read
/// waiting for data: a header that arrives slowly, or never, costs a parked task, not
/// a polling loop (peeking until the whole header was buffered spun once per
/// millisecond or two per connection: a thousand partial headers used a core).
async fn read(stream: &mut TcpStream, peer: SocketAddr) -> Result<SocketAddr, ProxyError> {
    let closed = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProxyError::Invalid("the connection closed".into()),
        _ => ProxyError::Io(e),
    };
    let mut buf = vec![0u8; 6];
    stream.read_exact(&mut buf).await.map_err(closed)?;
    if buf == b"PROXY " {
        // v1: a line; byte by byte up to its CRLF (it comes in one segment, so these
        // reads find their byte buffered).
        while !buf.ends_with(b"\r\n") {
            if buf.len() >= MAX_V1 {
                return Err(ProxyError::Invalid("v1 header too long".into()));
            }
            buf.push(stream.read_u8().await.map_err(closed)?);
        }
    } else if buf == V2_SIGNATURE[..6] {
        // v2: 16 bytes, the last two the length of what follows.
        buf.resize(16, 0);
        stream.read_exact(&mut buf[6..]).await.map_err(closed)?;
        let len = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if len > MAX_HEADER {
            return Err(ProxyError::Invalid("header too long".into()));
        }
        buf.resize(len, 0);
        stream.read_exact(&mut buf[16..]).await.map_err(closed)?;
    } else {
        return Err(ProxyError::Invalid(format!(
            "the connection starts with {:?}",
            String::from_utf8_lossy(&buf)
        )));
    }
    let addr = match HeaderResult::parse(&buf) {
        HeaderResult::V1(Ok(h)) => v1_source(&h.addresses),
        HeaderResult::V2(Ok(h)) => v2_source(&h),
        HeaderResult::V1(Err(e)) => return Err(ProxyError::Invalid(e.to_string())),
        HeaderResult::V2(Err(e)) => return Err(ProxyError::Invalid(e.to_string())),
    };
    Ok(addr.unwrap_or(peer))
}

/// The v2 header's first 12 bytes.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

fn v1_source(a: &v1::Addresses) -> Option<SocketAddr> {
    match a {
        v1::Addresses::Tcp4(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        v1::Addresses::Tcp6(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        v1::Addresses::Unknown => None,
    }
}

fn v2_source(h: &v2::Header<'_>) -> Option<SocketAddr> {
    if h.command == v2::Command::Local {
        return None;
    }
    match &h.addresses {
        v2::Addresses::IPv4(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        v2::Addresses::IPv6(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        _ => None,
    }
}

/// The credential of an `Authorization: Bearer <credential>` header (an API key, a
/// metrics key, a connection token).
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// The client's address: `peer` itself, unless `peer` is a trusted proxy; then the
/// right-most address in `X-Forwarded-For` that is not a trusted proxy (addresses to
/// its left were written by the client and could be anything). A hop that is no address
/// was not written by a trusted proxy either: nothing to its left is believed, and the
/// last trusted hop is taken (skipping it would make a forged hop the client).
pub(crate) fn client_ip(headers: &HeaderMap, peer: IpAddr, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().unwrap_or("?"))
        .flat_map(|v| v.split(','))
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) if is_trusted(&ip) => client = ip,
            Ok(ip) => return ip,
            Err(_) => return client,
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "1.2.3.4, 5.6.7.8, 10.0.0.9".parse().unwrap(),
        );
        let proxy: IpAddr = "10.1.1.1".parse().unwrap();
        let stranger: IpAddr = "9.9.9.9".parse().unwrap();
        // From the proxy: the right-most untrusted hop (1.2.3.4 may be forged).
        assert_eq!(
            client_ip(&h, proxy, &trusted),
            "5.6.7.8".parse::<IpAddr>().unwrap()
        );
        // From anyone else the header is ignored.
        assert_eq!(client_ip(&h, stranger, &trusted), stranger);
        assert_eq!(client_ip(&h, proxy, &[]), proxy);
        // No header, or only proxies in it.
        assert_eq!(client_ip(&HeaderMap::new(), proxy, &trusted), proxy);
        h.insert("x-forwarded-for", "10.0.0.7".parse().unwrap());
        assert_eq!(
            client_ip(&h, proxy, &trusted),
            "10.0.0.7".parse::<IpAddr>().unwrap()
        );
        // A hop that is no address ends the walk at the last trusted hop: the forged
        // address to its left is not believed.
        h.insert(
            "x-forwarded-for",
            "6.6.6.6, junk, 10.0.0.9".parse().unwrap(),
        );
        assert_eq!(
            client_ip(&h, proxy, &trusted),
            "10.0.0.9".parse::<IpAddr>().unwrap()
        );
        h.insert("x-forwarded-for", "6.6.6.6, 1.2.3.4:80".parse().unwrap());
        assert_eq!(client_ip(&h, proxy, &trusted), proxy);
    }
}
