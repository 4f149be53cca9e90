//! A Rust client for Herald, with the semantics of the JS client: one connection kept
//! alive for any number of subscriptions.
//!
//! - Connects and reconnects with full-jitter exponential backoff
//!   ([`Config::min_backoff`]..[`Config::max_backoff`]); drains (1001/1012) reconnect at
//!   once.
//! - Resubscribes every channel after every reconnect with `since` = the last offset it
//!   delivered, so a history channel loses nothing; deliveries at or below that offset
//!   are dropped, so none is seen twice. [`Event::Recovered`] says whether the server
//!   could fill the gap.
//! - Detects dead connections: after the welcome's `heartbeat_ms` of silence it sends a
//!   `ping` and gives the connection up if nothing arrives within
//!   [`Config::ping_timeout`].
//! - Publishes wait for their `published` reply; while disconnected they wait for the
//!   next connection, up to [`Config::publish_timeout`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), herald_client::Error> {
//! use herald_client::{Client, Config, Event};
//! let client = Client::start(Config::new("ws://127.0.0.1:8080/ws"));
//! let mut news = client.subscribe("news")?;
//! client.publish("chat:lobby", &serde_json::json!({"text": "hi"})).await?;
//! while let Some(event) = news.next().await {
//!     if let Event::Message { data, offset } = event {
//!         println!("{offset:?}: {}", String::from_utf8_lossy(&data));
//!     }
//! }
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use herald_protocol::backoff::Backoff;
use herald_protocol::client::{
    encode_ping, encode_presence, encode_publish, encode_resume, encode_rpc, encode_unsubscribe,
    with_delta,
};
use herald_protocol::server::{parse_binary_delivery, parse_reply, parse_text_delivery};
use herald_protocol::{ChannelName, Epoch, StreamPosition};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep, timeout, Instant};
use tokio_tungstenite::tungstenite::Message;

/// How the client connects.
#[derive(Debug, Clone)]
pub struct Config {
    /// `ws://host:port/ws`.
    pub url: String,
    /// A connection token, sent as `Authorization: Bearer`.
    pub token: Option<String>,
    /// Where a fresh token comes from, asked before every connection attempt (and so
    /// after a 4001 "token expired"): a token that expired is never sent again. Wins
    /// over `token` when it answers `Some`.
    pub token_source: Option<TokenSource>,
    /// Backoff bounds: the n-th retry waits a random time up to
    /// `min(max_backoff, min_backoff * 2^n)`.
    pub min_backoff: Duration,
    /// See `min_backoff`.
    pub max_backoff: Duration,
    /// How long a `ping` sent after a heartbeat interval of silence may go unanswered.
    pub ping_timeout: Duration,
    /// How long a publish may wait (for a connection and for its reply).
    pub publish_timeout: Duration,
    /// How long a connection attempt (TCP, handshake, welcome) may take.
    pub connect_timeout: Duration,
    /// Ask for Fossil deltas on every subscription (`"delta":"fossil"`): on channels
    /// whose rule allows them, a publication may arrive as the delta against the one
    /// before, which the client applies; [`Event::Message`] always carries the whole
    /// data. Default off.
    pub delta: bool,
}

/// The largest publication a delta may rebuild (a delta names its result's size
/// first; a bigger one is refused before anything is reserved).
const MAX_DELTA_TARGET: usize = 64 << 20;

/// Fetches a connection token (from the application's backend, typically).
#[derive(Clone)]
pub struct TokenSource(std::sync::Arc<dyn Fn() -> TokenFuture + Send + Sync>);

/// What a [`TokenSource`] answers: a token, eventually (`None`: none to give).
type TokenFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Option<String>> + Send>>;

impl TokenSource {
    /// A source that calls `f` for each connection attempt.
    pub fn new<F, Fut>(f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Option<String>> + Send + 'static,
    {
        TokenSource(std::sync::Arc::new(move || Box::pin(f())))
    }
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSource")
    }
}

impl Config {
    /// Defaults as the JS client's: 500 ms to 20 s backoff, 5 s ping timeout, 10 s
    /// publish timeout.
    pub fn new(url: impl Into<String>) -> Config {
        Config {
            url: url.into(),
            token: None,
            token_source: None,
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(20),
            ping_timeout: Duration::from_secs(5),
            publish_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            delta: false,
        }
    }
}

/// The connection's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Connecting, or waiting to reconnect.
    Connecting,
    /// Welcomed by a node.
    Connected,
    /// [`Client::close`] was called.
    Closed,
}

/// What a subscription receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A publication (`data` is the publisher's JSON text, byte for byte, for JSON
    /// publications).
    Message {
        /// The payload: JSON text, or the bytes of a binary publication.
        data: Bytes,
        /// The publication's offset, on history channels.
        offset: Option<u64>,
    },
    /// The server confirmed the subscription (again, after a reconnect).
    Subscribed,
    /// After a resume: whether everything missed was delivered (`false`: some of it is
    /// gone; the application should reload from its source of truth).
    Recovered(bool),
    /// The channel's stream restarted (new epoch) or a gap could not be filled.
    Reset,
    /// The subscription was refused (e.g. `forbidden`); it is over.
    Refused(String),
    /// The server could not confirm the subscription yet (`unavailable`: its broker is
    /// down); the client asks again with backoff while connected, by itself.
    Unavailable(String),
    /// Someone joined the channel (presence with `join_leave`).
    Join(herald_protocol::presence::Member),
    /// Someone left it.
    Leave(herald_protocol::presence::Member),
    /// The backend ended this subscription (the control API's `POST /api/unsubscribe`);
    /// it is over and not asked for again.
    Unsubscribed,
    /// The backend closed the connection not to come back (`POST /api/disconnect`,
    /// codes 4400-4499: a ban, a sign-out): the client has stopped.
    Disconnected {
        /// The close code.
        code: u16,
        /// The close reason.
        reason: String,
    },
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The server answered with an error frame.
    #[error("{code}: {message}")]
    Server {
        /// The error code (`forbidden`, `unavailable`, ...).
        code: String,
        /// The server's explanation.
        message: String,
    },
    /// No reply in time (the outcome is unknown if the request had been sent).
    #[error("timed out")]
    Timeout,
    /// The connection dropped after the request was sent: its outcome is unknown.
    #[error("the connection dropped before the reply")]
    Disconnected,
    /// The client was closed.
    #[error("the client is closed")]
    Closed,
    /// Not a valid channel name.
    #[error("invalid channel: {0}")]
    Channel(String),
}

enum Command {
    /// A new listener (its id, its events) for a channel.
    Subscribe(ChannelName, u64, mpsc::UnboundedSender<Event>),
    /// That listener is gone.
    Unsubscribe(ChannelName, u64),
    Publish(String, Value, Reply),
    /// A presence question (`stats`: `presence_stats`), answered while connected.
    Presence(ChannelName, Option<String>, bool, Reply),
    /// An `rpc` (method, data), answered while connected.
    Rpc(String, Value, Reply),
    Close,
}

/// A running client; cheap to clone. Dropping every clone closes it.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::UnboundedSender<Command>,
    state: watch::Receiver<State>,
    publish_timeout: Duration,
    /// Numbers listeners: one channel may have several [`Subscription`]s.
    next_listener: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Subscriptions the server made (the control API's `POST /api/subscribe`).
    made: std::sync::Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Subscription>>>,
}

/// What the client's task needs to hand over subscriptions the server made.
struct Made {
    /// To give each a way to unsubscribe; weak, so that the task does not keep the
    /// client alive.
    commands: mpsc::WeakUnboundedSender<Command>,
    /// Numbers their listeners like the client's own.
    next_listener: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Where they go ([`Client::next_server_subscription`]).
    out: mpsc::UnboundedSender<Subscription>,
}

/// One channel's events, in order.
pub struct Subscription {
    channel: ChannelName,
    /// Which listener of the channel this is.
    listener: u64,
    events: mpsc::UnboundedReceiver<Event>,
    commands: mpsc::UnboundedSender<Command>,
}

impl Subscription {
    /// The next event; `None` once the client is closed.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// The channel.
    pub fn channel(&self) -> &str {
        self.channel.as_str()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self
            .commands
            .send(Command::Unsubscribe(self.channel.clone(), self.listener));
    }
}

impl Client {
    /// Starts the client's task (on the current tokio runtime) and returns at once.
    pub fn start(config: Config) -> Client {
        let (commands, rx) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(State::Connecting);
        let publish_timeout = config.publish_timeout;
        let next_listener = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (out, made) = mpsc::unbounded_channel();
        let made_ctx = Made {
            commands: commands.downgrade(),
            next_listener: next_listener.clone(),
            out,
        };
        tokio::spawn(run(config, rx, state_tx, made_ctx));
        Client {
            commands,
            state,
            publish_timeout,
            next_listener,
            made: std::sync::Arc::new(tokio::sync::Mutex::new(made)),
        }
    }

    /// Subscribes; events arrive on the returned [`Subscription`]. Subscribing again
    /// to a channel adds a listener (both receive everything); the channel is
    /// unsubscribed when its last `Subscription` is dropped.
    pub fn subscribe(&self, channel: &str) -> Result<Subscription, Error> {
        let channel = ChannelName::new(channel).map_err(|e| Error::Channel(e.to_string()))?;
        let (tx, events) = mpsc::unbounded_channel();
        let listener = self
            .next_listener
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.commands
            .send(Command::Subscribe(channel.clone(), listener, tx))
            .map_err(|_| Error::Closed)?;
        Ok(Subscription {
            channel,
            listener,
            events,
            commands: self.commands.clone(),
        })
    }

    /// Publishes JSON `data`; returns the server's `published` reply.
    pub async fn publish(&self, channel: &str, data: &Value) -> Result<Value, Error> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Publish(channel.to_owned(), data.clone(), tx))
            .map_err(|_| Error::Closed)?;
        match timeout(self.publish_timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// Calls the application's backend (the server's `[hooks.rpc]`) and returns its
    /// result's `data`. A refusal by the backend is `Error::Server` with code `refused`;
    /// `Error::Disconnected` when the connection dropped first (whether the backend ran
    /// it is unknown).
    pub async fn rpc(&self, method: &str, data: &Value) -> Result<Value, Error> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Rpc(method.to_owned(), data.clone(), tx))
            .map_err(|_| Error::Closed)?;
        match timeout(self.publish_timeout, rx).await {
            Ok(Ok(r)) => r.map(|mut frame| frame["data"].take()),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// One page of who is present in `channel` (a presence channel this client
    /// subscribes to): the server's `presence` frame (`members`, and `cursor` while
    /// there are more: pass it back for the next page).
    pub async fn presence(&self, channel: &str, cursor: Option<&str>) -> Result<Value, Error> {
        self.ask_presence(channel, cursor, false).await
    }

    /// How many connections and distinct users are present in `channel`: the server's
    /// `presence_stats` frame (`connections`, `users`).
    pub async fn presence_stats(&self, channel: &str) -> Result<Value, Error> {
        self.ask_presence(channel, None, true).await
    }

    async fn ask_presence(
        &self,
        channel: &str,
        cursor: Option<&str>,
        stats: bool,
    ) -> Result<Value, Error> {
        let channel = ChannelName::new(channel).map_err(|e| Error::Channel(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Presence(
                channel,
                cursor.map(str::to_owned),
                stats,
                tx,
            ))
            .map_err(|_| Error::Closed)?;
        match timeout(self.publish_timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// The connection's state, as it changes.
    pub fn state(&self) -> watch::Receiver<State> {
        self.state.clone()
    }

    /// The next subscription the server made for this client (the control API's
    /// `POST /api/subscribe`), before its first message; it is then resumed after
    /// reconnects like the client's own. `None` once the client is closed.
    pub async fn next_server_subscription(&self) -> Option<Subscription> {
        self.made.lock().await.recv().await
    }

    /// Closes the connection for good.
    pub fn close(&self) {
        let _ = self.commands.send(Command::Close);
    }
}

/// A channel the client holds.
struct Sub {
    /// Every listener's events (a channel subscribed more than once has several).
    listeners: Vec<(u64, mpsc::UnboundedSender<Event>)>,
    /// The last offset delivered, and its epoch.
    position: Option<StreamPosition>,
    /// With deltas: the last positioned text delivery's offset and data (the frame's
    /// raw text, PROTOCOL.md "Deltas") on this subscription, the base the next delta
    /// applies to.
    base: Option<(u64, Bytes)>,
    /// A delta did not apply on this channel: deltas are no longer asked for on it, so
    /// whatever made it fail cannot make the client reconnect again and again.
    no_delta: bool,
    /// The server confirmed it on this connection.
    active: bool,
    /// How long to wait before asking again after `unavailable`.
    retry: Backoff,
}

impl Sub {
    fn new(config: &Config, listener: u64, events: mpsc::UnboundedSender<Event>) -> Self {
        Sub {
            listeners: vec![(listener, events)],
            position: None,
            base: None,
            no_delta: false,
            active: false,
            retry: Backoff::new(config.min_backoff, config.max_backoff),
        }
    }

    /// Whether its subscribe asks for deltas: the client does, and no delta failed here.
    fn asks_delta(&self, config: &Config) -> bool {
        config.delta && !self.no_delta
    }

    /// Tells every listener (those that went away are forgotten).
    fn emit(&mut self, e: Event) {
        self.listeners.retain(|(_, tx)| tx.send(e.clone()).is_ok());
    }
}

/// A `Subscribe` command: true when the channel is new and needs a subscribe frame.
fn add_listener(
    config: &Config,
    subs: &mut HashMap<ChannelName, Sub>,
    channel: ChannelName,
    listener: u64,
    events: mpsc::UnboundedSender<Event>,
) -> bool {
    if let Some(sub) = subs.get_mut(&channel) {
        if sub.active {
            let _ = events.send(Event::Subscribed);
        }
        sub.listeners.push((listener, events));
        return false;
    }
    subs.insert(channel, Sub::new(config, listener, events));
    true
}

/// An `Unsubscribe` command: true when it was the channel's last listener.
fn remove_listener(
    subs: &mut HashMap<ChannelName, Sub>,
    channel: &ChannelName,
    listener: u64,
) -> bool {
    let Some(sub) = subs.get_mut(channel) else {
        return false;
    };
    sub.listeners.retain(|(id, _)| *id != listener);
    if !sub.listeners.is_empty() {
        return false;
    }
    subs.remove(channel);
    true
}

struct Queued {
    channel: String,
    data: Value,
    reply: Reply,
    since: Instant,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How a connection ended.
enum Ended {
    /// Reconnect after `backoff` attempts' worth of delay (0: at once).
    Reconnect {
        at_once: bool,
    },
    Closed,
}

async fn run(
    config: Config,
    mut commands: mpsc::UnboundedReceiver<Command>,
    state: watch::Sender<State>,
    made: Made,
) {
    let mut subs: HashMap<ChannelName, Sub> = HashMap::new();
    let mut queue: Vec<Queued> = Vec::new();
    let mut backoff = Backoff::new(config.min_backoff, config.max_backoff);
    loop {
        let _ = state.send(State::Connecting);
        let connected = timeout(config.connect_timeout, connect(&config)).await;
        let (ws, heartbeat) = match connected {
            Ok(Ok(c)) => c,
            other => {
                if let Ok(Err(e)) = other {
                    tracing::debug!(error = %e, "connect failed");
                }
                let wait = backoff.next_wait();
                if wait_or_command(&config, wait, &mut commands, &mut subs, &mut queue).await {
                    break;
                }
                continue;
            }
        };
        backoff.reset();
        let _ = state.send(State::Connected);
        match session(
            &config,
            ws,
            heartbeat,
            &mut commands,
            &mut subs,
            &mut queue,
            &made,
        )
        .await
        {
            Ended::Closed => break,
            Ended::Reconnect { at_once } => {
                if !at_once {
                    let wait = backoff.next_wait();
                    if wait_or_command(&config, wait, &mut commands, &mut subs, &mut queue).await {
                        break;
                    }
                }
            }
        }
    }
    let _ = state.send(State::Closed);
    for q in queue {
        let _ = q.reply.send(Err(Error::Closed));
    }
}

/// Waits `d` while taking commands (subscribes are recorded, publishes queued);
/// true when the client was closed.
async fn wait_or_command(
    config: &Config,
    d: Duration,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    subs: &mut HashMap<ChannelName, Sub>,
    queue: &mut Vec<Queued>,
) -> bool {
    let deadline = sleep(d);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return false,
            c = commands.recv() => match c {
                None | Some(Command::Close) => return true,
                Some(Command::Subscribe(channel, listener, events)) => {
                    add_listener(config, subs, channel, listener, events);
                }
                Some(Command::Unsubscribe(channel, listener)) => {
                    remove_listener(subs, &channel, listener);
                }
                Some(Command::Publish(channel, data, reply)) => {
                    queue.push(Queued { channel, data, reply, since: Instant::now() });
                }
                Some(Command::Presence(.., reply)) | Some(Command::Rpc(.., reply)) => {
                    let _ = reply.send(Err(Error::Disconnected));
                }
            }
        }
    }
}

/// Until the earliest of `retry`'s times.
async fn sleep_until_first(retry: &[(tokio::time::Instant, ChannelName)]) {
    if let Some(at) = retry.iter().map(|(at, _)| *at).min() {
        tokio::time::sleep_until(at).await;
    }
}

async fn connect(config: &Config) -> Result<(Ws, Duration), tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = config.url.as_str().into_client_request()?;
    let fresh = match &config.token_source {
        Some(source) => (source.0)().await,
        None => None,
    };
    if let Some(t) = fresh.as_ref().or(config.token.as_ref()) {
        if let Ok(v) = format!("Bearer {t}").parse() {
            req.headers_mut().insert("authorization", v);
        }
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                if let Some(r) = parse_reply(t.as_str()).filter(|r| r.op == "welcome") {
                    let ms = r.heartbeat_ms.unwrap_or(25_000);
                    return Ok((ws, Duration::from_millis(ms)));
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e),
            None => return Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed),
        }
    }
}

type Reply = oneshot::Sender<Result<Value, Error>>;

/// The requests of one connection that wait for their reply, by request id.
#[derive(Default)]
struct Requests {
    next_id: u64,
    /// Subscribes: their channel (a refusal removes the subscription).
    subscribing: HashMap<u64, ChannelName>,
    /// Subscribes answered `unavailable`: when to ask again.
    retry: Vec<(tokio::time::Instant, ChannelName)>,
    /// Publishes: who waits for the outcome.
    publishing: HashMap<u64, Reply>,
}

impl Requests {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The frame subscribing to `channel`, resuming after `since`, asking for deltas
    /// when `delta`.
    fn subscribe(
        &mut self,
        channel: &ChannelName,
        since: Option<StreamPosition>,
        delta: bool,
    ) -> Message {
        let id = self.id();
        self.subscribing.insert(id, channel.clone());
        let frame = encode_resume(channel, Some(id), since);
        Message::Text(if delta { with_delta(frame) } else { frame }.into())
    }

    /// The frame publishing `data`; `reply` hears the outcome.
    fn publish(&mut self, channel: &str, data: &Value, reply: Reply) -> Message {
        let id = self.id();
        self.publishing.insert(id, reply);
        Message::Text(encode_publish(channel, &data.to_string(), Some(id)).into())
    }
}

/// Runs one connection until it ends.
async fn session(
    config: &Config,
    mut ws: Ws,
    heartbeat: Duration,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    subs: &mut HashMap<ChannelName, Sub>,
    queue: &mut Vec<Queued>,
    made: &Made,
) -> Ended {
    let mut requests = Requests::default();
    for sub in subs.values_mut() {
        sub.active = false;
    }
    for (channel, sub) in subs.iter() {
        if ws
            .send(requests.subscribe(channel, sub.position, sub.asks_delta(config)))
            .await
            .is_err()
        {
            return Ended::Reconnect { at_once: false };
        }
    }
    for q in std::mem::take(queue) {
        if q.since.elapsed() >= config.publish_timeout {
            let _ = q.reply.send(Err(Error::Timeout));
            continue;
        }
        let frame = requests.publish(&q.channel, &q.data, q.reply);
        if ws.send(frame).await.is_err() {
            return Ended::Reconnect { at_once: false };
        }
    }
    let mut last_heard = Instant::now();
    let mut pinged: Option<Instant> = None;
    let tick = (heartbeat / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut ticker = tokio::time::interval(tick);
    let ended = loop {
        tokio::select! {
            msg = ws.next() => {
                last_heard = Instant::now();
                pinged = None;
                match msg {
                    Some(Ok(Message::Text(t))) => {
                        if let Err(e) = on_text(config, t.as_str(), subs, &mut requests, made) {
                            // Nothing was lost: the resume after reconnecting starts
                            // whole, from the last delivered offset, without deltas on
                            // that channel from then on.
                            tracing::warn!(error = %e, "reconnecting");
                            if let Some(sub) = subs.get_mut(&e.0) {
                                sub.no_delta = true;
                            }
                            break Ended::Reconnect { at_once: false };
                        }
                    }
                    Some(Ok(Message::Binary(b))) => on_binary(&b, subs),
                    Some(Ok(Message::Close(frame))) => {
                        let (code, reason) = frame.map_or((1005, String::new()), |f| {
                            (u16::from(f.code), f.reason.to_string())
                        });
                        if herald_protocol::close::is_terminal(code) {
                            for sub in subs.values_mut() {
                                sub.emit(Event::Disconnected { code, reason: reason.clone() });
                            }
                            break Ended::Closed;
                        }
                        break Ended::Reconnect { at_once: matches!(code, 1001 | 1012) };
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break Ended::Reconnect { at_once: false },
                }
            }
            c = commands.recv() => match c {
                None | Some(Command::Close) => {
                    let _ = ws.close(None).await;
                    break Ended::Closed;
                }
                Some(Command::Subscribe(channel, listener, events)) => {
                    if add_listener(config, subs, channel.clone(), listener, events) {
                        let frame = requests.subscribe(&channel, None, config.delta);
                        if ws.send(frame).await.is_err() {
                            break Ended::Reconnect { at_once: false };
                        }
                    }
                }
                Some(Command::Unsubscribe(channel, listener)) => {
                    if remove_listener(subs, &channel, listener) {
                        let frame = encode_unsubscribe(&channel, None);
                        let _ = ws.send(Message::Text(frame.into())).await;
                    }
                }
                Some(Command::Publish(channel, data, reply)) => {
                    let frame = requests.publish(&channel, &data, reply);
                    if ws.send(frame).await.is_err() {
                        break Ended::Reconnect { at_once: false };
                    }
                }
                Some(Command::Rpc(method, data, reply)) => {
                    let id = requests.id();
                    requests.publishing.insert(id, reply);
                    let frame = encode_rpc(id, &method, &data.to_string());
                    if ws.send(Message::Text(frame.into())).await.is_err() {
                        break Ended::Reconnect { at_once: false };
                    }
                }
                Some(Command::Presence(channel, cursor, stats, reply)) => {
                    let id = requests.id();
                    requests.publishing.insert(id, reply);
                    let frame = encode_presence(&channel, id, cursor.as_deref(), stats);
                    if ws.send(Message::Text(frame.into())).await.is_err() {
                        break Ended::Reconnect { at_once: false };
                    }
                }
            },
            _ = sleep_until_first(&requests.retry), if !requests.retry.is_empty() => {
                let now = tokio::time::Instant::now();
                let (due, later): (Vec<_>, Vec<_>) =
                    std::mem::take(&mut requests.retry).into_iter().partition(|(at, _)| *at <= now);
                requests.retry = later;
                for (_, channel) in due {
                    let Some(sub) = subs.get(&channel).filter(|s| !s.active) else { continue };
                    let frame = requests.subscribe(&channel, sub.position, sub.asks_delta(config));
                    if ws.send(frame).await.is_err() {
                        break;
                    }
                }
            }
            _ = ticker.tick() => {
                // Our own liveness check: the server's pings are answered by the
                // WebSocket layer, which does not tell us whether the path still works.
                if let Some(at) = pinged {
                    if at.elapsed() > config.ping_timeout {
                        tracing::debug!("heartbeat timeout");
                        break Ended::Reconnect { at_once: false };
                    }
                } else if last_heard.elapsed() > heartbeat {
                    pinged = Some(Instant::now());
                    if ws.send(Message::Text(encode_ping(None).into())).await.is_err() {
                        break Ended::Reconnect { at_once: false };
                    }
                }
            }
        }
    };
    // Sent but unanswered: their outcome is unknown.
    for (_, reply) in requests.publishing {
        let _ = reply.send(Err(Error::Disconnected));
    }
    ended
}

fn deliver(sub: &mut Sub, data: Bytes, offset: Option<u64>, epoch: Option<Epoch>) {
    if let (Some(o), Some(p)) = (offset, sub.position.as_mut()) {
        // A resume replays from after the position: anything at or before it was
        // delivered already.
        if o <= p.offset {
            return;
        }
        p.offset = o;
        // Offset 1 names its epoch: a subscription made before the channel had any
        // publication (at a start) learns it here.
        if let Some(e) = epoch {
            p.epoch = e;
        }
    }
    sub.emit(Event::Message { data, offset });
}

/// A delta that did not apply (see [`on_text`]).
#[derive(Debug, thiserror::Error)]
#[error("a delta on {0} did not apply to the data held")]
struct BadDelta(ChannelName);

/// Handles a text frame. A delta that does not apply to the data held is an error:
/// the connection is dropped and the subscriptions resume (whole) from what was
/// delivered.
fn on_text(
    config: &Config,
    text: &str,
    subs: &mut HashMap<ChannelName, Sub>,
    requests: &mut Requests,
    made: &Made,
) -> Result<(), BadDelta> {
    // Deliveries are most frames: their `data` is handed on as the publisher's bytes,
    // not parsed and printed again.
    if let Some(d) = parse_text_delivery(text) {
        let Some((channel, sub)) = ChannelName::new(&d.channel)
            .ok()
            .and_then(|c| subs.get_mut(&c).map(|s| (c, s)))
        else {
            return Ok(());
        };
        let (data, base) = match (d.data, d.delta.as_deref(), d.offset) {
            (Some(data), _, _) => (Bytes::copy_from_slice(data.get().as_bytes()), None),
            // A delta before this subscription's `subscribed` belongs to an earlier one
            // (unsubscribed and subscribed again with frames still on their way): its
            // deliveries are not this one's.
            (None, Some(_), _) if !sub.active => return Ok(()),
            (None, Some(delta), Some(o)) => {
                let Some((_, base)) = sub.base.as_ref().filter(|(at, _)| at + 1 == o) else {
                    return Err(BadDelta(channel));
                };
                let data =
                    herald_protocol::delta::apply_fossil(base, delta.as_bytes(), MAX_DELTA_TARGET)
                        .map_err(|_| BadDelta(channel.clone()))?;
                let data = Bytes::from(data);
                (data.clone(), Some(data))
            }
            _ => return Err(BadDelta(channel)),
        };
        // The base is the last positioned text delivery the server sent, whether or not
        // it is handed on (a replayed one already delivered is not); a delivery without
        // an offset (published straight into Redis) leaves it.
        if let (true, Some(o)) = (config.delta, d.offset) {
            // A whole one's is the frame's raw text, whitespace around the value
            // included (which the value itself leaves out).
            let base = base.unwrap_or_else(|| {
                herald_protocol::server::raw_data(text, &d.channel)
                    .map_or_else(|| data.clone(), |r| Bytes::copy_from_slice(r.as_bytes()))
            });
            sub.base = Some((o, base));
        }
        deliver(
            sub,
            data,
            d.offset,
            d.epoch.as_deref().and_then(Epoch::parse),
        );
        return Ok(());
    }
    on_reply(config, text, subs, requests, made);
    Ok(())
}

/// Handles a text frame other than a delivery.
fn on_reply(
    config: &Config,
    text: &str,
    subs: &mut HashMap<ChannelName, Sub>,
    requests: &mut Requests,
    made: &Made,
) {
    let Some(r) = parse_reply(text) else {
        return;
    };
    let channel = r.channel.as_deref().and_then(|c| ChannelName::new(c).ok());
    let id = r.id;
    match r.op.as_ref() {
        "subscribed" => {
            if let Some(id) = id {
                requests.subscribing.remove(&id);
            }
            let Some(channel) = channel else { return };
            // Without an id, for a channel we do not hold: the backend subscribed us.
            if id.is_none() && !subs.contains_key(&channel) {
                adopt(config, subs, &channel, made);
            }
            let Some(sub) = subs.get_mut(&channel) else {
                return;
            };
            // Every subscribe starts whole: no delta applies to what came before.
            sub.base = None;
            if let Some(at) = r.position() {
                match sub.position.as_mut() {
                    // Resumed: the replay from our position follows this reply.
                    Some(_) if r.recovered == Some(true) => {}
                    // A delivery that raced ahead of this reply may be past it.
                    Some(p) if p.epoch == at.epoch => p.offset = p.offset.max(at.offset),
                    // New, or not recoverable: live deliveries continue from here.
                    _ => sub.position = Some(at),
                }
            }
            sub.active = true;
            sub.retry.reset();
            sub.emit(Event::Subscribed);
            if let Some(ok) = r.recovered {
                sub.emit(Event::Recovered(ok));
            }
        }
        // Before a binary delivery at offset 1: the epoch it begins, for a subscription
        // at a start (text deliveries name it themselves).
        "epoch" => {
            let Some(sub) = channel.and_then(|c| subs.get_mut(&c)) else {
                return;
            };
            let epoch = r.epoch.as_deref().and_then(Epoch::parse);
            if let (Some(p), Some(e)) = (sub.position.as_mut(), epoch) {
                if p.is_start() {
                    p.epoch = e;
                }
            }
        }
        "reset" => {
            let Some(sub) = channel.and_then(|c| subs.get_mut(&c)) else {
                return;
            };
            if let Some(at) = r.position() {
                sub.position = Some(at);
            }
            sub.emit(Event::Reset);
        }
        "join" | "leave" => {
            if let Some((join, channel, member)) = herald_protocol::presence::parse_event(text) {
                let sub = ChannelName::new(&channel)
                    .ok()
                    .and_then(|c| subs.get_mut(&c));
                if let Some(sub) = sub {
                    sub.emit(if join {
                        Event::Join(member)
                    } else {
                        Event::Leave(member)
                    });
                }
            }
        }
        // Without an id: the backend ended the subscription; it is not asked for again.
        "unsubscribed" if id.is_none() => {
            if let Some(mut sub) = channel.and_then(|c| subs.remove(&c)) {
                sub.emit(Event::Unsubscribed);
            }
        }
        // Requests answered with their frame: a publish, a presence question.
        "published" | "presence" | "presence_stats" | "result" => {
            if let Some(reply) = id.and_then(|id| requests.publishing.remove(&id)) {
                // The caller gets the reply as JSON (offset and epoch on history
                // channels).
                let _ = reply.send(Ok(serde_json::from_str(text).unwrap_or(Value::Null)));
            }
        }
        "error" => {
            let code = r.code.as_deref().unwrap_or("internal").to_owned();
            let message = r.message.as_deref().unwrap_or("").to_owned();
            let Some(id) = id else { return };
            if let Some(reply) = requests.publishing.remove(&id) {
                let _ = reply.send(Err(Error::Server { code, message }));
            } else if let Some(channel) = requests.subscribing.remove(&id) {
                // `unavailable` means "not now" (PROTOCOL.md): ask again with backoff.
                if code == "unavailable" {
                    if let Some(sub) = subs.get_mut(&channel) {
                        sub.emit(Event::Unavailable(message));
                        let at = tokio::time::Instant::now() + sub.retry.next_wait();
                        requests.retry.push((at, channel));
                    }
                } else if let Some(mut sub) = subs.remove(&channel) {
                    sub.emit(Event::Refused(format!("{code}: {message}")));
                }
            }
        }
        _ => {}
    }
}

/// Takes a subscription the server made as one of the client's, and hands its
/// [`Subscription`] to the application.
fn adopt(
    config: &Config,
    subs: &mut HashMap<ChannelName, Sub>,
    channel: &ChannelName,
    made: &Made,
) {
    let Some(commands) = made.commands.upgrade() else {
        return;
    };
    let listener = made
        .next_listener
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (tx, events) = mpsc::unbounded_channel();
    subs.insert(channel.clone(), Sub::new(config, listener, tx));
    let _ = made.out.send(Subscription {
        channel: channel.clone(),
        listener,
        events,
        commands,
    });
}

fn on_binary(frame: &Bytes, subs: &mut HashMap<ChannelName, Sub>) {
    let Some(d) = parse_binary_delivery(frame) else {
        return;
    };
    if let Some(sub) = subs.get_mut(&d.channel) {
        // (Deltas are between text deliveries only: after a binary one the server sends
        // whole, which sets the next base.)
        deliver(sub, d.payload, d.offset, None);
    }
}
