//! The control API: `POST /api/disconnect`, `/api/subscribe`, `/api/unsubscribe`,
//! `GET /api/channels` and `/api/info`. Each is a survey of every node
//! (`crate::control`); the reply sums what the nodes did or found and names the nodes
//! that did not answer in time (`missing`).
//!
//! API keys: a key limited to some channels may subscribe and unsubscribe connections
//! on those channels and sees only those in `/api/channels`; disconnecting connections
//! and reading the cluster's state take a key without a channel limit.

use std::collections::BTreeMap;

use herald_broker::BrokerError;
use herald_protocol::control::{self as wire, Answer, Command};
use herald_protocol::{ChannelName, ChannelPatterns, ErrorCode};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

use super::api::{authorize, read_body, require_json};
use super::reply::{json, Body, Refusal};
use crate::control::{survey, Surveyed};
use crate::node::Node;

/// Whether `path` is a control API endpoint.
pub(super) fn serves(path: &str) -> bool {
    matches!(
        path,
        "/api/info" | "/api/channels" | "/api/disconnect" | "/api/subscribe" | "/api/unsubscribe"
    )
}

/// Serves a control API endpoint ([`serves`]).
pub(super) async fn serve(
    req: Request<Incoming>,
    path: &str,
    node: &Node,
) -> Result<Response<Body>, Refusal> {
    let method = match path {
        "/api/info" | "/api/channels" => Method::GET,
        _ => Method::POST,
    };
    handle(req, path, method, node).await
}

async fn handle(
    req: Request<Incoming>,
    path: &str,
    method: Method,
    node: &Node,
) -> Result<Response<Body>, Refusal> {
    if req.method() != method {
        return Err(Refusal::method_not_allowed(if method == Method::GET {
            "GET"
        } else {
            "POST"
        }));
    }
    let scope = authorize(&req, node)?;
    match path {
        "/api/info" => {
            unlimited(scope, "reading the cluster's state")?;
            let s = run(node, Command::Info).await?;
            let mut nodes: Vec<_> = s
                .answers
                .into_iter()
                .filter_map(|(_, a)| match a {
                    Answer::Info(i) => Some(i),
                    _ => None,
                })
                .collect();
            nodes.sort_by(|a, b| a.node.cmp(&b.node));
            Ok(json(
                StatusCode::OK,
                wire::to_json(&wire::InfoReply {
                    nodes: &nodes,
                    missing: &s.missing,
                }),
            ))
        }
        "/api/channels" => {
            let query = wire::parse_channels_query(req.uri().query().unwrap_or(""))
                .map_err(Refusal::body)?;
            let s = run(
                node,
                Command::Channels {
                    pattern: query.pattern.clone(),
                },
            )
            .await?;
            let mut all: BTreeMap<String, u64> = BTreeMap::new();
            for (_, a) in s.answers {
                if let Answer::Channels { channels } = a {
                    for c in channels {
                        *all.entry(c.channel).or_default() += c.subscribers;
                    }
                }
            }
            let after = query.cursor.as_deref().unwrap_or("");
            let mut page: Vec<wire::ChannelCount> = all
                .into_iter()
                .filter(|(c, _)| c.as_str() > after)
                .filter(|(c, _)| scope.is_none_or(|s| s.matches(c)))
                .take(query.limit + 1)
                .map(|(channel, subscribers)| wire::ChannelCount {
                    channel,
                    subscribers,
                })
                .collect();
            let more = page.len() > query.limit;
            page.truncate(query.limit);
            let cursor = more
                .then(|| page.last().map(|c| c.channel.as_str()))
                .flatten();
            Ok(json(
                StatusCode::OK,
                wire::to_json(&wire::ChannelsReply {
                    channels: &page,
                    cursor,
                    missing: &s.missing,
                }),
            ))
        }
        _ => {
            require_json(&req)?;
            let body = read_body(req, &node.config.limits).await?;
            let command = match path {
                "/api/disconnect" => {
                    unlimited(scope, "disconnecting connections")?;
                    wire::parse_disconnect(&body)
                }
                "/api/subscribe" => wire::parse_subscribe(&body),
                _ => wire::parse_unsubscribe(&body),
            }
            .map_err(Refusal::body)?;
            if let Command::Subscribe { channel, .. } | Command::Unsubscribe { channel, .. } =
                &command
            {
                let name = ChannelName::new(channel).map_err(|e| {
                    Refusal::new(
                        StatusCode::BAD_REQUEST,
                        ErrorCode::InvalidChannel,
                        e.to_string(),
                    )
                })?;
                if scope.is_some_and(|s| !s.matches(name.as_str())) {
                    return Err(Refusal::new(
                        StatusCode::FORBIDDEN,
                        ErrorCode::Forbidden,
                        format!("this API key may not use channel {name}"),
                    ));
                }
            }
            let s = run(node, command).await?;
            let connections = s
                .answers
                .iter()
                .map(|(_, a)| match a {
                    Answer::Affected { connections } => *connections,
                    _ => 0,
                })
                .sum();
            Ok(json(
                StatusCode::OK,
                wire::to_json(&wire::AffectedReply {
                    ok: true,
                    connections,
                    missing: &s.missing,
                }),
            ))
        }
    }
}

/// 403 for a key limited to some channels.
fn unlimited(scope: Option<&ChannelPatterns>, what: &str) -> Result<(), Refusal> {
    match scope {
        Some(s) if !s.covers_everything() => Err(Refusal::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!("{what} takes an API key without a channel limit"),
        )),
        _ => Ok(()),
    }
}

async fn run(node: &Node, command: Command) -> Result<Surveyed, Refusal> {
    survey(node, command).await.map_err(|e| match e {
        // The command may have reached the nodes: the caller cannot tell.
        BrokerError::Timeout | BrokerError::UnknownOutcome(_) => Refusal::new(
            StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::UnknownOutcome,
            "the broker did not confirm the command in time: it may or may not have reached the nodes",
        ),
        _ => Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "the broker is unavailable: the command reached no node; retry later",
        ),
    })
}
