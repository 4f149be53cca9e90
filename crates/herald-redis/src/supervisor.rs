//! The supervisor: one task per broker that owns the Redis connections (in cluster
//! mode one for the subscriptions and one for commands), keeps the subscriptions
//! equal to the desired set (`sync`), probes the connections, repairs a lost cluster
//! master in place (`repair`) and reconnects (`connect`).

use herald_protocol::backoff::Backoff;

use crate::connect::{connect, connect_commands, ping, within};
use crate::repair::{shard_subscriptions, Repair};
use crate::shared::{Conn, Inner};
use crate::sync::{sync, Pass};
use herald_protocol::ChannelName;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Keeps a connection alive and its subscriptions equal to the desired set.
pub(crate) async fn supervise(inner: Arc<Inner>) {
    let mut backoff = Backoff::new(Duration::from_millis(25), inner.config.max_reconnect_delay);
    let mut connected_before = false;
    // Failed connects since the last success: the first of a run, and one in a hundred
    // after it, are warnings (a wrong address, password or certificate must show in the
    // logs at the default level), the rest are noise of a reconnect loop.
    let mut failures = 0u64;
    loop {
        let generation = inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let conn = match within(&inner, "connect", connect(&inner, generation)).await {
            Ok(c) => {
                failures = 0;
                c
            }
            Err(e) => {
                if failures.is_multiple_of(100) {
                    tracing::warn!(error = %e, failures, "Redis connect failed; retrying");
                } else {
                    tracing::debug!(error = %e, "Redis connect failed");
                }
                failures += 1;
                tokio::time::sleep(backoff.next_wait()).await;
                continue;
            }
        };
        let mut active: HashSet<ChannelName> = HashSet::new();
        let mut repair = Repair::new();
        // A new connection starts with nothing active: whatever it subscribes is
        // confirmed, so no repair of an earlier connection is under way any more.
        inner.repairing.store(false, Ordering::Release);
        // Resubscribe everything before declaring the node usable again.
        if let Err(e) = sync(&inner, &conn, &mut active, Pass::NewConnection).await {
            tracing::warn!(error = %e, "Redis resubscribe failed");
            // A cluster with one master down still serves the others' channels; the
            // repair retries the rest.
            if matches!(conn, Conn::Cluster(_)) && ping(&inner, &conn).await.is_ok() {
                repair.later(&inner);
            } else {
                tokio::time::sleep(backoff.next_wait()).await;
                continue;
            }
        }
        let commands = match &conn {
            Conn::Single(..) => conn.clone(),
            Conn::Cluster(_) => match connect_commands(&inner).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "Redis Cluster command connection failed");
                    tokio::time::sleep(backoff.next_wait()).await;
                    continue;
                }
            },
        };
        // Only a connection that resubscribed counts as recovered: a server that
        // accepts connections but fails the resubscribe keeps the backoff growing.
        backoff.reset();
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
                    Conn::Single(..) => ping(inner, conn).await,
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
