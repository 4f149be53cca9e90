//! The HTTP API's bodies: publish and batch requests, their replies, error and health
//! bodies. PROTOCOL.md's "HTTP API" section is this module in prose.
//!
//! ```text
//! POST /api/publish  {"channel":"news","data":<JSON>}                 → {"ok":true,"published":1}
//! POST /api/batch    {"publications":[{"channel":..,"data":..}, ...]} → {"ok":true,"published":N}
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
use crate::{ChannelName, ErrorCode, Payload, Publication};

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
}

#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow)]
    publications: Vec<PublishBody<'a>>,
}

/// Parses `{"channel":"<name>","data":<JSON>}`.
pub fn parse_publish(body: &Bytes) -> Result<Publication, BodyError> {
    let p: PublishBody<'_> = serde_json::from_slice(body).map_err(|e| {
        BodyError::new(
            ErrorCode::BadRequest,
            format!(r#"expected {{"channel":"<name>","data":<JSON>}}: {e}"#),
        )
    })?;
    let channel = ChannelName::new(p.channel)
        .map_err(|e| BodyError::new(ErrorCode::InvalidChannel, e.to_string()))?;
    Ok(Publication::now(
        channel,
        Payload::Json(slice_of(body, p.data.get().as_bytes())),
    ))
}

/// Parses `{"publications":[{"channel":..,"data":..}, ...]}` holding at most `max`
/// entries. Every entry is checked before any is returned, so a batch is accepted whole
/// or not at all.
pub fn parse_batch(body: &Bytes, max: usize) -> Result<Vec<Publication>, BodyError> {
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
        .map(|(i, p)| {
            let c = ChannelName::new(p.channel).map_err(|e| {
                BodyError::new(ErrorCode::InvalidChannel, format!("publications[{i}]: {e}"))
            })?;
            Ok(Publication::now(
                c,
                Payload::Json(slice_of(body, p.data.get().as_bytes())),
            ))
        })
        .collect()
}

/// `{"ok":true,"published":N}`: the reply to an accepted publish or batch.
pub fn published(n: usize) -> String {
    format!(r#"{{"ok":true,"published":{n}}}"#)
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
        let p = parse_publish(&body(r#"{"channel":"news","data": {"a" : 1} }"#)).unwrap();
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
    fn replies_are_json() {
        for s in [
            published(3),
            error(ErrorCode::Unauthorized, "no \"key\""),
            status("broker_down"),
        ] {
            serde_json::from_str::<serde_json::Value>(&s).unwrap_or_else(|e| panic!("{s}: {e}"));
        }
        assert_eq!(published(3), r#"{"ok":true,"published":3}"#);
    }
}
