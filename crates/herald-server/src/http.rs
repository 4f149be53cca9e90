//! HTTP: routing, the publish API, health/readiness/metrics, and the WebSocket upgrade.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use herald_metrics::{RejectReason, Source};
use herald_protocol::server::json_string;
use herald_protocol::{ChannelName, ErrorCode, Payload, Publication};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::{session, Shared};

type Body = Full<Bytes>;

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// `/ws`, `/healthz`, `/readyz`.
    Public,
    /// `/api/*`, `/metrics`, `/healthz`, `/readyz`.
    Internal,
    /// Everything (one listener).
    All,
}

/// Accepts connections until `stop` is cancelled.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    role: Role,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let (stream, _peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors, most likely: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(5);
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let timeout = shared.config.limits.handshake_timeout;
            // A timeout before any request is a half-open handshake; one after is just
            // an idle keep-alive connection closing.
            let served = Arc::new(AtomicBool::new(false));
            let svc = {
                let shared = shared.clone();
                let served = served.clone();
                hyper::service::service_fn(move |req| {
                    served.store(true, Ordering::Relaxed);
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(route(req, shared, role).await) }
                })
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            if let Err(e) = conn.await {
                if e.is_timeout() && !served.load(Ordering::Relaxed) {
                    tracing::debug!("handshake timeout");
                    shared.metrics.rejected(RejectReason::HandshakeTimeout);
                }
            }
        });
    }
}

async fn route(req: Request<Incoming>, shared: Arc<Shared>, role: Role) -> Response<Body> {
    let public = matches!(role, Role::Public | Role::All);
    let internal = matches!(role, Role::Internal | Role::All);
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/healthz" => json(StatusCode::OK, r#"{"status":"ok"}"#.into()),
        "/readyz" => match shared.is_ready() {
            Ok(()) => json(StatusCode::OK, r#"{"status":"ready"}"#.into()),
            Err(why) => json(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(r#"{{"status":"{why}"}}"#),
            ),
        },
        "/ws" if public => upgrade(req, shared),
        "/metrics" if internal => metrics(&shared),
        p if internal && p.starts_with("/api/") => {
            if req.method() != Method::POST {
                return error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    ErrorCode::MethodNotAllowed,
                    "use POST",
                );
            }
            if let Err(e) = authorize(&req, &shared) {
                return e.into_response();
            }
            api(req, &shared, &path).await
        }
        _ => error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no such endpoint",
        ),
    }
}

fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, code: ErrorCode, message: &str) -> Response<Body> {
    json(
        status,
        format!(
            r#"{{"code":"{}","message":{}}}"#,
            code.as_str(),
            json_string(message)
        ),
    )
}

/// An API failure: status, code and message, rendered as a JSON error body.
struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: ErrorCode, message: &str) -> Self {
        ApiError {
            status,
            code,
            message: message.to_owned(),
        }
    }

    fn into_response(self) -> Response<Body> {
        error(self.status, self.code, &self.message)
    }
}

fn metrics(shared: &Shared) -> Response<Body> {
    use herald_metrics::prometheus::{Encoder, TextEncoder};
    let mut buf = Vec::with_capacity(16 * 1024);
    let encoder = TextEncoder::new();
    if let Err(e) = encoder.encode(&shared.registry.gather(), &mut buf) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            &e.to_string(),
        );
    }
    let mut r = Response::new(Full::new(Bytes::from(buf)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

fn authorize(req: &Request<Incoming>, shared: &Shared) -> Result<(), ApiError> {
    let Some(key) = shared.config.auth.api_key.as_deref() else {
        return Ok(());
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "missing or wrong API key (Authorization: Bearer <key>)",
        )),
    }
}

/// Compares secrets without leaking, through timing, how long a matching prefix is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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

async fn api(req: Request<Incoming>, shared: &Shared, path: &str) -> Response<Body> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let body = match read_body(req, shared.config.limits.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let batch = match path {
        "/api/publish" => match parse_publish(&body) {
            Ok(p) => vec![p],
            Err(e) => return e.into_response(),
        },
        "/api/batch" => match parse_batch(&body, shared.config.limits.max_batch) {
            Ok(ps) => ps,
            Err(e) => return e.into_response(),
        },
        p => match p.strip_prefix("/api/publish/") {
            Some(name) => match parse_raw(name, content_type.as_deref(), body) {
                Ok(p) => vec![p],
                Err(e) => return e.into_response(),
            },
            None => {
                return error(
                    StatusCode::NOT_FOUND,
                    ErrorCode::NotFound,
                    "no such endpoint",
                )
            }
        },
    };
    let n = batch.len();
    match shared.publish(batch, Source::Http).await {
        Ok(()) => json(StatusCode::OK, format!(r#"{{"ok":true,"published":{n}}}"#)),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            &e.to_string(),
        ),
    }
}

async fn read_body(req: Request<Incoming>, max: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            &format!("request body is larger than {max} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), max).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "could not read the request body",
        )),
    }
}

fn bad_request(message: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
}

fn channel(name: &str) -> Result<ChannelName, ApiError> {
    ChannelName::new(name).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidChannel,
            &e.to_string(),
        )
    })
}

/// `data` is a slice of `body`: share it rather than copy.
fn data_of(body: &Bytes, data: &RawValue) -> Bytes {
    let part = data.get().as_bytes();
    let offset = part.as_ptr() as usize - body.as_ptr() as usize;
    body.slice(offset..offset + part.len())
}

fn parse_publish(body: &Bytes) -> Result<Publication, ApiError> {
    let p: PublishBody<'_> = serde_json::from_slice(body).map_err(|e| {
        bad_request(&format!(
            r#"expected {{"channel":"<name>","data":<JSON>}}: {e}"#
        ))
    })?;
    Ok(Publication::now(
        channel(p.channel)?,
        Payload::Json(data_of(body, p.data)),
    ))
}

fn parse_batch(body: &Bytes, max: usize) -> Result<Vec<Publication>, ApiError> {
    let b: BatchBody<'_> = serde_json::from_slice(body).map_err(|e| {
        bad_request(&format!(
            r#"expected {{"publications":[{{"channel":"<name>","data":<JSON>}}, ...]}}: {e}"#
        ))
    })?;
    if b.publications.len() > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            &format!("a batch holds at most {max} publications"),
        ));
    }
    // Validate every entry before publishing any, so a batch is accepted whole or not
    // at all.
    b.publications
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let c = ChannelName::new(p.channel).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::InvalidChannel,
                    &format!("publications[{i}]: {e}"),
                )
            })?;
            Ok(Publication::now(c, Payload::Json(data_of(body, p.data))))
        })
        .collect()
}

fn parse_raw(name: &str, content_type: Option<&str>, body: Bytes) -> Result<Publication, ApiError> {
    let channel = channel(name)?;
    let payload = match content_type {
        Some("application/json") => {
            Payload::json(body).ok_or_else(|| bad_request("body is not valid JSON"))?
        }
        Some("application/octet-stream") => Payload::Binary(body),
        _ => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorCode::BadRequest,
                "Content-Type must be application/json or application/octet-stream",
            ))
        }
    };
    Ok(Publication::now(channel, payload))
}

/// Releases a connection slot when the upgrade or the session ends.
struct Slot(Arc<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.n_slots.fetch_sub(1, Ordering::AcqRel);
    }
}

fn upgrade(req: Request<Incoming>, shared: Arc<Shared>) -> Response<Body> {
    let metrics = &shared.metrics;
    if shared.is_draining() {
        metrics.rejected(RejectReason::Draining);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "node is draining; connect to another node",
        );
    }
    let headers = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    let key = headers.get(header::SEC_WEBSOCKET_KEY).cloned();
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    if req.method() != Method::GET
        || !has_token(header::CONNECTION, "upgrade")
        || !has_token(header::UPGRADE, "websocket")
        || !version_ok
        || key.is_none()
    {
        metrics.rejected(RejectReason::BadRequest);
        let mut r = error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "expected a WebSocket upgrade (GET, Connection: Upgrade, Upgrade: websocket, Sec-WebSocket-Version: 13)",
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return r;
    }
    let origins = &shared.config.auth.allowed_origins;
    if !origins.is_empty() {
        let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
        if !origin.is_some_and(|o| origins.iter().any(|a| a == o)) {
            metrics.rejected(RejectReason::Origin);
            return error(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                "origin not allowed",
            );
        }
    }
    let max = shared.config.limits.max_connections;
    if shared.n_slots.fetch_add(1, Ordering::AcqRel) >= max {
        shared.n_slots.fetch_sub(1, Ordering::AcqRel);
        metrics.rejected(RejectReason::Limit);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "node is at its connection limit; try another node or later",
        );
    }
    let slot = Slot(shared.clone());
    let accept = derive_accept_key(key.as_ref().map(|k| k.as_bytes()).unwrap_or_default());
    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(shared.config.websocket.read_buffer_bytes)
        .write_buffer_size(shared.config.websocket.write_buffer_bytes)
        .max_message_size(Some(shared.config.limits.max_message_bytes))
        .max_frame_size(Some(shared.config.limits.max_message_bytes));
    // Take the upgrade handle now, so the task holds it rather than the whole request,
    // and box the stream setup: the task lives as long as the session, and its size is
    // that of its largest state.
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let _slot = slot;
        match upgrade.await {
            Ok(upgraded) => {
                let ws = Box::pin(WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    WsRole::Server,
                    Some(ws_config),
                ))
                .await;
                let (sink, stream) = ws.split();
                session::run(sink, stream, shared, conn).await;
            }
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}
