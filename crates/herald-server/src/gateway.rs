//! [`Gateway`]: assembling a node and running it until shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use herald_broker::{inbound, Broker, Inbound, InboundReceiver};
use herald_metrics::prometheus::Registry;
use herald_metrics::Metrics;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{GatewayConfig, InvalidConfig};
use crate::control;
use crate::error::ServerError;
use crate::http::{self, Role};
use crate::lifecycle;
use crate::node::{Loaded, Node};
use crate::presence;
use crate::webhooks;

/// The sockets to serve. With `internal` set, `public` serves the client endpoints
/// (`/ws`, `/sse`, `/sse/publish`, the demo page with `--demo`) and `/healthz`, `/readyz`,
/// and `internal` serves `/api/*`, `/metrics` and the health endpoints;
/// without it, `public` serves everything.
pub struct Listeners {
    /// Where clients connect.
    pub public: TcpListener,
    /// Where backends and Prometheus connect, if split from `public`.
    pub internal: Option<TcpListener>,
}

/// A gateway ready to serve.
pub struct Gateway {
    /// The node every task of this gateway shares.
    node: Arc<Node>,
    /// The receiving half of the broker's queue; `run` hands it to the hub's dispatcher.
    inbound: InboundReceiver,
}

impl Gateway {
    /// Assembles a correctly wired gateway: registers the metrics in `registry` (which
    /// `/metrics` serves), creates the bounded inbound queue (`limits.inbound_queue`),
    /// and hands its sending half and the metrics to `make_broker`, whose broker then
    /// delivers into this gateway's hub. This is the only constructor, so no caller can
    /// wire a broker to another node's queue or count into an unserved registry.
    pub fn new<E>(
        config: GatewayConfig,
        registry: Registry,
        make_broker: impl FnOnce(Inbound, &Metrics) -> Result<Arc<dyn Broker>, E>,
    ) -> Result<Gateway, ServerError>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        config.validate()?;
        let mut config = config;
        if config.demo {
            config
                .channels
                .rules
                .splice(0..0, GatewayConfig::demo_rules());
        }
        let metrics = Metrics::new(&registry)?;
        let (tx, rx) = inbound(config.limits.inbound_queue, metrics.clone());
        let broker = make_broker(tx, &metrics).map_err(|e| ServerError::Broker(Box::new(e)))?;
        metrics.broker_up.set(i64::from(broker.is_up()));
        metrics
            .max_connections
            .set(config.limits.max_connections as i64);
        // Keys are read and parsed once, here, not per handshake.
        let verifier = herald_auth::Verifier::new(&config.auth.jwt).map_err(|e| InvalidConfig {
            key: "auth.jwt",
            problem: e.to_string(),
        })?;
        let tls = crate::tls::TlsKeys::load(&config.tls).map_err(|problem| InvalidConfig {
            key: "tls",
            problem,
        })?;
        let loaded = Loaded {
            verifier,
            tls,
            hooks: herald_hooks::Hooks::new(&config.hooks, metrics.clone()).map_err(|e| {
                InvalidConfig {
                    key: "hooks",
                    problem: e.0,
                }
            })?,
            webhooks: herald_hooks::Webhooks::new(&config.webhooks).map_err(|e| InvalidConfig {
                key: "webhooks",
                problem: e.0,
            })?,
        };
        let node_id = config.node_id();
        let node = Arc::new(Node::new(
            config, loaded, node_id, broker, metrics, registry,
        ));
        Ok(Gateway { node, inbound: rx })
    }

    /// A handle that re-reads the token keys while the gateway runs (the binary calls it
    /// on SIGHUP: a JWKS file rotated in place takes effect without a restart).
    pub fn key_reloader(&self) -> KeyReloader {
        KeyReloader(self.node.clone())
    }

    /// This node's id (the configured one, or the one picked for it).
    pub fn node_id(&self) -> &str {
        &self.node.node_id
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.node.metrics
    }

    /// The registry `/metrics` serves.
    pub fn registry(&self) -> &Registry {
        &self.node.registry
    }

    /// The broker's short name (`memory`, `redis`, ...).
    pub fn broker_kind(&self) -> &'static str {
        self.node.broker.kind()
    }

    /// Waits up to `limit` for the broker to be usable; returns whether it is. The
    /// gateway serves either way (readiness reports the broker); this lets a start-up
    /// avoid flapping through "not ready" while Redis connects.
    pub async fn wait_broker_up(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.node.broker.is_up() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Serves until `shutdown` resolves (or a listener fails for good), then drains:
    /// readiness turns 503 and upgrades are refused at once, sessions are closed (1001,
    /// or 1012 with `shutdown.restart`) spread over `shutdown.drain_window`, and this
    /// returns once every session task has ended or `shutdown.grace_period` has passed.
    /// HTTP connections are then shut down gracefully (a request in flight is answered).
    pub async fn run(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let Gateway { node, inbound } = self;
        if node.config.websocket.echo {
            let addr = listeners.public.local_addr()?;
            if !addr.ip().is_loopback() {
                return Err(ServerError::Config(InvalidConfig {
                    key: "websocket.echo",
                    problem: format!(
                        "echo mode is for conformance tests on a loopback listener, not {addr}"
                    ),
                }));
            }
        }
        let stop = CancellationToken::new();
        let mut background = JoinSet::new();
        background.spawn({
            let hub = node.hub.clone();
            async move {
                // One dispatcher per worker thread: many channels fan out on every core.
                let workers = tokio::runtime::Handle::current().metrics().num_workers();
                hub.run_dispatcher(inbound, workers).await;
                Err(ServerError::TaskEnded("fan-out dispatcher"))
            }
        });
        background.spawn({
            let (node, stop) = (node.clone(), stop.clone());
            async move {
                lifecycle::heartbeat(node, stop.clone()).await;
                if stop.is_cancelled() {
                    Ok(())
                } else {
                    Err(ServerError::TaskEnded("heartbeat sweeper"))
                }
            }
        });
        background.spawn({
            let (node, stop) = (node.clone(), stop.clone());
            async move {
                presence::run(node, stop.clone()).await;
                if stop.is_cancelled() {
                    Ok(())
                } else {
                    Err(ServerError::TaskEnded("presence"))
                }
            }
        });
        // Outside `background`: after the drain it still sends the last vacancies,
        // and is waited for (within the grace period) rather than aborted.
        let webhooks = tokio::spawn(webhooks::run(node.clone(), stop.clone()));
        background.spawn({
            let (node, stop) = (node.clone(), stop.clone());
            async move {
                control::run(node, stop.clone()).await;
                if stop.is_cancelled() {
                    Ok(())
                } else {
                    Err(ServerError::TaskEnded("control plane"))
                }
            }
        });
        let (public_role, split) = match listeners.internal {
            Some(_) => (Role::Public, true),
            None => (Role::All, false),
        };
        let mut accept = JoinSet::new();
        accept.spawn(http::serve(
            listeners.public,
            node.clone(),
            public_role,
            stop.clone(),
        ));
        if let Some(internal) = listeners.internal {
            accept.spawn(http::serve(
                internal,
                node.clone(),
                Role::Internal,
                stop.clone(),
            ));
        }
        debug_assert_eq!(accept.len(), 1 + usize::from(split));

        // Serve until asked to stop, or until something the gateway cannot do without
        // fails: then drain all the same, so clients are told, and report it.
        let mut failure = None;
        tokio::select! {
            _ = shutdown => {}
            Some(r) = accept.join_next() => failure = task_failure(r, "listener"),
            Some(r) = background.join_next() => failure = task_failure(r, "background"),
        }

        let grace = tokio::time::Instant::now() + node.config.shutdown.grace_period;
        node.begin_drain();
        control::leave(&node).await;
        let window = node.config.shutdown.drain_window;
        tracing::info!(sessions = node.sessions.lock().len(), ?window, "draining");
        lifecycle::drain(&node, window).await;
        node.session_tasks.close();
        if tokio::time::timeout_at(grace, node.session_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                sessions = node.sessions.lock().len(),
                "grace period over; dropping open sessions"
            );
        }
        stop.cancel();
        while let Some(r) = accept.join_next().await {
            failure = failure.or_else(|| task_failure(r, "listener"));
        }
        node.http_tasks.close();
        if tokio::time::timeout_at(grace, node.http_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("grace period over; dropping open HTTP connections");
        }
        let _ = tokio::time::timeout_at(grace, webhooks).await;
        background.abort_all();
        tracing::info!("drained");
        failure.map_or(Ok(()), Err)
    }
}

/// The error a finished listener or background task stands for, if any.
fn task_failure(
    joined: Result<Result<(), ServerError>, tokio::task::JoinError>,
    what: &'static str,
) -> Option<ServerError> {
    match joined {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(e) if e.is_cancelled() => None,
        Err(_) => Some(ServerError::TaskEnded(what)),
    }
}

/// Re-reads `[auth.jwt]` (secret, PEM files, JWKS file) and puts the keys in force for
/// the next handshake, `refresh` and subscription token. Sessions already open keep
/// running.
#[derive(Clone)]
pub struct KeyReloader(Arc<Node>);

impl KeyReloader {
    /// Reloads; on an error (unreadable file, bad key) the keys in force stay and the
    /// error says why.
    pub fn reload(&self) -> Result<(), herald_auth::KeyError> {
        self.0.reload_keys()
    }

    /// Re-reads `[tls]`'s certificate and key (a renewed certificate) for new
    /// connections; on an error the ones in force stay. Nothing to do without `[tls]`.
    pub fn reload_tls(&self) -> Result<(), String> {
        self.0.tls.as_ref().map_or(Ok(()), |t| t.reload())
    }
}
