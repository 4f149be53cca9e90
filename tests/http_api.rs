//! The HTTP API: publish forms, batch, auth, and every error status.

use herald_testkit::{http, Node};

#[tokio::test]
async fn batch_publishes_in_order() {
    let node = Node::start().await;
    let mut a = node.client().await;
    a.subscribe("a").await;
    let mut b = node.client().await;
    b.subscribe("b").await;
    let body = br#"{"publications":[
        {"channel":"a","data":1},{"channel":"b","data":"x"},{"channel":"a","data":2}]}"#;
    let r = http(
        node.api,
        "POST",
        "/api/batch",
        &[("content-type", "application/json")],
        body.to_vec(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["published"], 3);
    assert_eq!(a.recv_json().await["data"], 1);
    assert_eq!(a.recv_json().await["data"], 2);
    assert_eq!(b.recv_json().await["data"], "x");
}

#[tokio::test]
async fn a_batch_with_one_bad_entry_publishes_nothing() {
    let node = Node::start().await;
    let mut a = node.client().await;
    a.subscribe("a").await;
    let body = br#"{"publications":[{"channel":"a","data":1},{"channel":"no good","data":2}]}"#;
    let r = http(
        node.api,
        "POST",
        "/api/batch",
        &[("content-type", "application/json")],
        body.to_vec(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "invalid_channel");
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("publications[1]"));
    a.expect_silence(std::time::Duration::from_millis(200))
        .await;
}

#[tokio::test]
async fn batch_size_limit() {
    let node = Node::start_with(|c| c.limits.max_batch = 2).await;
    let body = br#"{"publications":[{"channel":"a","data":1},{"channel":"a","data":2},{"channel":"a","data":3}]}"#;
    let r = http(
        node.api,
        "POST",
        "/api/batch",
        &[("content-type", "application/json")],
        body.to_vec(),
    )
    .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["code"], "too_large");
}

/// Path, headers, body, expected status, expected error code.
type Case = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static [u8],
    u16,
    &'static str,
);

#[tokio::test]
async fn errors_have_status_and_code() {
    let node = Node::start_with(|c| c.limits.max_body_bytes = 64).await;
    let mut sub = node.client().await;
    sub.subscribe("news").await;
    let cases: &[Case] = &[
        (
            "/api/publish",
            &[("content-type", "application/json")],
            b"{not json",
            400,
            "bad_request",
        ),
        (
            "/api/publish",
            &[("content-type", "application/json")],
            br#"{"channel":"news"}"#,
            400,
            "bad_request",
        ),
        (
            "/api/publish",
            &[("content-type", "application/json")],
            br#"{"channel":"a b","data":1}"#,
            400,
            "invalid_channel",
        ),
        (
            "/api/publish",
            &[("content-type", "application/json")],
            &[b'x'; 65],
            413,
            "too_large",
        ),
        (
            "/api/publish/news",
            &[("content-type", "application/json")],
            b"{oops",
            400,
            "bad_request",
        ),
        (
            "/api/publish/news",
            &[("content-type", "text/plain")],
            b"hi",
            415,
            "bad_request",
        ),
        (
            "/api/publish/bad%20name",
            &[("content-type", "application/json")],
            b"1",
            400,
            "invalid_channel",
        ),
        ("/api/nothing", &[], b"", 404, "not_found"),
        // JSON bodies only as application/json: text/plain and form bodies are what a
        // web page can send cross-site without a preflight.
        (
            "/api/publish",
            &[("content-type", "text/plain")],
            br#"{"channel":"news","data":1}"#,
            415,
            "bad_request",
        ),
        (
            "/api/batch",
            &[("content-type", "application/x-www-form-urlencoded")],
            br#"{"publications":[]}"#,
            415,
            "bad_request",
        ),
        (
            "/api/publish",
            &[],
            br#"{"channel":"news","data":1}"#,
            415,
            "bad_request",
        ),
    ];
    for (path, headers, body, status, code) in cases {
        let r = http(node.api, "POST", path, headers, body.to_vec()).await;
        assert_eq!(
            r.status,
            *status,
            "{path} {:?}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["code"], *code, "{path}");
    }
    let r = http(node.api, "GET", "/api/publish", &[], vec![]).await;
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    // RFC 9110: a 405 names what the resource takes.
    assert_eq!(r.header("allow"), Some("POST"));
    let r = http(node.api, "POST", "/api/history/news", &[], vec![]).await;
    assert_eq!((r.status, r.header("allow")), (405, Some("GET")));
    // Nothing bad was delivered, and the API still works.
    assert_eq!(node.publish("news", "1").await, 200);
    assert_eq!(sub.recv_json().await["data"], 1);
}

#[tokio::test]
async fn api_key_is_required_when_configured() {
    let node = Node::start_with(|c| c.auth.api_key = Some("s3cret".into())).await;
    let body = br#"{"channel":"news","data":1}"#.to_vec();
    let r = http(
        node.api,
        "POST",
        "/api/publish",
        &[("content-type", "application/json")],
        body.clone(),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let r = http(
        node.api,
        "POST",
        "/api/publish",
        &[("authorization", "Bearer wrong")],
        body.clone(),
    )
    .await;
    assert_eq!(r.status, 401);
    let r = http(
        node.api,
        "POST",
        "/api/publish",
        &[
            ("authorization", "Bearer s3cret"),
            ("content-type", "application/json"),
        ],
        body,
    )
    .await;
    assert_eq!(r.status, 200);
    // Health stays public.
    assert_eq!(
        http(node.api, "GET", "/healthz", &[], vec![]).await.status,
        200
    );
}

/// `/metrics` on the listener clients reach is not everyone's (issue 18): with an API
/// key configured it needs one; `auth.metrics_key` gives Prometheus a key of its own
/// (which cannot publish) and is then the only key `/metrics` takes, on any listener.
/// On an internal listener without `metrics_key` it stays open (a private network).
#[tokio::test]
async fn metrics_need_a_key_where_clients_can_reach_them() {
    let get = |addr, key: Option<&'static str>| async move {
        let auth = key.map(|k| format!("Bearer {k}"));
        let h: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
        http(addr, "GET", "/metrics", &h, vec![]).await
    };
    let shared = Node::start_with(|c| c.auth.api_key = Some("s3cret".into())).await;
    let r = get(shared.addr, None).await;
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (401, Some("unauthorized"))
    );
    assert_eq!(get(shared.addr, Some("wrong")).await.status, 401);
    let r = get(shared.addr, Some("s3cret")).await;
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("herald_connections"));

    let own = Node::start_with(|c| {
        c.auth.api_key = Some("s3cret".into());
        c.auth.metrics_key = Some("scrape-only".into());
    })
    .await;
    assert_eq!(get(own.addr, Some("scrape-only")).await.status, 200);
    assert_eq!(get(own.addr, Some("s3cret")).await.status, 401);
    // The metrics key publishes nothing.
    let body = br#"{"channel":"news","data":1}"#.to_vec();
    let h = [
        ("authorization", "Bearer scrape-only"),
        ("content-type", "application/json"),
    ];
    assert_eq!(
        http(own.api, "POST", "/api/publish", &h, body).await.status,
        401
    );

    let split = Node::start_split(|c| c.auth.api_key = Some("s3cret".into())).await;
    assert_eq!(get(split.api, None).await.status, 200);
    let split = Node::start_split(|c| c.auth.metrics_key = Some("scrape-only".into())).await;
    assert_eq!(get(split.api, None).await.status, 401);
    assert_eq!(get(split.api, Some("scrape-only")).await.status, 200);
}

#[tokio::test]
async fn scoped_api_keys_publish_only_inside_their_scope() {
    let node = Node::start_with(|c| {
        c.auth.api_key = Some("old-key-everything".into());
        c.auth.api_keys = vec![herald_auth::ApiKeyConfig {
            key: "news-only".into(),
            channels: herald_protocol::ChannelPatterns::new(["news:*"]).unwrap(),
        }];
        c.channels.rules = vec![herald_testkit::history_rule("*", 10)];
    })
    .await;
    let mut sub = node.client().await;
    sub.subscribe("news:a").await;
    sub.subscribe("billing").await;
    let call = |method: &'static str, path: &'static str, key: &'static str, body: &str| {
        let body = body.as_bytes().to_vec();
        let api = node.api;
        async move {
            let auth = format!("Bearer {key}");
            let r = http(
                api,
                method,
                path,
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                body,
            )
            .await;
            (r.status, r.json()["code"].as_str().map(str::to_owned))
        }
    };
    // Both keys work (rotation), each within its scope.
    let one = |c: &str, n: u32| format!(r#"{{"channel":"{c}","data":{n}}}"#);
    assert_eq!(
        call("POST", "/api/publish", "news-only", &one("news:a", 1))
            .await
            .0,
        200
    );
    assert_eq!(
        call(
            "POST",
            "/api/publish",
            "old-key-everything",
            &one("billing", 2)
        )
        .await
        .0,
        200
    );
    // Outside its scope: 403, nothing published, and a batch is all or nothing.
    assert_eq!(
        call("POST", "/api/publish", "news-only", &one("billing", 3)).await,
        (403, Some("forbidden".into()))
    );
    let batch =
        r#"{"publications":[{"channel":"news:a","data":4},{"channel":"billing","data":5}]}"#;
    assert_eq!(call("POST", "/api/batch", "news-only", batch).await.0, 403);
    assert_eq!(
        call("GET", "/api/history/billing", "news-only", "").await.0,
        403
    );
    assert_eq!(
        call("GET", "/api/history/news:a", "news-only", "").await.0,
        200
    );
    // A prefix, a longer string or another key's scope do not pass.
    for wrong in ["news-onl", "news-only!", "old-key"] {
        assert_eq!(
            call("POST", "/api/publish", wrong, &one("news:a", 6))
                .await
                .0,
            401
        );
    }
    assert_eq!(sub.recv_json().await["data"], 1);
    assert_eq!(sub.recv_json().await["data"], 2);
    sub.expect_silence(std::time::Duration::from_millis(300))
        .await;
}

#[tokio::test]
async fn split_listeners_serve_their_own_endpoints() {
    let node = Node::start_split(|_| {}).await;
    assert_ne!(node.addr, node.api);
    let body = br#"{"channel":"news","data":1}"#.to_vec();
    assert_eq!(
        http(
            node.addr,
            "POST",
            "/api/publish",
            &[("content-type", "application/json")],
            body.clone()
        )
        .await
        .status,
        404
    );
    assert_eq!(
        http(node.addr, "GET", "/metrics", &[], vec![]).await.status,
        404
    );
    assert_eq!(http(node.api, "GET", "/ws", &[], vec![]).await.status, 404);
    let mut c = node.client().await;
    c.subscribe("news").await;
    assert_eq!(
        http(
            node.api,
            "POST",
            "/api/publish",
            &[("content-type", "application/json")],
            body
        )
        .await
        .status,
        200
    );
    assert_eq!(c.recv_json().await["data"], 1);
    for addr in [node.addr, node.api] {
        assert_eq!(http(addr, "GET", "/healthz", &[], vec![]).await.status, 200);
        assert_eq!(http(addr, "GET", "/readyz", &[], vec![]).await.status, 200);
    }
}

#[tokio::test]
async fn metrics_follow_connections() {
    let node = Node::start().await;
    let scrape = || async {
        let r = http(node.api, "GET", "/metrics", &[], vec![]).await;
        assert_eq!(r.status, 200);
        String::from_utf8(r.body.to_vec()).unwrap()
    };
    let mut clients = Vec::new();
    for _ in 0..7 {
        let mut c = node.client().await;
        c.subscribe("m").await;
        clients.push(c);
    }
    let text = scrape().await;
    assert_eq!(
        herald_testkit::metric_value(&text, "herald_connections"),
        Some(7.0)
    );
    assert_eq!(
        herald_testkit::metric_value(&text, "herald_subscriptions"),
        Some(7.0)
    );
    for c in clients.drain(..3) {
        c.close().await;
    }
    herald_testkit::eventually("gauge follows", || node.metric("herald_connections") == 4.0).await;
    assert_eq!(node.publish("m", "1").await, 200);
    for c in &mut clients {
        c.recv_json().await;
    }
    let text = scrape().await;
    assert_eq!(
        herald_testkit::metric_value(&text, "herald_connections"),
        Some(4.0)
    );
    assert_eq!(
        herald_testkit::metric_value(&text, "herald_connections_opened_total"),
        Some(7.0)
    );
    assert_eq!(
        herald_testkit::metric_value(&text, "herald_messages_delivered_total"),
        Some(4.0)
    );
    assert_eq!(
        herald_testkit::metric_value(&text, r#"herald_messages_published_total{source="http"}"#),
        Some(1.0)
    );
}
