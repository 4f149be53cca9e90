//! Server-Sent Events: the fallback transport for clients that cannot hold a
//! WebSocket (`GET /sse`).
//!
//! Every event's `data` is one server frame exactly as a WebSocket client would
//! receive it as text (binary deliveries become [`binary_as_json`]), so a client parses
//! both transports alike. The event `id` carries the stream position of every history
//! channel of the connection ([`Positions`]), so the browser's automatic reconnect
//! (which sends the last id as `Last-Event-ID`) resumes them all.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use base64::Engine as _;
use serde::Deserialize;

use crate::channel::ChannelName;
use crate::publication::{Epoch, StreamPosition};
use crate::server::json_string;

/// One event: `id:` (when given), the frame as `data:` lines, and the blank line.
pub fn event(id: Option<&str>, frame: &str) -> String {
    let mut s = String::with_capacity(frame.len() + 16 + id.map_or(0, str::len));
    if let Some(id) = id {
        let _ = writeln!(s, "id: {id}");
    }
    // Frames are single-line JSON, except raw JSON a publisher sent with line breaks
    // in its whitespace. An EventSource ends a line at CR, LF or CRLF, so each becomes
    // a `data:` line of its own, which the client joins with "\n": the same JSON (the
    // breaks were whitespace between tokens), with LF for every break.
    let mut rest = frame;
    loop {
        let end = rest.find(['\r', '\n']).unwrap_or(rest.len());
        let _ = writeln!(s, "data: {}", &rest[..end]);
        if end == rest.len() {
            break;
        }
        let step = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + step..];
    }
    s.push('\n');
    s
}

/// A named event (`event: close` at the end of a stream).
pub fn named_event(name: &str, frame: &str) -> String {
    format!("event: {name}\n{}", event(None, frame))
}

/// The closing event: `{"code":1012,"reason":"node shutting down"}` with the WebSocket
/// close code the session would have been closed with.
pub fn close_event(code: u16, reason: &str) -> String {
    named_event(
        "close",
        &format!(r#"{{"code":{code},"reason":{}}}"#, json_string(reason)),
    )
}

/// A comment line: ignored by clients, keeps proxies and dead-peer detection busy.
pub fn comment(text: &str) -> String {
    format!(": {text}\n\n")
}

/// How long the browser waits before reconnecting, in milliseconds.
pub fn retry(ms: u64) -> String {
    format!("retry: {ms}\n\n")
}

/// A binary delivery as a text frame:
/// `{"op":"message","channel":C,"offset":O,"base64":"..."}` (`offset` on history
/// channels only). `frame` is the WebSocket binary frame (`[L][channel][payload]`, or
/// `[0][u64 offset][L][channel][payload]`); `None` if it is not one.
pub fn binary_as_json(frame: &[u8]) -> Option<String> {
    let d = crate::server::parse_binary_delivery(&bytes::Bytes::copy_from_slice(frame))?;
    let mut s = format!(
        r#"{{"op":"message","channel":{}"#,
        json_string(d.channel.as_str())
    );
    if let Some(o) = d.offset {
        let _ = write!(s, r#","offset":{o}"#);
    }
    let _ = write!(
        s,
        r#","base64":"{}"}}"#,
        base64::engine::general_purpose::STANDARD.encode(&d.payload)
    );
    Some(s)
}

/// The stream position of each history channel of an SSE connection, as the event id
/// `news=41~0k3f0a1b,chat:1=7~00000abc` (`~` and `,` cannot occur in channel names or
/// epochs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Positions(BTreeMap<ChannelName, StreamPosition>);

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    op: &'a str,
    #[serde(borrow)]
    channel: Option<&'a str>,
    offset: Option<u64>,
    #[serde(borrow)]
    epoch: Option<&'a str>,
    #[serde(default)]
    recovered: Option<bool>,
}

impl Positions {
    /// Reads an event id (`Last-Event-ID`); parts that do not parse are skipped (that
    /// channel is then subscribed without resuming).
    pub fn parse(id: &str) -> Positions {
        let mut p = Positions::default();
        for part in id.split(',') {
            let Some((channel, at)) = part.split_once('=') else {
                continue;
            };
            let Some((offset, epoch)) = at.split_once('~') else {
                continue;
            };
            let (Ok(channel), Ok(offset), Some(epoch)) = (
                ChannelName::new(channel),
                offset.parse::<u64>(),
                Epoch::parse(epoch),
            ) else {
                continue;
            };
            p.0.insert(channel, StreamPosition { offset, epoch });
        }
        p
    }

    /// Where to resume `channel`, if the id named it.
    pub fn get(&self, channel: &ChannelName) -> Option<StreamPosition> {
        self.0.get(channel).copied()
    }

    /// Takes the position a server frame reports (`subscribed` and `reset` with offset
    /// and epoch; `message` with an offset, in the epoch known for its channel);
    /// returns whether it changed.
    pub fn observe(&mut self, frame: &str) -> bool {
        // Most frames (deliveries on channels without history) carry no position: no
        // need to parse them.
        if !frame.contains(r#""offset":"#) && !frame.starts_with(r#"{"op":"epoch""#) {
            return false;
        }
        let Ok(f) = serde_json::from_str::<Frame<'_>>(frame) else {
            return false;
        };
        let Some(Ok(channel)) = f.channel.map(ChannelName::new) else {
            return false;
        };
        if f.op == "epoch" {
            // Before a binary delivery at offset 1: a position at a start takes the epoch.
            return match (self.0.get_mut(&channel), f.epoch.and_then(Epoch::parse)) {
                (Some(p), Some(e)) if p.is_start() => {
                    p.epoch = e;
                    true
                }
                _ => false,
            };
        }
        let Some(offset) = f.offset else {
            return false;
        };
        match (f.op, f.epoch.and_then(Epoch::parse)) {
            // A resume answered: the replay from the position we hold follows, and the
            // position moves only with it (an id naming the top now would make a
            // reconnect during the replay skip the rest of it).
            ("subscribed", Some(epoch))
                if f.recovered == Some(true)
                    && self
                        .0
                        .get(&channel)
                        .is_some_and(|p| p.epoch == epoch || p.is_start()) =>
            {
                false
            }
            ("subscribed" | "reset", Some(epoch)) => {
                self.0.insert(channel, StreamPosition { offset, epoch });
                true
            }
            // The first publication of an epoch names it (a channel subscribed before
            // it had any publication was at `START`).
            ("message", epoch) => match self.0.get_mut(&channel) {
                Some(p) if p.offset != offset || epoch.is_some_and(|e| e != p.epoch) => {
                    p.offset = offset;
                    if let Some(e) = epoch {
                        p.epoch = e;
                    }
                    true
                }
                _ => false,
            },
            _ => false,
        }
    }

    /// Keeps only the positions of `channels` (those an SSE connection names): an id is
    /// repeated with every event, so it must not carry what a client made up.
    pub fn retain(&mut self, channels: &[ChannelName]) {
        self.0.retain(|c, _| channels.contains(c));
    }

    /// Forgets a channel (unsubscribed).
    pub fn remove(&mut self, channel: &ChannelName) {
        self.0.remove(channel);
    }

    /// The event id; `None` while no channel has a position.
    pub fn id(&self) -> Option<String> {
        if self.0.is_empty() {
            return None;
        }
        let mut s = String::new();
        for (i, (c, p)) in self.0.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(s, "{c}={}~{}", p.offset, p.epoch);
        }
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events() {
        assert_eq!(event(None, r#"{"a":1}"#), "data: {\"a\":1}\n\n");
        assert_eq!(
            event(Some("x=1~00000001"), "{}"),
            "id: x=1~00000001\ndata: {}\n\n"
        );
        // Line breaks inside raw JSON become several data lines (joined back by "\n").
        assert_eq!(event(None, "{\r\n\"a\":1}"), "data: {\ndata: \"a\":1}\n\n");
        // A bare CR ends a line for an EventSource too: never inside a data line.
        assert_eq!(
            event(None, "{\"a\":\r1,\n\"b\":2\r}"),
            "data: {\"a\":\ndata: 1,\ndata: \"b\":2\ndata: }\n\n"
        );
        assert!(!event(None, "[1,\r\r2]").trim_end().contains('\r'));
        assert_eq!(
            close_event(1012, "node shutting down"),
            "event: close\ndata: {\"code\":1012,\"reason\":\"node shutting down\"}\n\n"
        );
        assert_eq!(comment("ping"), ": ping\n\n");
    }

    #[test]
    fn binary_frames_as_json() {
        let plain = crate::server::binary_frame("bin", &[0, 1, 255]);
        assert_eq!(
            binary_as_json(&plain).unwrap(),
            r#"{"op":"message","channel":"bin","base64":"AAH/"}"#
        );
        let with = crate::server::binary_frame_with_offset("bin", 7, b"hi");
        assert_eq!(
            binary_as_json(&with).unwrap(),
            r#"{"op":"message","channel":"bin","offset":7,"base64":"aGk="}"#
        );
        assert_eq!(binary_as_json(&[5, b'a']), None);
        assert_eq!(binary_as_json(&[]), None);
    }

    #[test]
    fn positions_follow_frames_and_round_trip() {
        let mut p = Positions::default();
        assert_eq!(p.id(), None);
        assert!(p.observe(r#"{"op":"subscribed","channel":"news","id":1,"offset":4,"epoch":"0000000a","recovered":true}"#));
        assert!(p.observe(r#"{"op":"message","channel":"news","data":{"x":[1,"}"]},"offset":5}"#));
        assert!(
            !p.observe(r#"{"op":"message","channel":"other","data":1,"offset":9}"#),
            "no epoch known"
        );
        assert!(!p.observe(r#"{"op":"message","channel":"plain","data":1}"#));
        assert!(
            p.observe(r#"{"op":"subscribed","channel":"chat:1","offset":0,"epoch":"0000000b"}"#)
        );
        let id = p.id().unwrap();
        assert_eq!(id, "chat:1=0~0000000b,news=5~0000000a");
        let back = Positions::parse(&id);
        assert_eq!(back, p);
        let news = ChannelName::new("news").unwrap();
        assert_eq!(back.get(&news).unwrap().offset, 5);
        // Garbage parts are skipped, not fatal.
        let partial = Positions::parse("news=5~0000000a,bad,x=y~z,=1~0000000a");
        assert_eq!(partial.id().unwrap(), "news=5~0000000a");
        p.remove(&news);
        assert_eq!(p.id().unwrap(), "chat:1=0~0000000b");
    }

    #[test]
    fn a_channel_without_publications_learns_its_epoch_from_the_first() {
        let start = Epoch::start(5, 100);
        let mut p = Positions::default();
        let sub = format!(r#"{{"op":"subscribed","channel":"new","offset":0,"epoch":"{start}"}}"#);
        assert!(p.observe(&sub));
        assert_eq!(p.id().unwrap(), format!("new=0~{start}"));
        // A resume from the start whose replay follows: the id waits for the replay.
        assert!(!p.observe(
            r#"{"op":"subscribed","channel":"new","offset":3,"epoch":"0000000a","recovered":true}"#
        ));
        assert_eq!(p.id().unwrap(), format!("new=0~{start}"));
        assert!(
            p.observe(r#"{"op":"message","channel":"new","data":1,"offset":1,"epoch":"0000000a"}"#)
        );
        assert_eq!(p.id().unwrap(), "new=1~0000000a");
        assert!(p.observe(r#"{"op":"message","channel":"new","data":1,"offset":2}"#));
        assert_eq!(p.id().unwrap(), "new=2~0000000a");
        // Binary: the epoch frame before offset 1 (only a start takes it).
        let mut p = Positions::default();
        assert!(p.observe(&sub));
        assert!(p.observe(r#"{"op":"epoch","channel":"new","epoch":"0000000b"}"#));
        assert!(!p.observe(r#"{"op":"epoch","channel":"new","epoch":"0000000c"}"#));
        let first = crate::server::binary_frame_with_offset("new", 1, b"x");
        assert!(p.observe(&binary_as_json(&first).unwrap()));
        assert_eq!(p.id().unwrap(), "new=1~0000000b");
    }

    #[test]
    fn a_resumed_subscribe_moves_no_position_until_the_replay_does() {
        let mut p = Positions::parse("c=3~0000000a");
        let e = "0000000a";
        let subscribed = format!(
            r#"{{"op":"subscribed","channel":"c","offset":9,"epoch":"{e}","recovered":true}}"#
        );
        assert!(!p.observe(&subscribed));
        assert_eq!(p.id().as_deref(), Some("c=3~0000000a"));
        assert!(p.observe(r#"{"op":"message","channel":"c","data":1,"offset":4}"#));
        assert_eq!(p.id().as_deref(), Some("c=4~0000000a"));
        // Not recovered: the stream goes on from the top.
        let fresh = format!(
            r#"{{"op":"subscribed","channel":"c","offset":9,"epoch":"{e}","recovered":false}}"#
        );
        assert!(p.observe(&fresh));
        assert_eq!(p.id().as_deref(), Some("c=9~0000000a"));
        // Only the named channels are kept.
        let mut q = Positions::parse("c=1~0000000a,x=2~0000000a,y=3~0000000a");
        q.retain(&[ChannelName::new("c").unwrap()]);
        assert_eq!(q.id().as_deref(), Some("c=1~0000000a"));
    }
}
