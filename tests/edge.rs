//! The client's real address: PROXY protocol v1/v2 (behind a real HAProxy with
//! `send-proxy-v2`) and `X-Forwarded-For` from trusted proxies, and the per-address
//! and per-user connection limits that use it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use herald_testkit::{Client, Haproxy, Node, TEST_SECRET};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Error as WsError;

/// HAProxy passing every connection to `node` with a PROXY v2 header; returns it and
/// its port.
fn haproxy_send_proxy(node: SocketAddr) -> (Haproxy, u16) {
    Haproxy::start("edge", |port| {
        format!(
        "global\n    maxconn 1000\n\
         defaults\n    mode http\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n    timeout tunnel 1h\n\
         frontend public\n    bind 127.0.0.1:{port}\n    default_backend herald\n\
         backend herald\n    option httpchk GET /readyz\n    http-check expect status 200\n\
         \x20   server n0 {node} check inter 100ms fall 1 rise 1 send-proxy-v2\n"
    )
    })
}

/// Opens a TCP connection to `to` from the loopback address `from`.
async fn tcp_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from.parse().unwrap(), 0))?;
    socket.connect(to).await
}

/// The upgrade's outcome over `stream`, after `preface` bytes (a PROXY header) and
/// with extra request headers: `Ok(client)` on 101, `Err(status)` otherwise.
async fn upgrade_over(
    mut stream: TcpStream,
    preface: &[u8],
    to: SocketAddr,
    headers: &[(&str, String)],
) -> Result<Client, u16> {
    stream.write_all(preface).await.unwrap();
    let mut req = format!("ws://{to}/ws").into_client_request().unwrap();
    for (k, v) in headers {
        let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes());
        req.headers_mut().insert(name.unwrap(), v.parse().unwrap());
    }
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    match tokio_tungstenite::client_async(req, stream).await {
        Ok((ws, _)) => Ok(Client::from_stream(ws).await),
        Err(WsError::Http(r)) => Err(r.status().as_u16()),
        Err(e) => Err(match e {
            WsError::Io(_) | WsError::ConnectionClosed | WsError::AlreadyClosed => 0,
            other => panic!("upgrade failed: {other}"),
        }),
    }
}

#[tokio::test]
async fn per_ip_limit_behind_haproxy_with_proxy_protocol_v2() {
    let node = Node::start_split(|c| {
        c.proxy.protocol = true;
        c.limits.max_connections_per_ip = 2;
    })
    .await;
    let (_lb, port) = haproxy_send_proxy(node.addr);
    let lb: SocketAddr = ([127, 0, 0, 1], port).into();
    let via = |from: &'static str| async move {
        let stream = tcp_from(from, lb).await.map_err(|_| 0u16)?;
        upgrade_over(stream, b"", lb, &[]).await
    };
    // Wait for HAProxy to mark the node up (its checks carry the PROXY header too).
    let deadline = Instant::now() + Duration::from_secs(10);
    let a1 = loop {
        match via("127.0.0.2").await {
            Ok(c) => break c,
            Err(s) => assert!(Instant::now() < deadline, "HAProxy not serving: {s}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut a2 = via("127.0.0.2").await.expect("second from .2");
    // The third from 127.0.0.2 is over its limit; 127.0.0.3 is counted apart.
    assert_eq!(via("127.0.0.2").await.err(), Some(429));
    let mut b = via("127.0.0.3").await.expect("first from .3");
    assert_eq!(
        node.metric("herald_connections_rejected_total{reason=\"per_ip\"}"),
        1.0
    );

    // A connection straight to the node, without a PROXY header, is dropped.
    let direct = TcpStream::connect(node.addr).await.unwrap();
    assert!(upgrade_over(direct, b"", node.addr, &[]).await.is_err());
    herald_testkit::eventually("the headerless connection is counted", || {
        node.metric("herald_connections_rejected_total{reason=\"proxy_protocol\"}") >= 1.0
    })
    .await;

    // Closing one frees its address's slot; the others were never disturbed.
    a1.close().await;
    herald_testkit::eventually("the slot is given back", || {
        node.metric("herald_connections") == 2.0
    })
    .await;
    let _a3 = via("127.0.0.2").await.expect("a freed slot");
    a2.subscribe("news").await;
    b.subscribe("news").await;
    assert_eq!(node.publish("news", "1").await, 200);
    assert_eq!(a2.recv_json().await["data"], 1);
    assert_eq!(b.recv_json().await["data"], 1);
}

#[tokio::test]
async fn proxy_protocol_v1_names_the_client() {
    let node = Node::start_split(|c| {
        c.proxy.protocol = true;
        c.limits.max_connections_per_ip = 1;
    })
    .await;
    let to = node.addr;
    let from = |ip: &str| format!("PROXY TCP4 {ip} 127.0.0.1 40000 80\r\n").into_bytes();
    let connect = |preface: Vec<u8>| async move {
        let s = TcpStream::connect(to).await.unwrap();
        upgrade_over(s, &preface, to, &[]).await
    };
    let _one = connect(from("203.0.113.7")).await.expect("first from .7");
    assert_eq!(connect(from("203.0.113.7")).await.err(), Some(429));
    let _other = connect(from("203.0.113.8")).await.expect("first from .8");
    // A garbled header is no header.
    assert!(connect(b"PROXY TCP4 nonsense\r\n".to_vec()).await.is_err());
    assert!(connect(b"GET / HTTP/1.1\r\n\r\n".to_vec()).await.is_err());
    herald_testkit::eventually("both are counted", || {
        node.metric("herald_connections_rejected_total{reason=\"proxy_protocol\"}") >= 2.0
    })
    .await;
    assert_eq!(node.metric("herald_connections"), 2.0);
}

/// A PROXY header that arrives in pieces is read as the pieces come, each read waiting
/// for data (it used to be peeked in a loop until complete: a thousand partial headers
/// kept a core busy). Headers split anywhere still name the client, the request after
/// them is intact, and 200 connections stalled mid-header do not keep another client
/// out.
#[tokio::test]
async fn proxy_headers_in_pieces_are_read_without_polling() {
    let node = Node::start_split(|c| {
        c.proxy.protocol = true;
        c.limits.max_connections_per_ip = 1;
    })
    .await;
    let to = node.addr;
    let mut stalled = Vec::new();
    for i in 0..200 {
        let mut s = TcpStream::connect(to).await.unwrap();
        let piece: &[u8] = if i % 2 == 0 {
            b"PROXY TCP4 203.0"
        } else {
            b"\r\n\r\n\0\r\nQU"
        };
        s.write_all(piece).await.unwrap();
        stalled.push(s);
    }
    let v1 = b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 80\r\n".to_vec();
    // 203.0.113.<last>:40000 -> 127.0.0.1:80, TCP over IPv4.
    let v2 = |last: u8| {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
        h.extend_from_slice(&[203, 0, 113, last, 127, 0, 0, 1, 0x9c, 0x40, 0, 80]);
        h
    };
    let mut held = Vec::new();
    for (header, split) in [(v1.clone(), 9), (v2(10), 5), (v2(11), 14)] {
        let mut s = TcpStream::connect(to).await.unwrap();
        s.write_all(&header[..split]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        let client = upgrade_over(s, &header[split..], to, &[]).await;
        held.push(client.expect("upgraded (and welcomed) after a header in two pieces"));
    }
    // The per-address limit (1) saw the headers' addresses: .9 is taken now.
    let s = TcpStream::connect(to).await.unwrap();
    assert_eq!(upgrade_over(s, &v1, to, &[]).await.err(), Some(429));
    drop(stalled);
}

#[tokio::test]
async fn forwarded_for_counts_only_from_trusted_proxies() {
    let trusting = Node::start_with(|c| {
        c.proxy.trusted = vec!["127.0.0.0/8".parse().unwrap()];
        c.limits.max_connections_per_ip = 1;
    })
    .await;
    let xff = |ip: &str| vec![("x-forwarded-for", format!("198.51.100.99, {ip}"))];
    let connect = |node: SocketAddr, headers: Vec<(&'static str, String)>| async move {
        let s = TcpStream::connect(node).await.unwrap();
        upgrade_over(s, b"", node, &headers).await
    };
    let _a = connect(trusting.addr, xff("198.51.100.1"))
        .await
        .expect("a");
    assert_eq!(
        connect(trusting.addr, xff("198.51.100.1")).await.err(),
        Some(429)
    );
    let _b = connect(trusting.addr, xff("198.51.100.2"))
        .await
        .expect("b");
    // IPv6 clients count per /64 (limits.ipv6_prefix): one host holds a whole /64.
    let _v6 = connect(trusting.addr, xff("2001:db8:1:2::1"))
        .await
        .expect("v6");
    assert_eq!(
        connect(trusting.addr, xff("2001:db8:1:2::ffff"))
            .await
            .err(),
        Some(429),
        "another address of the same /64"
    );
    let _other = connect(trusting.addr, xff("2001:db8:1:3::1"))
        .await
        .expect("another /64");
    // Without trusted proxies the header is ignored: all share 127.0.0.1.
    let plain = Node::start_with(|c| c.limits.max_connections_per_ip = 1).await;
    let _c = connect(plain.addr, xff("198.51.100.3")).await.expect("c");
    assert_eq!(
        connect(plain.addr, xff("198.51.100.4")).await.err(),
        Some(429)
    );
}

#[tokio::test]
async fn per_user_limit_counts_a_users_connections_on_a_node() {
    let node = Node::start_with(|c| {
        c.auth.jwt.hmac_secret = Some(TEST_SECRET.into());
        c.limits.max_connections_per_user = 2;
    })
    .await;
    let token = |sub: &str| herald_testkit::token(sub, 60, json!({}));
    let connect = |sub: Option<String>| async {
        let s = TcpStream::connect(node.addr).await.unwrap();
        let headers: Vec<(&str, String)> = sub
            .map(|t| vec![("authorization", format!("Bearer {t}"))])
            .unwrap_or_default();
        upgrade_over(s, b"", node.addr, &headers).await
    };
    let _first = connect(Some(token("42"))).await.expect("1");
    let _second = connect(Some(token("42"))).await.expect("2");
    assert_eq!(connect(Some(token("42"))).await.err(), Some(429));
    let _other = connect(Some(token("43"))).await.expect("another user");
    // Anonymous connections belong to no user.
    let _anon: Vec<Client> = futures_util::future::join_all((0..3).map(|_| connect(None)))
        .await
        .into_iter()
        .map(|c| c.expect("anonymous"))
        .collect();
    assert_eq!(
        node.metric("herald_connections_rejected_total{reason=\"per_user\"}"),
        1.0
    );
}
