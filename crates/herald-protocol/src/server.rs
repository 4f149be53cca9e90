//! Encoding server frames.
//!
//! Every function returns the finished frame payload. Text frames are returned as
//! `String`s (valid UTF-8 by construction) and binary frames as `Bytes`; the gateway
//! wraps them in WebSocket messages without copying.

use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};

use crate::{ErrorCode, Payload, Publication, StreamPosition, RELEASE, VERSION};

/// `{"op":"welcome","version":1,"server":"0.1.0","node":N,"conn":C,"heartbeat_ms":H}`:
/// the first frame of every session (`version`: the protocol's; `server`: the release). With a verified token (or a user the connect hook named), `"user"` carries it; `"data"` carries the connect hook's data, if it gave any. `heartbeat_ms`
/// is the server's heartbeat interval: a client that has heard nothing for about that
/// long plus a margin should send `{"op":"ping"}` and, without an answer, reconnect
/// (browsers answer WebSocket pings without telling the page).
pub fn welcome(
    node: &str,
    conn: &str,
    user: Option<&str>,
    heartbeat_ms: u64,
    data: Option<&str>,
) -> String {
    let user = user.map_or(String::new(), |u| format!(r#","user":{}"#, json_string(u)));
    // `data` is JSON text (the connect hook's), inserted as is.
    let data = data.map_or(String::new(), |d| format!(r#","data":{d}"#));
    format!(
        r#"{{"op":"welcome","version":{VERSION},"server":"{RELEASE}","node":{},"conn":{}{user},"heartbeat_ms":{heartbeat_ms}{data}}}"#,
        json_string(node),
        json_string(conn)
    )
}

/// The reply to a successful subscribe, unsubscribe or publish: `{"op":OP,"channel":C,"id":N}`.
pub fn ack(op: Ack, channel: &str, id: Option<u64>) -> String {
    let mut s = String::with_capacity(48 + channel.len());
    // Channel names are restricted to characters that need no JSON escaping.
    let _ = write!(s, r#"{{"op":"{}","channel":"{}""#, op.as_str(), channel);
    push_id(&mut s, id);
    s.push('}');
    s
}

/// `{"op":"subscribed","channel":C,"id":N,"offset":O,"epoch":E[,"recovered":R][,"delta":"fossil"]}`:
/// the reply to a subscribe on a history channel. `position` is the stream's at
/// subscribe time; `recovered` is there when the client asked to resume (`since`);
/// `delta` when deliveries may come as Fossil deltas ([`delta_delivery`]).
pub fn subscribed(
    channel: &str,
    id: Option<u64>,
    position: StreamPosition,
    recovered: Option<bool>,
    delta: bool,
) -> String {
    let mut s = ack(Ack::Subscribed, channel, id);
    s.pop();
    push_position(&mut s, position);
    if let Some(r) = recovered {
        let _ = write!(s, r#","recovered":{r}"#);
    }
    if delta {
        s.push_str(r#","delta":"fossil""#);
    }
    s.push('}');
    s
}

/// `{"op":"subscribed","channel":C,"id":N[,"delta":"fossil"]}`: the reply to a
/// subscribe of a channel the connection already holds, whose subscription has no
/// position to vouch for yet. The next delivery is whole, as after every `subscribed`.
pub fn subscribed_again(channel: &str, id: Option<u64>, delta: bool) -> String {
    let mut s = ack(Ack::Subscribed, channel, id);
    if delta {
        s.insert_str(s.len() - 1, r#","delta":"fossil""#);
    }
    s
}

/// `{"op":"message","channel":C,"delta":D,"offset":O}`: the publication at `offset`,
/// as the Fossil delta (`D`, a JSON string) that turns the subscriber's previous
/// delivery on this channel (offset `O - 1`, always a full or delta text delivery) into
/// this one's `data`, byte for byte. Only on subscriptions whose `subscribed` said
/// `"delta":"fossil"`.
pub fn delta_delivery(channel: &str, offset: u64, delta: &str) -> String {
    let delta = json_string(delta);
    let mut s = String::with_capacity(56 + channel.len() + delta.len());
    let _ = write!(
        s,
        r#"{{"op":"message","channel":"{channel}","delta":{delta},"offset":{offset}}}"#
    );
    s
}

/// The publisher's bytes inside a text `message` frame from [`encode_delivery`] on a
/// history channel: the text between `"data":` and the `,"offset":` after it. This is
/// what a delta's base is; clients without a raw JSON reader (browsers) take it so.
pub fn raw_data<'a>(frame: &'a str, channel: &str) -> Option<&'a str> {
    let rest = frame
        .strip_prefix(r#"{"op":"message","channel":""#)?
        .strip_prefix(channel)?
        .strip_prefix(r#"","data":"#)?;
    // The last `,"offset":`: the data may hold the same text, what follows it never does.
    Some(&rest[..rest.rfind(r#","offset":"#)?])
}

/// `{"op":"reset","channel":C,"offset":O,"epoch":E}`: the node could not deliver every
/// publication of a history channel to this subscriber (the channel's history was reset
/// or lost, or a gap could not be repaired). The client should reload its state from
/// the application and continue from this position; the next delivery is `O + 1`.
pub fn reset(channel: &str, position: StreamPosition) -> String {
    let mut s = String::with_capacity(64 + channel.len());
    let _ = write!(s, r#"{{"op":"reset","channel":"{channel}""#);
    push_position(&mut s, position);
    s.push('}');
    s
}

fn push_position(s: &mut String, p: StreamPosition) {
    let _ = write!(s, r#","offset":{},"epoch":"{}""#, p.offset, p.epoch);
}

/// Which request an [`ack`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// A subscribe succeeded.
    Subscribed,
    /// An unsubscribe succeeded (also when the client was not subscribed).
    Unsubscribed,
    /// A publish was handed to the broker.
    Published,
}

impl Ack {
    fn as_str(self) -> &'static str {
        match self {
            Ack::Subscribed => "subscribed",
            Ack::Unsubscribed => "unsubscribed",
            Ack::Published => "published",
        }
    }
}

/// `{"op":"refreshed","id":N,"expires":EXP}`: the connection now runs on a new token
/// that expires at `expires` (seconds since the Unix epoch).
pub fn refreshed(id: Option<u64>, expires: u64) -> String {
    let mut s = String::from(r#"{"op":"refreshed""#);
    push_id(&mut s, id);
    let _ = write!(s, r#","expires":{expires}}}"#);
    s
}

/// `{"op":"result","id":N,"data":D}`: the backend's answer to an `rpc` (`data` is its
/// JSON text, as it came).
pub fn result(id: Option<u64>, data: &str) -> String {
    let mut s = String::from(r#"{"op":"result""#);
    push_id(&mut s, id);
    let _ = write!(s, r#","data":{data}}}"#);
    s
}

/// `{"op":"error","id":N,"code":"refused","hook_code":C,"message":M}`: the backend
/// refused the request.
pub fn refused(id: Option<u64>, hook_code: i64, message: &str) -> String {
    let mut s = String::from(r#"{"op":"error""#);
    push_id(&mut s, id);
    let _ = write!(
        s,
        r#","code":"refused","hook_code":{hook_code},"message":{}}}"#,
        json_string(message)
    );
    s
}

/// `{"op":"pong","id":N}`.
pub fn pong(id: Option<u64>) -> String {
    let mut s = String::from(r#"{"op":"pong""#);
    push_id(&mut s, id);
    s.push('}');
    s
}

/// `{"op":"error","id":N,"code":CODE,"message":TEXT}`.
pub fn error(id: Option<u64>, code: ErrorCode, message: &str) -> String {
    let mut s = String::from(r#"{"op":"error""#);
    push_id(&mut s, id);
    let _ = write!(
        s,
        r#","code":"{}","message":{}}}"#,
        code.as_str(),
        json_string(message)
    );
    s
}

/// A delivery frame, encoded once per node and shared by every subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// `{"op":"message","channel":C,"data":D}` as a text frame, with `,"offset":O`
    /// before the closing brace on history channels (and `,"epoch":E` after it at
    /// offset 1).
    Text(String),
    /// `[1 byte L][L bytes channel][payload]` as a binary frame.
    Binary(Bytes),
}

/// Encodes a publication for delivery to subscribers. Binary publications on history
/// channels are encoded here without their offset; subscribers that track positions get
/// [`binary_frame_with_offset`] instead.
pub fn encode_delivery(p: &Publication) -> Delivery {
    let channel = p.channel.as_str();
    match &p.payload {
        Payload::Json(data) => {
            // The broker only carries payloads that were checked to be JSON text, which is
            // UTF-8; a payload that somehow is not gets delivered as a JSON string of its
            // lossy text rather than as a broken frame.
            let data = match std::str::from_utf8(data) {
                Ok(s) => std::borrow::Cow::Borrowed(s),
                Err(_) => std::borrow::Cow::Owned(json_string(&String::from_utf8_lossy(data))),
            };
            let mut s = String::with_capacity(64 + channel.len() + data.len());
            s.push_str(r#"{"op":"message","channel":""#);
            s.push_str(channel);
            s.push_str(r#"","data":"#);
            s.push_str(&data);
            if let Some(pos) = p.position {
                let _ = write!(s, r#","offset":{}"#, pos.offset);
                // The first publication of an epoch names it: a subscriber that joined
                // before the channel had any (position `START`) learns it here.
                if pos.offset == 1 {
                    let _ = write!(s, r#","epoch":"{}""#, pos.epoch);
                }
            }
            s.push('}');
            Delivery::Text(s)
        }
        Payload::Binary(data) => Delivery::Binary(binary_frame(channel, data)),
    }
}

/// A text `message` frame as a client reads it (see [`parse_text_delivery`]).
#[derive(Debug, serde::Deserialize)]
pub struct TextDelivery<'a> {
    /// The channel it was published on.
    #[serde(borrow)]
    pub channel: std::borrow::Cow<'a, str>,
    /// The publisher's JSON, byte for byte (whitespace and key order kept); absent
    /// from a delta delivery.
    #[serde(borrow, default)]
    pub data: Option<&'a serde_json::value::RawValue>,
    /// A delta delivery's Fossil delta against the previous delivery's data
    /// ([`delta_delivery`]).
    #[serde(borrow, default)]
    pub delta: Option<std::borrow::Cow<'a, str>>,
    /// Its position in the channel's stream, on history channels.
    #[serde(default)]
    pub offset: Option<u64>,
    /// The epoch, on the first publication of one (offset 1).
    #[serde(default, borrow)]
    pub epoch: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    op: std::borrow::Cow<'a, str>,
}

/// Reads a text frame that is a `message` delivery, without re-encoding its `data`;
/// `None` for every other frame.
pub fn parse_text_delivery(text: &str) -> Option<TextDelivery<'_>> {
    serde_json::from_str::<TextDelivery<'_>>(text)
        .ok()
        .filter(|d| d.op == "message" && (d.data.is_some() || d.delta.is_some()))
}

/// Builds `[1 byte L][L bytes channel][payload]`. `channel` must be a valid channel
/// name, so `L` fits in a byte.
pub fn binary_frame(channel: &str, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(1 + channel.len() + payload.len());
    b.put_u8(channel.len() as u8);
    b.put_slice(channel.as_bytes());
    b.put_slice(payload);
    b.freeze()
}

/// Builds `[0x00][8 bytes offset, big-endian][1 byte L][L bytes channel][payload]`: the
/// binary delivery of a history channel to a subscriber that tracks positions. The
/// leading zero byte cannot start a plain binary delivery (channel names are never
/// empty), so a client tells the two layouts apart by it.
pub fn binary_frame_with_offset(channel: &str, offset: u64, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(10 + channel.len() + payload.len());
    b.put_u8(0);
    b.put_u64(offset);
    b.put_u8(channel.len() as u8);
    b.put_slice(channel.as_bytes());
    b.put_slice(payload);
    b.freeze()
}

/// `{"op":"epoch","channel":C,"epoch":E}`: sent right before a *binary* delivery at
/// offset 1 to a subscriber that tracks positions, naming the epoch that delivery
/// begins (text deliveries at offset 1 carry `"epoch"` themselves). A subscriber at a
/// start learns its epoch so; clients that do not know the frame ignore it.
pub fn epoch(channel: &str, epoch: crate::Epoch) -> String {
    format!(r#"{{"op":"epoch","channel":"{channel}","epoch":"{epoch}"}}"#)
}

/// A binary delivery as a client reads it ([`parse_binary_delivery`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryDelivery {
    /// The channel it was published on.
    pub channel: crate::ChannelName,
    /// Its offset, when the frame carries one.
    pub offset: Option<u64>,
    /// The publisher's bytes (shared with the frame, not copied).
    pub payload: Bytes,
}

/// Reads a binary delivery (either layout) as a client does. `None` for a frame that is
/// neither.
pub fn parse_binary_delivery(frame: &Bytes) -> Option<BinaryDelivery> {
    let (offset, at) = match frame.first() {
        Some(0) => {
            let o: [u8; 8] = frame.get(1..9)?.try_into().ok()?;
            (Some(u64::from_be_bytes(o)), 9)
        }
        _ => (None, 0),
    };
    let len = *frame.get(at)? as usize;
    let name = frame.get(at + 1..at + 1 + len)?;
    let channel = crate::ChannelName::from_bytes(name).ok()?;
    Some(BinaryDelivery {
        channel,
        offset,
        payload: frame.slice(at + 1 + len..),
    })
}

/// A server frame other than a delivery (welcome, replies, errors, resets), as a client
/// reads it: the fields any of them may carry.
#[derive(Debug, serde::Deserialize)]
pub struct Reply<'a> {
    /// Which frame (`welcome`, `subscribed`, `reset`, `published`, `error`, ...).
    #[serde(borrow)]
    pub op: std::borrow::Cow<'a, str>,
    /// The channel it is about.
    #[serde(default, borrow)]
    pub channel: Option<std::borrow::Cow<'a, str>>,
    /// The request it answers.
    #[serde(default)]
    pub id: Option<u64>,
    /// A stream position's offset (`subscribed`, `reset`, `published` on history channels).
    #[serde(default)]
    pub offset: Option<u64>,
    /// A stream position's epoch.
    #[serde(default, borrow)]
    pub epoch: Option<std::borrow::Cow<'a, str>>,
    /// `subscribed` to a resume: whether every missed publication follows.
    #[serde(default)]
    pub recovered: Option<bool>,
    /// `error`: the error code.
    #[serde(default, borrow)]
    pub code: Option<std::borrow::Cow<'a, str>>,
    /// `error`: what went wrong, in words.
    #[serde(default, borrow)]
    pub message: Option<std::borrow::Cow<'a, str>>,
    /// `welcome`: the server's heartbeat interval.
    #[serde(default)]
    pub heartbeat_ms: Option<u64>,
}

impl Reply<'_> {
    /// The stream position it names, if it names one this server could have issued.
    pub fn position(&self) -> Option<StreamPosition> {
        Some(StreamPosition {
            offset: self.offset?,
            epoch: crate::Epoch::parse(self.epoch.as_deref()?)?,
        })
    }
}

/// Reads a text frame that is not a delivery (see [`parse_text_delivery`]); `None`
/// for a delivery or a frame that is not Herald's.
pub fn parse_reply(text: &str) -> Option<Reply<'_>> {
    let r: Reply<'_> = serde_json::from_str(text).ok()?;
    (r.op != "message").then_some(r)
}

fn push_id(s: &mut String, id: Option<u64>) {
    if let Some(id) = id {
        let _ = write!(s, r#","id":{id}"#);
    }
}

/// Encodes `s` as a JSON string literal.
pub fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ChannelName;

    #[test]
    fn a_delta_delivery_rebuilds_the_data_of_the_frame_before() {
        let channel = ChannelName::new("scores:1").unwrap();
        let at = |offset| StreamPosition {
            offset,
            epoch: crate::Epoch::new(7).unwrap(),
        };
        let doc = |s: &str| Publication {
            position: Some(at(1)),
            ..Publication::now(
                channel.clone(),
                Payload::Json(bytes::Bytes::from(s.to_owned())),
            )
        };
        // The data holds the very text that ends it, and offset 1 names its epoch.
        let base = r#"{"note":"x,\"offset\":9","score":[1,0],"team":"ünïcode"}"#;
        let Delivery::Text(first) = encode_delivery(&doc(base)) else {
            panic!()
        };
        assert_eq!(raw_data(&first, "scores:1"), Some(base));
        assert_eq!(raw_data(&first, "scores:2"), None);
        let next = r#"{"note":"x,\"offset\":9","score":[1,1],"team":"ünïcode"}"#;
        let d = crate::delta::fossil(base.as_bytes(), next.as_bytes()).unwrap();
        let frame = delta_delivery("scores:1", 2, &d);
        let parsed = parse_text_delivery(&frame).unwrap();
        assert_eq!((parsed.offset, parsed.data.is_none()), (Some(2), true));
        let rebuilt =
            crate::delta::apply_fossil(base.as_bytes(), parsed.delta.unwrap().as_bytes(), 1 << 20)
                .unwrap();
        assert_eq!(rebuilt, next.as_bytes());
        let reply = subscribed("scores:1", Some(1), at(1), Some(true), true);
        assert!(
            reply.ends_with(r#","recovered":true,"delta":"fossil"}"#),
            "{reply}"
        );
    }

    #[test]
    fn frames_are_valid_json() {
        for s in [
            welcome("node\"1", "c1", None, 25000, None),
            welcome("n", "c", Some("user \"42\""), 1, Some(r#"{"a":[1]}"#)),
            ack(Ack::Subscribed, "news", Some(1)),
            ack(Ack::Published, "news", None),
            pong(Some(9)),
            error(None, ErrorCode::BadRequest, "bad \"quote\"\n"),
        ] {
            serde_json::from_str::<serde_json::Value>(&s).unwrap_or_else(|e| panic!("{s}: {e}"));
        }
        assert_eq!(
            ack(Ack::Subscribed, "news", Some(1)),
            r#"{"op":"subscribed","channel":"news","id":1}"#
        );
    }

    #[test]
    fn history_frames() {
        let at = StreamPosition {
            offset: 57,
            epoch: crate::Epoch::new(36).unwrap(),
        };
        assert_eq!(
            subscribed("news", Some(1), at, Some(true), false),
            r#"{"op":"subscribed","channel":"news","id":1,"offset":57,"epoch":"00000010","recovered":true}"#
        );
        assert_eq!(
            subscribed("news", None, at, None, false),
            r#"{"op":"subscribed","channel":"news","offset":57,"epoch":"00000010"}"#
        );
        assert_eq!(
            reset("news", at),
            r#"{"op":"reset","channel":"news","offset":57,"epoch":"00000010"}"#
        );
        let mut p = Publication::now(
            ChannelName::new("news").unwrap(),
            Payload::Json(Bytes::from_static(b"1")),
        );
        p.position = Some(at);
        assert_eq!(
            encode_delivery(&p),
            Delivery::Text(r#"{"op":"message","channel":"news","data":1,"offset":57}"#.into())
        );
        assert_eq!(
            &binary_frame_with_offset("b", 2, &[9])[..],
            &[0, 0, 0, 0, 0, 0, 0, 0, 2, 1, b'b', 9]
        );
        // The first publication of an epoch names it.
        p.position = Some(StreamPosition {
            offset: 1,
            epoch: at.epoch,
        });
        assert_eq!(
            encode_delivery(&p),
            Delivery::Text(
                r#"{"op":"message","channel":"news","data":1,"offset":1,"epoch":"00000010"}"#
                    .into()
            )
        );
        assert_eq!(
            epoch("b", at.epoch),
            r#"{"op":"epoch","channel":"b","epoch":"00000010"}"#
        );
        let frame = epoch("b", at.epoch);
        let r = parse_reply(&frame).unwrap();
        assert_eq!(
            (r.op.as_ref(), r.epoch.as_deref()),
            ("epoch", Some("00000010"))
        );
    }

    #[test]
    fn delivery_keeps_data_bytes() {
        let p = Publication::now(
            ChannelName::new("news").unwrap(),
            Payload::Json(Bytes::from_static(br#"{ "title" :"hi" }"#)),
        );
        assert_eq!(
            encode_delivery(&p),
            Delivery::Text(r#"{"op":"message","channel":"news","data":{ "title" :"hi" }}"#.into())
        );
        let p = Publication::now(
            ChannelName::new("b").unwrap(),
            Payload::Binary(Bytes::from_static(&[0, 1, 2])),
        );
        assert_eq!(
            encode_delivery(&p),
            Delivery::Binary(Bytes::from_static(&[1, b'b', 0, 1, 2]))
        );
    }

    #[test]
    fn a_client_reads_data_as_the_publisher_wrote_it() {
        let data = r#"{ "z" :1,"a": [true, null] }"#;
        let mut p = Publication::now(
            ChannelName::new("news").unwrap(),
            Payload::Json(Bytes::from(data)),
        );
        let Delivery::Text(frame) = encode_delivery(&p) else {
            panic!("text");
        };
        let d = parse_text_delivery(&frame).expect("a delivery");
        assert_eq!(
            (d.channel.as_ref(), d.data.unwrap().get(), d.offset),
            ("news", data, None)
        );
        p.position = Some(StreamPosition {
            offset: 7,
            epoch: crate::Epoch::parse("0k3f0a1b").unwrap(),
        });
        let Delivery::Text(frame) = encode_delivery(&p) else {
            panic!("text");
        };
        assert_eq!(parse_text_delivery(&frame).unwrap().offset, Some(7));
        assert_eq!(parse_text_delivery(&frame).unwrap().epoch, None);
        p.position = Some(StreamPosition {
            offset: 1,
            epoch: crate::Epoch::parse("0k3f0a1b").unwrap(),
        });
        let Delivery::Text(frame) = encode_delivery(&p) else {
            panic!("text");
        };
        let d = parse_text_delivery(&frame).unwrap();
        assert_eq!((d.offset, d.epoch.as_deref()), (Some(1), Some("0k3f0a1b")));
        for other in [
            welcome("n", "c", None, 1000, None),
            pong(Some(1)),
            ack(Ack::Subscribed, "news", Some(2)),
            r#"{"op":"messages","channel":"news","data":1}"#.to_owned(),
            "not json".to_owned(),
        ] {
            assert!(parse_text_delivery(&other).is_none(), "{other}");
        }
    }

    #[test]
    fn clients_read_replies_and_binary_deliveries() {
        let ch = crate::ChannelName::new("c").unwrap();
        let e = crate::Epoch::new(7).unwrap();
        let at = StreamPosition {
            offset: 3,
            epoch: e,
        };
        let text = subscribed("c", Some(2), at, Some(true), false);
        let r = parse_reply(&text).unwrap();
        assert_eq!(
            (r.op.as_ref(), r.id, r.recovered),
            ("subscribed", Some(2), Some(true))
        );
        assert_eq!(r.position(), Some(at));
        let text = error(Some(5), ErrorCode::Forbidden, "no \"way\"");
        let r = parse_reply(&text).unwrap();
        assert_eq!(
            (r.code.as_deref(), r.message.as_deref()),
            (Some("forbidden"), Some("no \"way\""))
        );
        assert!(parse_reply(r#"{"op":"message","channel":"c","data":1}"#).is_none());
        let plain = binary_frame("c", b"xy");
        let read = |f: &Bytes| parse_binary_delivery(f).map(|d| (d.channel, d.offset, d.payload));
        assert_eq!(
            read(&plain),
            Some((ch.clone(), None, Bytes::from_static(b"xy")))
        );
        let positioned = binary_frame_with_offset("c", 9, b"z");
        assert_eq!(
            read(&positioned),
            Some((ch, Some(9), Bytes::from_static(b"z")))
        );
        let _ = e;
        assert_eq!(parse_binary_delivery(&Bytes::from_static(&[0, 1])), None);
        assert_eq!(parse_binary_delivery(&Bytes::from_static(&[5, b'a'])), None);
    }
}
