//! The broker boundary: how publications travel from the node that accepts them to
//! every node that serves their channel.
//!
//! # Layout
//! - [`Broker`]: the trait the gateway talks to. Implementations: [`MemoryBroker`]
//!   (here; one node, no dependencies) and `herald-redis` (many nodes).
//! - [`Inbound`] / [`InboundReceiver`]: the bounded queue through which a broker hands
//!   received publications to the node's hub.
//!
//! # Contract
//! - **One path.** A node's own publications come back to it through the broker like
//!   everyone else's, so delivery order and deduplication never depend on which node a
//!   publisher or subscriber uses.
//! - **Interest.** The hub calls [`Broker::subscribe`] when a channel gets its first
//!   local subscriber and [`Broker::unsubscribe`] after its last one leaves. Both return
//!   at once; a broker applies them in call order, batched as it likes.
//! - **Bounded.** Nothing between a publisher and the hub grows without bound: a broker
//!   that cannot apply backpressure to its source (Redis) drops at [`Inbound::try_send`]
//!   and counts the drop; one that can (memory) waits in [`Inbound::send`].
#![deny(missing_docs)]

use std::future::Future;
use std::pin::Pin;

use herald_metrics::{DropReason, Metrics};
use herald_protocol::{ChannelName, Publication};
use tokio::sync::mpsc;

mod memory;

pub use memory::MemoryBroker;

/// A boxed future, so that [`Broker`] stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a broker could not take a publication.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The broker is down or unreachable; the message was not accepted.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker (or the node's hub behind it) has shut down.
    #[error("broker closed")]
    Closed,
}

/// Carries publications between nodes.
pub trait Broker: Send + Sync + 'static {
    /// Hands `batch` to the broker, in order. Resolves `Ok` only once the broker has
    /// accepted every publication in it; on `Err` none or only a prefix was accepted.
    /// A broker that is down answers [`BrokerError::Unavailable`] at once rather than
    /// waiting for a connection.
    fn publish(&self, batch: Vec<Publication>) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// This node now serves `channel`: deliver its publications to the inbound queue.
    /// The returned [`Ready`] resolves once the broker actually delivers them, so that a
    /// client is acknowledged only when nothing published afterwards can be missed.
    fn subscribe(&self, channel: &ChannelName) -> Ready;

    /// This node no longer serves `channel`.
    fn unsubscribe(&self, channel: &ChannelName);

    /// Whether the broker can currently accept publications and deliver them.
    fn is_up(&self) -> bool;

    /// A short name for logs (`memory`, `redis`, ...).
    fn kind(&self) -> &'static str;
}

/// Resolves once a broker subscription is active. Cheap to clone: every session that
/// subscribes to a channel while its broker subscription is pending waits on the same one.
#[derive(Clone, Debug)]
pub struct Ready(tokio::sync::watch::Receiver<bool>);

/// Marks a [`Ready`] as active.
#[derive(Debug)]
pub struct ReadySetter(tokio::sync::watch::Sender<bool>);

impl Ready {
    /// Already active (brokers without a subscription step).
    pub fn now() -> Ready {
        Ready(tokio::sync::watch::channel(true).1)
    }

    /// Pending until the setter is used.
    pub fn pending() -> (ReadySetter, Ready) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        (ReadySetter(tx), Ready(rx))
    }

    /// Whether it is active now.
    pub fn is_ready(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until active, at most `limit`. Returns whether it became active.
    pub async fn wait(mut self, limit: std::time::Duration) -> bool {
        matches!(
            tokio::time::timeout(limit, self.0.wait_for(|v| *v)).await,
            Ok(Ok(_))
        )
    }
}

impl ReadySetter {
    /// Marks the subscription active, waking every waiter.
    pub fn set(&self) {
        self.0.send_replace(true);
    }

    /// Whether it was already set.
    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }
}

/// The hub was dropped; nobody reads the inbound queue any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the node's hub has shut down")]
pub struct HubClosed;

/// The sending half of the queue from a broker to the node's hub.
#[derive(Clone)]
pub struct Inbound {
    tx: mpsc::Sender<Publication>,
    metrics: Metrics,
}

/// The receiving half, owned by the hub's dispatcher.
pub struct InboundReceiver {
    rx: mpsc::Receiver<Publication>,
}

/// Creates the inbound queue, holding at most `capacity` publications.
pub fn inbound(capacity: usize, metrics: Metrics) -> (Inbound, InboundReceiver) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (Inbound { tx, metrics }, InboundReceiver { rx })
}

impl Inbound {
    /// Queues `p`, waiting while the queue is full (backpressure to the publisher).
    pub async fn send(&self, p: Publication) -> Result<(), HubClosed> {
        self.tx.send(p).await.map_err(|_| HubClosed)
    }

    /// Queues `p` if there is room; otherwise drops it and counts the drop
    /// (`herald_messages_dropped_total{reason="hub_overflow"}`). Returns whether it was queued.
    pub fn try_send(&self, p: Publication) -> Result<bool, HubClosed> {
        match self.tx.try_send(p) {
            Ok(()) => Ok(true),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.dropped(DropReason::HubOverflow, 1);
                Ok(false)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(HubClosed),
        }
    }
}

impl InboundReceiver {
    /// The next publication, or `None` once every [`Inbound`] is gone.
    pub async fn recv(&mut self) -> Option<Publication> {
        self.rx.recv().await
    }

    /// Receives up to `limit` publications into `buf`, waiting for at least one.
    /// Returns 0 once every [`Inbound`] is gone.
    pub async fn recv_many(&mut self, buf: &mut Vec<Publication>, limit: usize) -> usize {
        self.rx.recv_many(buf, limit).await
    }
}
