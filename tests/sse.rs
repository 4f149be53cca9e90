//! Server-Sent Events (`GET /sse`): the same sessions as WebSocket, one way, resumable
//! through the event id.

use std::time::Duration;

use herald_testkit::{eventually, history_rule, http, Node, SseClient, TEST_SECRET};
use serde_json::json;

#[tokio::test]
async fn sse_delivers_and_resumes_every_history_channel_from_the_event_id() {
    let node = Node::start_with(|c| c.channels.rules = vec![history_rule("news:*", 100)]).await;
    let path = "/sse?channel=news%3Aa&channel=news:b&channel=plain";
    let mut s = SseClient::connect(node.addr, path, &[]).await;
    assert_eq!(s.status, 200);
    assert_eq!(s.headers["content-type"], "text/event-stream");
    assert_eq!(s.headers["x-accel-buffering"], "no");
    assert_eq!(s.headers["cache-control"], "no-cache");
    let first = s.next_block().await.unwrap();
    assert!(first.starts_with("retry: "), "{first}");
    assert_eq!(s.event().await.json()["op"], "welcome");
    for _ in 0..3 {
        let sub = s.event().await;
        assert_eq!(sub.json()["op"], "subscribed", "{}", sub.data);
    }
    node.publish_numbers("news:a", 1, 3).await;
    assert_eq!(node.publish("plain", "\"p\"").await, 200);
    node.publish_numbers("news:b", 10, 10).await;
    let mut last_id = None;
    let mut got = Vec::new();
    for _ in 0..5 {
        let e = s.event().await;
        let v = e.json();
        assert_eq!(v["op"], "message", "{}", e.data);
        got.push((v["channel"].as_str().unwrap().to_owned(), v["data"].clone()));
        if e.id.is_some() {
            last_id = e.id;
        }
    }
    assert_eq!(got[3], ("plain".to_owned(), json!("p")));
    let last_id = last_id.expect("history deliveries carry ids");
    assert!(
        last_id.contains("news:a=3~") && last_id.contains("news:b=1~"),
        "{last_id}"
    );
    drop(s);

    // Missed while away: 4..=8 on news:a, 11 on news:b.
    node.publish_numbers("news:a", 4, 8).await;
    node.publish_numbers("news:b", 11, 11).await;
    let mut back = SseClient::connect(node.addr, path, &[("last-event-id", &last_id)]).await;
    assert_eq!(back.event().await.json()["op"], "welcome");
    let mut a = Vec::new();
    let mut b = Vec::new();
    let mut recovered = 0;
    let mut plain = false;
    while a.len() < 5 || b.is_empty() || recovered < 2 || !plain {
        let v = back.event().await.json();
        match (v["op"].as_str(), v["channel"].as_str()) {
            (Some("subscribed"), Some("plain")) => plain = true,
            (Some("subscribed"), _) => {
                assert_eq!(v["recovered"], true, "{v}");
                recovered += 1;
            }
            (Some("message"), Some("news:a")) => a.push(v["data"].as_u64().unwrap()),
            (Some("message"), Some("news:b")) => b.push(v["data"].as_u64().unwrap()),
            other => panic!("unexpected {other:?}: {v}"),
        }
    }
    assert_eq!(a, vec![4, 5, 6, 7, 8]);
    assert_eq!(b, vec![11]);
    // And live again. The resume could also ride in the URL.
    node.publish_numbers("news:a", 9, 9).await;
    assert_eq!(back.event().await.json()["data"], 9);
    let by_query = format!("{path}&last_event_id={}", last_id.replace(',', "%2C"));
    let mut q = SseClient::connect(node.addr, &by_query, &[]).await;
    let mut replayed = 0;
    while replayed < 6 {
        let v = q.event().await.json();
        if v["op"] == "message" && v["channel"] == "news:a" {
            replayed += 1;
        }
    }
    assert_eq!(
        node.metric("herald_connections_by_transport{transport=\"sse\"}"),
        2.0
    );
}

#[tokio::test]
async fn sse_refuses_what_websocket_refuses() {
    let node = Node::start_with(|c| {
        c.auth.jwt.hmac_secret = Some(TEST_SECRET.into());
        c.auth.anonymous = false;
        c.limits.max_sse_channels = 2;
        let mut private = history_rule("private:*", 0);
        private.subscribe = herald_server::config::SubscribeAccess::Claims;
        c.channels.rules = vec![private];
    })
    .await;
    let token = herald_testkit::token("7", 60, json!({}));
    let status = |path: String| {
        let addr = node.addr;
        async move { SseClient::connect(addr, &path, &[]).await.status }
    };
    assert_eq!(status("/sse?channel=news".into()).await, 401, "no token");
    let t = format!("access_token={token}");
    assert_eq!(status(format!("/sse?{t}")).await, 400, "no channel");
    assert_eq!(
        status(format!("/sse?{t}&channel=a&channel=b&channel=c")).await,
        400
    );
    assert_eq!(status(format!("/sse?{t}&channel=bad%20name")).await, 400);
    assert_eq!(status(format!("/sse?{t}&channel=private:x")).await, 403);
    let mut ok = SseClient::connect(node.addr, &format!("/sse?{t}&channel=news"), &[]).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.event().await.json()["user"], "7");
    assert_eq!(ok.event().await.json()["op"], "subscribed");
    assert_eq!(node.publish("news", "1").await, 200);
    assert_eq!(ok.event().await.json()["data"], 1);
    assert_eq!(
        node.metric("herald_connections_rejected_total{reason=\"forbidden\"}"),
        1.0
    );
}

#[tokio::test]
async fn sse_gets_heartbeats_and_a_close_event_on_drain() {
    let mut node = Node::start_with(|c| {
        c.heartbeat.interval = Duration::from_millis(100);
        c.heartbeat.timeout = Duration::from_millis(100);
    })
    .await;
    let mut s = SseClient::connect(node.addr, "/sse?channel=news", &[]).await;
    assert_eq!(s.event().await.json()["op"], "welcome");
    assert_eq!(s.event().await.json()["op"], "subscribed");
    // A silent SSE client is not dead: it cannot answer pings. It gets comments.
    let mut pings = 0;
    while pings < 3 {
        let b = s.next_block().await.expect("open");
        if b == ": ping" {
            pings += 1;
        }
    }
    assert_eq!(node.publish("news", "2").await, 200);
    assert_eq!(s.event().await.json()["data"], 2);
    node.begin_shutdown();
    let close = s.event().await;
    assert_eq!(close.event.as_deref(), Some("close"));
    assert_eq!(close.json()["code"], 1001);
    assert!(
        s.next_event().await.is_none(),
        "the stream ends after the close event"
    );
}

#[tokio::test]
async fn sse_clients_publish_over_http_with_their_token() {
    let node = Node::start_with(|c| {
        c.auth.jwt.hmac_secret = Some(TEST_SECRET.into());
        let mut chat = history_rule("chat:*", 10);
        chat.publish = herald_server::config::PublishAccess::Authenticated;
        c.channels.rules = vec![chat];
    })
    .await;
    let token = herald_testkit::token("7", 60, json!({}));
    let mut s = SseClient::connect(node.addr, "/sse?channel=chat:1", &[]).await;
    assert_eq!(s.event().await.json()["op"], "welcome");
    assert_eq!(s.event().await.json()["op"], "subscribed");
    let post = |auth: Option<String>, ctype: &'static str| {
        let addr = node.addr;
        async move {
            let mut h = vec![("content-type", ctype.to_owned())];
            if let Some(t) = auth {
                h.push(("authorization", format!("Bearer {t}")));
            }
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let body = br#"{"channel":"chat:1","data":{"text":"hi"}}"#.to_vec();
            herald_testkit::http(addr, "POST", "/sse/publish", &h, body).await
        }
    };
    let r = post(Some(token.clone()), "application/json").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["offset"], 1);
    assert_eq!(
        post(None, "application/json").await.status,
        403,
        "anonymous"
    );
    assert_eq!(
        post(Some("bad".into()), "application/json").await.status,
        401
    );
    assert_eq!(post(Some(token), "text/plain").await.status, 415);
    let e = s.event().await;
    assert_eq!(e.json()["data"]["text"], "hi");
    assert!(e.id.unwrap().starts_with("chat:1=1~"));
    // Only the accepted one arrived.
    assert_eq!(node.publish("chat:1", "2").await, 200);
    assert_eq!(s.event().await.json()["data"], 2);
}

/// An SSE client that reads nothing (issue 18): its session is closed as a slow
/// consumer or by the write timeout, and then its HTTP connection goes too, with what it
/// buffered. It used to stay open after the session ended and was no longer counted:
/// 150 such sockets pinned 1.26 GB. Here the client, once the session is gone, reads
/// what the kernel held and then the end of the connection, instead of waiting on a
/// response that never ends. Another subscriber gets every publication meanwhile.
#[tokio::test]
async fn an_sse_client_that_reads_nothing_loses_its_connection_after_its_session() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = Node::start_with(|c| {
        c.limits.outbound_queue_bytes = 64 * 1024;
        c.limits.close_timeout = Duration::from_millis(300);
        c.websocket.write_timeout = Duration::from_millis(500);
    })
    .await;
    let mut other = node.client().await;
    other.subscribe("feed").await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut idle = socket.connect(node.addr).await.unwrap();
    idle.write_all(b"GET /sse?channel=feed HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    eventually("the SSE session", || {
        node.metric("herald_connections") == 2.0
    })
    .await;
    // 4 MB the idle client never reads, 100 publications of 40 KB.
    let big = format!("\"{}\"", "x".repeat(40 * 1024));
    for _ in 0..100 {
        assert_eq!(node.publish("feed", &big).await, 200);
        assert_eq!(other.recv_json().await["op"], "message");
    }
    eventually("the idle session ended", || {
        node.metric("herald_connections") == 1.0
    })
    .await;
    // What is left in the kernel's buffers, then the end: EOF or a reset.
    let mut buf = vec![0u8; 64 * 1024];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match idle.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the connection stayed open after its session ended"
    );
}

/// A client that leaves gives its connection slot back at once: waiting for a gone
/// client's events to be taken (they never will) must not hold it for
/// `limits.close_timeout`. Here the per-address limit is 1 and the timeout 5 s: the
/// client reconnects well within it.
#[tokio::test]
async fn an_sse_client_that_leaves_frees_its_slot_at_once() {
    let node = Node::start_with(|c| {
        c.limits.max_connections_per_ip = 1;
        c.limits.close_timeout = Duration::from_secs(5);
    })
    .await;
    let mut s = SseClient::connect(node.addr, "/sse?channel=feed", &[]).await;
    assert_eq!(s.event().await.json()["op"], "welcome");
    drop(s);
    let left = std::time::Instant::now();
    loop {
        let r = http(node.addr, "GET", "/healthz", &[], vec![]).await;
        assert_eq!(r.status, 200);
        let again = herald_testkit::try_http(node.addr, "GET", "/sse?channel=feed", &[], vec![]);
        match tokio::time::timeout(Duration::from_millis(300), again).await {
            // Admitted: the stream is open (its body never ends, so no full response).
            Err(_) => break,
            Ok(r) => {
                let r = r.expect("an answer");
                assert_eq!(r.status, 429, "{:?}", r.body);
            }
        }
        assert!(
            left.elapsed() < Duration::from_secs(3),
            "the slot was still held 3 s after the client left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `POST /sse/publish` has the WebSocket publish's rate limit (issue 18): per user, or
/// per client address for anonymous clients. Before, 500 anonymous publishes went
/// through in 0.3 s. A client over its rate gets 429 and harms no one: another address
/// and a signed-in user keep their own budgets, and subscribers get exactly what was
/// accepted.
#[tokio::test]
async fn sse_publishes_are_rate_limited_per_user_and_per_address() {
    let node = Node::start_with(|c| {
        c.auth.jwt.hmac_secret = Some(TEST_SECRET.into());
        c.limits.messages_per_second = 1.0;
        c.limits.message_burst = 3;
        c.proxy.trusted = vec!["127.0.0.1/32".parse().unwrap()];
        let mut chat = history_rule("chat:*", 100);
        chat.publish = herald_server::config::PublishAccess::Anyone;
        c.channels.rules = vec![chat];
    })
    .await;
    let mut s = SseClient::connect(node.addr, "/sse?channel=chat:1", &[]).await;
    assert_eq!(s.event().await.json()["op"], "welcome");
    assert_eq!(s.event().await.json()["op"], "subscribed");
    let post = |n: u32, from: &'static str, token: Option<String>| {
        let addr = node.addr;
        async move {
            let mut h = vec![
                ("content-type", "application/json".to_owned()),
                ("x-forwarded-for", from.to_owned()),
            ];
            if let Some(t) = token {
                h.push(("authorization", format!("Bearer {t}")));
            }
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let body = format!(r#"{{"channel":"chat:1","data":{n}}}"#).into_bytes();
            herald_testkit::http(addr, "POST", "/sse/publish", &h, body).await
        }
    };
    let mut statuses = Vec::new();
    for n in 1..=6 {
        statuses.push(post(n, "203.0.113.7", None).await.status);
    }
    assert_eq!(statuses[..3], [200, 200, 200], "{statuses:?}");
    assert_eq!(
        statuses[3..].iter().filter(|&&s| s == 429).count(),
        3,
        "{statuses:?}"
    );
    let refused = post(7, "203.0.113.7", None).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["code"], "rate_limited", "{:?}", refused.body);
    // Another address, and a signed-in user behind the first one: their own budgets.
    assert_eq!(post(8, "203.0.113.8", None).await.status, 200);
    let token = herald_testkit::token("7", 60, json!({}));
    assert_eq!(post(9, "203.0.113.7", Some(token)).await.status, 200);
    let mut data = Vec::new();
    for _ in 0..5 {
        data.push(s.event().await.json()["data"].clone());
    }
    assert_eq!(data, vec![json!(1), json!(2), json!(3), json!(8), json!(9)]);
    assert!(node.metric("herald_client_errors_total{code=\"rate_limited\"}") >= 4.0);
}

/// Idempotency keys from clients live apart from the API's (issue 18): an SSE client
/// that sends the key a backend will use cannot make the backend's publish a
/// `duplicate` (which stored only the client's message).
#[tokio::test]
async fn a_client_cannot_claim_a_backends_idempotency_key() {
    let node = Node::start_with(|c| {
        c.auth.jwt.hmac_secret = Some(TEST_SECRET.into());
        let mut chat = history_rule("chat:*", 10);
        chat.publish = herald_server::config::PublishAccess::Authenticated;
        c.channels.rules = vec![chat];
    })
    .await;
    let mut s = SseClient::connect(node.addr, "/sse?channel=chat:1", &[]).await;
    assert_eq!(s.event().await.json()["op"], "welcome");
    assert_eq!(s.event().await.json()["op"], "subscribed");
    let token = herald_testkit::token("7", 60, json!({}));
    let auth = format!("Bearer {token}");
    let h = [
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    let body = br#"{"channel":"chat:1","data":"from the client","idempotency_key":"order-1"}"#;
    let r = herald_testkit::http(node.addr, "POST", "/sse/publish", &h, body.to_vec()).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // The client's retry is still deduplicated...
    let again = herald_testkit::http(node.addr, "POST", "/sse/publish", &h, body.to_vec()).await;
    assert_eq!(again.json()["duplicate"], true, "{:?}", again.body);
    // ...but the backend's publish with the same key is its own.
    let (status, backend) = node
        .publish_with_key("chat:1", r#""from the backend""#, Some("order-1"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(backend["published"], 1, "{backend}");
    assert_eq!(backend["offset"], 2, "{backend}");
    assert_eq!(s.event().await.json()["data"], "from the client");
    assert_eq!(s.event().await.json()["data"], "from the backend");
}

/// An SSE client that goes away ends its session at once (it used to stay counted, and
/// hold its slot, until the next heartbeat write failed: up to 25 s), and a
/// `Last-Event-ID` naming channels the URL does not name is not repeated in every event
/// id (issue 18).
#[tokio::test]
async fn sse_sessions_end_when_the_client_leaves_and_ids_carry_only_named_channels() {
    let node = Node::start_with(|c| c.channels.rules = vec![history_rule("feed:*", 10)]).await;
    assert_eq!(node.publish("feed:a", "1").await, 200);
    let epoch = {
        let mut probe = node.client().await;
        probe.subscribe_since("feed:a", None).await["epoch"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let junk: Vec<String> = (0..100).map(|i| format!("junk:{i}=1~{epoch}")).collect();
    let id = format!("feed:a=0~{epoch},{}", junk.join(","));
    let mut s = SseClient::connect(
        node.addr,
        "/sse?channel=feed:a",
        &[("last-event-id", id.as_str())],
    )
    .await;
    assert_eq!(s.event().await.json()["op"], "welcome");
    let subscribed = s.event().await;
    assert_eq!(subscribed.json()["recovered"], true);
    let replayed = s.event().await;
    assert_eq!(replayed.json()["data"], 1);
    assert_eq!(
        replayed.id.as_deref(),
        Some(format!("feed:a=1~{epoch}").as_str())
    );
    eventually("one session", || node.metric("herald_connections") == 1.0).await;
    drop(s);
    eventually("the session ended with its client", || {
        node.metric("herald_connections") == 0.0
    })
    .await;
}

/// The SSE endpoints speak CORS, driven by `auth.allowed_origins`: a page on
/// `www.example.com` can stream from a gateway on another origin (with a preflight for
/// its `Authorization` header), an origin not allowed is refused, and a same-origin
/// request, which browsers send without `Origin`, is admitted (it used to get 403
/// whenever `allowed_origins` was set) (issue 18).
#[tokio::test]
async fn sse_speaks_cors_for_allowed_origins() {
    let node = Node::start_with(|c| {
        c.auth.allowed_origins = vec!["https://www.example.com".into()];
    })
    .await;
    let www = "https://www.example.com";
    let same = SseClient::connect(node.addr, "/sse?channel=news", &[]).await;
    assert_eq!(same.status, 200, "same origin (no Origin header)");
    assert!(same.headers.get("access-control-allow-origin").is_none());
    let cross = SseClient::connect(node.addr, "/sse?channel=news", &[("origin", www)]).await;
    assert_eq!(cross.status, 200);
    assert_eq!(cross.headers["access-control-allow-origin"], www);
    let evil = SseClient::connect(
        node.addr,
        "/sse?channel=news",
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(evil.status, 403);
    assert!(evil.headers.get("access-control-allow-origin").is_none());
    // Preflights.
    let pre = |path: &'static str, origin: &'static str| {
        let addr = node.addr;
        async move {
            let h = [
                ("origin", origin),
                ("access-control-request-method", "GET"),
                ("access-control-request-headers", "authorization"),
            ];
            http(addr, "OPTIONS", path, &h, Vec::new()).await
        }
    };
    let ok = pre("/sse", www).await;
    assert_eq!(ok.status, 204);
    assert_eq!(ok.header("access-control-allow-origin"), Some(www));
    assert_eq!(ok.header("access-control-allow-methods"), Some("GET"));
    assert!(ok
        .header("access-control-allow-headers")
        .unwrap()
        .contains("authorization"));
    assert_eq!(
        pre("/sse/publish", www)
            .await
            .header("access-control-allow-methods"),
        Some("POST")
    );
    assert_eq!(pre("/sse", "https://evil.example").await.status, 403);
    // A publish's answer (here a refusal: anonymous clients may not publish) carries
    // the header too, so the page can read it.
    let r = http(
        node.addr,
        "POST",
        "/sse/publish",
        &[("origin", www), ("content-type", "application/json")],
        br#"{"channel":"news","data":1}"#.to_vec(),
    )
    .await;
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some(www),
        "{:?}",
        r.body
    );
}
