//! WebSocket close codes Herald sends, and what each means to a client.
//!
//! A client should reconnect (with jittered backoff) after every code here except
//! [`PROTOCOL_ERROR`], [`INVALID_PAYLOAD`], [`POLICY_VIOLATION`] and [`MESSAGE_TOO_BIG`],
//! which mean the client itself is at fault. [`TOKEN_EXPIRED`] asks for a new token
//! first. Codes 4000-4399 mean "reconnect with backoff"; 4400-4499 mean "do not
//! reconnect" (the control API's `POST /api/disconnect` picks within 4000-4999).

/// The client or server ended the session normally.
pub const NORMAL: u16 = 1000;
/// The node is shutting down; reconnect to another node.
pub const GOING_AWAY: u16 = 1001;
/// The client sent a frame that breaks RFC 6455 (bad opcode, masking, fragmentation).
pub const PROTOCOL_ERROR: u16 = 1002;
/// A text message was not valid UTF-8.
pub const INVALID_PAYLOAD: u16 = 1007;
/// The client broke a rule it keeps breaking (rate limit, heartbeat).
pub const POLICY_VIOLATION: u16 = 1008;
/// An incoming message exceeded the configured maximum size.
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// The gateway failed internally.
pub const INTERNAL_ERROR: u16 = 1011;
/// The node is draining for a restart; reconnect (to any node) right away.
pub const SERVICE_RESTART: u16 = 1012;
/// The client could not keep up (slow consumer) or the node is overloaded; reconnect later.
pub const TRY_AGAIN_LATER: u16 = 1013;
/// The connection's token expired and no `refresh` arrived within the grace period:
/// fetch a new token, then reconnect.
pub const TOKEN_EXPIRED: u16 = 4001;
/// Closed through the control API (`POST /api/disconnect`) without a code of the
/// caller's: do not reconnect (a ban, a sign-out). Every code in 4400-4499 means that.
pub const DISCONNECTED: u16 = 4400;

/// Whether a client should stop instead of reconnecting after this close code (the
/// 4400-4499 range).
pub fn is_terminal(code: u16) -> bool {
    (4400..=4499).contains(&code)
}
