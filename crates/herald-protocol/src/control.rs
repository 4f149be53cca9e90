//! The control plane: what nodes tell each other through the broker, and the bodies of
//! the HTTP control API (`/api/disconnect`, `/api/subscribe`, `/api/unsubscribe`,
//! `/api/channels`, `/api/info`).
//!
//! Every node listens on one internal channel, [`control_channel`], and on a reply
//! channel of its own (a random name it announces). On the control channel a node says
//! it is alive every `control.heartbeat_interval` ([`ControlMessage::Alive`]) and that it
//! leaves when it drains ([`ControlMessage::Gone`]): that is how each node knows the
//! cluster. A call that needs every node is a **survey**: the asking node publishes an
//! [`ControlMessage::Ask`] on the control channel (it reaches every node, the asker
//! included), each node acts on its own connections and publishes its
//! [`ControlMessage::Answer`] on the asker's reply channel, and the asker waits for every
//! node it knows until `control.survey_timeout`; the reply names those that did not
//! answer (`missing`).
//!
//! These messages are JSON publications on internal channels (`$`-prefixed names that no
//! client, rule or API caller can use), so they travel every broker the way
//! publications do. They are between nodes of one cluster, which may run different
//! releases during a rolling update: fields are only ever added, and unknown ones are
//! ignored.

use serde::{Deserialize, Serialize};

use crate::api::BodyError;
use crate::client::Since;
use crate::{close, ChannelName, ChannelPattern, Epoch, ErrorCode};

/// The control channel every node listens on (an internal name).
pub fn control_channel() -> ChannelName {
    ChannelName::internal("herald.control").expect("a valid internal name")
}

/// The channel presence changes travel on between nodes ([`ControlMessage::Presence`]).
pub fn presence_channel() -> ChannelName {
    ChannelName::internal("herald.presence").expect("a valid internal name")
}

/// A reply channel for a node: `token` is random per process, so that a restarted node
/// never receives answers meant for its previous life.
pub fn reply_channel(token: u64) -> ChannelName {
    ChannelName::internal(&format!("herald.reply.{token:016x}")).expect("a valid internal name")
}

/// What nodes tell each other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlMessage {
    /// "I am here": sent at start and every heartbeat interval.
    Alive {
        /// The node's id.
        node: String,
    },
    /// "I am leaving" (a drain began): stop expecting my answers.
    Gone {
        /// The node's id.
        node: String,
    },
    /// A survey: act on `command` and answer on `reply`.
    Ask {
        /// The survey's id (unique for the asker).
        id: u64,
        /// The asker's reply channel (its name without the `$`).
        reply: String,
        /// What to do.
        command: Command,
    },
    /// Someone joined or left a channel: every node pushes the `join`/`leave` frame to
    /// its local subscribers of the channel (sent on [`presence_channel`]).
    Presence {
        /// The channel.
        channel: String,
        /// Joined (else left).
        join: bool,
        /// Who.
        member: crate::presence::Member,
    },
    /// One node's answer to a survey.
    Answer {
        /// The survey's id.
        id: u64,
        /// The answering node.
        node: String,
        /// What it did or found.
        answer: Answer,
    },
}

impl ControlMessage {
    /// The message as the JSON a publication carries.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("control messages serialize")
    }

    /// Reads a control publication's JSON; `None` for anything else (a message from a
    /// newer release with a type this one does not know is ignored, not an error).
    pub fn parse(json: &[u8]) -> Option<ControlMessage> {
        serde_json::from_slice(json).ok()
    }
}

/// Which connections a command is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Every connection of this user (the token's `sub`).
    User(String),
    /// One connection, by the id its welcome frame announced (`conn`).
    Conn(String),
}

/// A position to resume from, as JSON carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// The last offset the client has.
    pub offset: u64,
    /// Its epoch.
    pub epoch: String,
}

impl Position {
    /// As a subscribe's `since`.
    pub fn since(&self) -> Since {
        Since {
            offset: self.offset,
            epoch: Epoch::parse(&self.epoch),
        }
    }
}

/// What a survey asks every node to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// Close the target's connections with `code` and `reason`, except those in `keep`.
    Disconnect {
        /// Whose connections.
        target: Target,
        /// The close code (4000-4999).
        code: u16,
        /// The close reason (at most 123 bytes).
        reason: String,
        /// Connection ids left open (e.g. the device that stays signed in).
        #[serde(default)]
        keep: Vec<String>,
    },
    /// Subscribe the target's connections to `channel` (server-side).
    Subscribe {
        /// Whose connections.
        target: Target,
        /// The channel.
        channel: String,
        /// Where to resume from on a history channel.
        #[serde(default)]
        since: Option<Position>,
    },
    /// Unsubscribe the target's connections from `channel`.
    Unsubscribe {
        /// Whose connections.
        target: Target,
        /// The channel.
        channel: String,
    },
    /// Report local channels (matching `pattern`) with their subscriber counts.
    Channels {
        /// A channel pattern (`news:*`); none: every channel.
        #[serde(default)]
        pattern: Option<String>,
    },
    /// Report this node's state.
    Info,
}

impl Command {
    /// A short name, for metrics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Disconnect { .. } => "disconnect",
            Command::Subscribe { .. } => "subscribe",
            Command::Unsubscribe { .. } => "unsubscribe",
            Command::Channels { .. } => "channels",
            Command::Info => "info",
        }
    }
}

/// One node's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// How many of its connections the command acted on.
    Affected {
        /// Connections acted on.
        connections: u64,
    },
    /// Its channels (matching the pattern) and their local subscriber counts.
    Channels {
        /// The channels.
        channels: Vec<ChannelCount>,
    },
    /// Its state.
    Info(NodeInfo),
}

/// A channel and how many connections subscribe to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelCount {
    /// The channel.
    pub channel: String,
    /// Its subscribers (on one node, or summed over the cluster).
    pub subscribers: u64,
}

/// One node's state, as `GET /api/info` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's id.
    pub node: String,
    /// Its release.
    pub version: String,
    /// Seconds since it started.
    pub uptime_s: u64,
    /// Open connections.
    pub connections: u64,
    /// Subscriptions held by them.
    pub subscriptions: u64,
    /// Channels with a local subscriber.
    pub channels: u64,
    /// The broker: `memory` or `redis`, and whether it is up.
    pub broker: String,
    /// Whether the broker is up.
    pub broker_up: bool,
    /// Whether the node is draining.
    pub draining: bool,
}

/// The default close code of `POST /api/disconnect`: do not reconnect.
pub const DEFAULT_DISCONNECT_CODE: u16 = close::DISCONNECTED;
/// The longest close reason a WebSocket close frame carries, in bytes.
pub const MAX_REASON: usize = 123;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetBody {
    user: Option<String>,
    conn: Option<String>,
    code: Option<u16>,
    reason: Option<String>,
    #[serde(default)]
    keep: Vec<String>,
    channel: Option<String>,
    since: Option<Position>,
}

fn bad(message: impl Into<String>) -> BodyError {
    BodyError {
        code: ErrorCode::BadRequest,
        message: message.into(),
    }
}

fn parse_target(body: &[u8]) -> Result<(TargetBody, Target), BodyError> {
    let b: TargetBody = serde_json::from_slice(body).map_err(|e| bad(format!("{e}")))?;
    let target = match (&b.user, &b.conn) {
        (Some(u), None) if !u.is_empty() => Target::User(u.clone()),
        (None, Some(c)) if !c.is_empty() => Target::Conn(c.clone()),
        (Some(_), Some(_)) => return Err(bad("give \"user\" or \"conn\", not both")),
        _ => return Err(bad("\"user\" or \"conn\" (a non-empty string) is required")),
    };
    Ok((b, target))
}

fn channel_of(b: &TargetBody) -> Result<String, BodyError> {
    let Some(c) = &b.channel else {
        return Err(bad("\"channel\" is required"));
    };
    ChannelName::new(c).map_err(|e| BodyError {
        code: ErrorCode::InvalidChannel,
        message: e.to_string(),
    })?;
    Ok(c.clone())
}

/// `POST /api/disconnect`: `{"user":U}` or `{"conn":C}`, optionally `"code"` (4000-4999,
/// default 4400: do not reconnect), `"reason"` (at most 123 bytes) and `"keep"` (ids of
/// connections to leave open).
pub fn parse_disconnect(body: &[u8]) -> Result<Command, BodyError> {
    let (b, target) = parse_target(body)?;
    if b.channel.is_some() || b.since.is_some() {
        return Err(bad("disconnect takes no \"channel\" or \"since\""));
    }
    let code = b.code.unwrap_or(DEFAULT_DISCONNECT_CODE);
    if !(4000..=4999).contains(&code) {
        return Err(bad(format!(
            "\"code\" must be within 4000-4999 (4000-4399: the client reconnects; 4400-4499: it does not), not {code}"
        )));
    }
    let reason = b.reason.unwrap_or_else(|| "disconnected".to_owned());
    if reason.len() > MAX_REASON {
        return Err(bad(format!(
            "\"reason\" is {} bytes; a close frame carries at most {MAX_REASON}",
            reason.len()
        )));
    }
    Ok(Command::Disconnect {
        target,
        code,
        reason,
        keep: b.keep,
    })
}

/// `POST /api/subscribe`: `{"user"|"conn", "channel"}`, optionally `"since"`
/// (`{"offset":O,"epoch":E}`).
pub fn parse_subscribe(body: &[u8]) -> Result<Command, BodyError> {
    let (b, target) = parse_target(body)?;
    if b.code.is_some() || b.reason.is_some() || !b.keep.is_empty() {
        return Err(bad("subscribe takes no \"code\", \"reason\" or \"keep\""));
    }
    if b.since.as_ref().is_some_and(|p| p.since().epoch.is_none()) {
        return Err(bad(
            "since.epoch is not an epoch this server could have issued",
        ));
    }
    Ok(Command::Subscribe {
        channel: channel_of(&b)?,
        target,
        since: b.since,
    })
}

/// `POST /api/unsubscribe`: `{"user"|"conn", "channel"}`.
pub fn parse_unsubscribe(body: &[u8]) -> Result<Command, BodyError> {
    let (b, target) = parse_target(body)?;
    if b.code.is_some() || b.reason.is_some() || !b.keep.is_empty() || b.since.is_some() {
        return Err(bad(
            "unsubscribe takes no \"code\", \"reason\", \"keep\" or \"since\"",
        ));
    }
    Ok(Command::Unsubscribe {
        channel: channel_of(&b)?,
        target,
    })
}

/// The most channels one `GET /api/channels` page holds.
pub const MAX_CHANNELS_PAGE: usize = 1000;

/// `GET /api/channels?pattern=P&cursor=C&limit=N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelsQuery {
    /// Only channels matching this pattern.
    pub pattern: Option<String>,
    /// Only channels after this one (the previous page's `cursor`).
    pub cursor: Option<String>,
    /// At most this many (default 100, at most [`MAX_CHANNELS_PAGE`]).
    pub limit: usize,
}

/// Parses `GET /api/channels`'s query string.
pub fn parse_channels_query(query: &str) -> Result<ChannelsQuery, BodyError> {
    let mut q = ChannelsQuery {
        pattern: None,
        cursor: None,
        limit: 100,
    };
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "pattern" => {
                ChannelPattern::new(&v).map_err(|e| bad(format!("pattern: {e}")))?;
                q.pattern = Some(v.into_owned());
            }
            "cursor" => q.cursor = Some(v.into_owned()),
            "limit" => {
                q.limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_CHANNELS_PAGE).contains(n))
                    .ok_or_else(|| bad(format!("limit must be 1-{MAX_CHANNELS_PAGE}")))?
            }
            other => return Err(bad(format!("unknown parameter {other:?}"))),
        }
    }
    Ok(q)
}

/// The reply of a control call that acts on connections:
/// `{"ok":true,"connections":N,"missing":[..]}`.
#[derive(Debug, Serialize)]
pub struct AffectedReply<'a> {
    /// Always true (failures are HTTP errors).
    pub ok: bool,
    /// Connections acted on, cluster-wide.
    pub connections: u64,
    /// Nodes that did not answer in time (their connections are not counted, and may or
    /// may not have been acted on).
    pub missing: &'a [String],
}

/// `GET /api/channels`: `{"channels":[..],"cursor":C,"missing":[..]}`.
#[derive(Debug, Serialize)]
pub struct ChannelsReply<'a> {
    /// This page.
    pub channels: &'a [ChannelCount],
    /// Pass as `cursor` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<&'a str>,
    /// Nodes that did not answer in time.
    pub missing: &'a [String],
}

/// `GET /api/info`: `{"nodes":[..],"missing":[..]}`.
#[derive(Debug, Serialize)]
pub struct InfoReply<'a> {
    /// Every node that answered, by id.
    pub nodes: &'a [NodeInfo],
    /// Nodes known to be in the cluster that did not answer in time.
    pub missing: &'a [String],
}

/// Serializes a reply body.
pub fn to_json<T: Serialize>(reply: &T) -> String {
    serde_json::to_string(reply).expect("replies serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_unknown_ones_are_ignored() {
        let ask = ControlMessage::Ask {
            id: 7,
            reply: "herald.reply.00000000000000ff".into(),
            command: Command::Disconnect {
                target: Target::User("alice".into()),
                code: 4400,
                reason: "banned".into(),
                keep: vec!["n1-2".into()],
            },
        };
        assert_eq!(ControlMessage::parse(ask.to_json().as_bytes()), Some(ask));
        assert_eq!(
            ControlMessage::parse(br#"{"type":"from_the_future"}"#),
            None
        );
        // A newer node's extra field is ignored.
        assert_eq!(
            ControlMessage::parse(br#"{"type":"alive","node":"a","zone":"eu"}"#),
            Some(ControlMessage::Alive { node: "a".into() })
        );
    }

    #[test]
    fn disconnect_bodies() {
        let c = parse_disconnect(br#"{"user":"u"}"#).unwrap();
        assert!(matches!(c, Command::Disconnect { code: 4400, .. }));
        for bad in [
            &br#"{}"#[..],
            br#"{"user":"u","conn":"c"}"#,
            br#"{"user":""}"#,
            br#"{"user":"u","code":1000}"#,
            br#"{"user":"u","code":5000}"#,
            br#"{"user":"u","channel":"x"}"#,
            br#"{"user":"u","surprise":1}"#,
            br#"not json"#,
        ] {
            let e = parse_disconnect(bad).unwrap_err();
            assert_eq!(
                e.code,
                ErrorCode::BadRequest,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!(r#"{{"conn":"c","reason":"{}"}}"#, "x".repeat(124));
        assert!(parse_disconnect(long.as_bytes()).is_err());
    }

    #[test]
    fn subscribe_bodies() {
        let c = parse_subscribe(
            br#"{"conn":"n-1","channel":"h:1","since":{"offset":3,"epoch":"0k3f9a2b"}}"#,
        )
        .unwrap();
        assert!(matches!(c, Command::Subscribe { since: Some(_), .. }));
        assert!(parse_subscribe(
            br#"{"conn":"n-1","channel":"h:1","since":{"offset":1,"epoch":"!!"}}"#
        )
        .is_err());
        assert_eq!(
            parse_subscribe(br#"{"conn":"n-1","channel":"bad channel"}"#)
                .unwrap_err()
                .code,
            ErrorCode::InvalidChannel
        );
        assert_eq!(
            parse_unsubscribe(br#"{"user":"u","channel":"$herald.control"}"#)
                .unwrap_err()
                .code,
            ErrorCode::InvalidChannel,
            "internal channels are not a caller's to name"
        );
        assert!(parse_unsubscribe(br#"{"user":"u"}"#).is_err());
    }

    #[test]
    fn channels_queries() {
        let q = parse_channels_query("pattern=news%3A%2A&limit=5").unwrap();
        assert_eq!(q.pattern.as_deref(), Some("news:*"));
        assert!(parse_channels_query("pattern=a%20b").is_err());
        let q = parse_channels_query("pattern=news:%2A&limit=5&cursor=news:b").unwrap();
        assert_eq!(q.pattern.as_deref(), Some("news:*"));
        assert_eq!((q.limit, q.cursor.as_deref()), (5, Some("news:b")));
        assert!(parse_channels_query("limit=0").is_err());
        assert!(parse_channels_query("limit=1001").is_err());
        assert!(parse_channels_query("colour=red").is_err());
    }
}
