//! The gateway's configuration: every limit, with its default.
//!
//! Each section deserialises from the matching table of `herald.toml` (see the example
//! file at the repository root, which documents every key). Durations are written as
//! human-readable strings (`"25s"`, `"500ms"`).

use std::time::Duration;

use herald_protocol::ChannelPatterns;
use serde::{Deserialize, Serialize};

/// Everything [`crate::Gateway`] needs besides sockets, broker and metrics.
///
/// Its sections deny unknown keys; the top level does not, because the binary flattens
/// it into its own settings (and reports unknown top-level keys itself).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct GatewayConfig {
    /// This node's id, announced in welcome frames and logs. Empty: one is picked from
    /// the host name and a random suffix ([`GatewayConfig::node_id`]).
    pub node_id: String,
    /// Who may call what.
    pub auth: AuthConfig,
    /// Channel permissions.
    pub channels: ChannelsConfig,
    /// Per-node and per-connection limits.
    pub limits: LimitsConfig,
    /// Heartbeats for dead-peer detection.
    pub heartbeat: HeartbeatConfig,
    /// WebSocket buffer sizes.
    pub websocket: WebSocketConfig,
    /// Draining on shutdown.
    pub shutdown: ShutdownConfig,
}

/// Who may call what.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// When set, `/api/*` requires `Authorization: Bearer <api_key>`.
    pub api_key: Option<String>,
    /// Browser origins allowed to open WebSockets (exact `Origin` header values).
    /// Empty: any origin, and requests without an `Origin` header, are accepted.
    pub allowed_origins: Vec<String>,
}

/// Channel permissions.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelsConfig {
    /// Channel patterns WebSocket clients may publish to (`news`, `chat:*`, `*`).
    /// Empty (the default): clients may only subscribe; backends publish over HTTP.
    pub client_publish: ChannelPatterns,
}

/// Per-node and per-connection limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// WebSocket sessions this node holds at most; over it, upgrades get HTTP 503.
    pub max_connections: usize,
    /// Time a new TCP connection gets to send complete HTTP request headers (also the
    /// idle timeout of keep-alive HTTP connections).
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Largest incoming WebSocket message; larger ones close the session with 1009.
    pub max_message_bytes: usize,
    /// Subscriptions one session holds at most (`too_many_subscriptions` past it).
    pub max_subscriptions: usize,
    /// Sustained incoming messages per second per session.
    pub messages_per_second: f64,
    /// Messages a session may send in a burst above the sustained rate.
    pub message_burst: u32,
    /// Consecutive rate-limited messages after which the session is closed with 1008.
    pub rate_limit_strikes: u32,
    /// Bytes a session's outbound queue holds at most; a subscriber that falls this far
    /// behind is closed with 1013 (slow consumer).
    pub outbound_queue_bytes: usize,
    /// Largest HTTP request body on `/api/*` (413 past it).
    pub max_body_bytes: usize,
    /// Publications in one `POST /api/batch` at most.
    pub max_batch: usize,
    /// Publications buffered between the broker and the hub's fan-out.
    pub inbound_queue: usize,
    /// Time a closing session gets to flush its close frame and hear the peer's reply.
    #[serde(with = "humantime_serde")]
    pub close_timeout: Duration,
    /// Time a subscribe waits for the broker to confirm before it fails with
    /// `unavailable` (only brokers with a subscription step, i.e. Redis, ever wait).
    #[serde(with = "humantime_serde")]
    pub subscribe_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
            max_message_bytes: 64 * 1024,
            max_subscriptions: 256,
            messages_per_second: 50.0,
            message_burst: 100,
            rate_limit_strikes: 20,
            outbound_queue_bytes: 1024 * 1024,
            max_body_bytes: 1024 * 1024,
            max_batch: 1000,
            inbound_queue: 16 * 1024,
            close_timeout: Duration::from_secs(3),
            subscribe_timeout: Duration::from_secs(5),
        }
    }
}

/// Heartbeats for dead-peer detection.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// A session that has sent nothing for this long gets a WebSocket ping.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A session that then stays silent this long is closed (1008, "heartbeat timeout").
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            interval: Duration::from_secs(25),
            timeout: Duration::from_secs(10),
        }
    }
}

/// WebSocket buffer sizes (tokio-tungstenite's defaults suit few, busy connections;
/// a gateway holds many mostly idle ones).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebSocketConfig {
    /// Read buffer per session, allocated eagerly and also the most read per syscall
    /// until a frame header announces a bigger frame (which is then read whole).
    /// Small keeps idle sessions cheap; client messages are small ops.
    pub read_buffer_bytes: usize,
    /// Bytes buffered before a socket write; a write batch is flushed as a whole anyway.
    pub write_buffer_bytes: usize,
    /// How long a session's writer task stays after its last write before it parks the
    /// socket and ends (idle sessions then hold no writer task).
    #[serde(with = "humantime_serde")]
    pub writer_linger: Duration,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            read_buffer_bytes: 256,
            write_buffer_bytes: 16 * 1024,
            writer_linger: Duration::from_secs(2),
        }
    }
}

/// Draining on shutdown.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Sessions are closed spread evenly over this window, so that reconnecting clients
    /// do not stampede the remaining nodes.
    #[serde(with = "humantime_serde")]
    pub drain_window: Duration,
    /// The whole shutdown takes at most this long; sessions still open then are dropped.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
    /// Close with 1012 (service restart: reconnect now) instead of 1001 (going away).
    pub restart: bool,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_window: Duration::from_secs(5),
            grace_period: Duration::from_secs(15),
            restart: false,
        }
    }
}

/// A configuration value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct InvalidConfig {
    /// The offending key, e.g. `limits.max_connections`.
    pub key: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl GatewayConfig {
    /// The node id: `node_id` when set, otherwise the host name with a random suffix
    /// (so that nodes started from one image still differ).
    pub fn node_id(&self) -> String {
        if !self.node_id.is_empty() {
            return self.node_id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "herald".to_owned());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        format!("{host}-{:04x}", (nanos ^ std::process::id()) & 0xffff)
    }

    /// Checks every value; the binary calls this before binding anything.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let bad = |key, problem: &str| {
            Err(InvalidConfig {
                key,
                problem: problem.to_owned(),
            })
        };
        if self.auth.api_key.as_deref() == Some("") {
            return bad(
                "auth.api_key",
                "must not be empty (leave it unset to disable)",
            );
        }
        let l = &self.limits;
        let positive: [(&'static str, usize); 7] = [
            ("limits.max_connections", l.max_connections),
            ("limits.max_message_bytes", l.max_message_bytes),
            ("limits.max_subscriptions", l.max_subscriptions),
            ("limits.outbound_queue_bytes", l.outbound_queue_bytes),
            ("limits.max_body_bytes", l.max_body_bytes),
            ("limits.max_batch", l.max_batch),
            ("limits.inbound_queue", l.inbound_queue),
        ];
        for (key, v) in positive {
            if v == 0 {
                return bad(key, "must be greater than 0");
            }
        }
        if !(l.messages_per_second > 0.0 && l.messages_per_second.is_finite()) {
            return bad("limits.messages_per_second", "must be a positive number");
        }
        if l.message_burst == 0 {
            return bad("limits.message_burst", "must be greater than 0");
        }
        if l.handshake_timeout.is_zero() {
            return bad("limits.handshake_timeout", "must be greater than 0");
        }
        if self.heartbeat.interval.is_zero() || self.heartbeat.timeout.is_zero() {
            return bad("heartbeat", "interval and timeout must be greater than 0");
        }
        if self.websocket.read_buffer_bytes < 64 {
            return bad("websocket.read_buffer_bytes", "must be at least 64");
        }
        if self.shutdown.drain_window > self.shutdown.grace_period {
            return bad(
                "shutdown.drain_window",
                "must not be longer than shutdown.grace_period",
            );
        }
        Ok(())
    }
}
