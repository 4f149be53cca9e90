//! Presence across nodes on one real Redis: the same user in two tabs on two nodes is
//! one member (one `join`, one `leave` when the last tab closes), counts stay right,
//! a Redis that restarts empty gets the members back from the nodes' refresh without a
//! second `join`, and who may ask is enforced. (A node SIGKILLed, its members leaving
//! within the TTL, is a process test: `crates/herald/tests/process.rs`.)

use std::time::{Duration, Instant};

use herald_server::GatewayConfig;
use herald_testkit::{http, presence_rule, token, Client, Node, RedisServer, TEST_SECRET};
use serde_json::{json, Value};

const KEY: &str = "presence-test-key";

fn config(c: &mut GatewayConfig, id: &str) {
    c.node_id = id.into();
    c.auth.jwt.hmac_secret = Some(TEST_SECRET.into());
    c.auth.api_key = Some(KEY.into());
    let mut quiet = presence_rule("quiet:*");
    quiet.join_leave = false;
    quiet.presence_access = herald_server::config::PresenceAccess::Nobody;
    c.channels.rules = vec![presence_rule("room:*"), quiet];
    c.presence.refresh_interval = Duration::from_millis(200);
    c.presence.ttl = Duration::from_secs(1);
    c.presence.page_size = 2;
}

async fn user(node: &Node, sub: &str, info: Value) -> Client {
    let t = token(sub, 600, json!({ "info": info }));
    Client::connect(&format!("{}?access_token={t}", node.ws_url()))
        .await
        .expect("connect")
}

async fn api(node: &Node, path: &str) -> (u16, Value) {
    let r = http(
        node.api,
        "GET",
        path,
        &[("authorization", &format!("Bearer {KEY}"))],
        vec![],
    )
    .await;
    (r.status, r.json())
}

/// Reads frames until one with `op` arrives; every frame before it must be a `join` or
/// `leave` (returned too).
async fn until_op(c: &mut Client, op: &str) -> (Value, Vec<Value>) {
    let mut seen = Vec::new();
    loop {
        let f = c.recv_json().await;
        if f["op"] == op {
            return (f, seen);
        }
        seen.push(f);
    }
}

/// The channel's counts; `Err` with the reply when the node could not read them (503
/// while its Redis reconnects).
async fn stats(node: &Node, channel: &str) -> Result<(u64, u64), Value> {
    let (status, s) = api(node, &format!("/api/presence_stats/{channel}")).await;
    if status != 200 {
        assert_eq!((status, &s["code"]), (503, &json!("unavailable")), "{s}");
        return Err(s);
    }
    Ok((
        s["connections"].as_u64().unwrap(),
        s["users"].as_u64().unwrap(),
    ))
}

/// Polls the counts until they are `want` (a node whose Redis is reconnecting answers
/// 503 meanwhile, e.g. after the restart below).
async fn eventually_stats(node: &Node, channel: &str, want: (u64, u64)) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = stats(node, channel).await;
        if got.as_ref() == Ok(&want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{channel}: {got:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_per_user_and_cluster_wide() {
    let mut redis = RedisServer::start();
    let a = Node::start_redis(&redis.url(), |c| config(c, "a")).await;
    let b = Node::start_redis(&redis.url(), |c| config(c, "b")).await;
    let c = Node::start_redis(&redis.url(), |c| config(c, "c")).await;

    // Bob watches from node c.
    let mut bob = user(&c, "bob", json!({"name": "Bob"})).await;
    bob.subscribe("room:1").await;
    let (joined, _) = until_op(&mut bob, "join").await;
    assert_eq!(
        (joined["user"].as_str(), joined["info"]["name"].as_str()),
        (Some("bob"), Some("Bob"))
    );

    // Alice opens two tabs on two other nodes: one member, one join.
    let mut tab1 = user(&a, "alice", json!({"name": "Alice"})).await;
    tab1.subscribe("room:1").await;
    let (joined, _) = until_op(&mut bob, "join").await;
    assert_eq!(joined["user"], "alice");
    assert_eq!(joined["info"], json!({"name": "Alice"}), "the token's info");
    assert_eq!(joined["conn"], tab1.welcome["conn"]);
    let mut tab2 = user(&b, "alice", json!({"name": "Alice"})).await;
    tab2.subscribe("room:1").await;
    eventually_stats(&a, "room:1", (3, 2)).await;
    bob.expect_silence(Duration::from_millis(300)).await;

    // Members, paged (page_size 2), from a client and over HTTP.
    let asked = json!({"op": "presence", "channel": "room:1", "id": 9});
    tab2.send_json(&asked).await;
    let (page, _) = until_op(&mut tab2, "presence").await;
    assert_eq!(page["id"], 9);
    assert_eq!(
        page["members"].as_array().unwrap().len(),
        2,
        "page_size 2: {page}"
    );
    let mut members: Vec<Value> = page["members"].as_array().unwrap().clone();
    let mut cursor = page["cursor"].as_str().map(str::to_owned);
    while let Some(k) = cursor {
        let (status, p) = api(&b, &format!("/api/presence/room:1?cursor={k}")).await;
        assert_eq!(status, 200, "{p}");
        members.extend(p["members"].as_array().unwrap().iter().cloned());
        cursor = p["cursor"].as_str().map(str::to_owned);
    }
    let mut users: Vec<&str> = members
        .iter()
        .map(|m| m["user"].as_str().unwrap())
        .collect();
    users.sort();
    assert_eq!(users, ["alice", "alice", "bob"], "{members:?}");
    tab1.send_json(&json!({"op": "presence_stats", "channel": "room:1", "id": 10}))
        .await;
    let (st, _) = until_op(&mut tab1, "presence_stats").await;
    assert_eq!(
        (st["connections"].as_u64(), st["users"].as_u64()),
        (Some(3), Some(2))
    );

    // Redis restarts empty: the refresh puts every member back, and nobody hears a
    // second join.
    tokio::task::block_in_place(|| redis.restart());
    eventually_stats(&a, "room:1", (3, 2)).await;
    bob.expect_silence(Duration::from_millis(500)).await;

    // Closing one tab is not a leave; closing the last is, once.
    tab1.close().await;
    eventually_stats(&c, "room:1", (2, 2)).await;
    bob.expect_silence(Duration::from_millis(300)).await;
    tab2.close().await;
    let (left, _) = until_op(&mut bob, "leave").await;
    assert_eq!(left["user"], "alice");
    bob.expect_silence(Duration::from_millis(300)).await;
    eventually_stats(&b, "room:1", (1, 1)).await;

    // Refusals: not subscribed, a channel without presence, one whose presence is
    // backends' only; over HTTP, a channel without presence is 404.
    let mut carol = user(&a, "carol", json!(null)).await;
    for (frame, code) in [
        (
            json!({"op": "presence", "channel": "room:1", "id": 1}),
            "forbidden",
        ),
        (
            json!({"op": "presence_stats", "channel": "news", "id": 2}),
            "bad_request",
        ),
    ] {
        carol.send_json(&frame).await;
        let (e, _) = until_op(&mut carol, "error").await;
        assert_eq!(
            (e["id"].clone(), e["code"].as_str()),
            (frame["id"].clone(), Some(code)),
            "{frame}"
        );
    }
    carol.subscribe("quiet:1").await;
    carol
        .send_json(&json!({"op": "presence", "channel": "quiet:1", "id": 3}))
        .await;
    let (e, _) = until_op(&mut carol, "error").await;
    assert_eq!(e["code"], "forbidden");
    // `join_leave = false`: counted, not announced.
    eventually_stats(&a, "quiet:1", (1, 1)).await;
    carol.expect_silence(Duration::from_millis(200)).await;
    assert_eq!(api(&a, "/api/presence/news").await.0, 404);
    assert_eq!(api(&a, "/api/presence/room:1?limit=x").await.0, 400);
    assert_eq!(api(&a, "/api/presence/room:1?cursor=garbage").await.0, 400);
    let (_, one) = api(&a, "/api/presence/room:1?limit=1").await;
    assert_eq!(one["members"].as_array().unwrap().len(), 1, "{one}");
    let r = http(a.api, "GET", "/api/presence_stats/room:1", &[], vec![]).await;
    assert_eq!(r.status, 401);
    // Bob was never disturbed by any of it.
    bob.send_json(&json!({"op": "ping", "id": 77})).await;
    let (pong, extra) = until_op(&mut bob, "pong").await;
    assert_eq!((pong["id"].as_u64(), extra.len()), (Some(77), 0));
    assert!(a.metric("herald_presence_events_total{event=\"join\"}") >= 1.0);
}

/// The Rust client: presence questions, and `join`/`leave` as subscription events.
#[tokio::test]
async fn the_rust_client_sees_who_is_here() {
    use herald_client::{Config, Event};
    let node = Node::start_with(|c| config(c, "solo")).await;
    let start = |sub: &str| {
        let mut config = Config::new(node.ws_url());
        config.token = Some(token(sub, 600, json!({"info": {"n": sub}})));
        herald_client::Client::start(config)
    };
    let dee = start("dee");
    let mut room = dee.subscribe("room:7").unwrap();
    assert_eq!(next_event(&mut room).await, Event::Subscribed);
    assert!(matches!(next_event(&mut room).await, Event::Join(m) if m.user == "dee"));
    let eve = start("eve");
    let mut eves = eve.subscribe("room:7").unwrap();
    assert_eq!(next_event(&mut eves).await, Event::Subscribed);
    match next_event(&mut room).await {
        Event::Join(m) => assert_eq!(
            (m.user.as_str(), m.info),
            ("eve", Some(json!({"n": "eve"})))
        ),
        other => panic!("{other:?}"),
    }
    let st = dee.presence_stats("room:7").await.unwrap();
    assert_eq!(
        (st["connections"].as_u64(), st["users"].as_u64()),
        (Some(2), Some(2))
    );
    let page = dee.presence("room:7", None).await.unwrap();
    assert_eq!(page["members"].as_array().unwrap().len(), 2, "{page}");
    let refused = dee.presence("room:8", None).await.unwrap_err();
    assert!(
        matches!(&refused, herald_client::Error::Server { code, .. } if code == "forbidden"),
        "{refused:?}"
    );
    eve.close();
    assert!(matches!(next_event(&mut room).await, Event::Leave(m) if m.user == "eve"));
}

async fn next_event(s: &mut herald_client::Subscription) -> herald_client::Event {
    tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("an event")
        .expect("running")
}

/// A subscription token's `info` is what presence shows in its channel (the
/// connection token's elsewhere).
#[tokio::test]
async fn a_subscription_tokens_info_shows_in_its_channel() {
    let node = Node::start_with(|c| config(c, "solo")).await;
    let mut ivy = user(&node, "ivy", json!({"name": "Ivy"})).await;
    let grant = token(
        "ivy",
        600,
        json!({"channel": "room:5", "info": {"role": "host"}}),
    );
    ivy.send_json(&json!({"op": "subscribe", "channel": "room:5", "id": 1, "token": grant}))
        .await;
    let (joined, _) = until_op(&mut ivy, "join").await;
    assert_eq!(joined["info"], json!({"role": "host"}));
    ivy.subscribe("room:6").await;
    let (joined, _) = until_op(&mut ivy, "join").await;
    assert_eq!(
        (joined["channel"].as_str(), &joined["info"]),
        (Some("room:6"), &json!({"name": "Ivy"}))
    );
    // A grant for another channel, or another user, lends no info.
    for (i, grant) in [
        token(
            "ivy",
            600,
            json!({"channel": "room:5", "info": {"role": "fake"}}),
        ),
        token(
            "eve",
            600,
            json!({"channel": "room:7", "info": {"role": "fake"}}),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        ivy.send_json(
            &json!({"op": "subscribe", "channel": "room:7", "id": 10 + i, "token": grant}),
        )
        .await;
        let (joined, _) = until_op(&mut ivy, "join").await;
        assert_eq!(joined["info"], json!({"name": "Ivy"}), "{joined}");
        ivy.send_json(&json!({"op": "unsubscribe", "channel": "room:7", "id": 20 + i}))
            .await;
        // (Its own leave goes to the channel's subscribers, which it no longer is.)
        until_op(&mut ivy, "unsubscribed").await;
    }
}

/// Joins and leaves racing the refresh (every 20 ms) and a Redis that lost everything:
/// every join and every leave is announced, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_join_or_leave_is_lost_to_the_refresh_or_a_flushed_redis() {
    let redis = RedisServer::start();
    let node = Node::start_redis(&redis.url(), |c| {
        config(c, "busy");
        let mut each = presence_rule("conn:*");
        each.join_leave_per = herald_server::config::JoinLeavePer::Connection;
        c.channels.rules.push(each);
        c.presence.refresh_interval = Duration::from_millis(20);
        c.presence.ttl = Duration::from_secs(5);
    })
    .await;
    let mut watcher = user(&node, "watcher", json!(null)).await;
    watcher.subscribe("conn:1").await;
    until_op(&mut watcher, "join").await;
    let mut guest = user(&node, "guest", json!(null)).await;
    for i in 0..100u64 {
        guest
            .send_json(&json!({"op": "subscribe", "channel": "conn:1", "id": 2 * i}))
            .await;
        until_op(&mut guest, "subscribed").await;
        if i % 10 == 0 {
            // Redis forgets everyone; the refresh brings them back, and a leave before it
            // does is still announced.
            redis.cli(&["FLUSHALL"]);
        }
        guest
            .send_json(&json!({"op": "unsubscribe", "channel": "conn:1", "id": 2 * i + 1}))
            .await;
        until_op(&mut guest, "unsubscribed").await;
    }
    let (mut joins, mut leaves) = (0, 0);
    while joins < 100 || leaves < 100 {
        let f = tokio::time::timeout(Duration::from_secs(5), watcher.recv_json())
            .await
            .unwrap_or_else(|_| panic!("stuck at {joins} joins, {leaves} leaves"));
        match f["op"].as_str() {
            Some("join") => joins += 1,
            Some("leave") => leaves += 1,
            _ => {}
        }
    }
    watcher.expect_silence(Duration::from_millis(300)).await;
    assert_eq!((joins, leaves), (100, 100));
}
