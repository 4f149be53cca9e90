//! The broker boundary: how publications travel from the node that accepts them to
//! every node that serves their channel.
//!
//! # Layout
//! - `memory`: [`MemoryBroker`], the embedded single-node broker.
//!
//! # Parts
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
//! - **History.** A publication sent with a [`HistoryPolicy`] is stored in its channel's
//!   stream and gets the next offset of the channel's current epoch, atomically with
//!   being handed on; it reaches the hub with that position. [`Broker::history`] reads a
//!   stream back. Offsets of one epoch are contiguous: a node that sees a jump lost
//!   something in transit and can fetch it from the stream.
#![deny(missing_docs)]

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use herald_metrics::{DropReason, Metrics};
use herald_protocol::presence::Member;
use herald_protocol::{ChannelName, Epoch, Publication, StreamPosition};
use tokio::sync::mpsc;

mod memory;

pub use memory::MemoryBroker;

/// A boxed future, so that [`Broker`] stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a broker could not take a publication or answer a read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The broker is down or unreachable, or refused; the request did not take effect.
    /// The text is for logs (it may name internals); clients get a generic message.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker did not answer in time: a publish may or may not have taken effect.
    #[error("broker did not answer in time")]
    Timeout,
    /// A publish may or may not have taken effect, or part of a batch did: the
    /// connection failed while the request was in flight, or an entry of a batch
    /// failed after others were published. Never reported as "nothing published".
    #[error("broker outcome unknown: {0}")]
    UnknownOutcome(String),
    /// The entries of a batch had different outcomes (some were published, others
    /// failed): each entry's, in request order. At least one is `Ok` and one `Err`;
    /// entries after a failed one may have been published.
    #[error("batch partly published: {}", partial_summary(.0))]
    Partial(Vec<Result<Published, BrokerError>>),
    /// The broker (or the node's hub behind it) has shut down.
    #[error("broker closed")]
    Closed,
}

#[cfg(test)]
mod batch_tests {
    use super::*;

    #[test]
    fn a_batch_says_nothing_was_published_only_when_nothing_may_have_been() {
        let down = || Err(BrokerError::Unavailable("down".into()));
        let unknown = || Err(BrokerError::UnknownOutcome("cut".into()));
        let ok = || Ok(Published::default());
        assert_eq!(BrokerError::batch(vec![ok(), ok()]).map(|v| v.len()), Ok(2));
        assert!(matches!(
            BrokerError::batch(vec![ok(), down()]),
            Err(BrokerError::Partial(_))
        ));
        assert!(matches!(
            BrokerError::batch(vec![down(), down()]),
            Err(BrokerError::Unavailable(_))
        ));
        assert!(matches!(
            BrokerError::batch(vec![down(), unknown()]),
            Err(BrokerError::UnknownOutcome(_))
        ));
        assert!(matches!(
            BrokerError::batch(vec![unknown(), down()]),
            Err(BrokerError::UnknownOutcome(_))
        ));
    }
}

fn partial_summary(results: &[Result<Published, BrokerError>]) -> String {
    let failed: Vec<String> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| format!("entry {i}: {e}")))
        .collect();
    format!(
        "{} of {} failed ({})",
        failed.len(),
        results.len(),
        failed.join("; ")
    )
}

impl BrokerError {
    /// The outcome of a batch from each entry's: `Ok` when every entry was,
    /// [`BrokerError::Partial`] when some were; when none was, an entry whose outcome is
    /// unknown makes the whole unknown (never "nothing was published" while something
    /// may have been), else the first error.
    pub fn batch(results: Vec<Result<Published, BrokerError>>) -> Result<Vec<Published>, Self> {
        let ok = results.iter().filter(|r| r.is_ok()).count();
        if ok == results.len() {
            return Ok(results.into_iter().flatten().collect());
        }
        if ok > 0 {
            return Err(BrokerError::Partial(results));
        }
        let mut errors = results.into_iter().filter_map(Result::err);
        let first = errors.next().unwrap_or(BrokerError::Closed);
        if first.may_have_published() {
            return Err(first);
        }
        Err(errors
            .find(BrokerError::may_have_published)
            .unwrap_or(first))
    }

    /// Whether the request may have taken effect after all.
    pub fn may_have_published(&self) -> bool {
        matches!(
            self,
            BrokerError::Timeout | BrokerError::UnknownOutcome(_) | BrokerError::Partial(_)
        )
    }
}

/// How a history channel keeps its publications (from the channel's rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryPolicy {
    /// Publications kept per channel (at least this many; Redis trims approximately).
    pub size: usize,
    /// The stream expires this long after the channel's last publication.
    pub ttl: Duration,
    /// The channel's offset and epoch expire this long after its last publication or
    /// read (longer than `ttl`, so that a client can still learn that history expired
    /// rather than silently starting a new epoch).
    pub meta_ttl: Duration,
}

/// Makes retried publishes safe: a publish with a key seen within `window` publishes
/// nothing and answers the first result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    /// The caller's key (per channel).
    pub key: String,
    /// How long the key is remembered.
    pub window: Duration,
}

/// One publication to hand to the broker, with how to treat it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishRequest {
    /// What to publish.
    pub publication: Publication,
    /// Store it in the channel's stream (history channels).
    pub history: Option<HistoryPolicy>,
    /// Deduplicate retries.
    pub idempotency: Option<Idempotency>,
}

impl PublishRequest {
    /// A publication on a channel without history, without deduplication.
    pub fn plain(publication: Publication) -> Self {
        PublishRequest {
            publication,
            history: None,
            idempotency: None,
        }
    }
}

/// What became of one publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Published {
    /// Its place in the channel's stream (history channels).
    pub position: Option<StreamPosition>,
    /// An earlier publish with the same idempotency key took effect; nothing new did.
    pub duplicate: bool,
}

/// A page of a channel's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    /// The stream's current position: the last publication's offset (0 when none yet)
    /// and the current epoch.
    pub top: StreamPosition,
    /// Publications after the requested offset, oldest first, at most the requested
    /// number, all of the current epoch. Missing ones (trimmed, expired) are simply not
    /// there: the caller compares offsets.
    pub publications: Vec<Publication>,
    /// A start token for this read ([`Epoch::start`]: the data's lineage and the time),
    /// which a resume from an earlier start is checked against
    /// ([`Epoch::start_continues`]). A read that finds no stream answers `top` =
    /// `(0, now)`.
    pub now: Epoch,
}

/// A fresh epoch: random, so that a reset stream never reuses an earlier one.
pub fn new_epoch() -> Epoch {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::hash::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    Epoch::from_random(h.finish())
}

/// A change presence made: a connection joined or left a channel.
#[derive(Debug, Clone, PartialEq)]
pub struct PresenceChange {
    /// Who.
    pub member: Member,
    /// It was its user's first connection in the channel (joined) or last (left).
    pub user_edge: bool,
}

/// A page of a channel's members.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PresencePage {
    /// The members.
    pub members: Vec<Member>,
    /// Where the next page starts; `None` on the last.
    pub cursor: Option<String>,
}

/// How many are present in a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PresenceStats {
    /// Connections.
    pub connections: u64,
    /// Distinct users.
    pub users: u64,
}

/// What a call that may queue webhook events did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Queued {
    /// Events queued.
    pub queued: u64,
    /// Events not queued: the queue held its maximum already.
    pub dropped: u64,
}

/// What an occupancy call did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Occupancy {
    /// `channel_occupied` events queued (and dropped: the queue was full).
    pub occupied: Queued,
    /// `channel_vacated` events queued (and dropped).
    pub vacated: Queued,
    /// Channels whose last entry a sweep removed: their node stopped refreshing it (it
    /// died). The caller settles what else that node left behind (presence).
    pub swept: Vec<ChannelName>,
    /// The sweep stopped at its limit: more expired entries remain (sweep again).
    pub more: bool,
}

/// One webhook event waiting for delivery ([`Broker::webhook_take`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEvent {
    /// Its id: unique in the queue, increasing in the order events were queued.
    pub id: String,
    /// The event, a JSON object (without its id).
    pub json: String,
    /// Times it was taken before this one (by any node): a retry after a node died.
    pub retakes: u64,
}

/// How the webhook queue is bounded and shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebhookQueue {
    /// Events waiting (queued, not yet done), at most; past it new events are dropped
    /// (and counted).
    pub max: usize,
    /// One node delivers at a time (events arrive in order), holding the queue this
    /// long, renewed by every [`Broker::webhook_take`]; a node that finds it free
    /// takes over, with the events the previous one had taken and not finished.
    pub lease: Duration,
}

fn no_presence<T>() -> BoxFuture<'static, Result<T, BrokerError>>
where
    T: Send + 'static,
{
    Box::pin(async {
        Err(BrokerError::Unavailable(
            "this broker keeps no presence or webhook state".into(),
        ))
    })
}

/// Carries publications between nodes.
pub trait Broker: Send + Sync + 'static {
    /// Hands `batch` to the broker, in order. Resolves `Ok` (one [`Published`] per
    /// request, in order) only once the broker has accepted every publication in it; on
    /// `Err` none or only a prefix was accepted ([`BrokerError::Timeout`]: unknown). A
    /// broker that is down answers [`BrokerError::Unavailable`] at once rather than
    /// waiting for a connection.
    fn publish(
        &self,
        batch: Vec<PublishRequest>,
    ) -> BoxFuture<'_, Result<Vec<Published>, BrokerError>>;

    /// Reads `channel`'s stream: its current position, and up to `limit` publications
    /// after offset `since`. Reading creates nothing: a channel without a stream (never
    /// published, or expired) answers a *start*, offset 0 with a start token
    /// ([`Epoch::start`]), which continues with the first publication of whatever epoch
    /// comes, so that anonymous reads of made-up names cost no memory (and, on Redis,
    /// evict nothing under `maxmemory`).
    ///
    /// With `only_in`, the read is for continuing a stream from `since` in that epoch
    /// (a resume, a repair): the entries are read only if the stream is in that epoch
    /// (any epoch for a resume from a start: `since` 0 and a start token) and at most
    /// `limit` publications past `since`; otherwise only the position comes back, since
    /// such a read could not be used anyway. The decision is taken where
    /// the stream is, before anything is read, so that a client cannot make a node
    /// read `limit` entries with a made-up epoch or a `since` from long ago.
    fn history(
        &self,
        channel: &ChannelName,
        policy: HistoryPolicy,
        since: u64,
        limit: usize,
        only_in: Option<Epoch>,
    ) -> BoxFuture<'_, Result<HistoryPage, BrokerError>>;

    /// This node now serves `channel`: deliver its publications to the inbound queue.
    /// The returned [`Ready`] resolves once the broker actually delivers them, so that a
    /// client is acknowledged only when nothing published afterwards can be missed.
    fn subscribe(&self, channel: &ChannelName) -> Ready;

    /// This node no longer serves `channel`.
    fn unsubscribe(&self, channel: &ChannelName);

    /// Adds `members` to `channel`'s presence (an entry expires `ttl` after it was last
    /// added: nodes add their members again every refresh). Answers the members that
    /// were not there yet (a refresh after a broker lost its data re-adds them).
    fn presence_add(
        &self,
        channel: &ChannelName,
        members: Vec<Member>,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Vec<PresenceChange>, BrokerError>> {
        let _ = (channel, members, ttl);
        no_presence()
    }

    /// Removes `members` from `channel`'s presence. Answers every one of them (with
    /// whether it was its user's last connection), also one the broker no longer held
    /// (it lost its data): the leave of a member the subscribers saw join must be told.
    fn presence_remove(
        &self,
        channel: &ChannelName,
        members: Vec<Member>,
    ) -> BoxFuture<'_, Result<Vec<PresenceChange>, BrokerError>> {
        let _ = (channel, members);
        no_presence()
    }

    /// Removes up to `limit` entries of `channel` whose time ran out (their node stopped
    /// refreshing them: it died); answers them, so that their leaves are announced.
    fn presence_expire(
        &self,
        channel: &ChannelName,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<PresenceChange>, BrokerError>> {
        let _ = (channel, limit);
        no_presence()
    }

    /// A page of `channel`'s members, about `limit` long, from `cursor`.
    fn presence_page(
        &self,
        channel: &ChannelName,
        cursor: Option<String>,
        limit: usize,
    ) -> BoxFuture<'_, Result<PresencePage, BrokerError>> {
        let _ = (channel, cursor, limit);
        no_presence()
    }

    /// How many connections and distinct users `channel` holds, in O(1).
    fn presence_stats(
        &self,
        channel: &ChannelName,
    ) -> BoxFuture<'_, Result<PresenceStats, BrokerError>> {
        let _ = channel;
        no_presence()
    }

    /// Channel occupancy across the cluster, for the `channel_occupied` and
    /// `channel_vacated` webhooks: `node` now has (`true`) or no longer has (`false`)
    /// local subscribers of each channel. A channel that gets its first node anywhere
    /// queues `channel_occupied`; one that loses its last, `channel_vacated`: decided
    /// where the entries are, atomically, so exactly one node's change makes each event
    /// whatever the nodes do at once. An entry expires `ttl` after it was last set
    /// ([`Broker::occupancy_refresh`] sets them again).
    fn occupancy(
        &self,
        node: &str,
        changes: Vec<(ChannelName, bool)>,
        ttl: Duration,
        queue: WebhookQueue,
    ) -> BoxFuture<'_, Result<Occupancy, BrokerError>> {
        let _ = (node, changes, ttl, queue);
        no_presence()
    }

    /// Sets `node`'s entries for `channels` again (their TTL starts over; an entry the
    /// broker lost is added, and may queue `channel_occupied` again), then removes the
    /// expired entries of any node (one that died), queueing the vacated channels.
    fn occupancy_refresh(
        &self,
        node: &str,
        channels: Vec<ChannelName>,
        ttl: Duration,
        queue: WebhookQueue,
    ) -> BoxFuture<'_, Result<Occupancy, BrokerError>> {
        let _ = (node, channels, ttl, queue);
        no_presence()
    }

    /// Queues webhook events decided elsewhere (`join`, `leave`), in order.
    fn webhook_queue(
        &self,
        events: Vec<String>,
        queue: WebhookQueue,
    ) -> BoxFuture<'_, Result<Queued, BrokerError>> {
        let _ = (events, queue);
        no_presence()
    }

    /// Up to `max` events for `consumer` (a node) to deliver, oldest first, if it holds
    /// the queue's lease (taken or renewed here; none while another consumer holds it):
    /// events taken before and never finished (a previous holder's, or its own older
    /// than a lease), then new ones. An event taken stays queued until
    /// [`Broker::webhook_done`]. `max` 0 only renews the lease. `None`: another
    /// consumer holds the lease (one that had it and lost it must stop delivering).
    fn webhook_take(
        &self,
        consumer: &str,
        max: usize,
        queue: WebhookQueue,
    ) -> BoxFuture<'_, Result<Option<Vec<WebhookEvent>>, BrokerError>> {
        let _ = (consumer, max, queue);
        no_presence()
    }

    /// The events `ids` are finished with (delivered, or given up): they leave the queue.
    fn webhook_done(&self, ids: Vec<String>) -> BoxFuture<'_, Result<(), BrokerError>> {
        let _ = ids;
        no_presence()
    }

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

    /// Marks the subscription inactive again (the broker lost its connection): new
    /// subscribers wait until it is re-established.
    pub fn unset(&self) {
        self.0.send_replace(false);
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

/// What a broker hands to the node's hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A publication for a channel the node serves.
    Publication(Publication),
    /// The broker lost its subscriptions and has them again (after an outage or a
    /// killed connection): publications may have been missed meanwhile, so history
    /// channels should catch up from their streams.
    Resubscribed,
}

/// The sending half of the queue from a broker to the node's hub.
#[derive(Clone)]
pub struct Inbound {
    tx: mpsc::Sender<Received>,
    metrics: Metrics,
}

/// The receiving half, owned by the hub's dispatcher.
pub struct InboundReceiver {
    rx: mpsc::Receiver<Received>,
}

/// Creates the inbound queue, holding at most `capacity` publications.
pub fn inbound(capacity: usize, metrics: Metrics) -> (Inbound, InboundReceiver) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (Inbound { tx, metrics }, InboundReceiver { rx })
}

impl Inbound {
    /// Queues `p`, waiting while the queue is full (backpressure to the publisher).
    pub async fn send(&self, p: Publication) -> Result<(), HubClosed> {
        self.tx
            .send(Received::Publication(p))
            .await
            .map_err(|_| HubClosed)
    }

    /// Tells the hub that the broker's subscriptions were re-established, waiting for
    /// room (the marker must not be lost, or history channels would not catch up).
    pub async fn resubscribed(&self) -> Result<(), HubClosed> {
        self.tx
            .send(Received::Resubscribed)
            .await
            .map_err(|_| HubClosed)
    }

    /// Queues `p` if there is room; otherwise drops it and counts the drop
    /// (`herald_messages_dropped_total{reason="hub_overflow"}`). Returns whether it was
    /// queued. On a history channel the hub notices the gap and repairs it.
    pub fn try_send(&self, p: Publication) -> Result<bool, HubClosed> {
        match self.tx.try_send(Received::Publication(p)) {
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
    /// The next item, or `None` once every [`Inbound`] is gone.
    pub async fn recv(&mut self) -> Option<Received> {
        self.rx.recv().await
    }

    /// The next item if one is queued, without waiting.
    pub fn try_recv(&mut self) -> Option<Received> {
        self.rx.try_recv().ok()
    }

    /// Whether nothing is queued now.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Receives up to `limit` items into `buf`, waiting for at least one.
    /// Returns 0 once every [`Inbound`] is gone.
    pub async fn recv_many(&mut self, buf: &mut Vec<Received>, limit: usize) -> usize {
        self.rx.recv_many(buf, limit).await
    }
}
