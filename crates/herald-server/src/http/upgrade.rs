//! The WebSocket upgrade on `/ws`, in three steps:
//!
//! 1. **validate** the handshake (GET, `Connection: Upgrade`, `Upgrade: websocket`,
//!    version 13, a key): 400 otherwise;
//! 2. **admit** it: not while draining (503), only from an allowed origin (403), only
//!    with a free connection slot (503) and within the per-address limit (429; the
//!    address is the one `edge` found), then **authenticate** it (`connect`: a token in
//!    `Authorization` or `access_token`, or the connect hook; 401 for a token that does
//!    not verify, or for none when `auth.anonymous` is false) and count it against its
//!    user's limit (429). The slot is taken before the 101, so the limits hold before
//!    any work is done for the session;
//! 3. **start** the session task and answer 101.
//!
//! Every refusal is counted in `herald_connections_rejected_total{reason}`.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use herald_metrics::RejectReason;
use herald_protocol::ErrorCode;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use super::connect::{authenticate, Rejected};
use super::reply::{full, Body, Refusal};
use crate::handle::ConnId;
use crate::node::{Node, Slot, SlotRefused};
use crate::session::{self, Peer, Transport};
use crate::wire::{Deflate, Inflating, ReadHalf, WsSink};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;

/// Serves `GET /ws`.
pub(crate) async fn upgrade(
    req: Request<Incoming>,
    node: Arc<Node>,
    client: IpAddr,
) -> Response<Body> {
    let admitted = async {
        let accept = validate(&req)?;
        let (slot, conn, peer) = admit(&req, &node, client, Transport::WebSocket).await?;
        Ok((accept, conn, peer, slot))
    };
    match admitted.await {
        Ok((accept, conn, peer, slot)) => start(req, node, slot, conn, peer, &accept),
        Err((reason, refusal)) => {
            tracing::debug!(%client, ?reason, "upgrade refused");
            node.metrics.rejected(reason);
            let mut r = refusal.into_response();
            if reason == RejectReason::BadRequest {
                r.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            r
        }
    }
}

/// Checks that `req` is a WebSocket handshake; returns the `Sec-WebSocket-Accept` value.
fn validate(req: &Request<Incoming>) -> Result<String, Rejected> {
    let headers = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    let key = headers.get(header::SEC_WEBSOCKET_KEY);
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    match key {
        Some(key)
            if req.method() == Method::GET
                && has_token(header::CONNECTION, "upgrade")
                && has_token(header::UPGRADE, "websocket")
                && version_ok =>
        {
            Ok(derive_accept_key(key.as_bytes()))
        }
        _ => Err((
            RejectReason::BadRequest,
            Refusal::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                "expected a WebSocket upgrade (GET, Connection: Upgrade, Upgrade: websocket, Sec-WebSocket-Version: 13)",
            ),
        )),
    }
}

/// Decides whether this node takes the client (`/ws`, `/sse`): the slot (drain, origin,
/// node and address limits) first, before any work is done for the client, the connect
/// hook's call included; then who the client is ([`authenticate`]); then the user's
/// limit, once the user is known. On yes, the slot held, the connection's id, and the
/// client.
pub(super) async fn admit(
    req: &Request<Incoming>,
    node: &Arc<Node>,
    client: IpAddr,
    transport: Transport,
) -> Result<(Slot, ConnId, Peer), Rejected> {
    let mut slot = take_slot(req.headers(), node, client, transport)?;
    let conn = node.next_conn_id();
    let peer = authenticate(req, node, Some(conn), client, transport, || Ok(())).await?;
    if let Some(i) = &peer.identity {
        slot.count_user(&i.user).map_err(slot_refused)?;
    }
    Ok((slot, conn, peer))
}

fn take_slot(
    headers: &HeaderMap,
    node: &Arc<Node>,
    client: IpAddr,
    transport: Transport,
) -> Result<Slot, Rejected> {
    if node.is_draining() {
        return Err((
            RejectReason::Draining,
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "node is draining; connect to another node",
            ),
        ));
    }
    let origins = &node.config.auth.allowed_origins;
    if !origins.is_empty() {
        // Browsers send `Origin` on every WebSocket handshake, but not on a same-origin
        // GET (an SSE stream from the gateway's own site): there, none is no refusal.
        // One that is not text is no origin on the list (refused, never taken as none).
        let admitted = match headers.get(header::ORIGIN) {
            Some(o) => o.to_str().is_ok_and(|o| origin_allowed(origins, o)),
            None => transport == Transport::Sse,
        };
        if !admitted {
            return Err((
                RejectReason::Origin,
                Refusal::new(
                    StatusCode::FORBIDDEN,
                    ErrorCode::Forbidden,
                    "origin not allowed",
                ),
            ));
        }
    }
    node.take_slot(client).map_err(slot_refused)
}

/// Why a slot was refused, as the client is told.
pub(super) fn slot_refused(refused: SlotRefused) -> Rejected {
    match refused {
        SlotRefused::Node => (
            RejectReason::Limit,
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "node is at its connection limit; try another node or later",
            ),
        ),
        SlotRefused::PerIp => (
            RejectReason::PerIp,
            Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::TooManyConnections,
                "too many connections from this address (limits.max_connections_per_ip)",
            ),
        ),
        SlotRefused::PerUser => (
            RejectReason::PerUser,
            Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::TooManyConnections,
                "too many connections for this user (limits.max_connections_per_user)",
            ),
        ),
    }
}

/// Runs a WebSocket session over the socket's halves: tungstenite reads; Herald frames
/// and writes what it sends (`wire`).
async fn serve<R, W>(
    rd: R,
    wr: W,
    ws_config: WebSocketConfig,
    node: Arc<Node>,
    conn: ConnId,
    peer: Peer,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + crate::wire::WriteSocket + Unpin + Send + 'static,
{
    let ws = &node.config.websocket;
    let deflate = peer.deflate.then_some(Deflate {
        level: ws.deflate_level,
        min_bytes: ws.deflate_min_bytes,
    });
    let rd = Inflating::new(rd, deflate.is_some(), node.config.limits.max_message_bytes);
    let stream =
        WebSocketStream::from_raw_socket(ReadHalf(rd), WsRole::Server, Some(ws_config)).await;
    let progress = crate::wire::Progress::default();
    let sink = WsSink::new(wr, ws.write_buffer_bytes, deflate, progress.clone());
    session::run(sink, progress, stream, node, conn, peer).await;
}

/// Spawns the session (it runs once hyper hands over the connection) and answers 101.
fn start(
    req: Request<Incoming>,
    node: Arc<Node>,
    slot: Slot,
    conn: ConnId,
    peer: Peer,
    accept: &str,
) -> Response<Body> {
    tracing::debug!(conn, client = %peer.address, "upgrade accepted");
    let mut peer = peer;
    let deflate = node
        .config
        .websocket
        .deflate
        .then(|| {
            crate::deflate::negotiate(
                req.headers()
                    .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
            )
        })
        .flatten();
    peer.deflate = deflate.is_some();
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(node.config.websocket.read_buffer_bytes)
        // What tungstenite writes (its own pong and close replies) is discarded
        // (`wire::ReadHalf`): it needs no write buffer.
        .write_buffer_size(0)
        .max_message_size(Some(node.config.limits.max_message_bytes))
        .max_frame_size(Some(node.config.limits.max_message_bytes));
    // Take the upgrade handle now, so the task holds it rather than the whole request,
    // and box the stream setup: the task lives as long as the session, and its size is
    // that of its largest state.
    let upgrade = hyper::upgrade::on(req);
    let tasks = node.session_tasks.clone();
    tasks.spawn(async move {
        let _slot = slot;
        match upgrade.await {
            // A plain TCP connection is split into its own halves (no lock between
            // them, no layers of the upgrade's I/O on every write); others (TLS) through
            // tokio's split.
            Ok(upgraded) => match upgraded.downcast::<TokioIo<TcpStream>>() {
                Ok(parts) => {
                    let (rd, wr) = parts.io.into_inner().into_split();
                    // What hyper read past the handshake comes first.
                    let rd = std::io::Cursor::new(parts.read_buf).chain(rd);
                    Box::pin(serve(rd, wr, ws_config, node, conn, peer)).await;
                }
                Err(upgraded) => {
                    let (rd, wr) = tokio::io::split(TokioIo::new(upgraded));
                    Box::pin(serve(rd, wr, ws_config, node, conn, peer)).await;
                }
            },
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    });
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(v) = deflate.and_then(|d| HeaderValue::from_str(&d).ok()) {
        h.insert(header::SEC_WEBSOCKET_EXTENSIONS, v);
    }
    r
}

/// Whether `origin` is in `allowed_origins` (an empty list allows every origin).
pub(super) fn origin_allowed(allowed: &[String], origin: &str) -> bool {
    allowed.is_empty() || allowed.iter().any(|a| origin_matches(a, origin))
}

/// Whether `origin` is allowed by `pattern`: an exact origin, or one with a single `*`
/// standing for one or more DNS labels (`https://*.example.com` allows
/// `https://app.example.com` and `https://a.b.example.com`, not `https://example.com`
/// nor `https://evil.com?.example.com`).
fn origin_matches(pattern: &str, origin: &str) -> bool {
    let Some((prefix, suffix)) = pattern.split_once('*') else {
        return pattern == origin;
    };
    origin.len() > prefix.len() + suffix.len()
        && origin.starts_with(prefix)
        && origin.ends_with(suffix)
        && origin[prefix.len()..origin.len() - suffix.len()]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::origin_matches;

    #[test]
    fn origin_patterns() {
        let p = "https://*.example.com";
        assert!(origin_matches(p, "https://app.example.com"));
        assert!(origin_matches(p, "https://a.b.example.com"));
        for no in [
            "https://example.com",
            "http://app.example.com",
            "https://app.example.com.evil.io",
            "https://evil.com/.example.com",
            "https://evil.com?.example.com",
        ] {
            assert!(!origin_matches(p, no), "{no}");
        }
        assert!(origin_matches("https://x.io", "https://x.io"));
        assert!(!origin_matches("https://x.io", "https://x.io.evil"));
    }
}
