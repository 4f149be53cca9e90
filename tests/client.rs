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
