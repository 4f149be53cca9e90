//! Test support for Herald: real gateways on loopback ports, real WebSocket and HTTP
//! clients, so each integration test reads as a short story.
//!
//! - [`Node`]: a gateway running in this process on `127.0.0.1:0`, with a handle to shut
//!   it down and its own metrics registry.
//! - [`Client`]: a tokio-tungstenite client with helpers that fail loudly (with a
//!   timeout) instead of hanging.
//! - [`http`]: one HTTP/1.1 request over a fresh connection.
//! - [`FaultProxy`]: a TCP relay a test stalls or cuts (faults between a node and Redis).
//!
//! # Layout
//! - `fault`: [`FaultProxy`].
#![allow(unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use herald::Settings;
use herald_metrics::{prometheus::Registry, Metrics};
use herald_redis::RedisConfig;
use herald_server::config::ChannelRule;
use herald_server::{GatewayConfig, Listeners, ServerError};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use serde_json::json;

mod fault;
pub use fault::FaultProxy;

pub use herald_harness::{free_port, key_pair, system_tool, KeyKind, RedisCluster, RedisServer};

/// Redis settings suited to tests: fast probes, fast reconnects.
pub fn redis_config(url: &str) -> RedisConfig {
    RedisConfig {
        url: url.to_owned(),
        probe_interval: Duration::from_millis(200),
        timeout: Duration::from_secs(1),
        max_reconnect_delay: Duration::from_millis(100),
        ..RedisConfig::default()
    }
}

/// A `[[channels.rules]]` entry keeping `size` publications for channels matching
/// `pattern` (default TTLs).
pub fn history_rule(pattern: &str, size: usize) -> ChannelRule {
    ChannelRule {
        pattern: herald_protocol::ChannelPattern::new(pattern).expect("pattern"),
        history_size: size,
        history_ttl: Duration::from_secs(600),
        history_meta_ttl: Duration::from_secs(3600),
        max_recovery: 0,
        subscribe: Default::default(),
        publish: Default::default(),
    }
}

/// How long any single expectation waits before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// A configuration suited to tests: generous rates, short timeouts.
pub fn test_config() -> GatewayConfig {
    let mut c = GatewayConfig {
        node_id: "test".into(),
        ..GatewayConfig::default()
    };
    c.limits.messages_per_second = 10_000.0;
    c.limits.message_burst = 10_000;
    c.limits.close_timeout = Duration::from_secs(2);
    // Writers park almost at once, so every test also exercises restarting them.
    c.websocket.writer_linger = Duration::from_millis(20);
    c.shutdown.drain_window = Duration::from_millis(200);
    c.shutdown.grace_period = Duration::from_secs(3);
    c
}

/// A gateway running in this process.
pub struct Node {
    /// Where WebSocket clients connect.
    pub addr: SocketAddr,
    /// Where the API and metrics are served (same as `addr` unless split).
    pub api: SocketAddr,
    /// This node's metrics.
    pub metrics: Metrics,
    /// This node's registry (what `/metrics` serves).
    pub registry: Registry,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl Node {
    /// Starts a node with [`test_config`].
    pub async fn start() -> Node {
        Node::start_with(|_| {}).await
    }

    /// Starts a node with [`test_config`] adjusted by `adjust`.
    pub async fn start_with(adjust: impl FnOnce(&mut GatewayConfig)) -> Node {
        Node::launch(adjust, false).await
    }

    /// Starts a node with separate public and internal listeners.
    pub async fn start_split(adjust: impl FnOnce(&mut GatewayConfig)) -> Node {
        Node::launch(adjust, true).await
    }

    /// Starts a node on the Redis broker at `url` (test timings: fast probes and
    /// reconnects), and waits until it is connected.
    pub async fn start_redis(url: &str, adjust: impl FnOnce(&mut GatewayConfig)) -> Node {
        Node::start_redis_with(redis_config(url), adjust).await
    }

    /// Starts a node on the Redis broker with explicit settings, and waits until it is
    /// connected.
    pub async fn start_redis_with(
        redis: RedisConfig,
        adjust: impl FnOnce(&mut GatewayConfig),
    ) -> Node {
        let mut settings = Settings {
            redis,
            gateway: test_config(),
            ..Settings::default()
        };
        adjust(&mut settings.gateway);
        Node::serve(settings, false).await
    }

    async fn launch(adjust: impl FnOnce(&mut GatewayConfig), split: bool) -> Node {
        let mut settings = Settings {
            gateway: test_config(),
            ..Settings::default()
        };
        adjust(&mut settings.gateway);
        Node::serve(settings, split).await
    }

    /// Starts the gateway `settings` describe, through the same wiring as the binary
    /// (`herald::gateway`), on loopback listeners.
    /// Starts a node on the Redis broker listening on `addr` (e.g. the address of a node
    /// that was shut down: a restart behind a load balancer).
    pub async fn start_redis_at(
        addr: SocketAddr,
        url: &str,
        adjust: impl FnOnce(&mut GatewayConfig),
    ) -> Node {
        let mut settings = Settings {
            redis: redis_config(url),
            gateway: test_config(),
            listen: addr,
            ..Settings::default()
        };
        adjust(&mut settings.gateway);
        Node::serve(settings, false).await
    }

    async fn serve(settings: Settings, split: bool) -> Node {
        let registry = Registry::new();
        let gateway = herald::gateway(&settings, registry.clone()).expect("gateway settings");
        assert!(
            gateway.wait_broker_up(Duration::from_secs(10)).await,
            "the node could not connect to its broker"
        );
        let metrics = gateway.metrics().clone();
        // `listen` is 127.0.0.1:8080 unless a test chose an address: tests use free ports.
        let public = if settings.listen == Settings::default().listen {
            TcpListener::bind("127.0.0.1:0").await.expect("bind")
        } else {
            TcpListener::bind(settings.listen)
                .await
                .expect("bind the chosen address")
        };
        let internal = if split {
            Some(TcpListener::bind("127.0.0.1:0").await.expect("bind"))
        } else {
            None
        };
        let addr = public.local_addr().unwrap();
        let api = internal.as_ref().map_or(addr, |l| l.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway.run(Listeners { public, internal }, async move {
            let _ = stopped.await;
        }));
        Node {
            addr,
            api,
            metrics,
            registry,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// `ws://ADDR/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Connects a client and reads its welcome frame.
    pub async fn client(&self) -> Client {
        Client::connect(&self.ws_url())
            .await
            .expect("connect to the node")
    }

    /// Publishes JSON `data` through `POST /api/publish`; returns the status.
    pub async fn publish(&self, channel: &str, data: &str) -> u16 {
        self.publish_with_key(channel, data, None).await.0
    }

    /// Publishes through `POST /api/publish` with an optional idempotency key; returns
    /// the status and the JSON reply.
    pub async fn publish_with_key(
        &self,
        channel: &str,
        data: &str,
        key: Option<&str>,
    ) -> (u16, Value) {
        let key = key.map_or(String::new(), |k| format!(r#","idempotency_key":"{k}""#));
        let body = format!(r#"{{"channel":"{channel}","data":{data}{key}}}"#);
        let r = http(
            self.api,
            "POST",
            "/api/publish",
            &[("content-type", "application/json")],
            body.into_bytes(),
        )
        .await;
        let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        (r.status, v)
    }

    /// Publishes the JSON numbers `from..=to` to `channel` in one `POST /api/batch`;
    /// panics unless it is accepted.
    pub async fn publish_numbers(&self, channel: &str, from: u64, to: u64) {
        let items: Vec<String> = (from..=to)
            .map(|n| format!(r#"{{"channel":"{channel}","data":{n}}}"#))
            .collect();
        let body = format!(r#"{{"publications":[{}]}}"#, items.join(","));
        let r = http(
            self.api,
            "POST",
            "/api/batch",
            &[("content-type", "application/json")],
            body.into_bytes(),
        )
        .await;
        assert_eq!(
            r.status,
            200,
            "batch refused: {}",
            String::from_utf8_lossy(&r.body)
        );
    }

    /// Begins shutdown (like SIGTERM) without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts down and waits for the drain to finish; returns how `run` ended.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        self.begin_shutdown();
        let task = self.task.take().expect("not yet awaited");
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("shutdown finished within 30 s")
            .expect("gateway task panicked")
    }

    /// The value of an (unlabelled or labelled) metric sample as `/metrics` would show
    /// it, e.g. `herald_connections` or `herald_close_codes_total{code="1013"}`.
    pub fn metric(&self, sample: &str) -> f64 {
        use herald_metrics::prometheus::{Encoder, TextEncoder};
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .unwrap();
        let text = String::from_utf8(buf).unwrap();
        metric_value(&text, sample).unwrap_or(0.0)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
}

/// Finds `sample` (name plus label set, exactly as printed) in Prometheus text output.
pub fn metric_value(text: &str, sample: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == sample).then(|| value.parse().ok())?
    })
}

/// Waits until `cond` holds, polling; panics with `what` after [`WAIT`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A WebSocket client.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The welcome frame.
    pub welcome: Value,
    next_id: u64,
}

/// How the server ended a session, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// The close code, if a close frame arrived.
    pub code: Option<u16>,
    /// Its reason text.
    pub reason: String,
}

impl Client {
    /// Connects and reads the welcome frame.
    pub async fn connect(url: &str) -> Result<Client, tungstenite::Error> {
        let (ws, _resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .map_err(|_| tungstenite::Error::Io(std::io::ErrorKind::TimedOut.into()))??;
        Ok(Client::from_stream(ws).await)
    }

    /// Wraps a WebSocket the test opened itself (e.g. with extra request headers) and
    /// reads its welcome frame.
    pub async fn from_stream(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Client {
        let mut c = Client {
            ws,
            welcome: Value::Null,
            next_id: 1,
        };
        c.welcome = c.recv_json().await;
        assert_eq!(c.welcome["op"], "welcome", "first frame: {}", c.welcome);
        c
    }

    /// Connects over a socket with a small receive buffer, so that a client that stops
    /// reading backs up into the server quickly (slow-consumer tests).
    pub async fn connect_with_small_buffer(addr: SocketAddr) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.expect("connect");
        let url = format!("ws://{addr}/ws");
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
            .await
            .expect("upgrade");
        let mut c = Client {
            ws,
            welcome: Value::Null,
            next_id: 1,
        };
        c.welcome = c.recv_json().await;
        c
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("send text");
    }

    /// Sends a JSON value as a text frame.
    pub async fn send_json(&mut self, v: &Value) {
        self.send_text(&v.to_string()).await;
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, b: Vec<u8>) {
        self.ws
            .send(Message::Binary(b.into()))
            .await
            .expect("send binary");
    }

    /// The next data frame (pings and pongs skipped); panics on close or timeout.
    pub async fn recv(&mut self) -> Message {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame within the wait")
                .expect("stream still open")
                .expect("no protocol error");
            match msg {
                Message::Ping(_) | Message::Pong(_) => continue,
                Message::Close(f) => panic!("unexpected close: {f:?}"),
                m => return m,
            }
        }
    }

    /// The next frame, parsed as JSON.
    pub async fn recv_json(&mut self) -> Value {
        match self.recv().await {
            Message::Text(t) => serde_json::from_str(&t).expect("server sent JSON"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The next binary frame.
    pub async fn recv_binary(&mut self) -> Bytes {
        match self.recv().await {
            Message::Binary(b) => b,
            other => panic!("expected a binary frame, got {other:?}"),
        }
    }

    /// Sends `{"op":op, "channel":channel, "id":N}` and returns the reply.
    pub async fn request(&mut self, op: &str, channel: &str) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send_json(&json!({"op": op, "channel": channel, "id": id}))
            .await;
        let reply = self.recv_json().await;
        assert_eq!(reply["id"], id, "reply to request {id}: {reply}");
        reply
    }

    /// Subscribes and asserts the acknowledgement.
    pub async fn subscribe(&mut self, channel: &str) {
        let r = self.request("subscribe", channel).await;
        assert_eq!(r["op"], "subscribed", "{r}");
    }

    /// Subscribes, resuming after `since` (offset, epoch) when given, and returns the
    /// `subscribed` reply (panics on anything else).
    pub async fn subscribe_since(&mut self, channel: &str, since: Option<(u64, &str)>) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({"op": "subscribe", "channel": channel, "id": id, "recover": true});
        if let Some((offset, epoch)) = since {
            req["since"] = json!({"offset": offset, "epoch": epoch});
        }
        self.send_json(&req).await;
        let reply = self.recv_json().await;
        assert_eq!(reply["op"], "subscribed", "{reply}");
        assert_eq!(reply["id"], id, "{reply}");
        reply
    }

    /// The next `n` text frames, each asserted to be a `message` (or, where the server
    /// said so, a `reset`: those are returned too).
    pub async fn messages(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let v = self.recv_json().await;
            assert!(
                v["op"] == "message" || v["op"] == "reset",
                "not a delivery: {v}"
            );
            out.push(v);
        }
        out
    }

    /// Reads until the server closes; returns the close code and reason. Data frames
    /// before the close are counted in the second value.
    pub async fn closed(&mut self) -> (Closed, usize) {
        let mut frames = 0;
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("the server closed within the wait")
            {
                Some(Ok(Message::Close(f))) => {
                    let (code, reason) = f
                        .map_or((None, String::new()), |CloseFrame { code, reason }| {
                            (Some(u16::from(code)), reason.to_string())
                        });
                    return (Closed { code, reason }, frames);
                }
                Some(Ok(Message::Text(_) | Message::Binary(_))) => frames += 1,
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    return (
                        Closed {
                            code: None,
                            reason: String::new(),
                        },
                        frames,
                    )
                }
            }
        }
    }

    /// Asserts that no data frame arrives for `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(other) => panic!("expected silence, got {other:?}"),
            }
        }
    }

    /// Closes the connection normally.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        // Read until the server's reply so the session really ended.
        while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, self.ws.next()).await {}
    }

    /// The underlying stream, for tests that need raw control.
    pub fn ws(&mut self) -> &mut WebSocketStream<MaybeTlsStream<TcpStream>> {
        &mut self.ws
    }
}

/// An HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Body.
    pub body: Bytes,
}

impl HttpResponse {
    /// The body parsed as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Makes one HTTP/1.1 request over a new connection; panics if there is no answer.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> HttpResponse {
    try_http(addr, method, path, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path} on {addr}: {e}"))
}

/// Makes one HTTP/1.1 request over a new connection; `Err` says why there was no
/// answer (for tests where a node may be restarting).
pub async fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<HttpResponse, String> {
    use http_body_util::{BodyExt, Full};
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .map_err(|_| "no response within the wait".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Ok(HttpResponse { status, body })
}

/// One Server-Sent Event.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    /// `id:`, if the event had one.
    pub id: Option<String>,
    /// `event:`, if named.
    pub event: Option<String>,
    /// The `data:` lines joined with "\n".
    pub data: String,
}

impl SseEvent {
    /// `data` as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("{e}: {}", self.data))
    }
}

/// A Server-Sent Events client over a real HTTP/1.1 connection.
pub struct SseClient {
    /// The response status.
    pub status: u16,
    /// The response headers.
    pub headers: hyper::HeaderMap,
    body: hyper::body::Incoming,
    buf: String,
}

impl SseClient {
    /// `GET path` (with its query) on `addr`, with extra headers.
    pub async fn connect(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> SseClient {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .uri(path)
            .header("host", addr.to_string())
            .header("accept", "text/event-stream");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("request");
        let resp = tokio::time::timeout(WAIT, sender.send_request(req))
            .await
            .expect("a response within the wait")
            .expect("a response");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        SseClient {
            status,
            headers,
            body: resp.into_body(),
            buf: String::new(),
        }
    }

    /// The next block of the stream as written (an event, a comment or a `retry:`),
    /// or `None` when the stream ended.
    pub async fn next_block(&mut self) -> Option<String> {
        use http_body_util::BodyExt;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block = self.buf[..end].to_owned();
                self.buf.drain(..end + 2);
                return Some(block);
            }
            let frame = tokio::time::timeout(WAIT, self.body.frame())
                .await
                .expect("an SSE block within the wait");
            match frame {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.buf
                            .push_str(std::str::from_utf8(&data).expect("UTF-8"));
                    }
                }
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// The next event with data (comments and `retry:` skipped), or `None` at the end.
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            let block = self.next_block().await?;
            let mut e = SseEvent::default();
            let mut data: Vec<&str> = Vec::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("data: ") {
                    data.push(v);
                } else if let Some(v) = line.strip_prefix("id: ") {
                    e.id = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("event: ") {
                    e.event = Some(v.to_owned());
                }
            }
            if !data.is_empty() {
                e.data = data.join("\n");
                return Some(e);
            }
        }
    }

    /// The next event, asserted to exist.
    pub async fn event(&mut self) -> SseEvent {
        self.next_event().await.expect("the stream ended")
    }
}

/// The HMAC secret token tests configure (`auth.jwt.hmac_secret`).
pub const TEST_SECRET: &str = "a-shared-secret-of-at-least-32-bytes!";

/// An HS256 connection token signed with [`TEST_SECRET`] for `sub`, expiring in `secs`
/// seconds, with the fields of `extra` (a JSON object) added to its claims.
pub fn token(sub: &str, secs: u64, extra: Value) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs()
        + secs;
    let mut claims = json!({"sub": sub, "exp": exp});
    if let (Some(c), Value::Object(more)) = (claims.as_object_mut(), extra) {
        c.extend(more);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(TEST_SECRET.as_bytes()),
    )
    .expect("a token")
}

/// A running `haproxy`, killed on drop.
pub struct Haproxy(std::process::Child);

impl Haproxy {
    /// Starts `haproxy` listening on a free port: `config(port)` is its configuration
    /// (written to a temporary file named after `name`). Returns once it listens. A
    /// port taken between picking and binding (other processes open ephemeral ports
    /// too) makes haproxy exit: it is started again on another port, and after three
    /// tries the panic carries what haproxy said.
    pub fn start(name: &str, config: impl Fn(u16) -> String) -> (Haproxy, u16) {
        let mut said = String::new();
        for _ in 0..3 {
            let port = free_port();
            // Named after the port too: tests in one process start several at once.
            let base =
                std::env::temp_dir().join(format!("herald-{name}-{port}-{}", std::process::id()));
            let (path, log) = (base.with_extension("cfg"), base.with_extension("log"));
            std::fs::write(&path, config(port)).expect("write the haproxy configuration");
            // A file, not a pipe: nobody reads haproxy's output while it runs, and a
            // full pipe would stall it.
            let stderr = std::fs::File::create(&log).expect("create the haproxy log");
            let mut child = std::process::Command::new(system_tool("haproxy", "haproxy"))
                .args(["-db", "-f"])
                .arg(&path)
                .stdout(std::process::Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("start haproxy");
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                    return (Haproxy(child), port);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            said = std::fs::read_to_string(&log).unwrap_or_default();
        }
        panic!("haproxy did not start: {said}");
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
