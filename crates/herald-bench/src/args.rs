//! What a run is asked to do ([`RunArgs`]), and the sizes every scenario shares.

use std::path::PathBuf;

/// What to run.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct RunArgs {
    /// Tiny sizes and one-second phases: checks that every scenario and peer works.
    #[arg(long)]
    pub(crate) smoke: bool,
    /// Scenarios, in order. Also: `burstN` (bursts of N publications to one channel,
    /// e.g. `burst400`), `channels1000` (1,000 channels, `subscribers / 1000` each).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fanout,channels,crossnode,latency,idle,connect,auth,history,churn,drops"
    )]
    pub(crate) scenarios: Vec<String>,
    /// Targets: herald, herald-history (every bench channel keeps history; publishes go
    /// through the history script), floor, floor-redis (the floor fed through Redis),
    /// node, python, socketio, and `herald@PATH`
    /// for another Herald binary (before/after comparisons in one run).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "herald,herald-history,floor,floor-redis,node,python,socketio"
    )]
    pub(crate) targets: Vec<String>,
    /// Subscribers in the fan-out, many-channels and cross-node scenarios.
    #[arg(long, default_value_t = 5000)]
    pub(crate) subscribers: usize,
    /// Channels in the many-channels scenario.
    #[arg(long, default_value_t = 100)]
    pub(crate) channels: usize,
    /// Idle connections in the idle scenario.
    #[arg(long, default_value_t = 15000)]
    pub(crate) idle: usize,
    /// Churning connections in the churn scenario.
    #[arg(long, default_value_t = 10000)]
    pub(crate) churn: usize,
    /// Handshakes in the connect-rate scenario.
    #[arg(long, default_value_t = 5000)]
    pub(crate) handshakes: usize,
    /// Length of each measured phase, seconds.
    #[arg(long, default_value_t = 8.0)]
    pub(crate) seconds: f64,
    /// Latency scenario publish rate, as a fraction of the floor's maximum.
    #[arg(long, default_value_t = 0.5)]
    pub(crate) latency_fraction: f64,
    /// Latency scenario publish rate in publications per second, for every target
    /// (instead of `latency_fraction`).
    #[arg(long)]
    pub(crate) latency_rate: Option<f64>,
    /// Publications in flight in the closed-loop scenarios.
    #[arg(long, default_value_t = 64)]
    pub(crate) window: u64,
    /// Where results.json and chart.svg go.
    #[arg(long, default_value = "bench-results")]
    pub(crate) out: PathBuf,
}

impl RunArgs {
    pub(crate) fn apply_smoke(&mut self) {
        if self.smoke {
            self.subscribers = 20;
            self.channels = 4;
            self.idle = 40;
            self.handshakes = 40;
            self.churn = 50;
            self.seconds = 1.0;
            self.window = 8;
        }
    }
}

pub(crate) const PAYLOAD_PAD: usize = 60;
pub(crate) const SOURCES: &str = "127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7";
/// Connections per worker process, under the 20,000 open-file hard limit.
pub(crate) const PER_WORKER: usize = 15_000;
