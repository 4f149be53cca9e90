//! [`Node`]: a gateway in this process on `127.0.0.1:0` (memory broker or a real
//! Redis), its configuration helpers, and [`eventually`].

use std::net::SocketAddr;
use std::time::Duration;

use herald::Settings;
use herald_harness::metric_value;
use herald_metrics::{prometheus::Registry, Metrics};
use herald_redis::RedisConfig;
use herald_server::config::ChannelRule;
use herald_server::{GatewayConfig, Listeners, ServerError};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::client::Client;
use crate::http::{http, WAIT};

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
        presence: false,
        join_leave: false,
        join_leave_per: Default::default(),
        presence_access: Default::default(),
        history_access: Default::default(),
        delta: None,
    }
}

/// A `[[channels.rules]]` entry with presence and `join`/`leave` frames (no history).
pub fn presence_rule(pattern: &str) -> ChannelRule {
    ChannelRule {
        history_size: 0,
        presence: true,
        join_leave: true,
        ..history_rule(pattern, 0)
    }
}

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
    // A debug build on a loaded machine can take over the production 2 ms for a delta:
    // tests that count deltas must not see the slow-delta pause unless they ask for it.
    c.limits.max_delta_time = Duration::from_secs(1);
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
