//! What the gateway asks the application's backend on a client's behalf, wherever the
//! client's request came from (a WebSocket or SSE session, or `POST /sse/publish`):
//! the request every hook is told (`conn`, `user`, `address`, `transport`), the call
//! with its outcome, and what the publish hook's answer does to a publication. Callers
//! turn an [`Answer`] into their transport's reply (an error frame or an HTTP status).

use std::net::IpAddr;

use bytes::Bytes;
use herald_hooks::{Hook, Reply};
use herald_protocol::Payload;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::node::Node;

/// The client a hook is asked about.
pub(crate) struct Caller<'a> {
    /// Its connection id as clients see it (empty for a sessionless request).
    pub(crate) conn: String,
    /// Its user; empty when anonymous.
    pub(crate) user: &'a str,
    /// Its address (its own, or the one a trusted proxy named).
    pub(crate) address: IpAddr,
    /// `websocket` or `sse`.
    pub(crate) transport: &'static str,
}

impl Caller<'_> {
    /// A hook request: what every hook is told of the client, with `fields` (an object)
    /// added.
    pub(crate) fn request(&self, fields: Value) -> Value {
        let mut body = serde_json::json!({
            "conn": self.conn,
            "user": self.user,
            "address": self.address.to_string(),
            "transport": self.transport,
        });
        if let (Some(b), Value::Object(f)) = (body.as_object_mut(), fields) {
            b.extend(f);
        }
        body
    }
}

/// The backend's decision on a request, or that it gave none.
#[derive(Debug)]
pub(crate) enum Answer<T> {
    /// `{"result": ...}`: go on, with what the result says.
    Allow(T),
    /// `{"error": {"code", "message"}}`: refuse this request (`refused`, `hook_code`).
    Refuse {
        /// The backend's code.
        code: i64,
        /// The backend's message.
        message: String,
    },
    /// `{"disconnect": {"code", "reason"}}`: end the client's connection.
    Disconnect {
        /// The close code the backend asked for.
        code: u16,
        /// The close reason.
        reason: String,
    },
    /// No usable answer (not configured, down, too slow, not a hook answer): the
    /// request fails closed (`unavailable`).
    Failed,
}

/// Calls `hook` about `caller` with `fields`.
pub(crate) async fn ask(
    node: &Node,
    hook: Hook,
    caller: &Caller<'_>,
    fields: Value,
) -> Answer<Box<RawValue>> {
    let Some(hooks) = node.hooks.as_ref() else {
        return Answer::Failed;
    };
    let body = caller.request(fields);
    // A caller without a connection (`POST /sse/publish`) holds at most its share.
    let answer = if caller.conn.is_empty() {
        hooks.call_sessionless(hook, &body).await
    } else {
        hooks.call(hook, &body).await
    };
    match answer {
        Ok(Reply::Result(r)) => Answer::Allow(r),
        Ok(Reply::Error { code, message }) => Answer::Refuse { code, message },
        Ok(Reply::Disconnect { code, reason }) => Answer::Disconnect { code, reason },
        Err(e) => {
            tracing::debug!(error = %e, hook = hook.name(), "hook failed");
            Answer::Failed
        }
    }
}

/// What the publish hook allowed: the payload to publish (the client's, or the one the
/// backend put in its place) and whether to keep it out of history.
#[derive(Debug)]
pub(crate) struct Publish {
    /// What to publish.
    pub(crate) payload: Payload,
    /// `skip_history`: deliver it live only.
    pub(crate) skip_history: bool,
}

/// Asks the publish hook (`[hooks.publish]`) about a client's publish of `payload` to
/// `channel`: `{"result": {}}` allows it as it is, `{"data": D}` publishes D instead,
/// `"skip_history": true` keeps it out of the channel's history. A result that is not
/// such an object fails closed.
pub(crate) async fn publish(
    node: &Node,
    caller: &Caller<'_>,
    channel: &str,
    payload: Payload,
) -> Answer<Publish> {
    use base64::Engine as _;
    let mut fields = serde_json::json!({ "channel": channel });
    let data = match &payload {
        Payload::Json(d) => (
            "data",
            serde_json::from_slice::<Value>(d).unwrap_or(Value::Null),
        ),
        Payload::Binary(b) => (
            "binary",
            base64::engine::general_purpose::STANDARD.encode(b).into(),
        ),
    };
    if let Some(f) = fields.as_object_mut() {
        f.insert(data.0.into(), data.1);
    }
    /// The publish hook's `result`.
    #[derive(serde::Deserialize)]
    struct Rewrite<'a> {
        /// What to publish instead.
        #[serde(borrow)]
        data: Option<&'a RawValue>,
        /// Deliver it live only.
        #[serde(default)]
        skip_history: bool,
    }
    match ask(node, Hook::Publish, caller, fields).await {
        Answer::Allow(result) => match serde_json::from_str::<Rewrite>(result.get()) {
            Ok(r) => Answer::Allow(Publish {
                payload: match r.data {
                    Some(d) => Payload::Json(Bytes::from(d.get().to_owned())),
                    None => payload,
                },
                skip_history: r.skip_history,
            }),
            Err(e) => {
                tracing::debug!(error = %e, "publish hook: not a publish result");
                Answer::Failed
            }
        },
        Answer::Refuse { code, message } => Answer::Refuse { code, message },
        Answer::Disconnect { code, reason } => Answer::Disconnect { code, reason },
        Answer::Failed => Answer::Failed,
    }
}
