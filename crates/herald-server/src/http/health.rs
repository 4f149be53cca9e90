//! `/healthz`, `/readyz` and `/metrics`.

use herald_protocol::{api, ErrorCode};
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use super::reply::{full, json, Body, Refusal};
use super::Role;
use crate::node::Node;

/// The process is up and serving HTTP.
pub(crate) fn healthz() -> Response<Body> {
    json(StatusCode::OK, api::status("ok"))
}

/// The node should get traffic: not draining and its broker is usable.
pub(crate) fn readyz(node: &Node) -> Response<Body> {
    match node.is_ready() {
        Ok(()) => json(StatusCode::OK, api::status("ready")),
        Err(why) => json(StatusCode::SERVICE_UNAVAILABLE, api::status(why)),
    }
}

/// The node's registry in Prometheus's text format, behind `auth.metrics_key` when it is
/// set; on the clients' listener (`role` `All`), behind an API key when one is set: the
/// metrics name channels, users' counts and the node's internals, which are nobody
/// else's business.
pub(crate) fn metrics(node: &Node, headers: &hyper::HeaderMap, role: Role) -> Response<Body> {
    use herald_metrics::prometheus::{Encoder, TextEncoder};
    let keys = if !node.metrics_key.is_empty() {
        Some(&node.metrics_key)
    } else if role == Role::All && !node.api_keys.is_empty() {
        Some(&node.api_keys)
    } else {
        None
    };
    if let Some(keys) = keys {
        if !matches!(
            keys.check(super::edge::bearer(headers)),
            herald_auth::KeyCheck::Key(_)
        ) {
            return Refusal::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "missing or wrong key for /metrics (Authorization: Bearer <key>)",
            )
            .into_response();
        }
    }
    let mut buf = Vec::with_capacity(16 * 1024);
    if let Err(e) = TextEncoder::new().encode(&node.registry.gather(), &mut buf) {
        return Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            e.to_string(),
        )
        .into_response();
    }
    let mut r = Response::new(full(buf));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}
