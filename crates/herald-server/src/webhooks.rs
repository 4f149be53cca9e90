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
//!   channels.
//! - **Delivery.** The queue is the broker's; one node at a time holds its lease and
//!   delivers in order: signed `POST`s, retried with backoff up to `max_attempts`, then
//!   given up (counted). A node that dies mid-delivery leaves its events to the next
//!   holder: at least once, each event with its id for deduplication.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use herald_broker::{Queued, WebhookEvent, WebhookQueue};
use herald_protocol::presence::Member;
use herald_protocol::{webhook, ChannelName};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::node::Node;

/// Occupancy changes waiting for the webhooks task, at most (the rest are settled by
/// the next refresh or by expiry).
const CHANGES: usize = 4096;

/// Events taken from the queue at once.
const BATCH: usize = 16;

/// How often the queue is looked at while it is empty (or another node delivers).
const IDLE: Duration = Duration::from_millis(250);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn queue(node: &Node) -> WebhookQueue {
    let c = &node.config.webhooks;
    WebhookQueue {
        max: c.max_queue,
        lease: c.takeover_after,
    }
}

fn counted(node: &Node, event: &str, q: Queued) {
    let m = &node.metrics.webhook_events;
    m.with_label_values(&[event, "queued"]).inc_by(q.queued);
    m.with_label_values(&[event, "dropped"]).inc_by(q.dropped);
    if q.dropped > 0 {
        tracing::warn!(
            event,
            dropped = q.dropped,
            "webhook queue full: events dropped"
        );
    }
}

/// Queues `join` / `leave` events for `members` of `channel` (when wanted).
pub(crate) async fn presence(node: &Node, channel: &ChannelName, join: bool, members: &[&Member]) {
    let event = if join { "join" } else { "leave" };
    if members.is_empty() || !node.config.webhooks.wants(event) {
        return;
    }
    let now = now_ms();
    let records = members
        .iter()
        .map(|m| webhook::presence(join, channel.as_str(), m, now))
        .collect();
    match node.broker.webhook_queue(records, queue(node)).await {
        Ok(q) => counted(node, event, q),
        Err(e) => {
            tracing::warn!(error = %e, event, "webhook events not queued");
            node.metrics
                .webhook_events
                .with_label_values(&[event, "dropped"])
                .inc_by(members.len() as u64);
        }
    }
}

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
                .occupancy_refresh(&node.instance, channels, ttl, queue(node))
                .await
            {
                Ok(q) => counted(node, "occupancy", q),
                Err(e) => tracing::debug!(error = %e, "occupancy refresh failed"),
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
        .occupancy(&node.instance, changes.clone(), ttl, queue(node))
        .await
    {
        Ok(q) => counted(node, "occupancy", q),
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
    let q = queue(node);
    loop {
        if stop.is_cancelled() {
            return;
        }
        let events = match node.broker.webhook_take(&node.instance, BATCH, q).await {
            Ok(events) => events,
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
        for e in events {
            // Renewed per event: one event may take a whole `timeout`.
            let _ = node.broker.webhook_take(&node.instance, 0, q).await;
            if !deliver_one(node, sender, &e, &stop).await {
                // Stopping mid-delivery: the event stays taken, and the next holder of
                // the lease delivers it.
                return;
            }
            if let Err(err) = node.broker.webhook_done(vec![e.id.clone()]).await {
                tracing::debug!(error = %err, "webhook event not marked done; it may be sent again");
            }
        }
    }
}

/// Delivers `e`, with retries; false when `stop` came first.
async fn deliver_one(
    node: &Node,
    sender: &herald_hooks::Webhooks,
    e: &WebhookEvent,
    stop: &CancellationToken,
) -> bool {
    let m = &node.metrics.webhook_events;
    let name = serde_json::from_str::<serde_json::Value>(&e.json)
        .ok()
        .and_then(|v| v["event"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let label = webhook::Event::parse(&name).map_or("unknown", webhook::Event::name);
    if e.retakes > 0 {
        m.with_label_values(&[label, "retaken"]).inc();
    }
    let config = sender.config();
    // Occupancy records are queued in pairs' worth (occupied and vacated); the
    // unwanted one is finished without a call.
    if !config.wants(&name) {
        return true;
    }
    let Some(body) = webhook::body(&e.id, &e.json) else {
        tracing::warn!(id = %e.id, "webhook event is not a JSON object; dropped");
        m.with_label_values(&[label, "failed"]).inc();
        return true;
    };
    let q = queue(node);
    for attempt in 1..=config.max_attempts {
        match sender.post(body.clone()).await {
            Ok(()) => {
                m.with_label_values(&[label, "delivered"]).inc();
                return true;
            }
            Err(err) if attempt == config.max_attempts => {
                tracing::warn!(error = %err, id = %e.id, event = label, "webhook given up");
                m.with_label_values(&[label, "failed"]).inc();
                return true;
            }
            Err(err) => {
                tracing::debug!(error = %err, attempt, "webhook attempt failed");
                m.with_label_values(&[label, "retried"]).inc();
                let wait = config.backoff(attempt);
                // Hold the lease through the wait, so no other node delivers behind
                // this one's back (and out of order).
                let renew = async {
                    let mut left = wait;
                    while !left.is_zero() {
                        let step = left.min(q.lease / 3);
                        tokio::time::sleep(step).await;
                        left -= step;
                        let _ = node.broker.webhook_take(&node.instance, 0, q).await;
                    }
                };
                tokio::select! {
                    _ = stop.cancelled() => return false,
                    _ = renew => {}
                }
            }
        }
    }
    true
}
