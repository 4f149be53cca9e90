//! Every limit: its reply, and that nobody else is harmed.

use std::time::Duration;

use futures_util::StreamExt;
use herald_testkit::{eventually, history_rule, http, Client, Node};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};

/// A bystander subscribed to `calm` still receives a fresh publication.
async fn bystander_unharmed(node: &Node, bystander: &mut Client) {
    assert_eq!(node.publish("calm", r#""still here""#).await, 200);
    assert_eq!(bystander.recv_json().await["data"], "still here");
}

#[tokio::test]
async fn oversize_message_closes_with_1009() {
    let node = Node::start_with(|c| c.limits.max_message_bytes = 1024).await;
    let mut bystander = node.client().await;
    bystander.subscribe("calm").await;
    let mut c = node.client().await;
    // At the limit is fine.
    let pad = "x".repeat(1024 - r#"{"op":"ping","pad":""}"#.len());
    c.send_text(&format!(r#"{{"op":"ping","pad":"{pad}"}}"#))
        .await;
    assert_eq!(c.recv_json().await["op"], "pong");
    // One byte over is not.
    let pad = "x".repeat(1025 - r#"{"op":"ping","pad":""}"#.len());
    c.send_text(&format!(r#"{{"op":"ping","pad":"{pad}"}}"#))
        .await;
    let (closed, _) = c.closed().await;
    assert_eq!(closed.code, Some(1009), "{closed:?}");
    bystander_unharmed(&node, &mut bystander).await;
    eventually("the closed session is counted", || {
        node.metric(r#"herald_close_codes_total{code="1009"}"#) == 1.0
    })
    .await;
}

#[tokio::test]
async fn rate_limit_errors_then_closes_with_1008() {
    let node = Node::start_with(|c| {
        c.limits.messages_per_second = 0.5;
        c.limits.message_burst = 5;
        c.limits.rate_limit_strikes = 3;
    })
    .await;
    let mut bystander = node.client().await;
    bystander.subscribe("calm").await;
    let mut c = node.client().await;
    for i in 0..5 {
        c.send_text(&format!(r#"{{"op":"ping","id":{i}}}"#)).await;
        assert_eq!(c.recv_json().await["op"], "pong");
    }
    for _ in 0..4 {
        c.send_text(r#"{"op":"ping"}"#).await;
    }
    let mut limited = 0;
    loop {
        match c.ws().next().await {
            Some(Ok(Message::Text(t))) => {
                assert!(t.contains(r#""code":"rate_limited""#), "{t}");
                limited += 1;
            }
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 1008);
                assert_eq!(f.reason.as_str(), "rate limit exceeded");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(limited, 4, "every refused message was answered");
    bystander_unharmed(&node, &mut bystander).await;
}

/// Strikes are not cleared by the messages that get through: a client that keeps
/// sending at twice its rate is closed, and each refusal names the request it refused.
#[tokio::test]
async fn a_client_steadily_over_its_rate_is_closed() {
    let node = Node::start_with(|c| {
        c.limits.messages_per_second = 20.0;
        c.limits.message_burst = 1;
        c.limits.rate_limit_strikes = 5;
        c.limits.rate_limit_window = Duration::from_secs(10);
    })
    .await;
    let mut bystander = node.client().await;
    bystander.subscribe("calm").await;
    let mut c = node.client().await;
    let mut refused_ids = Vec::new();
    let mut closed = None;
    'send: for i in 0..200u64 {
        // 40 per second: every other message is over the rate.
        c.send_text(&format!(r#"{{"op":"ping","id":{i}}}"#)).await;
        tokio::time::sleep(Duration::from_millis(25)).await;
        while let Ok(Some(msg)) =
            tokio::time::timeout(Duration::from_millis(1), c.ws().next()).await
        {
            match msg {
                Ok(Message::Text(t)) if t.contains("rate_limited") => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    refused_ids.push(v["id"].as_u64().expect("the refused request's id"));
                }
                Ok(Message::Text(t)) => assert!(t.contains("pong"), "{t}"),
                Ok(Message::Close(f)) => {
                    closed = f.map(|f| u16::from(f.code));
                    break 'send;
                }
                Ok(_) => {}
                Err(_) => break 'send,
            }
        }
    }
    assert_eq!(closed, Some(1008), "closed for exceeding the rate");
    assert!(refused_ids.len() > 5, "{refused_ids:?}");
    assert!(
        refused_ids.windows(2).all(|w| w[0] < w[1]),
        "{refused_ids:?}"
    );
    bystander_unharmed(&node, &mut bystander).await;
}

#[tokio::test]
async fn connection_limit_answers_503_before_upgrade() {
    let node = Node::start_with(|c| c.limits.max_connections = 2).await;
    let mut a = node.client().await;
    let b = node.client().await;
    match Client::connect(&node.ws_url()).await {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
            let body: serde_json::Value =
                serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["code"], "unavailable");
        }
        Err(e) => panic!("expected HTTP 503, got {e}"),
        Ok(_) => panic!("a third connection was accepted"),
    }
    assert_eq!(
        node.metric(r#"herald_connections_rejected_total{reason="limit"}"#),
        1.0
    );
    // The two admitted clients are unaffected, and a freed slot is reusable.
    a.send_text(r#"{"op":"ping","id":1}"#).await;
    assert_eq!(a.recv_json().await["op"], "pong");
    b.close().await;
    eventually("the slot is free", || {
        node.metric("herald_connections") == 1.0
    })
    .await;
    Client::connect(&node.ws_url())
        .await
        .expect("slot reusable");
}

#[tokio::test]
async fn half_open_handshakes_are_dropped() {
    let node = Node::start_with(|c| c.limits.handshake_timeout = Duration::from_millis(300)).await;
    let mut bystander = node.client().await;
    bystander.subscribe("calm").await;
    // One sends nothing, one sends half a request.
    let started = tokio::time::Instant::now();
    let mut silent = TcpStream::connect(node.addr).await.unwrap();
    let mut partial = TcpStream::connect(node.addr).await.unwrap();
    partial
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        .await
        .unwrap();
    for s in [&mut silent, &mut partial] {
        let mut buf = [0u8; 512];
        // The server answers (408 or nothing) and closes; read to EOF.
        loop {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => continue,
                Err(_) => panic!("half-open connection kept for 5 s"),
            }
        }
        assert!(started.elapsed() >= Duration::from_millis(200));
    }
    bystander_unharmed(&node, &mut bystander).await;
    eventually("both are counted", || {
        node.metric(r#"herald_connections_rejected_total{reason="handshake_timeout"}"#) == 2.0
    })
    .await;
}

#[tokio::test]
async fn dead_peer_is_closed_by_heartbeat_live_peer_is_kept() {
    let node = Node::start_with(|c| {
        c.heartbeat.interval = Duration::from_millis(200);
        c.heartbeat.timeout = Duration::from_millis(300);
    })
    .await;
    let mut live = node.client().await;
    live.subscribe("calm").await;
    let mut dead = node.client().await;
    // `dead` reads nothing, so its client never answers pings. `live` keeps reading,
    // and tungstenite answers each ping with a pong.
    live.expect_silence(Duration::from_millis(1500)).await;
    let (closed, _) = dead.closed().await;
    assert_eq!(closed.code, Some(1008));
    assert_eq!(closed.reason, "heartbeat timeout");
    bystander_unharmed(&node, &mut live).await;
    eventually("the dead session is gone", || {
        node.metric("herald_connections") == 1.0
    })
    .await;
}

/// A subscriber that stops reading is closed with 1013 once its queue overflows; a
/// healthy subscriber on the same channel receives every message meanwhile.
#[tokio::test]
async fn slow_consumer_is_closed_with_1013_and_nobody_else_suffers() {
    const N: usize = 600;
    const SIZE: usize = 32 * 1024;
    let node = Node::start_with(|c| {
        c.limits.outbound_queue_bytes = 256 * 1024;
        c.limits.close_timeout = Duration::from_secs(8);
    })
    .await;
    let mut slow = Client::connect_with_small_buffer(node.addr).await;
    slow.subscribe("firehose").await;
    let mut healthy = node.client().await;
    healthy.subscribe("firehose").await;

    let filler = "y".repeat(SIZE);
    let mut received = 0;
    for i in 0..N {
        let data = format!(r#"{{"i":{i},"pad":"{filler}"}}"#);
        assert_eq!(node.publish("firehose", &data).await, 200);
        let m = healthy.recv_json().await;
        assert_eq!(
            m["data"]["i"], i,
            "healthy subscriber got every message in order"
        );
        received += 1;
    }
    assert_eq!(received, N);
    eventually("the slow consumer is flagged", || {
        node.metric("herald_slow_consumer_disconnects_total") == 1.0
    })
    .await;
    // Now the slow client reads: what fit in its buffers, then the 1013.
    let (closed, frames) = slow.closed().await;
    assert_eq!(closed.code, Some(1013), "{closed:?}");
    assert_eq!(closed.reason, "slow consumer");
    assert!(
        frames < N,
        "the slow client cannot have received everything"
    );
    assert!(node.metric(r#"herald_messages_dropped_total{reason="slow_consumer"}"#) >= 1.0);
    // The healthy one is still connected and served.
    assert_eq!(node.publish("firehose", "0").await, 200);
    assert_eq!(healthy.recv_json().await["data"], 0);
}

/// With `limits.socket_send_buffer_bytes`, the kernel holds little of a reader's
/// backlog: a subscriber that stops reading is found slow after about its queue's worth
/// (with the kernel's own sizing it first takes megabytes: the test above sends 19 MiB).
#[tokio::test]
async fn a_small_socket_send_buffer_finds_a_stopped_reader_within_its_queue() {
    const SIZE: usize = 1024;
    let node = Node::start_with(|c| {
        c.limits.outbound_queue_bytes = 128 * 1024;
        c.limits.socket_send_buffer_bytes = 16 * 1024;
    })
    .await;
    let mut slow = Client::connect_with_small_buffer(node.addr).await;
    slow.subscribe("firehose").await;
    let mut healthy = node.client().await;
    healthy.subscribe("firehose").await;
    let filler = "y".repeat(SIZE);
    let mut published = 0usize;
    while node.metric("herald_slow_consumer_disconnects_total") == 0.0 {
        assert!(
            published < 2000,
            "2 MiB published and the stopped reader is not found slow"
        );
        let data = format!(r#"{{"i":{published},"pad":"{filler}"}}"#);
        assert_eq!(node.publish("firehose", &data).await, 200);
        assert_eq!(healthy.recv_json().await["data"]["i"], published);
        published += 1;
    }
    // The queue (128 KiB), the kernel's doubled 16 KiB and the reader's small receive
    // buffer: well under 300 KiB.
    assert!(
        published * SIZE < 300 * 1024,
        "{published} KiB published before the reader was found slow"
    );
    let (closed, _) = slow.closed().await;
    assert_eq!(closed.code, Some(1013), "{closed:?}");
    assert_eq!(node.publish("firehose", "0").await, 200);
    assert_eq!(healthy.recv_json().await["data"], 0);
}

#[tokio::test]
async fn non_websocket_requests_to_ws_get_400() {
    let node = Node::start().await;
    let r = http(node.addr, "GET", "/ws", &[], vec![]).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "bad_request");
}

#[tokio::test]
async fn origin_allow_list() {
    let node =
        Node::start_with(|c| c.auth.allowed_origins = vec!["https://app.example".into()]).await;
    let connect = |origin: &'static str| {
        let url = node.ws_url();
        async move {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let mut req = url.into_client_request().unwrap();
            req.headers_mut().insert("origin", origin.parse().unwrap());
            tokio_tungstenite::connect_async(req).await
        }
    };
    match connect("https://evil.example").await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }
    assert!(connect("https://app.example").await.is_ok());
}

/// A peer whose TCP stack is alive but that reads nothing cannot take a draining close
/// that first flushes its queue: the closing deadline (`websocket.write_timeout` from
/// the close) drops what is left, so the drain ends at once instead of holding the
/// session (its queue, its connection slot) until the grace period, and the drop is
/// counted.
#[tokio::test]
async fn a_stalled_peer_is_dropped_at_the_write_deadline() {
    let mut node = Node::start_with(|c| {
        c.limits.outbound_queue_bytes = 64 << 20;
        c.limits.max_body_bytes = 1 << 20;
        c.websocket.write_timeout = Duration::from_millis(300);
        c.limits.close_timeout = Duration::from_millis(300);
        c.shutdown.drain_window = Duration::from_millis(10);
        c.shutdown.grace_period = Duration::from_secs(30);
    })
    .await;
    let mut stalled = Client::connect_with_small_buffer(node.addr).await;
    stalled.subscribe("firehose").await;
    // Far more than the kernel's socket buffers can hold: the writer blocks.
    let filler = "z".repeat(100_000);
    for i in 0..100 {
        let data = format!(r#"{{"i":{i},"pad":"{filler}"}}"#);
        assert_eq!(node.publish("firehose", &data).await, 200);
    }
    eventually("the writer is stuck", || {
        node.metric("herald_outbound_queue_bytes") > 1_000_000.0
    })
    .await;
    let metrics = node.metrics.clone();
    node.begin_shutdown();
    let started = std::time::Instant::now();
    node.shutdown().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the drain waited {:?} on a stalled socket",
        started.elapsed()
    );
    // Its close frame may still have gone into the (enlarged) socket buffer, or not
    // (counted in write_timeouts); either way the drain ended, and the queue with it.
    assert_eq!(metrics.connections.get(), 0);
    assert_eq!(metrics.outbound_queue_bytes.get(), 0, "its queue was freed");
    assert!(
        metrics.dropped_total(herald_metrics::DropReason::Disconnected) >= 1,
        "what it never got is counted"
    );
    drop(stalled);
}

/// A slow POST cannot hold a connection and a body buffer: 408 at the body deadline.
/// And the node holds at most `limits.max_http_connections` HTTP connections: idle ones
/// past it are closed at once, counted, and nobody else is affected.
#[tokio::test]
async fn slow_bodies_and_too_many_http_connections_are_refused() {
    let node = Node::start_with(|c| {
        c.limits.body_timeout = Duration::from_millis(300);
        c.limits.max_http_connections = 4;
        c.limits.handshake_timeout = Duration::from_secs(20);
    })
    .await;
    let mut bystander = node.client().await;
    bystander.subscribe("calm").await;

    let mut slow = TcpStream::connect(node.api).await.unwrap();
    slow.write_all(
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"chan",
    )
    .await
    .unwrap();
    let started = tokio::time::Instant::now();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("request_timeout"), "{reply}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // Four idle connections take every HTTP slot; a fifth is closed at once.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(node.api).await.unwrap());
    }
    eventually("the idle connections are served", || {
        node.metric(r#"herald_connections_rejected_total{reason="http_limit"}"#) == 0.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fifth = TcpStream::connect(node.api).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(2), fifth.read(&mut buf))
        .await
        .expect("closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0, "the fifth connection is closed without an answer");
    assert_eq!(
        node.metric(r#"herald_connections_rejected_total{reason="http_limit"}"#),
        1.0
    );
    // WebSocket sessions are not HTTP connections: the bystander still works; and once
    // the idle connections go, HTTP is served again.
    drop(idle);
    tokio::time::sleep(Duration::from_millis(200)).await;
    bystander_unharmed(&node, &mut bystander).await;
}

/// A publication larger than a subscriber's whole queue is refused on every path (it
/// used to close every subscriber of the channel with 1013, and stay in history to do
/// it again to each resume); `/sse/publish` applies `max_message_bytes` like a
/// WebSocket publish (issue 18).
#[tokio::test]
async fn a_publication_no_queue_can_hold_is_refused_and_harms_no_subscriber() {
    let node = Node::start_with(|c| {
        c.limits.outbound_queue_bytes = 64 * 1024;
        c.limits.max_message_bytes = 16 * 1024;
        c.channels.rules = vec![history_rule("news", 10)];
        c.channels.rules[0].publish = herald_server::config::PublishAccess::Anyone;
    })
    .await;
    let mut sub = node.client().await;
    sub.subscribe("news").await;
    let big = format!(
        r#"{{"channel":"news","data":"{}"}}"#,
        "x".repeat(100 * 1024)
    );
    let json = [("content-type", "application/json")];
    let r = http(
        node.api,
        "POST",
        "/api/publish",
        &json,
        big.clone().into_bytes(),
    )
    .await;
    assert_eq!(r.status, 413, "{:?}", r.body);
    assert_eq!(r.json()["code"], "too_large");
    let batch = format!(r#"{{"publications":[{big}]}}"#);
    let r = http(node.api, "POST", "/api/batch", &json, batch.into_bytes()).await;
    assert_eq!(r.status, 413, "{:?}", r.body);
    // Over max_message_bytes, under the queue: refused on /sse/publish as on a socket.
    let mid = format!(r#"{{"channel":"news","data":"{}"}}"#, "y".repeat(20 * 1024));
    let r = http(node.addr, "POST", "/sse/publish", &json, mid.into_bytes()).await;
    assert_eq!(r.status, 413, "{:?}", r.body);
    // The subscriber was not touched and still receives.
    assert_eq!(node.publish("news", "1").await, 200);
    assert_eq!(sub.recv_json().await["data"], 1);
    assert_eq!(node.metric("herald_slow_consumer_disconnects_total"), 0.0);
}

/// A client that closes while far behind gets the close answered next, not after its
/// backlog (RFC 6455 5.5.1: "as soon as practical"); the backlog is dropped and
/// counted, every delivery is counted once (delivered or dropped), and a subscriber
/// of the same channel gets everything.
#[tokio::test]
async fn a_peers_close_is_answered_before_its_backlog() {
    const N: usize = 200;
    let node = Node::start_with(|c| c.limits.outbound_queue_bytes = 16 * 1024 * 1024).await;
    let mut behind = Client::connect_with_small_buffer(node.addr).await;
    behind.subscribe("firehose").await;
    let mut healthy = node.client().await;
    healthy.subscribe("firehose").await;
    let filler = "y".repeat(32 * 1024);
    for i in 0..N {
        let data = format!(r#"{{"i":{i},"pad":"{filler}"}}"#);
        assert_eq!(node.publish("firehose", &data).await, 200);
        assert_eq!(healthy.recv_json().await["data"]["i"], i);
    }
    // `behind` read nothing: most of the 6.4 MB wait in its queue.
    behind
        .ws()
        .close(Some(tungstenite::protocol::CloseFrame {
            code: tungstenite::protocol::frame::coding::CloseCode::Normal,
            reason: "bye".into(),
        }))
        .await
        .unwrap();
    let (closed, frames) = behind.closed().await;
    assert_eq!(closed.code, Some(1000), "the close is echoed: {closed:?}");
    assert_eq!(closed.reason, "bye");
    assert!(
        frames < N / 2,
        "{frames} of {N} frames came before the close: it waited behind the queue"
    );
    eventually("every delivery is counted once", || {
        let delivered = node.metric("herald_messages_delivered_total");
        let dropped = node.metric(r#"herald_messages_dropped_total{reason="disconnected"}"#);
        delivered + dropped == (2 * N) as f64 && dropped >= (N / 2) as f64
    })
    .await;
    assert_eq!(node.metric("herald_outbound_queue_bytes"), 0.0);
    assert_eq!(node.publish("firehose", "0").await, 200);
    assert_eq!(healthy.recv_json().await["data"], 0);
}
