//! Presence: who is subscribed to a channel, cluster-wide, for channels whose rule says
//! `presence = true`.
//!
//! The broker holds the members (Redis, or the embedded broker's maps) with counts kept
//! as they change, so stats cost O(1). Each node also remembers its own members and adds
//! them again every `presence.refresh_interval`: an entry lives `presence.ttl` without
//! that, so the members of a node that died expire, and a Redis that lost its data gets
//! them back (without a second `join`). Whichever node next sweeps or reads the channel
//! removes expired entries and announces their `leave`s. A session leaves every channel
//! when it ends, so a drain removes its members at once.
//!
//! `join`/`leave` frames (`join_leave = true`) travel between nodes on an internal
//! channel; each node pushes them to its local subscribers of the channel. Per user by
//! default: only a user's first connection joins and its last leaves.

use std::collections::HashMap;
use std::sync::Arc;

use herald_broker::{BrokerError, PresenceChange, PresencePage, PresenceStats};
use herald_protocol::control::{presence_channel, ControlMessage};
use herald_protocol::presence::{event_frame, Member};
use herald_protocol::{ChannelName, Payload, Publication};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{ChannelRule, JoinLeavePer};
use crate::node::Node;

/// Expired entries removed per channel per sweep (the rest go on the next).
const EXPIRE_BATCH: usize = 1000;
/// Presence changes waiting to be pushed to local subscribers; beyond this they are
/// dropped and counted (`herald_control_messages_dropped_total`).
const QUEUE: usize = 4096;

/// The rule of `channel` if it keeps presence.
pub(crate) fn rule<'n>(node: &'n Node, channel: &str) -> Option<&'n ChannelRule> {
    node.config.channels.rule(channel).filter(|r| r.presence)
}

/// `member` subscribed to `channel` (a presence channel): record it and announce.
pub(crate) async fn join(node: &Node, channel: &ChannelName, member: Member) {
    // One change at a time per channel on this node: a refresh cannot slip in between
    // the broker's answer and the local record (and steal the `join`).
    let _turn = node.presence.turn(channel).await;
    let ttl = node.config.presence.ttl;
    let added = node
        .broker
        .presence_add(channel, vec![member.clone()], ttl)
        .await;
    node.presence
        .channels
        .lock()
        .entry(channel.clone())
        .or_default()
        .insert(member.conn.clone(), member);
    node.metrics.presence_members.inc();
    match added {
        Ok(changes) => announce(node, channel, true, changes).await,
        // The next refresh adds it; its join is then not announced (counted here).
        Err(e) => lost(node, "join", &e),
    }
}

/// Connection `conn` left `channel` (unsubscribed, or its session ended).
pub(crate) async fn leave(node: &Node, channel: &ChannelName, conn: &str) {
    let _turn = node.presence.turn(channel).await;
    let member = {
        let mut local = node.presence.channels.lock();
        let member = local
            .get_mut(channel)
            .and_then(|members| members.remove(conn));
        if local.get(channel).is_some_and(HashMap::is_empty) {
            local.remove(channel);
        }
        member
    };
    let Some(member) = member else {
        return;
    };
    node.metrics.presence_members.dec();
    // The broker answers the leave even when it had lost the entry (a Redis restarted
    // empty before the refresh put it back): the subscribers saw the join, they must
    // see the leave.
    match node.broker.presence_remove(channel, vec![member]).await {
        Ok(changes) => announce(node, channel, false, changes).await,
        // Not refreshed any more, it expires within the TTL; that leave is announced.
        Err(e) => lost(node, "leave", &e),
    }
}

fn lost(node: &Node, what: &str, e: &BrokerError) {
    tracing::debug!(error = %e, what, "presence change not recorded now");
    node.metrics
        .presence_events
        .with_label_values(&["deferred"])
        .inc();
}

/// Publishes the `join`/`leave` frames `changes` call for (per the rule).
async fn announce(node: &Node, channel: &ChannelName, join: bool, changes: Vec<PresenceChange>) {
    let Some(rule) = rule(node, channel.as_str()) else {
        return;
    };
    let changes: Vec<PresenceChange> = changes
        .into_iter()
        .filter(|c| rule.join_leave_per == JoinLeavePer::Connection || c.user_edge)
        .collect();
    let members: Vec<&Member> = changes.iter().map(|c| &c.member).collect();
    tell_backend(node, channel, join, &members).await;
    if !rule.join_leave {
        return;
    }
    for c in changes {
        let msg = ControlMessage::Presence {
            channel: channel.as_str().to_owned(),
            join,
            member: c.member,
        };
        let event = if join { "join" } else { "leave" };
        match node.tell(presence_channel(), &msg).await {
            Ok(_) => node
                .metrics
                .presence_events
                .with_label_values(&[event])
                .inc(),
            Err(e) => {
                tracing::debug!(error = %e, event, "presence event not sent");
                node.metrics
                    .presence_events
                    .with_label_values(&["unsent"])
                    .inc();
            }
        }
    }
}

/// Whether `cursor` is one a presence page could have given (anything else is the
/// caller's mistake, answered as such rather than taken as "from the start").
pub(crate) fn valid_cursor(cursor: &str) -> bool {
    herald_protocol::presence::parse_cursor(cursor).is_some()
}

/// A page of `channel`'s members (expired entries removed first, their leaves announced).
pub(crate) async fn page(
    node: &Node,
    channel: &ChannelName,
    cursor: Option<String>,
    limit: usize,
) -> Result<PresencePage, BrokerError> {
    expire(node, channel).await;
    node.broker.presence_page(channel, cursor, limit).await
}

/// `channel`'s counts (expired entries removed first).
pub(crate) async fn stats(
    node: &Node,
    channel: &ChannelName,
) -> Result<PresenceStats, BrokerError> {
    expire(node, channel).await;
    node.broker.presence_stats(channel).await
}

/// Queues `join` / `leave` webhook events for `members` of `channel` (when wanted).
async fn tell_backend(node: &Node, channel: &ChannelName, join: bool, members: &[&Member]) {
    let event = if join { "join" } else { "leave" };
    if members.is_empty() || !node.config.webhooks.wants(event) {
        return;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let records = members
        .iter()
        .map(|m| herald_protocol::webhook::presence(join, channel.as_str(), m, now))
        .collect();
    match node
        .broker
        .webhook_queue(records, node.webhook_queue())
        .await
    {
        Ok(q) => node.webhooks_queued(event, q),
        Err(e) => {
            tracing::warn!(error = %e, event, "webhook events not queued");
            node.metrics
                .webhook_events
                .with_label_values(&[event, "dropped"])
                .inc_by(members.len() as u64);
        }
    }
}

/// Removes `channel`'s members whose time ran out and announces their leaves: for a
/// channel a dead node alone held, which no live node sweeps (`webhooks`).
pub(crate) async fn sweep(node: &Node, channel: &ChannelName) {
    expire(node, channel).await;
}

async fn expire(node: &Node, channel: &ChannelName) {
    if let Ok(gone) = node.broker.presence_expire(channel, EXPIRE_BATCH).await {
        if !gone.is_empty() {
            announce(node, channel, false, gone).await;
        }
    }
}

/// Refreshes this node's members and sweeps expired ones every
/// `presence.refresh_interval`, and pushes `join`/`leave` frames to local subscribers,
/// until `stop`.
pub(crate) async fn run(node: Arc<Node>, stop: CancellationToken) {
    let (tx, mut rx) = mpsc::channel(QUEUE);
    node.hub.listen(&presence_channel(), tx);
    let mut tick = tokio::time::interval(node.config.presence.refresh_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                let node = node.clone();
                // Off the loop: a slow broker delays the refresh, not the frames.
                tokio::spawn(async move { refresh(&node).await });
            }
            p = rx.recv() => match p {
                Some(p) => push(&node, p),
                None => return,
            },
        }
    }
}

/// Adds every local member again (quietly), then sweeps each channel. One refresh at a
/// time: a slow broker delays the next instead of piling them up.
async fn refresh(node: &Node) {
    if node
        .presence
        .refreshing
        .swap(true, std::sync::atomic::Ordering::AcqRel)
    {
        return;
    }
    let channels: Vec<ChannelName> = node.presence.channels.lock().keys().cloned().collect();
    let ttl = node.config.presence.ttl;
    for channel in channels {
        {
            // Under the channel's turn: no join or leave of this node is half done.
            let _turn = node.presence.turn(&channel).await;
            let members: Vec<Member> = match node.presence.channels.lock().get(&channel) {
                Some(m) => m.values().cloned().collect(),
                None => continue,
            };
            if node
                .broker
                .presence_add(&channel, members, ttl)
                .await
                .is_err()
            {
                continue;
            }
        }
        expire(node, &channel).await;
    }
    node.presence
        .refreshing
        .store(false, std::sync::atomic::Ordering::Release);
}

/// A `join`/`leave` from any node: to this node's subscribers of the channel.
fn push(node: &Node, p: Publication) {
    let Payload::Json(json) = &p.payload else {
        return;
    };
    let Some(ControlMessage::Presence {
        channel,
        join,
        member,
    }) = ControlMessage::parse(json)
    else {
        return;
    };
    if rule(node, &channel).is_none_or(|r| !r.join_leave) {
        return;
    }
    node.hub
        .push_to_subscribers(&channel, &event_frame(join, &channel, &member));
}
