//! Hooks: calls from a Herald node to the application's backend.
//!
//! A hook is a `POST` of a JSON object to the URL its table configures (`[hooks.connect]`,
//! `[hooks.refresh]`, `[hooks.subscribe]`, `[hooks.publish]`, `[hooks.rpc]`). The backend
//! answers with exactly one of `{"result": {...}}`, `{"error": {"code": N, "message":
//! ".."}}` (refuse this request, keep the connection) or `{"disconnect": {"code": N,
//! "reason": ".."}}`. Anything else (another status, not JSON, more than
//! `hooks.max_response_bytes`, no answer within the hook's `timeout`) fails closed: the
//! request is refused as `unavailable`, never let through.
//!
//! Robust by design: one client per node with pooled keep-alive connections; at most
//! `hooks.max_concurrency` calls in flight per node (a call that cannot get a slot
//! within its timeout fails, so a slow backend holds no more than that many requests
//! and no memory beyond them); no retries (a hook may not be idempotent); every request
//! signed when `hooks.secret` is set: `X-Herald-Timestamp` (Unix seconds) and
//! `X-Herald-Signature`, the lowercase hex HMAC-SHA256 of the timestamp's digits
//! followed by the body's bytes, so the backend can check it comes from Herald and is
//! fresh. Latency and outcome per hook are in `herald_hook_seconds` and
//! `herald_hook_calls_total`.
//!
//! # Layout
//! - `webhooks`: [`Webhooks`], events told to the backend (`[webhooks]`), retried.
//! - `client`: the pooled HTTP client both use (`http://` and `https://`, the system's
//!   roots plus an optional private CA).
#![deny(missing_docs)]

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::Semaphore;

mod webhooks;

mod client;

pub use webhooks::{WebhookError, Webhooks, WebhooksConfig};

/// `[hooks]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HooksConfig {
    /// The HMAC-SHA256 key requests are signed with; empty: unsigned.
    pub secret: String,
    /// Hook calls in flight per node, at most.
    pub max_concurrency: usize,
    /// The largest answer read from a backend, in bytes.
    pub max_response_bytes: usize,
    /// A PEM file of CA certificates trusted for `https://` hook URLs, besides the
    /// system's (a private CA).
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// `[hooks.connect]`: asked who a client is when it connects without a valid token
    /// (or always).
    pub connect: Option<ConnectHookConfig>,
    /// `[hooks.refresh]`: asked to extend connections the connect hook gave an expiry.
    pub refresh: Option<RefreshHookConfig>,
    /// `[hooks.rpc]`: the `rpc` client op.
    pub rpc: Option<RpcHookConfig>,
    /// `[hooks.subscribe]`: asked for channels whose rule says `subscribe = "hook"`.
    pub subscribe: Option<HookConfig>,
    /// `[hooks.publish]`: asked for channels whose rule says `publish = "hook"`.
    pub publish: Option<HookConfig>,
}

/// `[hooks.subscribe]`, `[hooks.publish]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    /// Where to `POST` (`http://` or `https://`).
    pub url: String,
    /// How long a call may take, the wait for a slot included.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for HooksConfig {
    fn default() -> Self {
        HooksConfig {
            secret: String::new(),
            max_concurrency: 64,
            max_response_bytes: 65536,
            tls_ca_file: None,
            connect: None,
            refresh: None,
            rpc: None,
            subscribe: None,
            publish: None,
        }
    }
}

impl HooksConfig {
    /// Where `hook` is called and how long it may take, when its table is set.
    pub fn endpoint(&self, hook: Hook) -> Option<(&str, Duration)> {
        match hook {
            Hook::Connect => self.connect.as_ref().map(|c| (c.url.as_str(), c.timeout)),
            Hook::Refresh => self.refresh.as_ref().map(|c| (c.url.as_str(), c.timeout)),
            Hook::Rpc => self.rpc.as_ref().map(|c| (c.url.as_str(), c.timeout)),
            Hook::Subscribe => self.subscribe.as_ref().map(|c| (c.url.as_str(), c.timeout)),
            Hook::Publish => self.publish.as_ref().map(|c| (c.url.as_str(), c.timeout)),
        }
    }

    /// Whether the connect hook is told the client's cookies (cookie sessions).
    pub fn forwards_cookies(&self) -> bool {
        self.connect.as_ref().is_some_and(|c| {
            c.forward_headers
                .iter()
                .any(|h| h.eq_ignore_ascii_case("cookie"))
        })
    }
}

/// `[hooks.rpc]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RpcHookConfig {
    /// Where to `POST` (`http://` or `https://`).
    pub url: String,
    /// How long a call may take, the wait for a slot included.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Whether clients without a token may call it.
    #[serde(default)]
    pub anonymous: bool,
}

/// `[hooks.connect]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectHookConfig {
    /// Where to `POST` (`http://` or `https://`).
    pub url: String,
    /// How long a call may take, the wait for a slot included.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Request headers passed on to the backend (names, any case; e.g. `["cookie",
    /// "authorization"]`). Only these: a client's other headers stay on the node.
    #[serde(default)]
    pub forward_headers: Vec<String>,
    /// Call it even when the client presents a valid token (the backend may refuse it,
    /// or add info, channels and welcome data).
    #[serde(default)]
    pub always: bool,
}

/// `[hooks.refresh]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshHookConfig {
    /// Where to `POST` (`http://` or `https://`).
    pub url: String,
    /// How long a call may take, the wait for a slot included.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// How long before a connection's expiry it is asked (and asked again, while it
    /// fails, until the expiry passes).
    #[serde(default = "default_before_expiry", with = "humantime_serde")]
    pub before_expiry: Duration,
}

fn default_before_expiry() -> Duration {
    Duration::from_secs(10)
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

/// Which hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// A client connects (`[hooks.connect]`).
    Connect,
    /// A connection's expiry approaches (`[hooks.refresh]`).
    Refresh,
    /// A client's `rpc`.
    Rpc,
    /// A subscribe to a `subscribe = "hook"` channel.
    Subscribe,
    /// A publish to a `publish = "hook"` channel.
    Publish,
}

impl Hook {
    /// Every hook.
    pub const ALL: [Hook; 5] = [
        Hook::Connect,
        Hook::Refresh,
        Hook::Rpc,
        Hook::Subscribe,
        Hook::Publish,
    ];

    /// Its name, in metrics, logs and configuration (`[hooks.NAME]`).
    pub fn name(self) -> &'static str {
        match self {
            Hook::Connect => "connect",
            Hook::Refresh => "refresh",
            Hook::Rpc => "rpc",
            Hook::Subscribe => "subscribe",
            Hook::Publish => "publish",
        }
    }
}

/// What a backend answered.
#[derive(Debug, Clone)]
pub enum Reply {
    /// `{"result": R}`: R's JSON text.
    Result(Box<RawValue>),
    /// `{"error": {"code": N, "message": M}}`: refuse the request.
    Error {
        /// The backend's code.
        code: i64,
        /// The backend's message.
        message: String,
    },
    /// `{"disconnect": {"code": N, "reason": R}}`: close the connection.
    Disconnect {
        /// The close code (kept within 4000-4999 by the caller).
        code: u16,
        /// The close reason.
        reason: String,
    },
}

/// Why a hook gave no answer. Every one of these fails closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    /// The hook is not configured.
    #[error("this hook is not configured")]
    NotConfigured,
    /// No slot, or no answer, within the hook's timeout.
    #[error("the backend did not answer in time")]
    Timeout,
    /// The request could not be made or the connection failed.
    #[error("the backend could not be reached: {0}")]
    Failed(String),
    /// The answer was not one of the three the contract allows.
    #[error("the backend's answer is not a hook answer: {0}")]
    BadAnswer(String),
    /// A request that is no session found the share of slots such requests may hold
    /// taken (see [`Hooks::call_sessionless`]).
    #[error("too many sessionless hook calls in flight")]
    Busy,
}

impl HookError {
    fn outcome(&self) -> &'static str {
        match self {
            HookError::NotConfigured => "not_configured",
            HookError::Timeout => "timeout",
            HookError::Failed(_) => "failed",
            HookError::BadAnswer(_) => "bad_answer",
            HookError::Busy => "busy",
        }
    }
}

/// Invalid `[hooks]` settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("hooks: {0}")]
pub struct InvalidHooks(pub String);

/// The node's hook client.
pub struct Hooks {
    config: HooksConfig,
    client: client::HttpClient,
    slots: Semaphore,
    /// The share of `slots` requests that are no session may hold (half).
    sessionless: Semaphore,
    metrics: herald_metrics::Metrics,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("Hooks")
            .field("connect", &self.config.connect.as_ref().map(|r| &r.url))
            .field("rpc", &self.config.rpc.as_ref().map(|r| &r.url))
            .finish()
    }
}

/// Checks `[hooks]`.
pub fn validate(config: &HooksConfig) -> Result<(), InvalidHooks> {
    if config.max_concurrency == 0 || config.max_response_bytes == 0 {
        return Err(InvalidHooks(
            "max_concurrency and max_response_bytes must be greater than 0".into(),
        ));
    }
    for hook in Hook::ALL {
        let Some((url, timeout)) = config.endpoint(hook) else {
            continue;
        };
        let name = hook.name();
        client::check_url(name, url)?;
        if timeout.is_zero() {
            return Err(InvalidHooks(format!(
                "{name}.timeout must be greater than 0"
            )));
        }
    }
    if let Some(c) = &config.connect {
        for h in &c.forward_headers {
            if hyper::header::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(InvalidHooks(format!(
                    "connect.forward_headers: {h:?} is not a header name"
                )));
            }
        }
    }
    client::check_ca(config.tls_ca_file.as_deref())?;
    if config.refresh.is_some() && config.connect.is_none() {
        return Err(InvalidHooks(
            "[hooks.refresh] extends connections the connect hook let in: it needs [hooks.connect]"
                .into(),
        ));
    }
    Ok(())
}

/// `X-Herald-Signature` for `body` sent at `timestamp`: the lowercase hex HMAC-SHA256,
/// keyed with `secret`, of the timestamp's decimal digits followed by the body.
pub fn sign(secret: &str, timestamp: u64, body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    result: Option<Box<RawValue>>,
    error: Option<ErrorAnswer>,
    disconnect: Option<DisconnectAnswer>,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    code: i64,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct DisconnectAnswer {
    code: u16,
    #[serde(default)]
    reason: String,
}

fn parse(body: &[u8]) -> Result<Reply, HookError> {
    let bad = |why: String| HookError::BadAnswer(why);
    let a: Answer = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    match (a.result, a.error, a.disconnect) {
        (Some(r), None, None) => Ok(Reply::Result(r)),
        (None, Some(e), None) => Ok(Reply::Error {
            code: e.code,
            message: e.message,
        }),
        (None, None, Some(d)) => Ok(Reply::Disconnect {
            code: d.code,
            reason: d.reason,
        }),
        _ => Err(bad(
            "exactly one of result, error, disconnect is expected".into()
        )),
    }
}

impl Hooks {
    /// The node's hook client, or none when no hook is configured.
    pub fn new(
        config: &HooksConfig,
        metrics: herald_metrics::Metrics,
    ) -> Result<Option<Hooks>, InvalidHooks> {
        if Hook::ALL.iter().all(|h| config.endpoint(*h).is_none()) {
            return Ok(None);
        }
        let client = client::new(config.tls_ca_file.as_deref())?;
        Ok(Some(Hooks {
            slots: Semaphore::new(config.max_concurrency),
            sessionless: Semaphore::new((config.max_concurrency / 2).max(1)),
            config: config.clone(),
            client,
            metrics,
        }))
    }

    /// The `[hooks.connect]` table, if set.
    pub fn connect(&self) -> Option<&ConnectHookConfig> {
        self.config.connect.as_ref()
    }

    /// The `[hooks.refresh]` table, if set.
    pub fn refresh(&self) -> Option<&RefreshHookConfig> {
        self.config.refresh.as_ref()
    }

    /// The `[hooks.rpc]` table, if set.
    pub fn rpc(&self) -> Option<&RpcHookConfig> {
        self.config.rpc.as_ref()
    }

    /// As [`Hooks::call`], for a request that is no session (`POST /sse/publish`):
    /// such requests hold at most half the slots, and one that finds that half taken
    /// fails at once ([`HookError::Busy`]), so that sessionless requests from many
    /// addresses cannot take every slot from connecting clients.
    pub async fn call_sessionless(
        &self,
        hook: Hook,
        body: &serde_json::Value,
    ) -> Result<Reply, HookError> {
        let Ok(_share) = self.sessionless.try_acquire() else {
            self.metrics
                .hook_calls
                .with_label_values(&[hook.name(), HookError::Busy.outcome()])
                .inc();
            return Err(HookError::Busy);
        };
        self.call(hook, body).await
    }

    /// Calls `hook` with `body` (a JSON object): its answer, or why there is none.
    pub async fn call(&self, hook: Hook, body: &serde_json::Value) -> Result<Reply, HookError> {
        let started = std::time::Instant::now();
        let r = self.call_inner(hook, body).await;
        let outcome = match &r {
            Ok(Reply::Result(_)) => "result",
            Ok(Reply::Error { .. }) => "error",
            Ok(Reply::Disconnect { .. }) => "disconnect",
            Err(e) => e.outcome(),
        };
        self.metrics
            .hook_calls
            .with_label_values(&[hook.name(), outcome])
            .inc();
        self.metrics
            .hook_seconds
            .with_label_values(&[hook.name()])
            .observe(started.elapsed().as_secs_f64());
        r
    }

    async fn call_inner(&self, hook: Hook, body: &serde_json::Value) -> Result<Reply, HookError> {
        let (url, limit) = self.config.endpoint(hook).ok_or(HookError::NotConfigured)?;
        let work = async {
            let _slot = self
                .slots
                .acquire()
                .await
                .map_err(|_| HookError::Failed("shutting down".into()))?;
            let body = Bytes::from(serde_json::to_vec(body).expect("JSON serializes"));
            let req =
                client::signed_post(url, &self.config.secret, body).map_err(HookError::Failed)?;
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| HookError::Failed(e.to_string()))?;
            if resp.status() != hyper::StatusCode::OK {
                return Err(HookError::BadAnswer(format!("HTTP {}", resp.status())));
            }
            let bytes = Limited::new(resp.into_body(), self.config.max_response_bytes)
                .collect()
                .await
                .map_err(|e| HookError::BadAnswer(format!("reading the answer: {e}")))?
                .to_bytes();
            parse(&bytes)
        };
        tokio::time::timeout(limit, work)
            .await
            .unwrap_or(Err(HookError::Timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_exactly_one_of_three() {
        assert!(
            matches!(parse(br#"{"result":{"a":1}}"#), Ok(Reply::Result(r)) if r.get() == r#"{"a":1}"#)
        );
        assert!(matches!(
            parse(br#"{"error":{"code":403,"message":"no"}}"#),
            Ok(Reply::Error { code: 403, message }) if message == "no"
        ));
        assert!(matches!(
            parse(br#"{"disconnect":{"code":4403,"reason":"bye"}}"#),
            Ok(Reply::Disconnect { code: 4403, .. })
        ));
        for bad in [
            &br#"{}"#[..],
            br#"{"result":1,"error":{"code":1}}"#,
            br#"{"result":1,"extra":2}"#,
            br#"[1]"#,
            b"not json",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn signatures_cover_the_timestamp_and_the_body() {
        let a = sign("k", 100, b"{}");
        assert_eq!(a.len(), 64);
        assert_ne!(a, sign("k", 101, b"{}"));
        assert_ne!(a, sign("k", 100, b"{ }"));
        assert_ne!(a, sign("j", 100, b"{}"));
        // The digits, then the body: what a backend computes from the two headers' inputs.
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"k").unwrap();
        mac.update(b"100{}");
        assert_eq!(a, hex::encode(mac.finalize().into_bytes()));
    }

    #[test]
    fn only_http_and_https_urls_with_a_host() {
        let with = |url: &str| HooksConfig {
            rpc: Some(RpcHookConfig {
                url: url.into(),
                timeout: Duration::from_secs(1),
                anonymous: false,
            }),
            ..HooksConfig::default()
        };
        assert!(validate(&with("http://127.0.0.1:3000/rpc")).is_ok());
        assert!(validate(&with("https://backend.example/rpc")).is_ok());
        let publish = HooksConfig {
            publish: Some(HookConfig {
                url: "ws://x/p".into(),
                timeout: Duration::from_secs(1),
            }),
            ..HooksConfig::default()
        };
        assert!(validate(&publish).is_err());
        let unreadable = HooksConfig {
            tls_ca_file: Some("/nonexistent/ca.pem".into()),
            ..with("https://x/rpc")
        };
        assert!(validate(&unreadable).is_err());
        for bad in ["ftp://x", "/rpc", "not a url", "https:///rpc"] {
            assert!(validate(&with(bad)).is_err(), "{bad}");
        }
    }
}
