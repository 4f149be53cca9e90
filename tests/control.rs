//! The control API across nodes: two nodes on one real Redis, clients of two users on
//! both; every call is a survey of every node, and what it does is checked on the
//! clients' sockets (close codes, unsolicited `subscribed` / `unsubscribed`, messages)
//! as well as in the counts it answers. Bad calls get their status and touch nobody.

use std::time::{Duration, Instant};

use herald_testkit::{http, token, Client, Node, RedisServer, TEST_SECRET};
use serde_json::{json, Value};

const KEY: &str = "control-test-key";
const SCOPED: &str = "control-scoped-key";

async fn node(id: &str, redis: &RedisServer) -> Node {
    let id = id.to_owned();
    Node::start_redis(&redis.url(), move |c| {
        c.node_id = id;
        c.auth.jwt.hmac_secret = Some(TEST_SECRET.into());
        c.auth.api_key = Some(KEY.into());
        c.auth.api_keys = vec![herald_auth::ApiKeyConfig {
            key: SCOPED.into(),
            channels: herald_protocol::ChannelPatterns::new(["sports"]).unwrap(),
        }];
        c.control.heartbeat_interval = Duration::from_millis(200);
        c.control.survey_timeout = Duration::from_millis(1500);
    })
    .await
}

async fn call(node: &Node, method: &str, path: &str, key: &str, body: Value) -> (u16, Value) {
    let auth = format!("Bearer {key}");
    let body = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let r = http(
        node.api,
        method,
        path,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body,
    )
    .await;
    (r.status, r.json())
}

async fn user(node: &Node, sub: &str, channels: &[&str]) -> Client {
    let url = format!(
        "{}?access_token={}",
        node.ws_url(),
        token(sub, 600, json!({}))
    );
    let mut c = Client::connect(&url).await.expect("connect");
    for ch in channels {
        c.subscribe(ch).await;
    }
    c
}

async fn publish(node: &Node, channel: &str, data: u64) {
    let (status, r) = call(
        node,
        "POST",
        "/api/publish",
        KEY,
        json!({"channel": channel, "data": data}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
}

fn conn(c: &Client) -> String {
    c.welcome["conn"].as_str().expect("a conn id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_api_acts_on_every_node() {
    let redis = RedisServer::start();
    let a = node("a", &redis).await;
    let b = node("b", &redis).await;
    // The nodes know each other within a heartbeat or two: each of them (a survey asks
    // the nodes the asking node knows; b may learn of a later than a of b).
    let deadline = Instant::now() + Duration::from_secs(10);
    for asker in [&a, &b] {
        loop {
            let (status, info) = call(asker, "GET", "/api/info", KEY, Value::Null).await;
            assert_eq!(status, 200, "{info}");
            if info["nodes"].as_array().unwrap().len() == 2 {
                assert_eq!(info["nodes"][0]["node"], "a");
                assert_eq!(info["nodes"][1]["node"], "b");
                assert_eq!(info["missing"], json!([]));
                break;
            }
            assert!(Instant::now() < deadline, "the nodes never met: {info}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let mut alice_a = user(&a, "alice", &["news"]).await;
    let mut alice_b = user(&b, "alice", &["news"]).await;
    let mut bob = user(&a, "bob", &["news", "sports"]).await;

    // Channels, summed over the nodes, paged.
    let (status, page) = call(&b, "GET", "/api/channels?limit=1", KEY, Value::Null).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        page["channels"],
        json!([{"channel": "news", "subscribers": 3}])
    );
    assert_eq!(page["cursor"], "news");
    let (_, page) = call(
        &b,
        "GET",
        "/api/channels?limit=1&cursor=news",
        KEY,
        Value::Null,
    )
    .await;
    assert_eq!(
        page["channels"],
        json!([{"channel": "sports", "subscribers": 1}])
    );
    assert!(page.get("cursor").is_none(), "the last page: {page}");
    let (_, page) = call(&a, "GET", "/api/channels?pattern=spo*", KEY, Value::Null).await;
    assert_eq!(
        page["channels"],
        json!([{"channel": "sports", "subscribers": 1}])
    );
    // A key limited to `sports` sees only that channel.
    let (_, page) = call(&a, "GET", "/api/channels", SCOPED, Value::Null).await;
    assert_eq!(
        page["channels"],
        json!([{"channel": "sports", "subscribers": 1}])
    );

    // Server-side unsubscribe: both of alice's connections, wherever they are.
    let (status, r) = call(
        &b,
        "POST",
        "/api/unsubscribe",
        KEY,
        json!({"user": "alice", "channel": "news"}),
    )
    .await;
    assert_eq!(
        (status, &r),
        (200, &json!({"ok": true, "connections": 2, "missing": []}))
    );
    for c in [&mut alice_a, &mut alice_b] {
        assert_eq!(
            c.recv_json().await,
            json!({"op": "unsubscribed", "channel": "news"})
        );
    }
    publish(&a, "news", 1).await;
    assert_eq!(bob.recv_json().await["data"], 1);
    alice_a.expect_silence(Duration::from_millis(300)).await;
    alice_b.expect_silence(Duration::from_millis(100)).await;

    // Server-side subscribe: the clients hear `subscribed` without asking, then messages.
    let (status, r) = call(
        &a,
        "POST",
        "/api/subscribe",
        SCOPED,
        json!({"user": "alice", "channel": "sports"}),
    )
    .await;
    assert_eq!((status, r["connections"].as_u64()), (200, Some(2)), "{r}");
    for c in [&mut alice_a, &mut alice_b] {
        assert_eq!(
            c.recv_json().await,
            json!({"op": "subscribed", "channel": "sports"})
        );
    }
    publish(&b, "sports", 2).await;
    for c in [&mut alice_a, &mut alice_b, &mut bob] {
        assert_eq!(c.recv_json().await["data"], 2);
    }

    // Bad calls: a defined status each, and nobody is touched.
    let bad = [
        (
            "POST",
            "/api/disconnect",
            KEY,
            json!({"user": "alice", "code": 1000}),
            400,
        ),
        (
            "POST",
            "/api/disconnect",
            KEY,
            json!({"user": "alice", "conn": "x"}),
            400,
        ),
        ("POST", "/api/disconnect", KEY, json!({}), 400),
        (
            "POST",
            "/api/disconnect",
            SCOPED,
            json!({"user": "alice"}),
            403,
        ),
        (
            "POST",
            "/api/disconnect",
            "wrong-key",
            json!({"user": "alice"}),
            401,
        ),
        (
            "POST",
            "/api/subscribe",
            SCOPED,
            json!({"user": "alice", "channel": "news"}),
            403,
        ),
        (
            "POST",
            "/api/subscribe",
            KEY,
            json!({"user": "alice", "channel": "a b"}),
            400,
        ),
        (
            "POST",
            "/api/unsubscribe",
            KEY,
            json!({"user": "alice", "channel": "$herald.control"}),
            400,
        ),
        ("GET", "/api/disconnect", KEY, Value::Null, 405),
        ("POST", "/api/info", KEY, json!({}), 405),
        ("GET", "/api/info", SCOPED, Value::Null, 403),
        ("GET", "/api/channels?limit=0", KEY, Value::Null, 400),
        ("GET", "/api/channels?pattern=a%20b", KEY, Value::Null, 400),
    ];
    for (method, path, key, body, want) in bad {
        let (status, r) = call(&a, method, path, key, body.clone()).await;
        assert_eq!(status, want, "{method} {path} {body}: {r}");
        assert!(r["code"].is_string(), "{method} {path}: an error body: {r}");
    }
    publish(&a, "sports", 3).await;
    for c in [&mut alice_a, &mut alice_b, &mut bob] {
        assert_eq!(c.recv_json().await["data"], 3, "untouched by the bad calls");
    }

    // Disconnect alice everywhere but the connection she keeps: 4400, do not reconnect.
    let keep = conn(&alice_b);
    let (status, r) = call(
        &b,
        "POST",
        "/api/disconnect",
        KEY,
        json!({"user": "alice", "keep": [keep]}),
    )
    .await;
    assert_eq!((status, r["connections"].as_u64()), (200, Some(1)), "{r}");
    let (closed, _) = alice_a.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (Some(4400), "disconnected")
    );
    // One connection by id, with the caller's code and reason.
    let (status, r) = call(
        &b,
        "POST",
        "/api/disconnect",
        KEY,
        json!({"conn": conn(&bob), "code": 4000, "reason": "sign in again"}),
    )
    .await;
    assert_eq!((status, r["connections"].as_u64()), (200, Some(1)), "{r}");
    let (closed, _) = bob.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (Some(4000), "sign in again")
    );
    publish(&b, "sports", 4).await;
    assert_eq!(
        alice_b.recv_json().await["data"],
        4,
        "the kept connection stays"
    );

    // A node that leaves (drain) says so: it is not reported missing.
    b.shutdown().await.unwrap();
    let (_, info) = call(&a, "GET", "/api/info", KEY, Value::Null).await;
    assert_eq!(info["nodes"].as_array().unwrap().len(), 1, "{info}");
    assert_eq!(info["missing"], json!([]), "{info}");
    assert_eq!(
        a.metric("herald_control_surveys_total{outcome=\"incomplete\"}"),
        0.0
    );
    assert!(a.metric("herald_control_commands_total{command=\"disconnect\"}") >= 2.0);
}

/// The embedded broker: one node, the same API (its surveys are answered by itself).
#[tokio::test]
async fn the_control_api_on_the_embedded_broker() {
    let node = Node::start_with(|c| {
        c.auth.jwt.hmac_secret = Some(TEST_SECRET.into());
        c.auth.api_key = Some(KEY.into());
    })
    .await;
    let mut carol = user(&node, "carol", &["news"]).await;
    let (status, info) = call(&node, "GET", "/api/info", KEY, Value::Null).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["nodes"][0]["connections"], 1);
    assert_eq!(info["nodes"][0]["broker"], "memory");
    let (_, r) = call(
        &node,
        "POST",
        "/api/disconnect",
        KEY,
        json!({"user": "carol", "code": 4401, "reason": "banned"}),
    )
    .await;
    assert_eq!(r["connections"], 1, "{r}");
    let (closed, _) = carol.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (Some(4401), "banned")
    );
    // Nobody left to act on: 0, not an error.
    let (status, r) = call(
        &node,
        "POST",
        "/api/disconnect",
        KEY,
        json!({"user": "carol"}),
    )
    .await;
    assert_eq!((status, r["connections"].as_u64()), (200, Some(0)));
}

/// The Rust client: a subscription the backend makes arrives as a `Subscription`
/// (confirmed, then messages); one it ends hears `Unsubscribed`; a 4400-4499 close
/// stops the client with `Disconnected`.
#[tokio::test]
async fn the_rust_client_follows_the_control_api() {
    use herald_client::{Config, Event, State};
    let node = Node::start_with(|c| {
        c.auth.jwt.hmac_secret = Some(TEST_SECRET.into());
        c.auth.api_key = Some(KEY.into());
    })
    .await;
    let mut config = Config::new(node.ws_url());
    config.token = Some(token("erin", 600, json!({})));
    let client = herald_client::Client::start(config);
    let mut state = client.state();
    tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|s| *s == State::Connected),
    )
    .await
    .expect("connected")
    .unwrap();
    let (_, r) = call(
        &node,
        "POST",
        "/api/subscribe",
        KEY,
        json!({"user": "erin", "channel": "news"}),
    )
    .await;
    assert_eq!(r["connections"], 1, "{r}");
    let mut sub = tokio::time::timeout(Duration::from_secs(10), client.next_server_subscription())
        .await
        .expect("a server-made subscription")
        .unwrap();
    assert_eq!(sub.channel(), "news");
    assert_eq!(next_event(&mut sub).await, Event::Subscribed);
    publish(&node, "news", 7).await;
    assert!(matches!(next_event(&mut sub).await, Event::Message { data, .. } if &data[..] == b"7"));
    let (_, r) = call(
        &node,
        "POST",
        "/api/unsubscribe",
        KEY,
        json!({"user": "erin", "channel": "news"}),
    )
    .await;
    assert_eq!(r["connections"], 1, "{r}");
    assert_eq!(next_event(&mut sub).await, Event::Unsubscribed);

    let mut mine = client.subscribe("sports").unwrap();
    assert_eq!(next_event(&mut mine).await, Event::Subscribed);
    let (_, r) = call(
        &node,
        "POST",
        "/api/disconnect",
        KEY,
        json!({"user": "erin", "code": 4403, "reason": "banned"}),
    )
    .await;
    assert_eq!(r["connections"], 1, "{r}");
    assert_eq!(
        next_event(&mut mine).await,
        Event::Disconnected {
            code: 4403,
            reason: "banned".into()
        }
    );
    tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|s| *s == State::Closed),
    )
    .await
    .expect("the client stopped")
    .unwrap();
}

async fn next_event(sub: &mut herald_client::Subscription) -> herald_client::Event {
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("an event")
        .expect("the client runs")
}

/// Server-side subscriptions when a connection opens: the token's `subscribe` claim and
/// `auth.personal_channel`, without the client asking; a name that is not a channel is
/// skipped, and the connection goes on.
#[tokio::test]
async fn a_token_and_the_personal_channel_subscribe_at_connect() {
    let node = Node::start_with(|c| {
        c.auth.jwt.hmac_secret = Some(TEST_SECRET.into());
        c.auth.api_key = Some(KEY.into());
        c.auth.personal_channel = "user:{sub}".into();
    })
    .await;
    let t = token("fay", 600, json!({"subscribe": ["news", "not a channel"]}));
    let mut fay = Client::connect(&format!("{}?access_token={t}", node.ws_url()))
        .await
        .unwrap();
    let mut subscribed = vec![fay.recv_json().await, fay.recv_json().await];
    subscribed.sort_by_key(|f| f["channel"].as_str().unwrap().to_owned());
    assert_eq!(
        subscribed,
        [
            json!({"op": "subscribed", "channel": "news"}),
            json!({"op": "subscribed", "channel": "user:fay"})
        ]
    );
    publish(&node, "user:fay", 1).await;
    publish(&node, "news", 2).await;
    assert_eq!(fay.recv_json().await["data"], 1);
    assert_eq!(fay.recv_json().await["data"], 2);
    // Anonymous connections have no personal channel.
    let mut anon = node.client().await;
    anon.expect_silence(Duration::from_millis(200)).await;
}

/// A node restarted under the same id hands out connection ids it never gave before
/// (presence and `/api/disconnect {"conn":..}` name connections by them).
#[tokio::test]
async fn connection_ids_are_never_reused_across_restarts() {
    let first = Node::start_with(|c| c.node_id = "same".into()).await;
    let a = first.client().await.welcome["conn"].clone();
    first.shutdown().await.unwrap();
    let second = Node::start_with(|c| c.node_id = "same".into()).await;
    let b = second.client().await.welcome["conn"].clone();
    assert!(a.as_str().unwrap().starts_with("same-"), "{a}");
    assert_ne!(a, b);
}
