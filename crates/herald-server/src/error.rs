//! [`ServerError`]: why a gateway could not start or stopped with a failure.

use crate::config::InvalidConfig;

/// Why the gateway could not start or stopped with a failure.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(#[from] InvalidConfig),
    /// The metrics could not be registered (e.g. the registry already holds them).
    #[error("registering metrics: {0}")]
    Metrics(#[from] herald_metrics::prometheus::Error),
    /// The broker could not be created.
    #[error("starting the broker: {0}")]
    Broker(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A listener failed in a way retrying cannot fix; the gateway drained and stopped.
    #[error("the {listener} listener failed: {source}")]
    Listener {
        /// `public` or `internal`.
        listener: &'static str,
        /// What accept reported.
        source: std::io::Error,
    },
    /// A listener's address could not be read.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    /// One of the gateway's own tasks (fan-out dispatcher, heartbeat sweeper) ended
    /// unexpectedly; the gateway drained and stopped.
    #[error("the {0} task ended unexpectedly")]
    TaskEnded(&'static str),
}
