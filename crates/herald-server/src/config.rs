//! The gateway's configuration: every limit, with its default.
//!
//! Each section deserialises from the matching table of `herald.toml` (see the example
//! file at the repository root, which documents every key). Durations are written as
//! human-readable strings (`"25s"`, `"500ms"`).

use std::time::Duration;

use herald_auth::{ApiKeyConfig, JwtConfig, Verifier};
use herald_broker::HistoryPolicy;
use herald_protocol::{ChannelPattern, ChannelPatterns};
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
    /// The client's address behind a load balancer.
    pub proxy: ProxyConfig,
    /// TLS on the public listener (`wss://`, `https://`), for deployments without a
    /// terminating balancer.
    pub tls: TlsConfig,
    /// The control plane between nodes (the control API's surveys).
    pub control: ControlConfig,
    /// Presence timings and page size.
    pub presence: PresenceConfig,
    /// Calls to the application's backend (`[hooks]`, `[hooks.rpc]`).
    pub hooks: herald_hooks::HooksConfig,
    /// Events told to the application's backend (`[webhooks]`).
    pub webhooks: herald_hooks::WebhooksConfig,
    /// Serve the demo page at `/demo` (and the JS client at `/herald.js`) on the public
    /// listener, and open the demo's channels: `demo:feed` and `demo:chat` keep 100
    /// publications, anyone may publish to `demo:chat`, which keeps presence. Off by
    /// default.
    pub demo: bool,
}

impl GatewayConfig {
    /// The rules `demo = true` puts before the configured ones.
    pub fn demo_rules() -> Vec<ChannelRule> {
        let rule = |pattern: &str, publish| ChannelRule {
            pattern: ChannelPattern::new(pattern).expect("a valid pattern"),
            history_size: 100,
            history_ttl: default_history_ttl(),
            history_meta_ttl: default_history_meta_ttl(),
            max_recovery: 0,
            subscribe: SubscribeAccess::Anyone,
            publish,
            // The chat shows who is online.
            presence: publish == PublishAccess::Anyone,
            join_leave: publish == PublishAccess::Anyone,
            join_leave_per: JoinLeavePer::User,
            presence_access: PresenceAccess::Subscribers,
            history_access: PresenceAccess::Subscribers,
            delta: None,
        };
        vec![
            rule("demo:feed", PublishAccess::Nobody),
            rule("demo:chat", PublishAccess::Anyone),
        ]
    }
}

/// How the real client address is learnt behind a load balancer (used for
/// `limits.max_connections_per_ip` and logs).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Every connection to the public listener starts with a PROXY protocol header (v1
    /// or v2, as HAProxy's `send-proxy`/`send-proxy-v2` write it); connections without
    /// one are dropped. Enable only when nothing but the proxy can reach the port.
    pub protocol: bool,
    /// Networks of proxies whose `X-Forwarded-For` header is believed (`10.0.0.0/8`).
    /// Empty: the header is ignored.
    pub trusted: Vec<ipnet::IpNet>,
}

/// `[tls]`: the public listener speaks TLS (1.2 and 1.3, rustls) when both files are
/// set. The files are read at start and again on SIGHUP (a renewed certificate takes
/// effect for new connections; a pair that does not load leaves the one in force).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain (PEM), leaf first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<std::path::PathBuf>,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<std::path::PathBuf>,
}

/// Who may call what.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// When set, `/api/*` requires `Authorization: Bearer <api_key>` (this key or one
    /// of `api_keys`).
    pub api_key: Option<String>,
    /// More API keys (rotation), each optionally scoped to channel patterns.
    pub api_keys: Vec<ApiKeyConfig>,
    /// When set, `/metrics` requires `Authorization: Bearer <metrics_key>` wherever it
    /// is served (a key for Prometheus that cannot publish). Unset, `/metrics` on the
    /// clients' listener (no `internal_listen`) requires an API key when one is
    /// configured, and is open on an internal listener.
    pub metrics_key: Option<String>,
    /// Browser origins allowed to open WebSockets: exact `Origin` header values, or
    /// with one `*` for one or more DNS labels (`https://*.example.com`). Empty: any
    /// origin, and requests without an `Origin` header, are accepted.
    pub allowed_origins: Vec<String>,
    /// Whether a WebSocket without a token is accepted (true keeps a laptop setup
    /// working without a token issuer; set false in front of real users).
    pub anonymous: bool,
    /// Which connection tokens (JWT) are accepted.
    pub jwt: JwtConfig,
    /// Accept serving `/api/*` and `/metrics` on a non-loopback address with no
    /// `api_key` (the binary refuses to start otherwise).
    pub public_api_without_key: bool,
    /// How long past its token's `exp` a connection stays open waiting for a
    /// `refresh`; then it is closed with 4001 (token expired).
    #[serde(with = "humantime_serde")]
    pub expiry_grace: Duration,
    /// A channel every connection with a token is subscribed to when it opens, with
    /// `{sub}` standing for its user (`user:{sub}`): a backend reaches one user by
    /// publishing there. Empty: none.
    pub personal_channel: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            api_key: None,
            api_keys: Vec::new(),
            metrics_key: None,
            allowed_origins: Vec::new(),
            anonymous: true,
            jwt: JwtConfig::default(),
            public_api_without_key: false,
            expiry_grace: Duration::from_secs(10),
            personal_channel: String::new(),
        }
    }
}

/// Channel permissions.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelsConfig {
    /// Channel patterns WebSocket clients may publish to (`news`, `chat:*`, `*`).
    /// Empty (the default): clients may only subscribe; backends publish over HTTP.
    pub client_publish: ChannelPatterns,
    /// Per-channel policy, first match wins (`[[channels.rules]]`). A channel that
    /// matches no rule has no history.
    pub rules: Vec<ChannelRule>,
    /// How long an `idempotency_key` of the publish API is remembered.
    #[serde(with = "humantime_serde")]
    pub idempotency_window: Duration,
}

impl Default for ChannelsConfig {
    fn default() -> Self {
        ChannelsConfig {
            client_publish: ChannelPatterns::default(),
            rules: Vec::new(),
            idempotency_window: Duration::from_secs(300),
        }
    }
}

impl ChannelsConfig {
    /// The first rule that matches `channel`.
    pub fn rule(&self, channel: &str) -> Option<&ChannelRule> {
        self.rules.iter().find(|r| r.pattern.matches(channel))
    }

    /// How `channel` keeps history, if it does.
    pub fn history(&self, channel: &str) -> Option<HistoryPolicy> {
        self.rule(channel).and_then(ChannelRule::history)
    }
}

/// One `[[channels.rules]]` entry: the policy for channels matching `pattern`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelRule {
    /// Which channels (`news`, `news:*`, `*`).
    pub pattern: ChannelPattern,
    /// Publications kept per channel; 0 (the default): no history, at-most-once.
    #[serde(default)]
    pub history_size: usize,
    /// A channel's history expires this long after its last publication.
    #[serde(default = "default_history_ttl", with = "humantime_serde")]
    pub history_ttl: Duration,
    /// A channel's offset and epoch expire this long after its last publication or
    /// read. Longer than `history_ttl`, so that a client resuming after the history
    /// expired is told `recovered:false` rather than handed a fresh epoch silently.
    #[serde(default = "default_history_meta_ttl", with = "humantime_serde")]
    pub history_meta_ttl: Duration,
    /// A resume that missed more publications than this is refused
    /// (`recovered:false`); 0 (the default): `history_size`.
    #[serde(default)]
    pub max_recovery: usize,
    /// Who may subscribe to these channels (default: anyone).
    #[serde(default)]
    pub subscribe: SubscribeAccess,
    /// Which clients may publish to them over WebSocket (default: nobody; backends
    /// publish over the HTTP API).
    #[serde(default)]
    pub publish: PublishAccess,
    /// Keep presence: who is subscribed, cluster-wide (default: off).
    #[serde(default)]
    pub presence: bool,
    /// Push `join` and `leave` frames to the channel's subscribers (needs `presence`).
    #[serde(default)]
    pub join_leave: bool,
    /// Whether `join`/`leave` go per user (the first connection joins, the last
    /// leaves: tabs and devices of one user are one member) or per connection.
    #[serde(default)]
    pub join_leave_per: JoinLeavePer,
    /// Which clients may ask who is present (`presence`, `presence_stats` ops).
    #[serde(default)]
    pub presence_access: PresenceAccess,
    /// Which clients may read recent history with the `history` op (history
    /// channels; resuming with `since` is not governed by this).
    #[serde(default)]
    pub history_access: PresenceAccess,
    /// `"fossil"`: subscriptions that ask for it (`"delta":"fossil"`) receive each
    /// publication as a Fossil delta against the one before when that is smaller
    /// (history channels; default: off).
    #[serde(default)]
    pub delta: Option<DeltaFormat>,
}

/// A rule's `delta`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum DeltaFormat {
    /// Fossil's delta format (what centrifuge-js and the `fossil-delta` packages read).
    Fossil,
}

impl TryFrom<String> for DeltaFormat {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        choice(&value, &[("fossil", DeltaFormat::Fossil)])
    }
}

/// A rule's `join_leave_per`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum JoinLeavePer {
    /// A user's first connection joins, its last leaves.
    #[default]
    User,
    /// Every connection joins and leaves.
    Connection,
}

/// A rule's `presence_access` and `history_access`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum PresenceAccess {
    /// Clients subscribed to the channel.
    #[default]
    Subscribers,
    /// No client (backends still can, over the HTTP API).
    Nobody,
}

impl TryFrom<String> for JoinLeavePer {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        choice(
            &value,
            &[
                ("user", JoinLeavePer::User),
                ("connection", JoinLeavePer::Connection),
            ],
        )
    }
}

impl TryFrom<String> for PresenceAccess {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        choice(
            &value,
            &[
                ("subscribers", PresenceAccess::Subscribers),
                ("nobody", PresenceAccess::Nobody),
            ],
        )
    }
}

/// A rule's `subscribe`. Whatever it says, a token's `channels` claim and a
/// subscription token for the channel also let a client subscribe; and a pattern with
/// `{sub}` admits only the user it names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum SubscribeAccess {
    /// Every client, with a token or without.
    #[default]
    Anyone,
    /// Clients that connected with a valid token.
    Authenticated,
    /// Only clients whose token's `channels` claim matches (or that present a
    /// subscription token for the channel).
    Claims,
    /// The application's backend decides (`[hooks.subscribe]`), for each subscribe
    /// (a token's `channels` claim or a subscription token still admits without it).
    Hook,
}

/// A rule's `publish` (WebSocket publishes; the HTTP API is governed by API keys).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum PublishAccess {
    /// No client: backends only.
    #[default]
    Nobody,
    /// Every client, with a token or without.
    Anyone,
    /// Clients that connected with a valid token.
    Authenticated,
    /// Clients whose token's `publish` claim matches.
    Claims,
    /// The application's backend decides (`[hooks.publish]`), and may rewrite the data.
    Hook,
}

/// The value a rule's setting names, or an error that lists the choices (the
/// configuration library's own message names Rust types).
fn choice<T: Copy>(value: &str, choices: &[(&str, T)]) -> Result<T, String> {
    choices
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<String> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
            format!("{value:?} is not one of {}", names.join(", "))
        })
}

impl TryFrom<String> for SubscribeAccess {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        use SubscribeAccess::*;
        let choices = [
            ("anyone", Anyone),
            ("authenticated", Authenticated),
            ("claims", Claims),
            ("hook", Hook),
        ];
        choice(&value, &choices)
    }
}

impl TryFrom<String> for PublishAccess {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        use PublishAccess::*;
        let choices = [
            ("nobody", Nobody),
            ("anyone", Anyone),
            ("authenticated", Authenticated),
            ("claims", Claims),
            ("hook", Hook),
        ];
        choice(&value, &choices)
    }
}

fn default_history_ttl() -> Duration {
    Duration::from_secs(600)
}

fn default_history_meta_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// The most publications a history channel keeps (`history_size`).
pub const MAX_HISTORY_SIZE: usize = 1_000_000;

impl ChannelRule {
    /// How this rule's channels keep history, if they do.
    pub fn history(&self) -> Option<HistoryPolicy> {
        (self.history_size > 0).then_some(HistoryPolicy {
            size: self.history_size,
            ttl: self.history_ttl,
            meta_ttl: self.history_meta_ttl,
        })
    }

    /// The most publications a resume may replay.
    pub fn max_recovery(&self) -> usize {
        if self.max_recovery == 0 {
            self.history_size
        } else {
            self.max_recovery.min(self.history_size)
        }
    }
}

/// Per-node and per-connection limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Sessions (WebSocket and SSE) this node holds at most; over it, new ones get HTTP
    /// 503.
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
    /// Rate-limited messages within `rate_limit_window` after which the session is
    /// closed with 1008 (admitted messages in between do not clear them).
    pub rate_limit_strikes: u32,
    /// The window in which rate-limit strikes add up.
    #[serde(with = "humantime_serde")]
    pub rate_limit_window: Duration,
    /// Bytes a session's outbound queue holds at most; a subscriber that falls this far
    /// behind is closed with 1013 (slow consumer), except on history channels, where it
    /// lags and is caught up from the history in place (PROTOCOL.md, "Slow readers on
    /// history channels").
    pub outbound_queue_bytes: usize,
    /// The kernel's send buffer per accepted connection (`SO_SNDBUF`; Linux doubles
    /// it); 0: the kernel's own sizing, which grows a buffer to `net.ipv4.tcp_wmem`'s
    /// maximum (4 MiB by default) for a reader that does not keep up. Kernel memory a
    /// slow reader can hold beyond `outbound_queue_bytes`, and how long it takes to be
    /// noticed as slow. 64 KiB by default: a connection's throughput is then at most
    /// about 128 KiB per round trip (640 KB/s at 200 ms), plenty for messages, and
    /// bursts, fan-out and many channels measured the same as with the kernel's sizing
    /// (BENCHMARKS.md).
    pub socket_send_buffer_bytes: usize,
    /// Largest HTTP request body on `/api/*` (413 past it).
    pub max_body_bytes: usize,
    /// Publications on `delta` channels larger than this, or following one that is, are
    /// sent whole (computing a delta takes time in proportion to the data, on the node's
    /// fan-out path).
    pub max_delta_bytes: usize,
    /// A delta that takes longer than this to compute pauses that channel's deltas for
    /// 10 s (it runs on the node's fan-out path; data made to be slow to diff must not
    /// stall every channel).
    #[serde(with = "humantime_serde")]
    pub max_delta_time: Duration,
    /// Time a request body has to arrive completely (408 past it), so a slow POST
    /// cannot hold a connection and a body buffer indefinitely.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// HTTP connections (API calls, health checks, WebSocket handshakes in progress;
    /// not established sessions) a node holds at most; past it new
    /// connections are closed at once.
    pub max_http_connections: usize,
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
    /// Publications `GET /api/history` returns at most per request.
    pub max_history_page: usize,
    /// Publications buffered for one subscriber while its subscribe on a history
    /// channel reads the history; past it the subscriber is closed as a slow consumer.
    pub max_recovery_buffer: usize,
    /// Sessions (WebSocket and SSE) from one client address (see `[proxy]`); 0: no limit.
    pub max_connections_per_ip: usize,
    /// IPv6 clients are counted per network of this prefix length for
    /// `max_connections_per_ip`: one host usually holds a whole /64, and counting each
    /// address would let it open the limit once per address.
    pub ipv6_prefix: u8,
    /// Sessions (WebSocket and SSE) of one user (a token's `sub`); 0: no limit.
    pub max_connections_per_user: usize,
    /// Channels one SSE connection (`GET /sse?channel=..`) may name.
    pub max_sse_channels: usize,
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
            rate_limit_window: Duration::from_secs(10),
            outbound_queue_bytes: 1024 * 1024,
            socket_send_buffer_bytes: 64 * 1024,
            max_body_bytes: 1024 * 1024,
            max_delta_bytes: 16 * 1024,
            max_delta_time: Duration::from_millis(2),
            body_timeout: Duration::from_secs(10),
            max_http_connections: 4096,
            max_batch: 1000,
            inbound_queue: 16 * 1024,
            close_timeout: Duration::from_secs(3),
            subscribe_timeout: Duration::from_secs(5),
            max_history_page: 1000,
            max_recovery_buffer: 10_000,
            // Off: behind a load balancer that does not pass the client's address,
            // every client shares the balancer's.
            max_connections_per_ip: 0,
            ipv6_prefix: 64,
            max_connections_per_user: 100,
            max_sse_channels: 16,
        }
    }
}

/// Presence: how long an entry lives without a refresh, how often nodes refresh
/// theirs, and how many members one page holds.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    /// Every node adds its members again this often.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// An entry not refreshed for this long expires (its node died): the members of a
    /// dead node leave within it, announced. More than `refresh_interval`.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// The most members one `presence` page holds (the default page too).
    pub page_size: usize,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            refresh_interval: Duration::from_secs(10),
            ttl: Duration::from_secs(30),
            page_size: 100,
        }
    }
}

/// The control plane: how nodes know each other and how long the control API waits
/// for them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// Every node says it is alive this often; one not heard from for three intervals
    /// is no longer expected to answer surveys.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How long a control API call (`/api/disconnect`, `/api/info`, ...) waits for every
    /// known node; those that have not answered by then are listed as `missing`.
    #[serde(with = "humantime_serde")]
    pub survey_timeout: Duration,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            heartbeat_interval: Duration::from_secs(2),
            survey_timeout: Duration::from_secs(2),
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
    /// Bytes a session's writer gathers (frames it copied, runs it shares) before it
    /// starts a socket write; a batch is flushed as a whole anyway. What it gathers is
    /// already counted in `limits.outbound_queue_bytes`: this sets how much one write
    /// takes (fewer, larger writes in a burst), not what a session may hold.
    pub write_buffer_bytes: usize,
    /// How long a session's writer task stays after its last write before it parks the
    /// socket and ends (idle sessions then hold no writer task).
    #[serde(with = "humantime_serde")]
    pub writer_linger: Duration,
    /// A write that makes no progress for this long (the peer's TCP stack is alive but
    /// the peer reads nothing) drops the connection, freeing its queue and its slot
    /// (`herald_write_timeouts_total`). Progress is the kernel taking bytes again after
    /// it made the writer wait (`wire::Progress`): with its own send buffer sizing
    /// (`limits.socket_send_buffer_bytes = 0`, up to 4 MiB, writable again only once
    /// about a third of it has drained) a reader slower than about 15-30 KB/s can go a
    /// whole timeout without any and is dropped; with the default 64 KiB, a few KB/s;
    /// with 8 KiB only one under about 300 B/s is (checked every quarter of the timeout:
    /// up to 1.25 timeouts without progress). Once the session is closing (a ban, a
    /// drain), what is queued before its close frame has one timeout from the close,
    /// progress or not; then the rest is dropped (counted `disconnected`) and the close
    /// frame goes next, bounded by `limits.close_timeout`.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Offer permessage-deflate (RFC 7692) to clients that ask for it (browsers do),
    /// with no context takeover either way: every message is compressed on its own, a
    /// broadcast once for all its subscribers. Off by default: it costs CPU per message
    /// and pays on large, repetitive messages (see BENCHMARKS.md).
    pub deflate: bool,
    /// Messages smaller than this, or that compression would not make smaller, are sent
    /// uncompressed on a deflate connection; 0: every data message is compressed.
    pub deflate_min_bytes: usize,
    /// The compression level, 1 (fastest) to 9 (smallest).
    pub deflate_level: u32,
    /// Conformance testing only: every session echoes each message back and speaks no
    /// Herald protocol (no welcome, no requests). Refused unless the public listener is
    /// a loopback address.
    pub echo: bool,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            read_buffer_bytes: 256,
            write_buffer_bytes: 256 * 1024,
            writer_linger: Duration::from_secs(2),
            write_timeout: Duration::from_secs(10),
            deflate: false,
            deflate_min_bytes: 256,
            deflate_level: 1,
            echo: false,
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
        if let Err(e) = Verifier::new(&self.auth.jwt) {
            return bad("auth.jwt", &e.to_string());
        }
        if !(1..=9).contains(&self.websocket.deflate_level) {
            return bad(
                "websocket.deflate_level",
                "must be 1 (fastest) to 9 (smallest)",
            );
        }
        // (The files are parsed when the gateway starts: `tls::TlsKeys::load`.)
        match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(cert), Some(key)) => {
                for (name, path) in [("cert_file", cert), ("key_file", key)] {
                    if let Err(e) = std::fs::metadata(path) {
                        return bad("tls", &format!("{name} {}: {e}", path.display()));
                    }
                }
            }
            (None, None) => {}
            _ => return bad("tls", "cert_file and key_file go together"),
        }
        if !self.auth.anonymous && !self.auth.jwt.is_enabled() && self.hooks.connect.is_none() {
            return bad(
                "auth.anonymous",
                "is false but no [auth.jwt] key and no [hooks.connect] is set: nobody could connect",
            );
        }
        if self.auth.api_key.as_deref() == Some("") {
            return bad(
                "auth.api_key",
                "must not be empty (leave it unset to disable)",
            );
        }
        if self.auth.metrics_key.as_deref() == Some("") {
            return bad(
                "auth.metrics_key",
                "must not be empty (leave it unset to disable)",
            );
        }
        if self.auth.api_keys.iter().any(|k| k.key.is_empty()) {
            return bad("auth.api_keys", "a key must not be empty");
        }
        for (i, r) in self.channels.rules.iter().enumerate() {
            let key = "channels.rules";
            let at = format!("rule {} (pattern {:?})", i + 1, r.pattern.as_str());
            if r.subscribe == SubscribeAccess::Hook && self.hooks.subscribe.is_none() {
                return bad(
                    key,
                    &format!("{at}: subscribe = \"hook\" needs [hooks.subscribe]"),
                );
            }
            if r.publish == PublishAccess::Hook && self.hooks.publish.is_none() {
                return bad(
                    key,
                    &format!("{at}: publish = \"hook\" needs [hooks.publish]"),
                );
            }
            if r.join_leave && !r.presence {
                return bad(key, &format!("{at}: join_leave needs presence = true"));
            }
            if r.join_leave && r.presence_access == PresenceAccess::Nobody {
                return bad(
                    key,
                    &format!(
                        "{at}: join_leave tells every subscriber who comes and goes, which presence_access = \"nobody\" means to keep from them: choose one"
                    ),
                );
            }
            if r.history_size > MAX_HISTORY_SIZE {
                return bad(
                    key,
                    &format!("{at}: history_size may be at most {MAX_HISTORY_SIZE}"),
                );
            }
            if r.history_size > 0 && (r.history_ttl.is_zero() || r.history_meta_ttl.is_zero()) {
                return bad(
                    key,
                    &format!("{at}: history_ttl and history_meta_ttl must be greater than 0"),
                );
            }
            if r.history_meta_ttl < r.history_ttl {
                return bad(
                    key,
                    &format!("{at}: history_meta_ttl must not be shorter than history_ttl"),
                );
            }
            if r.history_size == 0 && r.delta.is_some() {
                return bad(
                    key,
                    &format!("{at}: delta needs history_size > 0 (a delta is against the publication before, which only history channels number)"),
                );
            }
            if r.history_size == 0 && r.max_recovery > 0 {
                return bad(key, &format!("{at}: max_recovery needs history_size > 0"));
            }
        }
        if self.channels.idempotency_window.is_zero() {
            return bad("channels.idempotency_window", "must be greater than 0");
        }
        let l = &self.limits;
        if l.body_timeout.is_zero() {
            return bad("limits.body_timeout", "must be greater than 0");
        }
        let positive: [(&'static str, usize); 11] = [
            ("limits.max_connections", l.max_connections),
            ("limits.max_message_bytes", l.max_message_bytes),
            ("limits.max_subscriptions", l.max_subscriptions),
            ("limits.outbound_queue_bytes", l.outbound_queue_bytes),
            ("limits.max_body_bytes", l.max_body_bytes),
            ("limits.max_batch", l.max_batch),
            ("limits.inbound_queue", l.inbound_queue),
            ("limits.max_history_page", l.max_history_page),
            ("limits.max_recovery_buffer", l.max_recovery_buffer),
            ("limits.max_http_connections", l.max_http_connections),
            ("limits.max_sse_channels", l.max_sse_channels),
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
        if !(1..=128).contains(&l.ipv6_prefix) {
            return bad("limits.ipv6_prefix", "must be between 1 and 128");
        }
        if l.rate_limit_window.is_zero() {
            return bad("limits.rate_limit_window", "must be greater than 0");
        }
        if l.handshake_timeout.is_zero() {
            return bad("limits.handshake_timeout", "must be greater than 0");
        }
        if self.heartbeat.interval.is_zero() || self.heartbeat.timeout.is_zero() {
            return bad("heartbeat", "interval and timeout must be greater than 0");
        }
        if self.presence.refresh_interval.is_zero()
            || self.presence.ttl <= self.presence.refresh_interval
        {
            return bad(
                "presence",
                "refresh_interval must be greater than 0 and ttl greater than refresh_interval",
            );
        }
        if !(1..=1000).contains(&self.presence.page_size) {
            return bad("presence.page_size", "must be 1-1000");
        }
        if let Err(e) = herald_hooks::validate(&self.hooks) {
            return bad("hooks", &e.0);
        }
        if let Err(e) = self.webhooks.validate() {
            return bad("webhooks", &e.0);
        }
        // A browser sends its cookies on a WebSocket handshake whatever page opened it:
        // with cookie sessions, an open origin list lets any web page connect as the
        // user who visits it (cross-site WebSocket hijacking).
        if self.hooks.forwards_cookies() && self.auth.allowed_origins.is_empty() {
            return bad(
                "hooks.connect.forward_headers",
                "forwarding cookies needs auth.allowed_origins: without it any web page \
                 could connect as the user visiting it (cross-site WebSocket hijacking); \
                 list your sites' origins",
            );
        }
        let personal = &self.auth.personal_channel;
        if !personal.is_empty()
            && (!personal.contains("{sub}")
                || herald_protocol::ChannelName::new(&personal.replace("{sub}", "u")).is_err())
        {
            return bad(
                "auth.personal_channel",
                "must be a channel name with {sub} in it, e.g. \"user:{sub}\"",
            );
        }
        if self.control.heartbeat_interval.is_zero() || self.control.survey_timeout.is_zero() {
            return bad(
                "control",
                "heartbeat_interval and survey_timeout must be greater than 0",
            );
        }
        if self.websocket.write_timeout.is_zero() || self.limits.close_timeout.is_zero() {
            return bad(
                "websocket.write_timeout",
                "write_timeout and limits.close_timeout must be greater than 0",
            );
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
