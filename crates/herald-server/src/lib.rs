//! Herald's gateway: sessions (WebSocket and SSE), fan-out, the HTTP API, limits and draining.
//!
//! [`Gateway::new`] assembles a correctly wired node around a broker; [`Gateway::run`]
//! serves on listeners the caller bound and returns when the caller's `shutdown` future
//! resolves and the drain is over. It never reads signals or the environment itself, so
//! tests drive it exactly as `main` does.
//!
//! # Layout
//! Modules import each other one way, top to bottom (herald-tidy checks it):
//! - `gateway`: [`Gateway`] (assembly, run, shutdown) and [`Listeners`].
//! - `http`: the accept loop and routing; `http::upgrade` (validate the handshake,
//!   admit: drain, origin, slot, then authenticate and start the session),
//!   `http::connect` (a token, or the connect hook), `http::api`
//!   (the publish and history API), `http::sse` (the SSE transport), `http::health`
//!   (health, readiness, metrics), `http::reply` (JSON responses).
//! - `control`: the control plane's tasks (heartbeats, answering surveys) and the
//!   surveys the control API runs; what a command does to this node's sessions.
//! - `lifecycle`: the node's sweeper (heartbeats, token expiry) and the drain.
//! - `session`: one session (WebSocket or SSE): its start and end, and its reader
//!   (requests, rate limit, token refresh).
//! - `webhooks`: `[webhooks]`: this node's occupancy changes, refresh and sweep (and
//!   the presence members of the nodes it sweeps), and delivering the broker's event
//!   queue while it holds the queue's lease.
//! - `presence`: who is in a channel: joins, leaves, the refresh and sweep, and the
//!   `join`/`leave` frames to local subscribers.
//! - `backend`: what the gateway asks the application's backend (hooks) on a client's
//!   behalf, from a session or `POST /sse/publish`, and what the answers do.
//! - `access`: who may subscribe and publish (rules, token claims, subscription tokens).
//! - `node`: `Node`, the state every task shares (config, broker, hub, metrics, open
//!   sessions, connection slots, task trackers).
//! - `cluster`: what the node knows of the cluster (nodes alive, surveys waiting) and
//!   its own presence members.
//! - `hub`: channel → local subscribers, and fan-out of broker publications.
//! - `history`: history channels: each one's `Stream` (members and where each stands,
//!   gap repair, epoch changes) and the whole resume of a subscriber.
//! - `writer`: a session's writer task, which drains its handle into the socket.
//! - `handle`: `SessionHandle`, what the node holds of a session: its outbound queue
//!   (bounded in bytes; slow consumers are closed with 1013, never waited for), its
//!   lifecycle signals and its liveness clock. The only code that changes
//!   `herald_outbound_queue_bytes`.
//! - `wire`: what a session sends, as WebSocket frames Herald frames and writes itself
//!   (a run of deliveries framed once for every subscriber; the socket's sending half;
//!   tungstenite's reading half, whose own replies it discards, and which inflates
//!   compressed client messages).
//! - `deflate`: permessage-deflate's negotiation, compressing and inflating.
//! - `tls`: the public listener's TLS keys (`[tls]`), reloaded on SIGHUP.
//! - `error`: [`ServerError`].
//! - [`config`]: [`GatewayConfig`], every limit with its default.
//!
//! # Data path
//! publisher → [`herald_broker::Broker::publish`] → broker → [`herald_broker::Inbound`]
//! (bounded) → hub dispatcher → each subscriber's handle (bounded, never blocks) →
//! writer → socket. A plain channel's publications in one batch travel as one *run*,
//! framed once (`wire::Frames`) and queued as one item per subscriber.
#![deny(missing_docs)]

mod access;
mod backend;
mod cluster;
pub mod config;
mod control;
mod deflate;
mod error;
mod gateway;
mod handle;
mod history;
mod http;
mod hub;
mod lifecycle;
mod node;
mod presence;
mod session;
mod tls;
mod webhooks;
mod wire;
mod writer;

#[cfg(test)]
mod catch_up_tests;
#[cfg(test)]
mod exactly_once;

pub use config::{GatewayConfig, TlsConfig};
pub use error::ServerError;
pub use gateway::{Gateway, KeyReloader, Listeners};
