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

    ada.send_json(&json!({"op": "subscribe", "channel": "kick:1", "id": 11}))
        .await;
    let (closed, _) = ada.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (Some(4401), "not you")
    );
    server.abort();
}
