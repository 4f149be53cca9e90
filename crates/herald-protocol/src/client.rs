//! Parsing client frames.
//!
//! Text frames are JSON objects with an `op` field; binary frames are publications in
//! the layout `[1 byte L][L bytes channel name][payload]`. Unknown fields are ignored so
//! that later protocol additions stay compatible with older servers.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::channel::{ChannelName, InvalidChannel};
use crate::{Epoch, ErrorCode};

/// A well-formed client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Start receiving a channel's messages.
    Subscribe {
        /// Which channel.
        channel: ChannelName,
        /// Echoed in the reply.
        id: Option<u64>,
        /// The client tracks stream positions on this subscription (`"recover":true`, or
        /// implied by `since`): binary deliveries on history channels then carry their
        /// offset (see [`crate::server::encode_delivery`]).
        recover: bool,
        /// Resume after this position: deliver what was published since, then go live.
        since: Option<Since>,
        /// A subscription token for a channel the client's own token does not open.
        token: Option<String>,
        /// The client applies Fossil deltas on this subscription (`"delta":"fossil"`);
        /// the node sends them where the channel's rule allows (the `subscribed` reply
        /// says whether).
        delta: bool,
    },
    /// Stop receiving a channel's messages.
    Unsubscribe {
        /// Which channel.
        channel: ChannelName,
        /// Echoed in the reply.
        id: Option<u64>,
    },
    /// Publish JSON `data` to a channel.
    Publish {
        /// Which channel.
        channel: ChannelName,
        /// The raw JSON text of `data`, byte for byte as the client sent it.
        data: Bytes,
        /// Echoed in the reply.
        id: Option<u64>,
    },
    /// A new connection token before the current one expires.
    Refresh {
        /// The token (a JWT, never logged).
        token: String,
        /// Echoed in the reply.
        id: Option<u64>,
    },
    /// Application-level liveness check.
    Ping {
        /// Echoed in the reply.
        id: Option<u64>,
    },
    /// Who is present in a channel (one page).
    Presence {
        /// Which channel.
        channel: ChannelName,
        /// Echoed in the reply.
        id: Option<u64>,
        /// The previous page's `cursor`.
        cursor: Option<String>,
    },
    /// A channel's most recent publications (history channels).
    History {
        /// Which channel.
        channel: ChannelName,
        /// Echoed in the reply.
        id: Option<u64>,
        /// How many (the server caps it).
        limit: Option<u64>,
    },
    /// A call to the application's backend (`[hooks.rpc]`).
    Rpc {
        /// Echoed in the reply.
        id: Option<u64>,
        /// What to call (1-128 bytes).
        method: String,
        /// The raw JSON text of `data` (`null` when absent).
        data: Bytes,
    },
    /// How many connections and distinct users are present in a channel.
    PresenceStats {
        /// Which channel.
        channel: ChannelName,
        /// Echoed in the reply.
        id: Option<u64>,
    },
}

/// A position a client resumes from: `{"offset":41,"epoch":"Xk3f0a1b"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Since {
    /// The last offset the client received.
    pub offset: u64,
    /// The epoch it was in; `None` when the text is not an epoch this server could have
    /// issued (then the client cannot be resumed, and is told so).
    pub epoch: Option<Epoch>,
}

#[derive(Deserialize)]
struct RawSince<'a> {
    offset: u64,
    #[serde(borrow)]
    epoch: Cow<'a, str>,
}

/// A frame the server must answer with an error, keeping the connection open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    /// The request id, when it could be read.
    pub id: Option<u64>,
    /// What kind of error.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: Cow<'static, str>,
}

impl RequestError {
    fn new(id: Option<u64>, code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        RequestError {
            id,
            code,
            message: message.into(),
        }
    }

    fn channel(id: Option<u64>, e: InvalidChannel) -> Self {
        RequestError::new(id, ErrorCode::InvalidChannel, e.to_string())
    }
}

#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(borrow)]
    op: Option<Cow<'a, str>>,
    #[serde(borrow)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    /// Present with any JSON value, `null` included (a plain `Option` would turn
    /// `null` into "missing").
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    recover: Option<bool>,
    #[serde(borrow)]
    since: Option<RawSince<'a>>,
    #[serde(borrow)]
    token: Option<Cow<'a, str>>,
    #[serde(borrow)]
    cursor: Option<Cow<'a, str>>,
    limit: Option<u64>,
    #[serde(borrow)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow)]
    delta: Option<Cow<'a, str>>,
}

fn present<'de, D>(d: D) -> Result<Option<&'de RawValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    <&RawValue>::deserialize(d).map(Some)
}

impl Request {
    /// The request's `id`, echoed in its reply.
    pub fn id(&self) -> Option<u64> {
        match self {
            Request::Subscribe { id, .. }
            | Request::Unsubscribe { id, .. }
            | Request::Publish { id, .. }
            | Request::Refresh { id, .. }
            | Request::Presence { id, .. }
            | Request::PresenceStats { id, .. }
            | Request::History { id, .. }
            | Request::Rpc { id, .. }
            | Request::Ping { id } => *id,
        }
    }
}

/// Parses a text frame.
///
/// `text` is the whole frame; when it is a publish, `data` is sliced out of `frame`
/// (the same bytes, shared) instead of being copied.
pub fn parse_text(frame: &Bytes) -> Result<Request, RequestError> {
    let text = std::str::from_utf8(frame)
        .map_err(|_| RequestError::new(None, ErrorCode::BadRequest, "frame is not UTF-8"))?;
    // serde reads a struct from a JSON array too (by position): PROTOCOL.md says a
    // frame is an object, so anything else is refused before parsing.
    if !text.trim_start().starts_with('{') {
        return Err(RequestError::new(
            None,
            ErrorCode::BadRequest,
            "frame must be a JSON object with an op",
        ));
    }
    let raw: RawRequest<'_> = serde_json::from_str(text).map_err(|e| {
        RequestError::new(
            None,
            ErrorCode::BadRequest,
            format!("frame is not a JSON object of the expected shape: {e}"),
        )
    })?;
    let id = match raw.id {
        None => None,
        Some(v) => Some(v.get().parse::<u64>().map_err(|_| {
            RequestError::new(
                None,
                ErrorCode::BadRequest,
                "id must be an unsigned integer",
            )
        })?),
    };
    let op = raw
        .op
        .ok_or_else(|| RequestError::new(id, ErrorCode::BadRequest, "missing field op"))?;
    let channel = || -> Result<ChannelName, RequestError> {
        let c = raw
            .channel
            .as_deref()
            .ok_or_else(|| RequestError::new(id, ErrorCode::BadRequest, "missing field channel"))?;
        ChannelName::new(c).map_err(|e| RequestError::channel(id, e))
    };
    match &*op {
        "subscribe" => {
            let since = raw.since.map(|s| Since {
                offset: s.offset,
                epoch: Epoch::parse(&s.epoch),
            });
            let delta = match raw.delta.as_deref() {
                None => false,
                Some(crate::delta::FOSSIL) => true,
                Some(_) => {
                    return Err(RequestError::new(
                        id,
                        ErrorCode::BadRequest,
                        "delta: the one format is \"fossil\"",
                    ))
                }
            };
            Ok(Request::Subscribe {
                channel: channel()?,
                id,
                recover: raw.recover.unwrap_or(false) || since.is_some(),
                since,
                token: raw.token.map(Cow::into_owned),
                delta,
            })
        }
        "refresh" => Ok(Request::Refresh {
            token: raw
                .token
                .ok_or_else(|| RequestError::new(id, ErrorCode::BadRequest, "missing field token"))?
                .into_owned(),
            id,
        }),
        "unsubscribe" => Ok(Request::Unsubscribe {
            channel: channel()?,
            id,
        }),
        "publish" => {
            let channel = channel()?;
            let data = raw.data.ok_or_else(|| {
                RequestError::new(id, ErrorCode::BadRequest, "missing field data")
            })?;
            Ok(Request::Publish {
                channel,
                data: slice_of(frame, data.get().as_bytes()),
                id,
            })
        }
        "ping" => Ok(Request::Ping { id }),
        "presence" => Ok(Request::Presence {
            channel: channel()?,
            id,
            cursor: raw.cursor.map(Cow::into_owned),
        }),
        "rpc" => {
            let method = raw
                .method
                .filter(|m| (1..=128).contains(&m.len()))
                .ok_or_else(|| {
                    RequestError::new(id, ErrorCode::BadRequest, "method: 1-128 bytes of text")
                })?
                .into_owned();
            let data = match raw.data {
                Some(d) => slice_of(frame, d.get().as_bytes()),
                None => Bytes::from_static(b"null"),
            };
            Ok(Request::Rpc { id, method, data })
        }
        "history" => Ok(Request::History {
            channel: channel()?,
            id,
            limit: raw.limit,
        }),
        "presence_stats" => Ok(Request::PresenceStats {
            channel: channel()?,
            id,
        }),
        other => Err(RequestError::new(
            id,
            ErrorCode::BadRequest,
            format!("unknown op {:?}", truncate(other, 32)),
        )),
    }
}

/// Parses a binary frame `[1 byte L][L bytes channel][payload]` into the channel and
/// the payload (shared with `frame`, not copied).
pub fn parse_binary(frame: &Bytes) -> Result<(ChannelName, Bytes), RequestError> {
    let Some(&len) = frame.first() else {
        return Err(RequestError::new(
            None,
            ErrorCode::BadRequest,
            "binary frame is empty; expected [1 byte L][L bytes channel][payload]",
        ));
    };
    let end = 1 + len as usize;
    if frame.len() < end {
        return Err(RequestError::new(
            None,
            ErrorCode::BadRequest,
            "binary frame is shorter than its channel length byte says",
        ));
    }
    let channel =
        ChannelName::from_bytes(&frame[1..end]).map_err(|e| RequestError::channel(None, e))?;
    Ok((channel, frame.slice(end..)))
}

/// `{"op":"subscribe","channel":C,"id":N}`, with `"since":{"offset":O,"epoch":E}` when
/// resuming, as a client sends it (for Rust clients: the bench tool, tests).
pub fn encode_subscribe(
    channel: &ChannelName,
    id: Option<u64>,
    since: Option<crate::StreamPosition>,
) -> String {
    let mut s = format!(r#"{{"op":"subscribe","channel":"{channel}""#);
    if let Some(id) = id {
        s.push_str(&format!(r#","id":{id}"#));
    }
    if let Some(p) = since {
        s.push_str(&format!(
            r#","since":{{"offset":{},"epoch":"{}"}}"#,
            p.offset, p.epoch
        ));
    }
    s.push('}');
    s
}

/// `{"op":"subscribe","channel":C,"id":N,"recover":true}`, with `"since"` when
/// resuming: a subscribe that tracks stream positions (the SSE endpoint makes these for
/// its clients).
pub fn encode_resume(
    channel: &ChannelName,
    id: Option<u64>,
    since: Option<crate::StreamPosition>,
) -> String {
    let mut s = encode_subscribe(channel, id, since);
    s.insert_str(s.len() - 1, r#","recover":true"#);
    s
}

/// A subscribe frame (from [`encode_subscribe`] or [`encode_resume`]) that asks for
/// Fossil deltas (`"delta":"fossil"`).
pub fn with_delta(mut subscribe: String) -> String {
    subscribe.insert_str(subscribe.len() - 1, r#","delta":"fossil""#);
    subscribe
}

/// `{"op":"publish","channel":C,"data":D,"id":N}` as a client sends it; `data` is
/// JSON text, put in as it is (the caller serialised it). The channel is escaped, not
/// checked: the server answers a bad name with an error frame.
pub fn encode_publish(channel: &str, data: &str, id: Option<u64>) -> String {
    let channel = crate::server::json_string(channel);
    let mut s = format!(r#"{{"op":"publish","channel":{channel},"data":{data}"#);
    if let Some(id) = id {
        s.push_str(&format!(r#","id":{id}"#));
    }
    s.push('}');
    s
}

/// `{"op":"presence","channel":C,"id":N[,"cursor":K]}` (or `presence_stats`, which
/// takes no cursor) as a client sends it.
pub fn encode_presence(
    channel: &ChannelName,
    id: u64,
    cursor: Option<&str>,
    stats: bool,
) -> String {
    let op = if stats { "presence_stats" } else { "presence" };
    let mut s = format!(r#"{{"op":"{op}","channel":"{channel}","id":{id}"#);
    if let (Some(c), false) = (cursor, stats) {
        s.push_str(&format!(r#","cursor":{}"#, crate::server::json_string(c)));
    }
    s.push('}');
    s
}

/// `{"op":"rpc","id":N,"method":M,"data":D}` as a client sends it (`data`: JSON text).
pub fn encode_rpc(id: u64, method: &str, data: &str) -> String {
    format!(
        r#"{{"op":"rpc","id":{id},"method":{},"data":{data}}}"#,
        crate::server::json_string(method)
    )
}

/// `{"op":"history","channel":C,"id":N,"limit":L}` as a client sends it.
pub fn encode_history(channel: &ChannelName, id: u64, limit: u64) -> String {
    format!(r#"{{"op":"history","channel":"{channel}","id":{id},"limit":{limit}}}"#)
}

/// `{"op":"unsubscribe","channel":C,"id":N}` as a client sends it.
pub fn encode_unsubscribe(channel: &ChannelName, id: Option<u64>) -> String {
    let mut s = format!(r#"{{"op":"unsubscribe","channel":"{channel}""#);
    if let Some(id) = id {
        s.push_str(&format!(r#","id":{id}"#));
    }
    s.push('}');
    s
}

/// `{"op":"ping","id":N}` as a client sends it (the server answers `pong`).
pub fn encode_ping(id: Option<u64>) -> String {
    match id {
        Some(id) => format!(r#"{{"op":"ping","id":{id}}}"#),
        None => r#"{"op":"ping"}"#.to_owned(),
    }
}

/// `part` is a sub-slice of `whole`'s memory; share it instead of copying.
pub(crate) fn slice_of(whole: &Bytes, part: &[u8]) -> Bytes {
    // serde_json borrows `RawValue`s from the input when it needs no unescaping, which
    // is always the case for a raw value; fall back to a copy if that ever changes.
    let start = part.as_ptr() as usize;
    let base = whole.as_ptr() as usize;
    if start >= base && start + part.len() <= base + whole.len() {
        whole.slice(start - base..start - base + part.len())
    } else {
        Bytes::copy_from_slice(part)
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Request, RequestError> {
        parse_text(&Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn ops() {
        assert_eq!(
            parse(r#"{"op":"subscribe","channel":"news","id":1}"#).unwrap(),
            Request::Subscribe {
                channel: ChannelName::new("news").unwrap(),
                id: Some(1),
                recover: false,
                since: None,
                token: None,
                delta: false,
            }
        );
        assert_eq!(
            parse(r#"{"op":"subscribe","channel":"n","since":{"offset":41,"epoch":"0000000a"}}"#)
                .unwrap(),
            Request::Subscribe {
                channel: ChannelName::new("n").unwrap(),
                id: None,
                recover: true,
                since: Some(Since {
                    offset: 41,
                    epoch: Epoch::new(10)
                }),
                token: None,
                delta: false,
            }
        );
        // An epoch this server could not have issued is no error: the resume fails.
        match parse(r#"{"op":"subscribe","channel":"n","since":{"offset":1,"epoch":"?"}}"#) {
            Ok(Request::Subscribe { since, .. }) => assert_eq!(since.unwrap().epoch, None),
            other => panic!("{other:?}"),
        }
        assert!(
            parse(r#"{"op":"subscribe","channel":"n","since":{"offset":-1,"epoch":"a"}}"#).is_err()
        );
        assert_eq!(
            parse(r#"{"op":"ping"}"#).unwrap(),
            Request::Ping { id: None }
        );
        match parse(r#"{"op":"publish","channel":"c","data": {"a" : [1, 2]} ,"id":7}"#).unwrap() {
            Request::Publish { data, id, .. } => {
                assert_eq!(&data[..], br#"{"a" : [1, 2]}"#);
                assert_eq!(id, Some(7));
            }
            other => panic!("{other:?}"),
        }
        // null is data like any other JSON value (as over HTTP).
        match parse(r#"{"op":"publish","channel":"c","data":null,"id":8}"#).unwrap() {
            Request::Publish { data, id, .. } => {
                assert_eq!((&data[..], id), (&b"null"[..], Some(8)))
            }
            other => panic!("{other:?}"),
        }
        let e = parse(r#"{"op":"publish","channel":"c","id":9}"#).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(9)));
    }

    #[test]
    fn tokens() {
        match parse(r#"{"op":"subscribe","channel":"private:x","token":"a.b.c","id":2}"#) {
            Ok(Request::Subscribe { token, id, .. }) => {
                assert_eq!((token.as_deref(), id), (Some("a.b.c"), Some(2)))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse(r#"{"op":"refresh","token":"t","id":3}"#).unwrap(),
            Request::Refresh {
                token: "t".into(),
                id: Some(3)
            }
        );
        let e = parse(r#"{"op":"refresh","id":4}"#).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(4)));
    }

    #[test]
    fn errors_keep_the_id_when_readable() {
        let e = parse(r#"{"op":"dance","id":3}"#).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(3)));
        let e = parse(r#"{"op":"subscribe","channel":"a b","id":4}"#).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::InvalidChannel, Some(4)));
        let e = parse(r#"{"op":"subscribe","id":5}"#).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(5)));
        let e = parse(r#"{"op":"ping","id":-1}"#).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, None));
        let e = parse("not json").unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        let e = parse(r#"[1,2]"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        // An array that would fill the fields by position is not a request either.
        let e = parse(r#"["subscribe","news",1,null]"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        let e = parse(r#" "op" "#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
    }

    #[test]
    fn a_subscribe_may_ask_for_fossil_deltas_and_nothing_else() {
        let news = ChannelName::new("news").unwrap();
        let frame = with_delta(encode_resume(&news, Some(3), None));
        assert!(matches!(
            parse_text(&Bytes::from(frame)).unwrap(),
            Request::Subscribe {
                delta: true,
                recover: true,
                id: Some(3),
                ..
            }
        ));
        let e = parse(r#"{"op":"subscribe","channel":"n","id":4,"delta":"zstd"}"#).unwrap_err();
        assert_eq!((e.id, e.code), (Some(4), ErrorCode::BadRequest));
        assert!(parse(r#"{"op":"subscribe","channel":"n","delta":true}"#).is_err());
    }

    #[test]
    fn encoded_resume_tracks_positions() {
        let news = ChannelName::new("news").unwrap();
        match parse_text(&Bytes::from(encode_resume(&news, Some(2), None))).unwrap() {
            Request::Subscribe {
                recover, since, id, ..
            } => {
                assert_eq!((recover, since, id), (true, None, Some(2)))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn encoded_subscribe_parses_back() {
        let news = ChannelName::new("news").unwrap();
        let frame = Bytes::from(encode_subscribe(&news, Some(7), None));
        assert_eq!(
            parse_text(&frame).unwrap(),
            Request::Subscribe {
                channel: news.clone(),
                id: Some(7),
                recover: false,
                since: None,
                token: None,
                delta: false,
            }
        );
        let at = crate::StreamPosition {
            offset: 9,
            epoch: Epoch::new(5).unwrap(),
        };
        let frame = Bytes::from(encode_subscribe(&news, None, Some(at)));
        match parse_text(&frame).unwrap() {
            Request::Subscribe { since, .. } => assert_eq!(
                since,
                Some(Since {
                    offset: 9,
                    epoch: Some(at.epoch)
                })
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn binary_layout() {
        let mut f = vec![4u8];
        f.extend_from_slice(b"news");
        f.extend_from_slice(&[0, 255, 1]);
        let (c, p) = parse_binary(&Bytes::from(f)).unwrap();
        assert_eq!(c.as_str(), "news");
        assert_eq!(&p[..], &[0, 255, 1]);
        assert!(parse_binary(&Bytes::from_static(&[9, b'a'])).is_err());
        assert!(parse_binary(&Bytes::new()).is_err());
        assert_eq!(
            parse_binary(&Bytes::from_static(&[1, b' ']))
                .unwrap_err()
                .code,
            ErrorCode::InvalidChannel
        );
    }

    #[test]
    fn rust_clients_frames_parse_back() {
        let c = ChannelName::new("chat:1").unwrap();
        let f = Bytes::from(encode_publish(c.as_str(), r#"{"a":[1,"x"]}"#, Some(3)));
        assert!(matches!(
            parse_text(&f),
            Ok(Request::Publish { channel, id: Some(3), .. }) if channel == c
        ));
        let f = Bytes::from(encode_unsubscribe(&c, None));
        assert!(matches!(
            parse_text(&f),
            Ok(Request::Unsubscribe { id: None, .. })
        ));
        let f = Bytes::from(encode_ping(Some(9)));
        assert!(matches!(parse_text(&f), Ok(Request::Ping { id: Some(9) })));
    }
}
