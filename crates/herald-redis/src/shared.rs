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
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// A channel the hub wants, and the readiness its subscribers wait on.
pub(crate) struct Wanted {
    pub(crate) setter: ReadySetter,
    pub(crate) ready: Ready,
}

/// What the hub wants served, and what changed since the supervisor last looked.
/// Every operation on it is O(1) or O(changes): the supervisor never scans every
/// channel under this lock (the hub calls in while holding a shard lock).
#[derive(Default)]
pub(crate) struct Desired {
    pub(crate) wanted: HashMap<ChannelName, Wanted>,
    /// Channels subscribed or unsubscribed since the last sync.
    pub(crate) changed: HashSet<ChannelName>,
}

pub(crate) struct Inner {
    pub(crate) config: RedisConfig,
    pub(crate) infos: Vec<redis::ConnectionInfo>,
    pub(crate) inbound: Inbound,
    pub(crate) metrics: Metrics,
    /// What the hub wants served.
    pub(crate) desired: Mutex<Desired>,
    /// Wakes the supervisor when `desired` changed.
    pub(crate) changed: Notify,
    /// The live connection, if any.
    pub(crate) conn: RwLock<Option<Conn>>,
    pub(crate) up: AtomicBool,
    /// Bumped per connection, so that a stale connection's disconnect push cannot
    /// tear down its successor.
    pub(crate) generation: Arc<AtomicU64>,
    /// A connection reported a disconnect: `lost_generation` says which, so that a
    /// report that arrives while the supervisor is already reconnecting cannot tear
    /// down the connection that replaced it.
    pub(crate) lost: Arc<Notify>,
    pub(crate) lost_generation: Arc<AtomicU64>,
}
