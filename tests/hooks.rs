//! The rpc hook against a real HTTP backend the test runs, behaving well and badly:
//! answers, refusals, a disconnect, a backend too slow, garbage, too big, a 500, and
//! gone. Every failure is answered to the caller (failing closed) and counted, and no
//! other client is disturbed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_testkit::{token, Client, Node, TEST_SECRET};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use serde_json::{json, Value};

const SECRET: &str = "hook-secret";

/// The backend: answers by `method`, and refuses requests whose signature is wrong.
async fn backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: Request<hyper::body::Incoming>| async move {
                        let path = req.uri().path().to_owned();
                        let ts: u64 = req.headers()["x-herald-timestamp"]
                            .to_str()
                            .unwrap()
                            .parse()
                            .unwrap();
                        let sig = req
                            .headers()
                            .get("x-herald-signature")
                            .map(|v| v.to_str().unwrap().to_owned());
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let ok =
                            sig.as_deref() == Some(herald_hooks::sign(SECRET, ts, &body).as_str());
                        let call: Value = serde_json::from_slice(&body).unwrap();
                        let answer = |s: String| {
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(s))))
                        };
                        if !ok {
                            return answer(
                                json!({"error": {"code": 401, "message": "bad signature"}})
                                    .to_string(),
                            );
                        }
                        let channel = call["channel"].as_str().unwrap_or("");
                        if let Some(a) = session_hooks(&path, &call).await {
                            return answer(a.to_string());
                        }
                        match path.as_str() {
                            "/subscribe" => {
                                return answer(
                                    match channel.split(':').next().unwrap() {
                                        "open" => json!({"result": {}}),
                                        "kick" => json!({"disconnect": {"code": 4401, "reason": "not you"}}),
                                        _ => json!({"error": {"code": 403, "message": "members only"}}),
                                    }
                                    .to_string(),
                                )
                            }
                            "/publish" => {
                                return answer(
                                    match channel {
                                        "pub:live" => json!({"result": {"skip_history": true}}),
                                        "pub:odd" => json!({"result": 7}),
                                        "pub:rewrite" => json!({"result": {"data": {"clean": true, "was": call["data"], "by": call["user"]}}}),
                                        "pub:ok" => json!({"result": {}}),
                                        _ => json!({"error": {"code": 3, "message": "no"}}),
                                    }
                                    .to_string(),
                                )
                            }
                            _ => {}
                        }
                        match call["method"].as_str().unwrap() {
                        "echo" => answer(json!({"result": {"data": call["data"], "user": call["user"], "conn": call["conn"], "transport": call["transport"]}}).to_string()),
                        "refuse" => answer(json!({"error": {"code": 42, "message": "not today"}}).to_string()),
                        "kick" => answer(json!({"disconnect": {"code": 4403, "reason": "bye"}}).to_string()),
                        "slow" => {
                            tokio::time::sleep(Duration::from_secs(3)).await;
                            answer(json!({"result": 1}).to_string())
                        }
                        "garbage" => answer("not json".into()),
                        "two" => answer(json!({"result": 1, "error": {"code": 1}}).to_string()),
                        "huge" => answer(json!({"result": "x".repeat(200_000)}).to_string()),
                        _ => {
                            let mut r = Response::new(Full::new(Bytes::from_static(b"{}")));
                            *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
                            Ok(r)
                        }
                    }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, task)
}

/// The connect and refresh hooks of a cookie-session application: the `session`
/// cookie names who the client is (or how the backend misbehaves).
async fn session_hooks(path: &str, call: &Value) -> Option<Value> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let user = call["user"].as_str().unwrap_or("");
    match path {
        "/connect" => {
            let cookie = call["headers"]["cookie"].as_str().unwrap_or("");
            let session = cookie.split("; ").find_map(|c| c.strip_prefix("session="));
            Some(match (session, user) {
                (Some("alice"), _) => json!({"result": {
                    "user": "alice", "expires": now + 600, "info": {"name": "Alice"},
                    "channels": ["inbox:alice"],
                    "data": {"theme": "dark", "address": call["address"],
                             "transport": call["transport"], "conn": call["conn"],
                             "headers": call["headers"]}}}),
                (Some(u @ ("brief" | "ending")), _) => {
                    json!({"result": {"user": u, "expires": now + 2}})
                }
                (Some("endless"), _) => json!({"result": {"user": "endless"}}),
                (Some("banned"), _) => json!({"error": {"code": 403, "message": "banned"}}),
                (Some("kick"), _) => json!({"disconnect": {"code": 4403, "reason": "go away"}}),
                (Some("slow"), _) => {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    json!({"result": {"user": "slow"}})
                }
                (Some("garbage"), _) => json!({"result": 5}),
                (Some("past"), _) => json!({"result": {"user": "past", "expires": now - 5}}),
                // `always = true`: a token's user is asked about too.
                (None, "kim") => {
                    json!({"result": {"channels": ["news"], "data": {"hello": "kim"}}})
                }
                (None, "mallory") => json!({"error": {"code": 403, "message": "suspended"}}),
                _ => json!({"error": {"code": 401, "message": "sign in"}}),
            })
        }
        "/refresh" => Some(match user {
            "brief" => json!({"result": {"expires": now + 2}}),
            _ => json!({"error": {"code": 1, "message": "signed out"}}),
        }),
        _ => None,
    }
}

async fn rpc(c: &mut Client, id: u64, method: &str, data: Value) -> Value {
    c.send_json(&json!({"op": "rpc", "id": id, "method": method, "data": data}))
        .await;
    loop {
        let f = c.recv_json().await;
        if f["id"] == id {
            return f;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rpc_hook_answers_and_fails_closed() {
    let (addr, server) = backend().await;
    let node = Node::start_with(|c| {
        c.auth.jwt.hmac_secret = Some(TEST_SECRET.into());
        c.hooks.secret = SECRET.into();
        c.hooks.max_response_bytes = 65536;
        c.hooks.rpc = Some(herald_hooks::RpcHookConfig {
            url: format!("http://{addr}/rpc"),
            timeout: Duration::from_millis(300),
            anonymous: false,
        });
    })
    .await;
    let url = format!(
        "{}?access_token={}",
        node.ws_url(),
        token("kim", 600, json!({}))
    );
    let mut kim = Client::connect(&url).await.unwrap();
    let mut bystander = node.client().await;
    bystander.subscribe("news").await;

    let r = rpc(&mut kim, 1, "echo", json!({"q": [1, 2]})).await;
    assert_eq!(r["op"], "result", "{r}");
    assert_eq!(r["data"]["data"], json!({"q": [1, 2]}));
    assert_eq!(
        (r["data"]["user"].as_str(), r["data"]["transport"].as_str()),
        (Some("kim"), Some("websocket"))
    );
    assert_eq!(r["data"]["conn"], kim.welcome["conn"]);

    let r = rpc(&mut kim, 2, "refuse", Value::Null).await;
    assert_eq!(
        (
            r["code"].as_str(),
            r["hook_code"].as_i64(),
            r["message"].as_str()
        ),
        (Some("refused"), Some(42), Some("not today"))
    );

    // Too slow: answered `unavailable` at the timeout; the connection is not held up
    // meanwhile (a ping sent after it is answered first).
    kim.send_json(&json!({"op": "rpc", "id": 3, "method": "slow"}))
        .await;
    kim.send_json(&json!({"op": "ping", "id": 4})).await;
    let started = Instant::now();
    assert_eq!(kim.recv_json().await["op"], "pong");
    let r = kim.recv_json().await;
    assert_eq!(
        (r["id"].as_u64(), r["code"].as_str()),
        (Some(3), Some("unavailable")),
        "{r}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    for (i, method) in ["garbage", "two", "huge", "status500"]
        .into_iter()
        .enumerate()
    {
        let r = rpc(&mut kim, 10 + i as u64, method, Value::Null).await;
        assert_eq!(r["code"], "unavailable", "{method}: {r}");
    }
    let bad = rpc(&mut kim, 20, "", Value::Null).await;
    assert_eq!(bad["code"], "bad_request");
    // Anonymous clients may not call it.
    let mut anon = node.client().await;
    assert_eq!(
        rpc(&mut anon, 1, "echo", Value::Null).await["code"],
        "forbidden"
    );

    // Publications kept flowing to the bystander all along.
    assert_eq!(node.publish("news", "1").await, 200);
    assert_eq!(bystander.recv_json().await["data"], 1);

    // The backend says to disconnect: closed with its code.
    kim.send_json(&json!({"op": "rpc", "id": 30, "method": "kick"}))
        .await;
    let (closed, _) = kim.closed().await;
    assert_eq!((closed.code, closed.reason.as_str()), (Some(4403), "bye"));

    // A backend that is not there: unavailable, at once.
    let gone = Node::start_with(|c| {
        c.hooks.rpc = Some(herald_hooks::RpcHookConfig {
            url: format!("http://127.0.0.1:{}/rpc", herald_testkit::free_port()),
            timeout: Duration::from_secs(5),
            anonymous: true,
        });
    })
    .await;
    let mut lee = gone.client().await;
    let started = Instant::now();
    assert_eq!(
        rpc(&mut lee, 1, "echo", Value::Null).await["code"],
        "unavailable"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        gone.metric("herald_hook_calls_total{hook=\"rpc\",outcome=\"failed\"}"),
        1.0
    );
    server.abort();
    let m = |o: &str| {
        node.metric(&format!(
            "herald_hook_calls_total{{hook=\"rpc\",outcome=\"{o}\"}}"
        ))
    };
    assert_eq!(
        (m("result"), m("error"), m("disconnect"), m("timeout")),
        (1.0, 1.0, 1.0, 1.0)
    );
    assert_eq!(m("bad_answer"), 4.0);
}

/// `subscribe = "hook"` and `publish = "hook"`: the backend allows, refuses with its
/// code, disconnects, or rewrites what is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_and_publish_hooks_decide_per_request() {
    let (addr, server) = backend().await;
    let node = Node::start_with(|c| {
        c.auth.jwt.hmac_secret = Some(TEST_SECRET.into());
        c.hooks.secret = SECRET.into();
        let table = |path: &str| herald_hooks::HookConfig {
            url: format!("http://{addr}{path}"),
            timeout: Duration::from_secs(2),
        };
        c.hooks.subscribe = Some(table("/subscribe"));
        c.hooks.publish = Some(table("/publish"));
        let rule = |pattern: &str| {
            let mut r = herald_testkit::history_rule(pattern, 0);
            r.subscribe = herald_server::config::SubscribeAccess::Hook;
            r
        };
        let mut publish = herald_testkit::history_rule("pub:*", 0);
        publish.publish = herald_server::config::PublishAccess::Hook;
        c.channels.rules = vec![rule("open:*"), rule("closed:*"), rule("kick:*"), publish];
    })
    .await;
    let url = format!(
        "{}?access_token={}",
        node.ws_url(),
        token("ada", 600, json!({}))
    );
    let mut ada = Client::connect(&url).await.unwrap();
    ada.subscribe("open:1").await;
    ada.send_json(&json!({"op": "subscribe", "channel": "closed:1", "id": 7}))
        .await;
    let e = ada.recv_json().await;
    assert_eq!(
        (
            e["id"].as_u64(),
            e["code"].as_str(),
            e["hook_code"].as_i64()
        ),
        (Some(7), Some("refused"), Some(403)),
        "{e}"
    );

    ada.subscribe("pub:rewrite").await;
    ada.subscribe("pub:ok").await;
    ada.send_json(
        &json!({"op": "publish", "channel": "pub:rewrite", "data": {"text": "hi"}, "id": 8}),
    )
    .await;
    let got = [ada.recv_json().await, ada.recv_json().await];
    let msg = got
        .iter()
        .find(|f| f["op"] == "message")
        .expect("the publication");
    assert_eq!(
        msg["data"],
        json!({"clean": true, "was": {"text": "hi"}, "by": "ada"})
    );
    assert!(got.iter().any(|f| f["op"] == "published" && f["id"] == 8));
    ada.send_json(&json!({"op": "publish", "channel": "pub:ok", "data": 5, "id": 9}))
        .await;
    let got = [ada.recv_json().await, ada.recv_json().await];
    assert!(
        got.iter().any(|f| f["op"] == "message" && f["data"] == 5),
        "{got:?}"
    );
    ada.send_json(&json!({"op": "publish", "channel": "pub:no", "data": 1, "id": 10}))
        .await;
    let e = ada.recv_json().await;
    assert_eq!(
        (e["code"].as_str(), e["hook_code"].as_i64()),
        (Some("refused"), Some(3))
    );

    // Over SSE the session asks the same hook: allowed, then refused as an event.
    let bearer = format!("Bearer {}", token("ada", 600, json!({})));
    let mut sse = herald_testkit::SseClient::connect(
        node.addr,
        "/sse?channel=open:2&channel=closed:2",
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(sse.status, 200);
    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.push(sse.event().await.json());
    }
    assert!(
        seen.iter()
            .any(|e| e["op"] == "subscribed" && e["channel"] == "open:2"),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|e| e["code"] == "refused" && e["hook_code"] == 403),
        "{seen:?}"
    );

    ada.send_json(&json!({"op": "subscribe", "channel": "kick:1", "id": 11}))
        .await;
    let (closed, _) = ada.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (Some(4401), "not you")
    );
    server.abort();
}

/// A WebSocket opened with a session cookie from `origin`.
async fn with_cookie(
    node: &Node,
    origin: &str,
    session: &str,
) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
    let cookie = format!("theme=x; session={session}");
    let headers = [
        ("origin", origin),
        ("cookie", &cookie),
        ("x-secret", "not forwarded"),
    ];
    open(&node.ws_url(), &headers).await
}

/// A WebSocket to `url` opened with `headers`.
async fn open(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        let name: hyper::header::HeaderName = k.parse().unwrap();
        req.headers_mut().insert(name, v.parse().unwrap());
    }
    let (ws, _) = tokio_tungstenite::connect_async(req).await?;
    Ok(Client::from_stream(ws).await)
}

/// What a refused upgrade answered: its status and JSON body.
async fn refused(node: &Node, session: &str) -> (u16, Value) {
    let cookie = format!("session={session}");
    let r = herald_testkit::http(
        node.addr,
        "GET",
        "/ws",
        &[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("origin", "http://app.test"),
            ("cookie", &cookie),
        ],
        Vec::new(),
    )
    .await;
    (r.status, r.json())
}

/// Cookie sessions: the connect hook names the user (with expiry, info, server-side
/// channels and welcome data), refuses before the upgrade with the backend's code,
/// fails closed; the refresh hook extends or ends connections it let in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_hook_lets_cookie_sessions_in() {
    let (addr, server) = backend().await;
    let node = Node::start_with(|c| {
        c.auth.jwt.hmac_secret = Some(TEST_SECRET.into());
        c.auth.anonymous = false;
        c.auth.allowed_origins = vec!["http://app.test".into()];
        c.hooks.secret = SECRET.into();
        c.hooks.connect = Some(herald_hooks::ConnectHookConfig {
            url: format!("http://{addr}/connect"),
            timeout: Duration::from_millis(700),
            forward_headers: vec!["Cookie".into()],
            always: false,
        });
        c.hooks.refresh = Some(herald_hooks::RefreshHookConfig {
            url: format!("http://{addr}/refresh"),
            timeout: Duration::from_secs(1),
            before_expiry: Duration::from_secs(1),
        });
        let mut inbox = herald_testkit::history_rule("inbox:{sub}", 0);
        inbox.subscribe = herald_server::config::SubscribeAccess::Authenticated;
        c.channels.rules = vec![inbox];
    })
    .await;

    let mut alice = with_cookie(&node, "http://app.test", "alice")
        .await
        .unwrap();
    let w = &alice.welcome;
    assert_eq!(w["user"], "alice", "{w}");
    assert_eq!(w["data"]["theme"], "dark");
    assert_eq!(
        (
            w["data"]["address"].as_str(),
            w["data"]["transport"].as_str()
        ),
        (Some("127.0.0.1"), Some("websocket"))
    );
    assert_eq!(w["data"]["conn"], w["conn"]);
    // Only the forwarded header reached the backend, cookies whole.
    assert_eq!(
        w["data"]["headers"],
        json!({"cookie": "theme=x; session=alice"})
    );
    // The backend's channels are subscribed server-side; its user owns `inbox:alice`.
    let s = alice.recv_json().await;
    assert_eq!(
        (s["op"].as_str(), s["channel"].as_str()),
        (Some("subscribed"), Some("inbox:alice")),
        "{s}"
    );
    assert_eq!(node.publish("inbox:alice", "1").await, 200);
    assert_eq!(alice.recv_json().await["data"], 1);
    alice
        .send_json(&json!({"op": "subscribe", "channel": "inbox:bob", "id": 5}))
        .await;
    assert_eq!(alice.recv_json().await["code"], "forbidden");

    // Refusals before the upgrade, with the backend's code; failures fail closed.
    let (status, body) = refused(&node, "nobody").await;
    assert_eq!(
        (
            status,
            body["code"].as_str(),
            body["hook_code"].as_i64(),
            body["message"].as_str()
        ),
        (401, Some("refused"), Some(401), Some("sign in")),
        "{body}"
    );
    let (status, body) = refused(&node, "banned").await;
    assert_eq!(
        (status, body["hook_code"].as_i64()),
        (403, Some(403)),
        "{body}"
    );
    let (status, body) = refused(&node, "kick").await;
    assert_eq!(
        (status, body["hook_code"].as_i64()),
        (403, Some(4403)),
        "{body}"
    );
    let (status, body) = refused(&node, "past").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("unauthorized")),
        "{body}"
    );
    let started = Instant::now();
    let (status, body) = refused(&node, "slow").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("unavailable")),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    let (status, _) = refused(&node, "garbage").await;
    assert_eq!(status, 503);
    // Another site's page is refused before the backend is asked (cross-site
    // WebSocket hijacking), and a token still works without the hook.
    let calls = |o: &str| {
        node.metric(&format!(
            "herald_hook_calls_total{{hook=\"connect\",outcome=\"{o}\"}}"
        ))
    };
    let asked = calls("result") + calls("error") + calls("disconnect");
    assert!(with_cookie(&node, "http://evil.test", "alice")
        .await
        .is_err());
    let url = format!(
        "{}?access_token={}",
        node.ws_url(),
        token("kim", 600, json!({}))
    );
    let kim = open(&url, &[("origin", "http://app.test")]).await.unwrap();
    assert_eq!(kim.welcome["user"], "kim");
    assert_eq!(
        calls("result") + calls("error") + calls("disconnect"),
        asked
    );
    // POST /sse/publish from another site's page (its browser sends the cookie along),
    // or with a body no browser form can send: refused before the backend is asked.
    for (origin, content_type, status) in [
        ("http://evil.test", "application/json", 403),
        ("http://app.test", "text/plain", 415),
    ] {
        let r = herald_testkit::http(
            node.addr,
            "POST",
            "/sse/publish",
            &[
                ("origin", origin),
                ("cookie", "session=alice"),
                ("content-type", content_type),
            ],
            json!({"channel": "inbox:alice", "data": 1})
                .to_string()
                .into_bytes(),
        )
        .await;
        assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    }
    assert_eq!(
        calls("result") + calls("error") + calls("disconnect"),
        asked
    );
    let rejected = |r: &str| {
        node.metric(&format!(
            "herald_connections_rejected_total{{reason=\"{r}\"}}"
        ))
    };
    assert_eq!(
        (rejected("hook_refused"), rejected("hook_failed")),
        (4.0, 2.0)
    );

    // Refresh: `brief` is extended past its first expiry again and again; `ending` is
    // told it signed out (4001); `endless` has no expiry and is never asked about.
    let mut brief = with_cookie(&node, "http://app.test", "brief")
        .await
        .unwrap();
    let mut ending = with_cookie(&node, "http://app.test", "ending")
        .await
        .unwrap();
    let _endless = with_cookie(&node, "http://app.test", "endless")
        .await
        .unwrap();
    let (closed, _) = ending.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (Some(4001), "signed out")
    );
    tokio::time::sleep(Duration::from_millis(4500)).await;
    brief.send_json(&json!({"op": "ping", "id": 1})).await;
    assert_eq!(brief.recv_json().await["op"], "pong");
    let refreshes = node.metric("herald_hook_calls_total{hook=\"refresh\",outcome=\"result\"}");
    assert!((2.0..=6.0).contains(&refreshes), "{refreshes}");
    assert_eq!(
        node.metric("herald_hook_calls_total{hook=\"refresh\",outcome=\"error\"}"),
        1.0
    );

    // Over SSE the same cookie session, credentials allowed for the listed origin.
    let mut sse = herald_testkit::SseClient::connect(
        node.addr,
        "/sse?channel=inbox:alice",
        &[("cookie", "session=alice"), ("origin", "http://app.test")],
    )
    .await;
    assert_eq!(sse.status, 200);
    assert_eq!(sse.headers["access-control-allow-credentials"], "true");
    assert_eq!(sse.event().await.json()["user"], "alice");
    server.abort();
}

/// `always = true`: a valid token's user is asked about too; the backend may refuse it
/// or add channels and welcome data. The publish hook's `skip_history` delivers live
/// without storing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_hook_can_be_asked_always_and_publishes_can_skip_history() {
    let (addr, server) = backend().await;
    let node = Node::start_with(|c| {
        c.auth.jwt.hmac_secret = Some(TEST_SECRET.into());
        c.hooks.secret = SECRET.into();
        c.hooks.connect = Some(herald_hooks::ConnectHookConfig {
            url: format!("http://{addr}/connect"),
            timeout: Duration::from_secs(2),
            forward_headers: vec![],
            always: true,
        });
        c.hooks.publish = Some(herald_hooks::HookConfig {
            url: format!("http://{addr}/publish"),
            timeout: Duration::from_secs(2),
        });
        let mut publish = herald_testkit::history_rule("pub:*", 10);
        publish.publish = herald_server::config::PublishAccess::Hook;
        c.channels.rules = vec![publish];
    })
    .await;
    let url = |user: &str| {
        format!(
            "{}?access_token={}",
            node.ws_url(),
            token(user, 600, json!({}))
        )
    };
    let mut kim = Client::connect(&url("kim")).await.unwrap();
    assert_eq!(
        (kim.welcome["user"].as_str(), &kim.welcome["data"]),
        (Some("kim"), &json!({"hello": "kim"}))
    );
    let s = kim.recv_json().await;
    assert_eq!(
        (s["op"].as_str(), s["channel"].as_str()),
        (Some("subscribed"), Some("news"))
    );
    match Client::connect(&url("mallory")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("mallory connected: {:?}", other.map(|c| c.welcome)),
    }

    // skip_history: delivered live without an offset, absent from history; a
    // publication kept in history still gets offset 1.
    let r = kim.subscribe_since("pub:live", None).await;
    assert_eq!(r["offset"], 0, "{r}");
    kim.send_json(&json!({"op": "publish", "channel": "pub:live", "data": {"n": 1}, "id": 9}))
        .await;
    let got = [kim.recv_json().await, kim.recv_json().await];
    let msg = got
        .iter()
        .find(|f| f["op"] == "message")
        .expect("delivered live");
    assert_eq!(
        (msg["data"].clone(), msg.get("offset")),
        (json!({"n": 1}), None),
        "{msg}"
    );
    let h = herald_testkit::http(node.addr, "GET", "/api/history/pub:live", &[], Vec::new()).await;
    assert_eq!(
        h.json()["publications"],
        json!([]),
        "{}",
        String::from_utf8_lossy(&h.body)
    );
    assert_eq!(node.publish("pub:live", "2").await, 200);
    let m = kim.recv_json().await;
    assert_eq!(
        (m["data"].as_u64(), m["offset"].as_u64()),
        (Some(2), Some(1)),
        "{m}"
    );
    // A result that is not an object fails closed.
    kim.send_json(&json!({"op": "publish", "channel": "pub:odd", "data": 1, "id": 10}))
        .await;
    assert_eq!(kim.recv_json().await["code"], "unavailable");

    // POST /sse/publish asks the same hooks (connect with always, then publish).
    let bearer = format!("Bearer {}", token("kim", 600, json!({})));
    let sse_publish = |channel: &'static str| {
        let bearer = bearer.clone();
        let addr = node.addr;
        async move {
            herald_testkit::http(
                addr,
                "POST",
                "/sse/publish",
                &[
                    ("authorization", &bearer),
                    ("content-type", "application/json"),
                ],
                json!({"channel": channel, "data": {"n": 3}})
                    .to_string()
                    .into_bytes(),
            )
            .await
        }
    };
    let r = sse_publish("pub:live").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let m = kim.recv_json().await;
    assert_eq!(
        (m["data"].clone(), m.get("offset")),
        (json!({"n": 3}), None),
        "{m}"
    );
    let r = sse_publish("pub:no").await;
    assert_eq!(
        (
            r.status,
            r.json()["code"].as_str(),
            r.json()["hook_code"].as_i64()
        ),
        (403, Some("refused"), Some(3))
    );
    let r = sse_publish("pub:odd").await;
    assert_eq!(r.status, 503);
    server.abort();
}

/// The webhook events the backend took (answered 2xx), as (event, channel) pairs, in
/// arrival order.
fn events(calls: &[herald_testkit::Call]) -> Vec<(String, String)> {
    calls
        .iter()
        .filter(|c| (200..300).contains(&c.status))
        .map(|c| {
            (
                c.body["event"].as_str().unwrap_or("").to_owned(),
                c.body["channel"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn count(calls: &[herald_testkit::Call], event: &str, channel: &str) -> usize {
    events(calls)
        .iter()
        .filter(|(e, c)| e == event && c == channel)
        .count()
}

/// Occupancy decided cluster-wide on a real Redis: with subscribers on two nodes, one
/// `channel_occupied`, no `channel_vacated` while either remains, exactly one after the
/// last leaves anywhere; join/leave of presence channels; every body signed, with a
/// unique id; a backend that fails is retried until it takes the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_tell_occupancy_decided_across_nodes() {
    let redis = herald_testkit::RedisServer::start();
    // The backend refuses its first two deliveries (500), then takes everything.
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let refused = seen.clone();
    let backend = herald_testkit::Backend::start(move |_| {
        if refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
            (500, "try later".into())
        } else {
            (204, String::new())
        }
    })
    .await;
    let url = format!("http://{}/events", backend.addr);
    let config = |c: &mut herald_server::GatewayConfig, id: &str| {
        c.node_id = id.into();
        c.webhooks.url = url.clone();
        c.webhooks.secret = SECRET.into();
        c.webhooks.timeout = Duration::from_millis(500);
        c.webhooks.occupancy_ttl = Duration::from_secs(2);
        c.channels.rules = vec![herald_testkit::presence_rule("room:*")];
    };
    let a = Node::start_redis(&redis.url(), |c| config(c, "a")).await;
    let b = Node::start_redis(&redis.url(), |c| config(c, "b")).await;

    let mut alice = a.client().await;
    alice.subscribe("news").await;
    let mut bob = b.client().await;
    bob.subscribe("news").await;
    let calls = backend
        .wait_for("news occupied", |c| {
            count(c, "channel_occupied", "news") == 1
        })
        .await;
    // The two refusals were retried, not lost.
    assert!(seen.load(std::sync::atomic::Ordering::SeqCst) >= 3);
    let retried = a
        .metric("herald_webhook_events_total{event=\"channel_occupied\",outcome=\"retried\"}")
        + b.metric("herald_webhook_events_total{event=\"channel_occupied\",outcome=\"retried\"}");
    assert_eq!(retried, 2.0);
    // Signed, each with an id of its own.
    for c in &calls {
        let ts: u64 = c.headers["x-herald-timestamp"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            c.headers["x-herald-signature"].to_str().unwrap(),
            herald_hooks::sign(SECRET, ts, &c.raw)
        );
        assert!(
            c.body["id"].as_str().is_some_and(|id| !id.is_empty()),
            "{}",
            c.body
        );
    }

    // Alice leaves; Bob still holds the channel on the other node: not vacated.
    alice
        .send_json(&json!({"op": "unsubscribe", "channel": "news", "id": 9}))
        .await;
    assert_eq!(alice.recv_json().await["op"], "unsubscribed");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(count(&backend.calls(), "channel_vacated", "news"), 0);
    // Bob goes: vacated, once, after the occupied.
    bob.close().await;
    let calls = backend
        .wait_for("news vacated", |c| count(c, "channel_vacated", "news") == 1)
        .await;
    let order: Vec<_> = events(&calls)
        .into_iter()
        .filter(|(_, c)| c == "news")
        .collect();
    assert_eq!(
        order,
        [
            ("channel_occupied".into(), "news".into()),
            ("channel_vacated".into(), "news".into())
        ]
    );

    // Presence channels: join and leave with the member.
    let mut carol = b.client().await;
    carol.subscribe("room:1").await;
    let calls = backend
        .wait_for("carol's join", |c| count(c, "join", "room:1") == 1)
        .await;
    let join = calls.iter().find(|c| c.body["event"] == "join").unwrap();
    assert_eq!(join.body["member"]["conn"], carol.welcome["conn"]);
    carol.close().await;
    backend
        .wait_for("carol's leave and the room vacated", |c| {
            count(c, "leave", "room:1") == 1 && count(c, "channel_vacated", "room:1") == 1
        })
        .await;
    // A while later still exactly once each, and every id distinct.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let calls = backend.calls();
    assert_eq!(
        (
            count(&calls, "channel_occupied", "news"),
            count(&calls, "channel_vacated", "news"),
            count(&calls, "channel_occupied", "room:1"),
            count(&calls, "channel_vacated", "room:1"),
        ),
        (1, 1, 1, 1),
        "{:?}",
        events(&calls)
    );
    let delivered: Vec<&Value> = calls
        .iter()
        .filter(|c| c.status == 204)
        .map(|c| &c.body["id"])
        .collect();
    let mut ids = delivered.clone();
    ids.sort_by_key(|v| v.to_string());
    ids.dedup();
    assert_eq!(ids.len(), delivered.len(), "{delivered:?}");
    // The two refused attempts carried the id of the event their retry delivered.
    let refused: Vec<&Value> = calls
        .iter()
        .filter(|c| c.status == 500)
        .map(|c| &c.body["id"])
        .collect();
    assert_eq!(refused.len(), 2);
    assert!(
        refused.iter().all(|id| delivered.contains(id)),
        "{refused:?}"
    );
}

/// Hooks and webhooks over `https://`: a backend with a certificate from a private CA
/// is reached when `tls_ca_file` names the CA, and refused (failing closed, counted)
/// when it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_and_webhooks_reach_an_https_backend() {
    use herald_testkit::{signed_certificate, test_ca, CertUse};
    let dir = std::env::temp_dir().join(format!("herald-hooks-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    test_ca(&dir, "ca");
    signed_certificate(&dir, "ca", "backend", "127.0.0.1", CertUse::Server);
    let backend = herald_testkit::Backend::start_tls(
        &dir.join("backend.pem"),
        &dir.join("backend.key"),
        |call| match call.path.as_str() {
            "/rpc" => (200, json!({"result": {"over": "tls"}}).to_string()),
            _ => (204, String::new()),
        },
    )
    .await;
    let start = |trusted: bool| {
        let (dir, addr) = (dir.clone(), backend.addr);
        Node::start_with(move |c| {
            c.hooks.tls_ca_file = trusted.then(|| dir.join("ca.pem"));
            c.hooks.rpc = Some(herald_hooks::RpcHookConfig {
                url: format!("https://127.0.0.1:{}/rpc", addr.port()),
                timeout: Duration::from_secs(2),
                anonymous: true,
            });
            c.webhooks.url = format!("https://127.0.0.1:{}/events", addr.port());
            c.webhooks.tls_ca_file = trusted.then(|| dir.join("ca.pem"));
            c.webhooks.max_attempts = 1;
        })
    };
    let node = start(true).await;
    let mut c = node.client().await;
    let r = rpc(&mut c, 1, "any", Value::Null).await;
    assert_eq!(r["data"], json!({"over": "tls"}), "{r}");
    c.subscribe("news").await;
    backend
        .wait_for("the occupied event over TLS", |calls| {
            calls
                .iter()
                .any(|c| c.path == "/events" && c.body["event"] == "channel_occupied")
        })
        .await;

    // Without the CA the certificate is not trusted: refused, never sent in the clear.
    let stranger = start(false).await;
    let mut c = stranger.client().await;
    assert_eq!(
        rpc(&mut c, 1, "any", Value::Null).await["code"],
        "unavailable"
    );
    assert_eq!(
        stranger.metric("herald_hook_calls_total{hook=\"rpc\",outcome=\"failed\"}"),
        1.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A backend whose refresh extends a connection by less than `before_expiry` is asked
/// again no sooner than every 2 s, not in a loop (it was asked ~3,300 times a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_refresh_is_not_asked_in_a_loop() {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let backend = herald_testkit::Backend::start(move |call| {
        let answer = match call.path.as_str() {
            "/connect" => json!({"result": {"user": "tight", "expires": now() + 4}}),
            _ => json!({"result": {"expires": now() + 2}}),
        };
        (200, answer.to_string())
    })
    .await;
    let addr = backend.addr;
    let node = Node::start_with(move |c| {
        c.hooks.connect = Some(herald_hooks::ConnectHookConfig {
            url: format!("http://{addr}/connect"),
            timeout: Duration::from_secs(1),
            forward_headers: vec![],
            always: false,
        });
        c.hooks.refresh = Some(herald_hooks::RefreshHookConfig {
            url: format!("http://{addr}/refresh"),
            timeout: Duration::from_secs(1),
            before_expiry: Duration::from_secs(10),
        });
    })
    .await;
    let mut c = node.client().await;
    assert_eq!(c.welcome["user"], "tight");
    tokio::time::sleep(Duration::from_millis(4500)).await;
    c.send_json(&json!({"op": "ping", "id": 1})).await;
    assert_eq!(c.recv_json().await["op"], "pong", "still extended");
    let refreshes = backend
        .calls()
        .iter()
        .filter(|c| c.path == "/refresh")
        .count();
    assert!(
        (2..=4).contains(&refreshes),
        "{refreshes} refresh calls in 4.5 s"
    );
}

/// A Redis that comes back without its data has lost the webhook queue with the events
/// waiting in it: not silent, counted once (`outcome="lost"`), and delivery goes on with
/// what is decided afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_queue_lost_with_redis_is_counted() {
    let mut redis = herald_testkit::RedisServer::start();
    let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answering = up.clone();
    let backend = herald_testkit::Backend::start(move |_| {
        if answering.load(std::sync::atomic::Ordering::SeqCst) {
            (204, String::new())
        } else {
            (503, String::new())
        }
    })
    .await;
    let url = format!("http://{}/events", backend.addr);
    let node = Node::start_redis(&redis.url(), |c| {
        c.webhooks.url = url;
        c.webhooks.timeout = Duration::from_millis(300);
        c.webhooks.max_attempts = 1000;
    })
    .await;
    let mut c = node.client().await;
    c.subscribe("news").await;
    backend
        .wait_for("an attempt", |calls| !calls.is_empty())
        .await;
    assert_eq!(redis.cli(&["XLEN", "{herald:webhooks}.q"]).trim(), "1");
    tokio::task::block_in_place(|| redis.restart());
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    let lost = "herald_webhook_events_total{event=\"unknown\",outcome=\"lost\"}";
    herald_testkit::eventually("the lost queue counted", || node.metric(lost) == 1.0).await;
    // What is decided afterwards is delivered.
    c.subscribe("sports").await;
    backend
        .wait_for("sports occupied", |calls| {
            calls
                .iter()
                .any(|c| c.status == 204 && c.body["channel"] == "sports")
        })
        .await;
    assert_eq!(node.metric(lost), 1.0);
}

/// `POST /sse/publish` by a client the connect hook admits without a user is counted
/// once against its address's publish rate (it was counted twice: half the burst).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_hook_publish_is_counted_once() {
    let backend =
        herald_testkit::Backend::start(|_| (200, json!({"result": {}}).to_string())).await;
    let addr = backend.addr;
    let node = Node::start_with(move |c| {
        c.limits.messages_per_second = 0.001;
        c.limits.message_burst = 4;
        c.channels.client_publish = herald_protocol::ChannelPatterns::new(["open"]).unwrap();
        c.hooks.connect = Some(herald_hooks::ConnectHookConfig {
            url: format!("http://{addr}/connect"),
            timeout: Duration::from_secs(1),
            forward_headers: vec![],
            always: true,
        });
    })
    .await;
    let mut statuses = Vec::new();
    for n in 0..6 {
        let r = herald_testkit::http(
            node.addr,
            "POST",
            "/sse/publish",
            &[("content-type", "application/json")],
            json!({"channel": "open", "data": n})
                .to_string()
                .into_bytes(),
        )
        .await;
        statuses.push(r.status);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429]);
    assert_eq!(
        backend.calls().len(),
        4,
        "the backend is asked only within the rate"
    );
}
