//! Herald's integration suite, one test binary (it links once; modules share the
//! harness in `herald-testkit`). Every test runs real gateways on loopback ports and
//! talks to them over real sockets.

mod auth;
mod client;
mod control;
mod delta;
mod deploy;
mod edge;
mod hooks;
mod http_api;
mod lifecycle;
mod limits;
mod observability;
mod presence;
mod protocol;
mod recovery;
mod redis;
mod slow_readers;
mod sse;
