//! The publish API: `POST /api/publish`, `/api/publish/{channel}` and `/api/batch`.
//!
//! The bodies are `herald_protocol::api`'s; this module adds what is HTTP: the API key,
//! the method, content types, the body-size limit and status codes.

use bytes::Bytes;
use herald_metrics::Source;
use herald_protocol::{api, ChannelName, ErrorCode, Payload, Publication};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header;
use hyper::{Method, Request, Response, StatusCode};

use super::reply::{json, Body, Refusal};
use crate::node::Node;

/// Serves one request under `/api/`.
pub(crate) async fn handle(req: Request<Incoming>, node: &Node) -> Response<Body> {
    match publications(req, node).await {
        Ok(batch) => {
            let n = batch.len();
            match node.publish(batch, Source::Http).await {
                Ok(()) => json(StatusCode::OK, api::published(n)),
                Err(e) => Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Unavailable,
                    e.to_string(),
                )
                .into_response(),
            }
        }
        Err(refusal) => refusal.into_response(),
    }
}

/// The publications a request asks for, or why it is refused.
async fn publications(req: Request<Incoming>, node: &Node) -> Result<Vec<Publication>, Refusal> {
    if req.method() != Method::POST {
        return Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::MethodNotAllowed,
            "use POST",
        ));
    }
    authorize(&req, node)?;
    let path = req.uri().path().to_owned();
    let content_type = content_type(&req);
    let body = read_body(req, node.config.limits.max_body_bytes).await?;
    match path.as_str() {
        "/api/publish" => Ok(vec![api::parse_publish(&body).map_err(Refusal::body)?]),
        "/api/batch" => {
            api::parse_batch(&body, node.config.limits.max_batch).map_err(Refusal::body)
        }
        p => match p.strip_prefix("/api/publish/") {
            Some(name) => Ok(vec![raw(name, content_type.as_deref(), body)?]),
            None => Err(Refusal::not_found()),
        },
    }
}

/// The media type, lower-cased, without parameters.
fn content_type(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
}

fn authorize(req: &Request<Incoming>, node: &Node) -> Result<(), Refusal> {
    let Some(key) = node.config.auth.api_key.as_deref() else {
        return Ok(());
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => Ok(()),
        _ => Err(Refusal::new(
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

async fn read_body(req: Request<Incoming>, max: usize) -> Result<Bytes, Refusal> {
    let too_large = || {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            format!("request body is larger than {max} bytes"),
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
        Err(_) => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "could not read the request body",
        )),
    }
}

/// `POST /api/publish/{channel}`: the body is the payload, typed by `Content-Type`.
fn raw(name: &str, content_type: Option<&str>, body: Bytes) -> Result<Publication, Refusal> {
    let channel = ChannelName::new(name).map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidChannel,
            e.to_string(),
        )
    })?;
    let payload = match content_type {
        Some("application/json") => Payload::json(body).ok_or_else(|| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                "body is not valid JSON",
            )
        })?,
        Some("application/octet-stream") => Payload::Binary(body),
        _ => {
            return Err(Refusal::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorCode::BadRequest,
                "Content-Type must be application/json or application/octet-stream",
            ))
        }
    };
    Ok(Publication::now(channel, payload))
}
