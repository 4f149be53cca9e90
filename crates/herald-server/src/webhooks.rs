//! Webhooks (`[webhooks]`): what the cluster tells the application's backend, and this
//! node's part in it.
//!
//! - **Occupancy.** The hub tells [`run`] when a channel gets its first local
//!   subscriber or loses its last; the changes go to the broker, which decides
//!   cluster-wide (a channel is vacated when its last node lets go, never by one node's
//!   view) and queues `channel_occupied` / `channel_vacated`. Every third of
//!   `occupancy_ttl` the node sets its entries again and the broker removes expired
//!   ones, so a node that dies has its channels vacated within the TTL, once.
//! - **join / leave**: queued by the node that decided them (`presence`), for presence
//!   channels; a swept node's members are swept from the channels it alone held.
//! - **Delivery.** The queue is the broker's; one node at a time holds its lease and
//!   delivers in order: signed `POST`s, retried with backoff up to `max_attempts`, then
//!   given up (counted). A node that dies mid-delivery leaves its events to the next
//!   holder: at least once, each event with its id for deduplication.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use herald_broker::{Occupancy, WebhookEvent, WebhookQueue};
use herald_protocol::{webhook, ChannelName};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::node::Node;
use crate::presence;

/// Occupancy changes waiting for the webhooks task, at most (the rest are settled by
/// the next refresh or by expiry).
const CHANGES: usize = 4096;

/// Events taken from the queue at once.
const BATCH: usize = 16;

/// How often the queue is looked at while it is empty (or another node delivers).
const IDLE: Duration = Duration::from_millis(250);

/// Occupancy and delivery, until `stop` (then this node's last occupancy changes are
/// sent: its channels vacate now, not at their expiry).
pub(crate) async fn run(node: Arc<Node>, stop: CancellationToken) {
    let Some(sender) = node.webhooks.clone() else {
        return stop.cancelled().await;
    };
    let c = sender.config();
    let occupancy = c.wants("channel_occupied") || c.wants("channel_vacated");
    tokio::join!(
        async {
            if occupancy {
                occupy(&node, stop.clone()).await;
            }
        },
        deliver(&node, &sender, stop.clone()),
    );
    last_pass(&node, &sender, &stop).await;
}

/// On the way out, once this node's last occupancy changes are queued: what is
/// waiting is delivered, one attempt each (`stop` has fired, so a failed attempt is not
/// waited on), within [`LAST_PASS`], so that the vacancies a drain just decided reach
/// the backend now. What is left stays queued for the next holder (Redis); with the
/// embedded broker it ends with the process, uncounted.
async fn last_pass(node: &Node, sender: &herald_hooks::Webhooks, stop: &CancellationToken) {
    let q = node.webhook_queue();
    let work = async {
        while let Ok(Some(events)) = node.broker.webhook_take(&node.instance, BATCH, q).await {
            if events.is_empty() || !deliver_batch(node, sender, events, stop).await {
                return;
            }
        }
    };
    if tokio::time::timeout(LAST_PASS, work).await.is_err() {
        tracing::info!("webhook events left queued at shutdown");
    }
}

/// How long a stopping node keeps delivering.
const LAST_PASS: Duration = Duration::from_secs(3);

/// The event's name for metrics (`unknown` for a record without a known one).
fn event_label(e: &WebhookEvent) -> &'static str {
    serde_json::from_str::<serde_json::Value>(&e.json)
        .ok()
        .and_then(|v| v["event"].as_str().and_then(webhook::Event::parse))
        .map_or("unknown", webhook::Event::name)
}

async fn occupy(node: &Arc<Node>, stop: CancellationToken) {
    let (tx, mut rx) = mpsc::channel(CHANGES);
    node.hub.watch_occupancy(tx);
    let ttl = node.config.webhooks.occupancy_ttl;
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The latest wanted state per channel: a channel left and joined again before it
    // is sent is no change at all.
    let mut pending: HashMap<ChannelName, bool> = HashMap::new();
    loop {
        let refresh = tokio::select! {
            _ = stop.cancelled() => {
                while let Ok((c, on)) = rx.try_recv() {
                    pending.insert(c, on);
                }
                flush(node, &mut pending).await;
                return;
            }
            Some((c, on)) = rx.recv() => {
                pending.insert(c, on);
                false
            }
            _ = tick.tick() => true,
        };
        while let Ok((c, on)) = rx.try_recv() {
            pending.insert(c, on);
        }
        flush(node, &mut pending).await;
        if refresh {
            let channels = node.hub.occupied();
            match node
                .broker
                .occupancy_refresh(&node.instance, channels, ttl, node.webhook_queue())
                .await
            {
                Ok(o) => swept(node, o).await,
                Err(e) => tracing::debug!(error = %e, "occupancy refresh failed"),
            }
        }
    }
}

/// Counts what an occupancy call queued, and settles what the nodes whose entries a
/// sweep removed left behind: their presence members (none of the channel's
/// subscribers is left anywhere, so nobody else would sweep them), whose `leave`s are
/// told once their own TTL has run out. A sweep that stopped at its limit goes on.
async fn swept(node: &Arc<Node>, mut o: Occupancy) {
    let ttl = node.config.webhooks.occupancy_ttl;
    // Bounded: a thousand entries a round.
    for _ in 0..100 {
        node.webhooks_queued("channel_occupied", o.occupied);
        node.webhooks_queued("channel_vacated", o.vacated);
        let channels: Vec<ChannelName> = std::mem::take(&mut o.swept)
            .into_iter()
            .filter(|c| presence::rule(node, c.as_str()).is_some())
            .collect();
        if !channels.is_empty() {
            let (node, wait) = (node.clone(), node.config.presence.ttl);
            // Untracked: a drain does not wait for the second sweep.
            tokio::spawn(async move {
                for c in &channels {
                    presence::sweep(&node, c).await;
                }
                // Members refreshed after the node's occupancy entry expire later.
                tokio::time::sleep(wait).await;
                for c in &channels {
                    presence::sweep(&node, c).await;
                }
            });
        }
        if !o.more {
            return;
        }
        match node
            .broker
            .occupancy_refresh(&node.instance, Vec::new(), ttl, node.webhook_queue())
            .await
        {
            Ok(next) => o = next,
            Err(e) => {
                tracing::debug!(error = %e, "occupancy sweep failed");
                return;
            }
        }
    }
}

/// Sends the pending changes; on failure they stay pending (a later change to the same
/// channel replaces its own).
async fn flush(node: &Node, pending: &mut HashMap<ChannelName, bool>) {
    if pending.is_empty() {
        return;
    }
    let changes: Vec<(ChannelName, bool)> = pending.drain().collect();
    let ttl = node.config.webhooks.occupancy_ttl;
    match node
        .broker
        .occupancy(&node.instance, changes.clone(), ttl, node.webhook_queue())
        .await
    {
        Ok(o) => {
            node.webhooks_queued("channel_occupied", o.occupied);
            node.webhooks_queued("channel_vacated", o.vacated);
        }
        Err(e) => {
            tracing::debug!(error = %e, "occupancy changes not sent; kept for the next try");
            for (c, on) in changes {
                pending.entry(c).or_insert(on);
            }
        }
    }
}

/// Takes events while this node holds the queue's lease and delivers them in order.
async fn deliver(node: &Node, sender: &herald_hooks::Webhooks, stop: CancellationToken) {
    let q = node.webhook_queue();
    loop {
        if stop.is_cancelled() {
            return;
        }
        let events = match node.broker.webhook_take(&node.instance, BATCH, q).await {
            Ok(Some(events)) => events,
            // Another node delivers now.
            Ok(None) => Vec::new(),
            Err(e) => {
                tracing::debug!(error = %e, "webhook queue not readable");
                Vec::new()
            }
        };
        if events.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(IDLE) => continue,
            }
        }
        // A batch cut short (stopping, or the lease lost) ends at the loop's head, or
        // goes back to asking for the lease.
        deliver_batch(node, sender, events, &stop).await;
    }
}

/// Delivers `events` in order while this node holds the queue's lease; false when it
/// stopped early (stopping, or the lease lost): the rest stay taken, and the next
/// holder of the lease delivers them, in order.
async fn deliver_batch(
    node: &Node,
    sender: &herald_hooks::Webhooks,
    events: Vec<WebhookEvent>,
    stop: &CancellationToken,
) -> bool {
    let q = node.webhook_queue();
    for e in events {
        // Still ours? One event may take a whole `timeout`, a node may have been
        // stalled past its lease.
        if !holds_lease(node, q).await {
            return false;
        }
        match deliver_one(node, sender, &e, stop).await {
            Attempts::Finished => {}
            Attempts::Stopped | Attempts::LeaseLost => return false,
        }
        if let Err(err) = node.broker.webhook_done(vec![e.id.clone()]).await {
            tracing::debug!(error = %err, "webhook event not marked done; it may be sent again");
        }
    }
    true
}

/// Renews this node's lease on the queue; false when another node holds it, or the
/// broker cannot say.
async fn holds_lease(node: &Node, q: WebhookQueue) -> bool {
    matches!(
        node.broker.webhook_take(&node.instance, 0, q).await,
        Ok(Some(_))
    )
}

/// How the attempts at one event ended.
enum Attempts {
    /// Delivered, or given up (counted): done with it.
    Finished,
    /// The node is stopping.
    Stopped,
    /// Another node took the lease while this one waited to retry.
    LeaseLost,
}

/// Delivers `e`, with retries.
async fn deliver_one(
    node: &Node,
    sender: &herald_hooks::Webhooks,
    e: &WebhookEvent,
    stop: &CancellationToken,
) -> Attempts {
    let m = &node.metrics.webhook_events;
    let label = event_label(e);
    let name = label;
    if e.retakes > 0 {
        m.with_label_values(&[label, "retaken"]).inc();
    }
    let config = sender.config();
    // Both occupancy events are queued whichever are wanted; an unwanted one is
    // finished without a call.
    if !config.wants(name) {
        return Attempts::Finished;
    }
    let Some(body) = webhook::body(&e.id, &e.json) else {
        tracing::warn!(id = %e.id, "webhook event is not a JSON object; dropped");
        m.with_label_values(&[label, "failed"]).inc();
        return Attempts::Finished;
    };
    let q = node.webhook_queue();
    for attempt in 1..=config.max_attempts {
        match sender.post(body.clone()).await {
            Ok(()) => {
                m.with_label_values(&[label, "delivered"]).inc();
                return Attempts::Finished;
            }
            Err(err) if attempt == config.max_attempts => {
                tracing::warn!(error = %err, id = %e.id, event = label, "webhook given up");
                m.with_label_values(&[label, "failed"]).inc();
                return Attempts::Finished;
            }
            Err(err) => {
                tracing::debug!(error = %err, attempt, "webhook attempt failed");
                m.with_label_values(&[label, "retried"]).inc();
                // Hold the lease through the wait (renewed every third of it), so no
                // other node delivers behind this one's back, out of order.
                let mut left = config.backoff(attempt);
                while !left.is_zero() {
                    let step = left.min(q.lease / 3);
                    tokio::select! {
                        _ = stop.cancelled() => return Attempts::Stopped,
                        _ = tokio::time::sleep(step) => {}
                    }
                    left -= step;
                    if !holds_lease(node, q).await {
                        return Attempts::LeaseLost;
                    }
                }
            }
        }
    }
    Attempts::Finished
}
