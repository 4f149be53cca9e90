//! What the broker facade and its supervisor share.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use herald_broker::{Inbound, Ready, ReadySetter};
use herald_metrics::Metrics;
use herald_protocol::ChannelName;
use parking_lot::{Mutex, RwLock};
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use tokio::sync::Notify;

use crate::config::RedisConfig;

/// A connection of either kind; both are cheap handles to a shared driver task.
#[derive(Clone)]
pub(crate) enum Conn {
    /// A standalone Redis: one RESP3 multiplexed connection, and the `run_id` of the
    /// server process it is connected to.
    Single(MultiplexedConnection, RunId),
    /// Redis Cluster: the redis crate's cluster connection (one per master).
    Cluster(ClusterConnection),
}

impl Conn {
    /// The `run_id` of the server behind this connection; empty on a cluster, where one
    /// connection reaches many servers (the scripts then look it up themselves).
    pub(crate) fn run_id(&self) -> &str {
        match self {
            Conn::Single(_, id) => &id.0,
            Conn::Cluster(_) => "",
        }
    }
}

/// A Redis server's lineage: `INFO`'s `run_id` (new at every start) and
/// `master_replid` (new when a replica is promoted), as `run_id:master_replid`. History
/// scripts compare it with the lineage that last wrote a channel's epoch, so data a
/// server loaded from older files (a restart from an RDB snapshot, an AOF that lost its
/// tail) or received as a lagging replica before its promotion (also a failover and
/// back to a server that never restarted) starts a new epoch instead of handing out
/// offsets again. Only meaningful for the connection it was read on: a connection never
/// outlives its server. A field the server does not report is left empty (a server
/// without either gets no lineage check, as before).
#[derive(Clone)]
pub(crate) struct RunId(pub(crate) Arc<str>);

impl RunId {
    /// Asks the server behind `c`.
    pub(crate) async fn of(c: &mut MultiplexedConnection) -> redis::RedisResult<RunId> {
        // Two commands, not one with two sections: older servers take one section.
        let server: String = redis::cmd("INFO").arg("server").query_async(c).await?;
        let replication: String = redis::cmd("INFO").arg("replication").query_async(c).await?;
        let id = format!(
            "{}:{}",
            field(&server, "run_id:").unwrap_or(""),
            field(&replication, "master_replid:").unwrap_or("")
        );
        if id == ":" {
            tracing::warn!("the Redis server reports no run_id or master_replid: a restart from older data cannot be detected");
        }
        Ok(RunId(id.into()))
    }
}

/// The hex value of the `INFO` line starting with `name`.
fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.trim_end().strip_prefix(name))
        .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A channel the hub wants, and the readiness its subscribers wait on.
pub(crate) struct Wanted {
    /// Set once Redis confirms the subscription; unset while it is down.
    pub(crate) setter: ReadySetter,
    /// What subscribers wait on.
    pub(crate) ready: Ready,
}

/// What the hub wants served, and what changed since the supervisor last looked.
/// Every operation on it is O(1) or O(changes): the supervisor never scans every
/// channel under this lock (the hub calls in while holding a shard lock).
#[derive(Default)]
pub(crate) struct Desired {
    /// Every channel the hub wants, with its readiness.
    pub(crate) wanted: HashMap<ChannelName, Wanted>,
    /// Channels subscribed or unsubscribed since the last sync.
    pub(crate) changed: HashSet<ChannelName>,
}

pub(crate) struct Inner {
    /// `[redis]`.
    pub(crate) config: RedisConfig,
    /// Where to connect: the URL's server(s), parsed once.
    pub(crate) infos: Vec<redis::ConnectionInfo>,
    /// `rediss://` with a CA file or a client certificate: the PEM material, read once.
    pub(crate) certs: Option<redis::TlsCertificates>,
    /// `redis.sentinel_master`: the Sentinels to ask where the master is.
    pub(crate) sentinel: Option<tokio::sync::Mutex<redis::sentinel::SentinelClient>>,
    /// Where pushed messages go (the hub's bounded queue).
    pub(crate) inbound: Inbound,
    /// Broker up/down, reconnects, repairs, drops.
    pub(crate) metrics: Metrics,
    /// This node has read the webhook queue before: finding it created afresh means
    /// Redis lost it.
    pub(crate) webhook_queue_seen: AtomicBool,
    /// What the hub wants served.
    pub(crate) desired: Mutex<Desired>,
    /// Wakes the supervisor when `desired` changed.
    pub(crate) changed: Notify,
    /// The live connection, if any.
    pub(crate) conn: RwLock<Option<Conn>>,
    /// Subscriptions are in place and commands are answered (`Broker::is_up`).
    pub(crate) up: AtomicBool,
    /// A cluster master was lost and its channels are being subscribed again: being in
    /// the node's active set then proves nothing, so only a confirmed subscribe makes a
    /// channel ready.
    pub(crate) repairing: AtomicBool,
    /// Bumped per connection, so that a stale connection's disconnect push cannot
    /// tear down its successor.
    pub(crate) generation: Arc<AtomicU64>,
    /// A connection reported a disconnect: `lost_generation` says which, so that a
    /// report that arrives while the supervisor is already reconnecting cannot tear
    /// down the connection that replaced it.
    pub(crate) lost: Arc<Notify>,
    /// The generation of the connection that reported the disconnect.
    pub(crate) lost_generation: Arc<AtomicU64>,
}

#[cfg(test)]
mod tests {
    use super::field;

    #[test]
    fn lineage_fields_are_read_from_info() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:8e36004d92cef6df76ca907d1b8acbe53eeee351\r\ntcp_port:6379\r\n";
        assert_eq!(
            field(info, "run_id:"),
            Some("8e36004d92cef6df76ca907d1b8acbe53eeee351")
        );
        let repl = "# Replication\r\nmaster_replid:82366146c994cefffdad5064e9b027ca6be881dc\r\nmaster_replid2:0000\r\n";
        assert_eq!(
            field(repl, "master_replid:"),
            Some("82366146c994cefffdad5064e9b027ca6be881dc")
        );
        assert_eq!(field("# Server\r\nrun_id:\r\n", "run_id:"), None);
        assert_eq!(field("run_id:not hex\r\n", "run_id:"), None);
        assert_eq!(field("redis_version:7\r\n", "run_id:"), None);
    }
}
