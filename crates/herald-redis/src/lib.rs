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
//!   Redis 7+), so each channel lives on the master that owns its slot; the redis
//!   crate's cluster client follows slot moves and resubscribes after failovers.
//!
//! Message bodies are [`herald_protocol::envelope`]s, or raw payloads published by a
//! backend with `PUBLISH herald:news '{"title":"hi"}'`.
#![deny(missing_docs)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{stream, StreamExt};
use herald_broker::{BoxFuture, Broker, BrokerError, Inbound, Ready, ReadySetter};
use herald_metrics::{Metrics, Source};
use herald_protocol::envelope::{self, Origin};
use herald_protocol::{ChannelName, Publication};
use parking_lot::{Mutex, RwLock};
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// Redis settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:pass@]host:port[/db]`; with `cluster`, a comma-separated list of
    /// seed nodes. Empty: no Redis (the node runs on the embedded broker).
    pub url: String,
    /// Use Redis Cluster with sharded pub/sub (Redis 7+).
    pub cluster: bool,
    /// Prepended to every Redis channel Herald uses, so deployments can share a Redis.
    pub prefix: String,
    /// How often the connection is probed with `PING`.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// A probe, connect or (un)subscribe slower than this marks the connection dead.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Longest pause between reconnection attempts.
    #[serde(with = "humantime_serde")]
    pub max_reconnect_delay: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: String::new(),
            cluster: false,
            prefix: "herald:".into(),
            probe_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            max_reconnect_delay: Duration::from_millis(500),
        }
    }
}

/// Why the Redis broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum RedisBrokerError {
    /// The URL does not parse.
    #[error("invalid Redis URL {url:?}: {source}")]
    Url {
        /// The offending URL.
        url: String,
        /// What the redis crate said.
        source: redis::RedisError,
    },
    /// The prefix holds characters outside the channel-name set.
    #[error("redis.prefix {0:?} may only hold A-Z a-z 0-9 _ - . : @ /")]
    Prefix(String),
}

impl RedisConfig {
    /// Checks the settings without connecting (an empty URL is valid: Redis unused).
    pub fn validate(&self) -> Result<(), RedisBrokerError> {
        if !self.url.is_empty() {
            self.connection_infos()?;
        }
        if !self
            .prefix
            .bytes()
            .all(herald_protocol::channel::is_channel_byte)
        {
            return Err(RedisBrokerError::Prefix(self.prefix.clone()));
        }
        Ok(())
    }

    fn connection_infos(&self) -> Result<Vec<redis::ConnectionInfo>, RedisBrokerError> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                let info = u
                    .into_connection_info()
                    .map_err(|source| RedisBrokerError::Url {
                        url: u.to_owned(),
                        source,
                    })?;
                let settings = info
                    .redis_settings()
                    .clone()
                    .set_protocol(ProtocolVersion::RESP3);
                Ok(info.set_redis_settings(settings))
            })
            .collect::<Result<Vec<_>, _>>()
            .and_then(|v| {
                if v.is_empty() {
                    Err(RedisBrokerError::Url {
                        url: self.url.clone(),
                        source: redis::RedisError::from((
                            redis::ErrorKind::InvalidClientConfig,
                            "no URL given",
                        )),
                    })
                } else {
                    Ok(v)
                }
            })
    }
}

/// A connection of either kind; both are cheap handles to a shared driver task.
#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// A channel the hub wants, and the readiness its subscribers wait on.
struct Wanted {
    setter: ReadySetter,
    ready: Ready,
}

struct Inner {
    config: RedisConfig,
    infos: Vec<redis::ConnectionInfo>,
    inbound: Inbound,
    metrics: Metrics,
    /// What the hub wants served.
    desired: Mutex<HashMap<ChannelName, Wanted>>,
    /// Wakes the supervisor when `desired` changed.
    changed: Notify,
    /// The live connection, if any.
    conn: RwLock<Option<Conn>>,
    up: AtomicBool,
    /// Bumped per connection, so that a stale connection's disconnect push cannot
    /// tear down its successor.
    generation: Arc<AtomicU64>,
    /// The current connection reported a disconnect.
    lost: Arc<Notify>,
}

/// The Redis broker. Dropping it stops its supervisor task.
pub struct RedisBroker {
    inner: Arc<Inner>,
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
        metrics.broker_up.set(0);
        let inner = Arc::new(Inner {
            config,
            infos,
            inbound,
            metrics,
            desired: Mutex::default(),
            changed: Notify::new(),
            conn: RwLock::new(None),
            up: AtomicBool::new(false),
            generation: Arc::new(AtomicU64::new(0)),
            lost: Arc::new(Notify::new()),
        });
        let supervisor = tokio::spawn(supervise(inner.clone()));
        Ok(RedisBroker { inner, supervisor })
    }

    /// Waits up to `limit` for the first connection; returns whether it is up.
    pub async fn wait_up(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.is_up() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

impl Broker for RedisBroker {
    fn publish(&self, batch: Vec<Publication>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let conn = self.inner.conn.read().clone();
            let Some(conn) = conn.filter(|_| self.is_up()) else {
                return Err(BrokerError::Unavailable("Redis is not connected".into()));
            };
            let prefix = &self.inner.config.prefix;
            let limit = self.inner.config.timeout;
            let result = match conn {
                Conn::Single(mut c) => {
                    let mut pipe = redis::pipe();
                    for p in &batch {
                        pipe.cmd("PUBLISH")
                            .arg(format!("{prefix}{}", p.channel))
                            .arg(envelope::encode(p).as_ref())
                            .ignore();
                    }
                    tokio::time::timeout(limit, pipe.query_async::<()>(&mut c)).await
                }
                Conn::Cluster(mut c) => {
                    // Sequential: keeps per-channel order without relying on how the
                    // cluster client interleaves requests to different masters.
                    tokio::time::timeout(limit, async {
                        for p in &batch {
                            redis::cmd("SPUBLISH")
                                .arg(format!("{prefix}{}", p.channel))
                                .arg(envelope::encode(p).as_ref())
                                .query_async::<()>(&mut c)
                                .await?;
                        }
                        Ok(())
                    })
                    .await
                }
            };
            match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(BrokerError::Unavailable(format!("Redis: {e}"))),
                Err(_) => Err(BrokerError::Unavailable(
                    "Redis did not answer in time".into(),
                )),
            }
        })
    }

    fn subscribe(&self, channel: &ChannelName) -> Ready {
        let mut desired = self.inner.desired.lock();
        let w = desired.entry(channel.clone()).or_insert_with(|| {
            let (setter, ready) = Ready::pending();
            Wanted { setter, ready }
        });
        let ready = w.ready.clone();
        drop(desired);
        self.inner.changed.notify_one();
        ready
    }

    fn unsubscribe(&self, channel: &ChannelName) {
        self.inner.desired.lock().remove(channel);
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

/// Keeps a connection alive and its subscriptions equal to the desired set.
async fn supervise(inner: Arc<Inner>) {
    let mut delay = Duration::from_millis(25);
    let mut connected_before = false;
    loop {
        let generation = inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let conn =
            match tokio::time::timeout(inner.config.timeout, connect(&inner, generation)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "Redis connect failed");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(inner.config.max_reconnect_delay);
                    continue;
                }
                Err(_) => {
                    tracing::debug!("Redis connect timed out");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(inner.config.max_reconnect_delay);
                    continue;
                }
            };
        delay = Duration::from_millis(25);
        let mut active: HashSet<ChannelName> = HashSet::new();
        // Resubscribe everything before declaring the node usable again.
        if let Err(e) = sync(&inner, &conn, &mut active).await {
            tracing::warn!(error = %e, "Redis resubscribe failed");
            continue;
        }
        *inner.conn.write() = Some(conn.clone());
        inner.up.store(true, Ordering::Release);
        inner.metrics.broker_up.set(1);
        if connected_before {
            inner.metrics.broker_reconnects.inc();
            tracing::info!(channels = active.len(), "Redis connection restored");
        } else {
            tracing::info!(channels = active.len(), "Redis connected");
        }
        connected_before = true;

        let why = serve(&inner, &conn, &mut active).await;
        inner.up.store(false, Ordering::Release);
        inner.metrics.broker_up.set(0);
        *inner.conn.write() = None;
        tracing::warn!(reason = why, "Redis connection lost; reconnecting");
    }
}

/// Runs one connection until it fails; returns why.
async fn serve(inner: &Inner, conn: &Conn, active: &mut HashSet<ChannelName>) -> &'static str {
    let mut probe = tokio::time::interval(inner.config.probe_interval);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    probe.tick().await;
    loop {
        tokio::select! {
            _ = inner.lost.notified() => return "disconnected",
            _ = inner.changed.notified() => {
                if let Err(e) = sync(inner, conn, active).await {
                    tracing::warn!(error = %e, "Redis (un)subscribe failed");
                    return "subscribe failed";
                }
            }
            _ = probe.tick() => {
                let mut c = conn.clone();
                let ping = async {
                    match &mut c {
                        Conn::Single(c) => redis::cmd("PING").query_async::<Value>(c).await,
                        Conn::Cluster(c) => redis::cmd("PING").query_async::<Value>(c).await,
                    }
                };
                match tokio::time::timeout(inner.config.timeout, ping).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "Redis probe failed");
                        return "probe failed";
                    }
                    Err(_) => return "probe timed out",
                }
            }
        }
    }
}

async fn connect(inner: &Inner, generation: u64) -> redis::RedisResult<Conn> {
    let handler = push_handler(inner, generation);
    if inner.config.cluster {
        let client = redis::cluster::ClusterClientBuilder::new(inner.infos.clone())
            .use_protocol(ProtocolVersion::RESP3)
            .connection_timeout(inner.config.timeout)
            .response_timeout(inner.config.timeout)
            .push_sender(handler)
            .build()?;
        Ok(Conn::Cluster(client.get_async_connection().await?))
    } else {
        let client = redis::Client::open(inner.infos[0].clone())?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(inner.config.timeout))
            .set_response_timeout(Some(inner.config.timeout))
            .set_push_sender(handler);
        Ok(Conn::Single(
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await?,
        ))
    }
}

/// Called by the connection's reader for every push: hands messages to the hub without
/// waiting (dropping and counting when the hub is full) and reports disconnects.
fn push_handler(
    inner: &Inner,
    generation: u64,
) -> impl Fn(PushInfo) -> Result<(), std::convert::Infallible> + Send + Sync + 'static {
    // The handler outlives any borrow of `inner`; it takes what it needs.
    let inbound = inner.inbound.clone();
    let metrics = inner.metrics.clone();
    let prefix = inner.config.prefix.clone();
    let current = inner.generation.clone();
    let lost = inner.lost.clone();
    move |info: PushInfo| {
        match info.kind {
            PushKind::Message | PushKind::SMessage => {
                if let Some(p) = decode_push(&prefix, info.data) {
                    let (p, origin) = p;
                    if origin == Origin::Raw {
                        metrics.published(Source::External, 1);
                    }
                    let _ = inbound.try_send(p);
                }
            }
            PushKind::Disconnection if current.load(Ordering::Acquire) == generation => {
                lost.notify_one();
            }
            _ => {}
        }
        Ok(())
    }
}

fn decode_push(prefix: &str, data: Vec<Value>) -> Option<(Publication, Origin)> {
    let mut it = data.into_iter();
    let channel = bulk(it.next()?)?;
    let body = bulk(it.next()?)?;
    let name = channel.strip_prefix(prefix.as_bytes())?;
    let channel = ChannelName::from_bytes(name).ok()?;
    Some(envelope::decode(channel, body))
}

fn bulk(v: Value) -> Option<Bytes> {
    match v {
        Value::BulkString(b) => Some(Bytes::from(b)),
        Value::SimpleString(s) => Some(Bytes::from(s)),
        _ => None,
    }
}

/// Brings Redis's subscriptions in line with the desired set, in batches.
async fn sync(
    inner: &Inner,
    conn: &Conn,
    active: &mut HashSet<ChannelName>,
) -> redis::RedisResult<()> {
    const BATCH: usize = 512;
    let (to_sub, to_unsub): (Vec<ChannelName>, Vec<ChannelName>) = {
        let desired = inner.desired.lock();
        (
            desired
                .keys()
                .filter(|c| !active.contains(*c))
                .cloned()
                .collect(),
            active
                .iter()
                .filter(|c| !desired.contains_key(*c))
                .cloned()
                .collect(),
        )
    };
    let key = |c: &ChannelName| format!("{}{}", inner.config.prefix, c);
    for chunk in to_sub.chunks(BATCH) {
        interest(
            conn,
            chunk.iter().map(key).collect(),
            true,
            inner.config.timeout,
        )
        .await?;
        active.extend(chunk.iter().cloned());
    }
    for chunk in to_unsub.chunks(BATCH) {
        interest(
            conn,
            chunk.iter().map(key).collect(),
            false,
            inner.config.timeout,
        )
        .await?;
        for c in chunk {
            active.remove(c);
        }
    }
    // Wake everyone waiting on a channel that Redis now delivers, including channels
    // that were dropped and wanted again between two rounds.
    for (channel, wanted) in inner.desired.lock().iter() {
        if active.contains(channel) && !wanted.setter.is_set() {
            wanted.setter.set();
        }
    }
    Ok(())
}

/// Subscribes to (or unsubscribes from) `keys`, within `limit`.
async fn interest(
    conn: &Conn,
    keys: Vec<String>,
    subscribe: bool,
    limit: Duration,
) -> redis::RedisResult<()> {
    let r = match conn.clone() {
        Conn::Single(mut c) if subscribe => tokio::time::timeout(limit, c.subscribe(&keys)).await,
        Conn::Single(mut c) => tokio::time::timeout(limit, c.unsubscribe(&keys)).await,
        // A sharded (un)subscribe takes channels of one slot only: one command each,
        // many in flight.
        Conn::Cluster(c) => {
            tokio::time::timeout(
                limit,
                each(c, keys, move |mut c, k| async move {
                    if subscribe {
                        c.ssubscribe(k).await
                    } else {
                        c.sunsubscribe(k).await
                    }
                }),
            )
            .await
        }
    };
    r.unwrap_or_else(|_| {
        Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "subscription command timed out",
        )))
    })
}

async fn each<F, Fut>(conn: ClusterConnection, keys: Vec<String>, f: F) -> redis::RedisResult<()>
where
    F: Fn(ClusterConnection, String) -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<()>>,
{
    let results: Vec<redis::RedisResult<()>> = stream::iter(keys)
        .map(|k| f(conn.clone(), k))
        .buffer_unordered(64)
        .collect()
        .await;
    results.into_iter().collect()
}
