//! [`Node`]: the state every task of one gateway shares.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use herald_broker::{Broker, BrokerError, Idempotency, PublishRequest, Published};
use herald_metrics::{Metrics, Source};
use herald_protocol::{close, Publication};
use parking_lot::Mutex;
use tokio_util::task::TaskTracker;

use crate::config::GatewayConfig;
use crate::handle::{ConnId, SessionEnv, SessionHandle};
use crate::hub::Hub;

/// State shared by every task of one gateway.
pub(crate) struct Node {
    /// Every limit and rule, fixed for the node's life.
    pub(crate) config: GatewayConfig,
    /// Announced in welcome frames and logs; never empty.
    pub(crate) node_id: String,
    /// The node id and a random part new with every start (`web-1-3fa2b1c0`): what
    /// connection ids begin with, so that they are never reused across restarts.
    pub(crate) instance: String,
    /// Channels and their local subscribers; fan-out.
    pub(crate) hub: Arc<Hub>,
    /// Where publications go (every path: API, client publishes, SSE publishes), and
    /// whose health readiness reports. The hub holds it too, for interest and history
    /// reads; publishing never passes through the hub.
    pub(crate) broker: Arc<dyn Broker>,
    /// Everything the node counts.
    pub(crate) metrics: Metrics,
    /// What `/metrics` serves; `metrics` is registered in it.
    pub(crate) registry: herald_metrics::prometheus::Registry,
    /// The cluster as the control plane sees it.
    pub(crate) cluster: crate::cluster::Cluster,
    /// This node's presence members.
    pub(crate) presence: crate::cluster::LocalMembers,
    /// Calls to the application's backend, when a hook is configured.
    pub(crate) hooks: Option<Arc<herald_hooks::Hooks>>,
    /// The webhook sender (`[webhooks]`), when webhooks are on.
    pub(crate) webhooks: Option<Arc<herald_hooks::Webhooks>>,
    /// Open sessions, so that the drain and the heartbeat sweeper can reach each one.
    pub(crate) sessions: Mutex<HashMap<ConnId, Arc<SessionHandle>>>,
    /// Connection slots taken (upgrades in progress plus open sessions); checked
    /// against `limits.max_connections` before an upgrade is accepted.
    n_slots: AtomicUsize,
    /// Sessions per client address and per user, for the per-client limits.
    per_client: Mutex<PerClient>,
    /// The next session's id (unique per node, never reused).
    next_conn: AtomicU64,
    /// Set when shutdown begins: readiness fails and upgrades are refused.
    draining: AtomicBool,
    /// The node's clock origin for [`Node::now_ms`].
    started: Instant,
    /// Shared by every session's handle.
    pub(crate) session_env: Arc<SessionEnv>,
    /// Verifies connection tokens (`None`: no key configured, tokens are ignored).
    /// Swapped whole by a key reload (SIGHUP); each check takes the current one.
    verifier: parking_lot::RwLock<Option<Arc<herald_auth::Verifier>>>,
    /// `[tls]`: the public listener's keys, when it speaks TLS.
    pub(crate) tls: Option<crate::tls::TlsKeys>,
    /// The backends' API keys (hashed once, here).
    pub(crate) api_keys: herald_auth::ApiKeys,
    /// `auth.metrics_key`, hashed (empty when unset).
    pub(crate) metrics_key: herald_auth::ApiKeys,
    /// Every session's reader and writer tasks: shutdown waits for them to end.
    pub(crate) session_tasks: TaskTracker,
    /// Every HTTP connection task: shut down gracefully after the sessions.
    pub(crate) http_tasks: TaskTracker,
    /// The publish rate of clients without a session (`POST /sse/publish`).
    sessionless_rate: KeyedRateLimit,
    /// Sessionless publishes checked, so that quiet clients' entries are swept out of
    /// `sessionless_rate` every so often.
    sessionless_checks: AtomicU64,
}

/// Publishes per user (or, for anonymous clients, per address; IPv6 by
/// `limits.ipv6_prefix`) for clients without a session: the same
/// `limits.messages_per_second` and `message_burst` a WebSocket session gets, so that
/// opening no session does not lift the limit.
type KeyedRateLimit = governor::RateLimiter<
    String,
    governor::state::keyed::HashMapStateStore<String>,
    governor::clock::MonotonicClock,
>;

/// `per_second` sustained, `burst` at once (GCRA).
pub(crate) fn publish_quota(per_second: f64, burst: u32) -> governor::Quota {
    // Validated positive and finite; a rate so high that its period rounds to zero
    // is as good as no limit.
    let period = std::time::Duration::from_secs_f64(1.0 / per_second)
        .max(std::time::Duration::from_nanos(1));
    let burst = std::num::NonZeroU32::new(burst.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    governor::Quota::with_period(period)
        .unwrap_or_else(|| governor::Quota::per_second(std::num::NonZeroU32::MAX))
        .allow_burst(burst)
}

/// How many sessionless publishes pass between two sweeps of the quiet clients'
/// rate-limit entries.
const SWEEP_RATE_EVERY: u64 = 1024;

impl Node {
    pub(crate) fn new(
        config: GatewayConfig,
        loaded: Loaded,
        node_id: String,
        broker: Arc<dyn Broker>,
        metrics: Metrics,
        registry: herald_metrics::prometheus::Registry,
    ) -> Self {
        let Loaded {
            verifier,
            tls,
            hooks,
            webhooks,
        } = loaded;
        let session_tasks = TaskTracker::new();
        let session_env = Arc::new(SessionEnv {
            metrics: metrics.clone(),
            close_timeout: config.limits.close_timeout,
            write_timeout: config.websocket.write_timeout,
            linger: config.websocket.writer_linger,
            max_queued_bytes: config.limits.outbound_queue_bytes,
            start_writer: crate::writer::start,
            tasks: session_tasks.clone(),
        });
        Node {
            api_keys: herald_auth::ApiKeys::new(
                config.auth.api_key.as_deref(),
                &config.auth.api_keys,
            ),
            metrics_key: herald_auth::ApiKeys::new(config.auth.metrics_key.as_deref(), &[]),
            verifier: parking_lot::RwLock::new(verifier.map(Arc::new)),
            tls,
            hub: Arc::new(Hub::new(
                broker.clone(),
                metrics.clone(),
                config.limits.max_recovery_buffer,
                config.limits.outbound_queue_bytes / 2,
                crate::history::DeltaLimits {
                    max_bytes: config.limits.max_delta_bytes,
                    max_time: config.limits.max_delta_time,
                },
            )),
            broker,
            instance: format!("{node_id}-{:08x}", fastrand::u32(..)),
            node_id,
            metrics,
            registry,
            cluster: crate::cluster::Cluster::new(config.control.heartbeat_interval),
            presence: Default::default(),
            hooks: hooks.map(Arc::new),
            webhooks: webhooks.map(Arc::new),
            sessions: Mutex::default(),
            n_slots: AtomicUsize::new(0),
            per_client: Mutex::default(),
            next_conn: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            started: Instant::now(),
            session_env,
            session_tasks,
            http_tasks: TaskTracker::new(),
            sessionless_rate: governor::RateLimiter::hashmap_with_clock(
                publish_quota(
                    config.limits.messages_per_second,
                    config.limits.message_burst,
                ),
                governor::clock::MonotonicClock,
            ),
            sessionless_checks: AtomicU64::new(0),
            config,
        }
    }

    /// The token verifier in force (`None`: no key configured).
    pub(crate) fn verifier(&self) -> Option<Arc<herald_auth::Verifier>> {
        self.verifier.read().clone()
    }

    /// Re-reads the `[auth.jwt]` keys (files included) and puts them in force; on an
    /// error the keys in force stay.
    pub(crate) fn reload_keys(&self) -> Result<(), herald_auth::KeyError> {
        let fresh = herald_auth::Verifier::new(&self.config.auth.jwt)?;
        *self.verifier.write() = fresh.map(Arc::new);
        Ok(())
    }

    /// Publishes a message between nodes (control plane, presence) on an internal
    /// channel: the broker's path, not counted as a user publication.
    pub(crate) async fn tell(
        &self,
        to: herald_protocol::ChannelName,
        msg: &herald_protocol::control::ControlMessage,
    ) -> Result<(), BrokerError> {
        let p = Publication::now(to, herald_protocol::Payload::Json(msg.to_json().into()));
        self.broker
            .publish(vec![PublishRequest::plain(p)])
            .await
            .map(|_| ())
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub(crate) fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Milliseconds since the gateway started (monotonic); sessions store times in
    /// this unit in atomics instead of holding timers.
    pub(crate) fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub(crate) fn drain_code(&self) -> u16 {
        if self.config.shutdown.restart {
            close::SERVICE_RESTART
        } else {
            close::GOING_AWAY
        }
    }

    pub(crate) fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Takes a connection slot for a client at `ip`, or says which limit is reached:
    /// `limits.max_connections`, `max_connections_per_ip` (the user's,
    /// `max_connections_per_user`, is counted once it is known: [`Slot::count_user`]).
    /// Everything taken is given back when the returned guard drops (upgrade failed or
    /// session over).
    pub(crate) fn take_slot(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, SlotRefused> {
        let max = self.config.limits.max_connections;
        if self.n_slots.fetch_add(1, Ordering::AcqRel) >= max {
            self.n_slots.fetch_sub(1, Ordering::AcqRel);
            return Err(SlotRefused::Node);
        }
        // From here the guard owns what was taken, so every refusal gives it back.
        let mut slot = Slot {
            node: self.clone(),
            ip: None,
            user: None,
        };
        let limits = &self.config.limits;
        if limits.max_connections_per_ip > 0 {
            let mut per = self.per_client.lock();
            let ip = client_key(ip, limits.ipv6_prefix);
            let n = per.ip.entry(ip).or_default();
            if *n >= limits.max_connections_per_ip {
                return Err(SlotRefused::PerIp);
            }
            *n += 1;
            slot.ip = Some(ip);
        }
        Ok(slot)
    }

    /// Hands publications to the broker, each with its channel's history policy and
    /// its idempotency key (if any), and counts what was newly published.
    pub(crate) async fn publish(
        &self,
        batch: Vec<Outgoing>,
        source: Source,
    ) -> Result<Vec<Published>, BrokerError> {
        let channels = &self.config.channels;
        let window = channels.idempotency_window;
        // Keys live in one namespace per source, so that no client can claim a key a
        // backend will use (its later publish would be answered `duplicate` and lost).
        // Client keys come here already scoped to their user (see `client_key`).
        let namespace = match source {
            Source::Http => "api",
            Source::Client | Source::External => "client",
        };
        let requests = batch
            .into_iter()
            .map(
                |Outgoing {
                     publication,
                     key,
                     skip_history,
                 }| PublishRequest {
                    history: channels
                        .history(publication.channel.as_str())
                        .filter(|_| !skip_history),
                    idempotency: key.map(|key| Idempotency {
                        key: format!("{namespace}:{key}"),
                        window,
                    }),
                    publication,
                },
            )
            .collect();
        let started = Instant::now();
        // A broker that is down refuses at once (the trait's contract): no check here.
        let results = match self.broker.publish(requests).await {
            Ok(results) => results,
            Err(BrokerError::Partial(results)) => {
                let new = results.iter().flatten().filter(|r| !r.duplicate).count();
                self.metrics.published(source, new as u64);
                return Err(BrokerError::Partial(results));
            }
            Err(e) => return Err(e),
        };
        self.metrics
            .broker_publish_seconds
            .observe(started.elapsed().as_secs_f64());
        let new = results.iter().filter(|r| !r.duplicate).count();
        self.metrics.published(source, new as u64);
        Ok(results)
    }

    /// How the webhook queue is bounded and shared (`[webhooks]`).
    pub(crate) fn webhook_queue(&self) -> herald_broker::WebhookQueue {
        let c = &self.config.webhooks;
        herald_broker::WebhookQueue {
            max: c.max_queue,
            lease: c.takeover_after,
        }
    }

    /// Counts webhook events of `event` this node queued (and dropped: queue full).
    pub(crate) fn webhooks_queued(&self, event: &str, q: herald_broker::Queued) {
        let m = &self.metrics.webhook_events;
        m.with_label_values(&[event, "queued"]).inc_by(q.queued);
        m.with_label_values(&[event, "dropped"]).inc_by(q.dropped);
        if q.dropped > 0 {
            tracing::warn!(
                event,
                dropped = q.dropped,
                "webhook queue full: events dropped"
            );
        }
    }

    /// Whether the connect hook forwards the client's cookies (cookie sessions).
    pub(crate) fn forwards_cookies(&self) -> bool {
        self.config.hooks.forwards_cookies() && !self.config.auth.allowed_origins.is_empty()
    }

    /// Why `p` cannot be published, if it cannot: a publication whose frame would not
    /// fit a subscriber's whole queue (`limits.outbound_queue_bytes`) would close every
    /// subscriber of its channel as a slow consumer, and stay in history to do it again
    /// to every resume across it. Every publish path asks this first.
    pub(crate) fn too_large(&self, p: &Publication) -> Option<String> {
        // The frame around the payload: op, channel, offset, and its queue slot.
        const FRAME: usize = 128 + crate::handle::ITEM_OVERHEAD;
        let bytes = p.payload.len() + p.channel.as_str().len() + FRAME;
        let max = self.config.limits.outbound_queue_bytes;
        (bytes > max).then(|| {
            format!(
                "{} bytes: larger than a subscriber's whole queue can hold \
                 (limits.outbound_queue_bytes = {max})",
                p.payload.len()
            )
        })
    }

    /// A client's idempotency key, scoped to the client's user (anonymous clients share
    /// one scope): one user cannot answer another's retries.
    pub(crate) fn client_key(user: Option<&str>, key: String) -> String {
        format!("{}:{key}", user.unwrap_or(""))
    }

    /// Whether a publish without a session, from `user` or (anonymous) from `ip`, is
    /// within `limits.messages_per_second` / `message_burst`.
    pub(crate) fn sessionless_publish_allowed(&self, user: Option<&str>, ip: IpAddr) -> bool {
        let key = match user {
            Some(u) => format!("u:{u}"),
            None => format!("ip:{}", client_key(ip, self.config.limits.ipv6_prefix)),
        };
        let allowed = self.sessionless_rate.check_key(&key).is_ok();
        // Entries of clients that went quiet look like fresh ones: dropping them every
        // so often keeps the map as large as the set of clients publishing now.
        if self
            .sessionless_checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(SWEEP_RATE_EVERY)
        {
            self.sessionless_rate.retain_recent();
            self.sessionless_rate.shrink_to_fit();
        }
        allowed
    }

    pub(crate) fn is_ready(&self) -> Result<(), &'static str> {
        if self.is_draining() {
            Err("draining")
        } else if !self.broker.is_up() {
            Err("broker_down")
        } else {
            Ok(())
        }
    }

    /// A snapshot of the open sessions (the lock is not held while they are visited).
    pub(crate) fn session_handles(&self) -> Vec<Arc<SessionHandle>> {
        self.sessions.lock().values().cloned().collect()
    }
}

/// What the per-address limit counts `ip` as: itself (IPv4), or its network of
/// `prefix` bits (IPv6).
fn client_key(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            ipnet::Ipv6Net::new(v6, prefix.min(128)).map_or(ip, |n| IpAddr::V6(n.network()))
        }
    }
}

/// Which connection limit refused a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotRefused {
    /// `limits.max_connections`.
    Node,
    /// `limits.max_connections_per_ip`.
    PerIp,
    /// `limits.max_connections_per_user`.
    PerUser,
}

/// Connections held per client address and per user (only counted when the matching
/// limit is set).
#[derive(Default)]
pub(crate) struct PerClient {
    /// Sessions per client address (when the per-address limit is set).
    ip: HashMap<IpAddr, usize>,
    /// Sessions per user (when the per-user limit is set).
    user: HashMap<Arc<str>, usize>,
}

/// A taken connection slot; dropping it gives the slot back (and the client's and
/// user's counts, if they were taken).
/// What the gateway read and built from its configuration before the node: keys,
/// certificates and the clients for the application's backend (each `None` when not
/// configured).
pub(crate) struct Loaded {
    /// The token verifier (`[auth.jwt]`).
    pub(crate) verifier: Option<herald_auth::Verifier>,
    /// The public listener's TLS keys (`[tls]`).
    pub(crate) tls: Option<crate::tls::TlsKeys>,
    /// `[hooks]`.
    pub(crate) hooks: Option<herald_hooks::Hooks>,
    /// `[webhooks]`.
    pub(crate) webhooks: Option<herald_hooks::Webhooks>,
}

/// One publication as a publish path hands it to [`Node::publish`].
pub(crate) struct Outgoing {
    /// What to publish.
    pub(crate) publication: Publication,
    /// The caller's idempotency key, if any.
    pub(crate) key: Option<String>,
    /// Not stored even on a history channel (the publish hook's `skip_history`): it is
    /// delivered live, without an offset, and no resume replays it.
    pub(crate) skip_history: bool,
}

impl Outgoing {
    /// `publication`, stored as its channel's rule says, deduplicated by `key`.
    pub(crate) fn new(publication: Publication, key: Option<String>) -> Self {
        Outgoing {
            publication,
            key,
            skip_history: false,
        }
    }
}

pub(crate) struct Slot {
    /// Where the slot is given back.
    node: Arc<Node>,
    /// The address whose count this slot holds, if counted.
    ip: Option<IpAddr>,
    /// The user whose count this slot holds, if counted.
    user: Option<Arc<str>>,
}

impl Slot {
    /// Counts the slot against `user` too (`limits.max_connections_per_user`): for a
    /// client whose user is known only after the slot was taken (the connect hook).
    /// On refusal the slot still holds (and gives back on drop) what it held.
    pub(crate) fn count_user(&mut self, user: &str) -> Result<(), SlotRefused> {
        let max = self.node.config.limits.max_connections_per_user;
        if max == 0 || self.user.is_some() {
            return Ok(());
        }
        let mut per = self.node.per_client.lock();
        let user: Arc<str> = Arc::from(user);
        let n = per.user.entry(user.clone()).or_default();
        if *n >= max {
            return Err(SlotRefused::PerUser);
        }
        *n += 1;
        self.user = Some(user);
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.node.n_slots.fetch_sub(1, Ordering::AcqRel);
        if self.ip.is_none() && self.user.is_none() {
            return;
        }
        let mut per = self.node.per_client.lock();
        fn give_back<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
            if let Some(n) = map.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(key);
                }
            }
        }
        if let Some(ip) = &self.ip {
            give_back(&mut per.ip, ip);
        }
        if let Some(user) = &self.user {
            give_back(&mut per.user, user);
        }
    }
}
