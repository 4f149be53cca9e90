//! Keeping Redis's subscriptions equal to the desired set: the diff, sent as batched
//! `(S)SUBSCRIBE` / `(S)UNSUBSCRIBE`, and the interest changes the hub reports.

use crate::connect::within;
use crate::shared::{Conn, Inner};
use futures_util::{stream, StreamExt};
use herald_protocol::ChannelName;
use redis::cluster_async::ClusterConnection;
use std::collections::HashSet;

/// Which channels a [`sync`] looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    /// Only those subscribed or unsubscribed since the last pass.
    Changes,
    /// Every wanted channel (a new connection has none yet).
    NewConnection,
}

/// Brings Redis's subscriptions in line with the desired set, in batches. Channels
/// whose (un)subscribe failed are marked changed again, so a later pass retries them.
pub(crate) async fn sync(
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
    let mut confirmed: HashSet<ChannelName> = HashSet::new();
    for (channels, subscribe) in [(&to_sub, true), (&to_unsub, false)] {
        for chunk in channels.chunks(BATCH) {
            if failure.is_some() && matches!(conn, Conn::Single(..)) {
                // One connection: once a command failed, the rest would too.
                retry.extend(chunk.iter().cloned());
                continue;
            }
            let failed: HashSet<ChannelName> =
                match interest(inner, conn, chunk, subscribe, &|_| {}).await {
                    Ok(()) => HashSet::new(),
                    Err((failed, e)) => {
                        failure.get_or_insert(e);
                        failed.into_iter().collect()
                    }
                };
            for c in chunk.iter().filter(|c| !failed.contains(*c)) {
                if subscribe {
                    active.insert(c.clone());
                    confirmed.insert(c.clone());
                } else {
                    active.remove(c);
                }
            }
            retry.extend(failed);
        }
    }
    // Wake everyone waiting on a channel that Redis now delivers, including channels
    // that were dropped and wanted again between two rounds (still active: unless a
    // cluster repair is under way, when only a subscribe confirmed now counts).
    let repairing = inner.repairing.load(std::sync::atomic::Ordering::Acquire);
    let mut desired = inner.desired.lock();
    for channel in &looked_at {
        if let Some(wanted) = desired.wanted.get(channel) {
            let delivered = if repairing {
                confirmed.contains(channel)
            } else {
                active.contains(channel)
            };
            if delivered && !wanted.setter.is_set() {
                wanted.setter.set();
            }
        }
    }
    desired.changed.extend(retry);
    failure.map_or(Ok(()), Err)
}

/// Subscribes to (or unsubscribes from) `channels`, each within the timeout, calling
/// `done` for each one Redis confirms as soon as it does (a cluster's dead master must
/// not delay the live masters' channels). On failure, names the channels that failed
/// (all of them on a standalone connection, where they go in one command).
pub(crate) async fn interest(
    inner: &Inner,
    conn: &Conn,
    channels: &[ChannelName],
    subscribe: bool,
    done: &(dyn Fn(&ChannelName) + Sync),
) -> Result<(), (Vec<ChannelName>, redis::RedisError)> {
    const WHAT: &str = "subscription command";
    let key = |c: &ChannelName| format!("{}{}", inner.config.prefix, c);
    match conn.clone() {
        Conn::Single(mut c, _) => {
            let keys: Vec<String> = channels.iter().map(key).collect();
            let r = if subscribe {
                within(inner, WHAT, c.subscribe(&keys)).await
            } else {
                within(inner, WHAT, c.unsubscribe(&keys)).await
            };
            r.map_err(|e| (channels.to_vec(), e))?;
            channels.iter().for_each(done);
            Ok(())
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
                            if r.is_ok() {
                                done(&ch);
                            }
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
