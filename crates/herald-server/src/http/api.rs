//! The publish API (`POST /api/publish`, `/api/publish/{channel}`, `/api/batch`) and
//! history (`GET /api/history/{channel}`).
//!
//! The bodies are `herald_protocol::api`'s; this module adds what is HTTP: the API key,
//! the method, content types, the body-size limit and status codes.

use bytes::Bytes;
use herald_auth::KeyCheck;
use herald_broker::{BrokerError, Published};
use herald_metrics::Source;
use herald_protocol::{api, ChannelName, ChannelPatterns, ErrorCode, Payload, Publication};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header;
use hyper::{Method, Request, Response, StatusCode};

use super::reply::{json, Body, Refusal};
use crate::node::{Node, Outgoing};

/// Serves one request under `/api/`.
pub(crate) async fn handle(req: Request<Incoming>, node: &Node) -> Response<Body> {
    match serve(req, node).await {
        Ok(r) => r,
        Err(refusal) => refusal.into_response(),
    }
}

/// `docs/openapi.yaml` (and `docs/openapi.json`, the same document generated from it),
/// compiled in: the contract of exactly this build's API.
const OPENAPI_YAML: &str = include_str!("../../../../docs/openapi.yaml");
const OPENAPI_JSON: &str = include_str!("../../../../docs/openapi.json");

async fn serve(req: Request<Incoming>, node: &Node) -> Result<Response<Body>, Refusal> {
    let path = req.uri().path().to_owned();
    let document = match path.as_str() {
        "/api/openapi.yaml" => Some((OPENAPI_YAML, "application/yaml")),
        "/api/openapi.json" => Some((OPENAPI_JSON, "application/json")),
        _ => None,
    };
    if let Some((text, content_type)) = document {
        if req.method() != Method::GET {
            return Err(Refusal::method_not_allowed("GET"));
        }
        authorize(&req, node)?;
        let mut r = Response::new(super::reply::full(text));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(content_type),
        );
        return Ok(r);
    }
    if super::admin::serves(&path) {
        return super::admin::serve(req, &path, node).await;
    }
    for (prefix, stats) in [("/api/presence/", false), ("/api/presence_stats/", true)] {
        if let Some(name) = path.strip_prefix(prefix) {
            if req.method() != Method::GET {
                return Err(Refusal::method_not_allowed("GET"));
            }
            let scope = authorize(&req, node)?;
            let query = req.uri().query().unwrap_or("");
            return presence(name, query, scope, node, stats).await;
        }
    }
    if let Some(name) = path.strip_prefix("/api/history/") {
        if req.method() != Method::GET {
            return Err(Refusal::method_not_allowed("GET"));
        }
        let scope = authorize(&req, node)?;
        return history(name, req.uri().query().unwrap_or(""), scope, node).await;
    }
    if req.method() != Method::POST {
        return Err(Refusal::method_not_allowed("POST"));
    }
    let scope = authorize(&req, node)?;
    if matches!(path.as_str(), "/api/publish" | "/api/batch") {
        require_json(&req)?;
    }
    let content_type = content_type(&req);
    let body = read_body(req, &node.config.limits).await?;
    let (batch, single) = match path.as_str() {
        "/api/publish" => (
            vec![api::parse_publish(&body).map_err(Refusal::body)?],
            true,
        ),
        "/api/batch" => (
            api::parse_batch(&body, node.config.limits.max_batch).map_err(Refusal::body)?,
            false,
        ),
        p => match p.strip_prefix("/api/publish/") {
            Some(name) => (
                vec![api::Publish {
                    publication: raw(name, content_type.as_deref(), body)?,
                    idempotency_key: None,
                }],
                true,
            ),
            None => return Err(Refusal::not_found()),
        },
    };
    for p in &batch {
        in_scope(scope, &p.publication.channel)?;
        if let Some(why) = node.too_large(&p.publication) {
            return Err(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::TooLarge,
                why,
            ));
        }
    }
    let batch = batch
        .into_iter()
        .map(|p| Outgoing::new(p.publication, p.idempotency_key))
        .collect();
    match node.publish(batch, Source::Http).await {
        Ok(results) => Ok(published(&results, single)),
        Err(BrokerError::Partial(results)) => Ok(partly_published(&results)),
        Err(e) => Err(broker_refusal(e)),
    }
}

/// The 502 reply to a batch of which some entries were published and others failed:
/// each entry's outcome, so that the caller retries exactly the failed ones.
fn partly_published(results: &[Result<Published, BrokerError>]) -> Response<Body> {
    tracing::warn!(
        error = %BrokerError::Partial(results.to_vec()),
        "batch partly published"
    );
    let outcomes: Vec<Result<api::Outcome, (ErrorCode, &str)>> = results
        .iter()
        .map(|r| match r {
            Ok(p) => Ok(api::Outcome {
                position: p.position,
                duplicate: p.duplicate,
            }),
            Err(BrokerError::Unavailable(_) | BrokerError::Closed) => Err((
                ErrorCode::Unavailable,
                "the broker refused this entry; it was not published",
            )),
            Err(_) => Err((
                ErrorCode::UnknownOutcome,
                "this entry may or may not have been published; retry it with its \
                 idempotency_key to publish it exactly once",
            )),
        })
        .collect();
    json(StatusCode::BAD_GATEWAY, api::partly_published(&outcomes))
}

/// 415 unless the body is `application/json`: a browser page can send `text/plain` or
/// form bodies cross-site without a preflight, so accepting them would let any web page
/// publish into a node it can reach.
pub(super) fn require_json(req: &Request<Incoming>) -> Result<(), Refusal> {
    if content_type(req).as_deref() == Some("application/json") {
        return Ok(());
    }
    Err(Refusal::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorCode::BadRequest,
        "Content-Type must be application/json",
    ))
}

/// The 200 reply to a publish: one outcome (`single`) or a batch's.
pub(super) fn published(results: &[Published], single: bool) -> Response<Body> {
    let outcomes: Vec<api::Outcome> = results
        .iter()
        .map(|r| api::Outcome {
            position: r.position,
            duplicate: r.duplicate,
        })
        .collect();
    let body = match (single, outcomes.first()) {
        (true, Some(o)) => api::published(o),
        _ => api::published_batch(&outcomes),
    };
    json(StatusCode::OK, body)
}

/// What a broker failure means to an API caller. The broker's own text may name
/// internals (hosts, Redis errors): it is logged, not sent.
pub(super) fn broker_refusal(e: BrokerError) -> Refusal {
    match e {
        BrokerError::Timeout => Refusal::new(
            StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::UnknownOutcome,
            "the broker did not answer in time: the publication may or may not have been \
             published; retry with the same idempotency_key to publish it exactly once",
        ),
        BrokerError::UnknownOutcome(why) => {
            tracing::warn!(error = %why, "publish outcome unknown");
            Refusal::new(
                StatusCode::GATEWAY_TIMEOUT,
                ErrorCode::UnknownOutcome,
                "the broker failed while the request was in flight (or part of a batch was \
                 published before an entry failed): publications may or may not have been \
                 published; retry with the same idempotency_key to publish each exactly once",
            )
        }
        BrokerError::Unavailable(why) => {
            tracing::warn!(error = %why, "broker refused a request");
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "the broker is unavailable; nothing was published; retry later",
            )
        }
        // Only a batch's publish answers this, with its own reply
        // (`partly_published`); anything else reading this far gets the honest summary.
        BrokerError::Partial(_) => Refusal::new(
            StatusCode::BAD_GATEWAY,
            ErrorCode::Partial,
            "some entries were published and others failed",
        ),
        BrokerError::Closed => Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "the node is shutting down; nothing was published",
        ),
    }
}

/// `GET /api/presence/{channel}?cursor=&limit=` and `GET /api/presence_stats/{channel}`.
async fn presence(
    name: &str,
    query: &str,
    scope: Option<&ChannelPatterns>,
    node: &Node,
    stats: bool,
) -> Result<Response<Body>, Refusal> {
    use herald_protocol::presence as wire;
    let channel = path_channel(name)?;
    in_scope(scope, &channel)?;
    if crate::presence::rule(node, channel.as_str()).is_none() {
        return Err(Refusal::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "this channel keeps no presence (no [[channels.rules]] entry with presence = true)",
        ));
    }
    let unavailable = |e: BrokerError| {
        tracing::debug!(error = %e, "presence read failed");
        Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "presence could not be read; retry later",
        )
    };
    if stats {
        if !query.is_empty() {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                "presence_stats takes no parameters",
            ));
        }
        let st = crate::presence::stats(node, &channel)
            .await
            .map_err(unavailable)?;
        return Ok(json(
            StatusCode::OK,
            wire::stats_body(st.connections, st.users),
        ));
    }
    let q = wire::parse_page_query(query).map_err(Refusal::body)?;
    if q.cursor
        .as_deref()
        .is_some_and(|c| !crate::presence::valid_cursor(c))
    {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "cursor: not one a presence page gave",
        ));
    }
    let max = node.config.presence.page_size;
    let limit = q.limit.unwrap_or(max).min(max);
    let page = crate::presence::page(node, &channel, q.cursor, limit)
        .await
        .map_err(unavailable)?;
    Ok(json(
        StatusCode::OK,
        wire::page_body(&page.members, page.cursor.as_deref()),
    ))
}

/// `GET /api/history/{channel}?since=&epoch=&limit=`.
async fn history(
    name: &str,
    query: &str,
    scope: Option<&ChannelPatterns>,
    node: &Node,
) -> Result<Response<Body>, Refusal> {
    let channel = path_channel(name)?;
    in_scope(scope, &channel)?;
    let q = api::parse_history_query(query).map_err(Refusal::body)?;
    let Some(policy) = node.config.channels.history(channel.as_str()) else {
        return Err(Refusal::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "this channel keeps no history (no [[channels.rules]] entry with history_size > 0)",
        ));
    };
    let max = node.config.limits.max_history_page;
    let limit = q.limit.unwrap_or(max).min(max);
    let page = node
        .broker
        .history(&channel, policy, q.since, limit, None)
        .await
        .map_err(broker_refusal)?;
    // From a start (`since=0` and the start token a read answered), any epoch that
    // cannot have been preceded by a vanished one continues it.
    let same_epoch = !q.bad_epoch
        && q.epoch.is_none_or(|e| {
            e == page.top.epoch || (q.since == 0 && e.start_continues(page.now, policy.meta_ttl))
        });
    let first = page.publications.first().and_then(Publication::offset);
    let complete = same_epoch
        && q.since <= page.top.offset
        && (q.since == page.top.offset || first == Some(q.since + 1));
    let publications = if same_epoch {
        &page.publications[..]
    } else {
        &[]
    };
    Ok(json(
        StatusCode::OK,
        api::history(page.top, complete, publications),
    ))
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

/// Checks the API key; returns the channels it may use (`None`: no key is configured,
/// every channel).
pub(super) fn authorize<'n>(
    req: &Request<Incoming>,
    node: &'n Node,
) -> Result<Option<&'n ChannelPatterns>, Refusal> {
    match node.api_keys.check(super::edge::bearer(req.headers())) {
        KeyCheck::Open => Ok(None),
        KeyCheck::Key(channels) => Ok(Some(channels)),
        KeyCheck::Refused => Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "missing or wrong API key (Authorization: Bearer <key>)",
        )),
    }
}

/// 403 unless the key's scope covers `channel`.
fn in_scope(scope: Option<&ChannelPatterns>, channel: &ChannelName) -> Result<(), Refusal> {
    match scope {
        Some(s) if !s.matches(channel.as_str()) => Err(Refusal::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!("this API key may not use channel {channel}"),
        )),
        _ => Ok(()),
    }
}

pub(super) async fn read_body(
    req: Request<Incoming>,
    limits: &crate::config::LimitsConfig,
) -> Result<Bytes, Refusal> {
    let max = limits.max_body_bytes;
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
    let read = tokio::time::timeout(
        limits.body_timeout,
        Limited::new(req.into_body(), max).collect(),
    );
    let Ok(read) = read.await else {
        return Err(Refusal::new(
            StatusCode::REQUEST_TIMEOUT,
            ErrorCode::RequestTimeout,
            format!(
                "the request body did not arrive within {:?}",
                limits.body_timeout
            ),
        ));
    };
    match read {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(_) => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "could not read the request body",
        )),
    }
}

/// A channel name taken from the request path.
fn path_channel(name: &str) -> Result<ChannelName, Refusal> {
    ChannelName::new(name).map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidChannel,
            e.to_string(),
        )
    })
}

/// `POST /api/publish/{channel}`: the body is the payload, typed by `Content-Type`.
fn raw(name: &str, content_type: Option<&str>, body: Bytes) -> Result<Publication, Refusal> {
    let channel = path_channel(name)?;
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
