//! History channels: where this node's delivery of each channel's stream stands, and
//! the whole of a subscribe on one (read, merge with live arrivals, retry, holes,
//! repair, reset).
//!
//! # The invariant
//! Every subscriber of a history channel receives the channel's offsets in order, each
//! at most once, starting right after the position its `subscribed` reply names (its
//! `since` when `recovered:true`, the stream's top otherwise); whatever it cannot receive
//! is announced with a `reset` frame naming the position after which the stream goes on,
//! never skipped in silence. Recovery is all or nothing: `recovered:false` replays
//! nothing.
//!
//! # How it is kept
//! One [`Stream`] per history channel the node serves, everything behind one lock:
//! - its **members**, each either *recovering* (its subscribe is reading the history;
//!   every publication that reaches the channel meanwhile is buffered for it, at most
//!   `limits.max_recovery_buffer`, past that it is closed as a slow consumer) or *live*
//!   (with `through`, the last offset it has: anything at or below is skipped for it);
//! - `last`, the last publication that reached the node and was delivered (only
//!   arrivals move it: a completing subscribe says what *it* has, and others may still
//!   need what is in flight), and until the first arrival `floor`, the lowest position a
//!   live member has;
//! - `repairing`, the arrivals held while a repair reads a gap from the stream.
//!
//! An arriving publication gets a [`verdict`] against `last` (or `floor`): the next
//! offset is delivered to the live members that lack it; one already delivered is
//! skipped; a jump starts a repair (the missing range is read once, delivered in order,
//! then what arrived meanwhile); a new epoch, or a hole the stream cannot fill, is a
//! `reset` to every live member, then delivery goes on.
//!
//! A subscribe: the hub adds the member (recovering) and the session waits for the
//! broker's `Ready`, then calls [`Stream::resume`] once. It reads the stream (the
//! position, plus the missed range for a resume), and under the lock [`merge`]s the read
//! with the member's buffer (sort, dedupe by offset, check contiguity), queues
//! `subscribed` + history + buffer and makes the member live. A hole between the read
//! and the buffer (a publication lost on its way to this node, being repaired) means
//! "read again", at most [`ATTEMPTS`] times, then a `reset`.
//!
//! A live member whose session's queue has no room for a delivery is not closed: it
//! becomes *lagging* (its `through` stays where its queue ends) and gets nothing more
//! until its session's queue has room again (`SessionHandle::catch_up_when_room`).
//! Then the session calls [`Stream::catch_up_member`]: it reads the history on from
//! `through` and queues what fits, then what arrived meanwhile; the member is live
//! again once it has everything the node delivered, and lags again (another round when
//! its queue has room) otherwise. The client sees every offset in order, as if it had never fallen behind,
//! however far behind it was, as long as the history still holds what it missed.
//! When it does not (trimmed, expired, another epoch), the session closes as a slow
//! consumer (1013), as on a plain channel, and the client resumes on reconnect. What a
//! lagging member missed is counted as dropped if it leaves before it is caught up.

use std::sync::Arc;
use std::time::Duration;

use herald_broker::{Broker, HistoryPage, HistoryPolicy};
use herald_metrics::{DropReason, Metrics};
use herald_protocol::client::Since;
use herald_protocol::server;
use herald_protocol::{close, ChannelName, Payload, Publication, StreamPosition};
use indexmap::IndexMap;
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use crate::handle::{ConnId, Item, Pushed, SessionHandle, WhenFull, ITEM_OVERHEAD};

/// Reads of one subscribe before a hole between history and live arrivals is given up
/// on (and announced with a `reset`).
pub(crate) const ATTEMPTS: usize = 3;

/// Repairs reading streams at once (after a Redis outage every history channel the
/// node serves catches up; this keeps that from flooding Redis).
const REPAIRS_AT_ONCE: usize = 16;

/// How long a channel's deltas pause after one took longer than
/// [`DeltaLimits::max_time`].
const DELTA_PAUSE: Duration = Duration::from_secs(10);

/// Bounds on computing deltas, which runs on the fan-out path every channel of the node
/// shares.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeltaLimits {
    /// `limits.max_delta_bytes`: larger publications go whole.
    pub(crate) max_bytes: usize,
    /// `limits.max_delta_time`: a delta that took longer (data made to be slow to diff,
    /// or just large) pauses the channel's deltas for [`DELTA_PAUSE`].
    pub(crate) max_time: Duration,
}

impl Default for DeltaLimits {
    fn default() -> Self {
        DeltaLimits {
            max_bytes: 16 * 1024,
            max_time: Duration::from_millis(2),
        }
    }
}

/// What every stream of a node shares.
pub(crate) struct StreamEnv {
    /// Where histories are read from.
    broker: Arc<dyn Broker>,
    /// Replays, repairs, duplicates, resets and slow consumers are counted here.
    metrics: Metrics,
    /// `limits.max_recovery_buffer`: a recovering member's buffer, and the arrivals held
    /// during a repair.
    max_pending: usize,
    /// Bounds the repairs reading at once ([`REPAIRS_AT_ONCE`]).
    repairs: Semaphore,
    /// Bounds the catch-ups of lagging members reading at once ([`REPAIRS_AT_ONCE`]).
    catch_up_reads: Semaphore,
    /// What a replay may queue to one subscriber (half of `limits.outbound_queue_bytes`):
    /// more would close it as a slow consumer.
    replay_budget: usize,
    /// `limits.max_delta_bytes` and `limits.max_delta_time`.
    delta: DeltaLimits,
}

impl StreamEnv {
    pub(crate) fn new(
        broker: Arc<dyn Broker>,
        metrics: Metrics,
        max_pending: usize,
        replay_budget: usize,
        delta: DeltaLimits,
    ) -> Self {
        StreamEnv {
            broker,
            metrics,
            max_pending,
            repairs: Semaphore::new(REPAIRS_AT_ONCE),
            catch_up_reads: Semaphore::new(REPAIRS_AT_ONCE),
            replay_budget,
            delta,
        }
    }
}

/// One history channel as this node serves it (see the module docs).
pub(crate) struct Stream {
    /// The channel, for history reads and the frames it sends.
    channel: ChannelName,
    /// The channel's rule: history size, TTLs.
    policy: HistoryPolicy,
    /// What every stream of the node shares.
    env: Arc<StreamEnv>,
    /// Everything that changes, behind one lock (see the module docs).
    state: Mutex<State>,
}

struct State {
    /// The last publication that reached the node and was delivered.
    last: Option<StreamPosition>,
    /// The last publication of the epoch before `last`'s, for counting what a member
    /// still in that epoch missed (see [`State::missed_since`]).
    prev_top: Option<StreamPosition>,
    /// Until the first arrival: the lowest position a live member has, so that the
    /// first arrival is checked for a gap against it.
    floor: Option<StreamPosition>,
    /// A repair is reading the stream: arrivals wait here, in order.
    repairing: Option<Vec<Publication>>,
    /// The last publication fanned out, when it was JSON and some member takes deltas:
    /// the base of the next one's delta, for members whose `base` is its position.
    prev: Option<Publication>,
    /// Members that take deltas.
    delta_members: usize,
    /// No delta is computed before this (the last one was slow: [`DeltaLimits::max_time`]).
    deltas_paused_until: Option<std::time::Instant>,
    /// The local subscribers and where each stands.
    members: IndexMap<ConnId, Member>,
    /// How often the broker re-established its subscriptions ([`Stream::catch_up`]): a
    /// subscribe whose read was issued before the latest reads again.
    catch_ups: u64,
}

/// Where a subscribe stood when its history read was issued ([`Stream::mark`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mark {
    /// Publications in the member's buffer then (they arrived before the read).
    pub(crate) buffered: usize,
    /// The stream's catch-ups then.
    pub(crate) catch_ups: u64,
}

struct Member {
    /// Where its frames go.
    handle: Arc<SessionHandle>,
    /// Binary deliveries carry their offset (the client tracks positions).
    positions: bool,
    /// It takes Fossil deltas (it asked, and the channel's rule allows them).
    delta: bool,
    /// The position of the last text delivery it was sent on this subscription: the
    /// data its client holds, against which a delta can be sent. `None` until then,
    /// and after a binary delivery.
    base: Option<StreamPosition>,
    /// Where this subscription began to have every offset on this connection: its
    /// `subscribed` position, the `since` it recovered from, or its last `reset`.
    /// `None` until its subscribe completes. A client's `since` at or after it, in the
    /// epoch the member is in, lost nothing ([`Stream::subscribed_again`]).
    from: Option<StreamPosition>,
    /// Recovering, live, or dropped as a slow consumer.
    phase: Phase,
}

impl Member {
    /// Tells it (`reset`: the frame) that its stream goes on after `at`: it is live
    /// there, with every offset from `at` on and nothing before vouched for.
    fn reset(&mut self, at: StreamPosition, reset: &Item) {
        self.phase = Phase::Live { through: at };
        self.from = Some(at);
        self.handle.push(reset.share());
    }
}

enum Phase {
    /// Its subscribe is reading the history: every publication that reached the
    /// channel since (duplicates possible; the merge sorts them out).
    Recovering(Vec<Publication>),
    /// It has every offset of `through`'s epoch up to `through`: skip those.
    Live { through: StreamPosition },
    /// Its session's queue had no room for a delivery: it has everything up to
    /// `through` queued and gets nothing more until the session asks for a catch-up
    /// ([`Stream::catch_up_member`]) once its queue has room. `cost`: what one of the
    /// channel's deliveries it missed costs in a queue (the last it could not take, or
    /// the average of the last catch-up's read), to size the next read.
    Lagging {
        through: StreamPosition,
        cost: usize,
    },
    /// Closed as a slow consumer while recovering: gets nothing more, and leaves when
    /// its session ends.
    Dropped,
}

/// How a subscriber wants its subscribe completed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Resume {
    /// The request's id, echoed in `subscribed`.
    pub(crate) id: Option<u64>,
    /// Where the client stands, for a resume.
    pub(crate) since: Option<Since>,
    /// The rule's `max_recovery`: a resume that missed more is not recovered.
    pub(crate) max_recovery: usize,
    /// `limits.subscribe_timeout`, per history read.
    pub(crate) timeout: Duration,
}

/// Entries one round of [`Stream::catch_up_member`] reads at most: it queues what the
/// member's queue has room for, and the next round reads on from there.
const CATCH_UP_PAGE: usize = 512;

/// Entries one round reads at least (the channel's publications vary in size).
const CATCH_UP_MIN: usize = 16;

/// What one round of [`Stream::catch_up_member`] came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CaughtUp {
    /// The member has everything the node delivered, and is live again.
    Live,
    /// Its queue filled again first: the next round starts once the queue has room.
    Lagging,
    /// What it missed is no longer in the history, or the history could not be read:
    /// its session closes as a slow consumer.
    Closed,
    /// It is not lagging (it left, or subscribed again, meanwhile).
    Gone,
}

/// The one answer [`Stream::resume`] gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resumed {
    /// `subscribed` (and what follows it) is queued; the member is live.
    Done { recovered: Option<bool> },
    /// The history could not be read: refuse the subscribe, saying why.
    Unavailable(&'static str),
    /// The member left meanwhile.
    Gone,
}

/// What [`Stream::complete`] did with one history read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Completion {
    /// `subscribed` (and what follows it) is queued; the member is live.
    Done { recovered: Option<bool> },
    /// Read the history again (a hole between the read and live arrivals).
    ReadAgain,
    /// The member left (or was dropped) meanwhile.
    Gone,
}

impl Stream {
    pub(crate) fn new(channel: ChannelName, policy: HistoryPolicy, env: Arc<StreamEnv>) -> Self {
        Stream {
            channel,
            policy,
            env,
            state: Mutex::new(State {
                last: None,
                prev_top: None,
                floor: None,
                repairing: None,
                prev: None,
                delta_members: 0,
                deltas_paused_until: None,
                members: IndexMap::new(),
                catch_ups: 0,
            }),
        }
    }

    /// Adds `conn` as a recovering member (again, if it was one), tracking positions
    /// and taking deltas as asked. Returns whether it is new.
    pub(crate) fn join(
        &self,
        conn: ConnId,
        handle: &Arc<SessionHandle>,
        positions: bool,
        delta: bool,
    ) -> bool {
        let member = Member {
            handle: handle.clone(),
            positions,
            delta,
            base: None,
            from: None,
            phase: Phase::Recovering(Vec::new()),
        };
        let mut s = self.state.lock();
        s.delta_members += usize::from(delta);
        let old = s.members.insert(conn, member);
        s.delta_members -= old.as_ref().map_or(0, |m| usize::from(m.delta));
        old.is_none()
    }

    /// Removes `conn`. Returns whether it was a member, and how many remain.
    pub(crate) fn leave(&self, conn: ConnId) -> (bool, usize) {
        let mut s = self.state.lock();
        let removed = s.members.swap_remove(&conn);
        if let Some(Member {
            phase: Phase::Lagging { through, .. },
            ..
        }) = &removed
        {
            // Nothing was pushed to it since it lagged: what it missed is counted here.
            let missed = s.missed_since(*through);
            self.env.metrics.dropped(DropReason::Disconnected, missed);
        }
        s.delta_members -= removed.as_ref().map_or(0, |m| usize::from(m.delta));
        if s.delta_members == 0 {
            s.prev = None;
        }
        (removed.is_some(), s.members.len())
    }

    /// Answers a subscribe of `conn`, which holds the channel already, with
    /// `subscribed` (and `id`), and makes its deltas what this subscribe asked
    /// (`delta`: it asked, and the rule allows them; `None`: a subscribe the server
    /// made, which leaves them as they are). The reply carries the position of
    /// the last delivery queued before it, when the subscription is past its own
    /// subscribe, and with a `since`, whether the subscription has delivered every
    /// offset after it (`recovered`). Nothing is replayed: it would come behind later
    /// offsets already queued. Its client forgets its delta base at
    /// every `subscribed`, so its next delivery goes whole: all under the lock, so that
    /// no delivery queued between them takes the old base. Whether `conn` is a member.
    pub(crate) fn subscribed_again(
        &self,
        conn: ConnId,
        id: Option<u64>,
        delta: Option<bool>,
        since: Option<Since>,
    ) -> bool {
        let mut s = self.state.lock();
        let Some(m) = s.members.get_mut(&conn) else {
            return false;
        };
        let was = m.delta;
        let delta = delta.unwrap_or(was);
        m.delta = delta;
        m.base = None;
        let reply = match m.phase {
            Phase::Live { through } | Phase::Lagging { through, .. } => {
                // A `since` this subscription covers lost nothing; one before where it
                // began (a subscription the application made at connect, before the
                // client resumed) cannot be replayed in order behind what it already
                // has: `recovered:false`, so the client reloads instead of losing it
                // unseen.
                let recovered = since.map(|since| {
                    since.epoch.is_some_and(|e| {
                        let from = m.from.map(|f| f.in_epoch(e));
                        through.epoch == e
                            && from.is_some_and(|f| f.epoch == e && f.offset <= since.offset)
                    })
                });
                server::subscribed(self.channel.as_str(), id, through, recovered, delta)
            }
            // Not reached from a session, whose requests wait for its own subscribe
            // and catch-ups to finish: no position to vouch for here.
            Phase::Recovering(_) | Phase::Dropped => {
                server::subscribed_again(self.channel.as_str(), id, delta)
            }
        };
        m.handle.push(Item::reply(reply));
        s.delta_members = s.delta_members + usize::from(delta) - usize::from(was);
        if s.delta_members == 0 {
            s.prev = None;
        }
        true
    }

    /// Every member's handle.
    pub(crate) fn handles(&self) -> Vec<Arc<SessionHandle>> {
        self.state
            .lock()
            .members
            .values()
            .map(|m| m.handle.clone())
            .collect()
    }

    /// Whether `conn` is a member.
    pub(crate) fn contains(&self, conn: ConnId) -> bool {
        self.state.lock().members.contains_key(&conn)
    }

    /// Its members (subscribers, whether or not their subscribe has completed).
    pub(crate) fn len(&self) -> usize {
        self.state.lock().members.len()
    }

    /// Completes `conn`'s subscribe: reads the stream (the position, plus what the
    /// client missed for a resume) and queues `subscribed`, the replay and what arrived
    /// meanwhile, reading again (at most [`ATTEMPTS`] times) while a hole separates the
    /// read from the live arrivals.
    pub(crate) async fn resume(self: &Arc<Self>, conn: ConnId, r: Resume) -> Resumed {
        // A resume reads what the client missed, if it can be recovered at all (the
        // broker decides that before reading); a plain subscribe, or a resume from
        // something that is no epoch, only the position.
        let (from, count, only_in) = match r.since {
            Some(Since {
                offset,
                epoch: Some(epoch),
            }) => (offset, r.max_recovery, Some(epoch)),
            _ => (0, 0, None),
        };
        let mut attempt = 1;
        loop {
            if attempt > ATTEMPTS {
                // Only a broker that keeps re-establishing its subscriptions gets here.
                return Resumed::Unavailable(
                    "the channel's history kept changing while it was read; retry later",
                );
            }
            let Some(read_after) = self.mark(conn) else {
                return Resumed::Gone;
            };
            let read = self
                .env
                .broker
                .history(&self.channel, self.policy, from, count, only_in);
            let page = match tokio::time::timeout(r.timeout, read).await {
                Ok(Ok(page)) => page,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "history read failed");
                    return Resumed::Unavailable(
                        "the channel's history could not be read; retry later",
                    );
                }
                Err(_) => {
                    return Resumed::Unavailable(
                        "the channel's history could not be read in time; retry later",
                    )
                }
            };
            match self.complete(conn, &page, read_after, r, attempt == ATTEMPTS) {
                Completion::Done { recovered } => {
                    let m = &self.env.metrics;
                    match recovered {
                        Some(true) => m.recovered.inc(),
                        Some(false) => m.not_recovered.inc(),
                        None => {}
                    }
                    return Resumed::Done { recovered };
                }
                Completion::ReadAgain => attempt += 1,
                Completion::Gone => return Resumed::Gone,
            }
        }
    }

    /// One round of catching `conn` up in place after it lagged ([`Phase::Lagging`]);
    /// its session asks once its queue has room. Reads the history on from where its
    /// queue ended (about what the queue has room for, at most [`CATCH_UP_PAGE`]
    /// entries) and queues, in order, what fits ([`WhenFull::Refuse`]), then what
    /// reached the channel during the read: live again once it has everything the node
    /// delivered, lagging again (the next round once the queue has room) otherwise.
    /// What it missed that the history no longer holds (trimmed, expired, another
    /// epoch), or a history that cannot be read, closes the session as a slow
    /// consumer: its client resumes on reconnect.
    pub(crate) async fn catch_up_member(
        self: &Arc<Self>,
        conn: ConnId,
        timeout: Duration,
    ) -> CaughtUp {
        for _ in 0..ATTEMPTS {
            // Bounded like repairs: many lagging members must not flood the broker. The
            // wait is the session reader's, so it is bounded too: past it, the member
            // stays lagging and its session asks again after its next reads.
            let permit = tokio::time::timeout(timeout, self.env.catch_up_reads.acquire()).await;
            let Ok(Ok(_permit)) = permit else {
                let s = self.state.lock();
                if let Some(m) = s.members.get(&conn) {
                    if matches!(m.phase, Phase::Lagging { .. }) {
                        m.handle.catch_up_when_room(self.channel.clone(), 0);
                        return CaughtUp::Lagging;
                    }
                }
                return CaughtUp::Gone;
            };
            let (through, catch_ups, limit) = {
                let mut s = self.state.lock();
                let catch_ups = s.catch_ups;
                let Some(m) = s.members.get_mut(&conn) else {
                    return CaughtUp::Gone;
                };
                let Phase::Lagging { through, cost } = m.phase else {
                    return CaughtUp::Gone;
                };
                // Arrivals during the read are held for it, as for a subscribe.
                m.phase = Phase::Recovering(Vec::new());
                // About what its queue has room for: a round reads little more than it
                // queues, however large the channel's publications.
                let fits = (m.handle.room() / cost.max(1)).clamp(CATCH_UP_MIN, CATCH_UP_PAGE);
                (through, catch_ups, fits.min(self.policy.size))
            };
            // The node's own position, not a client's: read without `only_in`, and the
            // epoch checked below.
            let read =
                self.env
                    .broker
                    .history(&self.channel, self.policy, through.offset, limit, None);
            let page = match tokio::time::timeout(timeout, read).await {
                Ok(Ok(page)) => page,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "catch-up read failed");
                    return self.cut(conn, through);
                }
                Err(_) => return self.cut(conn, through),
            };
            if let Some(done) = self.catch_up_round(conn, through, catch_ups, &page) {
                return done;
            }
        }
        // Only a broker that keeps re-establishing its subscriptions gets here.
        let through = match self.state.lock().members.get(&conn).map(|m| &m.phase) {
            Some(Phase::Lagging { through, .. }) => *through,
            _ => return CaughtUp::Gone,
        };
        self.cut(conn, through)
    }

    /// Applies one catch-up read (`page`, read from `through`, issued when the node had
    /// caught up `catch_ups` times) to `conn`, under the lock; `None`: read again.
    fn catch_up_round(
        &self,
        conn: ConnId,
        through: StreamPosition,
        catch_ups: u64,
        page: &HistoryPage,
    ) -> Option<CaughtUp> {
        let mut s = self.state.lock();
        let (last, again) = (s.last, s.catch_ups != catch_ups);
        let missed_since = s.missed_counter();
        let Some(m) = s.members.get_mut(&conn) else {
            return Some(CaughtUp::Gone);
        };
        // Closed as a slow consumer meanwhile (its buffer overflowed), or it left.
        let Phase::Recovering(arrived) = &mut m.phase else {
            return Some(CaughtUp::Gone);
        };
        let arrived = std::mem::take(arrived);
        // What the entries read cost in a queue, on average: the next read's size.
        let read_cost = page
            .publications
            .iter()
            .map(|p| p.payload.len() + p.channel.as_str().len() + 64 + ITEM_OVERHEAD)
            .sum::<usize>()
            / page.publications.len().max(1);
        if again {
            // The broker re-established its subscriptions after the read was issued (a
            // restarted Redis may have lost what it found): read again.
            m.phase = Phase::Lagging {
                through,
                cost: read_cost,
            };
            return None;
        }
        // The history must go on where its queue ended: the same epoch (or, from a
        // start, the epoch a start can continue into), nothing trimmed in between.
        let continues = if through.is_start() {
            through
                .epoch
                .start_continues(page.now, self.policy.meta_ttl)
        } else {
            page.top.epoch == through.epoch
        };
        let first = page.publications.first().and_then(Publication::offset);
        if !continues || (page.top.offset > through.offset && first != Some(through.offset + 1)) {
            drop(s);
            return Some(self.cut(conn, through));
        }
        let mut at = StreamPosition {
            offset: through.offset,
            epoch: page.top.epoch,
        };
        // What did not fit, if something did not.
        let (mut refused, mut replayed) = (None, 0u64);
        let history = page.publications.iter().map(|p| (p, true));
        for (p, from_history) in history.chain(arrived.iter().map(|p| (p, false))) {
            let Some(pos) = p.position else { continue };
            if pos.epoch != at.epoch || pos.offset <= at.offset {
                continue;
            }
            if pos.offset != at.offset + 1 {
                // A hole (not read yet, or still being repaired): the next round.
                break;
            }
            let item = delivery(&self.channel, p, m.positions);
            match m.handle.offer(&item) {
                Pushed::Queued => {}
                Pushed::Refused => {
                    refused = Some(item.cost());
                    break;
                }
                // Larger than the whole queue (closed as a slow consumer, this one and
                // what was queued counted), or the session is closing: what it misses
                // past this one is counted here, and it gets nothing more.
                pushed => {
                    let from = if pushed == Pushed::Overflow { pos } else { at };
                    let missed = missed_since(from);
                    self.env.metrics.dropped(DropReason::Disconnected, missed);
                    m.phase = Phase::Dropped;
                    self.env.metrics.replayed.inc_by(replayed);
                    return Some(CaughtUp::Closed);
                }
            }
            at = pos;
            m.base = Some(pos).filter(|_| matches!(p.payload, Payload::Json(_)));
            replayed += u64::from(from_history);
        }
        self.env.metrics.replayed.inc_by(replayed);
        let caught_up =
            refused.is_none() && last.is_none_or(|l| l.same_epoch(at) && l.offset <= at.offset);
        if caught_up {
            m.phase = Phase::Live { through: at };
            self.env.metrics.history_catch_ups.inc();
            return Some(CaughtUp::Live);
        }
        if refused.is_none() && at == through {
            // Nothing to queue and still behind: the node is in another epoch than the
            // history (a repair will tell), and this member cannot be brought there.
            drop(s);
            return Some(self.cut(conn, through));
        }
        m.phase = Phase::Lagging {
            through: at,
            cost: read_cost.max(1),
        };
        // The next round once what did not fit fits (at once after a round that
        // stopped at the end of its read with room to spare).
        m.handle
            .catch_up_when_room(self.channel.clone(), refused.unwrap_or(0));
        Some(CaughtUp::Lagging)
    }

    /// A lagging member that cannot be caught up: its session closes as a slow
    /// consumer, what it missed after `through` counted as dropped (as `disconnected`
    /// when the session was closing anyway).
    fn cut(&self, conn: ConnId, through: StreamPosition) -> CaughtUp {
        let mut s = self.state.lock();
        let missed = s.missed_since(through);
        let Some(m) = s.members.get_mut(&conn) else {
            return CaughtUp::Gone;
        };
        if !matches!(m.phase, Phase::Lagging { .. } | Phase::Recovering(_)) {
            // Closed meanwhile (its buffer overflowed during the read: counted there).
            return CaughtUp::Closed;
        }
        let metrics = &self.env.metrics;
        if m.handle.is_closing() {
            metrics.dropped(DropReason::Disconnected, missed);
        } else {
            metrics.slow_consumer_disconnects.inc();
            metrics.dropped(DropReason::SlowConsumer, missed);
            m.handle
                .close(close::TRY_AGAIN_LATER, "slow consumer", false);
        }
        m.phase = Phase::Dropped;
        CaughtUp::Closed
    }

    /// Where `conn`'s subscribe stands as a read is issued now (its buffer's length,
    /// the node's catch-ups so far); `None` when it is not recovering.
    pub(crate) fn mark(&self, conn: ConnId) -> Option<Mark> {
        let s = self.state.lock();
        match &s.members.get(&conn)?.phase {
            Phase::Recovering(buf) => Some(Mark {
                buffered: buf.len(),
                catch_ups: s.catch_ups,
            }),
            _ => None,
        }
    }

    /// Completes `conn`'s subscribe with one history read (`page`, issued when its
    /// buffer held `read_after` publications), under the lock, so that nothing
    /// published meanwhile is lost or repeated.
    pub(crate) fn complete(
        self: &Arc<Self>,
        conn: ConnId,
        page: &HistoryPage,
        mark: Mark,
        r: Resume,
        last_attempt: bool,
    ) -> Completion {
        let mut s = self.state.lock();
        // The broker re-established its subscriptions (perhaps a restarted Redis, its
        // data lost) after this read was issued: what the read found may be gone, and a
        // start it found could be continued by an epoch that is not the first since.
        if s.catch_ups != mark.catch_ups {
            return Completion::ReadAgain;
        }
        let read_after = mark.buffered;
        let Some(member) = s.members.get_mut(&conn) else {
            return Completion::Gone;
        };
        let Phase::Recovering(pending) = &member.phase else {
            return Completion::Gone;
        };
        // A resume from a start recovers only if no epoch can have begun and vanished
        // since that start was read (same data lineage, within the meta TTL).
        let start_ok = r.since.is_some_and(|s| {
            s.offset == 0
                && s.epoch
                    .is_some_and(|e| e.start_continues(page.now, self.policy.meta_ttl))
        });
        let merge_with = |max_recovery| {
            merge(
                page,
                pending,
                read_after,
                r.since,
                start_ok,
                max_recovery,
                last_attempt,
            )
        };
        let mut merged = merge_with(r.max_recovery);
        // A replay is queued whole: one that would take more than half the subscriber's
        // queue would close it as a slow consumer before its `subscribed`, and its
        // client would resume into the same wall again and again. It is refused instead
        // (`recovered:false`, before anything is queued): the client is told plainly.
        let budget = self.env.replay_budget;
        if let Merged::Ready {
            recovered: Some(true),
            out,
            ..
        } = &merged
        {
            if replay_bytes(out, page.top.offset) > budget {
                self.env.metrics.replays_refused.inc();
                merged = merge_with(0);
            }
        }
        let Merged::Ready {
            recovered,
            out,
            through,
        } = merged
        else {
            return Completion::ReadAgain;
        };
        let channel = self.channel.as_str();
        member.handle.push(Item::reply(server::subscribed(
            channel,
            r.id,
            page.top,
            recovered,
            member.delta,
        )));
        // Everything after `since` when it recovered, after the reply's position
        // otherwise (or after a reset below).
        member.from = Some(match (recovered, r.since) {
            (Some(true), Some(since)) => StreamPosition {
                offset: since.offset,
                epoch: through.epoch,
            },
            _ => page.top,
        });
        // A resume (and every subscribe) starts with whole publications: the client
        // holds no base from before that the node can vouch for.
        let mut replayed = 0u64;
        for o in out {
            match o {
                Out::Publication(p) => {
                    if p.offset().is_some_and(|o| o <= page.top.offset) {
                        replayed += 1;
                    }
                    member
                        .handle
                        .push(delivery(&self.channel, &p, member.positions));
                    member.base = p.position.filter(|_| matches!(p.payload, Payload::Json(_)));
                }
                Out::Reset(at) => {
                    self.env.metrics.history_unrepairable.inc();
                    member.handle.push(Item::reply(server::reset(channel, at)));
                    member.from = Some(at);
                }
            }
        }
        self.env.metrics.replayed.inc_by(replayed);
        member.phase = Phase::Live { through };
        // Once publications arrive, this member already has everything up to the node's
        // last (what arrived since it subscribed was merged above). Before the first
        // arrival, the first arrival is checked against the lowest live position.
        // (A member at the start, before any publication, is offset 0 of the epoch
        // other members are in: the floor keeps that epoch, so a first arrival of
        // another one is checked.)
        if s.last.is_none() {
            match s.floor {
                None => s.floor = Some(through),
                Some(f) if f.same_epoch(through) => {
                    let epoch = if f.is_start() { through.epoch } else { f.epoch };
                    s.floor = Some(StreamPosition {
                        offset: f.offset.min(through.offset),
                        epoch,
                    });
                }
                Some(_) => {}
            }
        }
        // The node (or, before any arrival, another member) is in another epoch than this
        // member now has: one of the two is stale. The stream tells which, and the
        // repair announces it to whoever is behind.
        if s.repairing.is_none() && s.last.or(s.floor).is_some_and(|l| !l.same_epoch(through)) {
            s.repairing = Some(Vec::new());
            tokio::spawn(self.clone().repair(through));
        }
        Completion::Done { recovered }
    }

    /// A publication that reached the node on this channel.
    pub(crate) fn arrive(self: &Arc<Self>, p: Publication) {
        let mut s = self.state.lock();
        if p.position.is_none() {
            // A raw publish into Redis bypasses history: delivered to everyone as is.
            let item = Item::delivery(&p, false);
            let to = s.members.values().map(|m| &m.handle);
            SessionHandle::push_to_all(to, &item, &self.env.metrics, false);
            return;
        }
        self.buffer(&mut s, std::slice::from_ref(&p));
        self.feed(&mut s, p, true);
    }

    /// Holds `p` while a repair reads the stream, or applies it now.
    fn feed(self: &Arc<Self>, s: &mut State, p: Publication, may_repair: bool) {
        if let Some(waiting) = &mut s.repairing {
            // Bounded: what does not fit is a gap again afterwards, which the next
            // repair reads from the stream.
            if waiting.len() < self.env.max_pending {
                waiting.push(p);
            }
            return;
        }
        self.accept(s, p, may_repair);
    }

    /// The broker's subscriptions were re-established after an outage: catch up from
    /// the stream (what was published meanwhile never arrived).
    pub(crate) fn catch_up(self: &Arc<Self>) {
        let mut s = self.state.lock();
        s.catch_ups += 1;
        let (Some(last), None) = (s.last.or(s.floor), &s.repairing) else {
            return;
        };
        s.repairing = Some(Vec::new());
        tokio::spawn(self.clone().repair(last));
    }

    /// Appends what reached the channel to every recovering member's buffer; one that
    /// overflows (its history read takes too long for the publication rate) is closed
    /// as a slow consumer, like a subscriber whose queue overflows.
    fn buffer(&self, s: &mut State, ps: &[Publication]) {
        if ps.is_empty() {
            return;
        }
        let (max, metrics) = (self.env.max_pending, &self.env.metrics);
        for m in s.members.values_mut() {
            let Phase::Recovering(buf) = &mut m.phase else {
                continue;
            };
            buf.extend(ps.iter().cloned());
            if buf.len() <= max {
                continue;
            }
            metrics.slow_consumer_disconnects.inc();
            metrics.dropped(DropReason::SlowConsumer, buf.len() as u64);
            m.handle
                .close(close::TRY_AGAIN_LATER, "slow consumer", false);
            m.phase = Phase::Dropped;
        }
    }

    /// Applies [`verdict`] to an arriving (or repaired) publication. A gap, and a
    /// publication of another epoch, first ask the stream (a repair): only the stream
    /// tells a new epoch from an old one's publication still in flight.
    fn accept(self: &Arc<Self>, s: &mut State, p: Publication, may_repair: bool) {
        let Some(pos) = p.position else { return };
        let reference = s.last.or(s.floor);
        match verdict(reference, pos) {
            Verdict::Deliver => {
                s.set_last(pos);
                self.fan_out(s, &p);
            }
            Verdict::Duplicate => self.env.metrics.history_duplicates.inc(),
            Verdict::Gap { .. } | Verdict::NewEpoch if may_repair => {
                let since = reference.unwrap_or(pos);
                s.repairing = Some(vec![p]);
                tokio::spawn(self.clone().repair(since));
            }
            Verdict::Gap { .. } | Verdict::NewEpoch => {
                // Confirmed by the stream: announce what cannot be delivered.
                self.env.metrics.history_unrepairable.inc();
                let at = StreamPosition {
                    offset: pos.offset.saturating_sub(1),
                    epoch: pos.epoch,
                };
                self.reset_to(s, at);
                s.set_last(pos);
                self.fan_out(s, &p);
            }
        }
    }

    /// Tells every live member that lacks something before `at` that the stream goes on
    /// after `at`.
    fn reset_to(&self, s: &mut State, at: StreamPosition) {
        let reset = Item::reply(server::reset(self.channel.as_str(), at));
        for m in s.members.values_mut() {
            if matches!(m.phase, Phase::Live { through }
                if through.in_epoch(at.epoch).epoch != at.epoch || through.offset < at.offset)
            {
                m.reset(at, &reset);
            }
        }
    }

    /// Tells every live member still in another epoch than `at`'s that the stream goes
    /// on after `at` (members of `at`'s epoch keep their position).
    fn reset_other_epochs(&self, s: &mut State, at: StreamPosition) {
        if s.members
            .values()
            .any(|m| matches!(m.phase, Phase::Live { through } if !through.same_epoch(at)))
        {
            let reset = Item::reply(server::reset(self.channel.as_str(), at));
            for m in s.members.values_mut() {
                if matches!(m.phase, Phase::Live { through } if !through.same_epoch(at)) {
                    m.reset(at, &reset);
                }
            }
        }
    }

    /// Delivers a publication to the live members of its epoch that do not have it yet.
    /// A member in another epoch gets nothing here: the stream decides, through a
    /// repair, which of the two is current, and resets whoever is not in it.
    fn fan_out(&self, s: &mut State, p: &Publication) {
        let Some(pos) = p.position else { return };
        // A member at the start (it joined before the channel had any publication)
        // continues with offset 1 of any epoch, which names the epoch. Anything later
        // first would be a hole it cannot see (the node went on in an epoch its read
        // did not find): it is told.
        if pos.offset > 1 {
            let at = StreamPosition {
                offset: pos.offset - 1,
                epoch: pos.epoch,
            };
            let reset = Item::reply(server::reset(self.channel.as_str(), at));
            for m in s.members.values_mut() {
                if matches!(m.phase, Phase::Live { through } if through.is_start()) {
                    self.env.metrics.history_unrepairable.inc();
                    m.reset(at, &reset);
                }
            }
        }
        // Members whose queue had no room (and what did not fit): they lag, and catch
        // up from the history.
        let mut lagged: Vec<(ConnId, usize)> = Vec::new();
        // `positions`: only members that do (or do not) track positions; `None`: all.
        let live = |positions: Option<bool>| {
            s.members.iter().filter(move |(_, m)| {
                positions.is_none_or(|p| m.positions == p)
                    && matches!(m.phase, Phase::Live { through }
                        if through.same_epoch(pos) && through.offset < pos.offset)
            })
        };
        let metrics = &self.env.metrics;
        let push = |to: &mut dyn Iterator<Item = (&ConnId, &Member)>,
                    item: &Item,
                    lagged: &mut Vec<(ConnId, usize)>| {
            let to = to.map(|(c, m)| (*c, &m.handle));
            SessionHandle::push_each(to, item, metrics, false, WhenFull::Refuse, |c| {
                lagged.push((c, item.cost()))
            });
        };
        let plain = Item::delivery(p, false);
        if matches!(p.payload, Payload::Binary(_)) {
            push(&mut live(Some(false)), &plain, &mut lagged);
            let positioned = delivery(&self.channel, p, true);
            push(&mut live(Some(true)), &positioned, &mut lagged);
        } else {
            // Text deliveries carry the offset for everyone: one encoding, one pass;
            // members that hold the publication before take its delta instead, when
            // one is worth sending (computed once, here, for all of them).
            let base = s.prev.as_ref().and_then(|prev| {
                let at = prev.position?;
                (at.epoch == pos.epoch && at.offset + 1 == pos.offset).then_some((prev, at))
            });
            let holds_base = |m: &Member| m.delta && base.is_some_and(|(_, at)| m.base == Some(at));
            let delta = match (base, &p.payload) {
                (Some((prev, _)), Payload::Json(data))
                    if live(None).any(|(_, m)| holds_base(m)) =>
                {
                    let paused = s
                        .deltas_paused_until
                        .is_some_and(|t| std::time::Instant::now() < t);
                    self.delta_item(prev, p, data, plain.len, paused)
                }
                _ => None,
            };
            if let Some(Err(until)) = &delta {
                s.deltas_paused_until = Some(*until);
            }
            let delta = delta.and_then(Result::ok);
            match &delta {
                Some(d) => {
                    push(
                        &mut live(None).filter(|(_, m)| !holds_base(m)),
                        &plain,
                        &mut lagged,
                    );
                    push(
                        &mut live(None).filter(|(_, m)| holds_base(m)),
                        d,
                        &mut lagged,
                    );
                }
                None => push(&mut live(None), &plain, &mut lagged),
            }
        }
        for (c, cost) in lagged {
            let Some(m) = s.members.get_mut(&c) else {
                continue;
            };
            if let Phase::Live { through } = m.phase {
                // It keeps what it has queued; the catch-up replays from there, whole.
                m.phase = Phase::Lagging { through, cost };
                m.base = None;
                m.handle.catch_up_when_room(self.channel.clone(), cost);
            }
        }
        let json = matches!(p.payload, Payload::Json(_));
        for m in s.members.values_mut() {
            if let Phase::Live { through } = &mut m.phase {
                if through.same_epoch(pos) && through.offset < pos.offset {
                    *through = pos;
                    m.base = json.then_some(pos);
                }
            }
        }
        s.prev = (json && s.delta_members > 0).then(|| p.clone());
    }

    /// The delta delivery turning `prev`'s data into `p`'s (`data`), when it is
    /// smaller than the whole delivery (`whole` bytes); `None` otherwise (counted
    /// either way), or `Err` with when to compute deltas again when this one was slow
    /// ([`DeltaLimits::max_time`]).
    fn delta_item(
        &self,
        prev: &Publication,
        p: &Publication,
        data: &[u8],
        whole: usize,
        paused: bool,
    ) -> Option<Result<Item, std::time::Instant>> {
        let (Payload::Json(before), Some(at)) = (&prev.payload, p.position) else {
            return None;
        };
        let metrics = &self.env.metrics;
        // A carriage return (JSON whitespace only) does not survive SSE framing, which
        // splits lines on it: the client's base would differ from the node's.
        if paused
            || data.len().max(before.len()) > self.env.delta.max_bytes
            || data.contains(&b'\r')
            || before.contains(&b'\r')
        {
            metrics.delta_skipped.inc();
            return None;
        }
        let started = std::time::Instant::now();
        let frame = herald_protocol::delta::fossil(before, data)
            .map(|d| server::delta_delivery(self.channel.as_str(), at.offset, &d))
            .filter(|f| f.len() < whole);
        let took = started.elapsed();
        if took > self.env.delta.max_time {
            tracing::info!(channel = %self.channel, ?took, "slow delta: the channel's deltas pause");
            metrics.delta_skipped.inc();
            return Some(Err(started + took + DELTA_PAUSE));
        }
        let Some(frame) = frame else {
            metrics.delta_whole.inc();
            return None;
        };
        metrics.delta_sent.inc();
        let len = frame.len();
        Some(Ok(Item {
            out: crate::wire::Out::Message(Message::Text(frame.into())),
            len,
            published_at_us: p.published_at_us,
            deliveries: 1,
        }))
    }

    /// Reads the publications after `since` from the stream and delivers them, then
    /// what arrived while reading; a hole the stream cannot fill becomes a `reset`.
    ///
    /// The read also says which epoch the stream is in: that one is confirmed. If the
    /// node was in another, it moves (every member not in the confirmed epoch, or
    /// behind where the read continues, gets a `reset`); members left in another epoch
    /// are brought into it even when the node was not. Publications of another epoch
    /// that arrived before the read are an old epoch's, still in flight: skipped; ones
    /// that arrived during it are checked again. A read that fails confirms nothing:
    /// what waits stays waiting and the read is tried again with backoff.
    async fn repair(self: Arc<Self>, since: StreamPosition) {
        let mut attempt = 0u32;
        let (page, from_start, read_after) = loop {
            let read_after = self.state.lock().repairing.as_ref().map_or(0, Vec::len);
            let (page, from_start) = {
                let _permit = self.env.repairs.acquire().await;
                let size = self.policy.size;
                let read = |from| {
                    self.env
                        .broker
                        .history(&self.channel, self.policy, from, size, None)
                };
                match read(since.offset).await {
                    Ok(page) if !page.top.same_epoch(since) => (read(0).await, true),
                    other => (other, false),
                }
            };
            match page {
                Ok(page) => break (page, from_start, read_after),
                Err(e) => {
                    let gone = {
                        let mut s = self.state.lock();
                        // Nobody left to repair for (the channel may be gone).
                        let gone = s.members.is_empty();
                        if gone {
                            s.repairing = None;
                        }
                        gone
                    };
                    if gone {
                        return;
                    }
                    tracing::warn!(channel = %self.channel, error = %e, "history repair failed; retrying");
                    let delay = Duration::from_millis(100u64 << attempt.min(6));
                    tokio::time::sleep(delay.min(Duration::from_secs(5))).await;
                    attempt += 1;
                }
            }
        };
        let mut s = self.state.lock();
        let waiting = s.repairing.take().unwrap_or_default();
        self.env.metrics.history_repairs.inc();
        // Members at a start from before the data's lineage changed (or from longer ago
        // than an idle epoch lives) cannot know whether an epoch began and vanished
        // meanwhile: they are told, with a `reset` to the start of the current stream.
        let stale = |m: &Member| {
            matches!(m.phase, Phase::Live { through }
                if through.is_start() && !through.epoch.start_continues(page.now, self.policy.meta_ttl))
        };
        if s.members.values().any(stale) {
            // They go on from the beginning of the stream as it is now: what it holds is
            // delivered below, in order (a hole before it is announced again there).
            let fresh = StreamPosition {
                offset: 0,
                epoch: page.top.epoch,
            };
            let reset = Item::reply(server::reset(self.channel.as_str(), fresh));
            for m in s.members.values_mut() {
                if stale(m) {
                    self.env.metrics.history_unrepairable.inc();
                    m.reset(fresh, &reset);
                }
            }
        }
        let current = page.top.epoch;
        // Where the fetched publications continue from, in the current epoch.
        let mut fetched = page.publications;
        let mut at = StreamPosition {
            offset: if from_start {
                fetched
                    .first()
                    .and_then(Publication::offset)
                    .map_or(page.top.offset, |o| o.saturating_sub(1))
            } else {
                since.offset
            },
            epoch: current,
        };
        let moved = s.last.or(s.floor).is_some_and(|r| !r.same_epoch(page.top));
        if moved {
            // A new epoch's stream is replayed to every member it resets: within the
            // queue budget, or not at all (the reset then names the top).
            if replay_cost(&fetched) > self.env.replay_budget {
                // Members still completing a subscribe hold them all the same (bounded
                // by their buffer): their merge decides what they lack, and none of it
                // may go missing without a `reset`.
                self.buffer(&mut s, &fetched);
                fetched.clear();
                at.offset = page.top.offset;
            }
            self.env.metrics.history_unrepairable.inc();
            self.reset_to(&mut s, at);
            s.set_last(at);
        } else if !page.top.is_start() {
            // (A stream that is gone confirms no epoch: what arrives next will.)
            self.reset_other_epochs(&mut s, at);
        }
        self.buffer(&mut s, &fetched);
        for p in fetched {
            let reference = s.last.or(s.floor);
            match p.position.map(|pos| verdict(reference, pos)) {
                Some(Verdict::Deliver) => self.env.metrics.history_repaired.inc(),
                // The node has it, but a member brought into this epoch above may not:
                // fan-out gives each member only what it lacks.
                Some(Verdict::Duplicate) => {
                    self.fan_out(&mut s, &p);
                    continue;
                }
                _ => {}
            }
            self.accept(&mut s, p, false);
        }
        for (i, p) in waiting.into_iter().enumerate() {
            let Some(pos) = p.position else { continue };
            if pos.epoch == current {
                self.feed(&mut s, p, false);
            } else if i < read_after {
                // Arrived before the read, which found the stream in another epoch.
                self.env.metrics.history_stale.inc();
            } else {
                // Arrived while reading, in another epoch than the read found: ask again.
                self.feed(&mut s, p, true);
            }
        }
    }
}

impl State {
    /// `last` moves to `pos`; an epoch it leaves (for another, or for a start: the
    /// stream is gone) is remembered in `prev_top`.
    fn set_last(&mut self, pos: StreamPosition) {
        if let Some(last) = self.last.filter(|l| !l.is_start() && l.epoch != pos.epoch) {
            self.prev_top = Some(last);
        }
        self.last = Some(pos);
    }

    /// How many offsets the node delivered after `through`: in the current epoch, or
    /// in the one before (what was left of it, and the current epoch's so far); of an
    /// older epoch, at least the current epoch's.
    fn missed_since(&self, through: StreamPosition) -> u64 {
        self.missed_counter()(through)
    }

    /// [`State::missed_since`], taken along where the lock is let go.
    fn missed_counter(&self) -> impl Fn(StreamPosition) -> u64 {
        let (last, prev_top) = (self.last, self.prev_top);
        move |through| missed(last, prev_top, through)
    }
}

/// [`State::missed_since`] for a stream whose last delivery is `last`, and the last of
/// the epoch before `prev_top`.
fn missed(
    last: Option<StreamPosition>,
    prev_top: Option<StreamPosition>,
    through: StreamPosition,
) -> u64 {
    let Some(last) = last else { return 0 };
    if through.is_start() {
        // Before the first offset of any epoch it may continue into.
        return prev_top.map_or(0, |p| p.offset) + last.offset;
    }
    if last.epoch == through.epoch {
        return last.offset.saturating_sub(through.offset);
    }
    let before = prev_top
        .filter(|p| p.epoch == through.epoch)
        .map_or(0, |p| p.offset.saturating_sub(through.offset));
    before + last.offset
}

/// The queue item delivering `p` to a member (that tracks positions, or not): a
/// binary delivery at offset 1 to a member that tracks positions goes after an `epoch`
/// frame (binary frames have no room for the epoch; text ones carry it).
fn delivery(channel: &ChannelName, p: &Publication, positions: bool) -> Item {
    match (&p.payload, p.position) {
        (Payload::Binary(data), Some(at)) if positions && at.offset == 1 => {
            // One item: queued (or refused) together, never an `epoch` frame alone.
            let mut frames = crate::wire::Frames::default();
            frames.text(&server::epoch(channel.as_str(), at.epoch));
            frames.binary(&server::binary_frame_with_offset(
                channel.as_str(),
                at.offset,
                data,
            ));
            let out = frames.finish();
            Item {
                len: out.len(),
                out: crate::wire::Out::Frames(out),
                published_at_us: p.published_at_us,
                deliveries: 1,
            }
        }
        _ => Item::delivery(p, positions),
    }
}

/// What delivering `ps` costs a subscriber's queue, about: each frame's payload,
/// channel and fields, and its queue slot.
fn replay_cost(ps: &[Publication]) -> usize {
    ps.iter()
        .map(|p| p.payload.len() + p.channel.as_str().len() + 64 + crate::handle::ITEM_OVERHEAD)
        .sum()
}

/// What queueing the replayed part of `out` (offsets up to `top`) costs a subscriber's
/// queue, about: each frame's payload, channel and fields, and its queue slot.
fn replay_bytes(out: &[Out], top: u64) -> usize {
    out.iter()
        .map(|o| match o {
            Out::Publication(p) if p.offset().is_some_and(|o| o <= top) => {
                p.payload.len() + p.channel.as_str().len() + 64 + crate::handle::ITEM_OVERHEAD
            }
            _ => 0,
        })
        .sum()
}

/// What the node does with an arriving publication, given the last one it delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The next offset (or the first the node sees): deliver it.
    Deliver,
    /// Already delivered (it came twice, or a repair fetched it first): skip it.
    Duplicate,
    /// Offsets after `after` are missing: fetch them from the stream first.
    Gap { after: u64 },
    /// The stream was reset (a new epoch): what came before may be lost.
    NewEpoch,
}

pub(crate) fn verdict(last: Option<StreamPosition>, p: StreamPosition) -> Verdict {
    match last.map(|l| l.in_epoch(p.epoch)) {
        None => Verdict::Deliver,
        Some(l) if l.epoch != p.epoch => Verdict::NewEpoch,
        Some(l) if p.offset <= l.offset => Verdict::Duplicate,
        Some(l) if p.offset == l.offset + 1 => Verdict::Deliver,
        Some(l) => Verdict::Gap { after: l.offset },
    }
}

/// One thing a completing subscriber receives after its `subscribed` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Out {
    /// Deliver this publication.
    Publication(Publication),
    /// Publications before this position's next one may be missing.
    Reset(StreamPosition),
}

/// How a subscribe on a history channel completes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Merged {
    /// The subscriber can go live with this.
    Ready {
        /// For a resume: whether every missed publication follows.
        recovered: Option<bool>,
        /// What follows the `subscribed` reply, in order.
        out: Vec<Out>,
        /// The last position the subscriber will have received.
        through: StreamPosition,
    },
    /// Publications between the history read and the live ones are missing (they were
    /// lost in transit and are being repaired): read the history again.
    Incomplete,
}

/// Merges a history read (`top` and `history`, all of `top`'s epoch) with what arrived
/// live meanwhile (`pending`, in arrival order, any epoch, duplicates possible; the
/// first `read_after` arrived before the read was issued) into what the subscriber
/// gets. On the `last_attempt`, a hole left between history and live publications is
/// reported with a `reset` instead of asking for another read.
///
/// A pending publication of another epoch than `top`'s is an old epoch's still in
/// flight when it arrived before the read (epochs never come back), and is skipped;
/// one that arrived after may be a newer epoch's: read again to know.
#[allow(clippy::too_many_arguments)]
pub(crate) fn merge(
    page: &HistoryPage,
    pending: &[Publication],
    read_after: usize,
    since: Option<Since>,
    start_ok: bool,
    max_recovery: usize,
    last_attempt: bool,
) -> Merged {
    let history = &page.publications[..];
    let mut out = Vec::new();
    // A read that found no stream (a start), and publications arrived after it: they
    // may begin a new epoch, or be an old one's still in flight (the stream lost, its
    // publications on their way). Only the stream tells: read again, where it now has
    // an epoch to compare with. On the last attempt the subscriber goes on after the
    // last of them, told with a `reset` (never handed a publication that may be stale).
    // Arrivals from before the read are of an epoch the read no longer found: stale,
    // skipped below.
    let top = page.top;
    if top.is_start() {
        let after = pending.get(read_after..).unwrap_or_default();
        if let Some(last) = after.iter().filter_map(|p| p.position).last() {
            if !last_attempt {
                return Merged::Incomplete;
            }
            return Merged::Ready {
                recovered: since.map(|_| false),
                out: vec![Out::Reset(last)],
                through: last,
            };
        }
    }
    let recovered = since.map(|s| {
        let missed = top.offset.checked_sub(s.offset);
        (s.epoch == Some(top.epoch) || start_ok)
            && missed.is_some_and(|m| m <= max_recovery as u64)
            && covers(history, s.offset, top.offset)
    });
    if recovered == Some(true) {
        let from = since.map_or(top.offset, |s| s.offset);
        out.extend(
            history
                .iter()
                .filter(|p| p.offset().is_some_and(|o| o > from && o <= top.offset))
                .cloned()
                .map(Out::Publication),
        );
    }
    let mut at = top;
    let mut live: Vec<&Publication> = pending
        .iter()
        .filter(|p| {
            p.position
                .is_some_and(|q| q.epoch == top.epoch && q.offset > top.offset)
        })
        .collect();
    live.sort_by_key(|p| p.offset());
    live.dedup_by_key(|p| p.offset());
    for p in live {
        let Some(pos) = p.position else { continue };
        if pos.offset > at.offset + 1 {
            if !last_attempt {
                return Merged::Incomplete;
            }
            out.push(Out::Reset(StreamPosition {
                offset: pos.offset - 1,
                epoch: pos.epoch,
            }));
        }
        out.push(Out::Publication(p.clone()));
        at = pos;
    }
    // Another epoch's publications that arrived after the read: an old epoch's still
    // in flight, or a newer epoch begun meanwhile. Another read tells; after the last,
    // the subscriber goes live in `top`'s epoch and the live path, which asks the
    // stream, announces a newer epoch to it with a `reset`.
    let other_epoch = pending
        .iter()
        .skip(read_after)
        .any(|p| p.position.is_some_and(|q| q.epoch != top.epoch));
    if other_epoch && !last_attempt {
        return Merged::Incomplete;
    }
    Merged::Ready {
        recovered,
        out,
        through: at,
    }
}

/// Whether `history` holds exactly the offsets `from + 1 ..= to`.
fn covers(history: &[Publication], from: u64, to: u64) -> bool {
    let mut want = from + 1;
    for o in history.iter().filter_map(Publication::offset) {
        if o <= from {
            continue;
        }
        if o != want || o > to {
            return false;
        }
        want += 1;
    }
    want == to + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use herald_broker::{inbound, MemoryBroker, Received};
    use herald_protocol::{ChannelName, Epoch, Payload};
    use tokio_tungstenite::tungstenite::Message;

    const E: u64 = 7;

    fn pos(offset: u64) -> StreamPosition {
        StreamPosition {
            offset,
            epoch: Epoch::new(E).unwrap(),
        }
    }

    /// What a member missed is counted across an epoch change (Redis restarted while
    /// it lagged): the rest of its epoch and the new one's so far; from a start, both.
    #[test]
    fn what_a_member_missed_is_counted_across_epochs() {
        let at = |offset, e| StreamPosition {
            offset,
            epoch: Epoch::new(e).unwrap(),
        };
        // Same epoch.
        assert_eq!(missed(Some(at(2000, 7)), None, at(101, 7)), 1899);
        // The stream moved on to epoch 8 (3 delivered in it) after 2000 in epoch 7.
        assert_eq!(missed(Some(at(3, 8)), Some(at(2000, 7)), at(101, 7)), 1902);
        // A new epoch that has delivered nothing yet (its start: offset 0).
        assert_eq!(missed(Some(at(0, 8)), Some(at(2000, 7)), at(101, 7)), 1899);
        // From an older epoch still: at least the current epoch's.
        assert_eq!(missed(Some(at(5, 9)), Some(at(2000, 8)), at(101, 7)), 5);
        // From a start: all of the epoch before and the current one's.
        let start = StreamPosition {
            offset: 0,
            epoch: Epoch::start(1, 0),
        };
        assert_eq!(missed(Some(at(4, 8)), Some(at(20, 7)), start), 24);
        assert_eq!(missed(Some(at(20, 7)), None, start), 20);
        assert_eq!(missed(None, None, at(3, 7)), 0);
    }

    fn pubs(offsets: impl IntoIterator<Item = u64>) -> Vec<Publication> {
        offsets
            .into_iter()
            .map(|o| Publication {
                position: Some(pos(o)),
                ..Publication::now(
                    ChannelName::new("c").unwrap(),
                    Payload::Json(Bytes::from_static(b"1")),
                )
            })
            .collect()
    }

    fn since(offset: u64) -> Option<Since> {
        Some(Since {
            offset,
            epoch: Epoch::new(E),
        })
    }

    fn offsets(m: &Merged) -> Vec<i64> {
        let Merged::Ready { out, .. } = m else {
            panic!("incomplete")
        };
        out.iter()
            .map(|o| match o {
                Out::Publication(p) => p.offset().unwrap() as i64,
                Out::Reset(p) => -(p.offset as i64),
            })
            .collect()
    }

    #[test]
    fn verdicts() {
        assert_eq!(verdict(None, pos(5)), Verdict::Deliver);
        assert_eq!(verdict(Some(pos(4)), pos(5)), Verdict::Deliver);
        assert_eq!(verdict(Some(pos(5)), pos(5)), Verdict::Duplicate);
        assert_eq!(verdict(Some(pos(4)), pos(7)), Verdict::Gap { after: 4 });
        let other = StreamPosition {
            offset: 1,
            epoch: Epoch::new(E + 1).unwrap(),
        };
        assert_eq!(verdict(Some(pos(4)), other), Verdict::NewEpoch);
    }

    #[test]
    fn resume_replays_history_then_live_without_duplicates() {
        // Read history 42..=57; live arrivals overlap it and continue.
        let m = merge_at(
            pos(57),
            &pubs(42..=57),
            &pubs(55..=60),
            0,
            since(41),
            100,
            false,
        );
        assert_eq!(offsets(&m), (42..=60).collect::<Vec<_>>());
        let Merged::Ready {
            recovered, through, ..
        } = m
        else {
            unreachable!()
        };
        assert_eq!((recovered, through), (Some(true), pos(60)));
    }

    #[test]
    fn resume_is_refused_whole_never_partial() {
        // Trimmed: history starts after what the client missed.
        let m = merge_at(pos(57), &pubs(50..=57), &[], 0, since(41), 100, false);
        assert_eq!(offsets(&m), Vec::<i64>::new());
        assert!(
            matches!(m, Merged::Ready { recovered: Some(false), through, .. } if through == pos(57))
        );
        // Too many missed.
        let m = merge_at(pos(57), &pubs(42..=57), &[], 0, since(41), 10, false);
        assert!(matches!(
            m,
            Merged::Ready {
                recovered: Some(false),
                ..
            }
        ));
        // Another epoch.
        let other = Some(Since {
            offset: 41,
            epoch: Epoch::new(E + 1),
        });
        let m = merge_at(pos(57), &pubs(42..=57), &[], 0, other, 100, false);
        assert!(matches!(
            m,
            Merged::Ready {
                recovered: Some(false),
                ..
            }
        ));
        // An offset from the future (of another run).
        let m = merge_at(pos(57), &pubs(42..=57), &[], 0, since(90), 100, false);
        assert!(matches!(
            m,
            Merged::Ready {
                recovered: Some(false),
                ..
            }
        ));
        // Nothing missed.
        let m = merge_at(pos(57), &[], &pubs([58]), 0, since(57), 100, false);
        assert_eq!(offsets(&m), vec![58]);
        assert!(matches!(
            m,
            Merged::Ready {
                recovered: Some(true),
                ..
            }
        ));
    }

    #[test]
    fn a_hole_between_history_and_live_asks_for_another_read_then_resets() {
        let m = merge_at(
            pos(57),
            &pubs(42..=57),
            &pubs([60, 61]),
            0,
            since(41),
            100,
            false,
        );
        assert_eq!(m, Merged::Incomplete);
        let m = merge_at(
            pos(57),
            &pubs(42..=57),
            &pubs([60, 61]),
            0,
            since(41),
            100,
            true,
        );
        let mut want: Vec<i64> = (42..=57).collect();
        want.extend([-59, 60, 61]);
        assert_eq!(offsets(&m), want);
    }

    #[test]
    fn a_plain_subscribe_starts_at_the_top() {
        let m = merge_at(pos(57), &[], &pubs([56, 57, 58, 59]), 0, None, 100, false);
        assert_eq!(offsets(&m), vec![58, 59]);
        assert!(matches!(m, Merged::Ready { recovered: None, through, .. } if through == pos(59)));
    }

    #[test]
    fn a_new_epoch_meanwhile_is_announced() {
        let mut newer = pubs([1, 2]);
        for p in &mut newer {
            p.position = p.position.map(|q| StreamPosition {
                epoch: Epoch::new(E + 1).unwrap(),
                ..q
            });
        }
        // Arrived after the read: perhaps newer, perhaps an old epoch's in flight.
        assert_eq!(
            merge_at(pos(57), &[], &newer, 0, None, 100, false),
            Merged::Incomplete
        );
        // Arrived before the read, which found epoch E: an old epoch's, skipped.
        let m = merge_at(pos(57), &[], &newer, 2, None, 100, false);
        assert_eq!(offsets(&m), Vec::<i64>::new());
        // Still there after the last read: the subscriber goes live in E (the live
        // path announces a newer epoch once the stream confirms it).
        let m = merge_at(pos(57), &[], &newer, 0, None, 100, true);
        assert_eq!(offsets(&m), Vec::<i64>::new());
    }

    fn policy() -> HistoryPolicy {
        HistoryPolicy {
            size: 100,
            ttl: Duration::from_secs(60),
            meta_ttl: Duration::from_secs(60),
        }
    }

    fn stream_on(broker: Arc<dyn Broker>, metrics: Metrics) -> Arc<Stream> {
        let env = Arc::new(StreamEnv::new(
            broker,
            metrics,
            100,
            1 << 20,
            DeltaLimits::default(),
        ));
        Arc::new(Stream::new(
            ChannelName::new("news").unwrap(),
            policy(),
            env,
        ))
    }

    fn stream() -> Arc<Stream> {
        let metrics = Metrics::unregistered();
        let (tx, _rx) = inbound(8, metrics.clone());
        stream_on(Arc::new(MemoryBroker::new(tx)), metrics)
    }

    fn resume(id: Option<u64>, since: Option<Since>) -> Resume {
        Resume {
            id,
            since,
            max_recovery: 100,
            timeout: Duration::from_secs(1),
        }
    }

    fn texts(h: &SessionHandle) -> Vec<serde_json::Value> {
        let mut q = std::collections::VecDeque::new();
        h.drain(&mut q);
        q.into_iter()
            .flat_map(|i| i.out.into_messages())
            .map(|m| match m {
                Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn delivered(h: &SessionHandle) -> Vec<u64> {
        texts(h)[1..]
            .iter()
            .map(|m| m["offset"].as_u64().unwrap())
            .collect()
    }

    fn positioned(offset: u64) -> Publication {
        pubs([offset]).remove(0)
    }

    /// A read issued before anything was buffered or caught up.
    const MARK: Mark = Mark {
        buffered: 0,
        catch_ups: 0,
    };

    fn page(top: u64, history: Vec<Publication>) -> HistoryPage {
        HistoryPage {
            top: pos(top),
            publications: history,
            now: herald_protocol::Epoch::start(1, 1000),
        }
    }

    /// [`merge`] of a read that found `top` and `history` (not a resume from a start).
    fn merge_at(
        top: StreamPosition,
        history: &[Publication],
        pending: &[Publication],
        read_after: usize,
        since: Option<Since>,
        max_recovery: usize,
        last_attempt: bool,
    ) -> Merged {
        let page = HistoryPage {
            top,
            publications: history.to_vec(),
            now: herald_protocol::Epoch::start(1, 1000),
        };
        merge(
            &page,
            pending,
            read_after,
            since,
            false,
            max_recovery,
            last_attempt,
        )
    }

    /// Publications that reach the channel while a subscriber reads the history are
    /// held for it and merged after the history: none lost, none twice. A subscriber
    /// that was live all along gets each once too.
    #[tokio::test]
    async fn live_publications_during_a_resume_are_merged_after_the_history() {
        let news = stream();
        let env = crate::handle::tests::env(1 << 20);
        let live = Arc::new(SessionHandle::new(0, env.clone()));
        news.join(1, &live, true, false);
        assert_eq!(
            news.complete(1, &page(0, vec![]), MARK, resume(Some(1), None), false),
            Completion::Done { recovered: None }
        );
        news.arrive(positioned(1));
        news.arrive(positioned(2));

        // A client that had offset 1 resumes; its history read saw the stream up to 2,
        // then 3 and 4 arrive before the subscribe completes (2 arrives again too).
        let resuming = Arc::new(SessionHandle::new(0, env.clone()));
        news.join(2, &resuming, true, false);
        news.arrive(positioned(3));
        news.arrive(positioned(4));
        assert_eq!(
            news.complete(
                2,
                &page(2, pubs([2])),
                MARK,
                resume(Some(7), since(1)),
                false
            ),
            Completion::Done {
                recovered: Some(true)
            }
        );
        news.arrive(positioned(5));
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
        assert_eq!(delivered(&live), vec![1, 2, 3, 4, 5]);
    }

    /// Found by the rolling-restart test: on a fresh node two subscribers complete
    /// before any publication arrives, the one whose history read was later first. The
    /// other still gets what was in flight between the two reads.
    #[tokio::test]
    async fn subscribers_completing_out_of_order_each_get_what_was_in_flight() {
        let news = stream();
        let env = crate::handle::tests::env(1 << 20);
        let early = Arc::new(SessionHandle::new(0, env.clone()));
        let late = Arc::new(SessionHandle::new(0, env.clone()));
        news.join(1, &early, true, false);
        news.join(2, &late, true, false);
        news.complete(2, &page(5, vec![]), MARK, resume(None, None), false);
        news.complete(1, &page(3, vec![]), MARK, resume(None, None), false);
        for n in 4..=6 {
            news.arrive(positioned(n));
        }
        assert_eq!(delivered(&early), vec![4, 5, 6]);
        assert_eq!(delivered(&late), vec![6]);
    }

    #[tokio::test]
    async fn a_gap_waits_for_the_repair_and_duplicates_are_skipped() {
        // The memory broker's stream has 1..=3; the node saw only 1 and then 3.
        let metrics = Metrics::unregistered();
        let (tx, mut rx) = inbound(16, metrics.clone());
        let broker = Arc::new(MemoryBroker::new(tx));
        let news = stream_on(broker.clone(), metrics.clone());
        let reqs = (1..=3)
            .map(|n| herald_broker::PublishRequest {
                history: Some(policy()),
                ..herald_broker::PublishRequest::plain(Publication::now(
                    ChannelName::new("news").unwrap(),
                    Payload::Json(Bytes::from(format!("{n}"))),
                ))
            })
            .collect();
        broker.publish(reqs).await.unwrap();
        let mut arrived = Vec::new();
        while let Some(Received::Publication(p)) = rx.try_recv() {
            arrived.push(p);
        }
        let env = crate::handle::tests::env(1 << 20);
        let h = Arc::new(SessionHandle::new(0, env));
        news.join(1, &h, false, false);
        let top = HistoryPage {
            top: StreamPosition {
                offset: 0,
                ..arrived[0].position.unwrap()
            },
            publications: vec![],
            now: herald_protocol::Epoch::start(1, 1000),
        };
        news.complete(1, &top, MARK, resume(None, None), false);
        news.arrive(arrived[0].clone());
        news.arrive(arrived[2].clone());
        news.arrive(arrived[0].clone());
        for _ in 0..500 {
            if metrics.history_repairs.get() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(delivered(&h), vec![1, 2, 3]);
        // The repair delivered 2 and 3 from the stream; the live 3 and the second 1
        // were then skipped.
        assert_eq!(metrics.history_repaired.get(), 2);
        assert_eq!(metrics.history_duplicates.get(), 2);
    }

    /// A member whose queue fills is not closed: it lags, and once its queue has room
    /// it catches up from the stream in place (no `subscribed`), a queue's worth per
    /// round, every offset once and in order, however far behind, while a fast member
    /// is unaffected. One whose missed offsets the history no longer holds is closed as
    /// a slow consumer instead, what it missed counted.
    #[tokio::test]
    async fn a_member_whose_queue_fills_catches_up_in_place() {
        let metrics = Metrics::unregistered();
        let (tx, mut rx) = inbound(1024, metrics.clone());
        let broker = Arc::new(MemoryBroker::new(tx));
        // The slow session's queue: 8 KiB, about 30 deliveries. The history: 100.
        let queue = 8192;
        let env = Arc::new(StreamEnv::new(
            broker.clone(),
            metrics.clone(),
            100,
            queue / 2,
            DeltaLimits::default(),
        ));
        let news = Arc::new(Stream::new(
            ChannelName::new("news").unwrap(),
            policy(),
            env,
        ));
        let publish = |range: std::ops::RangeInclusive<u64>| {
            let reqs = range
                .map(|n| herald_broker::PublishRequest {
                    history: Some(policy()),
                    ..herald_broker::PublishRequest::plain(Publication::now(
                        ChannelName::new("news").unwrap(),
                        Payload::Json(Bytes::from(format!("\"{n:0100}\""))),
                    ))
                })
                .collect();
            broker.publish(reqs)
        };
        let mut arrive = |news: &Arc<Stream>| {
            while let Some(Received::Publication(p)) = rx.try_recv() {
                news.arrive(p);
            }
        };
        let fast = Arc::new(SessionHandle::new(0, crate::handle::tests::env(1 << 20)));
        let slow = Arc::new(SessionHandle::new(0, crate::handle::tests::env(queue)));
        for (conn, h) in [(1, &fast), (2, &slow)] {
            news.join(conn, h, true, false);
            let done = news.resume(conn, resume(None, None)).await;
            assert_eq!(done, Resumed::Done { recovered: None });
        }
        let (mut fast_got, mut slow_got) = (delivered(&fast), delivered(&slow));
        // What the writer takes from the queue (and writes: the batch is finished).
        let written = |h: &SessionHandle| -> Vec<u64> {
            let got = texts(h)
                .iter()
                .map(|m| {
                    assert_eq!(m["op"], "message", "{m}");
                    m["offset"].as_u64().unwrap()
                })
                .collect();
            h.finish_batch();
            got
        };
        let catch_up_asked = |h: &SessionHandle| {
            let asked = h.take_commands();
            assert!(asked.len() <= 1, "{asked:?}");
            !asked.is_empty()
        };
        // 30 publications: the slow queue takes most, then the member lags.
        publish(1..=30).await.unwrap();
        arrive(&news);
        assert!(!slow.is_closing());
        assert!(
            !catch_up_asked(&slow),
            "a catch-up before the queue was written"
        );
        slow_got.extend(written(&slow));
        assert!(slow_got.len() < 30, "{} queued: no lag", slow_got.len());
        assert!(catch_up_asked(&slow));
        // More arrives before the catch-up's read; then a round brings it up to date.
        publish(31..=32).await.unwrap();
        arrive(&news);
        let round = news.catch_up_member(2, Duration::from_secs(1)).await;
        assert_eq!(round, CaughtUp::Live);
        publish(33..=35).await.unwrap();
        arrive(&news);
        slow_got.extend(written(&slow));
        assert_eq!(slow_got, (1..=35).collect::<Vec<_>>());
        assert_eq!(metrics.history_catch_ups.get(), 1);

        // Far behind (85 more, the queue holds about 30): a round per queue's worth,
        // with arrivals between the rounds.
        publish(36..=110).await.unwrap();
        arrive(&news);
        let mut rounds = 0;
        loop {
            slow_got.extend(written(&slow));
            assert!(
                catch_up_asked(&slow),
                "no catch-up asked after round {rounds}"
            );
            if rounds == 1 {
                publish(111..=120).await.unwrap();
                arrive(&news);
            }
            rounds += 1;
            match news.catch_up_member(2, Duration::from_secs(1)).await {
                CaughtUp::Lagging => assert!(rounds < 10),
                CaughtUp::Live => break,
                other => panic!("{other:?} after {rounds} rounds"),
            }
        }
        slow_got.extend(written(&slow));
        assert!(rounds >= 2, "{rounds} rounds for 85 publications");
        assert_eq!(slow_got, (1..=120).collect::<Vec<_>>());
        assert_eq!(metrics.history_catch_ups.get(), 2);
        assert_eq!(metrics.slow_consumer_disconnects.get(), 0);

        // So far behind that the history (100) no longer holds what it missed.
        publish(121..=300).await.unwrap();
        arrive(&news);
        let queued = written(&slow);
        assert!(catch_up_asked(&slow));
        let missed = 300 - queued.last().unwrap();
        let round = news.catch_up_member(2, Duration::from_secs(1)).await;
        assert_eq!(round, CaughtUp::Closed);
        assert!(slow.is_closing());
        assert_eq!(metrics.slow_consumer_disconnects.get(), 1);
        assert_eq!(metrics.dropped_total(DropReason::SlowConsumer), missed);
        // Nothing more reaches it; the fast member has everything.
        publish(301..=301).await.unwrap();
        arrive(&news);
        fast_got.extend(written(&fast));
        assert_eq!(fast_got, (1..=301).collect::<Vec<_>>());
    }

    /// Members that asked for deltas get each publication after their first as a delta
    /// against the one before (computed once for all of them), whole when the delta
    /// is not smaller or they do not hold the one before; the others always whole.
    #[tokio::test]
    async fn deltas_go_to_members_that_hold_the_publication_before() {
        let metrics = Metrics::unregistered();
        let (tx, _rx) = inbound(8, metrics.clone());
        let news = stream_on(Arc::new(MemoryBroker::new(tx)), metrics.clone());
        let env = crate::handle::tests::env(1 << 20);
        let (a, b, c) = (
            Arc::new(SessionHandle::new(0, env.clone())),
            Arc::new(SessionHandle::new(0, env.clone())),
            Arc::new(SessionHandle::new(0, env.clone())),
        );
        news.join(1, &a, true, true);
        news.join(2, &b, true, true);
        news.join(3, &c, true, false);
        for conn in [1, 2, 3] {
            news.complete(conn, &page(0, vec![]), MARK, resume(None, None), false);
        }
        let doc = |offset: u64, score: u64| {
            let text = format!(
                r#"{{"match":"Sunderland v Newcastle","venue":"Stadium of Light","score":[{score},0],"minute":{offset}}}"#
            );
            Publication {
                position: Some(pos(offset)),
                ..Publication::now(
                    ChannelName::new("news").unwrap(),
                    Payload::Json(Bytes::from(text)),
                )
            }
        };
        news.arrive(doc(1, 0));
        news.arrive(doc(2, 1));
        // A tiny publication: its delta is no smaller, so it goes whole to everyone.
        news.arrive(Publication {
            position: Some(pos(3)),
            ..Publication::now(
                ChannelName::new("news").unwrap(),
                Payload::Json(Bytes::from("1")),
            )
        });
        news.arrive(doc(4, 1));
        news.arrive(doc(5, 2));
        // The `subscribed` reply says whether deltas come, then the deliveries.
        let kinds = |h: &SessionHandle| -> (serde_json::Value, Vec<&'static str>) {
            let frames = texts(h);
            let kinds = frames[1..]
                .iter()
                .map(|f| {
                    if f.get("delta").is_some() {
                        "delta"
                    } else {
                        "whole"
                    }
                })
                .collect();
            (frames[0]["delta"].clone(), kinds)
        };
        let want = ["whole", "delta", "whole", "whole", "delta"];
        assert_eq!(kinds(&a), ("fossil".into(), want.to_vec()));
        assert_eq!(kinds(&b), ("fossil".into(), want.to_vec()));
        assert_eq!(kinds(&c), (serde_json::Value::Null, vec!["whole"; 5]));
        // Computed once per publication, not per member.
        assert_eq!(metrics.delta_sent.get(), 2);
        // 3 (the delta was larger) and 4 (its base, 3, is "1": a delta of the whole
        // document is no smaller than the document).
        assert_eq!(metrics.delta_whole.get(), 2);
    }
}
