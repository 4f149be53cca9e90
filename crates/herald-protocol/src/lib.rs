//! Herald's wire protocol, version 1: everything that crosses a socket.
//!
//! This crate is the only place that defines bytes on the wire, so the gateway, the
//! brokers, the bench tool and the tests agree by construction. It does no I/O and
//! has no async runtime; `PROTOCOL.md` is its normative, human-readable twin.
//!
//! # Layout
//! - [`control`]: what nodes tell each other, and the control API's bodies.
//! - [`webhook`]: the events webhooks tell the application's backend.
//! - [`presence`]: presence members and their frames and bodies.
//! - [`api`]: the HTTP API's request and reply bodies.
//! - [`sse`]: Server-Sent Events framing and the resumable event id.
//! - [`client`]: parsing of client text and binary frames into [`client::Request`]s.
//! - [`server`]: encoding of server frames (welcome, replies, errors, deliveries).
//! - [`delta`]: Fossil delta compression of deliveries (`delta = "fossil"`).
//! - [`envelope`]: how a publication travels through a broker between nodes.
//! - [`publication`]: the node-independent unit a broker carries ([`Publication`]).
//! - [`backoff`]: the reconnect policy every client and the Redis broker follow.
//! - [`channel`]: channel-name rules and publish-permission patterns.
//! - [`close`]: WebSocket close codes Herald uses and when.
//!
//! # Design
//! A delivery is encoded once per node ([`server::encode_delivery`]) and the bytes are
//! shared by every subscriber's queue, so fan-out costs no serialisation per subscriber.
//! JSON `data` is carried as raw text and never re-serialised: subscribers receive the
//! publisher's bytes exactly.
#![deny(missing_docs)]

pub mod api;
pub mod backoff;
pub mod channel;
pub mod client;
pub mod close;
pub mod control;
pub mod delta;
pub mod envelope;
pub mod presence;
pub mod publication;
pub mod server;
pub mod sse;
pub mod webhook;

pub use channel::{ChannelName, ChannelPattern, ChannelPatterns, InvalidChannel};
pub use publication::{Epoch, Payload, Publication, StreamPosition};

/// The protocol version announced in the welcome frame.
pub const VERSION: u32 = 1;

/// The Herald release, announced in the welcome frame as `"server"` (every crate of the
/// workspace, the `herald` binary included, shares this version).
pub const RELEASE: &str = env!("CARGO_PKG_VERSION");

/// Error codes carried in `{"op":"error","code":..}` frames and HTTP error bodies.
///
/// The set is closed for version 1 except for additions; clients must treat an unknown
/// code like `unavailable` (PROTOCOL.md: retry later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Not JSON, unknown op, missing or mistyped field.
    BadRequest,
    /// The channel name breaks the rules in [`channel`].
    InvalidChannel,
    /// The configuration does not let this client do that (e.g. publish there).
    Forbidden,
    /// The connection already holds the configured maximum of subscriptions.
    TooManySubscriptions,
    /// The connection sends faster than its configured message rate.
    RateLimited,
    /// The broker could not take the message; retrying later may work.
    Unavailable,
    /// Missing or wrong API key (HTTP only).
    Unauthorized,
    /// The request body or message is larger than the configured limit.
    TooLarge,
    /// No such endpoint (HTTP only).
    NotFound,
    /// Wrong HTTP method (HTTP only).
    MethodNotAllowed,
    /// Something failed inside the gateway.
    Internal,
    /// The broker did not answer in time: the publication may or may not have been
    /// published. Retrying with the same `idempotency_key` is safe (HTTP only).
    UnknownOutcome,
    /// The request body did not arrive within `limits.body_timeout` (HTTP only).
    RequestTimeout,
    /// The client's address or user holds as many connections as allowed (HTTP 429
    /// before the upgrade).
    TooManyConnections,
    /// The application's backend refused the request (a hook's `error` answer; its own
    /// code travels as `hook_code`).
    Refused,
    /// Some entries of a batch were published and others failed; the reply says which
    /// (HTTP only).
    Partial,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Internal => "internal",
            ErrorCode::UnknownOutcome => "unknown_outcome",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::Partial => "partial",
            ErrorCode::Refused => "refused",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
