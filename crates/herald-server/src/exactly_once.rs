//! Property: the hub and the session queues deliver every publication exactly once, in
//! its channel's order, to every subscriber that is not closed as slow, under any interleaving of
//! subscribe, unsubscribe, publish and reading; and what a subscriber closed as slow
//! does not get is a suffix of what it should have got, every message of it counted.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use herald_broker::{inbound, MemoryBroker, Received};
use herald_metrics::{DropReason, Metrics};
use herald_protocol::{ChannelName, Payload, Publication};
use proptest::prelude::*;
use tokio_tungstenite::tungstenite::Message;

use crate::handle::{tests::env, SessionCommand, SessionEnv, SessionHandle, ITEM_OVERHEAD};
use crate::hub::{Hub, SubscribeOpts};

const SUBSCRIBERS: usize = 4;
const CHANNELS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    Subscribe(usize, usize),
    Unsubscribe(usize, usize),
    /// Publications on these channels, in this order (one, or a burst).
    Publish(Vec<usize>),
    /// The broker's subscriptions were re-established (a marker among publications).
    Resubscribed,
    /// The subscriber reads everything queued for it.
    Read(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (0..SUBSCRIBERS, 0..CHANNELS).prop_map(|(s, c)| Op::Subscribe(s, c)),
        1 => (0..SUBSCRIBERS, 0..CHANNELS).prop_map(|(s, c)| Op::Unsubscribe(s, c)),
        4 => (0..CHANNELS).prop_map(|c| Op::Publish(vec![c])),
        // Longer than a sort of small slices' insertion sort, which keeps equal
        // elements in order even where the sort does not promise it.
        1 => proptest::collection::vec(0..CHANNELS, 20..80).prop_map(Op::Publish),
        1 => Just(Op::Resubscribed),
        2 => (0..SUBSCRIBERS).prop_map(Op::Read),
    ]
}

/// (channel index, publication number) of each delivery in `h`'s queue, read now.
fn read(h: &SessionHandle) -> Vec<(usize, u64)> {
    let mut items = std::collections::VecDeque::new();
    h.drain(&mut items);
    h.finish_batch();
    items
        .into_iter()
        .filter(|i| i.deliveries > 0)
        .flat_map(|i| i.out.into_messages())
        .map(|m| {
            let Message::Text(t) = m else {
                panic!("text deliveries only")
            };
            let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
            let c = v["channel"].as_str().unwrap()[1..].parse().unwrap();
            (c, v["data"].as_u64().unwrap())
        })
        .collect()
}

/// Each channel's publication numbers, in the order received.
fn per_channel(deliveries: &[(usize, u64)]) -> Vec<Vec<u64>> {
    let mut out = vec![Vec::new(); CHANNELS];
    for &(c, n) in deliveries {
        out[c].push(n);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_publication_once_in_order(ops in proptest::collection::vec(op(), 1..200), slow in 0..SUBSCRIBERS) {
        let metrics = Metrics::unregistered();
        let (tx, _rx) = inbound(8, metrics.clone());
        let hub = Arc::new(Hub::new(Arc::new(MemoryBroker::new(tx)), metrics.clone(), 100, 1 << 20, crate::history::DeltaLimits::default()));
        // One subscriber with a budget of a few messages (it never reads: a slow
        // consumer); the others with plenty.
        let env = |budget| Arc::new(SessionEnv { metrics: metrics.clone(), ..(*env(budget)).clone() });
        let small = env(6 * (40 + ITEM_OVERHEAD));
        let big = env(1 << 20);
        let handles: Vec<Arc<SessionHandle>> = (0..SUBSCRIBERS)
            .map(|s| Arc::new(SessionHandle::new(0, if s == slow { small.clone() } else { big.clone() })))
            .collect();
        let channels: Vec<ChannelName> =
            (0..CHANNELS).map(|c| ChannelName::new(&format!("c{c}")).unwrap()).collect();
        let mut subscribed = [[false; CHANNELS]; SUBSCRIBERS];
        let mut expected: Vec<Vec<(usize, u64)>> = vec![Vec::new(); SUBSCRIBERS];
        let mut got: Vec<Vec<(usize, u64)>> = vec![Vec::new(); SUBSCRIBERS];
        let mut next: HashMap<usize, u64> = HashMap::new();
        // Publications in a row arrive as one batch, which the dispatcher fans out
        // one run per channel (each subscriber takes a run whole, or closes).
        let mut batch: Vec<Received> = Vec::new();
        for op in ops {
            if !matches!(op, Op::Publish(_) | Op::Resubscribed) {
                hub.dispatch_received(&mut batch);
            }
            match op {
                Op::Subscribe(s, c) => {
                    hub.subscribe(&channels[c], s as u64, &handles[s], SubscribeOpts::default());
                    subscribed[s][c] = true;
                }
                Op::Unsubscribe(s, c) => {
                    hub.unsubscribe(&channels[c], s as u64);
                    subscribed[s][c] = false;
                }
                Op::Publish(cs) => {
                    for c in cs {
                        let n = next.entry(c).or_default();
                        *n += 1;
                        let p = Publication::now(channels[c].clone(), Payload::Json(Bytes::from(n.to_string())));
                        batch.push(Received::Publication(p));
                        for s in 0..SUBSCRIBERS {
                            if subscribed[s][c] {
                                expected[s].push((c, *n));
                            }
                        }
                    }
                }
                Op::Resubscribed => batch.push(Received::Resubscribed),
                Op::Read(s) if s != slow => got[s].extend(read(&handles[s])),
                Op::Read(_) => {}
            }
        }
        hub.dispatch_received(&mut batch);
        for s in 0..SUBSCRIBERS {
            if s != slow {
                got[s].extend(read(&handles[s]));
            }
        }
        let slow_got = if handles[slow].is_closing() { Vec::new() } else { read(&handles[slow]) };
        for s in 0..SUBSCRIBERS {
            if s == slow {
                // A prefix of what it should have got (nothing, once closed as slow).
                let (want, got) = (per_channel(&expected[s]), per_channel(&slow_got));
                prop_assert!(want.iter().zip(&got).all(|(w, g)| w.starts_with(g)));
                let lost = (expected[s].len() - slow_got.len()) as u64;
                let counted = metrics.dropped_total(DropReason::SlowConsumer)
                    + metrics.dropped_total(DropReason::Disconnected);
                prop_assert_eq!(lost, counted, "every undelivered message is counted (slow {} disc {} closing {})", metrics.dropped_total(DropReason::SlowConsumer), metrics.dropped_total(DropReason::Disconnected), handles[slow].is_closing());
            } else {
                // Channels have no order among themselves (a batch's are grouped).
                prop_assert_eq!(per_channel(&got[s]), per_channel(&expected[s]));
            }
        }
    }
}

/// History channels: random interleavings of publish, subscribe (plain or resuming
/// from where the subscriber last stood), the subscribe's completion, unsubscribe,
/// publications lost on their way to the node (node-level gaps, repaired from the
/// stream), the broker losing a channel's stream (a new epoch), and two subscribers
/// with queues of a few deliveries that read only when told to (they lag, and are
/// caught up from the stream when their session carries out its catch-ups), on the
/// memory broker.
mod history {
    use super::*;
    use std::time::Duration;

    use herald_broker::{Broker, HistoryPage, HistoryPolicy, PublishRequest, Received};
    use herald_protocol::client::Since;
    use herald_protocol::{Epoch, StreamPosition};

    use crate::history::{Completion, Mark, Resume, Stream, ATTEMPTS};

    const CHANNELS: usize = 2;
    const POLICY: HistoryPolicy = HistoryPolicy {
        size: 8,
        ttl: Duration::from_secs(600),
        meta_ttl: Duration::from_secs(600),
    };
    const MAX_RECOVERY: usize = 6;

    #[derive(Debug, Clone)]
    enum Op {
        Publish(usize),
        /// Hand up to this many publications from the broker to the hub.
        Arrive(usize),
        /// The next publication on its way to the node is lost.
        Lose,
        /// Subscribe; resume from the last position held when `true`.
        Subscribe(usize, usize, bool),
        /// The subscribe's history read is merged (reading again if asked to).
        Complete(usize, usize),
        Unsubscribe(usize, usize),
        /// The broker loses the channel's stream (a new epoch; what the old one
        /// published may still be on its way).
        Forget(usize),
        /// Spawned repairs run.
        Yield,
        /// The subscriber's writer takes its queue (and writes it).
        Read(usize),
        /// The subscriber's session carries out the catch-ups it was handed.
        CatchUp(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..CHANNELS).prop_map(Op::Publish),
            3 => (1..4usize).prop_map(Op::Arrive),
            1 => Just(Op::Lose),
            2 => (0..SUBSCRIBERS, 0..CHANNELS, any::<bool>()).prop_map(|(s, c, r)| Op::Subscribe(s, c, r)),
            2 => (0..SUBSCRIBERS, 0..CHANNELS).prop_map(|(s, c)| Op::Complete(s, c)),
            1 => (0..SUBSCRIBERS, 0..CHANNELS).prop_map(|(s, c)| Op::Unsubscribe(s, c)),
            1 => (0..CHANNELS).prop_map(Op::Forget),
            1 => Just(Op::Yield),
            2 => (0..SUBSCRIBERS).prop_map(Op::Read),
            3 => (0..SUBSCRIBERS).prop_map(Op::CatchUp),
        ]
    }

    /// A subscribe whose history read is done and not merged yet.
    struct Pending {
        stream: Arc<Stream>,
        page: HistoryPage,
        resume: Resume,
        /// What the subscriber's buffer held when the read was issued.
        read_after: Mark,
        attempt: usize,
    }

    /// What one subscriber has seen of one channel.
    #[derive(Default, Clone)]
    struct Seen {
        /// Where it stands (set by `subscribed` and `reset`, moved by each message).
        at: Option<(Epoch, u64)>,
        /// Subscribed now (between `subscribed` and its unsubscribe).
        live: bool,
        /// Publications made before the start it holds was read (its subscribe's read,
        /// or its reset to a start): what that start cannot have missed.
        start_n: u64,
        /// Publications made before its subscribe's latest history read.
        read_n: u64,
    }

    struct World {
        broker: Arc<MemoryBroker>,
        rx: herald_broker::InboundReceiver,
        hub: Arc<Hub>,
        handles: Vec<Arc<SessionHandle>>,
        channels: Vec<ChannelName>,
        /// (channel, epoch, offset) → the number published there.
        published: HashMap<(usize, Epoch, u64), u64>,
        /// Epochs in the order the broker made them (epochs are random: this is how
        /// the checker tells an older one from a newer one).
        epochs: HashMap<Epoch, usize>,
        n: u64,
        subscribed: [[bool; CHANNELS]; SUBSCRIBERS],
        pending: HashMap<(usize, usize), Pending>,
        seen: Vec<Vec<Seen>>,
    }

    impl World {
        async fn read_page(&mut self, c: usize, since: Option<Since>) -> HistoryPage {
            // As `Stream::resume` reads.
            let (from, count, only_in) = match since {
                Some(Since {
                    offset,
                    epoch: Some(e),
                }) => (offset, MAX_RECOVERY, Some(e)),
                _ => (0, 0, None),
            };
            let page = self
                .broker
                .history(&self.channels[c], POLICY, from, count, only_in)
                .await
                .unwrap();
            if !page.top.epoch.is_start() {
                let n = self.epochs.len();
                self.epochs.entry(page.top.epoch).or_insert(n);
            }
            page
        }

        /// Reads subscriber `s`'s queue and checks every frame against what it saw.
        fn read(&mut self, s: usize) -> Result<(), TestCaseError> {
            let mut items = std::collections::VecDeque::new();
            self.handles[s].drain(&mut items);
            self.handles[s].finish_batch();
            for m in items.into_iter().flat_map(|i| i.out.into_messages()) {
                let Message::Text(t) = m else {
                    panic!("text frames only")
                };
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                let c: usize = v["channel"].as_str().unwrap()[1..].parse().unwrap();
                let epoch = || Epoch::parse(v["epoch"].as_str().unwrap()).unwrap();
                // An epoch first seen here was made by a read of the node's (a repair
                // on a stream the broker had lost), after everything seen before.
                if let Some(e) = v["epoch"]
                    .as_str()
                    .and_then(Epoch::parse)
                    .filter(|e| !e.is_start())
                {
                    let n = self.epochs.len();
                    self.epochs.entry(e).or_insert(n);
                }
                let seen = &mut self.seen[s][c];
                match v["op"].as_str().unwrap() {
                    "subscribed" => {
                        let top = v["offset"].as_u64().unwrap();
                        let at = if v["recovered"].as_bool() == Some(true) {
                            let (e, o) = seen.at.expect("recovered from a position it had");
                            if o == 0 && e.is_start() {
                                // From the start: the replay's first message names the epoch.
                                seen.at = Some((e, o));
                                seen.live = true;
                                continue;
                            }
                            prop_assert_eq!(e, epoch(), "recovered in another epoch");
                            o
                        } else {
                            // Where its last read found the stream (a start, perhaps).
                            seen.start_n = seen.read_n;
                            top
                        };
                        seen.at = Some((epoch(), at));
                        seen.live = true;
                    }
                    "reset" => {
                        prop_assert!(seen.live, "reset before subscribed: {}", t.as_str());
                        let to = (epoch(), v["offset"].as_u64().unwrap());
                        // A reset skips ahead or moves to a newer epoch; one that goes
                        // back re-delivers what the subscriber already has.
                        prop_assert!(
                            seen.at.is_none_or(|(e, o)| e != to.0 || to.1 >= o),
                            "subscriber {} channel {}: reset from {:?} back to {:?}",
                            s,
                            c,
                            seen.at,
                            to
                        );
                        // (From the start, any epoch is ahead.)
                        if let Some((e, _)) = seen.at.filter(|(e, _)| *e != to.0 && !e.is_start()) {
                            prop_assert!(
                                self.epochs.get(&to.0) > self.epochs.get(&e),
                                "subscriber {} channel {}: reset from {:?} into an older epoch {:?}",
                                s,
                                c,
                                seen.at,
                                to
                            );
                        }
                        if to.0.is_start() {
                            seen.start_n = self.n;
                        }
                        seen.at = Some(to);
                    }
                    "message" => {
                        prop_assert!(seen.live, "message before subscribed: {}", t.as_str());
                        let (mut e, o) = seen.at.unwrap();
                        let offset = v["offset"].as_u64().unwrap();
                        // Offset 1 names its epoch; a subscriber at the start learns it so.
                        let named = v["epoch"].as_str().map(|_| epoch());
                        prop_assert_eq!(
                            named.is_some(),
                            offset == 1,
                            "epoch named at offset 1 only: {}",
                            t.as_str()
                        );
                        if e.is_start() {
                            prop_assert!(
                                named.is_some(),
                                "a message to a subscriber at the start names its epoch: {}",
                                t.as_str()
                            );
                        }
                        if let Some(n) = named {
                            prop_assert!(
                                e.is_start() || e == n,
                                "offset 1 of epoch {} to a subscriber in {}",
                                n,
                                e
                            );
                            if e.is_start() {
                                // From a start, the first epoch must be the first one
                                // begun since: an older epoch published into after the
                                // start was read is skipped without a reset.
                                let since = seen.start_n;
                                let epochs = &self.epochs;
                                let skipped = self.published.iter().find(|((pc, pe, _), num)| {
                                    *pc == c
                                        && **num > since
                                        && *pe != n
                                        && epochs.get(pe) < epochs.get(&n)
                                });
                                prop_assert!(
                                    skipped.is_none(),
                                    "subscriber {} channel {}: from a start into epoch {}, skipping {:?}",
                                    s, c, n, skipped
                                );
                            }
                            e = n;
                        }
                        prop_assert_eq!(offset, o + 1, "subscriber {} channel {}: not the next offset (a gap without reset, a duplicate or a reorder)", s, c);
                        let n = v["data"].as_u64().unwrap();
                        prop_assert_eq!(
                            self.published.get(&(c, e, offset)),
                            Some(&n),
                            "offset {} of epoch {} is another publication",
                            offset,
                            e
                        );
                        seen.at = Some((e, offset));
                    }
                    other => panic!("unexpected frame {other}"),
                }
            }
            Ok(())
        }

        async fn publish(&mut self, c: usize) {
            self.n += 1;
            let p = Publication::now(
                self.channels[c].clone(),
                Payload::Json(Bytes::from(self.n.to_string())),
            );
            let req = PublishRequest {
                history: Some(POLICY),
                ..PublishRequest::plain(p)
            };
            let r = self.broker.publish(vec![req]).await.unwrap();
            let pos = r[0].position.unwrap();
            let n = self.epochs.len();
            self.epochs.entry(pos.epoch).or_insert(n);
            self.published.insert((c, pos.epoch, pos.offset), self.n);
        }

        fn arrive(&mut self, n: usize) {
            for _ in 0..n {
                match self.rx.try_recv() {
                    Some(Received::Publication(p)) => self.hub.dispatch(p),
                    Some(Received::Resubscribed) => self.hub.catch_up(),
                    None => return,
                }
            }
        }

        async fn complete(&mut self, s: usize, c: usize) -> Result<(), TestCaseError> {
            let Some(mut p) = self.pending.remove(&(s, c)) else {
                return Ok(());
            };
            let done = p.stream.complete(
                s as u64,
                &p.page,
                p.read_after,
                p.resume,
                p.attempt == ATTEMPTS,
            );
            if done == Completion::ReadAgain {
                if p.attempt >= ATTEMPTS {
                    // Only a catch-up on the last attempt reads again: the subscribe
                    // fails as `unavailable` and the session leaves the channel.
                    self.hub.unsubscribe(&self.channels[c], s as u64);
                    self.subscribed[s][c] = false;
                    self.seen[s][c].live = false;
                    return Ok(());
                }
                p.attempt += 1;
                p.read_after = p.stream.mark(s as u64).unwrap();
                self.seen[s][c].read_n = self.n;
                p.page = self.read_page(c, p.resume.since).await;
                // Another read, later: what was in flight may arrive meanwhile.
                self.pending.insert((s, c), p);
            }
            Ok(())
        }

        /// What the session does with `SessionCommand::CatchUp`.
        async fn catch_up(&mut self, s: usize) -> usize {
            let mut n = 0;
            for cmd in self.handles[s].take_commands() {
                let SessionCommand::CatchUp(ch) = cmd else {
                    panic!("{cmd:?}")
                };
                n += 1;
                if let Some(stream) = self.hub.stream(ch.as_str()) {
                    stream
                        .catch_up_member(s as u64, Duration::from_secs(1))
                        .await;
                }
            }
            n
        }

        async fn settle(&mut self) {
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn every_offset_once_in_order_or_reset(ops in proptest::collection::vec(op(), 1..150), small_replays in any::<bool>()) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let metrics = Metrics::unregistered();
                let (tx, rx) = inbound(100_000, metrics.clone());
                let broker = Arc::new(MemoryBroker::new(tx));
                // Subscriber 0: a queue of a few deliveries (it lags); the others: plenty.
                let small_budget = 4 * (130 + ITEM_OVERHEAD);
                // Replays of a new epoch within a budget of a few deliveries, or all of them.
                let replays = if small_replays { 5 * (130 + ITEM_OVERHEAD) / 2 } else { 1 << 24 };
                let hub = Arc::new(Hub::new(broker.clone(), metrics.clone(), 10_000, replays, crate::history::DeltaLimits::default()));
                let big = env(1 << 24);
                let small = env(small_budget);
                let mut w = World {
                    broker,
                    rx,
                    hub,
                    handles: (0..SUBSCRIBERS).map(|s| Arc::new(SessionHandle::new(0, if s < 2 { small.clone() } else { big.clone() }))).collect(),
                    channels: (0..CHANNELS).map(|c| ChannelName::new(&format!("h{c}")).unwrap()).collect(),
                    published: HashMap::new(),
                    epochs: HashMap::new(),
                    n: 0,
                    subscribed: [[false; CHANNELS]; SUBSCRIBERS],
                    pending: HashMap::new(),
                    seen: vec![vec![Seen::default(); CHANNELS]; SUBSCRIBERS],
                };
                let opts = SubscribeOpts { history: Some(POLICY), positions: true, delta: false };
                for op in ops {
                    match op {
                        Op::Publish(c) => w.publish(c).await,
                        Op::Arrive(n) => w.arrive(n),
                        // Only publications get lost: the resubscribe marker never is.
                        Op::Lose => { if let Some(Received::Resubscribed) = w.rx.try_recv() { w.hub.catch_up(); } }
                        Op::Subscribe(s, c, resume) => {
                            if w.subscribed[s][c] { continue; }
                            w.subscribed[s][c] = true;
                            let sub = w.hub.subscribe(&w.channels[c], s as u64, &w.handles[s], opts);
                            let since = w.seen[s][c].at.filter(|_| resume).map(|(e, o)| Since { offset: o, epoch: Some(e) });
                            w.seen[s][c].read_n = w.n;
                            let stream = sub.stream.unwrap();
                            let mark = stream.mark(s as u64).unwrap();
                            let page = w.read_page(c, since).await;
                            let resume = Resume { id: None, since, max_recovery: MAX_RECOVERY, timeout: Duration::from_secs(1) };
                            w.pending.insert((s, c), Pending { stream, page, resume, read_after: mark, attempt: 1 });
                        }
                        Op::Complete(s, c) => w.complete(s, c).await?,
                        Op::Unsubscribe(s, c) => {
                            if !w.subscribed[s][c] { continue; }
                            w.read(s)?;
                            w.hub.unsubscribe(&w.channels[c], s as u64);
                            w.subscribed[s][c] = false;
                            w.pending.remove(&(s, c));
                            w.seen[s][c].live = false;
                        }
                        Op::Forget(c) => w.broker.forget(&w.channels[c]).await,
                        Op::Yield => w.settle().await,
                        Op::Read(s) => w.read(s)?,
                        Op::CatchUp(s) => { w.catch_up(s).await; }
                    }
                    // Subscriber 0 reads only when told to.
                    for s in 2..SUBSCRIBERS {
                        w.read(s)?;
                    }
                }
                // Everything settles: one more publication per channel reveals any gap
                // left, every pending subscribe completes, every repair runs.
                for c in 0..CHANNELS {
                    w.publish(c).await;
                }
                for _ in 0..ATTEMPTS + 1 {
                    w.arrive(usize::MAX);
                    w.settle().await;
                    let keys: Vec<_> = w.pending.keys().copied().collect();
                    for (s, c) in keys {
                        w.complete(s, c).await?;
                    }
                }
                // Every lagging member is caught up (its queue written between rounds).
                for _ in 0..1000 {
                    let mut asked = 0;
                    for s in 0..SUBSCRIBERS {
                        w.read(s)?;
                        asked += w.catch_up(s).await;
                    }
                    w.arrive(usize::MAX);
                    w.settle().await;
                    if asked == 0 { break; }
                }
                w.arrive(usize::MAX);
                w.settle().await;
                prop_assert!(w.pending.is_empty());
                for s in 0..SUBSCRIBERS {
                    w.read(s)?;
                    // Closed as a slow consumer (1013): allowed, it resumes elsewhere.
                    if w.handles[s].is_closing() { prop_assert!(s < 2); continue; }
                    for c in 0..CHANNELS {
                        if !w.subscribed[s][c] { continue; }
                        let top = w.read_page(c, None).await.top;
                        let at = w.seen[s][c].at.map(|(epoch, offset)| StreamPosition { offset, epoch });
                        prop_assert_eq!(at, Some(top), "subscriber {} of channel {} did not reach the top", s, c);
                    }
                }
                Ok(())
            })?;
        }
    }
}
