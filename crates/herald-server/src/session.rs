//! One session (WebSocket, or SSE: a one-way transport whose requests the SSE endpoint
//! makes), and its reader: requests, the rate limit, and the session's
//! start and end.
//!
//! [`run`] registers the session's [`SessionHandle`] with the node, hands the socket's
//! sending half to the handle (the `writer` module drains it), and reads until the
//! session ends. Reader and writer share the handle's `done` signal: whichever ends
//! first (peer gone, write error, close handshake done or timed out) fires it and the
//! other follows. Heartbeats are the node's sweeper's job (`lifecycle`); the reader
//! only records when it last heard from the peer, so an idle session holds no timer.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use herald_broker::BrokerError;
use herald_metrics::Source;
use herald_protocol::client::{parse_binary, parse_text, Request, RequestError, Since};
use herald_protocol::presence::Member;
use herald_protocol::server::{self as frames, Ack};
use herald_protocol::{close, ChannelName, ErrorCode, Payload, Publication};
use serde_json::value::RawValue;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::access;
use crate::backend;
use crate::config::PresenceAccess;
use crate::handle::{ConnId, Item, Room, SessionCommand, SessionHandle};
use crate::history::{Resume, Resumed};
use crate::hub::SubscribeOpts;
use crate::node::{Node, Outgoing};
use crate::presence;

/// Runs a session over an upgraded WebSocket until it ends. Generic over the socket's
/// halves so that unit tests can drive it with in-memory streams.
pub(crate) async fn run<S, R>(
    sink: S,
    progress: crate::wire::Progress,
    stream: R,
    node: Arc<Node>,
    conn: ConnId,
    peer: Peer,
) where
    S: crate::wire::SessionSink + Unpin + 'static,
    R: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let Peer {
        identity,
        address,
        transport,
        by_hook,
        welcome,
        deflate,
    } = peer;
    let limits = &node.config.limits;
    let handle = Arc::new(SessionHandle::new(node.now_ms(), node.session_env.clone()));
    handle.watch(progress);
    if let Some(i) = &identity {
        handle.set_expiry(i.expires_at);
        handle.set_user(&i.user);
    }
    if transport == Transport::Sse {
        handle.set_one_way();
    }
    if deflate {
        let ws = &node.config.websocket;
        let _ = handle.deflate.set(crate::wire::Deflate {
            level: ws.deflate_level,
            min_bytes: ws.deflate_min_bytes,
        });
    }
    let by_transport = match transport {
        Transport::WebSocket => &node.metrics.websocket_sessions,
        Transport::Sse => &node.metrics.sse_sessions,
    };
    handle.attach(Box::pin(sink));
    node.sessions.lock().insert(conn, handle.clone());
    node.metrics.connections.inc();
    by_transport.inc();
    node.metrics.connections_opened.inc();
    tracing::debug!(conn, "session opened");

    let mut session = Session {
        conn,
        handle: handle.clone(),
        subscriptions: Vec::new(),
        rate: rate_limit(limits.messages_per_second, limits.message_burst),
        strikes: 0,
        strikes_since: std::time::Instant::now(),
        identity: identity.map(Box::new),
        node: node.clone(),
        channel_info: Vec::new(),
        grant_info: None,
        deferred: Vec::new(),
        commands_until: None,
        rpc_in_flight: Default::default(),
        address,
        transport,
    };
    // An echo session (conformance testing) speaks no Herald protocol at all.
    if !node.config.websocket.echo {
        session.reply(frames::welcome(
            &node.node_id,
            &conn_name(&node.instance, conn),
            session.identity.as_ref().map(|i| i.user.as_str()),
            node.config.heartbeat.interval.as_millis() as u64,
            welcome.as_deref().map(RawValue::get),
        ));
    }
    if by_hook {
        session.refresh_by_hook();
    }
    // Server-side subscriptions: the token's `subscribe` claim and the personal
    // channel. The reader carries them out first, like any command.
    if let Some(i) = session.identity.as_deref() {
        let personal = &node.config.auth.personal_channel;
        // A sub holding a segment separator would name another user's sub-channel
        // (sub `alice:dm` → `user:alice:dm`): no personal channel then, as `{sub}`
        // patterns in rules match nothing for it.
        let personal = (!personal.is_empty())
            .then(|| {
                if i.user.contains([':', '/', '*']) {
                    tracing::info!("no personal channel for a user whose sub holds : / or *");
                    return None;
                }
                Some(personal.replace("{sub}", &i.user))
            })
            .flatten();
        for name in i.subscribe.iter().cloned().chain(personal) {
            match ChannelName::new(&name) {
                Ok(channel) => handle.command(SessionCommand::Subscribe {
                    channel,
                    since: None,
                }),
                Err(e) => {
                    tracing::debug!(channel = %name, error = %e, "server-side subscription skipped")
                }
            }
        }
    }
    // Re-check after registering: a drain that snapshotted the sessions just before this
    // one registered must still close it.
    if node.is_draining() {
        handle.close(node.drain_code(), "node shutting down", true);
    }

    session.read_loop(stream).await;
    handle.reader_done.fire();
    if handle.is_closing() {
        // A writer is sending our close frame and ends the session (`done`) when the
        // peer answers or `close_timeout` passes; bound the wait here too.
        let limit = node.config.limits.close_timeout * 2;
        let _ = Box::pin(timeout(limit, handle.done.wait())).await;
    }
    handle.done.fire();
    drop(handle.detach());

    let mut present = Vec::new();
    for channel in std::mem::take(&mut session.subscriptions) {
        node.hub.unsubscribe(&channel, conn);
        if presence::rule(&node, channel.as_str()).is_some() {
            present.push(channel);
        }
    }
    if !present.is_empty() {
        // Off the session's teardown: the broker's answer is not worth keeping the
        // session's resources for. Tracked, so a drain waits for these leaves.
        let (node, name) = (node.clone(), conn_name(&node.instance, conn));
        node.session_tasks.clone().spawn(async move {
            for channel in present {
                presence::leave(&node, &channel, &name).await;
            }
        });
    }
    handle.discard();
    node.sessions.lock().remove(&conn);
    node.metrics.connections.dec();
    by_transport.dec();
    node.metrics.connections_closed.inc();
    tracing::debug!(conn, "session closed");
}

/// How a session reaches its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// Both ways over one WebSocket.
    WebSocket,
    /// Server-Sent Events: server to client only; the session's requests are the
    /// subscribes the SSE endpoint makes for it.
    Sse,
}

impl Transport {
    /// Its name in hook requests.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Sse => "sse",
        }
    }
}

/// Who is at the other end of a session, as its upgrade established.
pub(crate) struct Peer {
    /// The client's identity: from its token or the connect hook; none: anonymous.
    pub(crate) identity: Option<herald_auth::Identity>,
    /// The client's address (its own, or the one a trusted proxy named).
    pub(crate) address: IpAddr,
    /// How it is connected.
    pub(crate) transport: Transport,
    /// The connect hook gave the identity its expiry: the refresh hook extends it.
    pub(crate) by_hook: bool,
    /// `data` from the connect hook's result, for the welcome frame.
    pub(crate) welcome: Option<Box<RawValue>>,
    /// The WebSocket negotiated permessage-deflate.
    pub(crate) deflate: bool,
}

/// The connection id shown to clients: `instance` ([`Node::instance`]: the node id and a
/// random part new with every start, so that a node restarted with the same id never
/// hands out an id the cluster still knows, e.g. in presence) and the number.
pub(crate) fn conn_name(node: &str, conn: ConnId) -> String {
    format!("{node}-{conn:x}")
}

/// The node's own connection a client-facing id names, if it names one of this node's.
pub(crate) fn parse_conn_name(node: &str, name: &str) -> Option<ConnId> {
    let hex = name.strip_prefix(node)?.strip_prefix('-')?;
    // `from_str_radix` takes a sign; a connection id never has one.
    if hex.starts_with('+') {
        return None;
    }
    ConnId::from_str_radix(hex, 16).ok()
}

struct Session {
    /// This session's id on the node.
    conn: ConnId,
    /// What the rest of the node holds of this session (queue, signals).
    handle: Arc<SessionHandle>,
    /// Channels this session subscribes to; a `Vec` because the limit is small and
    /// most sessions hold a handful.
    subscriptions: Vec<ChannelName>,
    /// `limits.messages_per_second` with `limits.message_burst`.
    rate: RateLimit,
    /// Rate-limited messages in the current strike window.
    strikes: u32,
    /// When the current strike window began.
    strikes_since: std::time::Instant,
    /// What the client's token grants, if it connected with one (boxed: most sessions
    /// in a laptop setup have none, and every idle session carries this field).
    identity: Option<Box<herald_auth::Identity>>,
    /// The node (config, hub, broker, verifier).
    node: Arc<Node>,
    /// Presence info from subscription tokens, per subscribed channel (rare: usually
    /// empty; at most one per subscription).
    channel_info: Vec<(ChannelName, Box<str>)>,
    /// A subscribe's token info, until the subscribe completes.
    grant_info: Option<(ChannelName, Box<str>)>,
    /// `rpc` calls waiting for the backend.
    rpc_in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// The client's address (hook requests name it).
    address: IpAddr,
    /// How the client is connected.
    transport: Transport,
    /// Commands that came while a request waited for room ([`Session::wait_room`]) and
    /// may wait themselves: carried out next, in order, never inside that wait.
    deferred: Vec<SessionCommand>,
    /// While a turn of commands runs: the deadline every wait for room in it shares,
    /// so that a flood of resumes from the control API holds the session's reader for
    /// one `websocket.write_timeout`, not one each.
    commands_until: Option<tokio::time::Instant>,
}

/// How soon a refresh hook that gave no answer is asked again.
const REFRESH_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// `rpc` calls one session may have waiting for the backend at once.
const MAX_RPC_IN_FLIGHT: usize = 8;

/// The backend's `{"disconnect": ...}`: close with its code when it is one a backend
/// may use (4000-4999; otherwise 4400) and its reason, cut to fit a close frame.
fn close_for_backend(handle: &Arc<SessionHandle>, code: u16, reason: String) {
    let code = if (4000..=4999).contains(&code) {
        code
    } else {
        close::DISCONNECTED
    };
    handle.close(code, truncate_reason(reason), true);
}

/// A close reason within the 123 bytes a close frame carries (cut at a char boundary).
fn truncate_reason(mut reason: String) -> String {
    if reason.len() > herald_protocol::control::MAX_REASON {
        let mut end = herald_protocol::control::MAX_REASON;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

/// The largest `info` claim presence shows, in bytes of JSON; a larger one is ignored
/// (every member's info is stored, refreshed and sent to every subscriber).
const MAX_INFO: usize = 1024;

impl Session {
    async fn read_loop<R>(&mut self, mut stream: R)
    where
        R: Stream<Item = Result<Message, WsError>> + Unpin,
    {
        let handle = self.handle.clone();
        loop {
            tokio::select! {
                biased;
                _ = handle.done.wait() => return,
                msg = stream.next() => {
                    handle.heard(self.node.now_ms());
                    match msg {
                        // Boxed: requests are rare next to deliveries, and keeping their
                        // state out of this future keeps every idle session small.
                        Some(Ok(Message::Text(t))) => Box::pin(self.on_text(Bytes::from(t))).await,
                        Some(Ok(Message::Binary(b))) => Box::pin(self.on_binary(b)).await,
                        // Answered through the queue, in order with everything else
                        // (tungstenite's own answer is discarded: see `wire`).
                        // Copied: the payload is a slice of tungstenite's read buffer,
                        // which a queued pong would otherwise keep whole.
                        Some(Ok(Message::Ping(p))) => {
                            let pong = Bytes::copy_from_slice(&p);
                            handle.push(Item::control(Message::Pong(pong), p.len()));
                        }
                        // Pongs only prove liveness.
                        Some(Ok(Message::Pong(_) | Message::Frame(_))) => {}
                        // The writer answers after what is queued; the reader reads on
                        // until the stream ends.
                        Some(Ok(Message::Close(frame))) => handle.closed_by_peer(frame),
                        Some(Err(WsError::Capacity(_))) => {
                            self.close(close::MESSAGE_TOO_BIG, "message too big");
                        }
                        Some(Err(WsError::Utf8(_))) => {
                            self.close(close::INVALID_PAYLOAD, "invalid UTF-8");
                        }
                        Some(Err(WsError::Protocol(_))) => {
                            self.close(close::PROTOCOL_ERROR, "protocol error");
                        }
                        Some(Err(_)) | None => return,
                    }
                    if self.strikes > self.node.config.limits.rate_limit_strikes {
                        self.close(close::POLICY_VIOLATION, "rate limit exceeded");
                    }
                    // Commands get a turn after each frame: a client whose requests
                    // keep coming (each may wait for room) must not hold the control
                    // API's off.
                    if handle.has_commands() || !self.deferred.is_empty() {
                        Box::pin(self.on_commands()).await;
                    }
                }
                // After the client's frames: commands (a run of catch-up rounds among
                // them) must not keep the session from reading its socket.
                _ = handle.poked() => Box::pin(self.on_commands()).await,
                _ = std::future::ready(()), if !self.deferred.is_empty() => {
                    Box::pin(self.on_commands()).await;
                }
            }
            if handle.is_closing() {
                // Closing (slow consumer, drain, heartbeat): the writer owns the rest;
                // keep reading only so that the peer's close reply is seen.
                Box::pin(drain_until_closed(&mut stream, &handle)).await;
                return;
            }
        }
    }

    fn close(&self, code: u16, reason: &'static str) {
        self.handle.close(code, reason, true);
    }

    fn reply(&self, text: String) {
        self.handle.push(Item::reply(text));
    }

    fn error(&self, e: RequestError) {
        self.node
            .metrics
            .client_errors
            .with_label_values(&[e.code.as_str()])
            .inc();
        self.reply(frames::error(e.id, e.code, &e.message));
    }

    /// Applies the rate limit; false when the message must be refused (then it is
    /// answered with `rate_limited`, carrying the request's `id`).
    ///
    /// Policy: messages over the sustained rate (after the burst) are refused and count
    /// as strikes; more than `limits.rate_limit_strikes` strikes within one
    /// `limits.rate_limit_window` close the session (1008). Admitted messages do not
    /// clear strikes, so a client that keeps sending above its rate is closed even
    /// though some of its messages get through.
    fn admit(&mut self, id: Option<u64>) -> bool {
        if self.rate.check().is_ok() {
            return true;
        }
        let now = std::time::Instant::now();
        if now.duration_since(self.strikes_since) >= self.node.config.limits.rate_limit_window {
            self.strikes = 0;
            self.strikes_since = now;
        }
        self.strikes += 1;
        self.error(RequestError {
            id,
            code: ErrorCode::RateLimited,
            message: "too many messages; slow down".into(),
        });
        false
    }

    /// Echo mode (`websocket.echo`, conformance testing only): the message goes back
    /// as it came, through the same queue and writer as every other frame.
    fn echo(&self, msg: Message) {
        let len = msg.len();
        self.handle.push(Item::control(msg, len));
    }

    async fn on_text(&mut self, frame: Bytes) {
        if self.node.config.websocket.echo {
            let text = match String::from_utf8(frame.to_vec()) {
                Ok(t) => t,
                Err(_) => return,
            };
            return self.echo(Message::Text(text.into()));
        }
        let parsed = parse_text(&frame);
        let id = match &parsed {
            Ok(r) => r.id(),
            Err(e) => e.id,
        };
        if !self.admit(id) {
            return;
        }
        match parsed {
            Ok(Request::Subscribe {
                channel,
                id,
                recover,
                since,
                token,
                delta,
            }) => {
                let identity = self.identity.as_deref();
                let hook = access::subscribe_hook(
                    &self.node.config.channels,
                    channel.as_str(),
                    identity,
                    token.is_some(),
                );
                let allowed = match hook {
                    None => self.may_subscribe(&channel, id, token.as_deref()),
                    Some(false) => {
                        self.forbidden(id, "not allowed to subscribe to this channel".into());
                        false
                    }
                    Some(true) => {
                        let ask = serde_json::json!({"channel": channel.as_str()});
                        let hook = herald_hooks::Hook::Subscribe;
                        let answer = backend::ask(&self.node, hook, &self.caller(), ask).await;
                        self.answered(id, answer).is_some()
                    }
                };
                if allowed {
                    self.subscribe(channel, id, recover, since, Some(delta))
                        .await;
                }
                self.grant_info = None;
            }
            Ok(Request::Unsubscribe { channel, id }) => {
                if let Some(i) = self.subscriptions.iter().position(|c| *c == channel) {
                    self.subscriptions.swap_remove(i);
                    self.node.hub.unsubscribe(&channel, self.conn);
                    self.left(&channel).await;
                    self.channel_info.retain(|(c, _)| *c != channel);
                }
                self.reply(frames::ack(Ack::Unsubscribed, channel.as_str(), id));
            }
            Ok(Request::Presence {
                channel,
                id,
                cursor,
            }) => self.presence(channel, id, cursor, false).await,
            Ok(Request::PresenceStats { channel, id }) => {
                self.presence(channel, id, None, true).await
            }
            Ok(Request::Rpc { id, method, data }) => self.rpc(id, method, data),
            Ok(Request::History { channel, id, limit }) => self.recent(channel, id, limit).await,
            Ok(Request::Publish { channel, data, id }) => {
                self.publish(channel, Payload::Json(data), id).await
            }
            Ok(Request::Refresh { token, id }) => self.refresh(&token, id),
            Ok(Request::Ping { id }) => self.reply(frames::pong(id)),
            Err(e) => self.error(e),
        }
    }

    /// Waits, at most `websocket.write_timeout` (or until the deadline of the turn of
    /// commands it is part of), for `room` bytes in the queue
    /// ([`SessionHandle::wait_room`]). Commands from the control API that arrive
    /// meanwhile must not wait behind it, nor end it (the reply it makes room for would
    /// then close the session): unsubscribes are carried out at once; a subscribe (which
    /// may wait for room itself) and everything after it waits for the end of this
    /// request, in order, instead of waiting inside this wait.
    async fn wait_room(&mut self, room: usize) {
        let deadline = self.commands_until.unwrap_or_else(|| {
            tokio::time::Instant::now() + self.node.config.websocket.write_timeout
        });
        while self.handle.wait_room(room, deadline).await == Room::Commands {
            for c in self.handle.take_commands() {
                match c {
                    SessionCommand::Unsubscribe(channel) if self.deferred.is_empty() => {
                        self.unsubscribed_by_backend(channel).await;
                    }
                    c => self.deferred.push(c),
                }
            }
        }
    }

    /// Carries out what the control API asked (server-side subscribe and unsubscribe),
    /// those deferred by a wait first; the waits for room in one turn share one
    /// deadline.
    async fn on_commands(&mut self) {
        let outer = self.commands_until.is_none();
        if outer {
            self.commands_until =
                Some(tokio::time::Instant::now() + self.node.config.websocket.write_timeout);
        }
        let mut turn = std::mem::take(&mut self.deferred);
        turn.extend(self.handle.take_commands());
        for c in turn {
            match c {
                // The backend decided: no permission check; the client hears an
                // unsolicited `subscribed` (no id) and then the channel's messages.
                SessionCommand::Subscribe { channel, since } => {
                    self.subscribe(channel, None, true, since, None).await
                }
                SessionCommand::CatchUp(channel) => self.catch_up(&channel).await,
                SessionCommand::Unsubscribe(channel) => self.unsubscribed_by_backend(channel).await,
            }
        }
        if outer {
            self.commands_until = None;
        }
    }

    /// The control API's unsubscribe.
    async fn unsubscribed_by_backend(&mut self, channel: ChannelName) {
        if let Some(i) = self.subscriptions.iter().position(|c| *c == channel) {
            self.subscriptions.swap_remove(i);
            self.node.hub.unsubscribe(&channel, self.conn);
            self.reply(frames::ack(Ack::Unsubscribed, channel.as_str(), None));
            self.left(&channel).await;
            self.channel_info.retain(|(c, _)| *c != channel);
        }
    }

    async fn on_binary(&mut self, frame: Bytes) {
        if self.node.config.websocket.echo {
            return self.echo(Message::Binary(frame));
        }
        if !self.admit(None) {
            return;
        }
        match parse_binary(&frame) {
            Ok((channel, payload)) => self.publish(channel, Payload::Binary(payload), None).await,
            Err(e) => self.error(e),
        }
    }

    /// Whether this client may subscribe to `channel` (with the subscription `token` it
    /// sent, if any); answers `forbidden` when not.
    fn may_subscribe(
        &mut self,
        channel: &ChannelName,
        id: Option<u64>,
        token: Option<&str>,
    ) -> bool {
        let grant = match (token, self.node.verifier()) {
            (None, _) => None,
            (Some(t), Some(v)) => match v.verify_subscription(t) {
                Ok(g) => Some(g),
                Err(e) => {
                    self.forbidden(id, format!("subscription token refused: {e}"));
                    return false;
                }
            },
            (Some(_), None) => {
                self.forbidden(id, "this node accepts no tokens".into());
                return false;
            }
        };
        let identity = self.identity.as_deref();
        if access::may_subscribe(
            &self.node.config.channels,
            channel.as_str(),
            identity,
            grant.as_ref(),
        ) {
            // A subscription token's `info` is what presence shows in this channel: only
            // a token for this channel and this connection's user, and kept once the
            // subscribe completes (`joined`).
            let user = identity.map(|i| i.user.as_str());
            self.grant_info = grant
                .filter(|g| g.channel == channel.as_str() && Some(g.user.as_str()) == user)
                .and_then(|g| g.info)
                .filter(|i| i.len() <= MAX_INFO)
                .map(|i| (channel.clone(), i.into()));
            return true;
        }
        self.forbidden(id, "not allowed to subscribe to this channel".into());
        false
    }

    fn forbidden(&self, id: Option<u64>, message: String) {
        self.error(RequestError {
            id,
            code: ErrorCode::Forbidden,
            message: message.into(),
        });
    }

    /// `refresh`: the connection continues on a new token for the same user.
    fn refresh(&mut self, token: &str, id: Option<u64>) {
        let Some(verifier) = self.node.verifier() else {
            return self.forbidden(id, "this node accepts no tokens".into());
        };
        let fresh = match verifier.verify(token) {
            Ok(i) => i,
            Err(e) => return self.forbidden(id, format!("token refused: {e}")),
        };
        match &self.identity {
            Some(current) if current.user == fresh.user => {}
            Some(_) => return self.forbidden(id, "the token is for another user".into()),
            None => {
                return self.forbidden(
                    id,
                    "an anonymous connection cannot take a token; reconnect with it".into(),
                )
            }
        }
        self.handle.set_expiry(fresh.expires_at);
        self.reply(frames::refreshed(id, fresh.expires_at));
        self.identity = Some(Box::new(fresh));
    }

    async fn subscribe(
        &mut self,
        channel: ChannelName,
        id: Option<u64>,
        recover: bool,
        since: Option<Since>,
        delta: Option<bool>,
    ) {
        let node = self.node.clone();
        let rule = node.config.channels.rule(channel.as_str());
        // Deltas where the client applies them and the rule allows them (a rule with
        // `delta` keeps history: the configuration is checked for it). `None`: a
        // subscribe the server makes, which asks for none.
        let delta = delta.map(|d| d && rule.is_some_and(|r| r.delta.is_some()));
        if self.subscriptions.contains(&channel) {
            // Held already: the subscription goes on, and what it delivers is not
            // replayed (the reply says whether a `since` lost anything); only whether
            // it takes deltas follows the client's request (a subscribe the server
            // makes leaves them as they are).
            if !self
                .node
                .hub
                .subscribed_again(channel.as_str(), self.conn, id, delta, since)
            {
                self.reply(frames::ack(Ack::Subscribed, channel.as_str(), id));
            }
            return;
        }
        if self.subscriptions.len() >= self.node.config.limits.max_subscriptions {
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
        let history = rule.and_then(|r| r.history());
        if history.is_some() && since.is_some() {
            // A resume may replay up to half the queue, all of it or a close: room
            // for it first (bounded), which a lagging channel may be holding.
            Box::pin(self.wait_room(self.node.config.limits.outbound_queue_bytes / 2)).await;
        }
        let opts = SubscribeOpts {
            history,
            positions: recover,
            delta: delta == Some(true),
        };
        let subscribed = self
            .node
            .hub
            .subscribe(&channel, self.conn, &self.handle, opts);
        self.subscriptions.push(channel.clone());
        let limit = self.node.config.limits.subscribe_timeout;
        // Acknowledge only once the broker delivers the channel: whatever is published
        // after the client has seen the reply reaches it.
        let ready = subscribed.ready;
        if !ready.is_ready() && !ready.wait(limit).await {
            return self.refuse_subscribe(
                &channel,
                id,
                "the broker did not confirm the subscription; retry later",
            );
        }
        let Some(stream) = subscribed.stream else {
            self.reply(frames::ack(Ack::Subscribed, channel.as_str(), id));
            return self.joined(&channel).await;
        };
        let resume = Resume {
            id,
            since,
            max_recovery: rule.map_or(0, |r| r.max_recovery()),
            timeout: limit,
        };
        match stream.resume(self.conn, resume).await {
            Resumed::Done { .. } => self.joined(&channel).await,
            Resumed::Gone => {}
            Resumed::Unavailable(why) => self.refuse_subscribe(&channel, id, why),
        }
    }

    /// Catches a history subscription up in place (one round, see
    /// `Stream::catch_up_member`) once the session's queue, which had no room for its
    /// deliveries, has room again. A history that cannot be read, or no longer holds what
    /// it missed, closes the session as a slow consumer: its client resumes on
    /// reconnect.
    async fn catch_up(&mut self, channel: &ChannelName) {
        let Some(stream) = self.node.hub.stream(channel.as_str()) else {
            return;
        };
        let limit = self.node.config.limits.subscribe_timeout;
        let done = stream.catch_up_member(self.conn, limit).await;
        tracing::trace!(channel = %channel, ?done, "catch-up round");
    }

    /// This connection as a presence member of `channel`.
    fn member(&self, channel: &ChannelName) -> Member {
        let from_grant = self
            .channel_info
            .iter()
            .find(|(c, _)| c == channel)
            .map(|(_, i)| &**i);
        Member {
            user: self
                .identity
                .as_ref()
                .map_or_else(String::new, |i| i.user.clone()),
            conn: conn_name(&self.node.instance, self.conn),
            info: from_grant
                .or_else(|| self.identity.as_ref().and_then(|i| i.info.as_deref()))
                .filter(|t| t.len() <= MAX_INFO)
                .and_then(|t| serde_json::from_str(t).ok()),
        }
    }

    /// A subscribe completed: on a presence channel, the connection joins.
    async fn joined(&mut self, channel: &ChannelName) {
        if let Some((c, info)) = self.grant_info.take() {
            if c == *channel {
                self.channel_info.retain(|(c, _)| c != channel);
                self.channel_info.push((c, info));
            }
        }
        if presence::rule(&self.node, channel.as_str()).is_some() {
            presence::join(&self.node, channel, self.member(channel)).await;
        }
    }

    /// An unsubscribe: on a presence channel, the connection leaves.
    async fn left(&self, channel: &ChannelName) {
        if presence::rule(&self.node, channel.as_str()).is_some() {
            let conn = conn_name(&self.node.instance, self.conn);
            presence::leave(&self.node, channel, &conn).await;
        }
    }

    /// The client, as hooks are told of it.
    fn caller(&self) -> backend::Caller<'_> {
        backend::Caller {
            conn: conn_name(&self.node.instance, self.conn),
            user: self.identity.as_ref().map_or("", |i| i.user.as_str()),
            address: self.address,
            transport: self.transport.name(),
        }
    }

    /// Tells the client what the backend decided against its request (`refused`,
    /// `unavailable`), or closes the session (the backend said disconnect); the
    /// decision's value when it allows. Awaited in the reader: the connection's next
    /// requests wait for it (at most the hook's timeout).
    fn answered<T>(&self, id: Option<u64>, answer: backend::Answer<T>) -> Option<T> {
        match answer {
            backend::Answer::Allow(r) => Some(r),
            backend::Answer::Refuse { code, message } => {
                self.node
                    .metrics
                    .client_errors
                    .with_label_values(&[ErrorCode::Refused.as_str()])
                    .inc();
                self.reply(frames::refused(id, code, &message));
                None
            }
            backend::Answer::Disconnect { code, reason } => {
                close_for_backend(&self.handle, code, reason);
                None
            }
            backend::Answer::Failed => {
                self.error(RequestError {
                    id,
                    code: ErrorCode::Unavailable,
                    message: "the application's backend did not answer; retry later".into(),
                });
                None
            }
        }
    }

    /// Keeps a connection the connect hook let in past its expiry by asking the
    /// refresh hook (`[hooks.refresh]`) `before_expiry` ahead: `{"expires": T}` moves
    /// the expiry to T (0 lifts it), a refusal ends the connection (4001 with the
    /// backend's message), a disconnect closes it with the backend's code. A backend
    /// that does not answer is asked again every [`REFRESH_RETRY`] until the expiry
    /// passes; then the sweeper closes the connection as any expired one (4001).
    fn refresh_by_hook(&self) {
        let Some((hooks, config)) = self
            .node
            .hooks
            .as_ref()
            .and_then(|h| Some((h.clone(), h.refresh()?.clone())))
        else {
            return;
        };
        let handle = self.handle.clone();
        let body = self.caller().request(serde_json::json!({}));
        self.node.session_tasks.spawn(async move {
            /// The refresh hook's `result`.
            #[derive(serde::Deserialize)]
            struct Extended {
                /// The new expiry (Unix seconds; 0: none).
                expires: u64,
            }
            let unix_now = || {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
            };
            // A backend that extends by less than `before_expiry` would otherwise be
            // asked again at once, in a loop: calls are at least REFRESH_RETRY apart.
            let mut earliest = std::time::Duration::ZERO;
            loop {
                let exp = handle.expires_at();
                if exp == 0 {
                    return;
                }
                let due = std::time::Duration::from_secs(exp)
                    .saturating_sub(config.before_expiry)
                    .max(earliest);
                tokio::select! {
                    _ = handle.done.wait() => return,
                    _ = tokio::time::sleep(due.saturating_sub(unix_now())) => {}
                }
                earliest = unix_now() + REFRESH_RETRY;
                let failed = match hooks.call(herald_hooks::Hook::Refresh, &body).await {
                    Ok(herald_hooks::Reply::Result(r)) => {
                        match serde_json::from_str::<Extended>(r.get()) {
                            Ok(Extended { expires })
                                if expires == 0 || expires > unix_now().as_secs() =>
                            {
                                handle.set_expiry(expires.min(herald_auth::MAX_EXP));
                                continue;
                            }
                            Ok(_) => {
                                handle.close(close::TOKEN_EXPIRED, "expired", true);
                                return;
                            }
                            Err(e) => format!("result: {e}"),
                        }
                    }
                    Ok(herald_hooks::Reply::Error { message, .. }) => {
                        handle.close(close::TOKEN_EXPIRED, truncate_reason(message), true);
                        return;
                    }
                    Ok(herald_hooks::Reply::Disconnect { code, reason }) => {
                        close_for_backend(&handle, code, reason);
                        return;
                    }
                    Err(e) => e.to_string(),
                };
                tracing::debug!(error = %failed, "refresh hook failed; asking again");
                tokio::select! {
                    _ = handle.done.wait() => return,
                    _ = tokio::time::sleep(REFRESH_RETRY) => {}
                }
            }
        });
    }

    /// `rpc`: the call goes to the backend (`[hooks.rpc]`) off the reader, so the
    /// session's other requests and deliveries go on meanwhile; its answer is queued to
    /// the client when it comes (at most [`MAX_RPC_IN_FLIGHT`] at once per session).
    fn rpc(&mut self, id: Option<u64>, method: String, data: Bytes) {
        let Some((hooks, cfg)) = self
            .node
            .hooks
            .as_ref()
            .and_then(|h| Some((h.clone(), h.rpc()?.clone())))
        else {
            return self.error(RequestError {
                id,
                code: ErrorCode::BadRequest,
                message: "rpc is not enabled on this server ([hooks.rpc])".into(),
            });
        };
        if self.identity.is_none() && !cfg.anonymous {
            return self.forbidden(id, "rpc needs a token".into());
        }
        let in_flight = self.rpc_in_flight.clone();
        if in_flight.fetch_add(1, std::sync::atomic::Ordering::AcqRel) >= MAX_RPC_IN_FLIGHT {
            in_flight.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            return self.error(RequestError {
                id,
                code: ErrorCode::RateLimited,
                message: format!("at most {MAX_RPC_IN_FLIGHT} rpc calls in flight per connection")
                    .into(),
            });
        }
        let data: serde_json::Value =
            serde_json::from_slice(&data).unwrap_or(serde_json::Value::Null);
        let body = self
            .caller()
            .request(serde_json::json!({"method": method, "data": data}));
        let handle = self.handle.clone();
        let metrics = self.node.metrics.clone();
        self.node.session_tasks.spawn(async move {
            let frame = match hooks.call(herald_hooks::Hook::Rpc, &body).await {
                Ok(herald_hooks::Reply::Result(r)) => Some(frames::result(id, r.get())),
                Ok(herald_hooks::Reply::Error { code, message }) => {
                    Some(frames::refused(id, code, &message))
                }
                Ok(herald_hooks::Reply::Disconnect { code, reason }) => {
                    close_for_backend(&handle, code, reason);
                    None
                }
                Err(e) => {
                    tracing::debug!(error = %e, "rpc hook failed");
                    metrics
                        .client_errors
                        .with_label_values(&[ErrorCode::Unavailable.as_str()])
                        .inc();
                    Some(frames::error(
                        id,
                        ErrorCode::Unavailable,
                        "the application's backend did not answer; retry later",
                    ))
                }
            };
            if let Some(f) = frame {
                handle.push(Item::reply(f));
            }
            in_flight.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        });
    }

    /// `history`: a history channel's most recent publications (at most `limit` and
    /// `limits.max_history_page`), for subscribers by default (the rule's
    /// `history_access`).
    async fn recent(&mut self, channel: ChannelName, id: Option<u64>, limit: Option<u64>) {
        let rule = self.node.config.channels.rule(channel.as_str());
        let Some((rule, policy)) = rule.and_then(|r| Some((r, r.history()?))) else {
            return self.error(RequestError {
                id,
                code: ErrorCode::BadRequest,
                message: "this channel keeps no history".into(),
            });
        };
        let allowed = match rule.history_access {
            PresenceAccess::Subscribers => self.subscriptions.contains(&channel),
            PresenceAccess::Nobody => false,
        };
        if !allowed {
            return self.forbidden(
                id,
                "only the channel's subscribers may read its history".into(),
            );
        }
        let max = self.node.config.limits.max_history_page as u64;
        let n = limit.unwrap_or(max).min(max);
        let broker = &self.node.broker;
        // Where the stream stands, then its last `n` publications in that epoch (a new
        // epoch begun in between answers its position and nothing: read again).
        let read = async {
            let head = broker.history(&channel, policy, 0, 0, None).await?;
            let since = head.top.offset.saturating_sub(n);
            broker
                .history(&channel, policy, since, n as usize, Some(head.top.epoch))
                .await
        };
        match read.await {
            Ok(page) => {
                // The reply goes through this client's queue like everything else: keep
                // the newest publications that fit half of it (what a resume's replay
                // may take), so a page asking for history is never closed for it.
                let budget = self.node.config.limits.outbound_queue_bytes / 2;
                let mut used = 0;
                let fit = page
                    .publications
                    .iter()
                    .rev()
                    .take_while(|p| {
                        used += p.payload.len() * 4 / 3 + 64;
                        used <= budget
                    })
                    .count();
                let from = page.publications.len() - fit;
                let frame = herald_protocol::api::history_frame(
                    channel.as_str(),
                    id,
                    page.top,
                    from == 0,
                    &page.publications[from..],
                );
                // Room for it first (bounded), which a lagging channel may be holding.
                Box::pin(self.wait_room(frame.len())).await;
                self.reply(frame)
            }
            Err(_) => self.error(RequestError {
                id,
                code: ErrorCode::Unavailable,
                message: "the channel's history could not be read; retry later".into(),
            }),
        }
    }

    /// `presence` and `presence_stats`: for subscribers of a presence channel (by
    /// default; the rule's `presence_access`).
    async fn presence(
        &self,
        channel: ChannelName,
        id: Option<u64>,
        cursor: Option<String>,
        stats: bool,
    ) {
        let Some(rule) = presence::rule(&self.node, channel.as_str()) else {
            return self.error(RequestError {
                id,
                code: ErrorCode::BadRequest,
                message: "this channel keeps no presence".into(),
            });
        };
        let allowed = match rule.presence_access {
            PresenceAccess::Subscribers => self.subscriptions.contains(&channel),
            PresenceAccess::Nobody => false,
        };
        if !allowed {
            return self.forbidden(
                id,
                "only the channel's subscribers may see who is present".into(),
            );
        }
        let unavailable = |s: &Self| {
            s.error(RequestError {
                id,
                code: ErrorCode::Unavailable,
                message: "presence could not be read; retry later".into(),
            })
        };
        if stats {
            match presence::stats(&self.node, &channel).await {
                Ok(st) => self.reply(herald_protocol::presence::stats_frame(
                    channel.as_str(),
                    id,
                    st.connections,
                    st.users,
                )),
                Err(_) => unavailable(self),
            }
        } else {
            if cursor
                .as_deref()
                .is_some_and(|c| !presence::valid_cursor(c))
            {
                return self.error(RequestError {
                    id,
                    code: ErrorCode::BadRequest,
                    message: "cursor: not one a presence page gave".into(),
                });
            }
            let limit = self.node.config.presence.page_size;
            match presence::page(&self.node, &channel, cursor, limit).await {
                Ok(p) => self.reply(herald_protocol::presence::page_frame(
                    channel.as_str(),
                    id,
                    &p.members,
                    p.cursor.as_deref(),
                )),
                Err(_) => unavailable(self),
            }
        }
    }

    /// Undoes a subscribe that cannot be acknowledged and says why.
    fn refuse_subscribe(&mut self, channel: &ChannelName, id: Option<u64>, why: &'static str) {
        self.subscriptions.retain(|c| c != channel);
        self.node.hub.unsubscribe(channel, self.conn);
        self.error(RequestError {
            id,
            code: ErrorCode::Unavailable,
            message: why.into(),
        });
    }

    async fn publish(&mut self, channel: ChannelName, mut payload: Payload, id: Option<u64>) {
        let identity = self.identity.as_deref();
        let channels = &self.node.config.channels;
        let mut skip_history = false;
        match access::publish_hook(channels, channel.as_str(), identity) {
            None => {
                if !access::may_publish(channels, channel.as_str(), identity) {
                    return self.forbidden(id, "not allowed to publish to this channel".into());
                }
            }
            Some(false) => {
                return self.forbidden(id, "not allowed to publish to this channel".into())
            }
            Some(true) => {
                let caller = self.caller();
                let answer = backend::publish(&self.node, &caller, channel.as_str(), payload).await;
                let Some(allowed) = self.answered(id, answer) else {
                    return;
                };
                payload = allowed.payload;
                skip_history = allowed.skip_history;
            }
        }
        let name = channel.clone();
        let publication = Publication::now(channel, payload);
        if let Some(why) = self.node.too_large(&publication) {
            return self.error(RequestError {
                id,
                code: ErrorCode::TooLarge,
                message: why.into(),
            });
        }
        match self
            .node
            .publish(
                vec![Outgoing {
                    publication,
                    key: None,
                    skip_history,
                }],
                Source::Client,
            )
            .await
        {
            Ok(_) => self.reply(frames::ack(Ack::Published, name.as_str(), id)),
            Err(e) => {
                // The broker's text may name internals: log it, send a plain reason.
                tracing::debug!(error = %e, "client publish failed");
                let message = match e {
                    BrokerError::Timeout | BrokerError::UnknownOutcome(_) => {
                        "the broker did not answer in time; the message may or may not have been published"
                    }
                    _ => "the broker is unavailable; the message was not published",
                };
                self.error(RequestError {
                    id,
                    code: ErrorCode::Unavailable,
                    message: message.into(),
                })
            }
        }
    }
}

/// After a close was requested: discard input until the stream ends or the writer
/// gives up.
async fn drain_until_closed<R>(stream: &mut R, handle: &SessionHandle)
where
    R: Stream<Item = Result<Message, WsError>> + Unpin,
{
    loop {
        tokio::select! {
            biased;
            _ = handle.done.wait() => return,
            msg = stream.next() => match msg {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            },
        }
    }
}

/// A session's limit on the messages it sends: `limits.messages_per_second` sustained,
/// `limits.message_burst` at once (GCRA, governor's; one atomic word of state).
type RateLimit = governor::RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    governor::clock::MonotonicClock,
>;

fn rate_limit(per_second: f64, burst: u32) -> RateLimit {
    governor::RateLimiter::direct_with_clock(
        crate::node::publish_quota(per_second, burst),
        governor::clock::MonotonicClock,
    )
}
