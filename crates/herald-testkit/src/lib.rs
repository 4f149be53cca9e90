//! Test support for Herald: real gateways on loopback ports, real WebSocket and HTTP
//! clients, so each integration test reads as a short story.
//!
//! - [`Node`]: a gateway running in this process on `127.0.0.1:0`, with a handle to shut
//!   it down and its own metrics registry.
//! - [`Client`]: a tokio-tungstenite client with helpers that fail loudly (with a
//!   timeout) instead of hanging.
//! - [`http`]: one HTTP/1.1 request over a fresh connection.
//! - [`FaultProxy`]: a TCP relay a test stalls or cuts (faults between a node and Redis).
//! - [`SseClient`]: a Server-Sent Events client.
//! - [`token`]: tokens signed with [`TEST_SECRET`].
//!
//! # Layout
//! - `node`: [`Node`] and its configuration helpers.
//! - `client`: [`Client`].
//! - `sse`: [`SseClient`].
//! - `backend`: [`Backend`], the application's backend for hooks and webhooks.
//! - `http`: [`http`], [`try_http`], and [`WAIT`], how long any expectation waits.
//! - `auth`: [`token`].
//! - `fault`: [`FaultProxy`].
#![allow(unreachable_pub)]

pub use serde_json::json;

mod auth;
mod backend;
mod client;
mod fault;
mod http;
mod node;
mod sse;

pub use auth::*;
pub use backend::{Backend, Call};
pub use client::*;
pub use fault::FaultProxy;
pub use http::*;
pub use node::*;
pub use sse::*;

pub use herald_harness::{
    free_port, key_pair, metric_value, openssl, signed_certificate, system_tool, test_ca, CertUse,
    Haproxy, KeyKind, RedisCluster, RedisServer,
};
