//! A session's writer: drains its [`SessionHandle`]'s queue into the socket.
//!
//! The writer task exists only while there is something to write (plus
//! `websocket.writer_linger`); then it parks the socket's sending half back in the handle
//! and ends, so an idle session is one task (its reader). The next push starts a new
//! writer through [`start`], which the node hands to every handle as
//! `SessionEnv::start_writer`.
//!
//! Everything a session sends (replies, deliveries, pings, the close frame) goes through
//! the handle's queue and this writer, so the byte budget covers all of it and frames
//! never interleave.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Sink, SinkExt};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use herald_metrics::DropReason;

use crate::handle::{BoxSink, Closing, Deliveries, Item, SessionHandle, Signal, NO_STATUS};
use crate::wire::Out;

/// The largest ring a writer keeps between rounds (entries): the common small batches
/// reuse one, a burst's is freed once written.
const KEEP_RING: usize = 64;

/// Starts a writer task that owns `sink` and drains `handle` (a
/// [`crate::handle::StartWriter`]).
pub(crate) fn start(sink: BoxSink, handle: Arc<SessionHandle>, unflushed: Option<Deliveries>) {
    let tasks = handle.env.tasks.clone();
    tasks.spawn(write_loop(sink, handle, unflushed));
}

/// Writes what the handle holds until the session ends or nothing arrives for the
/// linger period (none after a direct write), then parks the sink back in the handle
/// and ends.
async fn write_loop(mut sink: BoxSink, handle: Arc<SessionHandle>, unflushed: Option<Deliveries>) {
    let env = handle.env.clone();
    let metrics = &env.metrics;
    // Swapped with the handle's queue at every drain (see `SessionHandle::drain`), and
    // gone with the task when it parks.
    let mut batch: VecDeque<Item> = VecDeque::new();
    // What a direct write left in the sink goes first: a batch that is already fed.
    let mut fed = unflushed;
    loop {
        let closing = match fed {
            Some(_) => None,
            None => handle.drain(&mut batch),
        };
        if batch.is_empty() && closing.is_none() && fed.is_none() {
            let linger = if handle.parks_at_once() {
                Duration::ZERO
            } else {
                env.linger
            };
            tokio::select! {
                biased;
                _ = handle.done.wait() => return,
                _ = handle.woken() => continue,
                _ = tokio::time::sleep(linger) => match handle.park(sink) {
                    Ok(()) => return,
                    Err(s) => {
                        sink = s;
                        continue;
                    }
                },
            }
        }
        if !batch.is_empty() || fed.is_some() {
            // What the sink held first, then the batch.
            let deliveries = fed.take().unwrap_or_default().then(Deliveries::of(&batch));
            // Boxed: its state is only needed while writing, not in every idle writer.
            let mut write = Box::pin(write_batch(
                &mut sink, &mut batch, deliveries, &handle, metrics,
            ));
            // Timed out only after a whole `write_timeout` without progress (checked
            // every quarter of it): a peer that reads slowly through a large batch is
            // not one that reads nothing. A closing session's writes also end at its
            // closing deadline, progress or not (`write_batch`).
            let tick = (env.write_timeout / 4).max(Duration::from_millis(1));
            let (mut seen, mut since) = (handle.progress(), Instant::now());
            let written = loop {
                if let Ok(w) = timeout(tick, write.as_mut()).await {
                    break Some(w);
                }
                if handle.progress() != seen {
                    (seen, since) = (handle.progress(), Instant::now());
                } else if since.elapsed() >= env.write_timeout {
                    break handle.is_closing().then_some(Written::OutOfTime);
                }
            };
            drop(write);
            handle.finish_batch();
            // The write took the items out as it went (an interrupted one dropped the
            // rest with it, counted below), so the ring goes back to the handle empty
            // at the next drain, unless a burst grew it: only small rings are kept (a
            // burst's would stay with every session that took it until its writer
            // parks).
            if batch.capacity() > KEEP_RING {
                batch = VecDeque::new();
            }
            match written {
                Some(Written::All) => {}
                // Slow consumer (or the peer closed) mid-batch: what the batch held
                // is dropped with the queue, and what the sink holds but has not
                // started to write, so that the close frame goes next (the frame being
                // written is finished: counted dropped, it still arrives).
                Some(Written::Aborted) => {
                    sink.as_mut().discard_unsent();
                    metrics.dropped(handle.discarded_as(), deliveries.count);
                }
                // A closing session (a ban, a drain) that could not write what was
                // queued before its close frame in time: the rest is dropped the same
                // way, and the close frame is still sent, so the client learns why (a
                // 4400 ban must not look like a network failure to reconnect after).
                Some(Written::OutOfTime) => {
                    sink.as_mut().discard_unsent();
                    handle.give_up_flushing();
                    metrics.dropped(handle.discarded_as(), deliveries.count);
                }
                Some(Written::Failed) => {
                    metrics.dropped(DropReason::Disconnected, deliveries.count);
                    handle.done.fire();
                    return;
                }
                None => {
                    // The peer's TCP stack is alive but takes nothing: give the socket
                    // up rather than hold its memory and connection slot.
                    metrics.write_timeouts.inc();
                    metrics.dropped(DropReason::Disconnected, deliveries.count);
                    handle.done.fire();
                    return;
                }
            }
        }
        // A close requested while we were writing is picked up (with, if the queue is
        // to be flushed, what was queued before it) by the next round's drain.
        let Some(closing) = closing else {
            continue;
        };
        if handle.done.is_fired() {
            // The session ended meanwhile (its `discard` closes with 1006, a code no
            // close frame may carry): nothing more goes out.
            return;
        }
        // Boxed: once per session, so its state need not live in every idle writer.
        Box::pin(send_close(
            &mut sink,
            &closing,
            &handle.reader_done,
            env.close_timeout,
            metrics,
        ))
        .await;
        handle.done.fire();
        return;
    }
}

enum Written {
    /// Every frame of the batch was written and flushed.
    All,
    /// The session started closing without flushing (slow consumer) mid-batch.
    Aborted,
    /// The session is closing, and its closing deadline passed.
    OutOfTime,
    /// The socket failed, or the session ended meanwhile.
    Failed,
}

/// Feeds `batch` to `sink` and flushes it (with what the sink already held), counting
/// `deliveries` (the sink's and the batch's) once written.
async fn write_batch<S>(
    sink: &mut S,
    batch: &mut VecDeque<Item>,
    deliveries: Deliveries,
    handle: &SessionHandle,
    metrics: &herald_metrics::Metrics,
) -> Written
where
    S: Sink<Out, Error = WsError> + Unpin,
{
    let write = async {
        for item in batch.drain(..) {
            sink.feed(item.out).await?;
        }
        sink.flush().await
    };
    tokio::pin!(write);
    // Set once the session is closing: its writes end then.
    let mut close_by = handle.closing_deadline();
    loop {
        tokio::select! {
            biased;
            _ = handle.done.wait() => return Written::Failed,
            r = &mut write => {
                return match r {
                    Ok(()) => {
                        deliveries.written(metrics);
                        Written::All
                    }
                    Err(_) => Written::Failed,
                };
            }
            _ = sleep_until(close_by.unwrap_or_else(Instant::now)), if close_by.is_some() => {
                return Written::OutOfTime;
            }
            // A push or close arrived while the socket was busy. Only a discarding close
            // (slow consumer) interrupts the write; anything else waits for the next round,
            // which drains before it waits, so the wake-up is not lost.
            _ = handle.woken() => {
                if handle.is_discarding() {
                    return Written::Aborted;
                }
                close_by = close_by.or_else(|| handle.closing_deadline());
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
    S: Sink<Out, Error = WsError> + Unpin,
{
    if !closing.by_peer {
        metrics.close_code(closing.code);
    }
    let frame = (closing.code != NO_STATUS).then(|| CloseFrame {
        code: CloseCode::from(closing.code),
        reason: match &closing.reason {
            std::borrow::Cow::Borrowed(r) => (*r).into(),
            std::borrow::Cow::Owned(r) => r.clone().into(),
        },
    });
    // A peer that reads nothing cannot take the close frame either: bound the attempt,
    // then wait (bounded too) for the peer's reply, which ends the reader (when the
    // peer closed first, the reader has ended already or ends at its next read).
    let sent = timeout(
        close_timeout,
        sink.send(Out::Message(Message::Close(frame))),
    )
    .await;
    match sent {
        Ok(Ok(())) => {
            let _ = timeout(close_timeout, reader_done.wait()).await;
        }
        Ok(Err(_)) => {}
        Err(_) => metrics.write_timeouts.inc(),
    }
}
