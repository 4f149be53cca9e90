//! A session's outbound queue, bounded in bytes.
//!
//! The hub pushes deliveries without ever waiting: a push either fits under the
//! session's byte budget or marks the session as a slow consumer, discards what it had
//! queued and asks the writer to close with 1013. That is what keeps one stalled reader
//! from slowing delivery to anyone else.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Sink;
use herald_metrics::Metrics;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// The sending half of a session's socket, owned by its writer task while one runs and
/// parked in the outbox otherwise.
pub(crate) type BoxSink = Pin<Box<dyn Sink<Message, Error = WsError> + Send>>;

/// What every writer needs, shared by all sessions of a node.
pub(crate) struct WriterEnv {
    pub(crate) metrics: Metrics,
    /// `limits.close_timeout`.
    pub(crate) close_timeout: Duration,
    /// How long a writer with nothing to write stays before parking its sink and ending.
    pub(crate) linger: Duration,
}

/// Where the writer is.
enum Writer {
    /// No sink yet, or the session is over.
    Detached,
    /// A writer task owns the sink.
    Running,
    /// Nothing to write lately: the sink waits here and no task exists. An idle session
    /// then costs no task at all; the next push starts a writer.
    Parked(BoxSink),
}

/// One frame waiting to be written.
pub(crate) struct Item {
    pub(crate) msg: Message,
    /// Bytes charged against the budget.
    pub(crate) len: usize,
    /// When the publication was accepted (µs since the epoch), for the lag metric; 0 for
    /// replies and control frames.
    pub(crate) published_at_us: u64,
    /// Whether this is a message delivery (counted as delivered once written).
    pub(crate) delivery: bool,
}

impl Item {
    /// A reply or control frame (not a delivery) of `len` budgeted bytes.
    pub(crate) fn control(msg: Message, len: usize) -> Self {
        Item {
            msg,
            len,
            published_at_us: 0,
            delivery: false,
        }
    }
}

/// How a session should end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Closing {
    pub(crate) code: u16,
    pub(crate) reason: &'static str,
    /// Write what is queued before the close frame (drain) or discard it (slow consumer).
    pub(crate) flush_queue: bool,
}

/// Outcome of [`Outbox::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    Queued,
    /// Over budget: the session is now closing as a slow consumer; what it had queued
    /// is discarded (and counted here, so no caller has to).
    Overflow,
    /// The session is already closing; the item was dropped.
    Closed,
}

struct State {
    queue: VecDeque<Item>,
    bytes: usize,
    closing: Option<Closing>,
    writer: Writer,
}

/// A one-shot flag that tasks can wait for (a lighter `CancellationToken`: sessions
/// hold two each, so their size counts).
#[derive(Default)]
pub(crate) struct Signal {
    set: AtomicBool,
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

/// The state every party of a session shares: the queue, the two end-of-life signals,
/// and the heartbeat clock that the node's sweeper reads.
pub(crate) struct Outbox {
    /// The session is over: whoever finishes first fires it, the other half stops.
    pub(crate) done: Signal,
    /// The reader has ended (the peer's close reply arrived, or the socket died).
    pub(crate) reader_done: Signal,
    /// When the peer was last heard from, in ms on the node's clock.
    pub(crate) last_heard_ms: AtomicU64,
    /// When the sweeper pinged the silent peer, in ms; 0 when not waiting for it.
    pub(crate) pinged_ms: AtomicU64,
    state: Mutex<State>,
    /// Wakes the writer; `notify_one` keeps a permit, so a push between the writer's
    /// drain and its next wait is never missed.
    wake: Notify,
    max_bytes: usize,
    pub(crate) env: Arc<WriterEnv>,
}

impl Outbox {
    pub(crate) fn new(max_bytes: usize, now_ms: u64, env: Arc<WriterEnv>) -> Self {
        Outbox {
            done: Signal::default(),
            reader_done: Signal::default(),
            last_heard_ms: AtomicU64::new(now_ms),
            pinged_ms: AtomicU64::new(0),
            state: Mutex::new(State {
                queue: VecDeque::new(),
                bytes: 0,
                closing: None,
                writer: Writer::Detached,
            }),
            wake: Notify::new(),
            max_bytes,
            env,
        }
    }

    /// Gives the outbox the socket's sending half; a writer starts when there is
    /// something to send.
    pub(crate) fn attach(self: &Arc<Self>, sink: BoxSink) {
        let mut s = self.state.lock();
        let start = !s.queue.is_empty() || s.closing.is_some();
        s.writer = Writer::Parked(sink);
        self.start_writer(s, start);
    }

    /// Takes the sink back (the session is over): a parked sink is dropped, closing the
    /// socket's sending half; a running writer ends on `done`.
    pub(crate) fn detach(&self) -> Option<BoxSink> {
        let mut s = self.state.lock();
        match std::mem::replace(&mut s.writer, Writer::Detached) {
            Writer::Parked(sink) => Some(sink),
            _ => None,
        }
    }

    /// Called by a writer with nothing to do: parks the sink and lets the task end,
    /// unless something arrived meanwhile (then the writer keeps the sink).
    pub(crate) fn park(&self, sink: BoxSink) -> Result<(), BoxSink> {
        let mut s = self.state.lock();
        if !s.queue.is_empty() || s.closing.is_some() || !matches!(s.writer, Writer::Running) {
            return Err(sink);
        }
        s.writer = Writer::Parked(sink);
        Ok(())
    }

    /// With the state lock held: if `wanted` and the sink is parked, hand it to a new
    /// writer task (after releasing the lock); otherwise wake the running writer.
    fn start_writer(self: &Arc<Self>, mut s: parking_lot::MutexGuard<'_, State>, wanted: bool) {
        if !wanted {
            return;
        }
        if matches!(s.writer, Writer::Parked(_)) {
            let Writer::Parked(sink) = std::mem::replace(&mut s.writer, Writer::Running) else {
                return;
            };
            drop(s);
            tokio::spawn(crate::session::write_loop(sink, self.clone()));
        } else {
            drop(s);
            self.wake.notify_one();
        }
    }

    pub(crate) fn push(self: &Arc<Self>, item: Item) -> Pushed {
        let mut s = self.state.lock();
        if s.closing.is_some() {
            return Pushed::Closed;
        }
        if s.bytes + item.len > self.max_bytes {
            let discarded = s.queue.iter().chain([&item]).filter(|i| i.delivery).count();
            let m = &self.env.metrics;
            m.slow_consumer_disconnects.inc();
            m.dropped(herald_metrics::DropReason::SlowConsumer, discarded as u64);
            // Callers added these bytes to the gauge when they were queued.
            m.outbound_queue_bytes.sub(s.bytes as i64);
            s.queue = VecDeque::new();
            s.bytes = 0;
            s.closing = Some(Closing {
                code: herald_protocol::close::TRY_AGAIN_LATER,
                reason: "slow consumer",
                flush_queue: false,
            });
            self.start_writer(s, true);
            return Pushed::Overflow;
        }
        let was_empty = s.queue.is_empty();
        s.bytes += item.len;
        s.queue.push_back(item);
        self.start_writer(s, was_empty);
        Pushed::Queued
    }

    /// Asks the writer to end the session with `code`. The first close wins.
    pub(crate) fn close(self: &Arc<Self>, code: u16, reason: &'static str, flush_queue: bool) {
        let mut s = self.state.lock();
        if s.closing.is_none() {
            s.closing = Some(Closing {
                code,
                reason,
                flush_queue,
            });
        }
        self.start_writer(s, true);
    }

    /// Moves everything queued into `out`; returns the bytes moved and the closing
    /// request, if any (then only if the queue should be written first).
    pub(crate) fn drain(&self, out: &mut Vec<Item>) -> (usize, Option<Closing>) {
        let mut s = self.state.lock();
        let bytes = s.bytes;
        let closing = s.closing.clone();
        if closing.as_ref().is_none_or(|c| c.flush_queue) {
            out.extend(s.queue.drain(..));
        } else {
            s.queue.clear();
        }
        s.bytes = 0;
        if s.queue.is_empty() {
            // Most sessions are idle most of the time: hold no ring between bursts.
            s.queue = VecDeque::new();
        }
        (bytes, closing)
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.state.lock().closing.is_some()
    }

    /// Closing without writing what is queued (slow consumer).
    pub(crate) fn is_discarding(&self) -> bool {
        self.state
            .lock()
            .closing
            .as_ref()
            .is_some_and(|c| !c.flush_queue)
    }

    pub(crate) async fn wait(&self) {
        self.wake.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Arc<WriterEnv> {
        Arc::new(WriterEnv {
            metrics: Metrics::unregistered(),
            close_timeout: Duration::from_secs(1),
            linger: Duration::from_secs(1),
        })
    }

    fn item(len: usize) -> Item {
        Item {
            msg: Message::Binary(vec![0; len].into()),
            len,
            published_at_us: 0,
            delivery: true,
        }
    }

    #[test]
    fn overflow_discards_and_closes_with_1013() {
        let o = Arc::new(Outbox::new(100, 0, env()));
        let m = o.env.metrics.clone();
        assert_eq!(o.push(item(60)), Pushed::Queued);
        // The caller accounts for what it queued; the outbox for what it discards.
        m.outbound_queue_bytes.add(60);
        assert_eq!(o.push(item(60)), Pushed::Overflow);
        assert_eq!(m.slow_consumer_disconnects.get(), 1);
        assert_eq!(m.dropped_total(herald_metrics::DropReason::SlowConsumer), 2);
        assert_eq!(m.outbound_queue_bytes.get(), 0);
        assert_eq!(o.push(item(1)), Pushed::Closed);
        let mut out = Vec::new();
        let (_, closing) = o.drain(&mut out);
        assert!(out.is_empty());
        assert_eq!(closing.unwrap().code, 1013);
    }

    #[test]
    fn an_overflowing_reply_is_not_a_dropped_delivery() {
        let o = Arc::new(Outbox::new(100, 0, env()));
        o.push(item(60));
        assert_eq!(
            o.push(Item::control(Message::Ping(Default::default()), 60)),
            Pushed::Overflow
        );
        assert_eq!(
            o.env
                .metrics
                .dropped_total(herald_metrics::DropReason::SlowConsumer),
            1
        );
    }

    #[test]
    fn drain_close_keeps_queue() {
        let o = Arc::new(Outbox::new(100, 0, env()));
        o.push(item(10));
        o.close(1001, "bye", true);
        let mut out = Vec::new();
        let (bytes, closing) = o.drain(&mut out);
        assert_eq!((out.len(), bytes), (1, 10));
        assert_eq!(closing.unwrap().code, 1001);
    }
}
