//! The supervisor: one task per broker that owns the Redis connections (in cluster
//! mode one for the subscriptions and one for commands), keeps the subscriptions
//! equal to the desired set, probes the connections and reconnects.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{stream, StreamExt};
use herald_protocol::ChannelName;
use redis::cluster_async::ClusterConnection;
use redis::{ProtocolVersion, Value};

use crate::push::push_handler;
use crate::shared::{Conn, Inner};

/// Keeps a connection alive and its subscriptions equal to the desired set.
pub(crate) async fn supervise(inner: Arc<Inner>) {
    let mut delay = Duration::from_millis(25);
    let mut connected_before = false;
    loop {
        let generation = inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let conn = match within(&inner, "connect", connect(&inner, generation)).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "Redis connect failed");
                back_off(&inner, &mut delay).await;
                continue;
            }
        };
        let mut active: HashSet<ChannelName> = HashSet::new();
        let mut repair = Repair::new();
        // Resubscribe everything before declaring the node usable again.
        if let Err(e) = sync(&inner, &conn, &mut active, Pass::NewConnection).await {
            tracing::warn!(error = %e, "Redis resubscribe failed");
            // A cluster with one master down still serves the others' channels; the
            // repair retries the rest.
            if matches!(conn, Conn::Cluster(_)) && ping(&inner, &conn).await.is_ok() {
                repair.later(&inner);
            } else {
                back_off(&inner, &mut delay).await;
                continue;
            }
        }
        let commands = match &conn {
            Conn::Single(_) => conn.clone(),
            Conn::Cluster(_) => match connect_commands(&inner).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "Redis Cluster command connection failed");
                    back_off(&inner, &mut delay).await;
                    continue;
                }
            },
        };
        // Only a connection that resubscribed counts as recovered: a server that
        // accepts connections but fails the resubscribe keeps the backoff growing.
        delay = Duration::from_millis(25);
        *inner.conn.write() = Some(commands);
        inner.up.store(true, Ordering::Release);
        inner.metrics.broker_up.set(1);
        if connected_before {
            inner.metrics.broker_reconnects.inc();
            tracing::info!(channels = active.len(), "Redis connection restored");
            // Publications may have been missed while the subscriptions were down: the
            // hub catches its history channels up from their streams.
            if inner.inbound.resubscribed().await.is_err() {
                return;
            }
        } else {
            tracing::info!(channels = active.len(), "Redis connected");
        }
        connected_before = true;

        let why = serve(&inner, &conn, &mut active, repair, generation).await;
        inner.up.store(false, Ordering::Release);
        inner.metrics.broker_up.set(0);
        *inner.conn.write() = None;
        // Nothing is delivered until the resubscribe: a new subscriber must wait (or
        // fail with `unavailable`) rather than be told deliveries flow.
        for wanted in inner.desired.lock().wanted.values() {
            wanted.setter.unset();
        }
        tracing::warn!(reason = why, "Redis connection lost; reconnecting");
    }
}

/// Waits `delay` before the next connection attempt and doubles it, up to
/// `redis.max_reconnect_delay`.
async fn back_off(inner: &Inner, delay: &mut Duration) {
    tokio::time::sleep(*delay).await;
    *delay = (*delay * 2).min(inner.config.max_reconnect_delay);
}

/// `work` within `redis.timeout`; running out of time is an I/O error naming `what`.
async fn within<T>(
    inner: &Inner,
    what: &'static str,
    work: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    tokio::time::timeout(inner.config.timeout, work)
        .await
        .unwrap_or_else(|_| Err(timed_out(what)))
}

/// Runs one connection until it fails; returns why.
///
/// In cluster mode a connection is one per master, held by the redis crate, which
/// reconnects a master on its own. A lost master therefore does not end the cluster
/// connection here: the channels are subscribed again (the others' connections and
/// subscriptions untouched) until every one is confirmed, and only a cluster of which
/// no master answers is given up as a whole.
async fn serve(
    inner: &Inner,
    conn: &Conn,
    active: &mut HashSet<ChannelName>,
    mut repair: Repair,
    generation: u64,
) -> &'static str {
    let cluster = matches!(conn, Conn::Cluster(_));
    let mut probe = tokio::time::interval(inner.config.probe_interval);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    probe.tick().await;
    loop {
        tokio::select! {
            _ = inner.lost.notified() => {
                // A report from an earlier connection (it raced with the reconnect that
                // replaced it) is stale: this one is fine.
                if inner.lost_generation.load(Ordering::Acquire) == generation {
                    if !cluster {
                        return "disconnected";
                    }
                    tracing::warn!("a Redis Cluster master's connection was lost; subscribing again");
                    repair.everything(inner);
                }
            }
            _ = inner.changed.notified() => {
                if let Err(e) = sync(inner, conn, active, Pass::Changes).await {
                    tracing::warn!(error = %e, "Redis (un)subscribe failed");
                    if !cluster {
                        return "subscribe failed";
                    }
                    // The channels that failed are wanted again; the repair retries them.
                    repair.later(inner);
                }
            }
            _ = probe.tick() => {
                if cluster {
                    commands_alive(inner).await;
                }
                if repair.pending() {
                    continue;
                }
                let checked = match conn {
                    Conn::Single(_) => ping(inner, conn).await,
                    // Every master answers, and together they hold every channel.
                    Conn::Cluster(c) => shard_subscriptions(inner, c).await.map(|held| {
                        if held != active.len() {
                            tracing::warn!(held, expected = active.len(), "Redis Cluster subscriptions differ from the node's; subscribing again");
                            repair.everything(inner);
                        }
                    }),
                };
                if let Err(e) = checked {
                    if cluster && ping(inner, conn).await.is_ok() {
                        tracing::warn!(error = %e, "a Redis Cluster master does not answer; subscribing again");
                        repair.everything(inner);
                    } else {
                        tracing::debug!(error = %e, "Redis probe failed");
                        return "probe failed";
                    }
                }
            }
            _ = repair.due(), if repair.pending() => {
                match repair.run(inner, conn, active).await {
                    Ok(()) => {
                        inner.metrics.broker_repairs.inc();
                        tracing::info!(channels = active.len(), "Redis Cluster subscriptions restored");
                        // As after a reconnect: publications may have been missed.
                        if inner.inbound.resubscribed().await.is_err() {
                            return "stopped";
                        }
                    }
                    Err(e) if repair.diverged >= Repair::MAX_DIVERGED => {
                        tracing::warn!(error = %e, "Redis Cluster subscriptions cannot be restored in place");
                        return "subscriptions diverged";
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "Redis Cluster resubscribe incomplete");
                        // A master being down fails only its channels; the others
                        // still answer. A cluster connection of which no master answers
                        // is replaced whole: all masters are unreachable, or the redis
                        // crate deadlocked in its slot refresh (it then holds every
                        // command for good, while deliveries from the masters go on).
                        if ping(inner, conn).await.is_err() {
                            return "no master answers";
                        }
                        repair.later(inner);
                    }
                }
            }
        }
    }
}

/// Cluster mode: replaces the command connection if no master answers on it (the
/// subscriptions, on their own connection, are not touched). Publishes fail with
/// `unavailable` until a new one is up.
async fn commands_alive(inner: &Inner) {
    let Some(commands) = inner.conn.read().clone() else {
        return;
    };
    if ping(inner, &commands).await.is_ok() {
        return;
    }
    tracing::warn!("the Redis Cluster command connection does not answer; replacing it");
    let fresh = connect_commands(inner).await;
    if let Err(e) = &fresh {
        tracing::warn!(error = %e, "Redis Cluster command connection failed");
    }
    *inner.conn.write() = fresh.ok();
}

/// A cluster connection's repair: which channels still have to be subscribed again,
/// and when the next round runs.
struct Repair {
    /// `None`: no repair pending.
    due: Option<tokio::time::Instant>,
    /// The channels not yet confirmed since the loss; `None`: every active channel.
    unconfirmed: Option<HashSet<ChannelName>>,
    delay: Duration,
    /// Rounds in a row in which every subscribe was confirmed and yet the cluster's
    /// nodes did not hold every channel once.
    diverged: u32,
}

impl Repair {
    /// After this many diverged rounds the cluster connection is replaced whole.
    const MAX_DIVERGED: u32 = 5;
    /// How long the redis crate is given to reconnect a master before the first round.
    const SETTLE: Duration = Duration::from_millis(100);

    fn new() -> Self {
        Repair {
            due: None,
            unconfirmed: None,
            delay: Duration::ZERO,
            diverged: 0,
        }
    }

    fn pending(&self) -> bool {
        self.due.is_some()
    }

    /// A master was lost, so any channel may be: every one is subscribed again, after
    /// a moment. (The redis crate reconnects a live master within milliseconds; a
    /// subscribe sent meanwhile goes to another master, is redirected, and makes the
    /// crate refresh its slot map, the step in which it can deadlock.)
    fn everything(&mut self, inner: &Inner) {
        self.unconfirmed = None;
        self.delay = Self::SETTLE.min(inner.config.max_reconnect_delay);
        self.due = Some(tokio::time::Instant::now() + self.delay);
    }

    /// A round failed (or a subscribe did): try again after a growing delay.
    fn later(&mut self, inner: &Inner) {
        self.delay = (self.delay * 2)
            .max(Duration::from_millis(25))
            .min(inner.config.max_reconnect_delay);
        self.due = Some(tokio::time::Instant::now() + self.delay);
    }

    async fn due(&self) {
        match self.due {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// Applies what changed meanwhile and subscribes the unconfirmed channels again
    /// (a subscribe to a channel the master still serves changes nothing). Done when
    /// every one is confirmed and the node's connections hold them all: the redis
    /// crate repairs a master's connection on its own too, and may replace the one
    /// that confirmed a subscribe.
    async fn run(
        &mut self,
        inner: &Inner,
        conn: &Conn,
        active: &mut HashSet<ChannelName>,
    ) -> redis::RedisResult<()> {
        self.due = None;
        let changes = sync(inner, conn, active, Pass::Changes).await;
        let again: Vec<ChannelName> = match self.unconfirmed.take() {
            None => active.iter().cloned().collect(),
            Some(left) => left.into_iter().filter(|c| active.contains(c)).collect(),
        };
        if let Err((failed, e)) = interest(inner, conn, &again, true).await {
            self.unconfirmed = Some(failed.into_iter().collect());
            return Err(e);
        }
        changes?;
        let Conn::Cluster(c) = conn else {
            return Ok(());
        };
        // Nothing left to subscribe unless the check finds a channel missing.
        self.unconfirmed = Some(HashSet::new());
        let held = shard_subscriptions(inner, c).await?;
        if held != active.len() {
            self.unconfirmed = None;
            self.diverged += 1;
            return Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "subscriptions missing",
                format!("the cluster holds {held} for {} channels", active.len()),
            )));
        }
        self.diverged = 0;
        Ok(())
    }
}

/// Cluster: how many shard channels the node's connections hold in all: `CLIENT INFO`
/// on every node, each answering for the one connection the node has to it. Replicas
/// count too: while a master is unreachable the redis crate subscribes on a replica of
/// its shard, which Redis 7 delivers from. Fails unless every node the crate knows
/// answers.
async fn shard_subscriptions(inner: &Inner, conn: &ClusterConnection) -> redis::RedisResult<usize> {
    use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
    let mut c = conn.clone();
    let info = c.route_command(
        redis::cmd("CLIENT").arg("INFO").to_owned(),
        RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllNodes, None)),
    );
    let answers = match within(inner, "CLIENT INFO", info).await? {
        Value::Map(answers) => answers,
        other => return Err(unexpected(format!("{other:?}"))),
    };
    let mut held = 0;
    for (_, answer) in answers {
        let text = match answer {
            Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            Value::VerbatimString { text, .. } | Value::SimpleString(text) => text,
            Value::ServerError(e) => return Err(e.into()),
            other => return Err(unexpected(format!("{other:?}"))),
        };
        held += shard_channels(&text).ok_or_else(|| unexpected(text.clone()))?;
    }
    Ok(held)
}

/// The `ssub=N` field of a `CLIENT INFO` line: how many shard channels the connection
/// is subscribed to.
fn shard_channels(client_info: &str) -> Option<usize> {
    client_info
        .split_whitespace()
        .find_map(|field| field.strip_prefix("ssub="))
        .and_then(|n| n.parse().ok())
}

fn unexpected(what: String) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Parse,
        "unexpected CLIENT INFO reply",
        what,
    ))
}

/// A standalone server answers `PING`; a cluster answers when any master does (the
/// cluster is reachable, whatever one master's state).
async fn ping(inner: &Inner, conn: &Conn) -> redis::RedisResult<()> {
    use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
    let cmd = redis::cmd("PING");
    let ping = async {
        match conn.clone() {
            Conn::Single(mut c) => cmd.query_async::<Value>(&mut c).await.map(drop),
            Conn::Cluster(mut c) => c
                .route_command(
                    cmd.clone(),
                    RoutingInfo::MultiNode((
                        MultipleNodeRoutingInfo::AllMasters,
                        Some(ResponsePolicy::OneSucceeded),
                    )),
                )
                .await
                .map(drop),
        }
    };
    within(inner, "probe", ping).await
}

fn timed_out(what: &'static str) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "timed out", what.to_owned()))
}

async fn connect(inner: &Inner, generation: u64) -> redis::RedisResult<Conn> {
    let handler = push_handler(inner, generation);
    if inner.config.cluster {
        let client = cluster_client(inner).push_sender(handler).build()?;
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

/// Cluster mode: the connection publishes and history reads go through, apart from
/// the one holding the subscriptions. Commands for a lost master's slots are what
/// make the redis crate refresh its slot map (the step in which it can deadlock, see
/// the crate docs); on a connection of their own, such a deadlock costs a new command
/// connection, not every master's subscriptions.
async fn connect_commands(inner: &Inner) -> redis::RedisResult<Conn> {
    let connect = async {
        let client = cluster_client(inner).build()?;
        Ok(Conn::Cluster(client.get_async_connection().await?))
    };
    within(inner, "connect", connect).await
}

/// A cluster client on the seed nodes, RESP3, with the configured timeouts.
fn cluster_client(inner: &Inner) -> redis::cluster::ClusterClientBuilder {
    redis::cluster::ClusterClientBuilder::new(inner.infos.clone())
        .use_protocol(ProtocolVersion::RESP3)
        .connection_timeout(inner.config.timeout)
        .response_timeout(inner.config.timeout)
}

/// Which channels a [`sync`] looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Only those subscribed or unsubscribed since the last pass.
    Changes,
    /// Every wanted channel (a new connection has none yet).
    NewConnection,
}

/// Brings Redis's subscriptions in line with the desired set, in batches. Channels
/// whose (un)subscribe failed are marked changed again, so a later pass retries them.
async fn sync(
    inner: &Inner,
    conn: &Conn,
    active: &mut HashSet<ChannelName>,
    pass: Pass,
) -> redis::RedisResult<()> {
    const BATCH: usize = 512;
    let (to_sub, to_unsub, looked_at) = {
        let mut desired = inner.desired.lock();
        let changed: Vec<ChannelName> = if pass == Pass::Changes {
            desired.changed.drain().collect()
        } else {
            // Once per connection: every wanted channel.
            let mut all: HashSet<ChannelName> = desired.changed.drain().collect();
            all.extend(desired.wanted.keys().cloned());
            all.into_iter().collect()
        };
        let mut to_sub = Vec::new();
        let mut to_unsub = Vec::new();
        for c in &changed {
            match (desired.wanted.contains_key(c), active.contains(c)) {
                (true, false) => to_sub.push(c.clone()),
                (false, true) => to_unsub.push(c.clone()),
                _ => {}
            }
        }
        (to_sub, to_unsub, changed)
    };
    let mut failure = None;
    let mut retry: Vec<ChannelName> = Vec::new();
    for (channels, subscribe) in [(&to_sub, true), (&to_unsub, false)] {
        for chunk in channels.chunks(BATCH) {
            if failure.is_some() && matches!(conn, Conn::Single(_)) {
                // One connection: once a command failed, the rest would too.
                retry.extend(chunk.iter().cloned());
                continue;
            }
            let failed: HashSet<ChannelName> = match interest(inner, conn, chunk, subscribe).await {
                Ok(()) => HashSet::new(),
                Err((failed, e)) => {
                    failure.get_or_insert(e);
                    failed.into_iter().collect()
                }
            };
            for c in chunk.iter().filter(|c| !failed.contains(*c)) {
                if subscribe {
                    active.insert(c.clone());
                } else {
                    active.remove(c);
                }
            }
            retry.extend(failed);
        }
    }
    // Wake everyone waiting on a channel that Redis now delivers, including channels
    // that were dropped and wanted again between two rounds.
    let mut desired = inner.desired.lock();
    for channel in &looked_at {
        if let Some(wanted) = desired.wanted.get(channel) {
            if active.contains(channel) && !wanted.setter.is_set() {
                wanted.setter.set();
            }
        }
    }
    desired.changed.extend(retry);
    failure.map_or(Ok(()), Err)
}

/// Subscribes to (or unsubscribes from) `channels`, each within the timeout. On
/// failure, names the channels that failed (all of them on a standalone connection,
/// where they go in one command).
async fn interest(
    inner: &Inner,
    conn: &Conn,
    channels: &[ChannelName],
    subscribe: bool,
) -> Result<(), (Vec<ChannelName>, redis::RedisError)> {
    const WHAT: &str = "subscription command";
    let key = |c: &ChannelName| format!("{}{}", inner.config.prefix, c);
    match conn.clone() {
        Conn::Single(mut c) => {
            let keys: Vec<String> = channels.iter().map(key).collect();
            let r = if subscribe {
                within(inner, WHAT, c.subscribe(&keys)).await
            } else {
                within(inner, WHAT, c.unsubscribe(&keys)).await
            };
            r.map_err(|e| (channels.to_vec(), e))
        }
        // A sharded (un)subscribe takes channels of one slot only: one command each,
        // many in flight, each failing on its own (a master may be down).
        Conn::Cluster(c) => {
            let results: Vec<(ChannelName, redis::RedisResult<()>)> =
                stream::iter(channels.iter().cloned())
                    .map(|ch: ChannelName| {
                        let mut c: ClusterConnection = c.clone();
                        let k = key(&ch);
                        async move {
                            let r = if subscribe {
                                within(inner, WHAT, c.ssubscribe(k)).await
                            } else {
                                within(inner, WHAT, c.sunsubscribe(k)).await
                            };
                            (ch, r)
                        }
                    })
                    .buffer_unordered(64)
                    .collect()
                    .await;
            let mut failed = Vec::new();
            let mut first = None;
            for (ch, r) in results {
                if let Err(e) = r {
                    failed.push(ch);
                    first.get_or_insert(e);
                }
            }
            first.map_or(Ok(()), |e| Err((failed, e)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::shard_channels;

    #[test]
    fn shard_channels_are_read_from_client_info() {
        // As Redis 7.0 prints it.
        let line = "id=7 addr=127.0.0.1:48918 laddr=127.0.0.1:43911 fd=15 name= age=3 idle=0 \
                    flags=P db=0 sub=0 psub=0 ssub=12 multi=-1 qbuf=0 qbuf-free=20474 \
                    argv-mem=0 multi-mem=0 rbs=1024 rbp=7 obl=0 oll=0 omem=0 tot-mem=22328 \
                    events=r cmd=ssubscribe user=default redir=-1 resp=3\n";
        assert_eq!(shard_channels(line), Some(12));
        assert_eq!(shard_channels("id=7 sub=3 psub=0"), None, "before Redis 7");
        assert_eq!(shard_channels("ssub=x"), None);
    }
}
