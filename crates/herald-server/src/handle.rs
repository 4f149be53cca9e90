//! [`SessionHandle`]: what the rest of the node holds of a session.
//!
//! A session is two halves, a reader (`session`) and a writer (`writer`), and many
//! parties that talk to it: the hub pushes deliveries, the sweeper pings it and reads its
//! liveness clock, the drain closes it. They all meet here, in one handle that holds:
//!
//! - the **outbound queue**, bounded in bytes: a push either fits or marks the session a
//!   slow consumer, discards what it had queued and asks the writer to close with 1013.
//!   A push never waits, so one stalled reader can only ever hurt itself;
//! - the **lifecycle signals** (`done`, `reader_done`) and the close request;
//! - the **liveness clock** the heartbeat sweeper reads;
//! - the **writer slot**: the socket's sending half is either owned by a running writer
//!   task or parked here, so an idle session holds no writer task. A push to a parked
//!   session starts a writer through [`SessionEnv::start_writer`], which the writer
//!   module provides: the handle knows how to ask for a writer, not how one works.
//!
//! The handle is the only code that changes `herald_outbound_queue_bytes`.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herald_metrics::{DropReason, Metrics};
use herald_protocol::client::Since;
use herald_protocol::server::{self, encode_delivery, Delivery};
use herald_protocol::{ChannelName, Payload, Publication};
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::wire::{Deflate, Frames, Out, SessionSink};

/// Close code 1005 ("no status received"), which no close frame may carry: a
/// [`Closing`] with it sends an empty close frame.
pub(crate) const NO_STATUS: u16 = 1005;

/// A node-local session id.
pub(crate) type ConnId = u64;

/// The sending half of a session's socket, owned by its writer task while one runs and
/// parked in the handle otherwise.
pub(crate) type BoxSink = Pin<Box<dyn SessionSink>>;

/// Starts a writer task that owns `sink` and drains `handle`; `unflushed`: what the
/// sink already holds (a direct write the socket did not take whole), which the
/// writer flushes first.
pub(crate) type StartWriter =
    fn(sink: BoxSink, handle: Arc<SessionHandle>, unflushed: Option<Deliveries>);

/// Deliveries written together (a writer's batch, a direct write, or what a sink holds
/// that no write has taken yet: see [`StartWriter`]), as the delivered counter and the
/// lag metric count them once written.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Deliveries {
    /// How many.
    pub(crate) count: u64,
    /// When the first was published (µs since the epoch); 0: none was.
    pub(crate) oldest_us: u64,
}

impl Deliveries {
    /// The deliveries `items` carry, in order.
    pub(crate) fn of<'a>(items: impl IntoIterator<Item = &'a Item>) -> Self {
        let mut d = Deliveries::default();
        for i in items.into_iter().filter(|i| i.deliveries > 0) {
            d.count += u64::from(i.deliveries);
            if d.oldest_us == 0 {
                d.oldest_us = i.published_at_us;
            }
        }
        d
    }

    /// These, then `later` ones.
    pub(crate) fn then(self, later: Deliveries) -> Self {
        Deliveries {
            count: self.count + later.count,
            oldest_us: if self.oldest_us > 0 {
                self.oldest_us
            } else {
                later.oldest_us
            },
        }
    }

    /// They were written to `subscribers` sockets, each in one write: counted as
    /// delivered and the lag observed once per write, with one update of the shared
    /// metrics for them all.
    pub(crate) fn written_to(self, subscribers: u64, metrics: &Metrics) {
        if subscribers == 1 {
            return self.written(metrics);
        }
        metrics.delivered.inc_by(self.count * subscribers);
        if let Some(lag) = self.lag_seconds() {
            let local = metrics.delivery_lag_seconds.local();
            for _ in 0..subscribers {
                local.observe(lag);
            }
            local.flush();
        }
    }

    /// They were written: counted as delivered, and the oldest one's lag observed.
    pub(crate) fn written(self, metrics: &Metrics) {
        metrics.delivered.inc_by(self.count);
        if let Some(lag) = self.lag_seconds() {
            metrics.delivery_lag_seconds.observe(lag);
        }
    }

    /// How long ago the first was published, if one was.
    fn lag_seconds(&self) -> Option<f64> {
        let now = || herald_protocol::publication::unix_micros();
        (self.oldest_us > 0).then(|| now().saturating_sub(self.oldest_us) as f64 / 1e6)
    }
}

/// What every session of a node shares.
#[derive(Clone)]
pub(crate) struct SessionEnv {
    /// Where every session counts (queue bytes, drops, deliveries, close codes).
    pub(crate) metrics: Metrics,
    /// `limits.close_timeout`.
    pub(crate) close_timeout: Duration,
    /// `websocket.write_timeout`: a batch write that takes longer drops the socket.
    pub(crate) write_timeout: Duration,
    /// How long a writer with nothing to write stays before parking its sink and ending.
    pub(crate) linger: Duration,
    /// `limits.outbound_queue_bytes`.
    pub(crate) max_queued_bytes: usize,
    /// How a push to a parked session gets a writer (the writer module's `start`).
    pub(crate) start_writer: StartWriter,
    /// Where writer tasks are spawned, so that shutdown can wait for them.
    pub(crate) tasks: tokio_util::task::TaskTracker,
}

/// Where the socket's sending half is.
enum WriterSlot {
    /// No sink yet, or the session is over.
    Detached,
    /// A writer task owns the sink.
    Running,
    /// Nothing to write lately: the sink waits here and no task exists. An idle session
    /// then costs no task at all; the next push starts a writer.
    Parked(BoxSink),
}

/// What a queued item costs beyond its frames' bytes: its slot in the queue (the
/// frames themselves are a reference-counted handle to bytes shared by every
/// subscriber). Charged per item, so a flood of tiny frames cannot hold many times the
/// byte budget.
pub(crate) const ITEM_OVERHEAD: usize = std::mem::size_of::<Item>();

/// One frame, or a run of frames, waiting to be written.
pub(crate) struct Item {
    /// The frame or frames, encoded once and shared by every subscriber they go to.
    pub(crate) out: Out,
    /// Their payload bytes (the budget charges [`Item::cost`]).
    pub(crate) len: usize,
    /// When the (first) publication was accepted (µs since the epoch), for the lag
    /// metric; 0 for replies and control frames.
    pub(crate) published_at_us: u64,
    /// The message deliveries it carries (counted as delivered once written): 0 for a
    /// reply or control frame, 1 for a delivery, a run's length for a run.
    pub(crate) deliveries: u32,
}

impl Item {
    /// A reply or control frame (not a delivery) of `len` budgeted bytes.
    pub(crate) fn control(msg: Message, len: usize) -> Self {
        Item {
            out: Out::Message(msg),
            len,
            published_at_us: 0,
            deliveries: 0,
        }
    }

    /// One item delivering `run` (publications of a plain channel, in order), framed
    /// once into one buffer that every subscriber shares.
    pub(crate) fn run(run: &[Publication]) -> Self {
        let mut frames = Frames::default();
        for p in run {
            match encode_delivery(p) {
                Delivery::Text(s) => frames.text(&s),
                Delivery::Binary(b) => frames.binary(&b),
            }
        }
        let out = frames.finish();
        Item {
            len: out.len(),
            out: Out::Frames(out),
            published_at_us: run.first().map_or(0, |p| p.published_at_us),
            deliveries: run.len() as u32,
        }
    }

    /// The queue item delivering `p`, encoded once and shared by every subscriber it
    /// goes to: text frames carry the offset for everyone; binary frames carry it only
    /// for subscribers that track positions (`positions`).
    pub(crate) fn delivery(p: &Publication, positions: bool) -> Self {
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
            out: Out::Message(msg),
            len,
            published_at_us: p.published_at_us,
            deliveries: 1,
        }
    }

    /// A text reply, charged its length.
    pub(crate) fn reply(text: String) -> Self {
        let len = text.len();
        Item::control(Message::Text(text.into()), len)
    }

    /// What it costs against the session's budget: its bytes and its queue slot.
    pub(crate) fn cost(&self) -> usize {
        self.len + ITEM_OVERHEAD
    }

    /// The same frames, compressed for connections that negotiated permessage-deflate
    /// with `deflate` (each message on its own, when that pays): a broadcast is
    /// compressed once for all its subscribers, not by each one's sink. `None` for a
    /// control frame.
    pub(crate) fn deflated(&self, deflate: Deflate) -> Option<Item> {
        let out = Frames::deflated(&self.out, deflate)?;
        Some(Item {
            len: out.len(),
            out: Out::Frames(out),
            published_at_us: self.published_at_us,
            deliveries: self.deliveries,
        })
    }

    /// Another queue entry for the same frame (its bytes are shared, not copied).
    pub(crate) fn share(&self) -> Item {
        Item {
            out: self.out.clone(),
            len: self.len,
            published_at_us: self.published_at_us,
            deliveries: self.deliveries,
        }
    }
}

/// How a session should end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Closing {
    /// The close code sent (1013 slow consumer, 1001/1012 drain, 4001 token expired, ...).
    pub(crate) code: u16,
    /// The close frame's reason text (the control API's `disconnect` names its own).
    pub(crate) reason: Cow<'static, str>,
    /// Write what is queued before the close frame (drain) or discard it (slow consumer).
    pub(crate) flush_queue: bool,
    /// The peer closed first: the frame echoes its close (`code` 1005, which no close
    /// frame may carry, stands for its empty one) and is not one of the server's own
    /// closes in `herald_close_codes_total` (a peer's code is any it likes).
    pub(crate) by_peer: bool,
    /// When the close was asked for: what is left to write before the close frame has
    /// until `websocket.write_timeout` after it.
    pub(crate) since: tokio::time::Instant,
    /// That time ran out: what was queued is dropped after all.
    pub(crate) gave_up: bool,
}

impl Closing {
    /// Why what it leaves unwritten is dropped.
    fn drops(&self) -> DropReason {
        if self.by_peer || self.gave_up {
            DropReason::Disconnected
        } else {
            DropReason::SlowConsumer
        }
    }
}

/// Outcome of [`SessionHandle::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// In the queue; the writer takes it.
    Queued,
    /// Written straight into the socket (`true`: whole; the caller counts it as
    /// delivered), or handed to a writer with what the socket did not take, its bytes
    /// in the gauge until written: see [`SessionHandle::push_to_all`].
    Direct(bool),
    /// Over budget: the session is now closing as a slow consumer; what it had queued
    /// is discarded and counted as dropped.
    Overflow,
    /// The session is already closing; the item was dropped.
    Closed,
    /// Over what [`WhenFull::Refuse`] allows: not queued, and nothing else changed.
    Refused,
}

/// What a push does when the item does not fit in the session's budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WhenFull {
    /// The session closes as a slow consumer (1013), its queue dropped and counted.
    Close,
    /// The item is refused ([`Pushed::Refused`]) and the session goes on: a history
    /// channel's stream stops pushing to it and catches it up from the history once its
    /// queue has room again ([`SessionHandle::catch_up_when_room`]). Refused already
    /// when the queue would pass seven eighths of the budget, so that what is still
    /// pushed with [`WhenFull::Close`] (replies, pings, a plain channel's deliveries)
    /// has room; never by an empty queue (what is larger than that would be refused
    /// for ever), which takes anything up to the whole budget.
    Refuse,
}

struct State {
    /// Frames waiting for the writer, oldest first.
    queue: VecDeque<Item>,
    /// What `queue` costs.
    bytes: usize,
    /// What the batch the writer took and is writing costs: still held in memory, so
    /// still within the budget until [`SessionHandle::finish_batch`].
    inflight: usize,
    /// Set once the session must end; the writer sends the close frame.
    closing: Option<Closing>,
    /// Where the socket's sending half is (running writer, parked, or gone).
    writer: WriterSlot,
    /// What the control API asked of the session, for its reader to carry out.
    commands: Vec<SessionCommand>,
    /// The last push came the direct way (see [`SessionHandle::push_to_all`]): the
    /// writer parks as soon as it has written, so the next one can go direct too.
    direct: bool,
    /// History channels that stopped pushing to the session (its queue was full), each
    /// with the cost of what it could not queue: each becomes a
    /// [`SessionCommand::CatchUp`] once the queue has room for it
    /// ([`SessionHandle::catch_up_when_room`]).
    catch_up: Vec<(ChannelName, usize)>,
}

/// What the control API asks a session to do on the node's behalf (the session task
/// owns its subscriptions, so it does it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SessionCommand {
    /// Subscribe (server-side: no permission check, no request id).
    Subscribe {
        /// The channel.
        channel: ChannelName,
        /// Where to resume from on a history channel.
        since: Option<Since>,
    },
    /// Unsubscribe, and tell the client.
    Unsubscribe(ChannelName),
    /// Catch a history channel's subscription up from the history, in place: its stream
    /// stopped pushing to the session when the queue was full, and the queue now has
    /// room again ([`SessionHandle::catch_up_when_room`]).
    CatchUp(ChannelName),
}

/// A one-shot flag that tasks can wait for (a lighter `CancellationToken`: sessions
/// hold two each, so their size counts).
#[derive(Default)]
pub(crate) struct Signal {
    /// Fired (never unset).
    set: AtomicBool,
    /// Wakes the tasks waiting in [`Signal::wait`].
    notify: Notify,
}

impl Signal {
    pub(crate) fn fire(&self) {
        self.set.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub(crate) fn is_fired(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    pub(crate) async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Register before checking, so a fire in between is not missed.
            notified.as_mut().enable();
            if self.is_fired() {
                return;
            }
            notified.await;
        }
    }
}

/// A session as the rest of the node sees it: its outbound queue, its lifecycle
/// signals and its liveness clock.
pub(crate) struct SessionHandle {
    /// The session is over: whoever finishes first fires it, the other half stops.
    pub(crate) done: Signal,
    /// The reader has ended (the peer's close reply arrived, or the socket died).
    pub(crate) reader_done: Signal,
    /// When the peer was last heard from, in ms on the node's clock.
    last_heard_ms: AtomicU64,
    /// When the sweeper pinged the silent peer, in ms; 0 when not waiting for it.
    pinged_ms: AtomicU64,
    /// The sink's count of writes taken after a wait (set once, at the start): the
    /// peer reading through a backlog is alive though its answers wait behind it.
    progress: std::sync::OnceLock<crate::wire::Progress>,
    /// `progress` as the heartbeat sweeper last saw it.
    progress_seen: AtomicU64,
    /// When the session's token expires (`exp`, Unix seconds); 0: it has none.
    expires_at: AtomicU64,
    /// The peer cannot answer (SSE): heartbeats are sent but never awaited; a peer
    /// that is gone shows as a failed or timed-out write.
    one_way: AtomicBool,
    /// The queue, its cost, the close request and the writer slot, under one lock.
    state: Mutex<State>,
    /// Wakes the writer; `notify_one` keeps a permit, so a push between the writer's
    /// drain and its next wait is never missed.
    wake: Notify,
    /// What every session of the node shares (limits, metrics, how to start a writer).
    pub(crate) env: Arc<SessionEnv>,
    /// The token's user, for the control API's `{"user":..}` targets (set once, at
    /// the start; `refresh` cannot change the user).
    user: std::sync::OnceLock<Box<str>>,
    /// Wakes the reader when a command arrives.
    poke: Notify,
    /// Woken when the writer finished a batch: room may have come (`wait_room`).
    roomy: Notify,
    /// How the session's WebSocket compresses (permessage-deflate), if it negotiated
    /// it: fan-out hands it runs compressed for it (set once, at the start).
    pub(crate) deflate: std::sync::OnceLock<Deflate>,
}

/// What the heartbeat sweeper should do with a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// Heard from recently, or pinged and still within the timeout.
    Alive,
    /// Silent for the interval: ping it now.
    Ping,
    /// Pinged and silent for the timeout: close it.
    Dead,
}

/// How [`SessionHandle::wait_room`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Room {
    /// Room came, or the deadline passed, or the session is closing: go on.
    Done,
    /// A command is waiting: carry it out, then wait again.
    Commands,
}

impl SessionHandle {
    pub(crate) fn new(now_ms: u64, env: Arc<SessionEnv>) -> Self {
        SessionHandle {
            done: Signal::default(),
            reader_done: Signal::default(),
            last_heard_ms: AtomicU64::new(now_ms),
            pinged_ms: AtomicU64::new(0),
            progress: std::sync::OnceLock::new(),
            progress_seen: AtomicU64::new(0),
            expires_at: AtomicU64::new(0),
            one_way: AtomicBool::new(false),
            state: Mutex::new(State {
                queue: VecDeque::new(),
                bytes: 0,
                inflight: 0,
                closing: None,
                writer: WriterSlot::Detached,
                commands: Vec::new(),
                direct: false,
                catch_up: Vec::new(),
            }),
            wake: Notify::new(),
            env,
            user: std::sync::OnceLock::new(),
            poke: Notify::new(),
            roomy: Notify::new(),
            deflate: std::sync::OnceLock::new(),
        }
    }

    /// Records the token's user (once).
    pub(crate) fn set_user(&self, user: &str) {
        let _ = self.user.set(user.into());
    }

    /// The token's user, if the session has one.
    pub(crate) fn user(&self) -> Option<&str> {
        self.user.get().map(|u| &**u)
    }

    /// Hands the session a command; its reader carries it out.
    pub(crate) fn command(&self, c: SessionCommand) {
        self.state.lock().commands.push(c);
        // `notify_one` keeps a permit: a reader busy elsewhere sees it on its next wait.
        self.poke.notify_one();
        // A reader waiting for room (`wait_room`) stops waiting: commands come first.
        self.roomy.notify_waiters();
    }

    /// Whether commands are waiting for the reader.
    pub(crate) fn has_commands(&self) -> bool {
        !self.state.lock().commands.is_empty()
    }

    /// Resolves when a command may be waiting.
    pub(crate) async fn poked(&self) {
        self.poke.notified().await
    }

    /// The commands waiting, oldest first.
    pub(crate) fn take_commands(&self) -> Vec<SessionCommand> {
        std::mem::take(&mut self.state.lock().commands)
    }

    /// The peer said something (any frame): it is alive.
    pub(crate) fn heard(&self, now_ms: u64) {
        self.last_heard_ms.store(now_ms, Ordering::Relaxed);
        self.pinged_ms.store(0, Ordering::Relaxed);
    }

    /// Counts `progress` (the session's sink's) as the peer's sign of life.
    pub(crate) fn watch(&self, progress: crate::wire::Progress) {
        let _ = self.progress.set(progress);
    }

    /// How often the peer took bytes after making the writer wait, so far.
    pub(crate) fn progress(&self) -> u64 {
        self.progress.get().map_or(0, crate::wire::Progress::get)
    }

    /// The peer cannot answer (SSE): see `one_way`.
    pub(crate) fn set_one_way(&self) {
        self.one_way.store(true, Ordering::Relaxed);
    }

    /// The session now runs on a token that expires at `exp` (Unix seconds).
    pub(crate) fn set_expiry(&self, exp: u64) {
        self.expires_at.store(exp, Ordering::Relaxed);
    }

    /// When the session's token (or connect hook's grant) expires, Unix seconds; 0:
    /// never.
    pub(crate) fn expires_at(&self) -> u64 {
        self.expires_at.load(Ordering::Relaxed)
    }

    /// Whether the session's token expired more than `grace` before `now` (Unix time).
    pub(crate) fn is_expired(&self, now: Duration, grace: Duration) -> bool {
        let exp = self.expires_at.load(Ordering::Relaxed);
        // Saturating: an `exp` near `u64::MAX` (capped at verification anyway) must
        // mean "not yet", never a panic in the sweeper that every session shares.
        exp != 0
            && Duration::from_secs(exp)
                .checked_add(grace)
                .is_some_and(|deadline| now >= deadline)
    }

    /// The sweeper's verdict at `now_ms`; `Ping` also records that a ping is due now.
    pub(crate) fn check_liveness(
        &self,
        now_ms: u64,
        interval_ms: u64,
        timeout_ms: u64,
    ) -> Liveness {
        if self.one_way.load(Ordering::Relaxed) {
            // A heartbeat every interval of silence on our side, never a verdict.
            return if now_ms.saturating_sub(self.last_heard_ms.load(Ordering::Relaxed))
                >= interval_ms
            {
                self.last_heard_ms.store(now_ms, Ordering::Relaxed);
                Liveness::Ping
            } else {
                Liveness::Alive
            };
        }
        // A peer that took bytes after making the writer wait since the last look is
        // reading: alive, though the ping (and so its pong) may wait behind its backlog.
        let progress = self.progress();
        if self.progress_seen.load(Ordering::Relaxed) != progress {
            self.progress_seen.store(progress, Ordering::Relaxed);
            self.heard(now_ms);
        }
        let pinged = self.pinged_ms.load(Ordering::Relaxed);
        if pinged != 0 {
            if now_ms.saturating_sub(pinged) >= timeout_ms {
                Liveness::Dead
            } else {
                Liveness::Alive
            }
        } else if now_ms.saturating_sub(self.last_heard_ms.load(Ordering::Relaxed)) >= interval_ms {
            self.pinged_ms.store(now_ms.max(1), Ordering::Relaxed);
            Liveness::Ping
        } else {
            Liveness::Alive
        }
    }

    /// Gives the handle the socket's sending half; a writer starts when there is
    /// something to send.
    pub(crate) fn attach(self: &Arc<Self>, sink: BoxSink) {
        let mut s = self.state.lock();
        let start = !s.queue.is_empty() || s.closing.is_some();
        s.writer = WriterSlot::Parked(sink);
        self.start_writer(s, start);
    }

    /// Takes the sink back (the session is over): a parked sink is returned so the
    /// caller can drop it, closing the socket's sending half; a running writer ends on
    /// `done`.
    pub(crate) fn detach(&self) -> Option<BoxSink> {
        let mut s = self.state.lock();
        match std::mem::replace(&mut s.writer, WriterSlot::Detached) {
            WriterSlot::Parked(sink) => Some(sink),
            _ => None,
        }
    }

    /// Called by a writer with nothing to do: parks the sink and lets the task end,
    /// unless something arrived meanwhile (then the writer keeps the sink).
    pub(crate) fn park(&self, sink: BoxSink) -> Result<(), BoxSink> {
        let mut s = self.state.lock();
        if !s.queue.is_empty() || s.closing.is_some() || !matches!(s.writer, WriterSlot::Running) {
            return Err(sink);
        }
        s.writer = WriterSlot::Parked(sink);
        // Most sessions are idle most of the time: an idle one holds no ring.
        s.queue = VecDeque::new();
        Ok(())
    }

    /// With the state lock held: if `wanted` and the sink is parked, hand it to a new
    /// writer (after releasing the lock); otherwise wake the running writer.
    fn start_writer(self: &Arc<Self>, mut s: MutexGuard<'_, State>, wanted: bool) {
        if !wanted {
            return;
        }
        if matches!(s.writer, WriterSlot::Parked(_)) {
            let WriterSlot::Parked(sink) = std::mem::replace(&mut s.writer, WriterSlot::Running)
            else {
                return;
            };
            drop(s);
            (self.env.start_writer)(sink, self.clone(), None);
        } else {
            drop(s);
            self.wake.notify_one();
        }
    }

    /// Queues a reply or control frame.
    pub(crate) fn push(self: &Arc<Self>, item: Item) -> Pushed {
        let cost = item.cost();
        let deliveries = item.deliveries;
        let pushed = self.enqueue(&item, false, WhenFull::Close);
        match pushed {
            Pushed::Queued => self.env.metrics.outbound_queue_bytes.add(cost as i64),
            Pushed::Closed if deliveries > 0 => self
                .env
                .metrics
                .dropped(DropReason::Disconnected, deliveries.into()),
            _ => {}
        }
        pushed
    }

    /// What [`SessionHandle::offer`] would still queue, in bytes.
    pub(crate) fn room(&self) -> usize {
        let s = self.state.lock();
        let max = self.env.max_queued_bytes;
        (max - max / 8).saturating_sub(s.bytes + s.inflight)
    }

    /// Queues `item` unless the queue would pass seven eighths of its budget
    /// ([`WhenFull::Refuse`]: the session goes on either way).
    pub(crate) fn offer(self: &Arc<Self>, item: &Item) -> Pushed {
        // Pre-framed frames are written as they are: compressed here for a connection
        // that negotiated it (the sink compresses single messages itself).
        let deflated = match (&item.out, self.deflate.get()) {
            (Out::Frames(_), Some(d)) => item.deflated(*d),
            _ => None,
        };
        let item = deflated.as_ref().unwrap_or(item);
        let pushed = self.enqueue(item, false, WhenFull::Refuse);
        if pushed == Pushed::Queued {
            self.env
                .metrics
                .outbound_queue_bytes
                .add(item.cost() as i64);
        }
        pushed
    }

    /// Queues `item` (a delivery, or a run of deliveries of one channel, encoded once)
    /// to every handle in `to`, sharing its bytes: a run is queued whole, or the session
    /// closes as a slow consumer, all of it counted as dropped. (Runs are small next to
    /// the budget: the hub bounds them.) Fan-out touches the node-wide queued-bytes
    /// gauge once per item instead of once per subscriber: the gauge is shared by every
    /// core.
    ///
    /// `direct`: a session with nothing queued and no writer running is written to
    /// right here, without a writer task (the socket takes what it can; a writer
    /// finishes the rest). The hub asks it for channels with few local subscribers
    /// (unless one is busy while the hub is behind: its writers coalesce then),
    /// where a task wake-up per delivery is what a delivery costs most; a big channel's
    /// subscribers are written by their writer tasks, on every core.
    pub(crate) fn push_to_all<'a>(
        to: impl Iterator<Item = &'a Arc<SessionHandle>>,
        item: &Item,
        metrics: &Metrics,
        direct: bool,
    ) {
        let to = to.map(|h| ((), h));
        Self::push_each(to, item, metrics, direct, WhenFull::Close, |()| {});
    }

    /// [`SessionHandle::push_to_all`] to keyed handles, doing `when_full` where the
    /// item does not fit: `refused` is told the key of each handle that refused it
    /// ([`WhenFull::Refuse`]).
    pub(crate) fn push_each<'a, K>(
        to: impl Iterator<Item = (K, &'a Arc<SessionHandle>)>,
        item: &Item,
        metrics: &Metrics,
        direct: bool,
        when_full: WhenFull,
        mut refused: impl FnMut(K),
    ) {
        let deliveries = u64::from(item.deliveries);
        let (mut queued, mut closing, mut written) = (0usize, 0u64, 0u64);
        // A run compressed for the subscribers that negotiated permessage-deflate: once,
        // when the first of them comes (`None` inside: nothing to compress).
        let mut deflated: Option<Option<Item>> = None;
        for (key, handle) in to {
            let item = match handle.deflate.get() {
                Some(d) => deflated
                    .get_or_insert_with(|| item.deflated(*d))
                    .as_ref()
                    .unwrap_or(item),
                None => item,
            };
            match handle.enqueue(item, direct, when_full) {
                Pushed::Queued => queued += item.cost(),
                Pushed::Closed => closing += deliveries,
                Pushed::Refused => refused(key),
                Pushed::Direct(true) => written += 1,
                Pushed::Overflow | Pushed::Direct(false) => {}
            }
        }
        if written > 0 {
            Deliveries::of([item]).written_to(written, metrics);
        }
        metrics.outbound_queue_bytes.add(queued as i64);
        if closing > 0 {
            // Sessions already closing (drain, heartbeat, slow consumer) take nothing
            // more: counted, and on history channels the client resumes from what it
            // last received.
            metrics.dropped(DropReason::Disconnected, closing);
        }
    }

    /// Queues `item` (sharing its bytes) without touching the gauge for it (the caller
    /// adds what was queued), or does `when_full`. `direct`: see
    /// [`SessionHandle::push_to_all`].
    fn enqueue(self: &Arc<Self>, item: &Item, direct: bool, when_full: WhenFull) -> Pushed {
        let mut s = self.state.lock();
        if s.closing.is_some() {
            return Pushed::Closed;
        }
        let (cost, used) = (item.cost(), s.bytes + s.inflight);
        let max = self.env.max_queued_bytes;
        match when_full {
            WhenFull::Refuse if used > 0 && used + cost > max - max / 8 => {
                return Pushed::Refused;
            }
            _ if s.bytes + s.inflight + cost > max => {
                self.overflow(s, item);
                return Pushed::Overflow;
            }
            _ => {}
        }
        s.direct = direct;
        if direct && s.queue.is_empty() && matches!(s.writer, WriterSlot::Parked(_)) {
            let WriterSlot::Parked(sink) = std::mem::replace(&mut s.writer, WriterSlot::Running)
            else {
                unreachable!("matched above");
            };
            // Held (and within the budget) while it is written, like a writer's batch.
            // Not in the gauge: a write that finishes would take it out again at once,
            // and the gauge is shared by every core (`write_direct` adds it otherwise).
            s.inflight += cost;
            drop(s);
            return Pushed::Direct(self.write_direct(sink, item));
        }
        let was_empty = s.queue.is_empty();
        s.bytes += cost;
        s.queue.push_back(item.share());
        self.start_writer(s, was_empty);
        Pushed::Queued
    }

    /// Writes `item` into `sink` (taken from its parking place: the slot says a writer
    /// runs) from the caller's task, as far as the socket takes it without waiting,
    /// then parks the sink again, or hands it to a writer task when the write did not
    /// finish or something else arrived meanwhile. Returns whether it was all written:
    /// the caller counts it as delivered (once for all the subscribers it wrote to; the
    /// delivery counters are shared by every core). Its bytes are added to the gauge
    /// unless they leave `inflight` here, where the writer or `discard` takes them out.
    fn write_direct(self: &Arc<Self>, mut sink: BoxSink, item: &Item) -> bool {
        use std::task::Poll;
        let deliveries = Deliveries::of([item]);
        // One poll, with a waker that wakes nothing: a socket that cannot take it all
        // is the writer task's to wait for, which polls again with its own. Outside
        // tokio's cooperative budget: the dispatcher writes to many sockets per poll,
        // and a spent budget would make every later write "not ready" (each then
        // costing a writer task, which is what a direct write saves).
        let attempt = std::future::poll_fn(|cx| {
            Poll::Ready(match sink.as_mut().poll_ready(cx) {
                Poll::Ready(Ok(())) => match sink.as_mut().start_send(item.out.clone()) {
                    Ok(()) => Some(matches!(sink.as_mut().poll_flush(cx), Poll::Ready(Ok(())))),
                    // The writer's flush finds the socket's error and ends the session.
                    Err(_) => Some(false),
                },
                _ => None,
            })
        });
        let attempt = std::pin::pin!(tokio::task::unconstrained(attempt));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let written = match std::future::Future::poll(attempt, &mut cx) {
            Poll::Ready(Some(written)) => written,
            // Not taken (an SSE body that is full): it goes through the queue.
            _ => {
                self.env
                    .metrics
                    .outbound_queue_bytes
                    .add(item.cost() as i64);
                let mut s = self.state.lock();
                if self.still_ours(&s, deliveries.count) {
                    s.inflight -= item.cost();
                    s.bytes += item.cost();
                    s.queue.push_back(item.share());
                    self.restart(s, sink, None);
                }
                return false;
            }
        };
        if !written {
            self.env
                .metrics
                .outbound_queue_bytes
                .add(item.cost() as i64);
            let s = self.state.lock();
            if self.still_ours(&s, deliveries.count) {
                // The writer's batch accounting frees `inflight` once it has flushed.
                self.restart(s, sink, Some(deliveries));
            }
            return false;
        }
        let mut s = self.state.lock();
        if self.still_ours(&s, 0) {
            s.inflight -= item.cost();
            self.restart(s, sink, None);
        } else {
            // `discard` takes `inflight` out of the gauge, this write's bytes among it.
            drop(s);
            self.env
                .metrics
                .outbound_queue_bytes
                .add(item.cost() as i64);
        }
        true
    }

    /// After a direct write: whether the slot still says a writer runs (the direct
    /// writer holds the sink). Otherwise the session ended meanwhile: `discard` frees
    /// what `inflight` holds (this write's bytes among it) whether it ran before or
    /// runs after, and the `undelivered` deliveries are counted as dropped here.
    fn still_ours(&self, s: &State, undelivered: u64) -> bool {
        let ours = matches!(s.writer, WriterSlot::Running);
        if !ours && undelivered > 0 {
            self.env
                .metrics
                .dropped(DropReason::Disconnected, undelivered);
        }
        ours
    }

    /// After a direct write: parks `sink` again if there is nothing more to do, or
    /// starts a writer with it.
    fn restart(
        self: &Arc<Self>,
        mut s: MutexGuard<'_, State>,
        sink: BoxSink,
        unflushed: Option<Deliveries>,
    ) {
        if unflushed.is_none() && s.queue.is_empty() && s.closing.is_none() {
            s.writer = WriterSlot::Parked(sink);
            // A catch-up that came during this write.
            self.catch_up_if_room(s);
            return;
        }
        drop(s);
        (self.env.start_writer)(sink, self.clone(), unflushed);
    }

    /// Whether the writer should park as soon as it has nothing to write (the last
    /// push came the direct way), instead of lingering.
    pub(crate) fn parks_at_once(&self) -> bool {
        self.state.lock().direct
    }

    /// Over budget: the session closes as a slow consumer; what it had queued and the
    /// deliveries `refused` carries (what did not fit) are dropped (counted).
    fn overflow(self: &Arc<Self>, mut s: MutexGuard<'_, State>, refused: &Item) {
        let discarded = count(s.queue.iter().chain([refused]));
        let m = &self.env.metrics;
        m.slow_consumer_disconnects.inc();
        m.dropped(DropReason::SlowConsumer, discarded);
        m.outbound_queue_bytes.sub(s.bytes as i64);
        s.queue = VecDeque::new();
        s.bytes = 0;
        s.closing = Some(Closing {
            code: herald_protocol::close::TRY_AGAIN_LATER,
            reason: Cow::Borrowed("slow consumer"),
            flush_queue: false,
            by_peer: false,
            since: tokio::time::Instant::now(),
            gave_up: false,
        });
        self.start_writer(s, true);
    }

    /// Asks the writer to end the session with `code`. The first close wins.
    pub(crate) fn close(
        self: &Arc<Self>,
        code: u16,
        reason: impl Into<Cow<'static, str>>,
        flush_queue: bool,
    ) {
        let mut s = self.state.lock();
        if s.closing.is_none() {
            s.closing = Some(Closing {
                code,
                reason: reason.into(),
                flush_queue,
                by_peer: false,
                since: tokio::time::Instant::now(),
                gave_up: false,
            });
        }
        self.start_writer(s, true);
    }

    /// The peer sent its close frame (`frame`, as tungstenite read it: a code no peer
    /// may send is already 1002 there): the writer answers it next, unless the session
    /// was closing already. What is queued is dropped (counted: `disconnected`): a
    /// closing peer discards messages, and the answer must not wait behind them
    /// (RFC 6455 5.5.1: "as soon as practical").
    pub(crate) fn closed_by_peer(self: &Arc<Self>, frame: Option<CloseFrame>) {
        let mut s = self.state.lock();
        if s.closing.is_none() {
            let (code, reason) = frame.map_or((NO_STATUS, String::new()), |f| {
                (f.code.into(), f.reason.to_string())
            });
            s.closing = Some(Closing {
                code,
                reason: reason.into(),
                flush_queue: false,
                by_peer: true,
                since: tokio::time::Instant::now(),
                gave_up: false,
            });
        }
        self.start_writer(s, true);
    }

    /// Moves everything queued into `out` (the writer's batch, which stays within the
    /// budget until [`SessionHandle::finish_batch`]) and returns the closing request, if
    /// any (then the queue is moved only if it should be written first).
    ///
    /// `out` must be empty: the two swap, so the queue goes on in the ring the writer
    /// last emptied. A session in a burst then reuses two rings instead of growing a
    /// fresh one (and faulting in fresh pages) for every batch; they are released when
    /// the writer parks.
    pub(crate) fn drain(&self, out: &mut VecDeque<Item>) -> Option<Closing> {
        debug_assert!(out.is_empty());
        let mut s = self.state.lock();
        let closing = s.closing.clone();
        if closing.as_ref().is_none_or(|c| c.flush_queue) {
            std::mem::swap(&mut s.queue, out);
            s.inflight += s.bytes;
        } else {
            let dropped = count(s.queue.iter());
            let why = closing
                .as_ref()
                .map_or(DropReason::SlowConsumer, Closing::drops);
            self.env.metrics.dropped(why, dropped);
            self.env.metrics.outbound_queue_bytes.sub(s.bytes as i64);
            s.queue.clear();
        }
        s.bytes = 0;
        closing
    }

    /// The writer is done with its batch (written, or given up): its memory is freed.
    pub(crate) fn finish_batch(&self) {
        let mut s = self.state.lock();
        self.env.metrics.outbound_queue_bytes.sub(s.inflight as i64);
        s.inflight = 0;
        self.catch_up_if_room(s);
        self.roomy.notify_waiters();
    }

    /// Waits, until `deadline`, for what is queued and being written to leave `room`
    /// bytes of the budget (or nothing to be queued, or the session to close). For the
    /// session's own large replies (a resume's replay, a history page): pushed onto a
    /// queue that a lagging history channel keeps seven eighths full, they would close
    /// the session as a slow consumer, where a reader working through its backlog
    /// needs only a moment. Past the deadline the caller goes on (and may close it).
    /// Returns early with [`Room::Commands`] when a command arrives: the control API's
    /// must not wait behind a client's requests (the session carries them out and waits
    /// again, see `Session::wait_room`).
    pub(crate) async fn wait_room(&self, room: usize, deadline: tokio::time::Instant) -> Room {
        loop {
            let roomy = self.roomy.notified();
            tokio::pin!(roomy);
            roomy.as_mut().enable();
            {
                let s = self.state.lock();
                let used = s.bytes + s.inflight;
                if !s.commands.is_empty() {
                    return Room::Commands;
                }
                if s.closing.is_some() || used == 0 || used + room <= self.env.max_queued_bytes {
                    return Room::Done;
                }
            }
            if tokio::time::timeout_at(deadline, roomy).await.is_err() {
                return Room::Done;
            }
        }
    }

    /// A history channel's stream stopped pushing to this session (its queue had no
    /// room for `need` bytes, [`WhenFull::Refuse`]): once what is queued and being
    /// written takes at most half the budget, and leaves room for `need` (or nothing is
    /// queued), the session catches `channel` up from the history
    /// ([`SessionCommand::CatchUp`]). Half, not empty: a connection whose other
    /// channels keep its queue busy still gets there. Asked again before that, the
    /// channel waits once, for the larger need.
    pub(crate) fn catch_up_when_room(&self, channel: ChannelName, need: usize) {
        let mut s = self.state.lock();
        match s.catch_up.iter_mut().find(|(c, _)| *c == channel) {
            Some((_, n)) => *n = (*n).max(need),
            None => s.catch_up.push((channel, need)),
        }
        self.catch_up_if_room(s);
    }

    /// Hands the session the catch-ups waiting for room that it has now.
    fn catch_up_if_room(&self, mut s: MutexGuard<'_, State>) {
        let (used, max) = (s.bytes + s.inflight, self.env.max_queued_bytes);
        if s.catch_up.is_empty() || s.closing.is_some() || used > max / 2 {
            return;
        }
        let fits = |need: usize| used == 0 || used + need <= max - max / 8;
        let before = s.commands.len();
        let State {
            catch_up, commands, ..
        } = &mut *s;
        catch_up.retain(|(channel, need)| {
            if !fits(*need) {
                return true;
            }
            // One waiting command per channel: each is a history read.
            let command = SessionCommand::CatchUp(channel.clone());
            if !commands.contains(&command) {
                commands.push(command);
            }
            false
        });
        let asked = s.commands.len() > before;
        drop(s);
        if asked {
            self.poke.notify_one();
        }
    }

    /// The session is over: whatever is still queued is gone with it (counted as
    /// dropped: `disconnected`).
    pub(crate) fn discard(&self) {
        let mut s = self.state.lock();
        let dropped = count(s.queue.iter());
        self.env.metrics.dropped(DropReason::Disconnected, dropped);
        self.env
            .metrics
            .outbound_queue_bytes
            .sub((s.bytes + s.inflight) as i64);
        s.bytes = 0;
        s.inflight = 0;
        s.queue = VecDeque::new();
        // Anything pushed from now on (a `join` whose sender took the handle before the
        // session left the channel) is refused and counted, not queued for no writer.
        if s.closing.is_none() {
            s.closing = Some(Closing {
                code: 1006,
                reason: Cow::Borrowed("session over"),
                flush_queue: false,
                by_peer: false,
                since: tokio::time::Instant::now(),
                gave_up: false,
            });
        }
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.state.lock().closing.is_some()
    }

    /// Why what a discarding close leaves unwritten is dropped.
    pub(crate) fn discarded_as(&self) -> DropReason {
        self.state
            .lock()
            .closing
            .as_ref()
            .map_or(DropReason::SlowConsumer, Closing::drops)
    }

    /// When what is left to write before the close frame must be written by, while
    /// closing: `websocket.write_timeout` after the close was asked for.
    pub(crate) fn closing_deadline(&self) -> Option<tokio::time::Instant> {
        let s = self.state.lock();
        s.closing.as_ref().map(|c| c.since + self.env.write_timeout)
    }

    /// A closing session ran out of time to write what was queued before its close
    /// frame: the rest is dropped (counted as `disconnected`: the connection ended with
    /// it queued), the close frame goes next.
    pub(crate) fn give_up_flushing(&self) {
        if let Some(c) = self.state.lock().closing.as_mut() {
            c.flush_queue = false;
            c.gave_up = true;
        }
    }

    /// Closing without writing what is queued (slow consumer, or the peer closed).
    pub(crate) fn is_discarding(&self) -> bool {
        self.state
            .lock()
            .closing
            .as_ref()
            .is_some_and(|c| !c.flush_queue)
    }

    /// Waits for a push or close to wake the writer.
    pub(crate) async fn woken(&self) {
        self.wake.notified().await
    }
}

/// The deliveries `items` carry.
pub(crate) fn count<'a>(items: impl Iterator<Item = &'a Item>) -> u64 {
    items.map(|i| u64::from(i.deliveries)).sum()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An environment whose writers are never started (the sink stays with the test).
    pub(crate) fn env(max_queued_bytes: usize) -> Arc<SessionEnv> {
        Arc::new(SessionEnv {
            metrics: Metrics::unregistered(),
            close_timeout: Duration::from_secs(1),
            write_timeout: Duration::from_secs(1),
            linger: Duration::from_secs(1),
            max_queued_bytes,
            start_writer: |_, _, _| {},
            tasks: tokio_util::task::TaskTracker::new(),
        })
    }

    fn item(len: usize) -> Item {
        Item {
            out: Out::Message(Message::Binary(vec![0; len].into())),
            len,
            published_at_us: 0,
            deliveries: 1,
        }
    }

    /// Direct writes to several subscribers update the shared metrics once, and leave
    /// them as one update per write would: each subscriber's deliveries counted, one lag
    /// observation per socket written, nothing left in the gauge.
    #[tokio::test]
    async fn direct_writes_are_counted_once_per_subscriber_and_leave_the_gauge_empty() {
        let e = env(1 << 20);
        let m = e.metrics.clone();
        // A session whose socket takes `room` bytes, and the socket's other end.
        let attached = |room| {
            let (server, client) = tokio::io::duplex(room);
            let (_, wr) = tokio::io::split(server);
            let h = Arc::new(SessionHandle::new(0, e.clone()));
            let sink = crate::wire::WsSink::new(wr, room, None, Default::default());
            h.attach(Box::pin(sink));
            (h, client)
        };
        let (handles, readers): (Vec<_>, Vec<_>) = (0..3).map(|_| attached(1 << 16)).unzip();
        let run = Item {
            deliveries: 2,
            published_at_us: herald_protocol::publication::unix_micros() - 1_000,
            ..item(40)
        };
        SessionHandle::push_to_all(handles.iter(), &run, &m, true);
        assert_eq!(m.delivered.get(), 6);
        assert_eq!(m.delivery_lag_seconds.get_sample_count(), 3);
        assert!(m.delivery_lag_seconds.get_sample_sum() >= 3.0 * 0.001);
        assert_eq!(m.outbound_queue_bytes.get(), 0);
        for mut r in readers {
            let mut got = vec![0u8; 42];
            tokio::io::AsyncReadExt::read_exact(&mut r, &mut got)
                .await
                .unwrap();
            assert_eq!(&got[..2], &[0x82, 40], "one binary frame of 40 bytes");
        }
        // A subscriber whose socket takes nothing: handed to a writer, in the gauge.
        let (h, _client) = attached(8);
        SessionHandle::push_to_all([&h].into_iter(), &run, &m, true);
        assert_eq!(m.delivered.get(), 6);
        assert_eq!(m.outbound_queue_bytes.get(), run.cost() as i64);
    }

    #[test]
    fn overflow_discards_and_closes_with_1013() {
        let o = Arc::new(SessionHandle::new(0, env(100 + ITEM_OVERHEAD)));
        let m = o.env.metrics.clone();
        assert_eq!(o.push(item(60)), Pushed::Queued);
        assert_eq!(m.outbound_queue_bytes.get(), (60 + ITEM_OVERHEAD) as i64);
        assert_eq!(o.push(item(60)), Pushed::Overflow);
        assert_eq!(m.slow_consumer_disconnects.get(), 1);
        assert_eq!(m.dropped_total(DropReason::SlowConsumer), 2);
        assert_eq!(m.outbound_queue_bytes.get(), 0);
        assert_eq!(o.push(item(1)), Pushed::Closed);
        let mut out = std::collections::VecDeque::new();
        let closing = o.drain(&mut out);
        assert!(out.is_empty());
        assert_eq!(closing.unwrap().code, 1013);
    }

    /// A run of deliveries is all queued, or the session closes: never part of a run
    /// and never in silence (every delivery counted once: queued, or dropped).
    #[test]
    fn a_run_is_queued_whole_or_closes_the_session() {
        const O: usize = ITEM_OVERHEAD;
        let e = env(100 + 4 * O);
        let (a, b) = (
            Arc::new(SessionHandle::new(0, e.clone())),
            Arc::new(SessionHandle::new(0, e.clone())),
        );
        let m = e.metrics.clone();
        // Four deliveries of 10 bytes, framed as one item.
        let run = Item {
            deliveries: 4,
            ..item(40)
        };
        for _ in 0..3 {
            b.push(item(10));
        }
        SessionHandle::push_to_all([&a].into_iter(), &run, &m, false);
        SessionHandle::push_to_all([&a, &b].into_iter(), &run, &m, false);
        assert_eq!(m.outbound_queue_bytes.get(), (150 + 6 * O) as i64);
        let mut out = std::collections::VecDeque::new();
        assert!(a.drain(&mut out).is_none());
        assert_eq!(count(out.iter()), 8);
        // `b` holds 70 bytes in 4 items: the next run does not fit.
        SessionHandle::push_to_all([&b].into_iter(), &run, &m, false);
        assert_eq!(m.slow_consumer_disconnects.get(), 1);
        // What `b` had queued and the whole run that did not fit.
        assert_eq!(m.dropped_total(DropReason::SlowConsumer), 7 + 4);
        assert_eq!(m.outbound_queue_bytes.get(), (80 + 2 * O) as i64);
        assert_eq!(
            b.drain(&mut std::collections::VecDeque::new())
                .unwrap()
                .code,
            1013
        );
        // A closing session takes nothing more, counted as dropped.
        SessionHandle::push_to_all([&b].into_iter(), &run, &m, false);
        assert_eq!(m.dropped_total(DropReason::Disconnected), 4);
    }

    /// A refusing push stops at seven eighths of the budget and leaves the session
    /// open, with room for replies; the catch-up it asks for comes once what is queued
    /// and being written takes half the budget or less, even if the queue never
    /// empties.
    #[test]
    fn a_refused_push_leaves_room_and_asks_a_catch_up_at_half() {
        let o = Arc::new(SessionHandle::new(0, env(1000 + 10 * ITEM_OVERHEAD)));
        let news = ChannelName::new("news").unwrap();
        let mut queued = 0;
        while o.offer(&item(100)) == Pushed::Queued {
            queued += 1;
        }
        assert_eq!(queued, 8, "seven eighths of ten items");
        assert!(!o.is_closing());
        o.catch_up_when_room(news.clone(), 0);
        assert!(o.take_commands().is_empty());
        // A reply still fits.
        assert_eq!(o.push(item(100)), Pushed::Queued);
        // The writer takes the batch: while it writes (all of it still held), the
        // queue has no room.
        let mut batch = std::collections::VecDeque::new();
        o.drain(&mut batch);
        assert_eq!(o.offer(&item(100)), Pushed::Refused);
        o.push(item(100));
        assert!(o.take_commands().is_empty());
        // Written: one item queued meanwhile, and the catch-up is asked.
        o.finish_batch();
        assert_eq!(o.take_commands(), [SessionCommand::CatchUp(news)]);
        assert!(!o.is_closing());
    }

    #[test]
    fn an_overflowing_reply_is_not_a_dropped_delivery() {
        let o = Arc::new(SessionHandle::new(0, env(100 + 2 * ITEM_OVERHEAD)));
        o.push(item(60));
        assert_eq!(
            o.push(Item::control(Message::Ping(Default::default()), 60)),
            Pushed::Overflow
        );
        assert_eq!(o.env.metrics.dropped_total(DropReason::SlowConsumer), 1);
    }

    #[test]
    fn drain_close_keeps_queue_and_balances_the_gauge() {
        let o = Arc::new(SessionHandle::new(0, env(1000)));
        o.push(item(10));
        o.close(1001, "bye", true);
        let mut out = std::collections::VecDeque::new();
        let closing = o.drain(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(closing.unwrap().code, 1001);
        // The batch is in memory until written.
        assert_eq!(
            o.env.metrics.outbound_queue_bytes.get(),
            (10 + ITEM_OVERHEAD) as i64
        );
        o.finish_batch();
        assert_eq!(o.env.metrics.outbound_queue_bytes.get(), 0);
    }

    /// The worst case the budget allows: a flood of 2-byte frames to a session that
    /// reads nothing. Each item is charged its slot, and the batch being written counts
    /// until written, so what a session holds stays within its budget.
    #[test]
    fn tiny_frames_and_the_writers_batch_stay_within_the_budget() {
        let budget = 64 * 1024;
        let o = Arc::new(SessionHandle::new(0, env(budget)));
        let mut queued = 0usize;
        while o.push(item(2)) == Pushed::Queued {
            queued += 1;
        }
        let held = queued * (2 + std::mem::size_of::<Item>());
        assert!(
            held <= budget,
            "{queued} items hold {held} bytes, budget {budget}"
        );
        assert!(queued >= budget / (2 + ITEM_OVERHEAD) - 1, "{queued}");
        // The writer's batch is inside the budget: with a full batch taken, a new push
        // that would exceed the budget overflows rather than queueing on top of it.
        let o = Arc::new(SessionHandle::new(0, env(budget)));
        for _ in 0..(budget / (2 + ITEM_OVERHEAD)) {
            o.push(item(2));
        }
        let mut batch = std::collections::VecDeque::new();
        o.drain(&mut batch);
        assert_eq!(o.push(item(2)), Pushed::Overflow);
    }

    #[test]
    fn fan_out_counts_queued_bytes_once_per_message() {
        let env = env(1000);
        let a = Arc::new(SessionHandle::new(0, env.clone()));
        let b = Arc::new(SessionHandle::new(0, env.clone()));
        let m = env.metrics.clone();
        SessionHandle::push_to_all([&a, &b].into_iter(), &item(30), &m, false);
        assert_eq!(
            m.outbound_queue_bytes.get(),
            2 * (30 + ITEM_OVERHEAD) as i64
        );
        a.discard();
        assert_eq!(m.dropped_total(DropReason::Disconnected), 1);
        b.drain(&mut std::collections::VecDeque::new());
        b.finish_batch();
        assert_eq!(m.outbound_queue_bytes.get(), 0);
        // A push after the session is over (its writer gone) is refused and counted,
        // never left in a queue nobody drains.
        assert_eq!(a.push(item(30)), Pushed::Closed);
        assert_eq!(m.dropped_total(DropReason::Disconnected), 2);
        assert_eq!(m.outbound_queue_bytes.get(), 0);
    }

    #[test]
    fn liveness_pings_then_gives_up() {
        let o = SessionHandle::new(0, env(100));
        assert_eq!(o.check_liveness(50, 100, 30), Liveness::Alive);
        assert_eq!(o.check_liveness(100, 100, 30), Liveness::Ping);
        assert_eq!(o.check_liveness(120, 100, 30), Liveness::Alive);
        assert_eq!(o.check_liveness(130, 100, 30), Liveness::Dead);
        o.heard(131);
        assert_eq!(o.check_liveness(140, 100, 30), Liveness::Alive);
    }
}
