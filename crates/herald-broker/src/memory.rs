//! The embedded broker: one node, no external service.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use herald_protocol::{ChannelName, Epoch, Publication, StreamPosition};
use tokio::sync::Mutex;

use crate::{
    new_epoch, BoxFuture, Broker, BrokerError, HistoryPage, HistoryPolicy, Inbound, Occupancy,
    PresenceChange, PresencePage, PresenceStats, PublishRequest, Published, Queued, Ready,
    WebhookEvent, WebhookQueue,
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
    /// Occupancy: channel → node → when its entry expires.
    occupancy: HashMap<ChannelName, HashMap<String, Instant>>,
    /// The webhook queue.
    webhooks: WebhookEvents,
}

/// The webhook queue: events in order, each with who took it last and when.
#[derive(Default)]
struct WebhookEvents {
    /// The next event's id.
    next: u64,
    /// The events, oldest first.
    events: VecDeque<Pending>,
    /// Who delivers now, until when.
    lease: Option<(String, Instant)>,
}

impl WebhookEvents {
    fn push(&mut self, json: String, queue: WebhookQueue, out: &mut Queued) {
        if self.events.len() >= queue.max {
            out.dropped += 1;
            return;
        }
        self.next += 1;
        self.events.push_back(Pending {
            id: self.next,
            json,
            taken: None,
            times: 0,
        });
        out.queued += 1;
    }
}

/// One queued webhook event.
struct Pending {
    /// Its id.
    id: u64,
    /// Its record.
    json: String,
    /// Who took it last, and when.
    taken: Option<(String, Instant)>,
    /// Times it was taken.
    times: u64,
}

/// An occupancy event's record (the gateway renders the webhook body from it).
fn occupancy_event(occupied: bool, channel: &ChannelName) -> String {
    let time_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    herald_protocol::webhook::occupancy(occupied, channel.as_str(), time_ms)
}

impl State {
    /// Sets (`until` = Some) or removes `node`'s entry for `channel`, queueing the
    /// channel's first occupancy or last vacancy. Answers whether it vacated it.
    fn occupy(
        &mut self,
        node: &str,
        channel: &ChannelName,
        until: Option<Instant>,
        queue: WebhookQueue,
        out: &mut Occupancy,
    ) -> bool {
        let nodes = self.occupancy.entry(channel.clone()).or_default();
        match until {
            Some(t) => {
                let was_empty = nodes.is_empty();
                if nodes.insert(node.to_owned(), t).is_none() && was_empty {
                    let e = occupancy_event(true, channel);
                    self.webhooks.push(e, queue, &mut out.occupied);
                }
                false
            }
            None => {
                let removed = nodes.remove(node).is_some();
                if nodes.is_empty() {
                    self.occupancy.remove(channel);
                    if removed {
                        let e = occupancy_event(false, channel);
                        self.webhooks.push(e, queue, &mut out.vacated);
                        return true;
                    }
                }
                false
            }
        }
    }
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

    fn occupancy(
        &self,
        node: &str,
        changes: Vec<(ChannelName, bool)>,
        ttl: Duration,
        queue: WebhookQueue,
    ) -> BoxFuture<'_, Result<Occupancy, BrokerError>> {
        let node = node.to_owned();
        Box::pin(async move {
            let mut state = self.state.lock().await;
            let mut out = Occupancy::default();
            let until = Instant::now() + ttl;
            for (channel, on) in changes {
                state.occupy(&node, &channel, on.then_some(until), queue, &mut out);
            }
            Ok(out)
        })
    }

    fn occupancy_refresh(
        &self,
        node: &str,
        channels: Vec<ChannelName>,
        ttl: Duration,
        queue: WebhookQueue,
    ) -> BoxFuture<'_, Result<Occupancy, BrokerError>> {
        let node = node.to_owned();
        Box::pin(async move {
            let mut state = self.state.lock().await;
            let mut out = Occupancy::default();
            let now = Instant::now();
            for channel in channels {
                state.occupy(&node, &channel, Some(now + ttl), queue, &mut out);
            }
            let expired: Vec<(ChannelName, String)> = state
                .occupancy
                .iter()
                .flat_map(|(c, nodes)| {
                    nodes
                        .iter()
                        .filter(|(_, t)| **t <= now)
                        .map(|(n, _)| (c.clone(), n.clone()))
                })
                .collect();
            for (channel, node) in expired {
                if state.occupy(&node, &channel, None, queue, &mut out) {
                    out.swept.push(channel);
                }
            }
            Ok(out)
        })
    }

    fn webhook_queue(
        &self,
        events: Vec<String>,
        queue: WebhookQueue,
    ) -> BoxFuture<'_, Result<Queued, BrokerError>> {
        Box::pin(async move {
            let mut state = self.state.lock().await;
            let mut out = Queued::default();
            for e in events {
                state.webhooks.push(e, queue, &mut out);
            }
            Ok(out)
        })
    }

    fn webhook_take(
        &self,
        consumer: &str,
        max: usize,
        queue: WebhookQueue,
    ) -> BoxFuture<'_, Result<Option<Vec<WebhookEvent>>, BrokerError>> {
        let consumer = consumer.to_owned();
        Box::pin(async move {
            let mut state = self.state.lock().await;
            let now = Instant::now();
            let w = &mut state.webhooks;
            let holder = w.lease.take().filter(|(_, until)| *until > now);
            if let Some(other) = holder.as_ref().filter(|(h, _)| *h != consumer) {
                w.lease = Some(other.clone());
                return Ok(None);
            }
            let took_over = holder.is_none();
            w.lease = Some((consumer.clone(), now + queue.lease));
            let mut out = Vec::new();
            for Pending {
                id,
                json,
                taken,
                times,
            } in w.events.iter_mut()
            {
                if out.len() == max {
                    break;
                }
                let free = match taken {
                    None => true,
                    Some((by, at)) => {
                        (took_over && *by != consumer) || now.duration_since(*at) >= queue.lease
                    }
                };
                if free {
                    out.push(WebhookEvent {
                        id: id.to_string(),
                        json: json.clone(),
                        retakes: u64::from(*times > 0),
                    });
                    *taken = Some((consumer.clone(), now));
                    *times += 1;
                }
            }
            Ok(Some(out))
        })
    }

    fn webhook_done(&self, ids: Vec<String>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let mut state = self.state.lock().await;
            // Ids are this queue's numbers: one parse each, not a string per comparison.
            let ids: Vec<u64> = ids.iter().filter_map(|d| d.parse().ok()).collect();
            state.webhooks.events.retain(|e| !ids.contains(&e.id));
            Ok(())
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

    #[tokio::test]
    async fn occupancy_is_decided_across_nodes_and_queued_in_order() {
        let (tx, _rx) = inbound(16, Metrics::unregistered());
        let broker = MemoryBroker::new(tx);
        let q = WebhookQueue {
            max: 3,
            lease: Duration::from_millis(50),
        };
        let ttl = Duration::from_secs(60);
        let ch = |n: &str| ChannelName::new(n).unwrap();
        let set = |node: &'static str, c: &'static str, on: bool| {
            let broker = &broker;
            async move {
                broker
                    .occupancy(node, vec![(ch(c), on)], ttl, q)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(set("a", "news", true).await.occupied.queued, 1);
        assert_eq!(set("b", "news", true).await.occupied.queued, 0);
        assert_eq!(
            set("a", "news", false).await.vacated.queued,
            0,
            "b still holds it"
        );
        assert_eq!(set("b", "news", false).await.vacated.queued, 1);
        assert_eq!(
            set("b", "news", false).await.vacated.queued,
            0,
            "twice is once"
        );
        // A dead node's entry expires and the sweep vacates its channel.
        broker
            .occupancy("c", vec![(ch("gone"), true)], Duration::ZERO, q)
            .await
            .unwrap();
        let swept = broker.occupancy_refresh("a", vec![], ttl, q).await.unwrap();
        assert_eq!(
            (swept.vacated.queued, swept.vacated.dropped),
            (0, 1),
            "the queue holds 3 already"
        );
        assert_eq!(swept.swept, vec![ch("gone")]);

        // One consumer at a time; events in order; a dead one's events retaken.
        let taken = broker.webhook_take("a", 10, q).await.unwrap().unwrap();
        let events: Vec<&str> = taken.iter().map(|e| e.json.as_str()).collect();
        assert_eq!(events.len(), 3);
        assert!(events[0].contains("channel_occupied") && events[1].contains("channel_vacated"));
        assert!(
            broker.webhook_take("b", 10, q).await.unwrap().is_none(),
            "a holds the lease"
        );
        broker
            .webhook_done(vec![taken[0].id.clone()])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
        let retaken = broker.webhook_take("b", 10, q).await.unwrap().unwrap();
        assert_eq!(retaken.len(), 2);
        assert!(retaken.iter().all(|e| e.retakes == 1));
        assert_eq!(retaken[0].id, taken[1].id);
    }
}
