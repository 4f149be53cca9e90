//! Redis Cluster: one lost master repaired in place. Its channels are subscribed again
//! (a no-op where still served) until the masters' connections hold every channel, as
//! `CLIENT INFO` on every cluster node says; the other masters' connections are never
//! touched.

use crate::connect::{unexpected, within};
use crate::shared::{Conn, Inner};
use crate::sync::{interest, sync, Pass};
use herald_protocol::ChannelName;
use redis::cluster_async::ClusterConnection;
use redis::Value;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// A cluster connection's repair: which channels still have to be subscribed again,
/// and when the next round runs.
pub(crate) struct Repair {
    /// `None`: no repair pending.
    due: Option<tokio::time::Instant>,
    /// The channels not yet confirmed since the loss; `None`: every active channel.
    unconfirmed: Option<HashSet<ChannelName>>,
    /// The wait before the next round; doubles while rounds fail.
    delay: Duration,
    /// Rounds in a row in which every subscribe was confirmed and yet the cluster's
    /// nodes did not hold every channel once.
    pub(crate) diverged: u32,
}

impl Repair {
    /// After this many diverged rounds the cluster connection is replaced whole.
    pub(crate) const MAX_DIVERGED: u32 = 5;
    /// How long the redis crate is given to reconnect a master before the first round.
    const SETTLE: Duration = Duration::from_millis(100);

    pub(crate) fn new() -> Self {
        Repair {
            due: None,
            unconfirmed: None,
            delay: Duration::ZERO,
            diverged: 0,
        }
    }

    pub(crate) fn pending(&self) -> bool {
        self.due.is_some()
    }

    /// A master was lost, so any channel may be: every one is subscribed again, after
    /// a moment. (The redis crate reconnects a live master within milliseconds; a
    /// subscribe sent meanwhile goes to another master, is redirected, and makes the
    /// crate refresh its slot map, the step in which it can deadlock.) Until its
    /// subscribe is confirmed again, no channel is ready: a new subscriber waits (or is
    /// told `unavailable`) instead of being told deliveries flow on a lost master's
    /// channel; the other masters' channels are ready again one round trip later.
    pub(crate) fn everything(&mut self, inner: &Inner) {
        inner.repairing.store(true, Ordering::Release);
        for wanted in inner.desired.lock().wanted.values() {
            wanted.setter.unset();
        }
        self.unconfirmed = None;
        self.delay = Self::SETTLE.min(inner.config.max_reconnect_delay);
        self.due = Some(tokio::time::Instant::now() + self.delay);
    }

    /// A round failed (or a subscribe did): try again after a growing delay.
    pub(crate) fn later(&mut self, inner: &Inner) {
        self.delay = (self.delay * 2)
            .max(Duration::from_millis(25))
            .min(inner.config.max_reconnect_delay);
        self.due = Some(tokio::time::Instant::now() + self.delay);
    }

    pub(crate) async fn due(&self) {
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
    pub(crate) async fn run(
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
        // Each confirmed channel is ready again at once; the failed ones stay unready
        // until a later round confirms them.
        let ready = |c: &ChannelName| {
            if let Some(wanted) = inner.desired.lock().wanted.get(c) {
                wanted.setter.set();
            }
        };
        if let Err((failed, e)) = interest(inner, conn, &again, true, &ready).await {
            self.unconfirmed = Some(failed.into_iter().collect());
            return Err(e);
        }
        changes?;
        let Conn::Cluster(c) = conn else {
            inner.repairing.store(false, Ordering::Release);
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
        inner.repairing.store(false, Ordering::Release);
        Ok(())
    }
}

/// Cluster: how many shard channels the node's connections hold in all: `CLIENT INFO`
/// on every node, each answering for the one connection the node has to it. Replicas
/// count too: while a master is unreachable the redis crate subscribes on a replica of
/// its shard, which Redis 7 delivers from. Fails unless every node the crate knows
/// answers.
pub(crate) async fn shard_subscriptions(
    inner: &Inner,
    conn: &ClusterConnection,
) -> redis::RedisResult<usize> {
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
pub(crate) fn shard_channels(client_info: &str) -> Option<usize> {
    client_info
        .split_whitespace()
        .find_map(|field| field.strip_prefix("ssub="))
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::shard_channels;

    #[test]
    pub(crate) fn shard_channels_are_read_from_client_info() {
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
