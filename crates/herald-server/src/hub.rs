//! The hub: which local sessions subscribe to which channel, and fan-out of what the
//! broker delivers.
//!
//! The channel map is sharded by channel hash so subscribe/unsubscribe churn on one
//! channel does not contend with fan-out on another. Fan-out on a plain channel encodes
//! a publication once ([`Item::delivery`]) and pushes a cheap clone of the same bytes
//! into each subscriber's [`SessionHandle`]; it never awaits, so one slow subscriber
//! can only ever hurt itself. A history channel's subscribers belong to its
//! [`Stream`] (the `history` module), which decides what each of them receives; the
//! hub only routes to it.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use herald_broker::{Broker, HistoryPolicy, InboundReceiver, Ready, Received};
use herald_metrics::Metrics;
use herald_protocol::client::Since;
use herald_protocol::{ChannelName, Publication};
use indexmap::IndexMap;
use parking_lot::RwLock;

use crate::handle::{ConnId, Item, SessionHandle};
use crate::history::{DeltaLimits, Stream, StreamEnv};

const SHARDS: usize = 32;

/// A run ([`Hub::dispatch_run`]) ends at this many publications, or at
/// [`RUN_BYTES`] of frames: it goes to each subscriber whole or not at all, and holds
/// its channel's shard lock while it is framed and pushed. The longer the run, the
/// fewer pushes, wake-ups and writes a burst costs: a burst of 400 small publications
/// is one or two runs, written to each subscriber like the raw-write floor writes it.
const RUN_PUBLICATIONS: usize = BATCH;

/// See [`RUN_PUBLICATIONS`]: a run larger than what a subscriber has room for would
/// close it as a slow consumer even if it reads fast, so a run is also kept within a
/// quarter of `limits.outbound_queue_bytes`.
const RUN_BYTES: usize = 64 * 1024;

/// What a delivery frame adds to a publication's payload and channel name (the JSON
/// envelope, the offset, the frame header), for the estimate that bounds a run.
const FRAME_OVERHEAD: usize = 64;

/// What a dispatcher takes from the inbound queue at once.
const BATCH: usize = 256;

/// A plain channel with at most this many local subscribers is written to from the
/// dispatcher (`SessionHandle::push_to_all`'s `direct`): its few writes cost less than
/// waking a writer task each (unless it is busy on a node that is behind, see
/// [`Hub::dispatch_run`]). A bigger channel's subscribers are written by their writer
/// tasks, which run on every core.
const DIRECT_SUBSCRIBERS: usize = 64;

struct Channel {
    /// Whether the broker delivers this channel yet.
    ready: Ready,
    /// Its local subscribers (plain), or its history stream.
    members: Members,
    /// The last round ([`Dispatcher::round`]) of its dispatcher that fanned it out.
    last_round: AtomicU64,
}

/// A channel's local subscribers.
enum Members {
    /// Every publication goes to every subscriber.
    Plain(IndexMap<ConnId, Arc<SessionHandle>>),
    /// A history channel: its stream holds the subscribers and where each stands.
    History(Arc<Stream>),
    /// A node-internal channel (the control plane): one listener in the node.
    Node(tokio::sync::mpsc::Sender<Publication>),
}

impl Members {
    #[cfg(test)]
    fn len(&self) -> usize {
        match self {
            Members::Plain(m) => m.len(),
            Members::History(s) => s.len(),
            Members::Node(_) => 1,
        }
    }
}

/// How a session subscribes.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SubscribeOpts {
    /// The channel's history policy (from its rule), if it keeps history.
    pub(crate) history: Option<HistoryPolicy>,
    /// The client tracks positions on this subscription.
    pub(crate) positions: bool,
    /// The client applies Fossil deltas on this subscription, and the channel's rule
    /// allows them.
    pub(crate) delta: bool,
}

/// What [`Hub::subscribe`] hands back.
pub(crate) struct Subscribed {
    /// Tells when the broker delivers the channel.
    pub(crate) ready: Ready,
    /// On a history channel: its stream, which completes the subscribe
    /// ([`Stream::resume`]); until then the subscriber receives nothing.
    pub(crate) stream: Option<Arc<Stream>>,
}

/// Channels → local subscribers, and the dispatcher that fans out what the broker
/// delivers. One per node.
pub(crate) struct Hub {
    /// Channel name → channel, split so that churn on one channel does not block fan-out on another.
    shards: Box<[RwLock<HashMap<ChannelName, Channel>>]>,
    /// Picks a channel's shard; random per node, so no client can aim at one shard.
    hasher: RandomState,
    /// Told which channels this node needs (interest), under the shard lock so that
    /// changes for one channel reach it in the order they happened.
    broker: Arc<dyn Broker>,
    /// `herald_channels` and `herald_subscriptions` are kept here.
    metrics: Metrics,
    /// Frame bytes a run holds at most ([`RUN_BYTES`], or less for small queues).
    run_bytes: usize,
    /// Shared by every history channel's stream.
    streams: Arc<StreamEnv>,
    /// Told when a channel gets its first local subscriber (`true`) or loses its last
    /// (`false`), when webhooks want occupancy (bounded: a change that does not fit is
    /// settled by the next occupancy refresh, or the entry's expiry).
    occupancy: std::sync::OnceLock<tokio::sync::mpsc::Sender<(ChannelName, bool)>>,
}

impl Hub {
    /// `max_pending`: `limits.max_recovery_buffer`; `replay_budget`: what one replay may
    /// queue to a subscriber (half of `limits.outbound_queue_bytes`); `delta`:
    /// `limits.max_delta_bytes` and `limits.max_delta_time`.
    pub(crate) fn new(
        broker: Arc<dyn Broker>,
        metrics: Metrics,
        max_pending: usize,
        replay_budget: usize,
        delta: DeltaLimits,
    ) -> Self {
        Hub {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            hasher: RandomState::new(),
            streams: Arc::new(StreamEnv::new(
                broker.clone(),
                metrics.clone(),
                max_pending,
                replay_budget,
                delta,
            )),
            broker,
            metrics,
            run_bytes: RUN_BYTES.min(replay_budget / 2),
            occupancy: std::sync::OnceLock::new(),
        }
    }

    /// From now on, tells `to` when channels become occupied or vacated on this node.
    pub(crate) fn watch_occupancy(&self, to: tokio::sync::mpsc::Sender<(ChannelName, bool)>) {
        let _ = self.occupancy.set(to);
    }

    fn occupancy_changed(&self, channel: &ChannelName, occupied: bool) {
        if let Some(to) = self.occupancy.get() {
            let _ = to.try_send((channel.clone(), occupied));
        }
    }

    /// Every channel with a local subscriber, internal ones left out.
    pub(crate) fn occupied(&self) -> Vec<ChannelName> {
        self.shards
            .iter()
            .flat_map(|s| {
                s.read()
                    .keys()
                    .filter(|c| !c.is_internal())
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn shard(&self, channel: &str) -> &RwLock<HashMap<ChannelName, Channel>> {
        &self.shards[self.hasher.hash_one(channel) as usize % SHARDS]
    }

    /// Adds `conn` to `channel`'s subscribers. On a history channel the subscriber
    /// receives nothing until its stream completes the subscribe.
    pub(crate) fn subscribe(
        &self,
        channel: &ChannelName,
        conn: ConnId,
        handle: &Arc<SessionHandle>,
        opts: SubscribeOpts,
    ) -> Subscribed {
        let mut shard = self.shard(channel.as_str()).write();
        let entry = shard.entry(channel.clone()).or_insert_with(|| {
            self.metrics.channels.inc();
            self.occupancy_changed(channel, true);
            let members = match opts.history {
                Some(policy) => Members::History(Arc::new(Stream::new(
                    channel.clone(),
                    policy,
                    self.streams.clone(),
                ))),
                None => Members::Plain(IndexMap::new()),
            };
            Channel {
                ready: self.broker.subscribe(channel),
                members,
                last_round: AtomicU64::new(0),
            }
        });
        let (new, stream) = match &mut entry.members {
            Members::Plain(m) => (m.insert(conn, handle.clone()).is_none(), None),
            Members::History(s) => (
                s.join(conn, handle, opts.positions, opts.delta),
                Some(s.clone()),
            ),
            // Internal names are not a client's to subscribe to (no channel name parses
            // to one); should one get here, it takes nothing.
            Members::Node(_) => (false, None),
        };
        if new {
            self.metrics.subscriptions.inc();
        }
        Subscribed {
            ready: entry.ready.clone(),
            stream,
        }
    }

    /// Removes `conn` from `channel`'s subscribers. Returns whether it was one.
    pub(crate) fn unsubscribe(&self, channel: &ChannelName, conn: ConnId) -> bool {
        let mut shard = self.shard(channel.as_str()).write();
        let Some(entry) = shard.get_mut(channel.as_str()) else {
            return false;
        };
        let (removed, left) = match &mut entry.members {
            Members::Plain(m) => (m.swap_remove(&conn).is_some(), m.len()),
            Members::History(s) => s.leave(conn),
            Members::Node(_) => return false,
        };
        if removed {
            self.metrics.subscriptions.dec();
        }
        if left == 0 {
            shard.remove(channel.as_str());
            self.broker.unsubscribe(channel);
            self.metrics.channels.dec();
            self.occupancy_changed(channel, false);
        }
        removed
    }

    /// Makes the node itself the listener of an internal channel (`channel` must be
    /// one, [`ChannelName::internal`]): what the broker delivers there goes to `to`
    /// (bounded: a full queue drops, counted). For the node's life.
    pub(crate) fn listen(&self, channel: &ChannelName, to: tokio::sync::mpsc::Sender<Publication>) {
        debug_assert!(channel.is_internal());
        let mut shard = self.shard(channel.as_str()).write();
        shard.insert(
            channel.clone(),
            Channel {
                ready: self.broker.subscribe(channel),
                members: Members::Node(to),
                last_round: AtomicU64::new(0),
            },
        );
    }

    /// Pushes a non-delivery frame (`join`, `leave`) to every local subscriber of
    /// `channel`; like fan-out, it never waits (a full queue closes that subscriber).
    pub(crate) fn push_to_subscribers(&self, channel: &str, text: &str) {
        let shard = self.shard(channel).read();
        let Some(entry) = shard.get(channel) else {
            return;
        };
        let handles: Vec<Arc<SessionHandle>> = match &entry.members {
            Members::Plain(m) => m.values().cloned().collect(),
            Members::History(s) => s.handles(),
            Members::Node(_) => return,
        };
        drop(shard);
        for h in handles {
            h.push(Item::reply(text.to_owned()));
        }
    }

    /// On a history channel `conn` holds: answers its subscribe again (see
    /// [`Stream::subscribed_again`]) and returns true; false elsewhere (the caller
    /// answers).
    pub(crate) fn subscribed_again(
        &self,
        channel: &str,
        conn: ConnId,
        id: Option<u64>,
        delta: Option<bool>,
        since: Option<Since>,
    ) -> bool {
        self.stream(channel)
            .is_some_and(|s| s.subscribed_again(conn, id, delta, since))
    }

    /// `channel`'s stream, when it is a history channel with local subscribers.
    pub(crate) fn stream(&self, channel: &str) -> Option<Arc<Stream>> {
        match self.shard(channel).read().get(channel).map(|c| &c.members) {
            Some(Members::History(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// Whether `conn` subscribes to `channel`.
    pub(crate) fn has(&self, channel: &str, conn: ConnId) -> bool {
        self.shard(channel)
            .read()
            .get(channel)
            .is_some_and(|c| match &c.members {
                Members::Plain(m) => m.contains_key(&conn),
                Members::History(s) => s.contains(conn),
                Members::Node(_) => false,
            })
    }

    /// Every channel with a local subscriber (internal ones left out) that `keep`
    /// accepts, with its local subscriber count.
    pub(crate) fn channels(&self, keep: impl Fn(&str) -> bool) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            for (name, entry) in shard.read().iter() {
                let n = match &entry.members {
                    Members::Plain(m) => m.len(),
                    Members::History(s) => s.len(),
                    Members::Node(_) => continue,
                };
                if n > 0 && keep(name.as_str()) {
                    out.push((name.as_str().to_owned(), n as u64));
                }
            }
        }
        out
    }

    /// Local subscribers of `channel` (for tests and introspection).
    #[cfg(test)]
    pub(crate) fn n_subscribers(&self, channel: &str) -> usize {
        self.shard(channel)
            .read()
            .get(channel)
            .map_or(0, |c| c.members.len())
    }

    /// Delivers `p` to every local subscriber of its channel.
    #[cfg(test)]
    pub(crate) fn dispatch(&self, p: Publication) {
        self.dispatch_run(&mut vec![p], Dispatcher::only());
    }

    /// Fans out `batch` (emptied) as the only dispatcher does.
    #[cfg(test)]
    pub(crate) fn dispatch_received(&self, batch: &mut Vec<Received>) {
        let mut run = Vec::new();
        self.dispatch_batch(batch, &mut run, Dispatcher::only());
    }

    /// Delivers `run`, publications of one channel in their order, to every local
    /// subscriber of it, and empties it. On a plain channel each subscriber takes the
    /// whole run in one push (one lock, one budget check, one wake-up), which is what a
    /// burst costs most.
    ///
    /// A plain channel with few local subscribers is written to from here (`direct`),
    /// unless the dispatcher `me` is behind and the channel was fanned out in its
    /// previous round too (or earlier in this one: a run cut at its size limit): a
    /// busy channel on a node that cannot keep up. Its subscribers' writers then write
    /// what accumulates meanwhile with one write each, where direct writes would cost a
    /// write per run.
    fn dispatch_run(&self, run: &mut Vec<Publication>, me: Dispatcher) {
        let Some(first) = run.first() else { return };
        // The shard lock is held throughout, so a channel dropped and created again
        // meanwhile cannot miss a publication that was already on its way.
        let shard = self.shard(first.channel.as_str()).read();
        let Some(entry) = shard.get(first.channel.as_str()) else {
            run.clear();
            return;
        };
        match &entry.members {
            Members::History(stream) => {
                for p in run.drain(..) {
                    stream.arrive(p);
                }
            }
            Members::Plain(m) => {
                let before = entry.last_round.swap(me.round, Ordering::Relaxed);
                let busy = me.behind && before != 0 && before + 1 >= me.round;
                let direct = m.len() <= DIRECT_SUBSCRIBERS && !busy;
                SessionHandle::push_to_all(m.values(), &Item::run(run), &self.metrics, direct);
                run.clear();
            }
            Members::Node(to) => {
                for p in run.drain(..) {
                    if to.try_send(p).is_err() {
                        self.metrics.control_dropped.inc();
                    }
                }
            }
        }
    }

    /// The broker's subscriptions were re-established: every history channel catches
    /// up from its stream.
    #[cfg(test)]
    pub(crate) fn catch_up(&self) {
        self.catch_up_for(Dispatcher::only());
    }

    /// The broker's subscriptions were re-established: every history channel of
    /// `dispatcher` catches up from its stream.
    fn catch_up_for(&self, dispatcher: Dispatcher) {
        for shard in self.shards.iter() {
            for (name, entry) in shard.read().iter() {
                if let Members::History(stream) = &entry.members {
                    if self.dispatcher_of(name.as_str(), dispatcher.of) == dispatcher.index {
                        stream.catch_up();
                    }
                }
            }
        }
    }

    /// Which of `of` dispatchers fans `channel` out.
    fn dispatcher_of(&self, channel: &str, of: usize) -> usize {
        // The high half: the low bits pick the channel's map shard.
        ((self.hasher.hash_one(channel) >> 32) as usize) % of.max(1)
    }

    /// Feeds what the broker hands over into fan-out until every sender is gone,
    /// each channel's publications in a batch together, with `dispatchers` tasks:
    /// each fans out the channels [`Hub::dispatcher_of`] gives it, so that many
    /// channels' fan-out (written straight into sockets, see
    /// [`SessionHandle::push_to_all`]) runs on every core, and each channel's
    /// publications keep their order (one dispatcher each).
    pub(crate) async fn run_dispatcher(
        self: Arc<Self>,
        mut inbound: InboundReceiver,
        dispatchers: usize,
    ) {
        let mut batch = Vec::with_capacity(BATCH);
        if dispatchers <= 1 {
            let mut run = Vec::with_capacity(RUN_PUBLICATIONS);
            let mut me = Dispatcher::only();
            while inbound.recv_many(&mut batch, BATCH).await > 0 {
                me.next_round(!inbound.is_empty());
                self.dispatch_batch(&mut batch, &mut run, me);
            }
            return;
        }
        // Owned by this future: dropped (shutdown), the dispatchers are aborted.
        let mut tasks = tokio::task::JoinSet::new();
        let mut to = Vec::with_capacity(dispatchers);
        for index in 0..dispatchers {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Part>(DISPATCHER_QUEUE);
            to.push(tx);
            let (hub, mut me) = (
                self.clone(),
                Dispatcher {
                    index,
                    of: dispatchers,
                    ..Dispatcher::only()
                },
            );
            tasks.spawn(async move {
                let mut run = Vec::with_capacity(RUN_PUBLICATIONS);
                while let Some(Part { mut batch, behind }) = rx.recv().await {
                    me.next_round(behind || !rx.is_empty());
                    hub.dispatch_batch(&mut batch, &mut run, me);
                }
            });
        }
        'feed: while inbound.recv_many(&mut batch, BATCH).await > 0 {
            let mut parts: Vec<Vec<Received>> = (0..dispatchers).map(|_| Vec::new()).collect();
            for r in batch.drain(..) {
                match r {
                    Received::Publication(p) => {
                        parts[self.dispatcher_of(p.channel.as_str(), dispatchers)]
                            .push(Received::Publication(p));
                    }
                    // Every dispatcher catches its channels up after what came before.
                    Received::Resubscribed => {
                        for part in &mut parts {
                            part.push(Received::Resubscribed);
                        }
                    }
                }
            }
            let behind = !inbound.is_empty();
            for (tx, batch) in to.iter().zip(parts) {
                // Waits when a dispatcher is behind: the inbound queue before it is
                // bounded, and counts what it cannot take.
                if !batch.is_empty() && tx.send(Part { batch, behind }).await.is_err() {
                    // A dispatcher ended, which only a panic does: end (the node
                    // stops: its fan-out is gone), saying why below.
                    break 'feed;
                }
            }
        }
        // Every sender is gone (or a dispatcher failed): the dispatchers finish what
        // they hold, then end.
        drop(to);
        while let Some(ended) = tasks.join_next().await {
            if let Err(e) = ended {
                tracing::error!(error = %e, "a fan-out dispatcher failed");
            }
        }
    }

    /// Fans out `batch` (emptied), each channel's publications in it as one run
    /// ([`Hub::group_by_channel`]).
    fn dispatch_batch(
        &self,
        batch: &mut Vec<Received>,
        run: &mut Vec<Publication>,
        me: Dispatcher,
    ) {
        self.group_by_channel(batch);
        let frame_bytes =
            |p: &Publication| p.payload.len() + p.channel.as_str().len() + FRAME_OVERHEAD;
        let mut run_bytes = 0;
        for r in batch.drain(..) {
            match r {
                Received::Publication(p) => {
                    let bytes = frame_bytes(&p);
                    if run.last().is_some_and(|q| q.channel != p.channel)
                        || run.len() == RUN_PUBLICATIONS
                        || run_bytes + bytes > self.run_bytes
                    {
                        self.dispatch_run(run, me);
                        run_bytes = 0;
                    }
                    run_bytes += bytes;
                    run.push(p);
                }
                Received::Resubscribed => {
                    self.dispatch_run(run, me);
                    run_bytes = 0;
                    self.catch_up_for(me);
                }
            }
        }
        self.dispatch_run(run, me);
    }

    /// Puts each channel's publications in `batch` next to each other, in their order,
    /// channels in the order they first appear; a resubscription stays where it is,
    /// between what came before and after it. Many busy channels interleave (a price
    /// board: every symbol changes every tick), and a run per publication would cost
    /// each subscriber a write per publication; grouped, a subscriber gets what the
    /// batch holds for it in one write. Channels have no order among themselves
    /// (PROTOCOL.md): with two or more workers, several dispatchers interleave them
    /// anyway.
    fn group_by_channel(&self, batch: &mut [Received]) {
        let hash = |r: &Received| match r {
            Received::Publication(p) => self.hasher.hash_one(p.channel.as_str()),
            Received::Resubscribed => unreachable!("segments are split at these"),
        };
        let mut first: HashMap<u64, usize> = HashMap::new();
        for segment in batch.split_mut(|r| matches!(r, Received::Resubscribed)) {
            // Fewer than three cannot interleave.
            if segment.len() < 3 {
                continue;
            }
            // Each channel's place: where it first appears. Two channels whose hashes
            // collide share one and stay interleaved, which only costs a run (runs
            // break where the channel changes).
            first.clear();
            let mut grouped = true;
            let mut last = 0;
            for r in segment.iter() {
                let next = first.len();
                let place = *first.entry(hash(r)).or_insert(next);
                grouped &= place >= last;
                last = place;
            }
            if !grouped {
                // Stable: a channel's publications keep their order.
                segment.sort_by_cached_key(|r| first[&hash(r)]);
            }
        }
    }
}

/// One of the node's fan-out dispatchers: `index` of `of`, and the round (batch) it is
/// in.
#[derive(Debug, Clone, Copy)]
struct Dispatcher {
    /// Which one.
    index: usize,
    /// Of how many.
    of: usize,
    /// Counts its batches, from 1 (a channel's `last_round` 0 is none).
    round: u64,
    /// More was waiting when it took this batch: the node is not keeping up.
    behind: bool,
}

impl Dispatcher {
    /// The only dispatcher, before its first round.
    fn only() -> Self {
        Dispatcher {
            index: 0,
            of: 1,
            round: 0,
            behind: false,
        }
    }

    /// Starts the next batch.
    fn next_round(&mut self, behind: bool) {
        self.round += 1;
        self.behind = behind;
    }
}

/// What the feed hands a dispatcher: its share of a batch, and whether more was
/// waiting in the inbound queue when the feed took it.
struct Part {
    /// The publications (and resubscriptions) of the dispatcher's channels.
    batch: Vec<Received>,
    /// More was waiting in the inbound queue.
    behind: bool,
}

/// Batches (of at most [`BATCH`] publications) waiting for one dispatcher: a little
/// slack past `limits.inbound_queue`, so that one busy dispatcher holds the others up
/// only once it is this far behind.
const DISPATCHER_QUEUE: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use herald_broker::{inbound, MemoryBroker};
    use herald_protocol::Payload;
    use tokio_tungstenite::tungstenite::Message;

    use crate::wire::Out;

    fn hub() -> Arc<Hub> {
        let metrics = Metrics::unregistered();
        let (tx, _rx) = inbound(8, metrics.clone());
        Arc::new(Hub::new(
            Arc::new(MemoryBroker::new(tx)),
            metrics,
            100,
            1 << 20,
            DeltaLimits::default(),
        ))
    }

    /// One session per channel in `channels`, each subscribed to its own.
    fn one_subscriber_each(hub: &Hub, channels: &[ChannelName]) -> Vec<Arc<SessionHandle>> {
        let env = crate::handle::tests::env(64 << 20);
        channels
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let h = Arc::new(SessionHandle::new(0, env.clone()));
                hub.subscribe(c, i as u64, &h, SubscribeOpts::default());
                h
            })
            .collect()
    }

    #[test]
    fn fan_out_shares_one_encoding() {
        let hub = hub();
        let news = ChannelName::new("news").unwrap();
        let env = crate::handle::tests::env(1 << 20);
        let a = Arc::new(SessionHandle::new(0, env.clone()));
        let b = Arc::new(SessionHandle::new(0, env.clone()));
        let opts = SubscribeOpts::default();
        assert!(hub.subscribe(&news, 1, &a, opts).ready.is_ready());
        hub.subscribe(&news, 1, &a, opts);
        hub.subscribe(&news, 2, &b, opts);
        assert_eq!(hub.n_subscribers("news"), 2);
        hub.dispatch(Publication::now(
            news.clone(),
            Payload::Json(Bytes::from_static(b"1")),
        ));
        let (mut qa, mut qb) = (
            std::collections::VecDeque::new(),
            std::collections::VecDeque::new(),
        );
        a.drain(&mut qa);
        b.drain(&mut qb);
        let (Out::Frames(fa), Out::Frames(fb)) = (&qa[0].out, &qb[0].out) else {
            panic!("expected framed deliveries");
        };
        assert_eq!(
            qa[0].out.clone().into_messages(),
            [Message::Text(
                r#"{"op":"message","channel":"news","data":1}"#.into()
            )]
        );
        // The same allocation, not two copies.
        assert_eq!(fa.as_ptr(), fb.as_ptr());
        assert!(hub.unsubscribe(&news, 1));
        assert!(hub.unsubscribe(&news, 2));
        assert_eq!(hub.n_subscribers("news"), 0);
        assert!(!hub.unsubscribe(&news, 2));
    }

    /// Interleaved channels in one batch reach each subscriber as one run per channel,
    /// in order; a resubscription splits them (what came before it is fanned out
    /// before the catch-up, what came after it after).
    #[test]
    fn a_batch_of_interleaved_channels_is_one_run_per_channel() {
        let hub = hub();
        let names: Vec<ChannelName> = ["a", "b", "c"]
            .iter()
            .map(|c| ChannelName::new(c).unwrap())
            .collect();
        let handles = one_subscriber_each(&hub, &names);
        // a1 b1 c1 a2 b2 c2 ... a5 b5 c5, a resubscription, then a6 b6 c6 a7 b7 c7.
        let publication = |c: usize, n: usize| {
            Received::Publication(Publication::now(
                names[c].clone(),
                Payload::Json(Bytes::from(n.to_string())),
            ))
        };
        let mut batch: Vec<Received> = (1..=5)
            .flat_map(|n| (0..3).map(move |c| (c, n)))
            .map(|(c, n)| publication(c, n))
            .collect();
        batch.push(Received::Resubscribed);
        batch.extend((6..=7).flat_map(|n| (0..3).map(move |c| publication(c, n))));
        let mut run = Vec::new();
        hub.dispatch_batch(&mut batch, &mut run, Dispatcher::only());
        assert!(batch.is_empty() && run.is_empty());
        for (c, h) in handles.iter().enumerate() {
            let mut q = std::collections::VecDeque::new();
            h.drain(&mut q);
            let runs: Vec<u32> = q.iter().map(|i| i.deliveries).collect();
            assert_eq!(runs, [5, 2], "channel {}", names[c]);
            let got: Vec<String> = q
                .into_iter()
                .flat_map(|i| i.out.into_messages())
                .map(|m| {
                    let v: serde_json::Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
                    assert_eq!(v["channel"], names[c].as_str());
                    v["data"].to_string()
                })
                .collect();
            let want: Vec<String> = (1..=7).map(|n| n.to_string()).collect();
            assert_eq!(got, want, "channel {}", names[c]);
        }
    }

    /// A small channel's subscribers are written to directly, unless the dispatcher is
    /// behind and the channel was fanned out in its round before too: then their
    /// writers take it, and write what accumulates meanwhile at once.
    #[test]
    fn a_busy_channel_on_a_node_behind_goes_through_writers() {
        let hub = hub();
        let news = ChannelName::new("news").unwrap();
        let h = Arc::new(SessionHandle::new(0, crate::handle::tests::env(1 << 20)));
        hub.subscribe(&news, 1, &h, SubscribeOpts::default());
        let mut me = Dispatcher::only();
        // Whether the round's push asked for a direct write.
        let mut round = |behind: bool, publish: bool| {
            me.next_round(behind);
            if publish {
                let p = Publication::now(news.clone(), Payload::Json(Bytes::from("1")));
                hub.dispatch_run(&mut vec![p], me);
            }
            h.parks_at_once()
        };
        assert!(round(true, true), "first seen: direct");
        assert!(
            !round(true, true),
            "seen in the round before, behind: writers"
        );
        assert!(round(false, true), "keeping up: direct");
        round(true, false);
        assert!(round(true, true), "not seen in the round before: direct");
        assert!(!round(true, true), "busy again");
    }

    /// The dispatcher is behind while the inbound queue holds more than it takes:
    /// a channel in two such batches in a row goes through writers; one in a batch
    /// taken when nothing more waited is written directly.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_dispatcher_knows_when_it_is_behind() {
        for dispatchers in [1, 2] {
            let hub = hub();
            let (a, b) = (
                ChannelName::new("a").unwrap(),
                ChannelName::new("b").unwrap(),
            );
            let handles = one_subscriber_each(&hub, &[a.clone(), b.clone()]);
            let (ha, hb) = (&handles[0], &handles[1]);
            // Three batches waiting before the dispatcher starts: a, a (each taken
            // while more waited), then b (nothing more).
            let (to_hub, from_broker) = inbound(3 * BATCH, Metrics::unregistered());
            for c in [&a, &a, &b] {
                for _ in 0..BATCH {
                    let p = Publication::now(c.clone(), Payload::Json(Bytes::from("1")));
                    to_hub.send(p).await.unwrap();
                }
            }
            drop(to_hub);
            hub.clone().run_dispatcher(from_broker, dispatchers).await;
            assert!(
                !ha.parks_at_once(),
                "{dispatchers}: a, busy, through writers"
            );
            assert!(hb.parks_at_once(), "{dispatchers}: b, direct");
            let (mut qa, mut qb) = Default::default();
            ha.drain(&mut qa);
            hb.drain(&mut qb);
            let delivered = |q: &std::collections::VecDeque<Item>| -> usize {
                q.iter().map(|i| i.deliveries as usize).sum()
            };
            assert_eq!((delivered(&qa), delivered(&qb)), (2 * BATCH, BATCH));
        }
    }

    /// A burst becomes few runs, each within a quarter of the subscriber's queue
    /// budget however small that is configured, and nothing is lost or reordered.
    #[test]
    fn runs_are_long_but_fit_the_queue() {
        let news = ChannelName::new("news").unwrap();
        // A hub with `limits.outbound_queue_bytes` of `queue`, and a subscriber.
        let hub_with = |queue: usize| {
            let metrics = Metrics::unregistered();
            let (tx, _rx) = inbound(8, metrics.clone());
            let hub = Hub::new(
                Arc::new(MemoryBroker::new(tx)),
                metrics,
                100,
                queue / 2,
                DeltaLimits::default(),
            );
            let h = Arc::new(SessionHandle::new(0, crate::handle::tests::env(64 << 20)));
            hub.subscribe(&news, 1, &h, SubscribeOpts::default());
            (hub, h)
        };
        let publish = |n: usize, size: usize| -> Vec<Received> {
            (0..n)
                .map(|i| {
                    let data = format!("\"{i:0size$}\"");
                    Received::Publication(Publication::now(
                        news.clone(),
                        Payload::Json(Bytes::from(data)),
                    ))
                })
                .collect()
        };
        let all = Dispatcher::only();
        let mut run = Vec::new();
        let mut q = std::collections::VecDeque::new();
        // The default queue: a batch of small publications is one run.
        let (hub, h) = hub_with(1 << 20);
        hub.dispatch_batch(&mut publish(BATCH, 1), &mut run, all);
        h.drain(&mut q);
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].deliveries as usize, BATCH);
        // A 16 KiB queue: 500-byte publications in runs of at most 4 KiB.
        let (hub, h) = hub_with(16 * 1024);
        hub.dispatch_batch(&mut publish(100, 500), &mut run, all);
        let mut small = std::collections::VecDeque::new();
        h.drain(&mut small);
        assert!(small.iter().all(|i| i.len <= 4 * 1024), "a run past 4 KiB");
        let runs = small.len();
        q.extend(small);
        assert!(
            (13..=20).contains(&runs),
            "{runs} runs of 500-byte publications"
        );
        let got: Vec<String> = q
            .into_iter()
            .flat_map(|i| i.out.into_messages())
            .map(|m| {
                let v: serde_json::Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
                v["data"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches('0')
                    .to_owned()
            })
            .collect();
        let want: Vec<String> = (0..BATCH)
            .chain(0..100)
            .map(|i| if i == 0 { String::new() } else { i.to_string() })
            .collect();
        assert_eq!(got, want);
    }

    /// With several dispatchers, every channel's publications still reach its
    /// subscribers once each and in order, whichever dispatcher fans it out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn several_dispatchers_keep_each_channels_order() {
        const CHANNELS: usize = 12;
        const EACH: u64 = 200;
        let metrics = Metrics::unregistered();
        let (tx, _rx) = inbound(8, metrics.clone());
        let hub = Arc::new(Hub::new(
            Arc::new(MemoryBroker::new(tx)),
            metrics.clone(),
            100,
            1 << 20,
            DeltaLimits::default(),
        ));
        let channels: Vec<ChannelName> = (0..CHANNELS)
            .map(|c| ChannelName::new(&format!("c{c}")).unwrap())
            .collect();
        let handles = one_subscriber_each(&hub, &channels);
        let (to_hub, from_broker) = inbound(1024, metrics);
        let dispatching = tokio::spawn(hub.clone().run_dispatcher(from_broker, 3));
        for n in 1..=EACH {
            for c in &channels {
                let data = Bytes::from(n.to_string());
                to_hub
                    .send(Publication::now(c.clone(), Payload::Json(data)))
                    .await
                    .unwrap();
            }
            if n % 50 == 0 {
                to_hub.resubscribed().await.unwrap();
            }
        }
        drop(to_hub);
        dispatching.await.unwrap();
        for (h, c) in handles.iter().zip(&channels) {
            let mut q = std::collections::VecDeque::new();
            h.drain(&mut q);
            let got: Vec<u64> = q
                .into_iter()
                .flat_map(|i| i.out.into_messages())
                .map(|m| {
                    let v: serde_json::Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
                    assert_eq!(v["channel"], c.as_str());
                    v["data"].as_u64().unwrap()
                })
                .collect();
            assert_eq!(got, (1..=EACH).collect::<Vec<_>>(), "{c}");
        }
    }
}
