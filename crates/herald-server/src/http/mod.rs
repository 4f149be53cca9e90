//! HTTP: the accept loop and routing. Each job has its own module:
//!
//! - `upgrade`: the WebSocket handshake on `/ws` (validate, admit, start);
//! - `sse`: `/sse`, the same sessions over Server-Sent Events;
//! - `demo`: the opt-in demo page and the JS client bundle;
//! - `api`: the publish API under `/api/`;
//! - `admin`: the control API under `/api/` (disconnect, subscribe, unsubscribe,
//!   channels, info: surveys of every node);
//! - `health`: `/healthz`, `/readyz`, `/metrics`;
//! - `connect`: who a connecting client is: its token, or the application's backend
//!   (the connect hook);
//! - `reply`: JSON responses and refusals (bodies from `herald_protocol::api`);
//! - `edge`: who the client is: its real address (PROXY protocol, `X-Forwarded-For`) and
//!   the bearer credential it presents.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herald_metrics::RejectReason;
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::error::ServerError;
use crate::node::Node;

mod admin;
mod api;
mod connect;
mod demo;
mod edge;
mod health;
mod reply;
mod sse;
mod upgrade;

use reply::{Body, Refusal};

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

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Internal => "internal",
            Role::Public | Role::All => "public",
        }
    }
}

/// Accepts connections until `stop` is cancelled; fails only when accepting cannot
/// work again (transient failures such as running out of file descriptors back off).
pub(crate) async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    role: Role,
    stop: CancellationToken,
) -> Result<(), ServerError> {
    let mut backoff = Duration::from_millis(5);
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) if is_per_connection(&e) => continue,
                Err(e) if is_resource_shortage(&e) => {
                    tracing::warn!(error = %e, "accept failed; backing off");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
                Err(source) => {
                    tracing::error!(error = %source, listener = role.name(), "accept failed");
                    return Err(ServerError::Listener { listener: role.name(), source });
                }
            },
        };
        backoff = Duration::from_millis(5);
        // The tracker counts live connection tasks (an upgraded WebSocket's task ends
        // once the session task owns the socket).
        if node.http_tasks.len() >= node.config.limits.max_http_connections {
            node.metrics.rejected(RejectReason::HttpLimit);
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let sndbuf = node.config.limits.socket_send_buffer_bytes;
        if sndbuf > 0 {
            if let Err(e) = socket2::SockRef::from(&stream).set_send_buffer_size(sndbuf) {
                tracing::debug!(error = %e, "SO_SNDBUF not set");
            }
        }
        let tasks = node.http_tasks.clone();
        tasks.spawn(connection(stream, peer, node.clone(), role, stop.clone()));
    }
}

/// The accepted connection failed, not the listener: take the next one.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Out of file descriptors, buffers or memory: it passes once connections close.
fn is_resource_shortage(e: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM (Linux numbers).
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// Serves one HTTP connection; on `stop`, finishes the request in flight and closes.
async fn connection(
    mut stream: TcpStream,
    mut peer: SocketAddr,
    node: Arc<Node>,
    role: Role,
    stop: CancellationToken,
) {
    let timeout = node.config.limits.handshake_timeout;
    if node.config.proxy.protocol && role != Role::Internal {
        match edge::read_proxy_header(&mut stream, peer, timeout).await {
            Ok(client) => peer = client,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "connection without a valid PROXY header");
                node.metrics.rejected(RejectReason::ProxyProtocol);
                return;
            }
        }
    }
    match node.tls.as_ref().filter(|_| role != Role::Internal) {
        Some(tls) => match tokio::time::timeout(timeout, tls.acceptor().accept(stream)).await {
            Ok(Ok(stream)) => http1(stream, peer, node, role, stop).await,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                node.metrics.rejected(RejectReason::Tls);
            }
            Err(_) => node.metrics.rejected(RejectReason::HandshakeTimeout),
        },
        None => http1(stream, peer, node, role, stop).await,
    }
}

/// Serves HTTP/1.1 (and upgrades) on one connection, TLS or not.
async fn http1<S>(stream: S, peer: SocketAddr, node: Arc<Node>, role: Role, stop: CancellationToken)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let timeout = node.config.limits.handshake_timeout;
    // A timeout before any request is a half-open handshake; one after is just an idle
    // keep-alive connection closing.
    let served = Arc::new(AtomicBool::new(false));
    // Fired by an SSE response whose session ended with events the client never took.
    let abort = CancellationToken::new();
    let svc = {
        let node = node.clone();
        let served = served.clone();
        let abort = abort.clone();
        hyper::service::service_fn(move |req| {
            served.store(true, Ordering::Relaxed);
            let (node, abort) = (node.clone(), abort.clone());
            async move { Ok::<_, Infallible>(route(req, node, role, peer, abort).await) }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        // Dropped with what it holds (the SSE session is over and uncounted already).
        _ = abort.cancelled() => return,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn => r,
                _ = abort.cancelled() => return,
            }
        }
    };
    if let Err(e) = result {
        if e.is_timeout() && !served.load(Ordering::Relaxed) {
            tracing::debug!("handshake timeout");
            node.metrics.rejected(RejectReason::HandshakeTimeout);
        }
    }
}

async fn route(
    req: Request<Incoming>,
    node: Arc<Node>,
    role: Role,
    peer: SocketAddr,
    abort: CancellationToken,
) -> Response<Body> {
    let public = matches!(role, Role::Public | Role::All);
    let internal = matches!(role, Role::Internal | Role::All);
    // Where a session's client is (its own address, or the one a trusted proxy names).
    let trusted = &node.config.proxy.trusted;
    let client = |req: &Request<Incoming>| edge::client_ip(req.headers(), peer.ip(), trusted);
    match req.uri().path() {
        "/healthz" => health::healthz(),
        "/readyz" => health::readyz(&node),
        "/ws" if public => {
            let client = client(&req);
            upgrade::upgrade(req, node, client).await
        }
        "/sse" if public && req.method() == Method::OPTIONS => sse::preflight(&req, &node, "GET"),
        "/sse/publish" if public && req.method() == Method::OPTIONS => {
            sse::preflight(&req, &node, "POST")
        }
        "/sse" if public => {
            let client = client(&req);
            sse::sse(req, node, client, abort).await
        }
        "/sse/publish" if public => {
            let client = client(&req);
            sse::publish(req, node, client).await
        }
        "/demo" if public && node.config.demo => demo::page(),
        "/herald.js" if public && node.config.demo => demo::client_js(),
        "/metrics" if internal => health::metrics(&node, req.headers(), role),
        p if internal && p.starts_with("/api/") => api::handle(req, &node).await,
        _ => Refusal::not_found().into_response(),
    }
}
