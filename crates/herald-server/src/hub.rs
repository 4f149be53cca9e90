//! The hub: which local sessions subscribe to which channel, and fan-out.
//!
//! The channel map is sharded by channel hash so subscribe/unsubscribe churn on one
//! channel does not contend with fan-out on another. Fan-out encodes a publication once
//! ([`herald_protocol::server::encode_delivery`]) and pushes a cheap clone of the same
//! bytes into each subscriber's [`SessionHandle`]; it never awaits, so one slow
//! subscriber can only ever hurt itself.
//!
//! History channels add, per channel, where the node's delivery of the stream stands
//! (`History`): an arriving publication is delivered only if it is the next offset
//! ([`recovery::verdict`]); a jump starts a **repair** (the missing range is read from
//! the stream once, delivered in order, then what arrived meanwhile); an epoch change
//! or a hole the stream cannot fill is announced with a `reset` frame. A subscriber
//! whose subscribe is still reading the history has its deliveries buffered and merged
//! after the history ([`recovery::merge`]), so it sees every offset once, in order.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use herald_broker::{Broker, HistoryPage, HistoryPolicy, InboundReceiver, Ready, Received};
use herald_metrics::Metrics;
use herald_protocol::client::Since;
use herald_protocol::server::{self, encode_delivery, Delivery};
use herald_protocol::{close, ChannelName, Payload, Publication, StreamPosition};
use indexmap::IndexMap;
use parking_lot::{Mutex, RwLock};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use crate::handle::{Item, SessionHandle};
use crate::recovery::{self, Merged, Out, Verdict};

/// A node-local session id.
pub(crate) type ConnId = u64;

const SHARDS: usize = 32;
/// Repairs reading streams at once (after a Redis outage every history channel the
/// node serves catches up; this keeps that from flooding Redis).
const REPAIRS_AT_ONCE: usize = 16;

struct Channel {
    subscribers: IndexMap<ConnId, Subscriber>,
    /// Whether the broker delivers this channel yet.
    ready: Ready,
    /// History channels only.
    history: Option<Mutex<History>>,
}

struct Subscriber {
    handle: Arc<SessionHandle>,
    /// Binary deliveries carry their offset (the client tracks positions).
    positions: bool,
    /// Its subscribe is reading the history: deliveries go to `History::pending`.
    recovering: AtomicBool,
    /// It already has every offset up to this (from history): skip them live.
    through: AtomicU64,
}

/// Where the node's delivery of a history channel's stream stands.
struct History {
    /// Tells this channel's state from a later one of the same name (a repair that
    /// finishes after the channel was dropped and re-created must not touch it).
    id: u64,
    policy: HistoryPolicy,
    /// The last publication that reached the node and was delivered (set by arrivals
    /// only: a subscriber completing its subscribe says what *it* has, not what the
    /// node has seen, and other live subscribers may still need what is in flight).
    last: Option<StreamPosition>,
    /// Until the first arrival: the lowest position a live subscriber has, so that the
    /// first arrival is checked for a gap against it.
    floor: Option<StreamPosition>,
    /// A repair is reading the stream: arriving publications wait here, in order.
    repairing: Option<Vec<Publication>>,
    /// Recovering subscribers' buffers: every publication that reached the channel
    /// since they subscribed (duplicates possible; the merge sorts them out).
    pending: HashMap<ConnId, Vec<Publication>>,
}

/// How a session subscribes.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SubscribeOpts {
    /// The channel's history policy (from its rule), if it keeps history.
    pub(crate) history: Option<HistoryPolicy>,
    /// The client tracks positions on this subscription.
    pub(crate) positions: bool,
}

/// What [`Hub::complete`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Completion {
    /// The subscriber got its `subscribed` reply and is live; `recovered` as answered.
    Done { recovered: Option<bool> },
    /// Read the history again (a hole between history and live publications).
    ReadAgain,
    /// The subscriber is no longer there.
    Gone,
}

pub(crate) struct Hub {
    shards: Box<[RwLock<HashMap<ChannelName, Channel>>]>,
    hasher: RandomState,
    broker: Arc<dyn Broker>,
    metrics: Metrics,
    /// `limits.max_recovery_buffer`.
    max_pending: usize,
    next_history_id: AtomicU64,
    repairs: Arc<Semaphore>,
}

impl Hub {
    pub(crate) fn new(broker: Arc<dyn Broker>, metrics: Metrics, max_pending: usize) -> Self {
        Hub {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            hasher: RandomState::new(),
            broker,
            metrics,
            max_pending,
            next_history_id: AtomicU64::new(1),
            repairs: Arc::new(Semaphore::new(REPAIRS_AT_ONCE)),
        }
    }

    pub(crate) fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    fn shard(&self, channel: &str) -> &RwLock<HashMap<ChannelName, Channel>> {
        &self.shards[self.hasher.hash_one(channel) as usize % SHARDS]
    }

    /// Adds `conn` to `channel`'s subscribers; the returned [`Ready`] tells when the
    /// broker delivers the channel. On a history channel the subscriber starts out
    /// recovering (its deliveries are buffered) until [`Hub::complete`].
    pub(crate) fn subscribe(
        &self,
        channel: &ChannelName,
        conn: ConnId,
        handle: &Arc<SessionHandle>,
        opts: SubscribeOpts,
    ) -> Ready {
        let mut shard = self.shard(channel.as_str()).write();
        let entry = shard.entry(channel.clone()).or_insert_with(|| {
            // Under the shard lock, so interest changes for one channel reach the broker
            // in the order they happened.
            self.metrics.channels.inc();
            Channel {
                subscribers: IndexMap::new(),
                ready: self.broker.subscribe(channel),
                history: opts.history.map(|policy| {
                    Mutex::new(History {
                        id: self.next_history_id.fetch_add(1, Ordering::Relaxed),
                        policy,
                        last: None,
                        floor: None,
                        repairing: None,
                        pending: HashMap::new(),
                    })
                }),
            }
        });
        let recovering = entry.history.is_some();
        if let Some(h) = &entry.history {
            h.lock().pending.insert(conn, Vec::new());
        }
        let sub = Subscriber {
            handle: handle.clone(),
            positions: opts.positions,
            recovering: AtomicBool::new(recovering),
            through: AtomicU64::new(0),
        };
        if entry.subscribers.insert(conn, sub).is_none() {
            self.metrics.subscriptions.inc();
        }
        entry.ready.clone()
    }

    /// Removes `conn` from `channel`'s subscribers. Returns whether it was one.
    pub(crate) fn unsubscribe(&self, channel: &ChannelName, conn: ConnId) -> bool {
        let mut shard = self.shard(channel.as_str()).write();
        let Some(entry) = shard.get_mut(channel.as_str()) else {
            return false;
        };
        let removed = entry.subscribers.swap_remove(&conn).is_some();
        if removed {
            self.metrics.subscriptions.dec();
        }
        if let Some(h) = &entry.history {
            h.lock().pending.remove(&conn);
        }
        if entry.subscribers.is_empty() {
            shard.remove(channel.as_str());
            self.broker.unsubscribe(channel);
            self.metrics.channels.dec();
        }
        removed
    }

    /// Completes `conn`'s subscribe on a history channel with a history read (`page`):
    /// queues the `subscribed` reply (with the stream position and, for a resume,
    /// `recovered`), the missed publications when recovered, and what arrived live
    /// meanwhile, then makes the subscriber live, all under the channel's lock so that
    /// nothing published meanwhile is lost or repeated.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn complete(
        &self,
        channel: &ChannelName,
        conn: ConnId,
        id: Option<u64>,
        page: &HistoryPage,
        since: Option<Since>,
        max_recovery: usize,
        last_attempt: bool,
    ) -> Completion {
        let shard = self.shard(channel.as_str()).read();
        let Some(entry) = shard.get(channel.as_str()) else {
            return Completion::Gone;
        };
        let (Some(sub), Some(h)) = (entry.subscribers.get(&conn), &entry.history) else {
            return Completion::Gone;
        };
        let mut h = h.lock();
        let Some(pending) = h.pending.get(&conn) else {
            return Completion::Gone;
        };
        let merged = recovery::merge(
            page.top,
            &page.publications,
            pending,
            since,
            max_recovery,
            last_attempt,
        );
        let Merged::Ready {
            recovered,
            out,
            through,
        } = merged
        else {
            return Completion::ReadAgain;
        };
        h.pending.remove(&conn);
        sub.handle.push(Item::reply(server::subscribed(
            channel.as_str(),
            id,
            page.top,
            recovered,
        )));
        let mut replayed = 0u64;
        for o in out {
            match o {
                Out::Publication(p) => {
                    if p.offset().is_some_and(|o| o <= page.top.offset) {
                        replayed += 1;
                    }
                    sub.handle.push(item_for(&p, sub.positions));
                }
                Out::Reset(at) => {
                    self.metrics.history_unrepairable.inc();
                    sub.handle
                        .push(Item::reply(server::reset(channel.as_str(), at)));
                }
            }
        }
        self.metrics.replayed.inc_by(replayed);
        sub.through.store(through.offset, Ordering::Relaxed);
        sub.recovering.store(false, Ordering::Relaxed);
        // Once publications arrive, this subscriber already has everything up to the
        // node's last (what arrived since it subscribed was merged above).
        if h.last.is_none() && h.floor.is_none_or(|f| through.offset < f.offset) {
            h.floor = Some(through);
        }
        Completion::Done { recovered }
    }

    /// Local subscribers of `channel` (for tests and introspection).
    #[cfg(test)]
    pub(crate) fn n_subscribers(&self, channel: &str) -> usize {
        self.shard(channel)
            .read()
            .get(channel)
            .map_or(0, |c| c.subscribers.len())
    }

    /// Delivers `p` to every local subscriber of its channel.
    pub(crate) fn dispatch(self: &Arc<Self>, p: Publication) {
        let shard = self.shard(p.channel.as_str()).read();
        let Some(entry) = shard.get(p.channel.as_str()) else {
            return;
        };
        match (&entry.history, p.position) {
            (Some(h), Some(_)) => {
                let mut h = h.lock();
                self.feed_pending(entry, &mut h, std::slice::from_ref(&p));
                if let Some(waiting) = &mut h.repairing {
                    // Bounded: what does not fit is a gap again afterwards, which the
                    // next repair reads from the stream.
                    if waiting.len() < self.max_pending {
                        waiting.push(p);
                    }
                    return;
                }
                self.accept(entry, &mut h, p, true);
            }
            _ => {
                let item = item_for(&p, false);
                SessionHandle::push_to_all(
                    entry.subscribers.values().map(|s| &s.handle),
                    &item,
                    &self.metrics,
                );
            }
        }
    }

    /// Appends what reached the channel to every recovering subscriber's buffer; one
    /// that overflows (its history read takes too long for the publication rate) is
    /// closed as a slow consumer, like a subscriber whose queue overflows.
    fn feed_pending(&self, entry: &Channel, h: &mut History, ps: &[Publication]) {
        if h.pending.is_empty() || ps.is_empty() {
            return;
        }
        let max = self.max_pending;
        h.pending.retain(|conn, buf| {
            buf.extend(ps.iter().cloned());
            if buf.len() <= max {
                return true;
            }
            if let Some(s) = entry.subscribers.get(conn) {
                self.metrics.slow_consumer_disconnects.inc();
                self.metrics
                    .dropped(herald_metrics::DropReason::SlowConsumer, buf.len() as u64);
                s.handle
                    .close(close::TRY_AGAIN_LATER, "slow consumer", false);
            }
            false
        });
    }

    /// Applies [`recovery::verdict`] to an arriving (or repaired) publication.
    fn accept(
        self: &Arc<Self>,
        entry: &Channel,
        h: &mut History,
        p: Publication,
        may_repair: bool,
    ) {
        let Some(pos) = p.position else { return };
        match recovery::verdict(h.last.or(h.floor), pos) {
            Verdict::Deliver => {
                h.last = Some(pos);
                self.fan_out(entry, &p);
            }
            Verdict::Duplicate => self.metrics.history_duplicates.inc(),
            Verdict::Gap { after } if may_repair => {
                h.repairing = Some(vec![p.clone()]);
                let since = StreamPosition {
                    offset: after,
                    epoch: pos.epoch,
                };
                tokio::spawn(self.clone().repair(p.channel, h.id, h.policy, since));
            }
            Verdict::Gap { .. } | Verdict::NewEpoch => {
                self.metrics.history_unrepairable.inc();
                let at = StreamPosition {
                    offset: pos.offset.saturating_sub(1),
                    epoch: pos.epoch,
                };
                let reset = Item::reply(server::reset(p.channel.as_str(), at));
                for s in entry.subscribers.values() {
                    if !s.recovering.load(Ordering::Relaxed) {
                        s.through.store(at.offset, Ordering::Relaxed);
                        s.handle.push(Item::control(reset.msg.clone(), reset.len));
                    }
                }
                h.last = Some(pos);
                self.fan_out(entry, &p);
            }
        }
    }

    /// Delivers a history publication to the live subscribers that do not have it yet.
    fn fan_out(&self, entry: &Channel, p: &Publication) {
        let offset = p.offset().unwrap_or(0);
        // `positions`: only subscribers that do (or do not) track positions; `None`: all.
        let live = |positions: Option<bool>| {
            entry.subscribers.values().filter(move |s| {
                positions.is_none_or(|p| s.positions == p)
                    && !s.recovering.load(Ordering::Relaxed)
                    && s.through.load(Ordering::Relaxed) < offset
            })
        };
        let plain = item_for(p, false);
        let m = &self.metrics;
        if matches!(p.payload, Payload::Binary(_)) {
            SessionHandle::push_to_all(live(Some(false)).map(|s| &s.handle), &plain, m);
            let positioned = item_for(p, true);
            SessionHandle::push_to_all(live(Some(true)).map(|s| &s.handle), &positioned, m);
        } else {
            // Text deliveries carry the offset for everyone: one encoding, one pass.
            SessionHandle::push_to_all(live(None).map(|s| &s.handle), &plain, m);
        }
    }

    /// Reads the publications after `since` from the stream and delivers them, then
    /// what arrived while reading; a hole the stream cannot fill becomes a `reset`.
    async fn repair(
        self: Arc<Self>,
        channel: ChannelName,
        id: u64,
        policy: HistoryPolicy,
        since: StreamPosition,
    ) {
        let page = {
            let _permit = self.repairs.clone().acquire_owned().await;
            self.broker
                .history(&channel, policy, since.offset, policy.size)
                .await
        };
        let shard = self.shard(channel.as_str()).read();
        let Some(entry) = shard.get(channel.as_str()) else {
            return;
        };
        let Some(h) = &entry.history else { return };
        let mut h = h.lock();
        if h.id != id {
            return;
        }
        let waiting = h.repairing.take().unwrap_or_default();
        let fetched = match page {
            Ok(page) if page.top.epoch == since.epoch => page.publications,
            Ok(_) => Vec::new(),
            Err(e) => {
                tracing::warn!(channel = %channel, error = %e, "history repair failed");
                Vec::new()
            }
        };
        self.metrics.history_repairs.inc();
        self.feed_pending(entry, &mut h, &fetched);
        for p in fetched {
            let reference = h.last.or(h.floor);
            if p.position
                .is_some_and(|pos| recovery::verdict(reference, pos) == Verdict::Deliver)
            {
                self.metrics.history_repaired.inc();
            }
            self.accept(entry, &mut h, p, false);
        }
        for p in waiting {
            self.accept(entry, &mut h, p, false);
        }
    }

    /// The broker's subscriptions were re-established: catch every history channel up
    /// from its stream.
    fn catch_up(self: &Arc<Self>) {
        for shard in self.shards.iter() {
            for (channel, entry) in shard.read().iter() {
                let Some(h) = &entry.history else { continue };
                let mut h = h.lock();
                let (Some(last), None) = (h.last.or(h.floor), &h.repairing) else {
                    continue;
                };
                h.repairing = Some(Vec::new());
                tokio::spawn(self.clone().repair(channel.clone(), h.id, h.policy, last));
            }
        }
    }

    /// Feeds what the broker hands over into fan-out until every sender is gone.
    pub(crate) async fn run_dispatcher(self: Arc<Self>, mut inbound: InboundReceiver) {
        let mut batch = Vec::with_capacity(64);
        while inbound.recv_many(&mut batch, 64).await > 0 {
            for r in batch.drain(..) {
                match r {
                    Received::Publication(p) => self.dispatch(p),
                    Received::Resubscribed => self.catch_up(),
                }
            }
        }
    }
}

/// The queue item delivering `p`: text frames carry the offset for everyone; binary
/// frames carry it only for subscribers that track positions.
fn item_for(p: &Publication, positions: bool) -> Item {
    let (msg, len) = match (&p.payload, p.offset()) {
        (Payload::Binary(data), Some(offset)) if positions => {
            let b = server::binary_frame_with_offset(p.channel.as_str(), offset, data);
            let len = b.len();
            (Message::Binary(b), len)
        }
        _ => match encode_delivery(p) {
            Delivery::Text(s) => {
                let len = s.len();
                (Message::Text(s.into()), len)
            }
            Delivery::Binary(b) => {
                let len = b.len();
                (Message::Binary(b), len)
            }
        },
    };
    Item {
        msg,
        len,
        published_at_us: p.published_at_us,
        delivery: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use herald_broker::{inbound, MemoryBroker};
    use herald_protocol::Payload;

    fn hub() -> Arc<Hub> {
        let metrics = Metrics::unregistered();
        let (tx, _rx) = inbound(8, metrics.clone());
        Arc::new(Hub::new(Arc::new(MemoryBroker::new(tx)), metrics, 100))
    }

    fn texts(h: &SessionHandle) -> Vec<serde_json::Value> {
        let mut q = Vec::new();
        h.drain(&mut q);
        q.into_iter()
            .map(|i| match i.msg {
                Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn positioned(channel: &ChannelName, offset: u64) -> Publication {
        let mut p = Publication::now(
            channel.clone(),
            Payload::Json(Bytes::from(offset.to_string())),
        );
        p.position = Some(StreamPosition {
            offset,
            epoch: herald_protocol::Epoch::new(1).unwrap(),
        });
        p
    }

    /// Publications that reach the channel while a subscriber reads the history are
    /// held for it and merged after the history: none lost, none twice. A subscriber
    /// that was live all along gets each once too.
    #[tokio::test]
    async fn live_publications_during_a_resume_are_merged_after_the_history() {
        let hub = hub();
        let news = ChannelName::new("news").unwrap();
        let env = crate::handle::tests::env(1 << 20);
        let policy = HistoryPolicy {
            size: 100,
            ttl: std::time::Duration::from_secs(60),
            meta_ttl: std::time::Duration::from_secs(60),
        };
        let opts = SubscribeOpts {
            history: Some(policy),
            positions: true,
        };
        let live = Arc::new(SessionHandle::new(0, env.clone()));
        hub.subscribe(&news, 1, &live, opts);
        let top = StreamPosition {
            offset: 0,
            epoch: herald_protocol::Epoch::new(1).unwrap(),
        };
        let empty = HistoryPage {
            top,
            publications: vec![],
        };
        assert_eq!(
            hub.complete(&news, 1, Some(1), &empty, None, 100, false),
            Completion::Done { recovered: None }
        );
        hub.dispatch(positioned(&news, 1));
        hub.dispatch(positioned(&news, 2));

        // A client that had offset 1 resumes; its history read saw the stream up to 2,
        // then 3 and 4 arrive before the subscribe completes (2 arrives again too).
        let resuming = Arc::new(SessionHandle::new(0, env.clone()));
        hub.subscribe(&news, 2, &resuming, opts);
        hub.dispatch(positioned(&news, 3));
        hub.dispatch(positioned(&news, 4));
        let page = HistoryPage {
            top: StreamPosition { offset: 2, ..top },
            publications: vec![positioned(&news, 2)],
        };
        let since = Some(Since {
            offset: 1,
            epoch: Some(top.epoch),
        });
        assert_eq!(
            hub.complete(&news, 2, Some(7), &page, since, 100, false),
            Completion::Done {
                recovered: Some(true)
            }
        );
        hub.dispatch(positioned(&news, 5));
        let got = texts(&resuming);
        assert_eq!(got[0]["op"], "subscribed");
        assert_eq!(
            (got[0]["offset"].as_u64(), got[0]["recovered"].as_bool()),
            (Some(2), Some(true))
        );
        let offsets: Vec<u64> = got[1..]
            .iter()
            .map(|m| m["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(offsets, vec![2, 3, 4, 5]);
        let offsets: Vec<u64> = texts(&live)[1..]
            .iter()
            .map(|m| m["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(offsets, vec![1, 2, 3, 4, 5]);
    }

    /// Found by the rolling-restart test: on a fresh node two subscribers complete
    /// before any publication arrives, the one whose history read was later first. The
    /// other still gets what was in flight between the two reads.
    #[tokio::test]
    async fn subscribers_completing_out_of_order_each_get_what_was_in_flight() {
        let hub = hub();
        let news = ChannelName::new("news").unwrap();
        let env = crate::handle::tests::env(1 << 20);
        let opts = SubscribeOpts {
            history: Some(HistoryPolicy {
                size: 100,
                ttl: std::time::Duration::from_secs(60),
                meta_ttl: std::time::Duration::from_secs(60),
            }),
            positions: true,
        };
        let early = Arc::new(SessionHandle::new(0, env.clone()));
        let late = Arc::new(SessionHandle::new(0, env.clone()));
        hub.subscribe(&news, 1, &early, opts);
        hub.subscribe(&news, 2, &late, opts);
        let at = |offset| HistoryPage {
            top: StreamPosition {
                offset,
                epoch: herald_protocol::Epoch::new(1).unwrap(),
            },
            publications: vec![],
        };
        hub.complete(&news, 2, None, &at(5), None, 100, false);
        hub.complete(&news, 1, None, &at(3), None, 100, false);
        for n in 4..=6 {
            hub.dispatch(positioned(&news, n));
        }
        let offsets = |h: &SessionHandle| -> Vec<u64> {
            texts(h)[1..]
                .iter()
                .map(|m| m["offset"].as_u64().unwrap())
                .collect()
        };
        assert_eq!(offsets(&early), vec![4, 5, 6]);
        assert_eq!(offsets(&late), vec![6]);
    }

    #[tokio::test]
    async fn a_gap_waits_for_the_repair_and_duplicates_are_skipped() {
        // The memory broker's stream has 1..=3; the node saw only 1 and then 3.
        let metrics = Metrics::unregistered();
        let (tx, mut rx) = herald_broker::inbound(16, metrics.clone());
        let broker = Arc::new(MemoryBroker::new(tx));
        let hub = Arc::new(Hub::new(broker.clone(), metrics.clone(), 100));
        let news = ChannelName::new("news").unwrap();
        let policy = HistoryPolicy {
            size: 100,
            ttl: std::time::Duration::from_secs(60),
            meta_ttl: std::time::Duration::from_secs(60),
        };
        let reqs = (1..=3)
            .map(|n| herald_broker::PublishRequest {
                history: Some(policy),
                ..herald_broker::PublishRequest::plain(Publication::now(
                    news.clone(),
                    Payload::Json(Bytes::from(format!("{n}"))),
                ))
            })
            .collect();
        broker.publish(reqs).await.unwrap();
        let mut stream = Vec::new();
        while let Some(Received::Publication(p)) = rx.try_recv() {
            stream.push(p);
        }
        let env = crate::handle::tests::env(1 << 20);
        let h = Arc::new(SessionHandle::new(0, env));
        let opts = SubscribeOpts {
            history: Some(policy),
            positions: false,
        };
        hub.subscribe(&news, 1, &h, opts);
        let page = HistoryPage {
            top: StreamPosition {
                offset: 0,
                ..stream[0].position.unwrap()
            },
            publications: vec![],
        };
        hub.complete(&news, 1, None, &page, None, 100, false);
        hub.dispatch(stream[0].clone());
        hub.dispatch(stream[2].clone());
        hub.dispatch(stream[0].clone());
        for _ in 0..500 {
            if metrics.history_repairs.get() == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let offsets: Vec<u64> = texts(&h)[1..]
            .iter()
            .map(|m| m["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(offsets, vec![1, 2, 3]);
        // The repair delivered 2 and 3 from the stream; the live 3 and the second 1
        // were then skipped.
        assert_eq!(metrics.history_repaired.get(), 2);
        assert_eq!(metrics.history_duplicates.get(), 2);
    }

    #[test]
    fn fan_out_shares_one_encoding() {
        let hub = hub();
        let news = ChannelName::new("news").unwrap();
        let env = crate::handle::tests::env(1 << 20);
        let a = Arc::new(SessionHandle::new(0, env.clone()));
        let b = Arc::new(SessionHandle::new(0, env.clone()));
        let opts = SubscribeOpts::default();
        assert!(hub.subscribe(&news, 1, &a, opts).is_ready());
        hub.subscribe(&news, 1, &a, opts);
        hub.subscribe(&news, 2, &b, opts);
        assert_eq!(hub.n_subscribers("news"), 2);
        hub.dispatch(Publication::now(
            news.clone(),
            Payload::Json(Bytes::from_static(b"1")),
        ));
        let (mut qa, mut qb) = (Vec::new(), Vec::new());
        a.drain(&mut qa);
        b.drain(&mut qb);
        let (Message::Text(ta), Message::Text(tb)) = (&qa[0].msg, &qb[0].msg) else {
            panic!("expected text");
        };
        assert_eq!(ta.as_str(), r#"{"op":"message","channel":"news","data":1}"#);
        // The same allocation, not two copies.
        assert_eq!(ta.as_str().as_ptr(), tb.as_str().as_ptr());
        assert!(hub.unsubscribe(&news, 1));
        assert!(hub.unsubscribe(&news, 2));
        assert_eq!(hub.n_subscribers("news"), 0);
        assert!(!hub.unsubscribe(&news, 2));
    }
}
