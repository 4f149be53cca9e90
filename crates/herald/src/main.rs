//! The `herald` binary: reads configuration, sets up logging and metrics, binds the
//! listeners, picks the broker and runs the gateway until SIGTERM or SIGINT.
//!
//! Everything with behaviour lives in the library crates; this file only wires them.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use herald::{Cli, Command, Settings};
use herald_metrics::prometheus::Registry;
use herald_server::Listeners;
use tokio::net::TcpListener;

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
    if let Some(Command::Config { default: true }) = &cli.command {
        print!("{}", herald::commands::DEFAULT_CONFIG);
        return ExitCode::SUCCESS;
    }
    let settings = match Settings::load(&cli, std::env::vars().collect()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("herald: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(Command::Token {
        sub,
        ttl,
        channels,
        publish,
    }) = &cli.command
    {
        return match herald::commands::mint_token(&settings.gateway, sub, ttl, channels, publish) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("herald token: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    if cli.check_config || matches!(cli.command, Some(Command::Config { default: false })) {
        match settings.to_toml() {
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
    init_logging(&settings);
    for var in &settings.ignored_env {
        tracing::warn!(
            var,
            "ignored: a Kubernetes service link, not a Herald setting (a Service named herald... injects it)"
        );
    }
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
    // First of all: SIGHUP's default action ends the process, and an operator (or a
    // config-reload hook) may send one while Redis is still being waited for.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    // Each WebSocket is a file descriptor; the default soft limit (often 1024) would cap
    // the node far below its configured connection limit.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(nofile = n, "raised the open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let gateway = herald::gateway(&settings, Registry::new())?;
    // Start serving either way (readiness reports the broker), but give Redis a moment
    // so that a healthy start does not flap through "not ready".
    if !gateway.wait_broker_up(settings.redis.timeout).await {
        tracing::warn!("the broker is not reachable yet; retrying in the background");
    }

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
    let settings_tls = settings.gateway.tls.cert_file.is_some();
    let internal_addr = internal.as_ref().map(|l| l.local_addr()).transpose()?;
    tracing::info!(
        node = gateway.node_id(),
        broker = gateway.broker_kind(),
        public = %public_addr,
        internal = %internal_addr.map_or("(same)".to_owned(), |a| a.to_string()),
        "herald listening: {}://{public_addr}/ws",
        if settings_tls { "wss" } else { "ws" }
    );
    tokio::spawn(reload_keys_on_sighup(
        hup,
        gateway.key_reloader(),
        settings.gateway.tls.cert_file.is_some(),
    ));
    gateway
        .run(Listeners { public, internal }, shutdown_signal())
        .await?;
    Ok(())
}

/// Re-reads the token keys and the TLS certificate on every SIGHUP (a rotated JWKS
/// file, a renewed certificate); a key that does not load leaves the ones in force.
async fn reload_keys_on_sighup(
    hup: std::io::Result<tokio::signal::unix::Signal>,
    keys: herald_server::KeyReloader,
    tls: bool,
) {
    let Ok(mut hup) = hup else {
        tracing::warn!("cannot listen for SIGHUP; keys reload only on restart");
        return;
    };
    while hup.recv().await.is_some() {
        match keys.reload() {
            Ok(()) => tracing::info!("SIGHUP: token keys reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: token keys not reloaded; the previous ones stay")
            }
        }
        match keys.reload_tls() {
            Ok(()) if tls => tracing::info!("SIGHUP: TLS certificate reloaded"),
            Ok(()) => {}
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: TLS certificate not reloaded; the previous one stays")
            }
        }
    }
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
    use tracing_subscriber::filter::filter_fn;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{fmt, EnvFilter, Layer};
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // tungstenite logs every frame it reads at trace, and frames carry tokens (refresh,
    // subscription tokens) and users' data: its trace events never reach the output,
    // whatever the filter says.
    let no_frames = filter_fn(|m| {
        !(*m.level() == tracing::Level::TRACE
            && (m.target().starts_with("tungstenite")
                || m.target().starts_with("tokio_tungstenite")))
    });
    let output = if settings.log.format == "json" {
        fmt::layer().json().with_writer(std::io::stderr).boxed()
    } else {
        fmt::layer().with_writer(std::io::stderr).boxed()
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output.with_filter(no_frames))
        .init();
}
