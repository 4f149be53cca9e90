//! The `herald` binary: reads configuration, sets up logging and metrics, binds the
//! listeners, picks the broker and runs the gateway until SIGTERM or SIGINT.
//!
//! Everything with behaviour lives in the library crates; this file only wires them.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use herald_broker::{inbound, Broker, MemoryBroker};
use herald_metrics::{prometheus::Registry, Metrics};
use herald_redis::RedisBroker;
use herald_server::{Gateway, Listeners};
use tokio::net::TcpListener;

mod settings;

use settings::{Cli, Settings};

/// jemalloc instead of the system allocator: a gateway makes many small, long-lived
/// per-connection allocations and frees them in waves (churn, deploys); jemalloc keeps
/// them compact and gives freed memory back to the OS, where glibc's malloc keeps
/// fragmented arenas (measured in BENCHMARKS.md, idle scenario).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// `EX_CONFIG` from sysexits.h: the configuration is wrong, nothing was started.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut settings = match Settings::load(&cli, std::env::vars().collect()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("herald: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if cli.check_config {
        match toml_string(&settings) {
            Ok(s) => {
                println!("{s}");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("herald: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    if settings.node_id.is_empty() {
        settings.node_id = default_node_id();
    }
    init_logging(&settings);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("herald: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("herald: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    // Each WebSocket is a file descriptor; the default soft limit (often 1024) would cap
    // the node far below its configured connection limit.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(nofile = n, "raised the open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let registry = Registry::new();
    let metrics = Metrics::new(&registry).context("registering metrics")?;
    let gateway_config = settings.gateway();
    let (tx, rx) = inbound(gateway_config.limits.inbound_queue, metrics.clone());
    let broker: Arc<dyn Broker> = if settings.redis.url.is_empty() {
        Arc::new(MemoryBroker::new(tx))
    } else {
        let redis = RedisBroker::start(settings.redis.clone(), tx, metrics.clone())?;
        // Start serving either way (readiness reports the broker), but give Redis a
        // moment so that a healthy start does not flap through "not ready".
        if !redis.wait_up(settings.redis.timeout).await {
            tracing::warn!("Redis is not reachable yet; retrying in the background");
        }
        Arc::new(redis)
    };
    let broker_kind = broker.kind();

    let public = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("binding {}", settings.listen))?;
    let internal = match settings.internal_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?,
        ),
        None => None,
    };
    let public_addr = public.local_addr()?;
    let internal_addr = internal.as_ref().map(|l| l.local_addr()).transpose()?;
    let gateway = Gateway::new(gateway_config, broker, rx, metrics, registry)?;
    tracing::info!(
        node = %settings.node_id,
        broker = broker_kind,
        public = %public_addr,
        internal = %internal_addr.map_or("(same)".to_owned(), |a| a.to_string()),
        "herald listening: ws://{public_addr}/ws"
    );
    gateway
        .run(Listeners { public, internal }, shutdown_signal())
        .await?;
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; waiting for Ctrl-C only");
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

fn init_logging(settings: &Settings) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if settings.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "herald".to_owned());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{host}-{:04x}", (nanos ^ std::process::id()) & 0xffff)
}

fn toml_string(settings: &Settings) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(settings)?)
}
