//! Herald's Redis broker: any node delivers to any subscriber.
//!
//! This is the only crate that knows Redis. It implements [`herald_broker::Broker`]:
//!
//! - **Interest-based routing.** A node subscribes to `PREFIX + channel` when the hub
//!   reports a channel's first local subscriber and unsubscribes after its last, so a
//!   node receives only what it serves. Interest changes are coalesced into a desired
//!   set; one supervisor task diffs it against what Redis has and sends one
//!   `SUBSCRIBE`/`UNSUBSCRIBE` with many channels per round, so churn costs few commands.
//! - **One connection per node** (standalone): a RESP3 multiplexed connection carries
//!   subscriptions, pipelined publishes and health probes. Pushed messages are handed
//!   straight from the connection's reader to the hub's bounded inbound queue
//!   ([`herald_broker::Inbound::try_send`]), which counts and drops when the hub cannot
//!   keep up; no unbounded queue sits in between (unlike the crate's RESP2 `PubSub`).
//! - **Outages.** While Redis is down, [`Broker::is_up`] is false (readiness fails,
//!   publishes are refused: the node never says 200 for a message Redis did not take),
//!   clients stay connected, and the supervisor reconnects with capped backoff and
//!   resubscribes every served channel at once. A connection that dies silently is
//!   caught by a periodic `PING` probe.
//! - **Redis Cluster** (`cluster = true`): sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`,
//!   Redis 7+), so each channel lives on the shard that owns its slot; the redis
//!   crate's cluster client holds one connection per cluster node and follows slot
//!   moves. Two cluster connections per node: one holds the subscriptions (the
//!   supervisor's), the other carries publishes and history reads.
//!   **One master lost is repaired in place**: when a node's connection drops (or a
//!   probe finds one silent), the supervisor subscribes every channel again after a
//!   short settle (a no-op where a channel is still served), retries the channels that
//!   fail with backoff, and counts the repair in `herald_broker_repairs_total` once
//!   the node's connections hold every channel (`CLIENT INFO` on every cluster node,
//!   summing `ssub=`; replicas count, as the crate subscribes on a replica while its
//!   master is unreachable). That check is also the cluster's probe, so subscriptions
//!   lost silently (a slot moved away) are repaired the same way. Then history
//!   channels catch up from their streams. The other masters' connections and
//!   subscriptions are not touched, and the node stays ready. A cluster of which no
//!   master answers is reconnected whole, as are subscriptions that stay short of the
//!   count for five rounds.
//!   Known limits of the redis crate (1.8.1, the newest 1.x): its slot refresh can
//!   deadlock with its own background reconnect of a node (the refresh waits for a
//!   lock a reconnect is queued on, and reconnects are not polled while a refresh
//!   runs); it then holds every command for good, while deliveries keep flowing.
//!   Commands for a lost master's slots trigger refreshes, which is why publishes and
//!   history reads have their own connection (a command connection on which no master
//!   answers a probe is replaced, subscriptions untouched) and why the supervisor waits
//!   a moment before subscribing again. If the subscription connection deadlocks, the
//!   first repair round fails and no master answers a `PING`: it is replaced whole,
//!   two `redis.timeout`s after the loss. While a master is down, publishes to its
//!   slots fail with 503 until a replica takes over or it returns (never accepted and
//!   lost).
//!   The cluster client also forwards pushes from its node connections to our handler
//!   through an unbounded channel inside the crate. Our handler never waits (it
//!   `try_send`s into the bounded inbound queue and counts drops), so that channel
//!   is drained as fast as the crate's forwarding task runs; it can only back up while
//!   that task waits to queue a node reconnect (a bounded queue of 100).
//!
//! Message bodies are [`herald_protocol::envelope`]s, or raw payloads published by a
//! backend with `PUBLISH herald:news '{"title":"hi"}'`.
//!
//! # Layout
//! The crate root holds [`RedisBroker`], the facade the gateway talks to (publish,
//! interest, up). Its modules, each using only those listed after it:
//! - `supervisor`: the task that owns the connections: connects, resubscribes
//!   everything before declaring itself up, probes, reconnects with capped backoff.
//! - `repair`: Redis Cluster: a lost master's channels subscribed again in place, checked
//!   with `CLIENT INFO` on every node.
//! - `sync`: the subscription diff (desired set vs Redis), sent as batched
//!   `(S)SUBSCRIBE`/`(S)UNSUBSCRIBE`.
//! - `connect`: opening and probing connections; the `redis.timeout` deadline.
//! - `push`: decoding what Redis pushes and handing it to the hub's inbound queue.
//! - `webhooks`: channel occupancy and the webhook event queue, under one hash tag.
//! - `presence`: presence (members, expiry, counts) in three keys per channel.
//! - `history`: reading a history channel's position and publications.
//! - `publish`: publishing a batch (pipelined, scripts reloaded where Redis lost them),
//!   and [`BackendPublisher`] for backends (and the benchmark) publishing through Redis.
//! - `scripts`: the publish and history scripts, the keys they use, how a request
//!   becomes a command and a reply an outcome.
//! - `shared`: the state the facade and the supervisor share (desired channels, the
//!   live connection, up/down).
//! - `config`: [`RedisConfig`] and [`RedisBrokerError`].
#![deny(missing_docs)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use herald_broker::{
    BoxFuture, Broker, BrokerError, HistoryPage, HistoryPolicy, Inbound, Occupancy, PresenceChange,
    PresencePage, PresenceStats, PublishRequest, Published, Queued, Ready, WebhookEvent,
    WebhookQueue,
};
use herald_metrics::Metrics;
use herald_protocol::presence::Member;
use herald_protocol::ChannelName;
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

mod config;
mod connect;
mod history;
mod presence;
mod publish;
mod push;
mod repair;
mod scripts;
mod shared;
mod supervisor;
mod sync;
mod webhooks;

pub use config::{redacted, RedisBrokerError, RedisConfig};
pub use publish::BackendPublisher;
pub use scripts::{HISTORY_SCRIPT, PUBLISH_SCRIPT};

use shared::{Conn, Inner, Wanted};

/// The Redis broker. Dropping it stops its supervisor task.
pub struct RedisBroker {
    /// What the broker and its supervisor share.
    inner: Arc<Inner>,
    /// The publish and history scripts, hashed once.
    scripts: scripts::Scripts,
    /// The task that owns the connections; aborted on drop.
    supervisor: tokio::task::JoinHandle<()>,
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.supervisor.abort();
    }
}

impl RedisBroker {
    /// Starts the broker: validates the settings and spawns the supervisor, which
    /// connects (and keeps reconnecting) in the background. The node may start while
    /// Redis is down; it is simply not ready until the first connection succeeds.
    pub fn start(
        config: RedisConfig,
        inbound: Inbound,
        metrics: Metrics,
    ) -> Result<Self, RedisBrokerError> {
        let infos = config.connection_infos()?;
        config.validate()?;
        let certs = config.certificates()?;
        let sentinel = if config.sentinel_master.is_empty() {
            None
        } else {
            // The master is reached as the URLs say (RESP3, their user and password).
            let master = redis::sentinel::SentinelNodeConnectionInfo::default()
                .set_redis_connection_info(infos[0].redis_settings().clone());
            let client = redis::sentinel::SentinelClient::build(
                infos.clone(),
                config.sentinel_master.clone(),
                Some(master),
                redis::sentinel::SentinelServerType::Master,
            )
            .map_err(|source| RedisBrokerError::Url {
                url: redacted(&config.url),
                source,
            })?;
            Some(tokio::sync::Mutex::new(client))
        };
        metrics.broker_up.set(0);
        let inner = Arc::new(Inner {
            config,
            infos,
            certs,
            sentinel,
            inbound,
            metrics,
            desired: Mutex::default(),
            changed: Notify::new(),
            conn: RwLock::new(None),
            up: AtomicBool::new(false),
            generation: Arc::new(AtomicU64::new(0)),
            repairing: AtomicBool::new(false),
            webhook_queue_seen: AtomicBool::new(false),
            lost: Arc::new(Notify::new()),
            lost_generation: Arc::new(AtomicU64::new(0)),
        });
        let supervisor = tokio::spawn(supervisor::supervise(inner.clone()));
        Ok(RedisBroker {
            inner,
            scripts: scripts::Scripts::new(),
            supervisor,
        })
    }
}

impl RedisBroker {
    fn target(&self, conn: Conn) -> publish::Redis<'_> {
        publish::Redis {
            conn,
            scripts: &self.scripts,
            prefix: &self.inner.config.prefix,
            timeout: self.inner.config.timeout,
        }
    }

    /// The connection, while Redis is up.
    fn live(&self) -> Result<Conn, BrokerError> {
        let conn = self.inner.conn.read().clone();
        conn.filter(|_| self.is_up())
            .ok_or_else(|| BrokerError::Unavailable("Redis is not connected".into()))
    }
}

impl Broker for RedisBroker {
    fn publish(
        &self,
        batch: Vec<PublishRequest>,
    ) -> BoxFuture<'_, Result<Vec<Published>, BrokerError>> {
        Box::pin(async move {
            let conn = self.live()?;
            let started = std::time::Instant::now();
            let r = publish::publish(self.target(conn), &batch).await;
            if batch.iter().any(|r| r.history.is_some()) {
                self.inner
                    .metrics
                    .history_script_seconds
                    .observe(started.elapsed().as_secs_f64());
            }
            r
        })
    }

    fn history(
        &self,
        channel: &ChannelName,
        policy: HistoryPolicy,
        since: u64,
        limit: usize,
        only_in: Option<herald_protocol::Epoch>,
    ) -> BoxFuture<'_, Result<HistoryPage, BrokerError>> {
        let channel = channel.clone();
        Box::pin(async move {
            let conn = self.live()?;
            history::history(self.target(conn), &channel, policy, since, limit, only_in).await
        })
    }

    fn presence_add(
        &self,
        channel: &ChannelName,
        members: Vec<Member>,
        ttl: std::time::Duration,
    ) -> BoxFuture<'_, Result<Vec<PresenceChange>, BrokerError>> {
        let channel = channel.clone();
        Box::pin(
            async move { presence::add(self.target(self.live()?), &channel, members, ttl).await },
        )
    }

    fn presence_remove(
        &self,
        channel: &ChannelName,
        members: Vec<Member>,
    ) -> BoxFuture<'_, Result<Vec<PresenceChange>, BrokerError>> {
        let channel = channel.clone();
        Box::pin(
            async move { presence::remove(self.target(self.live()?), &channel, members).await },
        )
    }

    fn presence_expire(
        &self,
        channel: &ChannelName,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<PresenceChange>, BrokerError>> {
        let channel = channel.clone();
        Box::pin(async move { presence::expire(self.target(self.live()?), &channel, limit).await })
    }

    fn presence_page(
        &self,
        channel: &ChannelName,
        cursor: Option<String>,
        limit: usize,
    ) -> BoxFuture<'_, Result<PresencePage, BrokerError>> {
        let channel = channel.clone();
        Box::pin(
            async move { presence::page(self.target(self.live()?), &channel, cursor, limit).await },
        )
    }

    fn presence_stats(
        &self,
        channel: &ChannelName,
    ) -> BoxFuture<'_, Result<PresenceStats, BrokerError>> {
        let channel = channel.clone();
        Box::pin(async move { presence::stats(self.target(self.live()?), &channel).await })
    }

    fn occupancy(
        &self,
        node: &str,
        changes: Vec<(ChannelName, bool)>,
        ttl: std::time::Duration,
        queue: WebhookQueue,
    ) -> BoxFuture<'_, Result<Occupancy, BrokerError>> {
        let node = node.to_owned();
        Box::pin(async move {
            webhooks::occupancy(self.target(self.live()?), &node, changes, ttl, queue).await
        })
    }

    fn occupancy_refresh(
        &self,
        node: &str,
        channels: Vec<ChannelName>,
        ttl: std::time::Duration,
        queue: WebhookQueue,
    ) -> BoxFuture<'_, Result<Occupancy, BrokerError>> {
        let node = node.to_owned();
        Box::pin(async move {
            webhooks::refresh(self.target(self.live()?), &node, channels, ttl, queue).await
        })
    }

    fn webhook_queue(
        &self,
        events: Vec<String>,
        queue: WebhookQueue,
    ) -> BoxFuture<'_, Result<Queued, BrokerError>> {
        Box::pin(async move { webhooks::enqueue(self.target(self.live()?), events, queue).await })
    }

    fn webhook_take(
        &self,
        consumer: &str,
        max: usize,
        queue: WebhookQueue,
    ) -> BoxFuture<'_, Result<Option<Vec<WebhookEvent>>, BrokerError>> {
        let consumer = consumer.to_owned();
        Box::pin(async move {
            let (taken, created) =
                webhooks::take(self.target(self.live()?), &consumer, max, queue).await?;
            let seen = self.inner.webhook_queue_seen.swap(true, Ordering::Relaxed);
            if created && seen {
                // How many is unknown: said, and counted once.
                tracing::warn!(
                        "Redis lost the webhook queue (restarted without its data): its undelivered events are gone; reconcile the backend (GET /api/channels)"
                    );
                self.inner
                    .metrics
                    .webhook_events
                    .with_label_values(&["unknown", "lost"])
                    .inc();
            }
            Ok(taken)
        })
    }

    fn webhook_done(&self, ids: Vec<String>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move { webhooks::done(self.target(self.live()?), ids).await })
    }

    fn subscribe(&self, channel: &ChannelName) -> Ready {
        let mut desired = self.inner.desired.lock();
        desired.changed.insert(channel.clone());
        let w = desired.wanted.entry(channel.clone()).or_insert_with(|| {
            let (setter, ready) = Ready::pending();
            Wanted { setter, ready }
        });
        let ready = w.ready.clone();
        drop(desired);
        self.inner.changed.notify_one();
        ready
    }

    fn unsubscribe(&self, channel: &ChannelName) {
        let mut desired = self.inner.desired.lock();
        desired.wanted.remove(channel);
        desired.changed.insert(channel.clone());
        drop(desired);
        self.inner.changed.notify_one();
    }

    fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Acquire)
    }

    fn kind(&self) -> &'static str {
        if self.inner.config.cluster {
            "redis-cluster"
        } else {
            "redis"
        }
    }
}
