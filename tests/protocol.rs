//! The wire protocol, op by op, over real sockets.

use std::time::Duration;

use herald_testkit::{http, json, Client, Node};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn welcome_is_the_first_frame() {
    let node = Node::start().await;
    let c = node.client().await;
    assert_eq!(c.welcome["version"], 1);
    // The release, as `herald --version` prints it (crates/herald/tests/process.rs).
    assert_eq!(c.welcome["server"], env!("CARGO_PKG_VERSION"));
    assert_eq!(c.welcome["node"], "test");
    assert!(c.welcome["conn"].as_str().is_some_and(|s| !s.is_empty()));
    let d = node.client().await;
    assert_ne!(
        c.welcome["conn"], d.welcome["conn"],
        "connection ids are unique"
    );
}

/// The README's browser snippet and curl line, step by step.
#[tokio::test]
async fn readme_flow_subscribe_then_http_publish() {
    let node = Node::start().await;
    let mut ws = node.client().await;
    ws.send_text(r#"{"op":"subscribe","channel":"news","id":1}"#)
        .await;
    assert_eq!(
        ws.recv_json().await,
        json!({"op":"subscribed","channel":"news","id":1})
    );
    let r = http(
        node.api,
        "POST",
        "/api/publish",
        &[("content-type", "application/json")],
        br#"{"channel":"news","data":{"title":"hi"}}"#.to_vec(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["ok"], true);
    match ws.recv().await {
        Message::Text(t) => assert_eq!(
            t.as_str(),
            r#"{"op":"message","channel":"news","data":{"title":"hi"}}"#
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn every_op_gets_its_reply() {
    let node = Node::start_with(|c| {
        c.channels.client_publish = herald_protocol::ChannelPatterns::new(["chat:*"]).unwrap()
    })
    .await;
    let mut c = node.client().await;
    c.send_text(r#"{"op":"ping","id":5}"#).await;
    assert_eq!(c.recv_json().await, json!({"op":"pong","id":5}));
    c.send_text(r#"{"op":"ping"}"#).await;
    assert_eq!(c.recv_json().await, json!({"op":"pong"}));
    assert_eq!(
        c.request("subscribe", "chat:lobby").await,
        json!({"op":"subscribed","channel":"chat:lobby","id":1})
    );
    c.send_text(r#"{"op":"publish","channel":"chat:lobby","data":[1,"two"],"id":9}"#)
        .await;
    // The ack and the delivery of our own message may arrive in either order.
    let mut got = vec![c.recv_json().await, c.recv_json().await];
    got.sort_by_key(|v| v["op"].as_str().unwrap_or("").to_owned());
    assert_eq!(
        got,
        vec![
            json!({"op":"message","channel":"chat:lobby","data":[1,"two"]}),
            json!({"op":"published","channel":"chat:lobby","id":9}),
        ]
    );
    assert_eq!(
        c.request("unsubscribe", "chat:lobby").await,
        json!({"op":"unsubscribed","channel":"chat:lobby","id":2})
    );
    // Unsubscribing from a channel one does not hold is not an error.
    assert_eq!(
        c.request("unsubscribe", "other").await["op"],
        "unsubscribed"
    );
}

#[tokio::test]
async fn client_publish_is_forbidden_by_default() {
    let node = Node::start().await;
    let mut sub = node.client().await;
    sub.subscribe("news").await;
    let mut c = node.client().await;
    c.send_text(r#"{"op":"publish","channel":"news","data":1,"id":3}"#)
        .await;
    let e = c.recv_json().await;
    assert_eq!(
        (e["op"].as_str(), e["code"].as_str(), e["id"].as_u64()),
        (Some("error"), Some("forbidden"), Some(3))
    );
    c.send_binary(b"\x04news\x01".to_vec()).await;
    assert_eq!(c.recv_json().await["code"], "forbidden");
    sub.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn text_data_arrives_byte_for_byte() {
    let node = Node::start_with(|c| {
        c.channels.client_publish = herald_protocol::ChannelPatterns::new(["*"]).unwrap()
    })
    .await;
    let mut sub = node.client().await;
    sub.subscribe("exact").await;
    let data = r#"{ "z" :1,"a":[ 1.50, -0, 1e3, "\u00e9é\"\\/"] ,"n":null }"#;
    // Over HTTP.
    let body = format!(r#"{{"channel":"exact","data":{data}}}"#);
    assert_eq!(
        http(
            node.api,
            "POST",
            "/api/publish",
            &[("content-type", "application/json")],
            body.into_bytes()
        )
        .await
        .status,
        200
    );
    let expected = format!(r#"{{"op":"message","channel":"exact","data":{data}}}"#);
    match sub.recv().await {
        Message::Text(t) => assert_eq!(t.as_str(), expected),
        other => panic!("{other:?}"),
    }
    // From a client.
    let mut publisher = node.client().await;
    publisher
        .send_text(&format!(
            r#"{{"op":"publish","channel":"exact","data":{data}}}"#
        ))
        .await;
    assert_eq!(publisher.recv_json().await["op"], "published");
    match sub.recv().await {
        Message::Text(t) => assert_eq!(t.as_str(), expected),
        other => panic!("{other:?}"),
    }
    // null is data like any other value, over WebSocket as over HTTP.
    publisher
        .send_text(r#"{"op":"publish","channel":"exact","data":null,"id":5}"#)
        .await;
    assert_eq!(publisher.recv_json().await["id"], 5);
    match sub.recv().await {
        Message::Text(t) => assert_eq!(
            t.as_str(),
            r#"{"op":"message","channel":"exact","data":null}"#
        ),
        other => panic!("{other:?}"),
    }
    // Over HTTP with the channel in the path.
    let r = http(
        node.api,
        "POST",
        "/api/publish/exact",
        &[("content-type", "application/json")],
        data.as_bytes().to_vec(),
    )
    .await;
    assert_eq!(r.status, 200);
    match sub.recv().await {
        Message::Text(t) => assert_eq!(t.as_str(), expected),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn binary_round_trip_is_byte_exact() {
    let node = Node::start_with(|c| {
        c.channels.client_publish = herald_protocol::ChannelPatterns::new(["bin"]).unwrap()
    })
    .await;
    let mut sub = node.client().await;
    sub.subscribe("bin").await;
    let payload: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    let mut frame = vec![3u8];
    frame.extend_from_slice(b"bin");
    frame.extend_from_slice(&payload);

    let mut publisher = node.client().await;
    publisher.send_binary(frame.clone()).await;
    assert_eq!(
        publisher.recv_json().await,
        json!({"op":"published","channel":"bin"})
    );
    assert_eq!(&sub.recv_binary().await[..], &frame[..]);

    let r = http(
        node.api,
        "POST",
        "/api/publish/bin",
        &[("content-type", "application/octet-stream")],
        payload.clone(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(&sub.recv_binary().await[..], &frame[..]);

    // An empty payload is a valid publication.
    publisher.send_binary(b"\x03bin".to_vec()).await;
    assert_eq!(&sub.recv_binary().await[..], b"\x03bin");
}

#[tokio::test]
async fn a_thousand_subscribers_all_receive_in_order() {
    let node = Node::start().await;
    let mut subs = Vec::new();
    for _ in 0..1000 {
        let mut c = node.client().await;
        c.subscribe("crowd").await;
        subs.push(c);
    }
    assert_eq!(node.metric("herald_subscriptions"), 1000.0);
    assert_eq!(node.metric("herald_channels"), 1.0);
    for i in 0..5 {
        assert_eq!(node.publish("crowd", &i.to_string()).await, 200);
    }
    let mut tasks = Vec::new();
    for mut c in subs {
        tasks.push(tokio::spawn(async move {
            for i in 0..5 {
                let m = c.recv_json().await;
                assert_eq!(m["data"], i, "in publish order");
            }
            c
        }));
    }
    for t in tasks {
        t.await.expect("every subscriber received all five");
    }
    assert_eq!(node.metric("herald_messages_delivered_total"), 5000.0);
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let node = Node::start().await;
    let mut leaver = node.client().await;
    let mut stayer = node.client().await;
    leaver.subscribe("room").await;
    stayer.subscribe("room").await;
    assert_eq!(node.publish("room", "1").await, 200);
    assert_eq!(leaver.recv_json().await["data"], 1);
    assert_eq!(stayer.recv_json().await["data"], 1);
    assert_eq!(
        leaver.request("unsubscribe", "room").await["op"],
        "unsubscribed"
    );
    assert_eq!(node.publish("room", "2").await, 200);
    assert_eq!(stayer.recv_json().await["data"], 2);
    leaver.expect_silence(Duration::from_millis(200)).await;
    // The last local subscriber leaving removes the channel.
    assert_eq!(
        stayer.request("unsubscribe", "room").await["op"],
        "unsubscribed"
    );
    assert_eq!(node.metric("herald_channels"), 0.0);
    assert_eq!(node.metric("herald_subscriptions"), 0.0);
}

/// Every malformed frame gets an error frame, the connection stays usable, and other
/// clients are unaffected.
#[tokio::test]
async fn bad_frames_get_errors_and_harm_no_one() {
    let node = Node::start().await;
    let mut bystander = node.client().await;
    bystander.subscribe("calm").await;
    let mut c = node.client().await;
    let cases: &[(&str, &str, Option<u64>)] = &[
        ("not json", "bad_request", None),
        ("[1,2,3]", "bad_request", None),
        // An array in a subscribe's field order is still not an object.
        (r#"["subscribe","news",1,null]"#, "bad_request", None),
        (r#"{"op":"dance","id":1}"#, "bad_request", Some(1)),
        (r#"{"op":"subscribe","id":2}"#, "bad_request", Some(2)),
        (
            r#"{"op":"subscribe","channel":7,"id":3}"#,
            "bad_request",
            None,
        ),
        (r#"{"channel":"x","id":4}"#, "bad_request", Some(4)),
        (r#"{"op":"ping","id":"five"}"#, "bad_request", None),
        (
            r#"{"op":"subscribe","channel":"has space","id":6}"#,
            "invalid_channel",
            Some(6),
        ),
        (
            r#"{"op":"subscribe","channel":"","id":7}"#,
            "invalid_channel",
            Some(7),
        ),
        (
            r#"{"op":"unsubscribe","channel":"ünï","id":8}"#,
            "invalid_channel",
            Some(8),
        ),
    ];
    for (frame, code, id) in cases {
        c.send_text(frame).await;
        let e = c.recv_json().await;
        assert_eq!(e["op"], "error", "{frame}");
        assert_eq!(e["code"], *code, "{frame}: {e}");
        assert_eq!(e["id"].as_u64(), *id, "{frame}: {e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let long = "x".repeat(256);
    c.send_text(&format!(
        r#"{{"op":"subscribe","channel":"{long}","id":9}}"#
    ))
    .await;
    assert_eq!(c.recv_json().await["code"], "invalid_channel");
    for bad in [vec![], vec![9, b'a'], vec![1, b' ', 1]] {
        c.send_binary(bad).await;
        let e = c.recv_json().await;
        assert!(
            e["code"] == "bad_request" || e["code"] == "invalid_channel",
            "{e}"
        );
    }
    // Still usable, and the array above subscribed to nothing.
    c.send_text(r#"{"op":"ping","id":10}"#).await;
    assert_eq!(c.recv_json().await, json!({"op":"pong","id":10}));
    assert_eq!(node.publish("news", "1").await, 200);
    c.expect_silence(Duration::from_millis(100)).await;
    assert_eq!(node.publish("calm", "true").await, 200);
    assert_eq!(bystander.recv_json().await["data"], true);
    assert!(node.metric(r#"herald_client_errors_total{code="bad_request"}"#) >= 7.0);
}

#[tokio::test]
async fn subscription_limit() {
    let node = Node::start_with(|c| c.limits.max_subscriptions = 3).await;
    let mut c = node.client().await;
    for ch in ["a", "b", "c"] {
        c.subscribe(ch).await;
    }
    // Re-subscribing to a held channel does not count.
    c.subscribe("a").await;
    let e = c.request("subscribe", "d").await;
    assert_eq!(e["code"], "too_many_subscriptions", "{e}");
    // The held subscriptions still work, and freeing one makes room.
    assert_eq!(node.publish("c", "1").await, 200);
    assert_eq!(c.recv_json().await["channel"], "c");
    c.request("unsubscribe", "b").await;
    c.subscribe("d").await;
}

#[tokio::test]
async fn client_close_is_clean() {
    let node = Node::start().await;
    let mut c = node.client().await;
    c.subscribe("x").await;
    assert_eq!(node.metric("herald_connections"), 1.0);
    c.close().await;
    herald_testkit::eventually("the session is gone", || {
        node.metric("herald_connections") == 0.0 && node.metric("herald_subscriptions") == 0.0
    })
    .await;
    // A client that just drops its socket is cleaned up too.
    let c = Client::connect(&node.ws_url()).await.unwrap();
    drop(c);
    herald_testkit::eventually("the dropped session is gone", || {
        node.metric("herald_connections") == 0.0
    })
    .await;
}

/// A session whose writer has parked (idle past `websocket.writer_linger`) still gets
/// deliveries, replies and pings, in order.
#[tokio::test]
async fn idle_sessions_wake_up_for_deliveries() {
    let node = Node::start_with(|c| c.websocket.writer_linger = Duration::from_millis(10)).await;
    let mut c = node.client().await;
    c.subscribe("later").await;
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(node.publish("later", &round.to_string()).await, 200);
        assert_eq!(c.recv_json().await["data"], round);
        c.send_text(r#"{"op":"ping","id":9}"#).await;
        assert_eq!(c.recv_json().await["op"], "pong");
    }
}

/// RFC 6455: a text message that is not UTF-8 closes with 1007; a frame that breaks the
/// framing rules with 1002. Nobody else is affected.
#[tokio::test]
async fn invalid_utf8_closes_with_1007_and_protocol_errors_with_1002() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let node = Node::start().await;
    let mut bystander = node.client().await;
    bystander.subscribe("calm").await;
    let mut c = node.client().await;
    let frame = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    c.ws().send(Message::Frame(frame)).await.unwrap();
    let (closed, _) = c.closed().await;
    assert_eq!(closed.code, Some(1007), "{closed:?}");
    // A continuation frame with nothing to continue breaks the framing rules.
    let mut c = node.client().await;
    let frame = Frame::message(vec![1, 2], OpCode::Data(Data::Continue), true);
    c.ws().send(Message::Frame(frame)).await.unwrap();
    let (closed, _) = c.closed().await;
    assert_eq!(closed.code, Some(1002), "{closed:?}");
    assert_eq!(node.publish("calm", "1").await, 200);
    assert_eq!(bystander.recv_json().await["data"], 1);
}
