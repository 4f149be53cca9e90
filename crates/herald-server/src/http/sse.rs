//! `GET /sse?channel=a&channel=b`: Server-Sent Events for clients that cannot hold a
//! WebSocket.
//!
//! An SSE connection is an ordinary session (`session::run`) whose transport is one
//! way: the same authentication, admission (drain, origin, slots, per-address and
//! per-user limits), permissions, recovery, queues, slow-consumer and write-timeout
//! rules and metrics as a WebSocket session. Its requests are the subscribes this
//! module makes for it, one per channel named in the URL, resuming from the positions
//! in `Last-Event-ID` (or `last_event_id`), asking for Fossil deltas with
//! `delta=fossil`; its frames become events (`SseSink`).

use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Sink, StreamExt};
use herald_metrics::{RejectReason, Source};
use herald_protocol::client::{encode_resume, with_delta};
use herald_protocol::sse::{self, Positions};
use herald_protocol::{ChannelName, ErrorCode, Payload};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::{CancellationToken, PollSender};

use super::api;
use super::connect::authenticate;
use super::reply::{Body, Refusal};
use super::upgrade::admit;
use crate::access;
use crate::backend;
use crate::node::{Node, Outgoing};
use crate::session::{self, Transport};
use crate::wire::Out;

/// Events buffered between the session's writer and the HTTP connection. The session's
/// own queue is the real buffer (bounded in bytes, slow consumers closed); this only
/// decouples the two tasks.
const BODY_CHUNKS: usize = 16;

/// Event bytes handed to the HTTP connection and not yet taken by it. The session's
/// queue budget counts frames; an event is bigger (its `id:` and `data:` lines, binary
/// frames as base64 JSON), so the sink counts the event bytes it actually hands over
/// and stops taking frames past `limits.outbound_queue_bytes` of them: a client that
/// reads nothing holds at most that much here, and the session's write timeout ends it.
#[derive(Default)]
struct InFlight {
    /// Event bytes handed to the connection and not yet taken by it.
    bytes: std::sync::atomic::AtomicUsize,
    /// The sink, waiting for the connection to take some.
    waker: futures_util::task::AtomicWaker,
}

impl InFlight {
    fn bytes(&self) -> usize {
        self.bytes.load(std::sync::atomic::Ordering::Acquire)
    }

    fn add(&self, n: usize) {
        self.bytes.fetch_add(n, std::sync::atomic::Ordering::AcqRel);
    }

    fn taken(&self, n: usize) {
        self.bytes.fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
        self.waker.wake();
    }
}

/// Serves `GET /sse`. `abort` drops the HTTP connection: fired when the session has
/// ended and its last events are still unwritten after `limits.close_timeout` (a client
/// that reads nothing would otherwise keep the connection, and every buffer on its
/// way, long after the session was closed and stopped being counted).
pub(crate) async fn sse(
    req: Request<Incoming>,
    node: Arc<Node>,
    client: IpAddr,
    abort: CancellationToken,
) -> Response<Body> {
    match open(&req, &node, client, abort).await {
        Ok(r) => r,
        Err((reason, refusal)) => {
            tracing::debug!(%client, ?reason, "sse refused");
            if let Some(reason) = reason {
                node.metrics.rejected(reason);
            }
            // With CORS headers, a page on another origin can read why.
            let mut r = refusal.into_response();
            allow_origin(&mut r, req.headers(), &node);
            r
        }
    }
}

type Refused = (Option<RejectReason>, Refusal);

fn bad(message: impl Into<String>) -> Refused {
    (
        Some(RejectReason::BadRequest),
        Refusal::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message),
    )
}

async fn open(
    req: &Request<Incoming>,
    node: &Arc<Node>,
    client: IpAddr,
    abort: CancellationToken,
) -> Result<Response<Body>, Refused> {
    if req.method() != Method::GET {
        return Err((None, Refusal::method_not_allowed("GET")));
    }
    let query = req.uri().query().unwrap_or("");
    let max = node.config.limits.max_sse_channels;
    let mut channels: Vec<ChannelName> = Vec::new();
    let mut last_event_id = None;
    let mut delta = false;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "channel" => {
                let c = ChannelName::new(&v).map_err(|e| {
                    (
                        Some(RejectReason::BadRequest),
                        Refusal::new(
                            StatusCode::BAD_REQUEST,
                            ErrorCode::InvalidChannel,
                            e.to_string(),
                        ),
                    )
                })?;
                if !channels.contains(&c) {
                    // Refused as soon as one too many is named: the duplicate check
                    // stays bounded by the limit, whatever the URL holds.
                    if channels.len() == max {
                        return Err(bad(format!(
                            "more than {max} channels named; an SSE connection takes at most {max} (limits.max_sse_channels)"
                        )));
                    }
                    channels.push(c);
                }
            }
            "last_event_id" => last_event_id = Some(v.into_owned()),
            "delta" if v == herald_protocol::delta::FOSSIL => delta = true,
            "delta" => return Err(bad("delta: the one format is \"fossil\"")),
            _ => {}
        }
    }
    if channels.is_empty() {
        return Err(bad(
            "name at least one channel: /sse?channel=news&channel=chat",
        ));
    }
    let (slot, conn, peer) = admit(req, node, client, Transport::Sse)
        .await
        .map_err(|(r, f)| (Some(r), f))?;
    let identity = peer.identity.as_ref();
    // Refuse up front what the session would refuse channel by channel: an SSE client
    // cannot send subscription tokens, so the rules and its token decide (or, for
    // `subscribe = "hook"` channels, the backend, asked by the session: a refusal is
    // an error event).
    let config = &node.config.channels;
    if let Some(c) = channels.iter().find(|c| {
        !access::may_subscribe(config, c.as_str(), identity, None)
            && access::subscribe_hook(config, c.as_str(), identity, false) != Some(true)
    }) {
        return Err((
            Some(RejectReason::Forbidden),
            Refusal::new(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                format!("not allowed to subscribe to {c}"),
            ),
        ));
    }
    // The browser's reconnect sends the last id as a header; clients that reconnect
    // by hand (or through proxies that drop it) can put it in the URL.
    let last = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(last_event_id);
    let mut positions = last.as_deref().map(Positions::parse).unwrap_or_default();
    positions.retain(&channels);

    tracing::debug!(conn, %client, channels = channels.len(), "sse accepted");
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(BODY_CHUNKS);
    // Spread reconnects after a drain over 1-4 s instead of the browser's default 3 s
    // for everyone at once.
    let retry = 1000 + (conn.wrapping_mul(2_654_435_761) ^ node.now_ms()) % 3000;
    let inflight = Arc::new(InFlight::default());
    let first = Bytes::from(sse::retry(retry));
    inflight.add(first.len());
    let _ = tx.try_send(first);
    let ended = CancellationToken::new();
    // A client that goes away closes the HTTP connection, which drops the body: end the
    // session then, not at the next heartbeat's failed write (up to 25 s later, counted
    // and holding a slot all along).
    {
        let (body, gone) = (tx.clone(), ended.clone());
        node.session_tasks.spawn(async move {
            tokio::select! {
                _ = body.closed() => gone.cancel(),
                _ = gone.cancelled() => {}
            }
        });
    }
    let requests: Vec<Result<Message, WsError>> = channels
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut frame = encode_resume(c, Some(i as u64 + 1), positions.get(c));
            if delta {
                frame = with_delta(frame);
            }
            Ok(Message::Text(frame.into()))
        })
        .collect();
    let until_ended = ended.clone();
    let incoming = futures_util::stream::iter(requests).chain(
        futures_util::stream::once(async move { until_ended.cancelled_owned().await })
            .filter_map(|()| async { None }),
    );
    let progress = crate::wire::Progress::default();
    let sink = SseSink {
        tx: PollSender::new(tx),
        positions,
        ended,
        inflight: inflight.clone(),
        max_inflight: node.config.limits.outbound_queue_bytes,
        progress: progress.clone(),
        waited: false,
    };
    // Set once the connection has taken the last event (the body ended), or has gone
    // (the body was dropped: nothing is left to wait for).
    let drained = CancellationToken::new();
    let session_node = node.clone();
    let (drained2, close_timeout) = (drained.clone(), node.config.limits.close_timeout);
    node.session_tasks.spawn(async move {
        let _slot = slot;
        session::run(sink, progress, Box::pin(incoming), session_node, conn, peer).await;
        // The session is over; its events get `close_timeout` to be taken, then the
        // connection goes, with whatever it still holds.
        if tokio::time::timeout(close_timeout, drained2.cancelled())
            .await
            .is_err()
        {
            tracing::debug!(
                conn,
                "sse connection dropped: its last events were not taken"
            );
            abort.cancel();
        }
    });

    let gone = drained.clone().drop_guard();
    let body = StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(move |b| {
                let _held_by_the_body = &gone;
                inflight.taken(b.len());
                Ok::<_, Infallible>(Frame::data(b))
            })
            .chain(futures_util::stream::poll_fn(move |_| {
                drained.cancel();
                Poll::Ready(None)
            })),
    );
    let mut r = Response::new(BodyExt::boxed(body));
    allow_origin(&mut r, req.headers(), node);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx and similar proxies would otherwise buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(r)
}

/// CORS for the SSE endpoints, so that a page on `www.` can use a gateway on `rt.`
/// (tokens travel in the `Authorization` header; credentials mode only for cookie
/// sessions): a request with an `Origin` that `auth.allowed_origins` admits (every origin
/// when the list is empty) gets it back in `Access-Control-Allow-Origin`.
pub(crate) fn allow_origin(r: &mut Response<Body>, req: &hyper::HeaderMap, node: &Node) {
    let Some(origin) = req.get(header::ORIGIN) else {
        return;
    };
    let allowed = origin
        .to_str()
        .is_ok_and(|o| super::upgrade::origin_allowed(&node.config.auth.allowed_origins, o));
    let h = r.headers_mut();
    h.insert(header::VARY, HeaderValue::from_static("origin"));
    if allowed {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        // Cookie sessions (the connect hook forwards cookies): a page on another listed
        // origin opens the stream `withCredentials`. Never with an open list (start-up
        // refuses cookie forwarding without one).
        if node.forwards_cookies() {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }
}

/// `OPTIONS /sse` and `OPTIONS /sse/publish`: a browser's preflight. Answered 204 with
/// what the endpoint takes when the origin is admitted, 403 otherwise.
pub(crate) fn preflight(
    req: &Request<Incoming>,
    node: &Node,
    methods: &'static str,
) -> Response<Body> {
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok());
    if !origin.is_some_and(|o| super::upgrade::origin_allowed(&node.config.auth.allowed_origins, o))
    {
        return Refusal::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "origin not allowed",
        )
        .into_response();
    }
    let mut r = Response::new(BodyExt::boxed(http_body_util::Empty::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    allow_origin(&mut r, req.headers(), node);
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(methods),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type, last-event-id"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    r
}

/// The session's socket, as seen by its writer: frames in, events out.
struct SseSink {
    /// Events to the HTTP response body (bounded: `BODY_CHUNKS`).
    tx: PollSender<Bytes>,
    /// Where each history channel stands, for the event ids.
    positions: Positions,
    /// Fired once the close event is written: the session's request stream ends, so
    /// the session does not wait for a close reply an SSE client cannot send.
    ended: CancellationToken,
    /// Event bytes handed over and not yet taken by the connection.
    inflight: Arc<InFlight>,
    /// `limits.outbound_queue_bytes`: no more frames are taken past this many.
    max_inflight: usize,
    /// Counts events taken after the connection made us wait.
    progress: crate::wire::Progress,
    /// The last event had to wait for the connection.
    waited: bool,
}

impl SseSink {
    /// A data event for `frame`, with an id when it moved a channel's position.
    fn event(&mut self, frame: &str) -> String {
        let id = if self.positions.observe(frame) {
            self.positions.id()
        } else {
            None
        };
        sse::event(id.as_deref(), frame)
    }
}

impl crate::wire::SessionSink for SseSink {
    /// Events go to the HTTP connection as they are sent: nothing is held here.
    fn discard_unsent(self: Pin<&mut Self>) {}
}

impl Sink<Out> for SseSink {
    type Error = WsError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let this = self.get_mut();
        if this.inflight.bytes() > this.max_inflight {
            this.inflight.waker.register(cx.waker());
            // Taken meanwhile: the wake-up may have come before the registration.
            if this.inflight.bytes() > this.max_inflight {
                this.waited = true;
                return Poll::Pending;
            }
        }
        let Poll::Ready(reserved) = this.tx.poll_reserve(cx) else {
            this.waited = true;
            return Poll::Pending;
        };
        this.progress.after_wait(&mut this.waited);
        Poll::Ready(reserved.map_err(|_| WsError::ConnectionClosed))
    }

    fn start_send(self: Pin<&mut Self>, out: Out) -> Result<(), WsError> {
        let this = self.get_mut();
        // A run of deliveries becomes one chunk of events.
        let mut event = String::new();
        for msg in out.into_messages() {
            match msg {
                Message::Text(t) => event.push_str(&this.event(t.as_str())),
                Message::Binary(b) => {
                    if let Some(frame) = sse::binary_as_json(&b) {
                        event.push_str(&this.event(&frame));
                    }
                }
                Message::Ping(_) => event.push_str(&sse::comment("ping")),
                Message::Close(frame) => {
                    let (code, reason) = frame.map_or((1000, String::new()), |f| {
                        (u16::from(f.code), f.reason.to_string())
                    });
                    this.ended.cancel();
                    event.push_str(&sse::close_event(code, &reason));
                }
                Message::Pong(_) | Message::Frame(_) => {}
            }
        }
        if event.is_empty() {
            this.tx.abort_send();
            return Ok(());
        }
        this.inflight.add(event.len());
        this.tx
            .send_item(Bytes::from(event))
            .map_err(|_| WsError::ConnectionClosed)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        // Events are handed to the HTTP connection as they are sent; it writes them.
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let this = self.get_mut();
        this.tx.close();
        this.ended.cancel();
        Poll::Ready(Ok(()))
    }
}

/// `POST /sse/publish`: a publish from a client that has no WebSocket, with its
/// connection token (`Authorization: Bearer`, or `access_token`) and the same
/// permissions as a WebSocket `publish`. Body: `{"channel":"chat:1","data":...}` as
/// `application/json`; the reply is the API's (`offset`/`epoch` on history channels).
pub(crate) async fn publish(
    req: Request<Incoming>,
    node: Arc<Node>,
    client: IpAddr,
) -> Response<Body> {
    let origin = req.headers().get(header::ORIGIN).cloned();
    let mut r = match publish_inner(req, &node, client).await {
        Ok(r) => r,
        Err(refusal) => refusal.into_response(),
    };
    let mut headers = hyper::HeaderMap::new();
    if let Some(o) = origin {
        headers.insert(header::ORIGIN, o);
    }
    allow_origin(&mut r, &headers, &node);
    r
}

async fn publish_inner(
    req: Request<Incoming>,
    node: &Node,
    client: IpAddr,
) -> Result<Response<Body>, Refusal> {
    if req.method() != Method::POST {
        return Err(Refusal::method_not_allowed("POST"));
    }
    // Everything cheap first, so that a request the node refuses anyway never reaches
    // the application's backend: a page of another site (its browser sends the
    // user's cookies along), a body that is not JSON.
    let origins = &node.config.auth.allowed_origins;
    // One that is not text is no origin on the list.
    let listed = |o: &HeaderValue| {
        o.to_str()
            .is_ok_and(|o| super::upgrade::origin_allowed(origins, o))
    };
    if req
        .headers()
        .get(header::ORIGIN)
        .is_some_and(|o| !listed(o))
    {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "origin not allowed",
        ));
    }
    api::require_json(&req)?;
    let rate_limited = || {
        node.metrics
            .client_errors
            .with_label_values(&[ErrorCode::RateLimited.as_str()])
            .inc();
        Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            "more publishes than limits.messages_per_second / message_burst allow",
        )
    };
    // A publish is no session (no connection slot, no per-address connection limit):
    // the connect hook, when it must be asked, is asked only within the address's
    // publish rate.
    let gated = std::sync::atomic::AtomicBool::new(false);
    let gate = || {
        gated.store(true, std::sync::atomic::Ordering::Relaxed);
        if node.sessionless_publish_allowed(None, client) {
            Ok(())
        } else {
            Err((RejectReason::HookRefused, rate_limited()))
        }
    };
    let identity = authenticate(&req, node, None, client, Transport::Sse, gate)
        .await
        .map_err(|(_, f)| f)?
        .identity;
    // Before the body is read: a client over its rate costs as little as possible. An
    // anonymous one the gate already counted is not counted twice.
    let user = identity.as_ref().map(|i| i.user.as_str());
    let counted = gated.load(std::sync::atomic::Ordering::Relaxed) && user.is_none();
    if !counted && !node.sessionless_publish_allowed(user, client) {
        return Err(rate_limited());
    }
    let body = api::read_body(req, &node.config.limits).await?;
    let mut p = herald_protocol::api::parse_publish(&body).map_err(Refusal::body)?;
    let channel = p.publication.channel.clone();
    let forbidden = || {
        node.metrics
            .client_errors
            .with_label_values(&[ErrorCode::Forbidden.as_str()])
            .inc();
        Refusal::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!("not allowed to publish to {channel}"),
        )
    };
    let mut skip_history = false;
    let config = &node.config.channels;
    match access::publish_hook(config, channel.as_str(), identity.as_ref()) {
        None if access::may_publish(config, channel.as_str(), identity.as_ref()) => {}
        None | Some(false) => return Err(forbidden()),
        // `publish = "hook"`: the backend decides, as for a WebSocket client's publish;
        // there is no connection to close, so a disconnect is a refusal.
        Some(true) => {
            let caller = backend::Caller {
                conn: String::new(),
                user: user.unwrap_or(""),
                address: client,
                transport: Transport::Sse.name(),
            };
            let payload =
                std::mem::replace(&mut p.publication.payload, Payload::Json(Bytes::new()));
            match backend::publish(node, &caller, channel.as_str(), payload).await {
                backend::Answer::Allow(allowed) => {
                    p.publication.payload = allowed.payload;
                    skip_history = allowed.skip_history;
                }
                backend::Answer::Refuse { code, message } => {
                    return Err(Refusal::by_hook(StatusCode::FORBIDDEN, code, message))
                }
                backend::Answer::Disconnect { code, reason } => {
                    return Err(Refusal::by_hook(StatusCode::FORBIDDEN, code.into(), reason))
                }
                backend::Answer::Failed => {
                    return Err(Refusal::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        ErrorCode::Unavailable,
                        "the application's backend did not answer; nothing was published",
                    ))
                }
            }
        }
    }
    // The same limits as a WebSocket client's publish: `max_message_bytes` for the
    // message, and never more than a subscriber's queue holds.
    let max = node.config.limits.max_message_bytes;
    if p.publication.payload.len() > max {
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            format!("the data is larger than limits.max_message_bytes ({max})"),
        ));
    }
    if let Some(why) = node.too_large(&p.publication) {
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            why,
        ));
    }
    let key = p.idempotency_key.map(|k| Node::client_key(user, k));
    let results = node
        .publish(
            vec![Outgoing {
                publication: p.publication,
                key,
                skip_history,
            }],
            Source::Client,
        )
        .await
        .map_err(api::broker_refusal)?;
    Ok(api::published(&results, true))
}
