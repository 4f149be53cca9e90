//! History channels: offsets, resuming with `since`, node-level repair, idempotent
//! publishing, and what clients are told when the history cannot help.

use std::time::Duration;

use herald_testkit::{
    eventually, history_rule, http, json, redis_config, Client, Node, RedisServer, WAIT,
};
use serde_json::Value;

fn offsets(msgs: &[Value]) -> Vec<u64> {
    msgs.iter()
        .map(|m| {
            assert_eq!(m["op"], "message", "{m}");
            m["offset"].as_u64().expect("an offset")
        })
        .collect()
}

/// Asserts that `msgs` are the publications `from..=to` of the numbers test: offsets
/// contiguous and each message's data equal to its publication number.
fn assert_numbers(msgs: &[Value], from: u64, to: u64, first_offset: u64) {
    let got = offsets(msgs);
    let want: Vec<u64> = (first_offset..first_offset + (to - from + 1)).collect();
    assert_eq!(got, want, "offsets");
    let data: Vec<u64> = msgs.iter().map(|m| m["data"].as_u64().unwrap()).collect();
    assert_eq!(data, (from..=to).collect::<Vec<_>>(), "data");
}

fn epoch(v: &Value) -> String {
    v["epoch"].as_str().expect("an epoch").to_owned()
}

/// Whether `v` names a start: offset 0 and a start token (a read that found no stream).
fn at_start(v: &Value) -> bool {
    v["offset"] == 0
        && herald_protocol::Epoch::parse(&epoch(v)).is_some_and(herald_protocol::Epoch::is_start)
}

/// The story of the issue, on any pair of nodes (the same node twice on the memory
/// broker): read 10, leave, 100 are published, come back with `since`.
async fn resume_story(a: &Node, b: &Node) {
    let mut client = a.client().await;
    let sub = client.subscribe_since("news:a", None).await;
    // Nothing published yet: a start, which no epoch names (reading created none).
    assert!(at_start(&sub), "{sub}");
    a.publish_numbers("news:a", 1, 10).await;
    let first = client.messages(10).await;
    assert_numbers(&first, 1, 10, 1);
    // The first publication names the epoch it began; later ones do not repeat it.
    let e = epoch(&first[0]);
    assert!(!at_start(&first[0]));
    assert!(
        first[1..].iter().all(|m| m.get("epoch").is_none()),
        "{first:?}"
    );
    client.close().await;

    b.publish_numbers("news:a", 11, 110).await;
    let mut back = b.client().await;
    let sub = back.subscribe_since("news:a", Some((10, &e))).await;
    assert_eq!(sub["recovered"], true, "{sub}");
    assert_eq!((sub["offset"].as_u64(), epoch(&sub)), (Some(110), e));
    assert_numbers(&back.messages(100).await, 11, 110, 11);
    // Then live, continuing the same sequence.
    b.publish_numbers("news:a", 111, 111).await;
    assert_numbers(&back.messages(1).await, 111, 111, 111);
    back.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_client_resumes_on_one_node() {
    let node = Node::start_with(|c| c.channels.rules = vec![history_rule("news:*", 1000)]).await;
    resume_story(&node, &node).await;
    assert_eq!(
        node.metric(r#"herald_recoveries_total{outcome="recovered"}"#),
        1.0
    );
    assert_eq!(node.metric("herald_publications_replayed_total"), 100.0);
}

#[tokio::test]
async fn a_client_resumes_on_another_node() {
    let redis = RedisServer::start();
    let rules = |c: &mut herald_server::GatewayConfig| {
        c.channels.rules = vec![history_rule("news:*", 1000)]
    };
    let a = Node::start_redis(&redis.url(), rules).await;
    let b = Node::start_redis(&redis.url(), rules).await;
    resume_story(&a, &b).await;
}

#[tokio::test]
async fn channels_without_a_rule_stay_at_most_once() {
    let node = Node::start_with(|c| c.channels.rules = vec![history_rule("news:*", 10)]).await;
    let mut client = node.client().await;
    client.subscribe("chat").await;
    let (status, reply) = node.publish_with_key("chat", "1", None).await;
    assert_eq!(
        (status, &reply),
        (200, &serde_json::json!({"ok":true,"published":1}))
    );
    let m = client.recv_json().await;
    assert!(m.get("offset").is_none(), "{m}");
    let r = http(node.api, "GET", "/api/history/chat", &[], vec![]).await;
    assert_eq!(r.status, 404);
}

/// More missed than the channel keeps, or history expired: `recovered:false`, nothing
/// from history, then live from the current position.
async fn refused_resume(node: &Node, channel: &str, missed: u64, wait: Duration) {
    let mut client = node.client().await;
    let e = epoch(&client.subscribe_since(channel, None).await);
    client.close().await;
    node.publish_numbers(channel, 1, missed).await;
    tokio::time::sleep(wait).await;
    let mut back = node.client().await;
    let sub = back.subscribe_since(channel, Some((0, &e))).await;
    assert_eq!(sub["recovered"], false, "{sub}");
    assert_eq!(sub["offset"], missed, "{sub}");
    back.expect_silence(Duration::from_millis(100)).await;
    node.publish_numbers(channel, missed + 1, missed + 1).await;
    assert_numbers(&back.messages(1).await, missed + 1, missed + 1, missed + 1);
    assert_eq!(
        node.metric(r#"herald_recoveries_total{outcome="not_recovered"}"#),
        1.0
    );
}

#[tokio::test]
async fn trimmed_history_is_not_recovered() {
    let node = Node::start_with(|c| c.channels.rules = vec![history_rule("news:*", 20)]).await;
    refused_resume(&node, "news:t", 50, Duration::ZERO).await;
}

#[tokio::test]
async fn trimmed_history_is_not_recovered_on_redis() {
    // Redis trims streams approximately; the resume is refused on the rule's size all
    // the same.
    let redis = RedisServer::start();
    let node = Node::start_redis(&redis.url(), |c| {
        c.channels.rules = vec![history_rule("news:*", 20)]
    })
    .await;
    refused_resume(&node, "news:t", 50, Duration::ZERO).await;
}

#[tokio::test]
async fn expired_history_is_not_recovered() {
    let redis = RedisServer::start();
    let node = Node::start_redis(&redis.url(), |c| {
        let mut rule = history_rule("news:*", 100);
        rule.history_ttl = Duration::from_millis(200);
        c.channels.rules = vec![rule];
    })
    .await;
    refused_resume(&node, "news:x", 5, Duration::from_millis(600)).await;
}

#[tokio::test]
async fn a_resume_from_another_epoch_is_not_recovered() {
    let node = Node::start_with(|c| c.channels.rules = vec![history_rule("news:*", 100)]).await;
    node.publish_numbers("news:e", 1, 3).await;
    let mut client = node.client().await;
    for bad in ["zzzzzzzz", "not-an-epoch"] {
        let sub = client.subscribe_since("news:e", Some((1, bad))).await;
        assert_eq!(sub["recovered"], false, "{sub}");
        client.request("unsubscribe", "news:e").await;
    }
}

/// Idempotent publishing: a retry with the same key publishes nothing new and answers
/// the first result.
async fn idempotency_story(node: &Node) {
    let mut client = node.client().await;
    client.subscribe_since("news:i", None).await;
    let (s1, first) = node
        .publish_with_key("news:i", r#"{"n":1}"#, Some("order-17"))
        .await;
    let (s2, again) = node
        .publish_with_key("news:i", r#"{"n":1}"#, Some("order-17"))
        .await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(first["published"], 1, "{first}");
    assert_eq!(again["published"], 0, "{again}");
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(
        (&first["offset"], &first["epoch"]),
        (&again["offset"], &again["epoch"])
    );
    let (_, other) = node
        .publish_with_key("news:i", r#"{"n":2}"#, Some("order-18"))
        .await;
    assert_eq!(other["offset"], first["offset"].as_u64().unwrap() + 1);
    let got = client.messages(2).await;
    assert_eq!(offsets(&got), vec![1, 2]);
    client.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn idempotent_publish_publishes_once() {
    let node = Node::start_with(|c| c.channels.rules = vec![history_rule("news:*", 100)]).await;
    idempotency_story(&node).await;
}

#[tokio::test]
async fn idempotent_publish_publishes_once_on_redis() {
    let redis = RedisServer::start();
    let node = Node::start_redis(&redis.url(), |c| {
        c.channels.rules = vec![history_rule("news:*", 100)]
    })
    .await;
    idempotency_story(&node).await;
}

#[tokio::test]
async fn history_api_pages_a_channel() {
    let redis = RedisServer::start();
    let node = Node::start_redis(&redis.url(), |c| {
        c.channels.rules = vec![history_rule("news:*", 100)];
        c.limits.max_history_page = 5;
    })
    .await;
    node.publish_numbers("news:h", 1, 12).await;
    let r = http(node.api, "GET", "/api/history/news:h?since=3", &[], vec![]).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["offset"], 12);
    assert_eq!(v["complete"], true);
    let data: Vec<u64> = v["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["data"].as_u64().unwrap())
        .collect();
    assert_eq!(
        data,
        vec![4, 5, 6, 7, 8],
        "capped at limits.max_history_page"
    );
    let e = epoch(&v);
    let r = http(
        node.api,
        "GET",
        &format!("/api/history/news:h?since=10&epoch={e}&limit=1"),
        &[],
        vec![],
    )
    .await;
    assert_eq!(r.json()["publications"][0]["offset"], 11);
    let r = http(
        node.api,
        "GET",
        "/api/history/news:h?since=1&epoch=00000000",
        &[],
        vec![],
    )
    .await;
    assert_eq!(r.json()["complete"], false, "another epoch");
    let r = http(node.api, "GET", "/api/history/news:h?since=x", &[], vec![]).await;
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (400, Some("bad_request"))
    );
}

/// Publications racing with a resume: no gap, no duplicate, whatever the interleaving.
#[tokio::test]
async fn publications_racing_with_a_resume_are_merged_by_offset() {
    let redis = RedisServer::start();
    let node = Node::start_redis(&redis.url(), |c| {
        c.channels.rules = vec![history_rule("news:*", 10_000)]
    })
    .await;
    let mut first = node.client().await;
    first.subscribe_since("news:r", None).await;
    node.publish_numbers("news:r", 1, 50).await;
    let e = epoch(&first.messages(50).await[0]);
    first.close().await;
    let publisher = {
        let api = node.api;
        tokio::spawn(async move {
            for k in 0..40u64 {
                let items: Vec<String> = (51 + k * 25..51 + (k + 1) * 25)
                    .map(|n| format!(r#"{{"channel":"news:r","data":{n}}}"#))
                    .collect();
                let body = format!(r#"{{"publications":[{}]}}"#, items.join(","));
                let r = http(
                    api,
                    "POST",
                    "/api/batch",
                    &[("content-type", "application/json")],
                    body.into_bytes(),
                )
                .await;
                assert_eq!(r.status, 200);
            }
        })
    };
    let mut resumed = Vec::new();
    for _ in 0..20 {
        // Resume from offset 50 at different moments while publishing goes on.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let mut c = node.client().await;
        let sub = c.subscribe_since("news:r", Some((50, &e))).await;
        assert_eq!(sub["recovered"], true, "{sub}");
        resumed.push(c);
    }
    publisher.await.unwrap();
    for mut c in resumed {
        let got = c.messages(1000).await;
        assert_numbers(&got, 51, 1050, 51);
        c.expect_silence(Duration::from_millis(100)).await;
    }
}

/// Redis restarted without persistence: the epoch changes; live subscribers are told
/// with a `reset`, and a resume from the old epoch is refused.
#[tokio::test]
async fn a_redis_restart_without_persistence_changes_the_epoch() {
    let mut redis = RedisServer::start();
    let node = Node::start_redis(&redis.url(), |c| {
        c.channels.rules = vec![history_rule("news:*", 100)]
    })
    .await;
    let mut live = node.client().await;
    let old = epoch(&live.subscribe_since("news:z", None).await);
    node.publish_numbers("news:z", 1, 5).await;
    assert_eq!(offsets(&live.messages(5).await), vec![1, 2, 3, 4, 5]);

    redis.restart();
    eventually("the node is back on Redis", || {
        node.metric("herald_broker_up") == 1.0
    })
    .await;
    // Publishing works again (retry while the node reconnects).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, _) = node.publish_with_key("news:z", "6", None).await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "publish kept failing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = live.messages(2).await;
    assert_eq!(got[0]["op"], "reset", "{got:?}");
    let new = epoch(&got[0]);
    assert_ne!(new, old);
    assert_eq!(
        (got[0]["offset"].as_u64(), got[1]["offset"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(got[1]["data"], 6);
    assert!(node.metric("herald_history_unrepairable_total") >= 1.0);

    let mut back = node.client().await;
    let sub = back.subscribe_since("news:z", Some((5, &old))).await;
    assert_eq!(sub["recovered"], false, "{sub}");
    assert_eq!(epoch(&sub), new);
}

/// Publishes `data` to `channel`, retrying while the node reconnects to Redis; the
/// reply of the publish that was accepted.
async fn publish_when_back(node: &Node, channel: &str, data: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, reply) = node.publish_with_key(channel, data, None).await;
        if status == 200 {
            return reply;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "publish kept failing: {status} {reply}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Redis killed and restarted from an older RDB snapshot (a crashed host, a restored
/// backup): its data says the channel is at offset 3 of the same epoch, while clients
/// hold 4..6. The new process must start a new epoch, not hand out 4..6 again: a live
/// subscriber is told `reset` and gets the new publication (before, it dropped it as a
/// duplicate of its offset 4), and a client resuming from 5 of the old epoch is refused
/// (before, `recovered:true` over a stream mixing old and new content).
#[tokio::test]
async fn a_redis_restored_from_an_older_snapshot_starts_a_new_epoch() {
    let mut redis = RedisServer::start();
    let node = Node::start_redis(&redis.url(), |c| {
        c.channels.rules = vec![history_rule("news:*", 100)]
    })
    .await;
    let mut live = node.client().await;
    live.subscribe_since("news:r", None).await;
    node.publish_numbers("news:r", 1, 3).await;
    assert_eq!(redis.cli(&["SAVE"]).trim(), "OK");
    node.publish_numbers("news:r", 4, 6).await;
    let first = live.messages(6).await;
    assert_numbers(&first, 1, 6, 1);
    let old = epoch(&first[0]);

    redis.restart(); // SIGKILL, then a new process that loads the snapshot of 1..3
    assert_eq!(
        redis.cli(&["HGET", "{herald:news:r}.meta", "s"]).trim(),
        "3"
    );
    let reply = publish_when_back(&node, "news:r", "7").await;
    assert_ne!(reply["epoch"].as_str(), Some(old.as_str()), "{reply}");
    assert_eq!(reply["offset"], 1, "{reply}");

    let got = live.messages(2).await;
    assert_eq!(got[0]["op"], "reset", "{got:?}");
    assert_ne!(epoch(&got[0]), old);
    assert_eq!(got[1]["offset"], 1, "{got:?}");
    assert_eq!(got[1]["data"], 7, "{got:?}");

    let mut back = node.client().await;
    let sub = back.subscribe_since("news:r", Some((5, &old))).await;
    assert_eq!(sub["recovered"], false, "{sub}");
    assert_eq!(sub["offset"], 1, "{sub}");

    // A second publication in the new process stays in its epoch (the lineage check
    // does not start an epoch per publication).
    let again = publish_when_back(&node, "news:r", "8").await;
    assert_eq!(
        (&again["epoch"], &again["offset"]),
        (&reply["epoch"], &json!(2))
    );
}

/// The node's pub/sub connection is killed while a publisher keeps publishing (and
/// retries what got no answer, with idempotency keys): the subscriber still sees every
/// offset exactly once, because the node repairs the gap from the stream.
#[tokio::test]
async fn a_killed_pubsub_connection_is_repaired_from_the_stream() {
    let redis = RedisServer::start();
    let rules = |c: &mut herald_server::GatewayConfig| {
        c.channels.rules = vec![history_rule("news:*", 10_000)]
    };
    let serving = Node::start_redis(&redis.url(), rules).await;
    // The publisher's node serves no channel, so it holds no pub/sub connection.
    let publishing = Node::start_redis(&redis.url(), rules).await;
    let mut client = serving.client().await;
    client.subscribe_since("news:k", None).await;

    const N: u64 = 2000;
    let api = publishing.api;
    let publisher = tokio::spawn(async move {
        // 1,000 per second: 10 every 10 ms, each retried until accepted.
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        for k in 0..N / 10 {
            tick.tick().await;
            for n in k * 10 + 1..=k * 10 + 10 {
                let body = format!(r#"{{"channel":"news:k","data":{n},"idempotency_key":"n{n}"}}"#);
                loop {
                    let r = http(
                        api,
                        "POST",
                        "/api/publish",
                        &[("content-type", "application/json")],
                        body.clone().into_bytes(),
                    )
                    .await;
                    if r.status == 200 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert_ne!(killed.trim(), "0", "a pub/sub connection was killed");
    publisher.await.unwrap();
    let got = client.messages(N as usize).await;
    assert_numbers(&got, 1, N, 1);
    client.expect_silence(Duration::from_millis(200)).await;
    assert!(serving.metric("herald_history_repairs_total") >= 1.0);
    assert!(serving.metric("herald_broker_reconnects_total") >= 1.0);
}

/// A channel the node already serves is not acknowledged while Redis is down:
/// `subscribed` means deliveries flow.
#[tokio::test]
async fn no_subscribed_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let node = Node::start_redis_with(redis_config(&redis.url()), |c| {
        c.limits.subscribe_timeout = Duration::from_millis(300);
    })
    .await;
    let mut first = node.client().await;
    first.subscribe("served").await;
    redis.kill();
    eventually("the node sees Redis down", || {
        node.metric("herald_broker_up") == 0.0
    })
    .await;
    let mut second = node.client().await;
    let reply = second.request("subscribe", "served").await;
    assert_eq!(reply["op"], "error", "{reply}");
    assert_eq!(reply["code"], "unavailable", "{reply}");
    // The first subscriber is unharmed and, once Redis is back, both work.
    redis.restart();
    eventually("the node is back on Redis", || {
        node.metric("herald_broker_up") == 1.0
    })
    .await;
    second.subscribe("served").await;
    assert_eq!(node.publish("served", "1").await, 200);
    for c in [&mut first, &mut second] {
        assert_eq!(c.recv_json().await["data"], 1);
    }
}

#[tokio::test]
async fn binary_deliveries_carry_the_offset_for_clients_that_track_positions() {
    let node = Node::start_with(|c| c.channels.rules = vec![history_rule("bin:*", 10)]).await;
    let mut tracking = node.client().await;
    tracking.subscribe_since("bin:x", None).await;
    let mut plain = Client::connect(&node.ws_url()).await.unwrap();
    plain.subscribe("bin:x").await;
    let r = http(
        node.api,
        "POST",
        "/api/publish/bin:x",
        &[("content-type", "application/octet-stream")],
        vec![7, 8],
    )
    .await;
    assert_eq!(r.status, 200);
    // Offset 1 begins an epoch: a text frame names it first (a binary frame has no
    // room for it in the version-1 layout).
    let named = tracking.recv_json().await;
    assert_eq!(
        named,
        json!({"op":"epoch","channel":"bin:x","epoch":r.json()["epoch"]})
    );
    let mut want = vec![0u8, 0, 0, 0, 0, 0, 0, 0, 1, 5];
    want.extend_from_slice(b"bin:x");
    want.extend_from_slice(&[7, 8]);
    assert_eq!(&tracking.recv_binary().await[..], &want[..]);
    let mut v1 = vec![5u8];
    v1.extend_from_slice(b"bin:x");
    v1.extend_from_slice(&[7, 8]);
    assert_eq!(&plain.recv_binary().await[..], &v1[..]);
}

/// On Redis Cluster the stream, its metadata and the sharded pub/sub channel share a
/// slot, so the same scripts number, store and publish on whichever master owns it.
#[tokio::test]
async fn history_works_on_redis_cluster() {
    let cluster = herald_testkit::RedisCluster::start(3);
    let mut cfg = redis_config(&cluster.urls());
    cfg.cluster = true;
    let rules =
        |c: &mut herald_server::GatewayConfig| c.channels.rules = vec![history_rule("room:*", 100)];
    let a = Node::start_redis_with(cfg.clone(), rules).await;
    let b = Node::start_redis_with(cfg, rules).await;
    let channels: Vec<String> = (0..6).map(|i| format!("room:{i}")).collect();
    let mut positions = Vec::new();
    let mut client = a.client().await;
    for ch in &channels {
        client.subscribe_since(ch, None).await;
    }
    for ch in &channels {
        b.publish_numbers(ch, 1, 3).await;
    }
    for ch in &channels {
        let got = client.messages(3).await;
        assert!(got.iter().all(|m| m["channel"] == ch.as_str()), "{got:?}");
        assert_numbers(&got, 1, 3, 1);
        positions.push(epoch(&got[0]));
    }
    client.close().await;
    for ch in &channels {
        b.publish_numbers(ch, 4, 6).await;
    }
    let mut back = b.client().await;
    for (ch, e) in channels.iter().zip(&positions) {
        let sub = back.subscribe_since(ch, Some((3, e))).await;
        assert_eq!(sub["recovered"], true, "{sub}");
        assert_numbers(&back.messages(3).await, 4, 6, 4);
    }
    // The keys landed on more than one master.
    let masters = cluster
        .servers
        .iter()
        .filter(|s| !s.cli(&["KEYS", "{herald:room:*}.stream"]).trim().is_empty())
        .count();
    assert!(masters >= 2, "streams on {masters} master(s)");
}

/// A resume that cannot be recovered reads no entries from Redis (issue 18): a made-up
/// epoch, or a `since` further back than `max_recovery`, used to read `max_recovery`
/// entries per subscribe, which let anonymous clients load Redis at will. Redis's own
/// command counts show what was read.
#[tokio::test]
async fn a_resume_that_cannot_recover_reads_no_entries() {
    let redis = RedisServer::start();
    let node = Node::start_redis(&redis.url(), |c| {
        let mut rule = history_rule("news:*", 100);
        rule.max_recovery = 10;
        c.channels.rules = vec![rule];
    })
    .await;
    for n in 1..=50 {
        assert_eq!(node.publish("news:a", &n.to_string()).await, 200);
    }
    let xranges = || -> u64 {
        let info = redis.cli(&["INFO", "commandstats"]);
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_xrange:calls="))
            .and_then(|l| l.split(',').next())
            .map_or(0, |n| n.parse().unwrap())
    };
    let mut c = node.client().await;
    let top = c.subscribe_since("news:a", None).await;
    let epoch = top["epoch"].as_str().unwrap().to_owned();
    assert_eq!(top["offset"], 50);
    let before = xranges();
    for (since, e) in [(45, "zzzzzzzz"), (5, epoch.as_str()), (0, "nonsense")] {
        let mut r = node.client().await;
        let reply = r.subscribe_since("news:a", Some((since, e))).await;
        assert_eq!(reply["recovered"], false, "{reply}");
    }
    // From a start, 50 missed with `max_recovery` 10: refused before reading too.
    let mut r = node.client().await;
    let start = r.subscribe_since("news:empty", None).await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let reply = r.subscribe_since("news:a", Some((0, &start))).await;
    assert_eq!(
        (&reply["recovered"], &reply["offset"]),
        (&json!(false), &json!(50)),
        "{reply}"
    );
    assert_eq!(xranges(), before, "an unrecoverable resume read entries");
    // A recoverable one reads, and gets what it missed.
    let mut r = node.client().await;
    let reply = r
        .subscribe_since("news:a", Some((45, epoch.as_str())))
        .await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(offsets(&r.messages(5).await), vec![46, 47, 48, 49, 50]);
    assert_eq!(xranges(), before + 1);
}

/// A resume whose replay is larger than a subscriber's queue used to be closed 1013
/// before its `subscribed`, every time (and clients reconnected into the same wall in a
/// loop). It is answered `recovered:false` before anything is queued, the connection
/// stays, and live publications flow (issue 18).
#[tokio::test]
async fn a_replay_larger_than_the_queue_is_refused_not_a_1013_loop() {
    let node = Node::start_with(|c| {
        c.limits.outbound_queue_bytes = 64 * 1024;
        let mut rule = history_rule("news:*", 1000);
        rule.max_recovery = 1000;
        c.channels.rules = vec![rule];
    })
    .await;
    let mut first = node.client().await;
    first.subscribe_since("news:big", None).await;
    let data = format!(r#""{}""#, "x".repeat(1200));
    for _ in 0..200 {
        assert_eq!(node.publish("news:big", &data).await, 200);
    }
    let epoch = first.recv_json().await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut resuming = node.client().await;
    let reply = resuming
        .subscribe_since("news:big", Some((0, &epoch)))
        .await;
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_eq!(reply["offset"], 200);
    assert_eq!(node.publish("news:big", "1").await, 200);
    let next = resuming.recv_json().await;
    assert_eq!(
        (&next["data"], &next["offset"]),
        (&serde_json::json!(1), &serde_json::json!(201))
    );
    assert_eq!(node.metric("herald_replays_refused_total"), 1.0);
    assert_eq!(node.metric("herald_slow_consumer_disconnects_total"), 0.0);
    // A replay that fits is still a replay.
    let mut small = node.client().await;
    let reply = small.subscribe_since("news:big", Some((195, &epoch))).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(
        offsets(&small.messages(6).await),
        vec![196, 197, 198, 199, 200, 201]
    );
}

/// Reading a channel that was never published creates nothing: anonymous clients
/// subscribing to (and resuming, and reading the history of) made-up names used to
/// leave a meta key per name in Redis for `history_meta_ttl` (24 h), which under
/// `maxmemory` evicts real channels' epochs. A channel's epoch now begins with its
/// first publication, which names it; a client that subscribed before resumes from
/// the start and recovers everything since.
#[tokio::test]
async fn reading_a_never_published_channel_creates_nothing() {
    let redis = RedisServer::start();
    let node = Node::start_redis(&redis.url(), |c| {
        let mut rule = history_rule("news:*", 100);
        rule.max_recovery = 50;
        c.channels.rules = vec![rule];
    })
    .await;
    let mut c = node.client().await;
    let start = epoch(&c.subscribe_since("news:made-up", None).await);
    for n in 0..300 {
        let ch = format!("news:made-up-{n}");
        let since = match n % 3 {
            0 => None,
            1 => Some((0, start.as_str())),
            _ => Some((7, "0k3f9a2b")),
        };
        let sub = c.subscribe_since(&ch, since).await;
        assert!(at_start(&sub), "{sub}");
        if since.is_some() {
            // Nothing was missed from the start; a made-up position is not recovered.
            assert_eq!(sub["recovered"], n % 3 == 1, "{sub}");
        }
        let r = http(node.api, "GET", &format!("/api/history/{ch}"), &[], vec![]).await;
        let page = r.json();
        assert!(at_start(&page), "{page}");
        assert_eq!(
            (&page["complete"], &page["publications"]),
            (&json!(true), &json!([]))
        );
        c.request("unsubscribe", &ch).await;
    }
    assert_eq!(redis.cli(&["DBSIZE"]).trim(), "0", "reads created keys");

    // The start continues with the first publication, whose delivery names the epoch.
    let mut live = node.client().await;
    live.subscribe_since("news:s", None).await;
    let mut away = node.client().await;
    let start = epoch(&away.subscribe_since("news:s", None).await);
    away.close().await;
    let r = http(
        node.api,
        "POST",
        "/api/publish",
        &[("content-type", "application/json")],
        br#"{"channel":"news:s","data":1}"#.to_vec(),
    )
    .await;
    let e = r.json()["epoch"].as_str().unwrap().to_owned();
    assert_ne!(e, start);
    node.publish_numbers("news:s", 2, 5).await;
    let got = live.messages(5).await;
    assert_numbers(&got, 1, 5, 1);
    assert_eq!(got[0]["epoch"], e.as_str());
    // Back from the start: everything since, the first naming the epoch.
    let mut back = node.client().await;
    let sub = back.subscribe_since("news:s", Some((0, &start))).await;
    assert_eq!(
        (&sub["recovered"], &sub["offset"]),
        (&json!(true), &json!(5)),
        "{sub}"
    );
    let got = back.messages(5).await;
    assert_numbers(&got, 1, 5, 1);
    assert_eq!(got[0]["epoch"], e.as_str());
    // And on from that epoch's position, like any other.
    let mut again = node.client().await;
    let sub = again.subscribe_since("news:s", Some((3, &e))).await;
    assert_eq!(sub["recovered"], true, "{sub}");
    assert_numbers(&again.messages(2).await, 4, 5, 4);
}

/// A start read before Redis restarted cannot know whether an epoch began and vanished
/// meanwhile (here one did not, but a restart without persistence would have lost it):
/// resuming from it is `recovered:false`, never a silent continuation (the wildcard
/// start of an earlier design said `true` here).
#[tokio::test]
async fn a_start_from_before_a_redis_restart_is_not_recovered() {
    let mut redis = RedisServer::start();
    let node = Node::start_redis(&redis.url(), |c| {
        c.channels.rules = vec![history_rule("news:*", 100)]
    })
    .await;
    let mut away = node.client().await;
    let sub = away.subscribe_since("news:k", None).await;
    assert!(at_start(&sub), "{sub}");
    let start = epoch(&sub);
    away.close().await;
    // Within one Redis run, the start continues into the epoch begun since.
    node.publish_numbers("news:k", 1, 3).await;
    let mut back = node.client().await;
    let reply = back.subscribe_since("news:k", Some((0, &start))).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_numbers(&back.messages(3).await, 1, 3, 1);
    back.close().await;
    assert_eq!(redis.cli(&["SAVE"]).trim(), "OK");
    redis.restart();
    let mut again = node.client().await;
    let reply = eventually_subscribed(&mut again, "news:k", &start).await;
    assert_eq!(reply["recovered"], false, "{reply}");
    again.expect_silence(Duration::from_millis(200)).await;
}

/// Subscribes with `since` = `(0, start)` until the node has its Redis back.
async fn eventually_subscribed(c: &mut Client, channel: &str, start: &str) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        c.send_json(
            &json!({"op":"subscribe","channel":channel,"id":1,"since":{"offset":0,"epoch":start}}),
        )
        .await;
        let reply = c.recv_json().await;
        if reply["op"] == "subscribed" {
            return reply;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never subscribed: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `history` op: a page can back-fill from the channel's last publications, on
/// the embedded broker and on Redis; only subscribers may ask (by default), and a
/// channel without history or a rule that says `history_access = "nobody"` is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_op_returns_the_latest_publications() {
    let redis = RedisServer::start();
    let rules = |c: &mut herald_server::GatewayConfig| {
        let mut closed = history_rule("closed:*", 10);
        closed.history_access = herald_server::config::PresenceAccess::Nobody;
        c.channels.rules = vec![history_rule("h:*", 10), closed];
    };
    for node in [
        Node::start_with(rules).await,
        Node::start_redis(&redis.url(), rules).await,
    ] {
        node.publish_numbers("h:1", 1, 14).await;
        let mut c = node.client().await;
        let ask = |channel: &str, id: u64, limit: u64| json!({"op": "history", "channel": channel, "id": id, "limit": limit});
        c.send_json(&ask("h:1", 1, 3)).await;
        let e = c.recv_json().await;
        assert_eq!(
            (e["id"].as_u64(), e["code"].as_str()),
            (Some(1), Some("forbidden")),
            "{e}"
        );
        c.subscribe("h:1").await;
        c.send_json(&ask("h:1", 2, 3)).await;
        let page = c.recv_json().await;
        assert_eq!(
            (page["op"].as_str(), page["id"].as_u64()),
            (Some("history"), Some(2)),
            "{page}"
        );
        assert_eq!(page["offset"], 14);
        let got: Vec<(u64, Value)> = page["publications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["offset"].as_u64().unwrap(), p["data"].clone()))
            .collect();
        assert_eq!(got, [(12, json!(12)), (13, json!(13)), (14, json!(14))]);
        // Asking for more than is kept answers what is kept (history_size 10, at least:
        // Redis trims approximately), in order up to the last.
        c.send_json(&ask("h:1", 3, 100)).await;
        let page = c.recv_json().await;
        let kept: Vec<u64> = page["publications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["offset"].as_u64().unwrap())
            .collect();
        assert!(kept.len() >= 10, "{page}");
        assert_eq!(kept, ((15 - kept.len() as u64)..=14).collect::<Vec<_>>());
        c.subscribe("news").await;
        c.send_json(&ask("news", 4, 3)).await;
        assert_eq!(c.recv_json().await["code"], "bad_request");
        c.subscribe("closed:1").await;
        c.send_json(&ask("closed:1", 5, 3)).await;
        assert_eq!(c.recv_json().await["code"], "forbidden");
        // A channel never published: its position, nothing to read.
        c.subscribe_since("h:empty", None).await;
        c.send_json(&ask("h:empty", 6, 3)).await;
        let page = c.recv_json().await;
        assert_eq!(
            (
                page["offset"].as_u64(),
                page["publications"].as_array().map(Vec::len)
            ),
            (Some(0), Some(0))
        );
    }
}

/// A `history` reply larger than half the client's queue is cut to the newest that fit
/// (`complete: false`) instead of closing the client as a slow consumer.
#[tokio::test]
async fn a_large_history_reply_fits_the_queue() {
    let node = Node::start_with(|c| c.channels.rules = vec![history_rule("h:*", 100)]).await;
    let big = format!("\"{}\"", "x".repeat(60_000));
    for _ in 0..30 {
        assert_eq!(node.publish("h:big", &big).await, 200);
    }
    let mut c = node.client().await;
    c.subscribe("h:big").await;
    c.send_json(&json!({"op": "history", "channel": "h:big", "id": 1, "limit": 100}))
        .await;
    let page = c.recv_json().await;
    assert_eq!(
        (page["op"].as_str(), page["complete"].as_bool()),
        (Some("history"), Some(false)),
        "{}",
        page["op"]
    );
    let n = page["publications"].as_array().unwrap().len();
    assert!((1..30).contains(&n), "{n} publications");
    assert_eq!(page["publications"][n - 1]["offset"], 30, "the newest");
    c.send_json(&json!({"op": "ping", "id": 2})).await;
    assert_eq!(c.recv_json().await["op"], "pong", "still connected");
}

/// A subscriber of a history channel that stops reading is not closed when its queue
/// fills (it used to be, with 1013): it lags, and once it reads again it catches up
/// from the history in place, a queue's worth at a time, on the same connection: every
/// offset once and in order, no `subscribed` in between. A healthy subscriber of the
/// same channel is unaffected. A reader that falls behind what the history holds is
/// closed with 1013, what it missed counted, and its resume is told `recovered:false`.
async fn slow_reader_story(node: &Node) {
    const N: u64 = 500;
    let mut slow = Client::connect_with_small_buffer(node.addr).await;
    slow.subscribe_since("feed:live", None).await;
    let mut healthy = node.client().await;
    healthy.subscribe_since("feed:live", None).await;
    let pad = "y".repeat(16 * 1024);
    let publish = |i: u64| format!(r#"{{"i":{i},"pad":"{pad}"}}"#);
    for i in 1..=N {
        assert_eq!(node.publish("feed:live", &publish(i)).await, 200);
        let m = healthy.recv_json().await;
        assert_eq!((&m["offset"], &m["data"]["i"]), (&i.into(), &i.into()));
    }
    // Now the slow one reads: everything, in order, no close.
    for i in 1..=N {
        let m = slow.recv_json().await;
        assert_eq!(m["op"], "message", "{m}");
        assert_eq!(
            (&m["offset"], &m["data"]["i"]),
            (&i.into(), &i.into()),
            "offset {i}"
        );
    }
    assert!(
        node.metric(r#"herald_recoveries_total{outcome="caught_up"}"#) >= 1.0,
        "it never lagged: the test sent too little"
    );
    assert_eq!(node.metric("herald_slow_consumer_disconnects_total"), 0.0);
    assert_eq!(node.publish("feed:live", "1").await, 200);
    assert_eq!(slow.recv_json().await["offset"], N + 1);
    assert_eq!(healthy.recv_json().await["offset"], N + 1);

    // Too far behind: the history (1,000) no longer holds what it missed.
    for i in 1..=1200 {
        assert_eq!(node.publish("feed:live", &publish(i)).await, 200);
        assert_eq!(healthy.recv_json().await["data"]["i"], i);
    }
    let (closed, frames) = slow.closed().await;
    assert_eq!(closed.code, Some(1013), "{closed:?}");
    assert_eq!(closed.reason, "slow consumer");
    assert!(frames < 1200, "{frames} frames before the close");
    assert_eq!(node.metric("herald_slow_consumer_disconnects_total"), 1.0);
    assert!(node.metric(r#"herald_messages_dropped_total{reason="slow_consumer"}"#) >= 200.0);
    assert_eq!(node.publish("feed:live", "2").await, 200);
    assert_eq!(healthy.recv_json().await["data"], 2);
}

#[tokio::test]
async fn a_slow_reader_on_a_history_channel_catches_up_in_place() {
    let node = Node::start_with(|c| {
        c.limits.outbound_queue_bytes = 256 * 1024;
        c.channels.rules = vec![history_rule("feed:*", 1000)];
    })
    .await;
    slow_reader_story(&node).await;
}

#[tokio::test]
async fn a_slow_reader_on_a_history_channel_catches_up_in_place_on_redis() {
    let redis = RedisServer::start();
    let node = Node::start_redis(&redis.url(), |c| {
        c.limits.outbound_queue_bytes = 256 * 1024;
        c.channels.rules = vec![history_rule("feed:*", 1000)];
    })
    .await;
    slow_reader_story(&node).await;
}

/// A publication the node accepts (it fits a whole queue) but larger than seven eighths
/// of it reaches a history subscriber whose queue is empty, and the session keeps
/// reading its socket. (The first version of the catch-up refused it for ever, in a
/// loop of history reads that kept the session from reading.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_near_the_queue_size_reaches_a_history_subscriber() {
    let node = Node::start_with(|c| {
        c.limits.outbound_queue_bytes = 64 * 1024;
        c.channels.rules = vec![history_rule("feed:*", 100)];
    })
    .await;
    let mut c = node.client().await;
    c.subscribe_since("feed:big", None).await;
    // 60 KiB of data: accepted (under the whole 64 KiB queue), over 7/8 of it.
    let data = format!("\"{}\"", "z".repeat(60 * 1024));
    assert_eq!(node.publish("feed:big", &data).await, 200);
    assert_eq!(node.publish("feed:big", "1").await, 200);
    let first = c.recv_json().await;
    assert_eq!(first["offset"], 1);
    assert_eq!(first["data"].as_str().map(str::len), Some(60 * 1024));
    assert_eq!(c.recv_json().await["offset"], 2);
    c.send_json(&json!({"op": "ping", "id": 99})).await;
    assert_eq!(c.recv_json().await["id"], 99);
    assert_eq!(node.metric("herald_slow_consumer_disconnects_total"), 0.0);
}
