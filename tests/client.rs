//! The Rust client (`herald-client`) against real nodes on a real Redis: it resumes a
//! history channel across a node going away, with no loss and no duplicate.

use std::time::Duration;

use herald_client::{Client, Config, Error, Event};
use herald_testkit::{history_rule, Node, RedisServer, WAIT};

async fn next(sub: &mut herald_client::Subscription) -> Event {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("an event within the wait")
        .expect("the client is running")
}

#[tokio::test]
async fn the_rust_client_resumes_across_a_node_restart_without_loss_or_duplicates() {
    let redis = RedisServer::start();
    let url = redis.url();
    let rules = |c: &mut herald_server::GatewayConfig| {
        c.channels.rules = vec![history_rule("feed:*", 1000)]
    };
    let a = Node::start_redis(&url, rules).await;
    let b = Node::start_redis(&url, rules).await;
    let addr = a.addr;
    let mut config = Config::new(a.ws_url());
    config.min_backoff = Duration::from_millis(50);
    config.max_backoff = Duration::from_millis(200);
    let client = Client::start(config);
    let mut sub = client.subscribe("feed:x").unwrap();
    assert_eq!(next(&mut sub).await, Event::Subscribed);
    b.publish_numbers("feed:x", 1, 10).await;
    let mut got = Vec::new();
    while got.len() < 10 {
        if let Event::Message { data, offset } = next(&mut sub).await {
            got.push((String::from_utf8(data.to_vec()).unwrap(), offset.unwrap()));
        }
    }
    // The node goes away (drained: 1001) while publications continue elsewhere.
    a.shutdown().await.unwrap();
    b.publish_numbers("feed:x", 11, 60).await;
    let _a = Node::start_redis_at(addr, &url, rules).await;
    let mut recovered = Vec::new();
    while got.len() < 60 {
        match next(&mut sub).await {
            Event::Message { data, offset } => {
                got.push((String::from_utf8(data.to_vec()).unwrap(), offset.unwrap()))
            }
            Event::Recovered(ok) => recovered.push(ok),
            Event::Subscribed => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let expected: Vec<(String, u64)> = (1..=60).map(|i| (i.to_string(), i)).collect();
    assert_eq!(got, expected, "every publication once, in order");
    assert_eq!(recovered, vec![true]);
    // Still live, and errors come back as errors.
    b.publish_numbers("feed:x", 61, 61).await;
    assert_eq!(
        next(&mut sub).await,
        Event::Message {
            data: "61".into(),
            offset: Some(61)
        }
    );
    let refused = client.publish("feed:x", &serde_json::json!(1)).await;
    assert!(
        matches!(refused, Err(Error::Server { ref code, .. }) if code == "forbidden"),
        "{refused:?}"
    );
    client.close();
}

/// JSON is handed to the application as the publisher wrote it: key order and
/// whitespace kept (it is not parsed and printed again).
#[tokio::test]
async fn the_rust_client_delivers_the_publishers_bytes() {
    let node = Node::start().await;
    let client = Client::start(Config::new(node.ws_url()));
    let mut sub = client.subscribe("news").unwrap();
    assert_eq!(next(&mut sub).await, Event::Subscribed);
    let data = r#"{ "z": 1, "a": [true, "é\u00e9"] }"#;
    let body = format!(r#"{{"channel":"news","data":{data}}}"#);
    let r = herald_testkit::http(
        node.api,
        "POST",
        "/api/publish",
        &[("content-type", "application/json")],
        body.into_bytes(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        next(&mut sub).await,
        Event::Message {
            data: data.into(),
            offset: None
        }
    );
    client.close();
}

/// Subscribing twice to one channel gives two listeners that both receive (the second
/// used to replace the first's events, silently), and dropping one keeps the other.
#[tokio::test]
async fn two_subscriptions_to_one_channel_both_receive() {
    let node = Node::start().await;
    let client = Client::start(Config::new(node.ws_url()));
    let mut first = client.subscribe("news").unwrap();
    assert_eq!(next(&mut first).await, Event::Subscribed);
    let mut second = client.subscribe("news").unwrap();
    assert_eq!(next(&mut second).await, Event::Subscribed);
    assert_eq!(node.publish("news", "1").await, 200);
    for sub in [&mut first, &mut second] {
        assert!(matches!(next(sub).await, Event::Message { data, .. } if &data[..] == b"1"));
    }
    drop(first);
    assert_eq!(node.publish("news", "2").await, 200);
    assert!(matches!(next(&mut second).await, Event::Message { data, .. } if &data[..] == b"2"));
}

/// A subscribe answered `unavailable` (Redis down) is asked again by the client while
/// it stays connected; once Redis is back, the subscription works (issue 18).
#[tokio::test]
async fn the_rust_client_retries_a_subscribe_answered_unavailable() {
    let mut redis = RedisServer::start();
    let node = Node::start_redis(&redis.url(), |c| {
        c.limits.subscribe_timeout = Duration::from_millis(300);
    })
    .await;
    let mut config = Config::new(node.ws_url());
    config.min_backoff = Duration::from_millis(50);
    config.max_backoff = Duration::from_millis(300);
    let client = Client::start(config);
    let mut warm = client.subscribe("warm").unwrap();
    assert_eq!(next(&mut warm).await, Event::Subscribed);
    redis.kill();
    let mut sub = client.subscribe("news").unwrap();
    assert!(matches!(next(&mut sub).await, Event::Unavailable(_)));
    redis.restart();
    loop {
        match next(&mut sub).await {
            Event::Subscribed => break,
            Event::Unavailable(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(node.publish("news", "1").await, 200);
    assert!(matches!(next(&mut sub).await, Event::Message { data, .. } if &data[..] == b"1"));
}

/// With a token source, a connection closed for an expired token (4001) comes back
/// with a fresh one instead of looping on 401 with the old (issue 18).
#[tokio::test]
async fn the_rust_client_reconnects_with_a_fresh_token_after_4001() {
    let node = Node::start_with(|c| {
        c.auth.jwt.hmac_secret = Some(herald_testkit::TEST_SECRET.into());
        c.auth.anonymous = false;
        c.auth.expiry_grace = Duration::from_millis(200);
    })
    .await;
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut config = Config::new(node.ws_url());
    config.min_backoff = Duration::from_millis(50);
    config.max_backoff = Duration::from_millis(300);
    config.token_source = Some(herald_client::TokenSource::new({
        let asked = asked.clone();
        move || {
            asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // Tokens good for 2 s: the first expires during the test.
            async { Some(herald_testkit::token("7", 2, serde_json::json!({}))) }
        }
    }));
    let client = Client::start(config);
    let mut sub = client.subscribe("news").unwrap();
    assert_eq!(next(&mut sub).await, Event::Subscribed);
    // Past the first token's expiry and grace: closed with 4001, then back.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    herald_testkit::eventually("a second connection", || {
        node.metric("herald_close_codes_total{code=\"4001\"}") >= 1.0
            && node.metric("herald_connections") >= 1.0
    })
    .await;
    loop {
        if next(&mut sub).await == Event::Subscribed {
            break;
        }
    }
    assert!(asked.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    assert_eq!(node.publish("news", "1").await, 200);
    assert!(matches!(next(&mut sub).await, Event::Message { data, .. } if &data[..] == b"1"));
}
