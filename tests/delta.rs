//! Fossil delta compression (`delta = "fossil"` on a rule, `"delta":"fossil"` on a
//! subscribe): what goes on the wire, that every frame rebuilds the publisher's exact
//! bytes, and that the Rust client does so through a resume, a node change and a
//! Redis that comes back empty (a reset).

use bytes::Bytes;
use herald_client::{Client as RustClient, Config, Event};
use herald_protocol::delta::apply_fossil;
use herald_protocol::server::raw_data;
use herald_server::config::{ChannelRule, DeltaFormat};
use herald_testkit::{history_rule, http, Client, Node, RedisServer, WAIT};
use serde_json::{json, Value};

fn delta_rule(pattern: &str) -> ChannelRule {
    ChannelRule {
        delta: Some(DeltaFormat::Fossil),
        ..history_rule(pattern, 1000)
    }
}

/// A live-score document of about 2 KB, laid out as a publisher might (spaces, key
/// order), where a few fields change from one `seq` to the next.
fn doc(seq: u64) -> String {
    let players: Vec<String> = (0..22)
        .map(|i| {
            format!(
                r#"{{"name": "Player {i:02}", "team": "{}", "rating": {:.1}, "cards": {}}}"#,
                if i < 11 { "home" } else { "away" },
                6.0 + ((i * 7 + seq / 5) % 30) as f64 / 10.0,
                u64::from(i == seq % 22),
            )
        })
        .collect();
    format!(
        r#"{{ "seq": {seq}, "match": "Sunderland – Newcastle", "minute": {}, "score": [{}, {}], "players": [{}] }}"#,
        10 + seq,
        seq / 7,
        seq / 11,
        players.join(", ")
    )
}

/// Reads `n` deliveries of `channel` from a raw client, rebuilding each (whole or a
/// delta against the one before): the data's bytes and the frame's size, per frame.
async fn rebuild(c: &mut Client, channel: &str, n: usize) -> Vec<(String, usize, bool)> {
    let mut base: Option<(u64, String)> = None;
    let mut out = Vec::new();
    while out.len() < n {
        let text = match c.recv().await {
            tokio_tungstenite::tungstenite::Message::Text(t) => t.to_string(),
            other => panic!("expected text, got {other:?}"),
        };
        let f: Value = serde_json::from_str(&text).unwrap();
        if f["op"] != "message" {
            continue;
        }
        let offset = f["offset"]
            .as_u64()
            .expect("history deliveries carry offsets");
        let (data, delta) = match f["delta"].as_str() {
            None => (
                raw_data(&text, channel).expect("whole frame").to_owned(),
                false,
            ),
            Some(d) => {
                let (at, b) = base.as_ref().expect("a delta comes after a whole frame");
                assert_eq!(at + 1, offset, "a delta applies to the frame before");
                let whole = apply_fossil(b.as_bytes(), d.as_bytes(), 1 << 20).expect("applies");
                (String::from_utf8(whole).unwrap(), true)
            }
        };
        base = Some((offset, data.clone()));
        out.push((data, text.len(), delta));
    }
    out
}

/// The control API subscribes `c`'s connection to `channel`, as a backend would.
async fn backend_subscribes(node: &Node, c: &Client, channel: &str) {
    let body = json!({"conn": c.welcome["conn"], "channel": channel}).to_string();
    let r = http(
        node.api,
        "POST",
        "/api/subscribe",
        &[("content-type", "application/json")],
        body.into_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
}

async fn subscribe(c: &mut Client, channel: &str, id: u64, extra: Value) -> Value {
    let mut frame = json!({"op": "subscribe", "channel": channel, "id": id});
    for (k, v) in extra.as_object().unwrap() {
        frame[k] = v.clone();
    }
    c.send_json(&frame).await;
    c.recv_json().await
}

#[tokio::test]
async fn deltas_on_the_wire_rebuild_the_publishers_bytes() {
    let node = Node::start_with(|c| {
        c.channels.rules = vec![delta_rule("doc:*"), history_rule("feed:*", 100)]
    })
    .await;
    let mut wants = node.client().await;
    let mut plain = node.client().await;
    let mut elsewhere = node.client().await;
    let delta = json!({"delta": "fossil"});
    let r = subscribe(&mut wants, "doc:a", 1, delta.clone()).await;
    assert_eq!(
        (r["op"].as_str(), r["delta"].as_str()),
        (Some("subscribed"), Some("fossil"))
    );
    let r = subscribe(&mut plain, "doc:a", 1, json!({})).await;
    assert_eq!(r["delta"], Value::Null);
    // A channel whose rule does not allow deltas: the subscribe succeeds, whole frames.
    let r = subscribe(&mut elsewhere, "feed:x", 1, delta.clone()).await;
    assert_eq!(
        (r["op"].as_str(), r["delta"].clone()),
        (Some("subscribed"), Value::Null)
    );
    // A format there is not: refused with the request's id; the connection goes on.
    let r = subscribe(&mut wants, "doc:b", 2, json!({"delta": "zstd"})).await;
    assert_eq!(
        (r["op"].as_str(), r["code"].as_str(), r["id"].as_u64()),
        (Some("error"), Some("bad_request"), Some(2))
    );

    // Documents, with two that no delta helps: a tiny value, and a document whose
    // changes are all multi-byte characters (a delta may split one, and is then not
    // UTF-8: it goes whole).
    let published: Vec<String> = (1..=30)
        .map(|i| match i {
            10 => "7".to_owned(),
            20 => format!(r#"{{"ünïcödé": "{}"}}"#, "ß€😀".repeat(i as usize)),
            _ => doc(i),
        })
        .collect();
    for p in &published {
        assert_eq!(node.publish("doc:a", p).await, 200);
    }
    node.publish("feed:x", &doc(1)).await;
    let got = rebuild(&mut wants, "doc:a", 30).await;
    let whole = rebuild(&mut plain, "doc:a", 30).await;
    let datas: Vec<&String> = got.iter().map(|(d, ..)| d).collect();
    assert_eq!(
        datas,
        published.iter().collect::<Vec<_>>(),
        "every publication, byte for byte"
    );
    assert!(
        whole.iter().all(|(_, _, d)| !d),
        "no delta to a subscriber that did not ask"
    );
    assert_eq!(
        whole.iter().map(|(d, ..)| d).collect::<Vec<_>>(),
        published.iter().collect::<Vec<_>>()
    );
    let kinds: Vec<bool> = got.iter().map(|(_, _, d)| *d).collect();
    // The first is whole; so are the tiny one and the one after it (its base is "7").
    assert!(!kinds[0] && !kinds[9] && !kinds[10], "{kinds:?}");
    let deltas = kinds.iter().filter(|d| **d).count();
    assert!(deltas >= 25, "{deltas} deltas in {kinds:?}");
    // The documents' deltas against the whole frames the other subscriber got.
    let (sent, instead): (usize, usize) = got
        .iter()
        .zip(&whole)
        .filter(|((_, _, d), _)| *d)
        .map(|((_, n, _), (_, w, _))| (*n, *w))
        .fold((0, 0), |(a, b), (n, w)| (a + n, b + w));
    assert!(
        sent * 5 < instead,
        "{sent} bytes of deltas for {instead} bytes of documents"
    );
    let r = rebuild(&mut elsewhere, "feed:x", 1).await;
    assert_eq!(r[0].0, doc(1));
    assert_eq!(
        node.metric(r#"herald_delta_publications_total{outcome="delta"}"#) as usize,
        deltas
    );

    // A resume starts whole (every publication it replays), then deltas again.
    let mut back = node.client().await;
    let epoch = r_epoch(&node).await;
    let r = subscribe(
        &mut back,
        "doc:a",
        1,
        json!({"delta": "fossil", "since": {"offset": 25, "epoch": epoch}}),
    )
    .await;
    assert_eq!(
        (r["recovered"].as_bool(), r["delta"].as_str()),
        (Some(true), Some("fossil"))
    );
    node.publish("doc:a", &doc(31)).await;
    let again = rebuild(&mut back, "doc:a", 6).await;
    assert_eq!(
        again.iter().map(|(_, _, d)| *d).collect::<Vec<_>>(),
        [false, false, false, false, false, true]
    );
    assert_eq!(again[5].0, doc(31));
    assert_eq!(again[0].0, published[25]);
}

/// Where a delta cannot help or cannot be trusted, the next delivery goes whole: a
/// subscribe of a channel the client holds (its `subscribed` resets the client's base),
/// a document holding a carriage return (SSE framing would change it), one larger than
/// `limits.max_delta_bytes`, and for 10 s after a delta that was slow to compute.
#[tokio::test]
async fn deltas_give_way_where_they_cannot_help() {
    let node = Node::start_with(|c| {
        c.channels.rules = vec![delta_rule("doc:*")];
        c.limits.max_delta_bytes = 256 * 1024;
        c.limits.max_body_bytes = 1 << 20;
        // The production bound: the slow document below takes longer.
        c.limits.max_delta_time = std::time::Duration::from_millis(2);
    })
    .await;
    let mut c = node.client().await;
    let r = subscribe(&mut c, "doc:a", 1, json!({"delta": "fossil"})).await;
    assert_eq!(r["delta"], "fossil");
    let kinds = |got: &[(String, usize, bool)]| got.iter().map(|g| g.2).collect::<Vec<_>>();
    node.publish("doc:a", &doc(1)).await;
    node.publish("doc:a", &doc(2)).await;
    assert_eq!(kinds(&rebuild(&mut c, "doc:a", 2).await), [false, true]);

    // Subscribing again: `subscribed` (with "delta"), then whole, then deltas.
    let r = subscribe(&mut c, "doc:a", 2, json!({"delta": "fossil"})).await;
    assert_eq!(
        (r["op"].as_str(), r["delta"].as_str(), r["id"].as_u64()),
        (Some("subscribed"), Some("fossil"), Some(2))
    );
    node.publish("doc:a", &doc(3)).await;
    node.publish("doc:a", &doc(4)).await;
    assert_eq!(kinds(&rebuild(&mut c, "doc:a", 2).await), [false, true]);

    // A carriage return (JSON whitespace) in a document: it and the next go whole.
    let crlf = doc(5).replacen(", ", ",\r\n ", 3);
    node.publish("doc:a", &crlf).await;
    node.publish("doc:a", &doc(6)).await;
    node.publish("doc:a", &doc(7)).await;
    let got = rebuild(&mut c, "doc:a", 3).await;
    assert_eq!(got[0].0, crlf);
    assert_eq!(kinds(&got), [false, false, true]);
    let skipped = r#"herald_delta_publications_total{outcome="skipped"}"#;
    assert_eq!(node.metric(skipped), 2.0);

    // Large documents: past the limit whole; under it, a delta that takes long to
    // compute pauses the channel's deltas (the documents after it go whole too).
    // Digits from a linear congruential generator: nothing in common between two.
    let mut x: u64 = 7;
    let mut noise = |n: usize| -> String {
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                char::from(b'0' + (x >> 60) as u8 % 10)
            })
            .collect()
    };
    let big = format!(r#"{{"seq":8,"blob":"{}"}}"#, noise(300 * 1024));
    let slow_a = format!(r#"{{"seq":9,"blob":"{}"}}"#, noise(100 * 1024));
    let slow_b = format!(r#"{{"seq":10,"blob":"{}"}}"#, noise(100 * 1024));
    for d in [&big, &slow_a, &slow_b] {
        assert_eq!(node.publish("doc:a", d).await, 200);
    }
    node.publish("doc:a", &doc(11)).await;
    node.publish("doc:a", &doc(12)).await;
    let got = rebuild(&mut c, "doc:a", 5).await;
    assert_eq!(got[2].0, slow_b);
    assert_eq!(kinds(&got), [false; 5], "whole throughout the pause");
    // `big` (too large), `slow_a` (its base, `big`, is too), `slow_b` (slow), then two
    // in the pause.
    assert_eq!(node.metric(skipped), 2.0 + 5.0);
    assert_eq!(
        node.metric(r#"herald_delta_publications_total{outcome="delta"}"#),
        3.0
    );
}

/// A subscribe of a channel the connection holds: the subscription goes on, its deltas
/// follow the request (off when it asks for none, on again when it asks), and the
/// reply says the position of the last delivery before it; a `since` replays nothing
/// (nothing was missed on this connection). A subscribe the backend makes leaves the
/// deltas as they are.
#[tokio::test]
async fn subscribing_again_sets_deltas_and_says_the_position() {
    let node = Node::start_with(|c| c.channels.rules = vec![delta_rule("doc:*")]).await;
    let mut c = node.client().await;
    let r = subscribe(&mut c, "doc:a", 1, json!({"delta": "fossil"})).await;
    assert_eq!(r["delta"], "fossil");
    let kinds = |got: &[(String, usize, bool)]| got.iter().map(|g| g.2).collect::<Vec<_>>();
    node.publish("doc:a", &doc(1)).await;
    node.publish("doc:a", &doc(2)).await;
    assert_eq!(kinds(&rebuild(&mut c, "doc:a", 2).await), [false, true]);
    let epoch = r_epoch(&node).await;

    // Again without `delta`: no deltas from here on.
    let r = subscribe(&mut c, "doc:a", 2, json!({})).await;
    assert_eq!(
        (r["op"].as_str(), r["id"].as_u64(), r["delta"].clone()),
        (Some("subscribed"), Some(2), Value::Null),
        "{r}"
    );
    assert_eq!(
        (r["offset"].as_u64(), r["epoch"].as_str()),
        (Some(2), Some(epoch.as_str())),
        "{r}"
    );
    for i in 3..=5 {
        node.publish("doc:a", &doc(i)).await;
    }
    let got = rebuild(&mut c, "doc:a", 3).await;
    assert_eq!(kinds(&got), [false, false, false]);
    assert_eq!(got[2].0, doc(5));

    // Again with `delta` and an old `since`: deltas again, the position, no replay
    // (it has had every offset since its first subscribe, made before the first
    // publication: nothing after offset 1 was lost).
    let r = subscribe(
        &mut c,
        "doc:a",
        3,
        json!({"delta": "fossil", "since": {"offset": 1, "epoch": epoch}}),
    )
    .await;
    assert_eq!(
        (
            r["delta"].as_str(),
            r["offset"].as_u64(),
            r["recovered"].as_bool()
        ),
        (Some("fossil"), Some(5), Some(true)),
        "{r}"
    );
    node.publish("doc:a", &doc(6)).await;
    node.publish("doc:a", &doc(7)).await;
    let got = rebuild(&mut c, "doc:a", 2).await;
    assert_eq!(
        got.iter().map(|g| (g.0.as_str(), g.2)).collect::<Vec<_>>(),
        [(doc(6).as_str(), false), (doc(7).as_str(), true)],
        "offsets 6 and 7 only: the first whole, then a delta"
    );

    // The backend subscribes it again (the control API): its deltas stay as they are.
    backend_subscribes(&node, &c, "doc:a").await;
    let r = c.recv_json().await;
    assert_eq!(
        (
            r["op"].as_str(),
            r["id"].clone(),
            r["delta"].as_str(),
            r["offset"].as_u64()
        ),
        (Some("subscribed"), Value::Null, Some("fossil"), Some(7)),
        "{r}"
    );
    node.publish("doc:a", &doc(8)).await;
    node.publish("doc:a", &doc(9)).await;
    assert_eq!(kinds(&rebuild(&mut c, "doc:a", 2).await), [false, true]);

    // A plain channel held: `subscribed`, no position and no deltas.
    let r = subscribe(&mut c, "plain", 4, json!({})).await;
    assert_eq!(r["op"], "subscribed");
    let r = subscribe(&mut c, "plain", 5, json!({"delta": "fossil"})).await;
    assert_eq!(
        (
            r["op"].as_str(),
            r["id"].as_u64(),
            r["offset"].clone(),
            r["delta"].clone()
        ),
        (Some("subscribed"), Some(5), Value::Null, Value::Null),
        "{r}"
    );
}

/// A subscription the application made (the control API, as a token's `subscribe`
/// claim does at connect) is held when the client's own resume arrives: nothing is
/// replayed behind what it already delivers, and the reply's `recovered` says whether
/// the client's `since` lost anything, instead of moving it on unseen.
#[tokio::test]
async fn a_resume_into_a_held_subscription_says_what_was_lost() {
    let node = Node::start_with(|c| c.channels.rules = vec![history_rule("h:*", 100)]).await;
    for i in 1..=3 {
        assert_eq!(node.publish("h:x", &i.to_string()).await, 200);
    }
    let mut c = node.client().await;
    backend_subscribes(&node, &c, "h:x").await;
    let r = c.recv_json().await;
    assert_eq!(
        (r["op"].as_str(), r["offset"].as_u64()),
        (Some("subscribed"), Some(3))
    );
    let epoch = r["epoch"].as_str().unwrap().to_owned();
    let since = |offset: u64| json!({"since": {"offset": offset, "epoch": epoch}});
    // The client had offset 1 (from an earlier connection): 2 and 3 came before this
    // subscription began.
    let r = subscribe(&mut c, "h:x", 1, since(1)).await;
    assert_eq!(
        (
            r["id"].as_u64(),
            r["offset"].as_u64(),
            r["recovered"].as_bool()
        ),
        (Some(1), Some(3), Some(false)),
        "{r}"
    );
    let r = subscribe(&mut c, "h:x", 2, since(3)).await;
    assert_eq!(r["recovered"].as_bool(), Some(true), "{r}");
    node.publish("h:x", "4").await;
    let m = c.recv_json().await;
    assert_eq!(
        (m["op"].as_str(), m["offset"].as_u64()),
        (Some("message"), Some(4))
    );
    for (id, offset) in [(3, 3), (4, 4)] {
        let r = subscribe(&mut c, "h:x", id, since(offset)).await;
        assert_eq!(
            (r["offset"].as_u64(), r["recovered"].as_bool()),
            (Some(4), Some(true)),
            "{r}"
        );
    }
    // Without `since`: the position, no `recovered`.
    let r = subscribe(&mut c, "h:x", 5, json!({})).await;
    assert_eq!(
        (r["offset"].as_u64(), r["recovered"].clone()),
        (Some(4), Value::Null),
        "{r}"
    );
    c.expect_silence(std::time::Duration::from_millis(200))
        .await;
}

/// The channel's epoch, from a subscribe.
async fn r_epoch(node: &Node) -> String {
    let mut c = node.client().await;
    let r = subscribe(&mut c, "doc:a", 1, json!({})).await;
    r["epoch"].as_str().unwrap().to_owned()
}

/// Reads `sub` until the document `last` arrives: the documents' numbers in order of
/// arrival (each checked byte for byte against what was published), and the other
/// events.
async fn until_doc(sub: &mut herald_client::Subscription, last: u64) -> (Vec<u64>, Vec<Event>) {
    let (mut seqs, mut others) = (Vec::new(), Vec::new());
    loop {
        let ev = tokio::time::timeout(WAIT, sub.next())
            .await
            .expect("an event within the wait")
            .expect("the client is running");
        match ev {
            // Published straight into Redis: no offset, not a document.
            Event::Message { offset: None, .. } => others.push(ev),
            Event::Message { data, .. } => {
                let v: Value = serde_json::from_slice(&data).expect("JSON");
                let seq = v["seq"].as_u64().expect("a document");
                assert_eq!(data, Bytes::from(doc(seq)), "the publisher's bytes");
                seqs.push(seq);
                if seq == last {
                    return (seqs, others);
                }
            }
            other => others.push(other),
        }
    }
}

#[tokio::test]
async fn the_rust_client_rebuilds_every_delta_through_a_node_change_and_a_reset() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let rules = |c: &mut herald_server::GatewayConfig| c.channels.rules = vec![delta_rule("doc:*")];
    let a = Node::start_redis(&url, rules).await;
    let b = Node::start_redis(&url, rules).await;
    let addr = a.addr;
    let mut config = Config::new(a.ws_url());
    config.min_backoff = std::time::Duration::from_millis(50);
    config.max_backoff = std::time::Duration::from_millis(200);
    config.delta = true;
    let client = RustClient::start(config);
    let mut sub = client.subscribe("doc:x").unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, sub.next()).await.unwrap(),
        Some(Event::Subscribed)
    );
    for i in 1..=20 {
        assert_eq!(b.publish("doc:x", &doc(i)).await, 200);
    }
    // Applied, not worked around: a delta that failed would reconnect, and resubscribe.
    let (seqs, others) = until_doc(&mut sub, 20).await;
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    assert_eq!(others, []);
    assert_eq!(
        a.metric(r#"herald_delta_publications_total{outcome="delta"}"#),
        19.0
    );

    // The node goes away while publishing goes on; the client resumes on its successor.
    a.shutdown().await.unwrap();
    for i in 21..=30 {
        assert_eq!(b.publish("doc:x", &doc(i)).await, 200);
    }
    let a = Node::start_redis_at(addr, &url, rules).await;
    let (seqs, others) = until_doc(&mut sub, 30).await;
    assert_eq!(seqs, (21..=30).collect::<Vec<_>>());
    assert!(others.contains(&Event::Recovered(true)), "{others:?}");
    // Publications straight into Redis (no offset, no history; JSON and binary) reach
    // the subscriber between the documents and leave its delta base alone.
    redis.cli(&["PUBLISH", "herald:doc:x", r#"{"raw":1}"#]);
    redis.cli(&["PUBLISH", "herald:doc:x", "raw \x01 bytes"]);
    for i in 31..=35 {
        assert_eq!(b.publish("doc:x", &doc(i)).await, 200);
    }
    let (seqs, others) = until_doc(&mut sub, 35).await;
    assert_eq!(seqs, (31..=35).collect::<Vec<_>>());
    assert_eq!(
        others.len(),
        2,
        "the two raw publications, no reconnect: {others:?}"
    );
    assert!(others
        .iter()
        .all(|e| matches!(e, Event::Message { offset: None, .. })));
    // The resume replayed whole; the new node's deltas began after it.
    assert_eq!(
        a.metric(r#"herald_delta_publications_total{outcome="delta"}"#),
        4.0
    );

    // Redis comes back empty: a new epoch, announced; what follows rebuilds right.
    redis.restart();
    let mut seq = 36;
    let mut seen = Vec::new();
    let mut others = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !others.contains(&Event::Reset) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reset: {others:?}"
        );
        if b.publish("doc:x", &doc(seq)).await == 200 {
            let (s, o) = until_doc(&mut sub, seq).await;
            seen.extend(s);
            others.extend(o);
        }
        seq += 1;
    }
    let last = seq + 5;
    for i in seq..=last {
        assert_eq!(b.publish("doc:x", &doc(i)).await, 200);
    }
    let (s, _) = until_doc(&mut sub, last).await;
    seen.extend(s);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "in order: {seen:?}");
    assert!(
        seen.ends_with(&(seq..=last).collect::<Vec<_>>()),
        "{seen:?}"
    );
    assert!(a.metric(r#"herald_delta_publications_total{outcome="delta"}"#) >= 9.0);
    client.close();
}
