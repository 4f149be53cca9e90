//! The envelope: how a [`Publication`] travels through a broker between nodes.
//!
//! The broker's channel carries the channel name (with a deployment prefix, e.g.
//! `herald:news`); the message body is either a Herald envelope or a raw payload that a
//! backend published straight into the broker.
//!
//! ```text
//! offset  size  field
//! 0       6     magic: 00 'H' 'R' 'L' 'D' 01   (01 = envelope version 1)
//! 6       1     kind: 0 = JSON, 1 = binary
//! 7       1     flags: bit 0 = offset and epoch follow (publications on history channels)
//! 8       8     published_at_us: u64 big-endian, µs since the Unix epoch on the publishing node
//! [16     8     offset: u64 big-endian, per-channel position        (only with flag bit 0)]
//! [24     8     epoch:  u64 big-endian, identifies the offset stream (only with flag bit 0)]
//! ...           payload, unchanged
//! ```
//!
//! On history channels the publishing node sends the first 16 bytes ([`head`], flag bit
//! 0 set) and the payload to the broker, which assigns the position and puts the body
//! together (in Redis, the history script does this atomically with storing it).
//!
//! The magic starts with a NUL byte, which no JSON text and no text a human types starts
//! with, so a raw payload is never mistaken for an envelope. An envelope of kind 0 whose
//! payload is not one JSON value is delivered as binary, never spliced into a text frame.
//! A body without the magic
//! is a **raw publication**: if it is valid UTF-8 JSON it is delivered as a JSON
//! message, exactly as published; otherwise it is delivered as a binary message in the
//! binary frame layout. Either way it carries no timestamp (`published_at_us = 0`).

use bytes::{BufMut, Bytes, BytesMut};

use crate::{ChannelName, Epoch, Payload, Publication, StreamPosition};

/// The first bytes of every envelope.
pub const MAGIC: &[u8; 6] = b"\x00HRLD\x01";
/// Length of the fixed header.
pub const HEADER_LEN: usize = 16;
const FLAG_OFFSET: u8 = 1;

/// Encodes a publication's body for the broker (the channel travels separately), with
/// its position when it has one.
pub fn encode(p: &Publication) -> Bytes {
    let payload = payload_of(p);
    let mut b = BytesMut::with_capacity(HEADER_LEN + 16 + payload.len());
    put_head(&mut b, p, p.position.is_some());
    if let Some(pos) = p.position {
        b.put_u64(pos.offset);
        b.put_u64(pos.epoch.get());
    }
    b.put_slice(payload);
    b.freeze()
}

/// The fixed header of a publication that a broker will give a position: magic, kind,
/// flag bit 0 set, timestamp. The broker appends offset, epoch and the payload.
pub fn head(p: &Publication) -> [u8; HEADER_LEN] {
    let mut b = BytesMut::with_capacity(HEADER_LEN);
    put_head(&mut b, p, true);
    let mut out = [0u8; HEADER_LEN];
    out.copy_from_slice(&b);
    out
}

fn payload_of(p: &Publication) -> &Bytes {
    match &p.payload {
        Payload::Json(b) | Payload::Binary(b) => b,
    }
}

fn put_head(b: &mut BytesMut, p: &Publication, positioned: bool) {
    b.put_slice(MAGIC);
    b.put_u8(match p.payload {
        Payload::Json(_) => 0,
        Payload::Binary(_) => 1,
    });
    b.put_u8(if positioned { FLAG_OFFSET } else { 0 });
    b.put_u64(p.published_at_us);
}

/// Whether a body decoded as an envelope or as a raw publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A Herald node published it.
    Herald,
    /// Someone published it straight into the broker.
    Raw,
}

/// Decodes a body received from the broker on `channel`.
pub fn decode(channel: ChannelName, body: Bytes) -> (Publication, Origin) {
    if body.len() >= HEADER_LEN && body.starts_with(MAGIC) && body[6] <= 1 {
        let flags = body[7];
        let at = be_u64(&body[8..16]);
        let (start, position) = if flags & FLAG_OFFSET != 0 && body.len() >= HEADER_LEN + 16 {
            let offset = be_u64(&body[16..24]);
            let epoch = Epoch::new(be_u64(&body[24..32]));
            (
                HEADER_LEN + 16,
                epoch.map(|epoch| StreamPosition { offset, epoch }),
            )
        } else {
            (HEADER_LEN, None)
        };
        let positioned_ok = flags & FLAG_OFFSET == 0 || position.is_some();
        if body.len() >= start && positioned_ok {
            let data = body.slice(start..);
            // Kind 0 promises JSON, but anyone who can PUBLISH into Redis can write an
            // envelope: a payload that is not one JSON value would be spliced into the
            // delivery frame as is (`1,"op":"subscribed"`), so it is delivered as binary.
            let payload = if body[6] == 0 && is_json(&data) {
                Payload::Json(data)
            } else {
                Payload::Binary(data)
            };
            return (
                Publication {
                    channel,
                    payload,
                    published_at_us: at,
                    position,
                },
                Origin::Herald,
            );
        }
    }
    let payload = Payload::json(body.clone()).unwrap_or(Payload::Binary(body));
    (
        Publication {
            channel,
            payload,
            published_at_us: 0,
            position: None,
        },
        Origin::Raw,
    )
}

fn is_json(b: &[u8]) -> bool {
    std::str::from_utf8(b).is_ok() && serde_json::from_slice::<serde::de::IgnoredAny>(b).is_ok()
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().unwrap_or([0; 8]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch() -> ChannelName {
        ChannelName::new("news").unwrap()
    }

    #[test]
    fn round_trip() {
        for payload in [
            Payload::Json(Bytes::from_static(br#"{"a":1}"#)),
            Payload::Binary(Bytes::from_static(&[0, 1, 2, 255])),
            Payload::Binary(Bytes::new()),
        ] {
            for position in [
                None,
                Some(StreamPosition {
                    offset: 42,
                    epoch: Epoch::new(7).unwrap(),
                }),
            ] {
                let p = Publication {
                    channel: ch(),
                    payload: payload.clone(),
                    published_at_us: 1_700_000_000_123_456,
                    position,
                };
                let (q, origin) = decode(ch(), encode(&p));
                assert_eq!((q, origin), (p, Origin::Herald));
            }
        }
    }

    #[test]
    fn head_plus_position_plus_payload_is_the_positioned_body() {
        let mut p = Publication::now(ch(), Payload::Json(Bytes::from_static(b"[1]")));
        p.position = Some(StreamPosition {
            offset: 3,
            epoch: Epoch::new(99).unwrap(),
        });
        let mut body = head(&p).to_vec();
        body.extend_from_slice(&3u64.to_be_bytes());
        body.extend_from_slice(&99u64.to_be_bytes());
        body.extend_from_slice(b"[1]");
        assert_eq!(Bytes::from(body), encode(&p));
    }

    #[test]
    fn raw_payloads() {
        let (p, o) = decode(ch(), Bytes::from_static(b" {\"title\":\"hi\"}\n"));
        assert_eq!(o, Origin::Raw);
        assert_eq!(
            p.payload,
            Payload::Json(Bytes::from_static(b"{\"title\":\"hi\"}"))
        );
        assert_eq!(p.published_at_us, 0);
        let (p, _) = decode(ch(), Bytes::from_static(b"hello"));
        assert_eq!(p.payload, Payload::Binary(Bytes::from_static(b"hello")));
        let (p, _) = decode(ch(), Bytes::from_static(&[0xff, 0]));
        assert_eq!(p.payload, Payload::Binary(Bytes::from_static(&[0xff, 0])));
        // An envelope of kind JSON whose payload is not one JSON value cannot inject
        // fields into the delivery frame: it is delivered as binary.
        for bad in [&b"1,\"op\":\"subscribed\""[..], b"{", b"1 2", b"\xff"] {
            let mut body = MAGIC.to_vec();
            body.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            body.extend_from_slice(bad);
            let (p, o) = decode(ch(), Bytes::from(body));
            assert_eq!(o, Origin::Herald);
            assert_eq!(p.payload, Payload::Binary(Bytes::copy_from_slice(bad)));
        }
        // A truncated envelope is raw bytes, not a panic.
        let (p, o) = decode(ch(), Bytes::from_static(b"\x00HRLD\x01\x00"));
        assert_eq!(o, Origin::Raw);
        assert!(matches!(p.payload, Payload::Binary(_)));
    }
}
