//! Webhooks (`[webhooks]`): events the cluster tells the application's backend about,
//! each a signed `POST` of its body (see `herald_protocol::webhook`) answered with any
//! 2xx status. Unlike hooks, a webhook decides nothing: a failure is retried with
//! backoff (`max_attempts`), and the queue behind it (the broker's) makes delivery at
//! least once, across nodes.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{client, InvalidHooks};

/// `[webhooks]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Where events are `POST`ed (`http://` or `https://`); empty: no webhooks.
    pub url: String,
    /// A PEM file of CA certificates trusted for an `https://` URL, besides the
    /// system's.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Which events: `channel_occupied`, `channel_vacated`, `join`, `leave`.
    pub events: Vec<String>,
    /// The HMAC-SHA256 key requests are signed with (as hooks'); empty: unsigned.
    pub secret: String,
    /// How long one attempt may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts per event before it is given up (counted as `failed`); the waits
    /// between them double from 0.5 s up to 30 s.
    pub max_attempts: u32,
    /// Events waiting for delivery, cluster-wide, at most; past it new events are
    /// dropped (counted as `dropped`).
    pub max_queue: usize,
    /// A node's occupancy entries expire this long after its last refresh (every third
    /// of it): a node that dies has its channels vacated within this.
    #[serde(with = "humantime_serde")]
    pub occupancy_ttl: Duration,
    /// One node delivers at a time, so that events arrive in order; when it stops
    /// (dies, or cannot reach the broker) for this long, another takes over, with the
    /// events it had not finished (delivered again: at least once). At least twice
    /// `timeout`.
    #[serde(with = "humantime_serde")]
    pub takeover_after: Duration,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            url: String::new(),
            tls_ca_file: None,
            events: ["channel_occupied", "channel_vacated", "join", "leave"]
                .map(String::from)
                .to_vec(),
            secret: String::new(),
            timeout: Duration::from_secs(5),
            max_attempts: 8,
            max_queue: 10_000,
            occupancy_ttl: Duration::from_secs(30),
            takeover_after: Duration::from_secs(10),
        }
    }
}

impl WebhooksConfig {
    /// Whether webhooks are on.
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }

    /// Whether `event` is wanted.
    pub fn wants(&self, event: &str) -> bool {
        self.enabled() && self.events.iter().any(|e| e == event)
    }

    /// Checks `[webhooks]`.
    pub fn validate(&self) -> Result<(), InvalidHooks> {
        if !self.enabled() {
            return Ok(());
        }
        let bad = |why: String| Err(InvalidHooks(why));
        client::check_url("webhooks", &self.url)?;
        client::check_ca(self.tls_ca_file.as_deref())?;
        const KNOWN: [&str; 4] = ["channel_occupied", "channel_vacated", "join", "leave"];
        if let Some(e) = self.events.iter().find(|e| !KNOWN.contains(&e.as_str())) {
            return bad(format!(
                "webhooks.events: {e:?} is not one of {}",
                KNOWN.join(", ")
            ));
        }
        if self.timeout.is_zero() || self.max_attempts == 0 || self.max_queue == 0 {
            return bad(
                "webhooks: timeout, max_attempts and max_queue must be greater than 0".into(),
            );
        }
        if self.occupancy_ttl < Duration::from_secs(1) {
            return bad("webhooks.occupancy_ttl must be at least 1s".into());
        }
        if self.takeover_after < self.timeout * 2 {
            return bad("webhooks.takeover_after must be at least twice webhooks.timeout".into());
        }
        Ok(())
    }

    /// The wait before attempt `n + 1` (n ≥ 1).
    pub fn backoff(&self, n: u32) -> Duration {
        Duration::from_millis(500)
            .saturating_mul(1 << n.saturating_sub(1).min(6))
            .min(Duration::from_secs(30))
    }
}

/// Why one delivery attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// No answer within the timeout.
    #[error("the backend did not answer in time")]
    Timeout,
    /// The connection failed.
    #[error("the backend could not be reached: {0}")]
    Failed(String),
    /// An answer other than 2xx.
    #[error("the backend answered HTTP {0}")]
    Status(u16),
}

/// The node's webhook sender.
pub struct Webhooks {
    config: WebhooksConfig,
    client: client::HttpClient,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("url", &self.config.url)
            .finish()
    }
}

impl Webhooks {
    /// The sender, or none when webhooks are off.
    pub fn new(config: &WebhooksConfig) -> Result<Option<Webhooks>, InvalidHooks> {
        if !config.enabled() {
            return Ok(None);
        }
        Ok(Some(Webhooks {
            config: config.clone(),
            client: client::new(config.tls_ca_file.as_deref())?,
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &WebhooksConfig {
        &self.config
    }

    /// One attempt to deliver `body`.
    pub async fn post(&self, body: String) -> Result<(), WebhookError> {
        let req = client::signed_post(&self.config.url, &self.config.secret, Bytes::from(body))
            .map_err(WebhookError::Failed)?;
        let work = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| WebhookError::Failed(e.to_string()))?;
            // The answer's body is not read: a backend's success is its status, and
            // dropping the body closes that connection rather than reading unbounded.
            match resp.status() {
                s if s.is_success() => Ok(()),
                s => Err(WebhookError::Status(s.as_u16())),
            }
        };
        tokio::time::timeout(self.config.timeout, work)
            .await
            .unwrap_or(Err(WebhookError::Timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_thirty_seconds() {
        let c = WebhooksConfig::default();
        let waits: Vec<u64> = (1..=9).map(|n| c.backoff(n).as_millis() as u64).collect();
        assert_eq!(
            waits,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
    }

    #[test]
    fn only_known_events_and_http_urls() {
        let with = |url: &str, events: &[&str]| WebhooksConfig {
            url: url.into(),
            events: events.iter().map(|e| e.to_string()).collect(),
            ..WebhooksConfig::default()
        };
        assert!(with("http://127.0.0.1:1/w", &["channel_vacated"])
            .validate()
            .is_ok());
        assert!(
            with("", &["nonsense"]).validate().is_ok(),
            "off: not checked"
        );
        assert!(with("http://127.0.0.1:1/w", &["vacated"])
            .validate()
            .is_err());
        assert!(with("https://x/w", &["join"]).validate().is_ok());
        assert!(with("ws://x/w", &["join"]).validate().is_err());
        assert!(with("127.0.0.1:1", &["join"]).validate().is_err());
    }
}
