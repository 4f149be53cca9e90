//! One WebSocket session: a reader loop that handles requests and a writer task that
//! drains the session's [`Outbox`] into the socket. The writer exists only while there
//! is something to write (plus a short linger); otherwise the socket's sending half is
//! parked in the outbox, so an idle session is one task.
//!
//! The two halves share the outbox's `done` signal: whichever ends first (peer gone,
//! write error, close handshake done or timed out) fires it and the other follows.
//! Heartbeats are the node's sweeper's job (see `heartbeat`); the reader only records
//! when it last heard from the peer, so an idle session holds no timer.
//! Everything the session sends — replies, deliveries, pings, the close frame — goes
//! through the outbox, so the byte budget covers all of it and frames never interleave.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use herald_metrics::Source;
use herald_protocol::client::{parse_binary, parse_text, Request, RequestError};
use herald_protocol::server::{self as frames, Ack};
use herald_protocol::{close, ChannelName, ErrorCode, Payload, Publication};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::hub::ConnId;
use crate::outbox::{BoxSink, Closing, Item, Outbox, Pushed, Signal};
use crate::Shared;

/// Runs a session over an upgraded WebSocket until it ends. Generic over the socket's
/// halves so that unit tests can drive it with in-memory streams.
pub(crate) async fn run<S, R>(sink: S, stream: R, shared: Arc<Shared>, conn: ConnId)
where
    S: Sink<Message, Error = WsError> + Unpin + Send + 'static,
    R: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let limits = &shared.config.limits;
    let outbox = Arc::new(Outbox::new(
        limits.outbound_queue_bytes,
        shared.now_ms(),
        shared.writer_env.clone(),
    ));
    outbox.attach(Box::pin(sink));
    shared.sessions.lock().insert(conn, outbox.clone());
    shared.metrics.connections.inc();
    shared.metrics.connections_opened.inc();
    tracing::debug!(conn, "session opened");

    let mut session = Session {
        conn,
        outbox: outbox.clone(),
        subscriptions: Vec::new(),
        rate: TokenBucket::new(limits.messages_per_second, limits.message_burst),
        strikes: 0,
        shared: shared.clone(),
    };
    session.reply(frames::welcome(
        &shared.node_id,
        &conn_name(&shared.node_id, conn),
    ));
    // Re-check after registering: a drain that snapshotted the sessions just before this
    // one registered must still close it.
    if shared.is_draining() {
        outbox.close(shared.drain_code(), "node shutting down", true);
    }

    session.read_loop(stream).await;
    outbox.reader_done.fire();
    if outbox.is_closing() {
        // A writer is sending our close frame and ends the session (`done`) when the
        // peer answers or `close_timeout` passes; bound the wait here too.
        let limit = shared.config.limits.close_timeout * 2;
        let _ = Box::pin(timeout(limit, outbox.done.wait())).await;
    }
    outbox.done.fire();
    drop(outbox.detach());

    for channel in std::mem::take(&mut session.subscriptions) {
        shared.hub.unsubscribe(&channel, conn);
    }
    // Whatever the writer did not take is gone with the session.
    let (left, _) = outbox.drain(&mut Vec::new());
    shared.metrics.outbound_queue_bytes.sub(left as i64);
    shared.sessions.lock().remove(&conn);
    shared.metrics.connections.dec();
    shared.metrics.connections_closed.inc();
    tracing::debug!(conn, "session closed");
}

/// The connection id shown to clients: unique per node, and with the node id, per cluster.
fn conn_name(node: &str, conn: ConnId) -> String {
    format!("{node}-{conn:x}")
}

struct Session {
    conn: ConnId,
    outbox: Arc<Outbox>,
    /// Channels this session subscribes to; a `Vec` because the limit is small and
    /// most sessions hold a handful.
    subscriptions: Vec<ChannelName>,
    rate: TokenBucket,
    /// Consecutive rate-limited messages.
    strikes: u32,
    shared: Arc<Shared>,
}

impl Session {
    async fn read_loop<R>(&mut self, mut stream: R)
    where
        R: Stream<Item = Result<Message, WsError>> + Unpin,
    {
        let outbox = self.outbox.clone();
        loop {
            tokio::select! {
                biased;
                _ = outbox.done.wait() => return,
                msg = stream.next() => {
                    outbox.last_heard_ms.store(self.shared.now_ms(), Ordering::Relaxed);
                    outbox.pinged_ms.store(0, Ordering::Relaxed);
                    match msg {
                        // Boxed: requests are rare next to deliveries, and keeping their
                        // state out of this future keeps every idle session small.
                        Some(Ok(Message::Text(t))) => Box::pin(self.on_text(Bytes::from(t))).await,
                        Some(Ok(Message::Binary(b))) => Box::pin(self.on_binary(b)).await,
                        // Pings are answered by tungstenite; pongs only prove liveness.
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                        // tungstenite answers the close; keep reading until it is flushed
                        // and the stream ends.
                        Some(Ok(Message::Close(_))) => {}
                        Some(Err(WsError::Capacity(_))) => {
                            self.close(close::MESSAGE_TOO_BIG, "message too big");
                        }
                        Some(Err(WsError::Protocol(_) | WsError::Utf8(_))) => {
                            self.close(close::POLICY_VIOLATION, "protocol error");
                        }
                        Some(Err(_)) | None => return,
                    }
                    if self.strikes > self.shared.config.limits.rate_limit_strikes {
                        self.close(close::POLICY_VIOLATION, "rate limit exceeded");
                    }
                }
            }
            if outbox.is_closing() {
                // Closing (slow consumer, drain, heartbeat): the writer owns the rest;
                // keep reading only so that the peer's close reply is seen.
                Box::pin(drain_until_closed(&mut stream, &outbox)).await;
                return;
            }
        }
    }

    fn close(&self, code: u16, reason: &'static str) {
        self.outbox.close(code, reason, true);
    }

    fn reply(&self, text: String) {
        let len = text.len();
        if self
            .outbox
            .push(Item::control(Message::Text(text.into()), len))
            == Pushed::Queued
        {
            self.shared.metrics.outbound_queue_bytes.add(len as i64);
        }
    }

    fn error(&self, e: RequestError) {
        self.shared
            .metrics
            .client_errors
            .with_label_values(&[e.code.as_str()])
            .inc();
        self.reply(frames::error(e.id, e.code, &e.message));
    }

    /// Applies the rate limit; false when the message must be refused.
    fn admit(&mut self) -> bool {
        if self.rate.take() {
            self.strikes = 0;
            true
        } else {
            self.strikes += 1;
            self.error(RequestError {
                id: None,
                code: ErrorCode::RateLimited,
                message: "too many messages; slow down".into(),
            });
            false
        }
    }

    async fn on_text(&mut self, frame: Bytes) {
        if !self.admit() {
            return;
        }
        match parse_text(&frame) {
            Ok(Request::Subscribe { channel, id }) => self.subscribe(channel, id).await,
            Ok(Request::Unsubscribe { channel, id }) => {
                if let Some(i) = self.subscriptions.iter().position(|c| *c == channel) {
                    self.subscriptions.swap_remove(i);
                    self.shared.hub.unsubscribe(&channel, self.conn);
                }
                self.reply(frames::ack(Ack::Unsubscribed, channel.as_str(), id));
            }
            Ok(Request::Publish { channel, data, id }) => {
                self.publish(channel, Payload::Json(data), id).await
            }
            Ok(Request::Ping { id }) => self.reply(frames::pong(id)),
            Err(e) => self.error(e),
        }
    }

    async fn on_binary(&mut self, frame: Bytes) {
        if !self.admit() {
            return;
        }
        match parse_binary(&frame) {
            Ok((channel, payload)) => self.publish(channel, Payload::Binary(payload), None).await,
            Err(e) => self.error(e),
        }
    }

    async fn subscribe(&mut self, channel: ChannelName, id: Option<u64>) {
        if !self.subscriptions.contains(&channel) {
            if self.subscriptions.len() >= self.shared.config.limits.max_subscriptions {
                return self.error(RequestError {
                    id,
                    code: ErrorCode::TooManySubscriptions,
                    message: format!(
                        "this connection already holds {} subscriptions",
                        self.subscriptions.len()
                    )
                    .into(),
                });
            }
            let ready = self.shared.hub.subscribe(&channel, self.conn, &self.outbox);
            self.subscriptions.push(channel.clone());
            // Acknowledge only once the broker delivers the channel: whatever is
            // published after the client has seen the reply reaches it.
            if !ready.is_ready()
                && !ready
                    .wait(self.shared.config.limits.subscribe_timeout)
                    .await
            {
                self.subscriptions.retain(|c| *c != channel);
                self.shared.hub.unsubscribe(&channel, self.conn);
                return self.error(RequestError {
                    id,
                    code: ErrorCode::Unavailable,
                    message: "the broker did not confirm the subscription; retry later".into(),
                });
            }
        }
        self.reply(frames::ack(Ack::Subscribed, channel.as_str(), id));
    }

    async fn publish(&mut self, channel: ChannelName, payload: Payload, id: Option<u64>) {
        if !self.shared.publish_patterns.matches(channel.as_str()) {
            return self.error(RequestError {
                id,
                code: ErrorCode::Forbidden,
                message: "clients may not publish to this channel".into(),
            });
        }
        let name = channel.clone();
        match self
            .shared
            .publish(vec![Publication::now(channel, payload)], Source::Client)
            .await
        {
            Ok(()) => self.reply(frames::ack(Ack::Published, name.as_str(), id)),
            Err(e) => self.error(RequestError {
                id,
                code: ErrorCode::Unavailable,
                message: e.to_string().into(),
            }),
        }
    }
}

/// After a close was requested: discard input until the stream ends or the writer
/// gives up.
async fn drain_until_closed<R>(stream: &mut R, outbox: &Outbox)
where
    R: Stream<Item = Result<Message, WsError>> + Unpin,
{
    loop {
        tokio::select! {
            biased;
            _ = outbox.done.wait() => return,
            msg = stream.next() => match msg {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            },
        }
    }
}

/// Sustained-rate limiter with a burst allowance.
struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: std::time::Instant,
}

impl TokenBucket {
    fn new(rate: f64, burst: u32) -> Self {
        TokenBucket {
            tokens: burst as f64,
            rate,
            burst: burst as f64,
            last: std::time::Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = std::time::Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Writes what the outbox holds until the session ends or nothing arrives for the
/// linger period, then parks the sink back in the outbox and ends.
pub(crate) async fn write_loop(mut sink: BoxSink, outbox: Arc<Outbox>) {
    let env = outbox.env.clone();
    let metrics = &env.metrics;
    let close_timeout = env.close_timeout;
    loop {
        // A fresh vector per round: idle sessions then hold no buffer at all.
        let mut batch: Vec<Item> = Vec::new();
        let (bytes, closing) = outbox.drain(&mut batch);
        metrics.outbound_queue_bytes.sub(bytes as i64);
        if batch.is_empty() && closing.is_none() {
            tokio::select! {
                biased;
                _ = outbox.done.wait() => return,
                _ = outbox.wait() => continue,
                _ = tokio::time::sleep(env.linger) => match outbox.park(sink) {
                    Ok(()) => return,
                    Err(s) => {
                        sink = s;
                        continue;
                    }
                },
            }
        }
        if !batch.is_empty() {
            // Boxed: its state is only needed while writing, not in every idle writer.
            match Box::pin(write_batch(&mut sink, &mut batch, &outbox, metrics)).await {
                Written::All => {}
                Written::Aborted => {} // fall through to the close below
                Written::Failed => {
                    outbox.done.fire();
                    return;
                }
            }
        }
        // A close requested while we were writing is picked up (with, if the queue is
        // to be flushed, what was queued before it) by the next round's drain.
        let Some(closing) = closing else {
            continue;
        };
        // Boxed: once per session, so its state need not live in every idle writer.
        Box::pin(send_close(
            &mut sink,
            &closing,
            &outbox.reader_done,
            close_timeout,
            metrics,
        ))
        .await;
        outbox.done.fire();
        return;
    }
}

enum Written {
    All,
    /// The session started closing without flushing (slow consumer) mid-batch.
    Aborted,
    Failed,
}

async fn write_batch<S>(
    sink: &mut S,
    batch: &mut Vec<Item>,
    outbox: &Outbox,
    metrics: &herald_metrics::Metrics,
) -> Written
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    let mut delivered = 0u64;
    let mut oldest_us = 0u64;
    for item in batch.iter() {
        if item.delivery {
            delivered += 1;
            if oldest_us == 0 {
                oldest_us = item.published_at_us;
            }
        }
    }
    let write = async {
        for item in batch.drain(..) {
            sink.feed(item.msg).await?;
        }
        sink.flush().await
    };
    tokio::pin!(write);
    loop {
        tokio::select! {
            biased;
            _ = outbox.done.wait() => return Written::Failed,
            r = &mut write => {
                return match r {
                    Ok(()) => {
                        metrics.delivered.inc_by(delivered);
                        if oldest_us > 0 {
                            let now = herald_protocol::publication::unix_micros();
                            metrics
                                .delivery_lag_seconds
                                .observe(now.saturating_sub(oldest_us) as f64 / 1e6);
                        }
                        Written::All
                    }
                    Err(_) => Written::Failed,
                };
            }
            // A push or close arrived while the socket was busy. Only a discarding close
            // (slow consumer) interrupts the write; anything else waits for the next round,
            // which drains before it waits, so the wake-up is not lost.
            _ = outbox.wait() => {
                if outbox.is_discarding() {
                    return Written::Aborted;
                }
            }
        }
    }
}

async fn send_close<S>(
    sink: &mut S,
    closing: &Closing,
    reader_done: &Signal,
    close_timeout: Duration,
    metrics: &herald_metrics::Metrics,
) where
    S: Sink<Message, Error = WsError> + Unpin,
{
    metrics.close_code(closing.code);
    let frame = CloseFrame {
        code: CloseCode::from(closing.code),
        reason: closing.reason.into(),
    };
    // A peer that reads nothing cannot take the close frame either: bound the attempt,
    // then wait (bounded too) for the peer's reply, which ends the reader.
    let sent = timeout(close_timeout, sink.send(Message::Close(Some(frame)))).await;
    if matches!(sent, Ok(Ok(()))) {
        let _ = timeout(close_timeout, reader_done.wait()).await;
    }
}
