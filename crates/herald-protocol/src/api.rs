//! The HTTP API's bodies: publish and batch requests, their replies, error and health
//! bodies. PROTOCOL.md's "HTTP API" section is this module in prose.
//!
//! ```text
//! POST /api/publish  {"channel":"news","data":<JSON>[,"idempotency_key":K]}
//!                    → {"ok":true,"published":1[,"offset":O,"epoch":E][,"duplicate":true]}
//! POST /api/batch    {"publications":[{"channel":..,"data":..[,"idempotency_key":K]}, ...]}
//!                    → {"ok":true,"published":N,"results":[{["offset":O,"epoch":E]}, ...]}
//! GET  /api/history/{channel}?since=O&epoch=E&limit=N
//!                    → {"epoch":E,"offset":TOP,"complete":B,"publications":[{"offset":O,"data":D}, ...]}
//! any error          {"code":"<error code>","message":"<text>"}
//! /healthz, /readyz  {"status":"ok" | "ready" | "<why not>"}
//! ```
//!
//! `data` is kept as the publisher's exact JSON text, sliced out of the request body
//! without a copy.

use std::fmt::Write as _;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::client::slice_of;
use crate::server::json_string;
use crate::{ChannelName, Epoch, ErrorCode, Payload, Publication, StreamPosition};

/// A request body the API refuses, with the code and message to answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct BodyError {
    /// `bad_request`, `invalid_channel` or `too_large`.
    pub code: ErrorCode,
    /// What is wrong, for the caller.
    pub message: String,
}

impl BodyError {
    fn new(code: ErrorCode, message: String) -> Self {
        BodyError { code, message }
    }
}

#[derive(Deserialize)]
struct PublishBody<'a> {
    channel: &'a str,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(borrow)]
    idempotency_key: Option<std::borrow::Cow<'a, str>>,
}

/// The longest `idempotency_key`, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// One publication an API request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// What to publish.
    pub publication: Publication,
    /// Retries with the same key within the configured window publish nothing new and
    /// get the first result.
    pub idempotency_key: Option<String>,
}

/// What became of one publication of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outcome {
    /// Its place in the channel's stream, on history channels.
    pub position: Option<StreamPosition>,
    /// An earlier request with the same idempotency key published it; nothing new was
    /// published.
    pub duplicate: bool,
}

fn publish_of(body: &Bytes, p: &PublishBody<'_>, at: &str) -> Result<Publish, BodyError> {
    let channel = ChannelName::new(p.channel)
        .map_err(|e| BodyError::new(ErrorCode::InvalidChannel, format!("{at}{e}")))?;
    let idempotency_key = match &p.idempotency_key {
        None => None,
        Some(k) if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY => {
            return Err(BodyError::new(
                ErrorCode::BadRequest,
                format!("{at}idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY} bytes"),
            ))
        }
        Some(k) => Some(k.to_string()),
    };
    Ok(Publish {
        publication: Publication::now(
            channel,
            Payload::Json(slice_of(body, p.data.get().as_bytes())),
        ),
        idempotency_key,
    })
}

#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow)]
    publications: Vec<PublishBody<'a>>,
}

/// Parses `{"channel":"<name>","data":<JSON>[,"idempotency_key":"<key>"]}`.
pub fn parse_publish(body: &Bytes) -> Result<Publish, BodyError> {
    let p: PublishBody<'_> = serde_json::from_slice(body).map_err(|e| {
        BodyError::new(
            ErrorCode::BadRequest,
            format!(r#"expected {{"channel":"<name>","data":<JSON>}}: {e}"#),
        )
    })?;
    publish_of(body, &p, "")
}

/// Parses `{"publications":[{"channel":..,"data":..}, ...]}` holding at most `max`
/// entries. Every entry is checked before any is returned, so a batch is accepted whole
/// or not at all.
pub fn parse_batch(body: &Bytes, max: usize) -> Result<Vec<Publish>, BodyError> {
    let b: BatchBody<'_> = serde_json::from_slice(body).map_err(|e| {
        BodyError::new(
            ErrorCode::BadRequest,
            format!(
                r#"expected {{"publications":[{{"channel":"<name>","data":<JSON>}}, ...]}}: {e}"#
            ),
        )
    })?;
    if b.publications.len() > max {
        return Err(BodyError::new(
            ErrorCode::TooLarge,
            format!("a batch holds at most {max} publications"),
        ));
    }
    b.publications
        .iter()
        .enumerate()
        .map(|(i, p)| publish_of(body, p, &format!("publications[{i}]: ")))
        .collect()
}

/// The reply to an accepted `POST /api/publish`: `{"ok":true,"published":1}` (0 for a
/// duplicate), with the position on history channels.
pub fn published(outcome: &Outcome) -> String {
    let mut s = format!(
        r#"{{"ok":true,"published":{}"#,
        u8::from(!outcome.duplicate)
    );
    push_outcome(&mut s, outcome);
    s.push('}');
    s
}

/// The reply to an accepted `POST /api/batch`: how many were published (duplicates not
/// counted) and each publication's outcome, in request order.
pub fn published_batch(outcomes: &[Outcome]) -> String {
    let n = outcomes.iter().filter(|o| !o.duplicate).count();
    let mut s = format!(r#"{{"ok":true,"published":{n},"results":["#);
    for (i, o) in outcomes.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push('{');
        let mark = s.len();
        push_outcome(&mut s, o);
        // The fields were written with a leading comma for the single reply.
        if s.len() > mark {
            s.remove(mark);
        }
        s.push('}');
    }
    s.push_str("]}");
    s
}

/// The reply to a batch of which some entries were published and others failed (HTTP
/// 502): `{"ok":false,"code":"partial","message":..,"published":N,"results":[..]}`, each
/// result an outcome as in [`published_batch`] or `{"error":{"code":C,"message":M}}`.
/// Failed entries were not published (`unavailable`), or may have been
/// (`unknown_outcome`): retried with their idempotency keys, they are published once.
pub fn partly_published(results: &[Result<Outcome, (ErrorCode, &str)>]) -> String {
    let n = results
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|o| !o.duplicate))
        .count();
    let failed = results.iter().filter(|r| r.is_err()).count();
    let mut s = format!(
        r#"{{"ok":false,"code":"partial","message":"{failed} of {} entries failed; see results","published":{n},"results":["#,
        results.len()
    );
    for (i, r) in results.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push('{');
        match r {
            Ok(o) => {
                let mark = s.len();
                push_outcome(&mut s, o);
                if s.len() > mark {
                    s.remove(mark);
                }
            }
            Err((code, message)) => {
                let _ = write!(
                    s,
                    r#""error":{{"code":"{}","message":{}}}"#,
                    code.as_str(),
                    crate::server::json_string(message)
                );
            }
        }
        s.push('}');
    }
    s.push_str("]}");
    s
}

fn push_outcome(s: &mut String, o: &Outcome) {
    if let Some(p) = o.position {
        let _ = write!(s, r#","offset":{},"epoch":"{}""#, p.offset, p.epoch);
    }
    if o.duplicate {
        s.push_str(r#","duplicate":true"#);
    }
}

/// `GET /api/history/{channel}`'s query: `since=O` (default 0: from the start),
/// `epoch=E` (the epoch `since` belongs to), `limit=N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HistoryQuery {
    /// Publications after this offset.
    pub since: u64,
    /// The epoch `since` is in; without it, any epoch is taken as current.
    pub epoch: Option<Epoch>,
    /// At most this many (the server also caps it).
    pub limit: Option<usize>,
    /// `epoch` was given but is not one this server could have issued.
    pub bad_epoch: bool,
}

/// Parses a history query string (without the `?`).
pub fn parse_history_query(query: &str) -> Result<HistoryQuery, BodyError> {
    let mut q = HistoryQuery::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let bad = |what: &str| BodyError::new(ErrorCode::BadRequest, format!("{k}: {what}"));
        match k {
            "since" => q.since = v.parse().map_err(|_| bad("expected an offset"))?,
            "limit" => q.limit = Some(v.parse().map_err(|_| bad("expected a count"))?),
            "epoch" => {
                q.epoch = Epoch::parse(v);
                q.bad_epoch = q.epoch.is_none();
            }
            _ => return Err(bad("unknown parameter (since, epoch, limit)")),
        }
    }
    Ok(q)
}

/// `{"epoch":E,"offset":TOP,"complete":B,"publications":[...]}`: a page of a channel's
/// history. Each publication is `{"offset":O,"data":<JSON>}`, or for binary ones
/// `{"offset":O,"binary":"<base64>"}`. `complete` is false when publications after the
/// requested position are missing (trimmed, expired, or another epoch).
pub fn history(top: StreamPosition, complete: bool, publications: &[Publication]) -> String {
    use base64::Engine as _;
    let mut s = format!(
        r#"{{"epoch":"{}","offset":{},"complete":{complete},"publications":["#,
        top.epoch, top.offset
    );
    for (i, p) in publications.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, r#"{{"offset":{}"#, p.offset().unwrap_or(0));
        match &p.payload {
            Payload::Json(d) => {
                s.push_str(r#","data":"#);
                s.push_str(&String::from_utf8_lossy(d));
            }
            Payload::Binary(b) => {
                let _ = write!(
                    s,
                    r#","binary":"{}""#,
                    base64::engine::general_purpose::STANDARD.encode(b)
                );
            }
        }
        s.push('}');
    }
    s.push_str("]}");
    s
}

/// The reply to a client's `history` op: the same object as `GET /api/history`'s,
/// with `"op":"history"`, the channel and the request's id in front (`complete`: false
/// when fewer publications than asked for fit the reply).
pub fn history_frame(
    channel: &str,
    id: Option<u64>,
    top: StreamPosition,
    complete: bool,
    publications: &[Publication],
) -> String {
    let body = history(top, complete, publications);
    let mut s = format!(r#"{{"op":"history","channel":{}"#, json_string(channel));
    if let Some(id) = id {
        let _ = write!(s, r#","id":{id}"#);
    }
    s.push(',');
    s.push_str(&body[1..]);
    s
}

/// `{"code":CODE,"message":TEXT}`: every API error body.
pub fn error(code: ErrorCode, message: &str) -> String {
    let mut s = String::with_capacity(32 + message.len());
    let _ = write!(
        s,
        r#"{{"code":"{}","message":{}}}"#,
        code.as_str(),
        json_string(message)
    );
    s
}

/// `{"code":"refused","hook_code":N,"message":M}`: the application's backend (a hook)
/// refused the request with its own code `N`.
pub fn refused(hook_code: i64, message: &str) -> String {
    format!(
        r#"{{"code":"refused","hook_code":{hook_code},"message":{}}}"#,
        json_string(message)
    )
}

/// `{"status":STATUS}`: the health and readiness bodies (`ok`, `ready`, or why not).
pub fn status(status: &str) -> String {
    format!(r#"{{"status":{}}}"#, json_string(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn publish_keeps_data_bytes() {
        let p = parse_publish(&body(r#"{"channel":"news","data": {"a" : 1} }"#))
            .unwrap()
            .publication;
        assert_eq!(p.channel.as_str(), "news");
        assert_eq!(p.payload, Payload::Json(body(r#"{"a" : 1}"#)));
        assert_eq!(
            parse_publish(&body(r#"{"channel":"a b","data":1}"#))
                .unwrap_err()
                .code,
            ErrorCode::InvalidChannel
        );
        assert_eq!(
            parse_publish(&body(r#"{"channel":"a"}"#)).unwrap_err().code,
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn batch_is_whole_or_nothing() {
        let ok = parse_batch(
            &body(r#"{"publications":[{"channel":"a","data":1},{"channel":"b","data":[2]}]}"#),
            2,
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        let e = parse_batch(
            &body(r#"{"publications":[{"channel":"a","data":1},{"channel":"b c","data":2}]}"#),
            5,
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidChannel);
        assert!(e.message.starts_with("publications[1]"));
        let e =
            parse_batch(&body(r#"{"publications":[{"channel":"a","data":1}]}"#), 0).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooLarge);
    }

    #[test]
    fn idempotency_keys_are_bounded() {
        let p =
            parse_publish(&body(r#"{"channel":"a","data":1,"idempotency_key":"k-1"}"#)).unwrap();
        assert_eq!(p.idempotency_key.as_deref(), Some("k-1"));
        let long = format!(
            r#"{{"channel":"a","data":1,"idempotency_key":"{}"}}"#,
            "k".repeat(129)
        );
        assert_eq!(
            parse_publish(&body(&long)).unwrap_err().code,
            ErrorCode::BadRequest
        );
        let e = parse_batch(
            &body(r#"{"publications":[{"channel":"a","data":1,"idempotency_key":""}]}"#),
            9,
        )
        .unwrap_err();
        assert!(
            e.message.starts_with("publications[0]: idempotency_key"),
            "{}",
            e.message
        );
    }

    #[test]
    fn history_queries() {
        assert_eq!(parse_history_query("").unwrap(), HistoryQuery::default());
        let q = parse_history_query("since=41&epoch=0000000a&limit=5").unwrap();
        assert_eq!(
            (q.since, q.epoch, q.limit, q.bad_epoch),
            (41, Epoch::new(10), Some(5), false)
        );
        assert!(parse_history_query("epoch=nope").unwrap().bad_epoch);
        assert!(parse_history_query("since=-1").is_err());
        assert!(parse_history_query("offset=1").is_err());
    }

    #[test]
    fn replies_are_json() {
        let at = StreamPosition {
            offset: 4,
            epoch: Epoch::new(1).unwrap(),
        };
        let mut p = Publication::now(ChannelName::new("a").unwrap(), Payload::Json(body("[1]")));
        p.position = Some(at);
        let mut b = Publication::now(
            ChannelName::new("a").unwrap(),
            Payload::Binary(body("\u{0}x")),
        );
        b.position = Some(at);
        for s in [
            published(&Outcome::default()),
            published_batch(&[
                Outcome::default(),
                Outcome {
                    position: Some(at),
                    duplicate: true,
                },
            ]),
            error(ErrorCode::Unauthorized, "no \"key\""),
            status("broker_down"),
            history(at, true, &[p, b]),
        ] {
            serde_json::from_str::<serde_json::Value>(&s).unwrap_or_else(|e| panic!("{s}: {e}"));
        }
        assert_eq!(
            published(&Outcome::default()),
            r#"{"ok":true,"published":1}"#
        );
        assert_eq!(
            published(&Outcome {
                position: Some(at),
                duplicate: true
            }),
            r#"{"ok":true,"published":0,"offset":4,"epoch":"00000001","duplicate":true}"#
        );
        assert_eq!(
            published_batch(&[
                Outcome::default(),
                Outcome {
                    position: Some(at),
                    duplicate: false
                }
            ]),
            r#"{"ok":true,"published":2,"results":[{},{"offset":4,"epoch":"00000001"}]}"#
        );
    }
}
