//! Who a connecting client is: its token, or the application's backend (the connect
//! hook, `[hooks.connect]`), for `/ws`, `/sse` and `/sse/publish` alike.
//!
//! The hook is asked when the client presents no valid token (none, or one that does
//! not verify), or on every connect with `always = true`. It is told the client's
//! address, transport, connection id and the request headers `forward_headers` names
//! (typically the session cookie), and answers who the user is. This is what lets an
//! application with cookie sessions use Herald without minting tokens. A refusal is
//! answered before the upgrade (401 or 403 `refused`, with the backend's code); a
//! backend that does not answer fails closed (503), never lets the client in.

use std::net::IpAddr;

use herald_auth::Identity;
use herald_metrics::RejectReason;
use herald_protocol::{ChannelPatterns, ErrorCode};
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde_json::value::RawValue;

use super::reply::Refusal;
use crate::backend;
use crate::handle::ConnId;
use crate::node::Node;
use crate::session::{conn_name, Peer, Transport};

pub(super) type Rejected = (RejectReason, Refusal);

/// The client's identity from its token (`Authorization: Bearer`, or the
/// `access_token` query parameter for browsers, which cannot set headers on a
/// WebSocket) or from the connect hook. The token is never logged or echoed.
///
/// `gate` runs right before the backend would be asked, and may refuse instead (the
/// sessionless `POST /sse/publish`, which holds no connection slot, passes its
/// per-address rate there). `conn` is the connection's id; none for a request that is
/// no session.
pub(super) async fn authenticate(
    req: &Request<Incoming>,
    node: &Node,
    conn: Option<ConnId>,
    address: IpAddr,
    transport: Transport,
    gate: impl FnOnce() -> Result<(), Rejected>,
) -> Result<Peer, Rejected> {
    let refuse = |message: String| {
        (
            RejectReason::Unauthorized,
            Refusal::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message),
        )
    };
    let header = super::edge::bearer(req.headers());
    let query = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|pair| pair.strip_prefix("access_token="))
    });
    let token = header.or(query).filter(|t| !t.is_empty());
    let verified = match (token, node.verifier()) {
        (Some(token), Some(verifier)) => Some(verifier.verify(token)),
        _ => None,
    };
    let peer = |identity| Peer {
        identity,
        address,
        transport,
        by_hook: false,
        welcome: None,
        deflate: false,
    };
    if let Some(config) = node.hooks.as_ref().and_then(|h| h.connect()) {
        let valid = verified.and_then(Result::ok);
        if config.always || valid.is_none() {
            gate()?;
            let ask = Ask {
                req,
                conn,
                address,
                transport,
                token: valid,
            };
            return ask_backend(config, ask, node).await;
        }
        return Ok(peer(valid));
    }
    match verified {
        Some(Ok(identity)) => Ok(peer(Some(identity))),
        Some(Err(e)) => Err(refuse(e.to_string())),
        None if node.config.auth.anonymous => Ok(peer(None)),
        None => Err(refuse(
            "a token is required (Authorization: Bearer <jwt>, or ?access_token=<jwt>)".into(),
        )),
    }
}

/// What the connect hook is asked about.
struct Ask<'a> {
    /// The client's request (for the forwarded headers).
    req: &'a Request<Incoming>,
    /// The connection id the client will get (none: a request that is no session).
    conn: Option<ConnId>,
    /// The client's address.
    address: IpAddr,
    /// How it connects.
    transport: Transport,
    /// The client's valid token, if it presented one (`always = true`).
    token: Option<Identity>,
}

/// The connect hook's `result`.
/// Fields it does not know are ignored (a backend may answer more than Herald reads).
#[derive(serde::Deserialize)]
struct Admitted {
    /// Who the client is; empty or absent: anonymous (or the token's user).
    #[serde(default)]
    user: Option<String>,
    /// When the connection expires (Unix seconds); the refresh hook may extend it.
    #[serde(default)]
    expires: Option<u64>,
    /// What presence shows about the user.
    #[serde(default)]
    info: Option<Box<RawValue>>,
    /// Channels the server subscribes the connection to.
    #[serde(default)]
    channels: Vec<String>,
    /// Data for the welcome frame.
    #[serde(default)]
    data: Option<Box<RawValue>>,
}

/// The largest `info` the connect hook may give (presence stores and sends it to
/// every subscriber, as a token's).
const MAX_INFO_BYTES: usize = 1024;

async fn ask_backend(
    config: &herald_hooks::ConnectHookConfig,
    ask: Ask<'_>,
    node: &Node,
) -> Result<Peer, Rejected> {
    let mut headers = serde_json::Map::new();
    for name in &config.forward_headers {
        let values: Vec<&str> = ask
            .req
            .headers()
            .get_all(name.as_str())
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if !values.is_empty() {
            // Cookie headers join with "; " (RFC 6265), every other with ", ".
            let sep = if name.eq_ignore_ascii_case("cookie") {
                "; "
            } else {
                ", "
            };
            headers.insert(name.to_ascii_lowercase(), values.join(sep).into());
        }
    }
    let caller = backend::Caller {
        conn: ask
            .conn
            .map_or(String::new(), |c| conn_name(&node.instance, c)),
        user: ask.token.as_ref().map_or("", |i| i.user.as_str()),
        address: ask.address,
        transport: ask.transport.name(),
    };
    let fields = serde_json::json!({ "headers": headers });
    let failed = || {
        (
            RejectReason::HookFailed,
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "the application's backend did not answer; retry later",
            ),
        )
    };
    let result = match backend::ask(node, herald_hooks::Hook::Connect, &caller, fields).await {
        backend::Answer::Allow(r) => r,
        backend::Answer::Refuse { code, message } => {
            // 401 when the backend says so (not signed in); any other refusal is 403.
            let status = if code == 401 {
                StatusCode::UNAUTHORIZED
            } else {
                StatusCode::FORBIDDEN
            };
            return Err((
                RejectReason::HookRefused,
                Refusal::by_hook(status, code, message),
            ));
        }
        backend::Answer::Disconnect { code, reason } => {
            return Err((
                RejectReason::HookRefused,
                Refusal::by_hook(StatusCode::FORBIDDEN, code.into(), reason),
            ))
        }
        backend::Answer::Failed => return Err(failed()),
    };
    let admitted: Admitted = serde_json::from_str(result.get()).map_err(|e| {
        tracing::debug!(error = %e, "connect hook: not a connect result");
        failed()
    })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let expires_at = match admitted.expires {
        Some(0) | None => 0,
        Some(t) if t <= now => {
            return Err((
                RejectReason::HookRefused,
                Refusal::new(
                    StatusCode::UNAUTHORIZED,
                    ErrorCode::Unauthorized,
                    "the application's backend gave an expiry that has passed",
                ),
            ))
        }
        Some(t) => t.min(herald_auth::MAX_EXP),
    };
    let user = admitted.user.filter(|u| !u.is_empty());
    let info = admitted
        .info
        .map(|i| i.get().to_owned())
        .filter(|i| i.len() <= MAX_INFO_BYTES);
    let identity = match (user, ask.token) {
        (Some(user), _) => Some(Identity {
            user,
            expires_at,
            channels: ChannelPatterns::default(),
            publish: ChannelPatterns::default(),
            info,
            subscribe: admitted.channels,
        }),
        // `always`: the backend accepted the token's user, and may add to it.
        (None, Some(mut token)) => {
            if expires_at != 0 {
                token.expires_at = expires_at;
            }
            token.info = info.or(token.info);
            token.subscribe.extend(admitted.channels);
            Some(token)
        }
        (None, None) if node.config.auth.anonymous => None,
        (None, None) => return Err((
            RejectReason::HookRefused,
            Refusal::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "the application's backend named no user, and this node takes no anonymous clients",
            ),
        )),
    };
    // The refresh hook extends only what the connect hook gave an expiry; a token's
    // own expiry is the client's to refresh (`refresh` with a new token).
    let by_hook = identity.is_some() && expires_at != 0;
    Ok(Peer {
        identity,
        address: ask.address,
        transport: ask.transport,
        by_hook,
        welcome: admitted.data,
        deflate: false,
    })
}
