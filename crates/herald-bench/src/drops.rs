//! Network drops, measured: clients (the Rust client) in their own network namespace,
//! whose link to the node is cut for 2 s every 5 s while a history channel carries a
//! steady stream. Reported: delivered %, duplicates, and the delay of the publications
//! made during a cut (AnyCable's test of Socket.IO and itself, done to Herald).
//!
//! Layout (root only; `ip` from iproute2):
//!
//! ```text
//!  netns hbd-srv                              netns hbd-cli
//!  herald on 10.201.0.1 ── veth hbd0|hbd1 ── 10.201.0.2: `drops-client` (N clients)
//!  `drops-publisher` (over the ns's loopback-free local route, never cut)
//! ```
//!
//! A cut sets the clients' end of the veth down (this kernel has no `netem`): their
//! sends fail, the node's end loses carrier and hears nothing; the node's heartbeats
//! (1 s) close the silent sessions, the clients notice their connections failing (or,
//! silent, their own ping after `heartbeat_ms` going unanswered), and reconnect after
//! the cut, resuming with `since`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use herald_client::{Client, Config, Event};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// `herald-bench drops-client`: runs inside the client namespace.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct ClientArgs {
    #[arg(long)]
    url: String,
    #[arg(long)]
    channel: String,
    #[arg(long, default_value_t = 20)]
    clients: usize,
    /// Publications the publisher will make (seq 1..=N).
    #[arg(long)]
    publications: u64,
    /// Unix µs of the schedule's start, and the cut schedule (first cut at `first_ms`,
    /// then every `period_ms`, each `cut_ms` long).
    #[arg(long)]
    t0_us: u64,
    #[arg(long)]
    first_ms: u64,
    #[arg(long)]
    period_ms: u64,
    #[arg(long)]
    cut_ms: u64,
    /// Give up waiting for the last publications after this long.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
}

/// `herald-bench drops-publisher`: runs inside the node's namespace.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct PublisherArgs {
    #[arg(long)]
    url: String,
    #[arg(long)]
    channel: String,
    #[arg(long)]
    publications: u64,
    /// Publications per second.
    #[arg(long, default_value_t = 200)]
    rate: u64,
}

fn now_us() -> u64 {
    herald_protocol::publication::unix_micros()
}

pub(crate) fn client(args: ClientArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(client_main(args))
}

async fn client_main(args: ClientArgs) -> anyhow::Result<()> {
    let (t0, first, period, cut) = (args.t0_us, args.first_ms, args.period_ms, args.cut_ms);
    let in_cut = move |ts: u64| {
        let t = ts.saturating_sub(t0) / 1000;
        t >= first && (t - first) % period < cut
    };
    let mut tasks = Vec::new();
    for _ in 0..args.clients {
        let mut config = Config::new(args.url.clone());
        config.min_backoff = Duration::from_millis(100);
        config.max_backoff = Duration::from_millis(1000);
        config.ping_timeout = Duration::from_millis(1000);
        let client = Client::start(config);
        let mut sub = client.subscribe(&args.channel)?;
        let n = args.publications;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_s);
        tasks.push(tokio::spawn(async move {
            let _client = client;
            let mut seen = HashSet::new();
            let mut duplicates = 0u64;
            let mut cut_delays_us = Vec::new();
            let mut not_recovered = 0u64;
            let mut ready = false;
            while (seen.len() as u64) < n {
                let ev = match tokio::time::timeout_at(deadline, sub.next()).await {
                    Ok(Some(ev)) => ev,
                    _ => break,
                };
                match ev {
                    Event::Subscribed => ready = true,
                    Event::Recovered(false) | Event::Reset => not_recovered += 1,
                    Event::Message { data, .. } => {
                        let v: Value = serde_json::from_slice(&data).unwrap_or(Value::Null);
                        let (Some(seq), Some(ts)) = (v["seq"].as_u64(), v["ts"].as_u64()) else {
                            continue;
                        };
                        if !seen.insert(seq) {
                            duplicates += 1;
                        } else if in_cut(ts) {
                            cut_delays_us.push(now_us().saturating_sub(ts));
                        }
                    }
                    _ => {}
                }
            }
            (
                ready,
                seen.len() as u64,
                duplicates,
                not_recovered,
                cut_delays_us,
            )
        }));
    }
    // Tell the orchestrator once every client is subscribed... approximately: the
    // publisher starts a moment later and the first publications are not in a cut.
    println!("{}", json!({"ready": true}));
    let mut received = 0u64;
    let mut duplicates = 0u64;
    let mut not_recovered = 0u64;
    let mut delays = Vec::new();
    for t in tasks {
        let (_ready, r, d, nr, mut cut) = t.await?;
        received += r;
        duplicates += d;
        not_recovered += nr;
        delays.append(&mut cut);
    }
    delays.sort_unstable();
    let pct = |p: f64| {
        delays
            .get(((delays.len() as f64 * p) as usize).min(delays.len().saturating_sub(1)))
            .map_or(0.0, |us| *us as f64 / 1000.0)
    };
    println!(
        "{}",
        json!({
            "received": received,
            "expected": args.publications * args.clients as u64,
            "duplicates": duplicates,
            "not_recovered": not_recovered,
            "cut_messages": delays.len(),
            "cut_delay_ms_p50": pct(0.5),
            "cut_delay_ms_p99": pct(0.99),
            "cut_delay_ms_max": delays.last().map_or(0.0, |us| *us as f64 / 1000.0),
        })
    );
    Ok(())
}

pub(crate) fn publisher(args: PublisherArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let client = Client::start(Config::new(args.url.clone()));
            let gap = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
            let start = tokio::time::Instant::now();
            let mut failed = 0u64;
            for seq in 1..=args.publications {
                tokio::time::sleep_until(start + gap * seq as u32).await;
                let data = json!({"seq": seq, "ts": now_us()});
                if let Err(e) = client.publish(&args.channel, &data).await {
                    eprintln!("drops-publisher: publication {seq} failed: {e}");
                    failed += 1;
                }
            }
            println!(
                "{}",
                json!({"published": args.publications - failed, "failed": failed})
            );
            anyhow::Ok(())
        })
}

/// Runs a command, failing with its output.
fn sh(args: &[&str]) -> anyhow::Result<()> {
    herald_harness::run_checked(args).map_err(anyhow::Error::msg)
}

/// The two namespaces and their veth; removed on drop.
struct Namespaces;

const SRV: &str = "hbd-srv";
const CLI: &str = "hbd-cli";
const SRV_IP: &str = "10.201.0.1";

impl Namespaces {
    fn create() -> anyhow::Result<Namespaces> {
        let ip = herald_harness::system_tool("ip", "iproute2");
        let ip = ip.to_str().context("path")?.to_owned();
        // Leftovers of an interrupted run would make `add` fail.
        let _ = sh(&[&ip, "netns", "del", SRV]);
        let _ = sh(&[&ip, "netns", "del", CLI]);
        let ns = Namespaces;
        sh(&[&ip, "netns", "add", SRV])?;
        sh(&[&ip, "netns", "add", CLI])?;
        sh(&[
            &ip, "link", "add", "hbd0", "netns", SRV, "type", "veth", "peer", "name", "hbd1",
            "netns", CLI,
        ])?;
        for (n, dev, addr) in [
            (SRV, "hbd0", "10.201.0.1/24"),
            (CLI, "hbd1", "10.201.0.2/24"),
        ] {
            sh(&[&ip, "-n", n, "addr", "add", addr, "dev", dev])?;
            sh(&[&ip, "-n", n, "link", "set", dev, "up"])?;
            sh(&[&ip, "-n", n, "link", "set", "lo", "up"])?;
        }
        Ok(ns)
    }

    /// Cuts the clients' link (or restores it): their interface goes down, as when a
    /// laptop's Wi-Fi drops; the node's end loses carrier and hears nothing.
    fn cut(&self, on: bool) -> anyhow::Result<()> {
        sh(&[
            "ip",
            "-n",
            CLI,
            "link",
            "set",
            "hbd1",
            if on { "down" } else { "up" },
        ])
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", SRV]);
        let _ = sh(&["ip", "netns", "del", CLI]);
    }
}

/// The `drops` scenario; figures for the report.
pub(crate) async fn measure(
    herald: PathBuf,
    smoke: bool,
) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    if !std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"))
    {
        bail!("the drops scenario needs root (network namespaces); run it as root or leave it out with --scenarios");
    }
    let ns = Namespaces::create()?;
    let (clients, publications, rate, cuts) = if smoke {
        (5, 400, 100, 1)
    } else {
        (50, 4000, 200, 3)
    };
    let (first_ms, period_ms, cut_ms) = (2000u64, 5000u64, 2000u64);
    let config =
        std::env::temp_dir().join(format!("herald-bench-drops-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        "[[channels.rules]]\npattern = \"drops\"\nhistory_size = 100000\npublish = \"anyone\"\n",
    )?;
    let port = 8080;
    let url = format!("ws://{SRV_IP}:{port}/ws");
    let mut node = Command::new("ip")
        .args(["netns", "exec", SRV])
        .arg(&herald)
        .args([
            "--listen",
            &format!("{SRV_IP}:{port}"),
            "--internal-listen",
            "127.0.0.1:9090",
        ])
        .arg("--config")
        .arg(&config)
        .env("HERALD_LOG__LEVEL", "warn")
        .env("HERALD_HEARTBEAT__INTERVAL", "1s")
        .env("HERALD_HEARTBEAT__TIMEOUT", "1s")
        // One publisher connection carries the whole stream.
        .env("HERALD_LIMITS__MESSAGES_PER_SECOND", "10000")
        .env("HERALD_LIMITS__MESSAGE_BURST", "10000")
        .kill_on_drop(true)
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let me = std::env::current_exe()?;
    let t0 = now_us() + 1_000_000;
    let mut client = Command::new("ip")
        .args(["netns", "exec", CLI])
        .arg(&me)
        .args(["drops-client", "--url", &url, "--channel", "drops"])
        .args([
            "--clients",
            &clients.to_string(),
            "--publications",
            &publications.to_string(),
        ])
        .args([
            "--t0-us",
            &t0.to_string(),
            "--first-ms",
            &first_ms.to_string(),
        ])
        .args([
            "--period-ms",
            &period_ms.to_string(),
            "--cut-ms",
            &cut_ms.to_string(),
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(client.stdout.take().context("stdout")?).lines();
    let ready = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await??;
    anyhow::ensure!(ready.is_some(), "drops-client did not start");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Wait for the schedule's start, then publish and cut on schedule.
    let start = Instant::now() + Duration::from_micros(t0.saturating_sub(now_us()));
    tokio::time::sleep_until(start.into()).await;
    let publisher = Command::new("ip")
        .args(["netns", "exec", SRV])
        .arg(&me)
        .args(["drops-publisher", "--url", &url, "--channel", "drops"])
        .args([
            "--publications",
            &publications.to_string(),
            "--rate",
            &rate.to_string(),
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    for i in 0..cuts {
        let at = start + Duration::from_millis(first_ms + i * period_ms);
        tokio::time::sleep_until(at.into()).await;
        ns.cut(true)?;
        tokio::time::sleep(Duration::from_millis(cut_ms)).await;
        ns.cut(false)?;
    }
    let published = publisher.wait_with_output().await?;
    let published: Value = serde_json::from_slice(&published.stdout).unwrap_or(Value::Null);
    let summary = tokio::time::timeout(Duration::from_secs(150), lines.next_line())
        .await??
        .context("drops-client ended without a summary")?;
    let s: Value = serde_json::from_str(&summary)?;
    let _ = client.wait().await;
    let _ = node.start_kill();
    drop(ns);
    let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    let mut figures = std::collections::BTreeMap::new();
    figures.insert(
        "delivered_pct".into(),
        100.0 * f("received") / f("expected"),
    );
    figures.insert("duplicates".into(), f("duplicates"));
    figures.insert("not_recovered".into(), f("not_recovered"));
    figures.insert("cut_delay_ms_p50".into(), f("cut_delay_ms_p50"));
    figures.insert("cut_delay_ms_p99".into(), f("cut_delay_ms_p99"));
    figures.insert("cut_delay_ms_max".into(), f("cut_delay_ms_max"));
    figures.insert(
        "publish_failures".into(),
        published["failed"].as_f64().unwrap_or(f64::NAN),
    );
    figures.insert("cuts".into(), cuts as f64);
    figures.insert("clients".into(), clients as f64);
    Ok(figures)
}
