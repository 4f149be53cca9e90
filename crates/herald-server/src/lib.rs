//! Herald's gateway: WebSocket sessions, fan-out, the HTTP API, limits and draining.
//!
//! [`Gateway::new`] assembles a correctly wired node around a broker; [`Gateway::run`]
//! serves on listeners the caller bound and returns when the caller's `shutdown` future
//! resolves and the drain is over. It never reads signals or the environment itself, so
//! tests drive it exactly as `main` does.
//!
//! # Layout
//! Modules import each other one way, top to bottom (a test checks it):
//! - `gateway`: [`Gateway`] (assembly, run, shutdown) and [`Listeners`].
//! - `http`: the accept loop and routing; `http::upgrade` (validate the handshake,
//!   admit: drain, origin, slot, then start the session), `http::api` (the publish API),
//!   `http::health` (health, readiness, metrics), `http::reply` (JSON responses).
//! - `lifecycle`: the node's sweeper (heartbeats, token expiry) and the drain.
//! - `session`: one session's start and end, and its reader (requests, rate limit,
//!   token refresh).
//! - `access`: who may subscribe and publish (rules, token claims, subscription tokens).
//! - `node`: `Node`, the state every task shares (config, hub, metrics, open sessions,
//!   connection slots, task trackers).
//! - `hub`: channel → local subscribers, and fan-out of broker publications.
//! - `writer`: a session's writer task, which drains its handle into the socket.
//! - `handle`: `SessionHandle`, what the node holds of a session: its outbound queue
//!   (bounded in bytes; slow consumers are closed with 1013, never waited for), its
//!   lifecycle signals and its liveness clock. The only code that changes
//!   `herald_outbound_queue_bytes`.
//! - [`config`]: [`GatewayConfig`], every limit with its default; [`ServerError`].
//!
//! # Data path
//! publisher → [`herald_broker::Broker::publish`] → broker → [`herald_broker::Inbound`]
//! (bounded) → hub dispatcher → each subscriber's handle (bounded, never blocks) →
//! writer → socket.
#![deny(missing_docs)]

mod access;
pub mod config;
mod error;
mod gateway;
mod handle;
mod history;
mod http;
mod hub;
mod lifecycle;
mod node;
mod session;
mod writer;

#[cfg(test)]
mod exactly_once;
#[cfg(test)]
mod layering;

pub use config::GatewayConfig;
pub use error::ServerError;
pub use gateway::{Gateway, KeyReloader, Listeners};
