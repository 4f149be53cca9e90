//! The embedded broker: one node, no external service.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use herald_protocol::{ChannelName, Epoch, Publication, StreamPosition};
use tokio::sync::Mutex;

use crate::{
    new_epoch, BoxFuture, Broker, BrokerError, HistoryPage, HistoryPolicy, Inbound, PresenceChange,
    PresencePage, PresenceStats, PublishRequest, Published, Ready,
};
use herald_protocol::presence::Member;

/// How often expired streams and idempotency keys are swept out (also done lazily on
/// every access, so this only bounds the memory of channels nobody touches again).
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Delivers every publication straight to this node's hub, and keeps the history of
/// history channels in a bounded ring per channel.
///
/// It ignores interest: the hub already drops channels nobody subscribes to, and with
/// one node there is nobody else to route to. Publishing waits while the hub's inbound
/// queue is full, so a fast HTTP publisher is slowed down instead of losing messages.
/// Publishes are serialised (one lock around assigning offsets and queueing), so the hub
/// receives every channel's offsets in order. Epochs are random per process: a restart
/// loses the history, and a client resuming across it is told so.
pub struct MemoryBroker {
    inbound: Inbound,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// This broker's data lineage, in start tokens: random per process, new after
    /// [`MemoryBroker::forget`] (as a Redis restarted without its files has a new one).
    lineage: u64,
    /// When the broker was made: start tokens count minutes from here.
    born: Option<Instant>,
    streams: HashMap<ChannelName, Stream>,
    /// (channel, key) → first result and when the key expires.
    seen: HashMap<(ChannelName, String), (Published, Instant)>,
    last_sweep: Option<Instant>,
    /// Presence, per channel.
    rooms: HashMap<ChannelName, Room>,
}

/// One channel's presence: members by connection id (sorted: pages follow the order),
/// each with when it expires, and connections per user.
#[derive(Default)]
struct Room {
    members: std::collections::BTreeMap<String, (Member, Instant)>,
    users: HashMap<String, u64>,
}

impl Room {
    fn remove(&mut self, conn: &str) -> Option<PresenceChange> {
        let (member, _) = self.members.remove(conn)?;
        let key = member.count_key();
        let n = self.users.entry(key.clone()).or_default();
        *n = n.saturating_sub(1);
        let user_edge = *n == 0;
        if user_edge {
            self.users.remove(&key);
        }
        Some(PresenceChange { member, user_edge })
    }
}

struct Stream {
    epoch: Epoch,
    /// The last offset assigned.
    top: u64,
    /// The newest publications, oldest first, at most `policy.size`.
    ring: VecDeque<Publication>,
    policy: HistoryPolicy,
    /// Last publication: the ring expires `ttl` after it.
    published: Instant,
    /// Last publication or read: the stream (offset and epoch) expires `meta_ttl` after.
    touched: Instant,
}

impl Stream {
    fn new(policy: HistoryPolicy, now: Instant) -> Self {
        Stream {
            epoch: new_epoch(),
            top: 0,
            ring: VecDeque::new(),
            policy,
            published: now,
            touched: now,
        }
    }

    /// Applies expiry at `now`; false when the whole stream is gone.
    fn expire(&mut self, now: Instant) -> bool {
        if now.duration_since(self.touched) >= self.policy.meta_ttl {
            return false;
        }
        if now.duration_since(self.published) >= self.policy.ttl {
            self.ring = VecDeque::new();
        }
        true
    }

    fn position(&self) -> StreamPosition {
        StreamPosition {
            offset: self.top,
            epoch: self.epoch,
        }
    }
}

impl State {
    /// The live stream of `channel`, created (new epoch) when missing or expired: for a
    /// publication only (reads use [`State::existing`]).
    fn stream(
        &mut self,
        channel: &ChannelName,
        policy: HistoryPolicy,
        now: Instant,
    ) -> &mut Stream {
        if self
            .streams
            .get_mut(channel)
            .is_some_and(|s| !s.expire(now))
        {
            self.streams.remove(channel);
        }
        let s = self
            .streams
            .entry(channel.clone())
            .or_insert_with(|| Stream::new(policy, now));
        // The rule may have changed since the stream was made.
        s.policy = policy;
        s.touched = now;
        s
    }

    /// The live stream of `channel`, if it has one (expired ones are dropped).
    fn existing(
        &mut self,
        channel: &ChannelName,
        policy: HistoryPolicy,
        now: Instant,
    ) -> Option<&mut Stream> {
        if !self.streams.get_mut(channel)?.expire(now) {
            self.streams.remove(channel);
            return None;
        }
        let s = self.streams.get_mut(channel)?;
        s.policy = policy;
        s.touched = now;
        Some(s)
    }

    fn sweep(&mut self, now: Instant) {
        if self
            .last_sweep
            .is_some_and(|t| now.duration_since(t) < SWEEP_EVERY)
        {
            return;
        }
        self.last_sweep = Some(now);
        self.streams.retain(|_, s| s.expire(now));
        self.seen.retain(|_, (_, until)| *until > now);
    }
}

impl MemoryBroker {
    /// A broker that feeds `inbound`.
    pub fn new(inbound: Inbound) -> Self {
        MemoryBroker {
            inbound,
            state: Mutex::new(State {
                lineage: new_epoch().get(),
                born: Some(Instant::now()),
                ..State::default()
            }),
        }
    }

    /// Drops `channel`'s stream, as a broker that lost its data would (a Redis restarted
    /// without its files: a new lineage, and the node's subscriptions re-established,
    /// announced after what was already queued): the next publication starts a new
    /// epoch. For fault injection in tests.
    pub async fn forget(&self, channel: &ChannelName) {
        let mut state = self.state.lock().await;
        state.streams.remove(channel);
        state.lineage = new_epoch().get();
        let _ = self.inbound.resubscribed().await;
    }
}

impl Broker for MemoryBroker {
    fn publish(
        &self,
        batch: Vec<PublishRequest>,
    ) -> BoxFuture<'_, Result<Vec<Published>, BrokerError>> {
        Box::pin(async move {
            let mut state = self.state.lock().await;
            let now = Instant::now();
            state.sweep(now);
            let mut results = Vec::with_capacity(batch.len());
            for req in batch {
                let key = req
                    .idempotency
                    .as_ref()
                    .map(|i| ((req.publication.channel.clone(), i.key.clone()), i.window));
                if let Some((k, _)) = &key {
                    if let Some((first, until)) = state.seen.get(k) {
                        if *until > now {
                            results.push(Published {
                                duplicate: true,
                                ..*first
                            });
                            continue;
                        }
                    }
                }
                let mut p = req.publication;
                if let Some(policy) = req.history {
                    let s = state.stream(&p.channel, policy, now);
                    s.top += 1;
                    s.published = now;
                    p.position = Some(s.position());
                    s.ring.push_back(p.clone());
                    while s.ring.len() > policy.size {
                        s.ring.pop_front();
                    }
                }
                let result = Published {
                    position: p.position,
                    duplicate: false,
                };
                // Queued while holding the lock, so the hub sees offsets in order.
                self.inbound
                    .send(p)
                    .await
                    .map_err(|_| BrokerError::Closed)?;
                if let Some((k, window)) = key {
                    state.seen.insert(k, (result, now + window));
                }
                results.push(result);
            }
            Ok(results)
        })
    }

    fn history(
        &self,
        channel: &ChannelName,
        policy: HistoryPolicy,
        since: u64,
        limit: usize,
        only_in: Option<Epoch>,
    ) -> BoxFuture<'_, Result<HistoryPage, BrokerError>> {
        let channel = channel.clone();
        Box::pin(async move {
            let mut state = self.state.lock().await;
            let now = Instant::now();
            state.sweep(now);
            // The process's own clock, as the streams' expiry (a stepped wall clock
            // must not make an expired epoch look vouched for).
            let minutes = state
                .born
                .map_or(0, |b| now.duration_since(b).as_secs() / 60);
            let token = Epoch::start(state.lineage, minutes);
            let Some(s) = state.existing(&channel, policy, now) else {
                return Ok(HistoryPage {
                    top: StreamPosition {
                        offset: 0,
                        epoch: token,
                    },
                    publications: Vec::new(),
                    now: token,
                });
            };
            let from_start = since == 0;
            let usable = only_in.is_none_or(|e| {
                (e == s.epoch || (e.is_start() && from_start))
                    && s.top.saturating_sub(since) <= limit as u64
            });
            let publications = s
                .ring
                .iter()
                .filter(|p| p.offset().is_some_and(|o| o > since))
                .take(if usable { limit } else { 0 })
                .cloned()
                .collect();
            Ok(HistoryPage {
                top: s.position(),
                publications,
                now: token,
            })
        })
    }

    fn subscribe(&self, _channel: &ChannelName) -> Ready {
        Ready::now()
    }

    fn unsubscribe(&self, _channel: &ChannelName) {}

    fn presence_add(
        &self,
        channel: &ChannelName,
        members: Vec<Member>,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Vec<PresenceChange>, BrokerError>> {
        let channel = channel.clone();
        Box::pin(async move {
            let mut state = self.state.lock().await;
            let room = state.rooms.entry(channel).or_default();
            let until = Instant::now() + ttl;
            let mut added = Vec::new();
            for m in members {
                match room.members.get_mut(&m.conn) {
                    Some(entry) => entry.1 = until,
                    None => {
                        let n = room.users.entry(m.count_key()).or_default();
                        *n += 1;
                        added.push(PresenceChange {
                            member: m.clone(),
                            user_edge: *n == 1,
                        });
                        room.members.insert(m.conn.clone(), (m, until));
                    }
                }
            }
            Ok(added)
        })
    }

    fn presence_remove(
        &self,
        channel: &ChannelName,
        members: Vec<Member>,
    ) -> BoxFuture<'_, Result<Vec<PresenceChange>, BrokerError>> {
        let channel = channel.clone();
        Box::pin(async move {
            let mut state = self.state.lock().await;
            let room = state.rooms.entry(channel.clone()).or_default();
            let gone = members
                .into_iter()
                .map(|m| {
                    room.remove(&m.conn).unwrap_or_else(|| PresenceChange {
                        user_edge: !room.users.contains_key(&m.count_key()),
                        member: m,
                    })
                })
                .collect();
            if room.members.is_empty() {
                state.rooms.remove(&channel);
            }
            Ok(gone)
        })
    }

    fn presence_expire(
        &self,
        channel: &ChannelName,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<PresenceChange>, BrokerError>> {
        let channel = channel.clone();
        Box::pin(async move {
            let mut state = self.state.lock().await;
            let Some(room) = state.rooms.get_mut(&channel) else {
                return Ok(Vec::new());
            };
            let now = Instant::now();
            let stale: Vec<String> = room
                .members
                .iter()
                .filter(|(_, (_, until))| *until <= now)
                .map(|(c, _)| c.clone())
                .take(limit)
                .collect();
            let gone = stale.iter().filter_map(|c| room.remove(c)).collect();
            if room.members.is_empty() {
                state.rooms.remove(&channel);
            }
            Ok(gone)
        })
    }

    fn presence_page(
        &self,
        channel: &ChannelName,
        cursor: Option<String>,
        limit: usize,
    ) -> BoxFuture<'_, Result<PresencePage, BrokerError>> {
        let channel = channel.clone();
        Box::pin(async move {
            let state = self.state.lock().await;
            let Some(room) = state.rooms.get(&channel) else {
                return Ok(PresencePage::default());
            };
            // The scan part is always 0 here: the members are in one ordered map.
            let skip = cursor
                .as_deref()
                .and_then(herald_protocol::presence::parse_cursor)
                .map_or(0, |(_, skip)| skip as usize);
            let limit = limit.max(1);
            let members: Vec<Member> = room
                .members
                .values()
                .skip(skip)
                .take(limit)
                .map(|(m, _)| m.clone())
                .collect();
            let more = room.members.len() > skip + members.len();
            let cursor =
                more.then(|| herald_protocol::presence::cursor(0, (skip + members.len()) as u64));
            Ok(PresencePage { members, cursor })
        })
    }

    fn presence_stats(
        &self,
        channel: &ChannelName,
    ) -> BoxFuture<'_, Result<PresenceStats, BrokerError>> {
        let channel = channel.clone();
        Box::pin(async move {
            let state = self.state.lock().await;
            Ok(state
                .rooms
                .get(&channel)
                .map_or_else(PresenceStats::default, |r| PresenceStats {
                    connections: r.members.len() as u64,
                    users: r.users.len() as u64,
                }))
        })
    }

    fn is_up(&self) -> bool {
        true
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{inbound, Idempotency, Received};
    use bytes::Bytes;
    use herald_metrics::Metrics;
    use herald_protocol::Payload;

    fn publication(n: u8) -> Publication {
        Publication::now(
            ChannelName::new("c").unwrap(),
            Payload::Binary(Bytes::from(vec![n])),
        )
    }

    fn policy(size: usize) -> HistoryPolicy {
        HistoryPolicy {
            size,
            ttl: Duration::from_secs(60),
            meta_ttl: Duration::from_secs(600),
        }
    }

    fn received(r: Option<Received>) -> Publication {
        match r {
            Some(Received::Publication(p)) => p,
            other => panic!("expected a publication, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn delivers_in_order() {
        let (tx, mut rx) = inbound(16, Metrics::unregistered());
        let broker = MemoryBroker::new(tx);
        broker
            .publish(
                (0..10)
                    .map(|n| PublishRequest::plain(publication(n)))
                    .collect(),
            )
            .await
            .unwrap();
        for n in 0..10 {
            assert_eq!(received(rx.recv().await).payload, publication(n).payload);
        }
    }

    #[tokio::test]
    async fn history_assigns_contiguous_offsets_and_keeps_the_newest() {
        let (tx, mut rx) = inbound(64, Metrics::unregistered());
        let broker = MemoryBroker::new(tx);
        let reqs = (0..10)
            .map(|n| PublishRequest {
                history: Some(policy(4)),
                ..PublishRequest::plain(publication(n))
            })
            .collect();
        let results = broker.publish(reqs).await.unwrap();
        let offsets: Vec<u64> = results.iter().map(|r| r.position.unwrap().offset).collect();
        assert_eq!(offsets, (1..=10).collect::<Vec<_>>());
        for n in 1..=10 {
            assert_eq!(received(rx.recv().await).offset(), Some(n));
        }
        let page = broker
            .history(&ChannelName::new("c").unwrap(), policy(4), 5, 100, None)
            .await
            .unwrap();
        assert_eq!(page.top.offset, 10);
        assert_eq!(page.top.epoch, results[0].position.unwrap().epoch);
        let got: Vec<u64> = page
            .publications
            .iter()
            .filter_map(Publication::offset)
            .collect();
        assert_eq!(got, vec![7, 8, 9, 10], "trimmed to the newest 4");
    }

    #[tokio::test]
    async fn reading_a_channel_creates_nothing() {
        let (tx, _rx) = inbound(4, Metrics::unregistered());
        let broker = MemoryBroker::new(tx);
        let c = ChannelName::new("c").unwrap();
        let mut start = None;
        for n in 0..1000 {
            let other = ChannelName::new(&format!("made-up-{n}")).unwrap();
            let page = broker
                .history(&other, policy(4), 0, 10, None)
                .await
                .unwrap();
            assert!(
                page.top.is_start() && page.top.epoch == page.now,
                "{page:?}"
            );
            start.get_or_insert(page.now);
        }
        assert!(broker.state.lock().await.streams.is_empty());
        let start = start.unwrap();
        let r = broker
            .publish(vec![PublishRequest {
                history: Some(policy(4)),
                ..PublishRequest::plain(publication(1))
            }])
            .await
            .unwrap();
        let first = r[0].position.unwrap();
        assert_eq!(first.offset, 1);
        assert!(!first.epoch.is_start());
        // A resume from a start reads the epoch begun since; one from offset 0 of
        // another epoch does not.
        let page = broker
            .history(&c, policy(4), 0, 10, Some(start))
            .await
            .unwrap();
        assert_eq!((page.top, page.publications.len()), (first, 1));
        assert!(start.start_continues(page.now, policy(4).meta_ttl));
        let other = Epoch::new(first.epoch.get() ^ 1).unwrap();
        let page = broker
            .history(&c, policy(4), 0, 10, Some(other))
            .await
            .unwrap();
        assert_eq!((page.top, page.publications.len()), (first, 0));
        // Within the limit only.
        let page = broker
            .history(&c, policy(4), 0, 0, Some(start))
            .await
            .unwrap();
        assert!(page.publications.is_empty());
        // Data lost (a restart without files): a new lineage, so starts read before
        // cannot tell what they missed.
        broker.forget(&c).await;
        let page = broker
            .history(&c, policy(4), 0, 10, Some(start))
            .await
            .unwrap();
        assert!(page.top.is_start() && !start.start_continues(page.now, policy(4).meta_ttl));
    }

    #[tokio::test]
    async fn expired_history_keeps_the_epoch_and_expired_streams_get_a_new_one() {
        let (tx, _rx) = inbound(16, Metrics::unregistered());
        let broker = MemoryBroker::new(tx);
        let c = ChannelName::new("c").unwrap();
        let short = HistoryPolicy {
            size: 10,
            ttl: Duration::from_millis(30),
            meta_ttl: Duration::from_millis(200),
        };
        let req = || PublishRequest {
            history: Some(short),
            ..PublishRequest::plain(publication(1))
        };
        let first = broker.publish(vec![req()]).await.unwrap()[0]
            .position
            .unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
        let page = broker.history(&c, short, 0, 10, None).await.unwrap();
        assert_eq!(
            (page.top, page.publications.len()),
            (first, 0),
            "history expired, position kept"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let page = broker.history(&c, short, 0, 10, None).await.unwrap();
        assert_eq!(page.top.offset, 0);
        assert_ne!(page.top.epoch, first.epoch, "a new stream, a new epoch");
    }

    #[tokio::test]
    async fn idempotent_publishes_take_effect_once() {
        let (tx, mut rx) = inbound(16, Metrics::unregistered());
        let broker = MemoryBroker::new(tx);
        let req = || PublishRequest {
            history: Some(policy(4)),
            idempotency: Some(Idempotency {
                key: "k".into(),
                window: Duration::from_secs(60),
            }),
            ..PublishRequest::plain(publication(1))
        };
        let a = broker.publish(vec![req()]).await.unwrap()[0];
        let b = broker.publish(vec![req()]).await.unwrap()[0];
        assert!(!a.duplicate && b.duplicate);
        assert_eq!(a.position, b.position);
        received(rx.recv().await);
        assert!(rx.rx.try_recv().is_err(), "the retry published nothing");
    }

    #[tokio::test]
    async fn try_send_drops_and_counts_when_full() {
        let metrics = Metrics::unregistered();
        let (tx, _rx) = inbound(1, metrics.clone());
        assert_eq!(tx.try_send(publication(0)), Ok(true));
        assert_eq!(tx.try_send(publication(1)), Ok(false));
    }

    #[tokio::test]
    async fn publish_fails_once_the_hub_is_gone() {
        let (tx, rx) = inbound(1, Metrics::unregistered());
        drop(rx);
        let broker = MemoryBroker::new(tx);
        assert_eq!(
            broker
                .publish(vec![PublishRequest::plain(publication(0))])
                .await,
            Err(BrokerError::Closed)
        );
    }
}
