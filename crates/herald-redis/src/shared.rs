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
    /// A standalone Redis: one RESP3 multiplexed connection.
    Single(MultiplexedConnection),
    /// Redis Cluster: the redis crate's cluster connection (one per master).
    Cluster(ClusterConnection),
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
    /// Where pushed messages go (the hub's bounded queue).
    pub(crate) inbound: Inbound,
    /// Broker up/down, reconnects, repairs, drops.
    pub(crate) metrics: Metrics,
    /// What the hub wants served.
    pub(crate) desired: Mutex<Desired>,
    /// Wakes the supervisor when `desired` changed.
    pub(crate) changed: Notify,
    /// The live connection, if any.
    pub(crate) conn: RwLock<Option<Conn>>,
    /// Subscriptions are in place and commands are answered (`Broker::is_up`).
    pub(crate) up: AtomicBool,
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
