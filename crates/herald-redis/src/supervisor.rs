//! The supervisor: one task per broker that owns the Redis connection, keeps the
//! subscriptions equal to the desired set, probes the connection and reconnects.

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
        let mut active: HashSet<ChannelName> = HashSet::new();
        // Resubscribe everything before declaring the node usable again.
        if let Err(e) = sync(&inner, &conn, &mut active, Pass::NewConnection).await {
            tracing::warn!(error = %e, "Redis resubscribe failed");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(inner.config.max_reconnect_delay);
            continue;
        }
        // Only a connection that resubscribed counts as recovered: a server that
        // accepts connections but fails the resubscribe keeps the backoff growing.
        delay = Duration::from_millis(25);
        *inner.conn.write() = Some(conn.clone());
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

        let why = serve(&inner, &conn, &mut active, generation).await;
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

/// Runs one connection until it fails; returns why.
async fn serve(
    inner: &Inner,
    conn: &Conn,
    active: &mut HashSet<ChannelName>,
    generation: u64,
) -> &'static str {
    let mut probe = tokio::time::interval(inner.config.probe_interval);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    probe.tick().await;
    loop {
        tokio::select! {
            _ = inner.lost.notified() => {
                // A report from an earlier connection (it raced with the reconnect that
                // replaced it) is stale: this one is fine.
                if inner.lost_generation.load(Ordering::Acquire) == generation {
                    return "disconnected";
                }
            }
            _ = inner.changed.notified() => {
                if let Err(e) = sync(inner, conn, active, Pass::Changes).await {
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

/// Which channels a [`sync`] looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Only those subscribed or unsubscribed since the last pass.
    Changes,
    /// Every wanted channel (a new connection has none yet).
    NewConnection,
}

/// Brings Redis's subscriptions in line with the desired set, in batches.
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
    let desired = inner.desired.lock();
    for channel in &looked_at {
        if let Some(wanted) = desired.wanted.get(channel) {
            if active.contains(channel) && !wanted.setter.is_set() {
                wanted.setter.set();
            }
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
