//! Herald's gateway: WebSocket sessions, fan-out, the HTTP API, limits and draining.
//!
//! The entry point is [`Gateway::run`], which serves on listeners the caller bound and
//! returns when the caller's `shutdown` future resolves and the drain is over. It never
//! reads signals or the environment itself, so tests drive it exactly as `main` does.
//!
//! # Layout
//! - [`config`]: [`GatewayConfig`], every limit with its default.
//! - `http`: routing, the publish API, health, readiness and metrics endpoints, and the
//!   WebSocket upgrade (with the connection limit and origin check).
//! - `session`: one WebSocket session — request handling, rate limit, heartbeats, the
//!   writer that drains the session's outbox.
//! - `outbox`: a session's outbound queue, bounded in bytes (slow consumers are closed
//!   with 1013, never waited for).
//! - `hub`: channel → local subscribers, and fan-out of broker publications.
//!
//! # Data path
//! publisher → [`Broker::publish`] → broker → [`herald_broker::Inbound`] (bounded) →
//! hub dispatcher → each subscriber's outbox (bounded, never blocks) → writer → socket.
#![deny(missing_docs)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use herald_broker::{Broker, BrokerError, InboundReceiver};
use herald_metrics::{Metrics, Source};
use herald_protocol::{close, ChannelPatterns, Publication};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod config;
mod http;
mod hub;
mod outbox;
mod session;

pub use config::GatewayConfig;

use hub::{ConnId, Hub};
use outbox::Outbox;

/// Why the gateway could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(#[from] config::InvalidConfig),
    /// A listener failed.
    #[error("listener failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The sockets to serve. With `internal` set, `public` serves only `/ws`, `/healthz`
/// and `/readyz`, and `internal` serves `/api/*`, `/metrics` and the health endpoints;
/// without it, `public` serves everything.
pub struct Listeners {
    /// Where clients connect.
    pub public: TcpListener,
    /// Where backends and Prometheus connect, if split from `public`.
    pub internal: Option<TcpListener>,
}

/// State shared by every task of one gateway.
pub(crate) struct Shared {
    pub(crate) config: GatewayConfig,
    pub(crate) node_id: String,
    /// Parsed `channels.client_publish`.
    pub(crate) publish_patterns: ChannelPatterns,
    pub(crate) hub: Arc<Hub>,
    pub(crate) metrics: Metrics,
    pub(crate) registry: herald_metrics::prometheus::Registry,
    /// Open sessions, so that a drain can close each of them.
    pub(crate) sessions: Mutex<HashMap<ConnId, Arc<Outbox>>>,
    /// Connection slots taken (upgrades in progress plus open sessions); checked
    /// against `limits.max_connections` before an upgrade is accepted.
    pub(crate) n_slots: AtomicUsize,
    pub(crate) next_conn: AtomicU64,
    /// Set when shutdown begins: readiness fails and upgrades are refused.
    pub(crate) draining: AtomicBool,
    /// The node's clock origin for [`Shared::now_ms`].
    pub(crate) epoch: Instant,
    /// Shared by every session's writer.
    pub(crate) writer_env: Arc<outbox::WriterEnv>,
}

impl Shared {
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Milliseconds since the gateway started (monotonic); sessions store times in
    /// this unit in atomics instead of holding timers.
    pub(crate) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(crate) fn drain_code(&self) -> u16 {
        if self.config.shutdown.restart {
            close::SERVICE_RESTART
        } else {
            close::GOING_AWAY
        }
    }

    /// Hands publications to the broker and counts them.
    pub(crate) async fn publish(
        &self,
        batch: Vec<Publication>,
        source: Source,
    ) -> Result<(), BrokerError> {
        let n = batch.len() as u64;
        let started = Instant::now();
        // A broker that is down refuses at once (the trait's contract): no check here.
        self.hub.broker().publish(batch).await?;
        self.metrics
            .broker_publish_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.published(source, n);
        Ok(())
    }

    pub(crate) fn is_ready(&self) -> Result<(), &'static str> {
        if self.is_draining() {
            Err("draining")
        } else if !self.hub.broker().is_up() {
            Err("broker_down")
        } else {
            Ok(())
        }
    }
}

/// A gateway ready to serve.
pub struct Gateway {
    shared: Arc<Shared>,
    inbound: InboundReceiver,
}

impl Gateway {
    /// Assembles a gateway. `inbound` must be the receiving half of the queue that
    /// `broker` delivers into; `metrics` must be registered in `registry`, which
    /// `/metrics` serves.
    pub fn new(
        config: GatewayConfig,
        broker: Arc<dyn Broker>,
        inbound: InboundReceiver,
        metrics: Metrics,
        registry: herald_metrics::prometheus::Registry,
    ) -> Result<Self, ServerError> {
        config.validate()?;
        let publish_patterns =
            ChannelPatterns::new(&config.channels.client_publish).map_err(|e| {
                config::InvalidConfig {
                    key: "channels.client_publish",
                    problem: e.to_string(),
                }
            })?;
        let node_id = if config.node_id.is_empty() {
            "herald".to_owned()
        } else {
            config.node_id.clone()
        };
        metrics.broker_up.set(i64::from(broker.is_up()));
        metrics
            .max_connections
            .set(config.limits.max_connections as i64);
        let writer_env = Arc::new(outbox::WriterEnv {
            metrics: metrics.clone(),
            close_timeout: config.limits.close_timeout,
            linger: config.websocket.writer_linger,
        });
        let shared = Arc::new(Shared {
            hub: Arc::new(Hub::new(broker, metrics.clone())),
            node_id,
            publish_patterns,
            metrics,
            registry,
            sessions: Mutex::default(),
            n_slots: AtomicUsize::new(0),
            next_conn: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            epoch: Instant::now(),
            writer_env,
            config,
        });
        Ok(Gateway { shared, inbound })
    }

    /// Serves until `shutdown` resolves, then drains: readiness turns 503 and upgrades
    /// are refused at once, sessions are closed (1001, or 1012 with
    /// `shutdown.restart`) spread over `shutdown.drain_window`, and this returns once
    /// every session has ended or `shutdown.grace_period` has passed.
    pub async fn run(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let Gateway { shared, inbound } = self;
        let dispatcher = tokio::spawn(shared.hub.clone().run_dispatcher(inbound));
        let stop = CancellationToken::new();
        let sweeper = tokio::spawn(heartbeat(shared.clone(), stop.clone()));
        let split = listeners.internal.is_some();
        let mut accept = vec![tokio::spawn(http::serve(
            listeners.public,
            shared.clone(),
            if split {
                http::Role::Public
            } else {
                http::Role::All
            },
            stop.clone(),
        ))];
        if let Some(internal) = listeners.internal {
            accept.push(tokio::spawn(http::serve(
                internal,
                shared.clone(),
                http::Role::Internal,
                stop.clone(),
            )));
        }

        shutdown.await;
        let started = tokio::time::Instant::now();
        shared.draining.store(true, Ordering::Release);
        let cfg = shared.config.shutdown.clone();
        tracing::info!(
            sessions = shared.sessions.lock().len(),
            window = ?cfg.drain_window,
            "draining"
        );
        drain(&shared, cfg.drain_window).await;
        let deadline = started + cfg.grace_period;
        while !shared.sessions.lock().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let left = shared.sessions.lock().len();
        if left > 0 {
            tracing::warn!(sessions = left, "grace period over; dropping open sessions");
        }
        stop.cancel();
        for task in accept {
            let _ = task.await;
        }
        dispatcher.abort();
        let _ = sweeper.await;
        tracing::info!("drained");
        Ok(())
    }
}

/// Pings sessions that have been silent for `heartbeat.interval` and closes those that
/// then stay silent for `heartbeat.timeout`. One task for the node instead of a timer
/// per session: an idle session costs no timer, and a busy one does not re-arm a timer
/// per message.
async fn heartbeat(shared: Arc<Shared>, stop: CancellationToken) {
    let hb = shared.config.heartbeat.clone();
    let interval_ms = hb.interval.as_millis() as u64;
    let timeout_ms = hb.timeout.as_millis() as u64;
    // Checks four times per shortest period, so deadlines are kept within a quarter.
    let period = (hb.interval.min(hb.timeout) / 4).max(std::time::Duration::from_millis(10));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = shared.now_ms();
        let sessions: Vec<Arc<Outbox>> = shared.sessions.lock().values().cloned().collect();
        for outbox in sessions {
            let pinged = outbox.pinged_ms.load(Ordering::Relaxed);
            if pinged != 0 {
                if now.saturating_sub(pinged) >= timeout_ms {
                    tracing::debug!("heartbeat timeout");
                    outbox.close(close::POLICY_VIOLATION, "heartbeat timeout", true);
                }
            } else if now.saturating_sub(outbox.last_heard_ms.load(Ordering::Relaxed))
                >= interval_ms
            {
                outbox.pinged_ms.store(now.max(1), Ordering::Relaxed);
                outbox.push(outbox::Item::control(
                    tokio_tungstenite::tungstenite::Message::Ping(bytes::Bytes::new()),
                    0,
                ));
            }
        }
    }
}

/// Closes every session, spread evenly over `window`.
async fn drain(shared: &Shared, window: std::time::Duration) {
    let sessions: Vec<Arc<Outbox>> = shared.sessions.lock().values().cloned().collect();
    if sessions.is_empty() {
        return;
    }
    let code = shared.drain_code();
    // Close in up to 100 steps rather than one timer per session.
    let steps = sessions.len().min(100);
    let per_step = sessions.len().div_ceil(steps);
    let pause = window / steps as u32;
    for (i, chunk) in sessions.chunks(per_step).enumerate() {
        if i > 0 {
            tokio::time::sleep(pause).await;
        }
        for outbox in chunk {
            outbox.close(code, "node shutting down", true);
        }
    }
}
