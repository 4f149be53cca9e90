//! The `herald` process as a library: its settings and the wiring that turns them into
//! a gateway. The binary (`main.rs`) adds only the command line, logging, signals and
//! the allocator; the test kit starts nodes through the same [`gateway`] function, so
//! tests run the wiring that production runs.
//!
//! # Layout
//! - [`settings`]: [`Settings`], layered defaults < file < `HERALD_*` environment <
//!   flags, and [`Cli`].
//! - [`commands`]: the tools `herald token` and `herald config` run instead of the
//!   gateway.
//! - [`gateway`]: settings and a registry in, a wired [`Gateway`] out, on the embedded
//!   broker or on Redis (`redis.url`).
#![deny(missing_docs)]

use std::sync::Arc;

use herald_broker::{Broker, MemoryBroker};
use herald_metrics::prometheus::Registry;
use herald_redis::RedisBroker;
use herald_server::{Gateway, ServerError};

pub mod settings;

pub mod commands;

pub use settings::{Cli, Command, LogConfig, Settings};

/// Assembles the gateway `settings` describe, with its metrics in `registry`: the
/// embedded broker when `redis.url` is empty, the Redis broker otherwise (which connects
/// in the background; see [`Gateway::wait_broker_up`]).
pub fn gateway(settings: &Settings, registry: Registry) -> Result<Gateway, ServerError> {
    Gateway::new(settings.gateway.clone(), registry, |inbound, metrics| {
        let broker: Arc<dyn Broker> = if settings.redis.url.is_empty() {
            Arc::new(MemoryBroker::new(inbound))
        } else {
            Arc::new(RedisBroker::start(
                settings.redis.clone(),
                inbound,
                metrics.clone(),
            )?)
        };
        Ok::<_, herald_redis::RedisBrokerError>(broker)
    })
}
