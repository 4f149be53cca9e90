//! The control plane (`herald_protocol::control` has the messages and why they look
//! the way they do): the task that says this node is alive and answers other nodes'
//! surveys, the surveys the control API runs, and what each command does to this
//! node's sessions.
//!
//! Messages are publications on internal channels, so they take the broker's path
//! like any other: over Redis between nodes, straight back on the embedded broker.
//! Nothing here waits on a session: a disconnect asks the session's writer to close, a
//! server-side subscribe or unsubscribe is handed to the session's reader
//! ([`SessionCommand`]), and a survey's answer leaves as soon as the command is handed
//! over.

use std::collections::BTreeSet;
use std::sync::Arc;

use herald_broker::BrokerError;
use herald_protocol::control::{
    control_channel, Answer, ChannelCount, Command, ControlMessage, NodeInfo, Target,
};
use herald_protocol::{ChannelName, ChannelPattern, Payload, Publication, RELEASE};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::handle::{ConnId, SessionCommand, SessionHandle};
use crate::node::Node;
use crate::session::parse_conn_name;

/// Control messages waiting for the control task; beyond this they are dropped and
/// counted (`herald_control_messages_dropped_total`): a survey then reports the node
/// missing rather than the node falling behind on publications.
const QUEUE: usize = 1024;

/// Listens on the control channel and this node's reply channel, says the node is
/// alive every `control.heartbeat_interval`, and answers surveys, until `stop`.
pub(crate) async fn run(node: Arc<Node>, stop: CancellationToken) {
    let (tx, mut rx) = mpsc::channel(QUEUE);
    node.hub.listen(&control_channel(), tx.clone());
    node.hub.listen(&node.cluster.reply, tx);
    let mut tick = tokio::time::interval(node.config.control.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                if !node.is_draining() {
                    say_alive(&node);
                }
                let others = node.cluster.members().len();
                node.metrics.cluster_nodes.set(1 + others as i64);
            }
            p = rx.recv() => match p {
                Some(p) => on_message(&node, p),
                None => return,
            },
        }
    }
}

/// Tells the cluster this node is leaving (its drain began): surveys stop waiting
/// for it. Bounded: a broker that does not take it within a second is not waited for
/// (the others then stop waiting for it after three heartbeats).
pub(crate) async fn leave(node: &Node) {
    let gone = ControlMessage::Gone {
        node: node.node_id.clone(),
    };
    let sent = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        node.tell(control_channel(), &gone),
    )
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        tracing::debug!("could not tell the cluster this node is leaving");
    }
}

fn say_alive(node: &Arc<Node>) {
    let alive = ControlMessage::Alive {
        node: node.node_id.clone(),
    };
    let node = node.clone();
    tokio::spawn(async move {
        if let Err(e) = node.tell(control_channel(), &alive).await {
            tracing::debug!(error = %e, "control heartbeat not sent");
        }
    });
}

fn on_message(node: &Arc<Node>, p: Publication) {
    let Payload::Json(json) = &p.payload else {
        return;
    };
    let Some(msg) = ControlMessage::parse(json) else {
        tracing::debug!("ignored a control message this release does not know");
        return;
    };
    match msg {
        ControlMessage::Alive { node: id } => {
            // A node new to us (it just started, or we did) hears from us at once, so
            // that its first survey already expects us.
            if id != node.node_id && node.cluster.alive(&id) && !node.is_draining() {
                say_alive(node);
            }
        }
        ControlMessage::Gone { node: id } => node.cluster.gone(&id),
        ControlMessage::Ask { id, reply, command } => {
            let Some(to) = reply
                .strip_prefix("herald.reply.")
                .and_then(|_| ChannelName::internal(&reply).ok())
            else {
                return;
            };
            let answer = ControlMessage::Answer {
                id,
                node: node.node_id.clone(),
                answer: execute(node, &command),
            };
            let node = node.clone();
            tokio::spawn(async move {
                if let Err(e) = node.tell(to, &answer).await {
                    tracing::debug!(error = %e, "survey answer not sent");
                }
            });
        }
        ControlMessage::Answer {
            id,
            node: from,
            answer,
        } => {
            node.cluster.answer(id, from, answer);
        }
        // Presence changes travel on their own channel (the `presence` module's).
        ControlMessage::Presence { .. } => {}
    }
}

/// What every node answered to a survey.
pub(crate) struct Surveyed {
    /// Each answering node's id and answer.
    pub(crate) answers: Vec<(String, Answer)>,
    /// Nodes this node expected (it heard them recently) that did not answer in time.
    pub(crate) missing: Vec<String>,
}

/// Runs `command` on every node (this one included): asks on the control channel and
/// waits for every node known to be alive until `control.survey_timeout`.
pub(crate) async fn survey(node: &Node, command: Command) -> Result<Surveyed, BrokerError> {
    let mut open = node.cluster.open();
    let mut expected: BTreeSet<String> = node.cluster.members().into_iter().collect();
    let silent = node.cluster.silent();
    expected.insert(node.node_id.clone());
    let ask = ControlMessage::Ask {
        id: open.id,
        reply: node.cluster.reply.as_str()[1..].to_owned(),
        command,
    };
    let outcome = |o: &str| node.metrics.control_surveys.with_label_values(&[o]).inc();
    if let Err(e) = node.tell(control_channel(), &ask).await {
        outcome("failed");
        return Err(e);
    }
    let deadline = tokio::time::Instant::now() + node.config.control.survey_timeout;
    let mut answered = BTreeSet::new();
    let mut answers = Vec::new();
    while !expected.is_subset(&answered) {
        match tokio::time::timeout_at(deadline, open.answers.recv()).await {
            Ok(Some((from, answer))) => {
                // A node answers once; a second answer under the same id (two processes
                // configured with one node id) is not counted twice.
                if answered.insert(from.clone()) {
                    answers.push((from, answer));
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    let mut missing: Vec<String> = expected.difference(&answered).cloned().collect();
    missing.extend(silent.into_iter().filter(|n| !answered.contains(n)));
    missing.sort();
    outcome(if missing.is_empty() {
        "complete"
    } else {
        "incomplete"
    });
    Ok(Surveyed { answers, missing })
}

/// What `command` does on this node.
fn execute(node: &Node, command: &Command) -> Answer {
    node.metrics
        .control_commands
        .with_label_values(&[command.name()])
        .inc();
    match command {
        Command::Disconnect {
            target,
            code,
            reason,
            keep,
        } => affected(for_target(node, target, |conn, handle| {
            if keep
                .iter()
                .any(|k| parse_conn_name(&node.instance, k) == Some(conn))
            {
                return false;
            }
            handle.close(*code, reason.clone(), true);
            true
        })),
        Command::Subscribe {
            target,
            channel,
            since,
        } => {
            let Ok(channel) = ChannelName::new(channel) else {
                return affected(0);
            };
            affected(for_target(node, target, |_, handle| {
                handle.command(SessionCommand::Subscribe {
                    channel: channel.clone(),
                    since: since.as_ref().map(|s| s.since()),
                });
                true
            }))
        }
        Command::Unsubscribe { target, channel } => {
            let Ok(channel) = ChannelName::new(channel) else {
                return affected(0);
            };
            affected(for_target(node, target, |conn, handle| {
                if !node.hub.has(channel.as_str(), conn) {
                    return false;
                }
                handle.command(SessionCommand::Unsubscribe(channel.clone()));
                true
            }))
        }
        Command::Channels { pattern } => {
            let pattern = pattern.as_deref().and_then(|p| ChannelPattern::new(p).ok());
            let channels = node
                .hub
                .channels(|c| pattern.as_ref().is_none_or(|p| p.matches(c)))
                .into_iter()
                .map(|(channel, subscribers)| ChannelCount {
                    channel,
                    subscribers,
                })
                .collect();
            Answer::Channels { channels }
        }
        Command::Info => Answer::Info(NodeInfo {
            node: node.node_id.clone(),
            version: RELEASE.to_owned(),
            uptime_s: node.now_ms() / 1000,
            connections: node.sessions.lock().len() as u64,
            subscriptions: node.metrics.subscriptions.get().max(0) as u64,
            channels: node.metrics.channels.get().max(0) as u64,
            broker: node.broker.kind().to_owned(),
            broker_up: node.broker.is_up(),
            draining: node.is_draining(),
        }),
    }
}

fn affected(connections: u64) -> Answer {
    Answer::Affected { connections }
}

/// Calls `act` on each of this node's sessions `target` names; counts those it acted on.
fn for_target(
    node: &Node,
    target: &Target,
    mut act: impl FnMut(ConnId, &Arc<SessionHandle>) -> bool,
) -> u64 {
    let chosen: Vec<(ConnId, Arc<SessionHandle>)> = match target {
        Target::Conn(name) => parse_conn_name(&node.instance, name)
            .and_then(|conn| Some((conn, node.sessions.lock().get(&conn)?.clone())))
            .into_iter()
            .collect(),
        Target::User(user) => node
            .sessions
            .lock()
            .iter()
            .filter(|(_, h)| h.user() == Some(user.as_str()))
            .map(|(c, h)| (*c, h.clone()))
            .collect(),
    };
    // A session already closing (a previous disconnect, a drain) is not acted on again.
    chosen
        .iter()
        .filter(|(_, h)| !h.is_closing())
        .filter(|(c, h)| act(*c, h))
        .count() as u64
}
