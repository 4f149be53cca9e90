//! The orchestrator: starts Redis, each target and the load-generator workers, runs
//! every scenario for every target in one run, and reports figures and ratios.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use herald_harness::{free_port, RedisServer};

use crate::procfs;
use crate::report::Row;

/// What to run.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct RunArgs {
    /// Tiny sizes and one-second phases: checks that every scenario and peer works.
    #[arg(long)]
    pub(crate) smoke: bool,
    /// Scenarios, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fanout,channels,crossnode,latency,idle,connect,auth,history,churn,drops"
    )]
    pub(crate) scenarios: Vec<String>,
    /// Targets: herald, herald-history (every bench channel keeps history; publishes go
    /// through the history script), floor, node, python, socketio, and `herald@PATH`
    /// for another Herald binary (before/after comparisons in one run).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "herald,herald-history,floor,node,python,socketio"
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
    /// Publications in flight in the closed-loop scenarios.
    #[arg(long, default_value_t = 64)]
    pub(crate) window: u64,
    /// Where results.json and chart.svg go.
    #[arg(long, default_value = "bench-results")]
    pub(crate) out: PathBuf,
}

impl RunArgs {
    fn apply_smoke(&mut self) {
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

const PAYLOAD_PAD: usize = 60;
const SOURCES: &str = "127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7";
/// Connections per worker process, under the 20,000 open-file hard limit.
const PER_WORKER: usize = 15_000;

pub(crate) fn run(mut args: RunArgs) -> anyhow::Result<()> {
    args.apply_smoke();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(main(args))
}

async fn main(args: RunArgs) -> anyhow::Result<()> {
    let machine = procfs::machine();
    eprintln!("herald-bench: {machine}");
    for t in &args.targets {
        setup(t).await.with_context(|| format!("setting up {t}"))?;
    }
    // Pub/sub clients may buffer a lot during the fan-out bursts: raise Redis's limit so
    // it measures Herald, not Redis disconnecting a slow peer.
    let redis = RedisServer::start_with(
        free_port(),
        &[
            "--client-output-buffer-limit",
            "pubsub",
            "256mb",
            "128mb",
            "60",
        ],
    );
    let mut rows: Vec<Row> = Vec::new();
    // Each target's fan-out maximum (publications/s), for the latency scenario.
    let mut max_rate: BTreeMap<String, f64> = BTreeMap::new();
    for scenario in &args.scenarios {
        for target in &args.targets {
            eprintln!("== {scenario} / {target}");
            // Scenarios that measure Herald alone answer `None` for the other targets.
            let row: anyhow::Result<Option<Row>> = match scenario.as_str() {
                "fanout" => closed_loop(&args, &redis, target, scenario, 1, args.subscribers, 1)
                    .await
                    .map(Some),
                "channels" => closed_loop(
                    &args,
                    &redis,
                    target,
                    scenario,
                    1,
                    args.subscribers,
                    args.channels,
                )
                .await
                .map(Some),
                "crossnode" => closed_loop(&args, &redis, target, scenario, 2, args.subscribers, 1)
                    .await
                    .map(Some),
                "latency" => latency(&args, &redis, target, &max_rate).await.map(Some),
                "idle" => idle(&args, &redis, target).await.map(Some),
                "connect" => connect_rate(&args, &redis, target).await.map(Some),
                "drops" => drops(&args, target).await,
                "auth" => auth_costs(&args, &redis, target).await,
                "churn" => churn(&args, &redis, target).await,
                "history" => history_costs(&args, &redis, target).await,
                other => bail!("unknown scenario {other}"),
            };
            let Some(row) = row.with_context(|| format!("{scenario} / {target}"))? else {
                continue;
            };
            if scenario == "fanout" {
                if let Some(r) = row.figures.get("published_per_s") {
                    max_rate.insert(target.clone(), *r);
                }
            }
            eprintln!("   {}", fmt_figures(&row.figures));
            rows.push(row);
        }
    }
    let report = crate::report::Report {
        machine,
        args: format!("{args:?}"),
        rows,
    };
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("chart.svg"), report.svg())?;
    println!("{}", report.table());
    eprintln!(
        "wrote {} and {}",
        args.out.join("results.json").display(),
        args.out.join("chart.svg").display()
    );
    Ok(())
}

fn fmt_figures(f: &BTreeMap<String, f64>) -> String {
    f.iter()
        .map(|(k, v)| format!("{k}={v:.3}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers")
}

/// Installs a peer's dependencies when they are missing.
async fn setup(target: &str) -> anyhow::Result<()> {
    match target {
        "herald" | "herald-history" | "floor" => Ok(()),
        t if t.starts_with("herald@") => {
            anyhow::ensure!(Path::new(&t[7..]).is_file(), "{}: no such binary", &t[7..]);
            Ok(())
        }
        "node" | "socketio" => {
            let dir = peers_dir().join(target);
            if dir.join("node_modules/.package-lock.json").is_file() {
                return Ok(());
            }
            eprintln!("installing the Node peer's packages (npm install)");
            let ok = Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--silent"])
                .current_dir(&dir)
                .status()
                .await
                .context("running npm (install Node.js and npm)")?
                .success();
            anyhow::ensure!(ok, "npm install failed in {}", dir.display());
            Ok(())
        }
        "python" => {
            let have = Command::new("python3")
                .args(["-c", "import websockets, redis.asyncio"])
                .stderr(Stdio::null())
                .status()
                .await
                .context("running python3")?
                .success();
            if have {
                return Ok(());
            }
            eprintln!("installing the Python peer's packages (pip install)");
            let req = peers_dir().join("python/requirements.txt");
            let ok = Command::new("python3")
                .args(["-m", "pip", "install", "-q", "-r"])
                .arg(&req)
                .status()
                .await?
                .success();
            anyhow::ensure!(ok, "pip install -r {} failed", req.display());
            Ok(())
        }
        other => bail!("unknown target {other}"),
    }
}

async fn wait_port(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "{what} did not listen on {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A running target: its processes, where clients connect, how to publish.
struct Target {
    procs: Vec<Child>,
    addrs: Vec<SocketAddr>,
    publisher: Publisher,
}

enum Publisher {
    /// A backend publishing raw payloads into Redis (every target but the floor).
    Redis(herald_redis::BackendPublisher),
    /// A backend publishing through Herald's publish script (history channels).
    History(herald_redis::BackendPublisher),
    Floor(Vec<TcpStream>),
}

impl Publisher {
    async fn publish(&mut self, msgs: &[(String, String)]) -> anyhow::Result<()> {
        match self {
            Publisher::Redis(p) => {
                let raw: Vec<(&str, &[u8])> = msgs
                    .iter()
                    .map(|(c, d)| (c.as_str(), d.as_bytes()))
                    .collect();
                p.publish_raw(&raw).await?;
            }
            Publisher::History(p) => {
                let policy = herald_broker::HistoryPolicy {
                    size: HISTORY_SIZE,
                    ttl: Duration::from_secs(600),
                    meta_ttl: Duration::from_secs(86_400),
                };
                let batch: Vec<herald_broker::PublishRequest> = msgs
                    .iter()
                    .filter_map(|(c, d)| {
                        let name = herald_protocol::ChannelName::new(c).ok()?;
                        let data = bytes::Bytes::copy_from_slice(d.as_bytes());
                        let p = herald_protocol::Publication::now(
                            name,
                            herald_protocol::Payload::Json(data),
                        );
                        Some(herald_broker::PublishRequest {
                            history: Some(policy),
                            ..herald_broker::PublishRequest::plain(p)
                        })
                    })
                    .collect();
                p.publish(&batch).await?;
            }
            Publisher::Floor(socks) => {
                let mut buf = String::new();
                for (c, d) in msgs {
                    buf.push_str(c);
                    buf.push('\t');
                    buf.push_str(d);
                    buf.push('\n');
                }
                for s in socks {
                    s.write_all(buf.as_bytes()).await?;
                }
            }
        }
        Ok(())
    }
}

/// Publications kept per channel by the `herald-history` target.
const HISTORY_SIZE: usize = 1000;

/// The `herald-history` target's configuration: every bench channel keeps history.
fn history_config() -> anyhow::Result<PathBuf> {
    let path =
        std::env::temp_dir().join(format!("herald-bench-history-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        format!("[[channels.rules]]\npattern = \"bench-*\"\nhistory_size = {HISTORY_SIZE}\n"),
    )?;
    Ok(path)
}

impl Target {
    async fn start(kind: &str, nodes: usize, redis: &RedisServer) -> anyhow::Result<Target> {
        Target::start_with_env(kind, nodes, redis, &[]).await
    }

    /// `start`, with extra environment for Herald nodes.
    async fn start_with_env(
        kind: &str,
        nodes: usize,
        redis: &RedisServer,
        env: &[(&str, String)],
    ) -> anyhow::Result<Target> {
        let mut procs = Vec::new();
        let mut addrs = Vec::new();
        let mut controls = Vec::new();
        for i in 0..nodes {
            let port = free_port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let child = match kind {
                k if k == "herald" || k == "herald-history" || k.starts_with("herald@") => {
                    // `herald@PATH`: another build of Herald (e.g. before a change),
                    // measured in the same run as this one. `herald-history`: this
                    // build with every bench channel keeping history.
                    let bin = match k.strip_prefix("herald@") {
                        Some(path) => PathBuf::from(path),
                        None => sibling("herald")?,
                    };
                    let mut cmd = Command::new(bin);
                    if k == "herald-history" {
                        cmd.arg("--config").arg(history_config()?);
                    }
                    cmd.args(["--listen", &addr.to_string(), "--redis", &redis.url()])
                        .args(["--node-id", &format!("bench-{i}")])
                        .env("HERALD_LOG__LEVEL", "warn")
                        .env("HERALD_LIMITS__MAX_CONNECTIONS", "200000")
                        .env("HERALD_HEARTBEAT__INTERVAL", "300s")
                        .env("HERALD_LIMITS__INBOUND_QUEUE", "65536")
                        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                        .kill_on_drop(true)
                        .spawn()?
                }
                "floor" => {
                    let control = SocketAddr::from(([127, 0, 0, 1], free_port()));
                    controls.push(control);
                    Command::new(std::env::current_exe()?)
                        .args([
                            "floor",
                            "--listen",
                            &addr.to_string(),
                            "--control",
                            &control.to_string(),
                        ])
                        .kill_on_drop(true)
                        .spawn()?
                }
                "node" => Command::new("node")
                    .arg(peers_dir().join("node/server.js"))
                    .env("PORT", port.to_string())
                    .env("REDIS_URL", redis.url())
                    .stdout(Stdio::null())
                    .kill_on_drop(true)
                    .spawn()?,
                "socketio" => Command::new("node")
                    .arg(peers_dir().join("socketio/server.js"))
                    .env("PORT", port.to_string())
                    .env("REDIS_URL", redis.url())
                    .env("PRIMARY", if i == 0 { "1" } else { "0" })
                    .stdout(Stdio::null())
                    .kill_on_drop(true)
                    .spawn()?,
                "python" => Command::new("python3")
                    .arg(peers_dir().join("python/server.py"))
                    .env("PORT", port.to_string())
                    .env("REDIS_URL", redis.url())
                    .stdout(Stdio::null())
                    .kill_on_drop(true)
                    .spawn()?,
                other => bail!("unknown target {other}"),
            };
            procs.push(child);
            wait_port(addr, kind).await?;
            addrs.push(addr);
        }
        let publisher = if kind == "floor" {
            let mut socks = Vec::new();
            for c in controls {
                wait_port(c, "floor control").await?;
                let s = TcpStream::connect(c).await?;
                s.set_nodelay(true)?;
                socks.push(s);
            }
            Publisher::Floor(socks)
        } else {
            let p = herald_redis::BackendPublisher::connect(&redis.url(), "herald:").await?;
            if kind == "herald-history" {
                Publisher::History(p)
            } else {
                Publisher::Redis(p)
            }
        };
        Ok(Target {
            procs,
            addrs,
            publisher,
        })
    }

    fn pids(&self) -> Vec<u32> {
        self.procs.iter().filter_map(|c| c.id()).collect()
    }

    fn cpu(&self) -> f64 {
        self.pids().into_iter().map(procfs::cpu_seconds).sum()
    }

    /// `cpu`, from the live threads' nanosecond counters.
    fn thread_cpu(&self) -> f64 {
        self.pids()
            .into_iter()
            .map(procfs::thread_cpu_seconds)
            .sum()
    }

    fn rss(&self) -> u64 {
        self.pids().into_iter().map(procfs::rss_bytes).sum()
    }

    async fn stop(mut self) {
        for c in &mut self.procs {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
}

/// A binary built next to this one (target/release/herald for a release bench).
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let p = me.with_file_name(name);
    anyhow::ensure!(
        p.is_file(),
        "{} not found: build it first (cargo build --release -p herald -p herald-bench)",
        p.display()
    );
    Ok(p)
}

/// A load-generator process.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    ready: Value,
}

impl Worker {
    async fn start(
        addr: SocketAddr,
        connections: usize,
        channels: usize,
        offset: usize,
        kind: &str,
    ) -> anyhow::Result<Worker> {
        Worker::start_with(addr, connections, channels, offset, kind, &[]).await
    }

    async fn start_with(
        addr: SocketAddr,
        connections: usize,
        channels: usize,
        offset: usize,
        kind: &str,
        extra: &[&str],
    ) -> anyhow::Result<Worker> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["worker", "--addr", &addr.to_string()])
            .args(["--connections", &connections.to_string()])
            .args(["--channels", &channels.to_string()])
            .args(["--offset", &offset.to_string()])
            .args(extra)
            .args(["--sources", SOURCES])
            .args([
                "--protocol",
                if kind == "socketio" {
                    "socketio"
                } else {
                    "herald"
                },
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut w = Worker {
            child,
            stdin,
            stdout,
            ready: Value::Null,
        };
        w.ready = w.line().await?;
        let failed = w.ready["failed"].as_u64().unwrap_or(0);
        anyhow::ensure!(failed == 0, "{failed} connections failed: {}", w.ready);
        Ok(w)
    }

    async fn line(&mut self) -> anyhow::Result<Value> {
        let line = tokio::time::timeout(Duration::from_secs(600), self.stdout.next_line())
            .await
            .context("worker silent")??
            .context("worker exited")?;
        Ok(serde_json::from_str(&line)?)
    }

    async fn cmd(&mut self, c: &str) -> anyhow::Result<Value> {
        self.stdin.write_all(format!("{c}\n").as_bytes()).await?;
        self.line().await
    }

    async fn quit(mut self) {
        let _ = self.stdin.write_all(b"quit\n").await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let _ = self.child.start_kill();
    }
}

/// Starts workers holding `n` subscribers spread over `addrs` and `channels`.
async fn workers(
    addrs: &[SocketAddr],
    n: usize,
    channels: usize,
    split: usize,
    kind: &str,
) -> anyhow::Result<Vec<Worker>> {
    // At least `split` processes (receiving is CPU-bound), at most PER_WORKER each.
    let per_addr = n / addrs.len();
    let mut out = Vec::new();
    let mut offset = 0;
    for addr in addrs {
        let procs = split.max(per_addr.div_ceil(PER_WORKER)).max(1);
        let mut left = per_addr;
        for p in 0..procs {
            let k = left / (procs - p);
            left -= k;
            if k == 0 {
                continue;
            }
            out.push(Worker::start(*addr, k, channels, offset, kind).await?);
            offset += k;
        }
    }
    Ok(out)
}

async fn total(ws: &mut [Worker]) -> anyhow::Result<u64> {
    let mut sum = 0;
    for w in ws.iter_mut() {
        sum += w.cmd("count").await?["received"].as_u64().unwrap_or(0);
    }
    Ok(sum)
}

fn payload(seq: u64) -> String {
    format!(
        r#"{{"seq":{seq},"ts":{},"pad":"{}"}}"#,
        herald_protocol::publication::unix_micros(),
        "x".repeat(PAYLOAD_PAD)
    )
}

/// What history costs, Herald only: publish rate and Redis CPU per publication with
/// history off (`PUBLISH` of the envelope) and on (the publish script: offset, stream,
/// TTLs, publish), each to a node with subscribers; and the time a resuming client
/// takes to receive 1,000 missed publications from one node (subscribe sent → 1,000th
/// message read).
async fn history_costs(
    args: &RunArgs,
    redis: &RedisServer,
    kind: &str,
) -> anyhow::Result<Option<Row>> {
    if kind != "herald" {
        return Ok(None);
    }
    let n: u64 = if args.smoke { 2_000 } else { 100_000 };
    let subscribers = if args.smoke { 5 } else { 100 };
    let redis_pid = redis.pid().context("redis-server is running")?;
    let mut figures = BTreeMap::new();
    for (mode, target_kind) in [("off", "herald"), ("on", "herald-history")] {
        let mut target = Target::start(target_kind, 1, redis).await?;
        let ws = workers(&target.addrs, subscribers, 1, 1, target_kind).await?;
        let cpu0 = procfs::cpu_seconds(redis_pid);
        let started = Instant::now();
        let mut seq = 0u64;
        while seq < n {
            let msgs: Vec<(String, String)> = (seq..(seq + 100).min(n))
                .map(|i| ("bench-0".to_owned(), payload(i)))
                .collect();
            seq += msgs.len() as u64;
            target.publisher.publish(&msgs).await?;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = procfs::cpu_seconds(redis_pid) - cpu0;
        figures.insert(format!("publish_per_s_history_{mode}"), n as f64 / elapsed);
        figures.insert(
            format!("redis_cpu_us_per_pub_history_{mode}"),
            cpu * 1e6 / n as f64,
        );
        if mode == "on" {
            let (median, max) = replay(&mut target, if args.smoke { 3 } else { 20 }).await?;
            figures.insert("replay_1000_ms_median".into(), median);
            figures.insert("replay_1000_ms_max".into(), max);
        }
        for w in ws {
            w.quit().await;
        }
        target.stop().await;
    }
    let on = figures["redis_cpu_us_per_pub_history_on"];
    let off = figures["redis_cpu_us_per_pub_history_off"];
    figures.insert("redis_cpu_on_over_off".into(), on / off.max(1e-9));
    Ok(Some(Row {
        scenario: "history".into(),
        target: kind.into(),
        figures,
        note: format!(
            "{n} publications in pipelined batches of 100 to a channel with {subscribers} subscribers on one node; replay: 1,000 missed publications"
        ),
    }))
}

/// Publishes 1,000 publications to a fresh history channel, then `reps` times connects
/// a client that resumes from before them; returns the median and the longest time
/// until its 1,000th message, in ms.
async fn replay(target: &mut Target, reps: usize) -> anyhow::Result<(f64, f64)> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let channel = "bench-replay";
    let name = herald_protocol::ChannelName::new(channel)?;
    let url = format!("ws://{}/ws", target.addrs[0]);
    // Learn the channel's epoch and position.
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await?;
    ws.next().await;
    let subscribe = herald_protocol::client::encode_subscribe(&name, Some(1), None);
    ws.send(Message::Text(subscribe.into())).await?;
    let sub: Value = match ws.next().await {
        Some(Ok(Message::Text(t))) => serde_json::from_str(&t)?,
        other => bail!("expected subscribed, got {other:?}"),
    };
    let epoch = sub["epoch"]
        .as_str()
        .and_then(herald_protocol::Epoch::parse)
        .context("an epoch")?;
    let from = sub["offset"].as_u64().context("an offset")?;
    let since = herald_protocol::StreamPosition {
        offset: from,
        epoch,
    };
    drop(ws);
    let msgs: Vec<(String, String)> = (0..1000)
        .map(|i| (channel.to_owned(), payload(i)))
        .collect();
    for chunk in msgs.chunks(100) {
        target.publisher.publish(chunk).await?;
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await?;
        ws.next().await; // welcome
        let started = Instant::now();
        let resume = herald_protocol::client::encode_subscribe(&name, Some(1), Some(since));
        ws.send(Message::Text(resume.into())).await?;
        let mut got = 0;
        while got < 1000 {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Text(t))))
                    if herald_protocol::server::parse_text_delivery(&t).is_some() =>
                {
                    got += 1
                }
                Ok(Some(Ok(Message::Text(t)))) if t.contains(r#""recovered":false"#) => {
                    bail!("the resume was refused: {t}")
                }
                Ok(Some(Ok(_))) => {}
                other => bail!("replay stopped after {got}: {other:?}"),
            }
        }
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[times.len() - 1]))
}

/// Subscription churn, Herald only: a bystander's delivery lag on a steady channel
/// while `churn` connections spread over 100 other channels each move to another
/// channel (unsubscribe + subscribe) every second, against the same without churn.
/// Fan-out must not depend on the size or churn of the subscription map.
async fn churn(args: &RunArgs, redis: &RedisServer, kind: &str) -> anyhow::Result<Option<Row>> {
    if kind != "herald" && !kind.starts_with("herald@") {
        return Ok(None);
    }
    let mut target = Target::start(kind, 1, redis).await?;
    let addr = target.addrs[0];
    let mut bystander = Worker::start(addr, 1, 1, 0, kind).await?;
    let phase = Duration::from_secs_f64(args.seconds);
    let rate = 200.0;
    let mut figures = BTreeMap::new();
    let mut churners = Vec::new();
    for mode in ["quiet", "churn"] {
        if mode == "churn" {
            let per_worker = PER_WORKER.min(args.churn);
            let mut left = args.churn;
            let mut offset = 0;
            while left > 0 {
                let n = per_worker.min(left);
                churners.push(
                    Worker::start_with(
                        addr,
                        n,
                        100,
                        offset,
                        kind,
                        &["--channel-prefix", "churn", "--churn-every-ms", "1000"],
                    )
                    .await?,
                );
                left -= n;
                offset += n;
            }
        }
        bystander.cmd("reset").await?;
        let started = Instant::now();
        let mut seq = 0u64;
        while started.elapsed() < phase {
            let due = (started.elapsed().as_secs_f64() * rate) as u64;
            if seq < due {
                let msgs: Vec<(String, String)> = (seq..due)
                    .map(|i| ("bench-0".to_owned(), payload(i)))
                    .collect();
                target.publisher.publish(&msgs).await?;
                seq = due;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s = bystander.cmd("stats").await?;
        figures.insert(
            format!("bystander_p50_us_{mode}"),
            s["p50_us"].as_f64().unwrap_or(f64::NAN),
        );
        figures.insert(
            format!("bystander_p99_us_{mode}"),
            s["p99_us"].as_f64().unwrap_or(f64::NAN),
        );
        figures.insert(
            format!("bystander_lost_{mode}"),
            seq.saturating_sub(s["received"].as_u64().unwrap_or(0)) as f64,
        );
    }
    figures.insert("churn_moves_per_s".into(), args.churn as f64);
    for w in churners {
        w.quit().await;
    }
    bystander.quit().await;
    target.stop().await;
    Ok(Some(Row {
        scenario: "churn".into(),
        target: kind.into(),
        figures,
        note: format!(
            "bystander on one channel at {rate}/s; {} connections over 100 channels, each moving every second",
            args.churn
        ),
    }))
}

/// Fan-out, many channels and cross-node: publish as fast as delivery keeps up (at most
/// `window` publications outstanding) and measure deliveries and server CPU.
async fn closed_loop(
    args: &RunArgs,
    redis: &RedisServer,
    kind: &str,
    scenario: &str,
    nodes: usize,
    subscribers: usize,
    channels: usize,
) -> anyhow::Result<Row> {
    let mut target = Target::start(kind, nodes, redis).await?;
    let mut ws = workers(&target.addrs, subscribers, channels, 2 / nodes, kind).await?;
    let per_message = subscribers as f64 / channels as f64;
    for w in ws.iter_mut() {
        w.cmd("reset").await?;
    }
    let cpu0 = target.cpu();
    let started = Instant::now();
    let phase = Duration::from_secs_f64(args.seconds);
    let mut published = 0u64;
    let mut received = 0u64;
    while started.elapsed() < phase {
        received = total(&mut ws).await?;
        let outstanding = published as f64 - received as f64 / per_message;
        if outstanding < args.window as f64 {
            let k = args.window - outstanding.max(0.0) as u64;
            let msgs: Vec<(String, String)> = (0..k)
                .map(|i| {
                    let seq = published + i;
                    (format!("bench-{}", seq % channels as u64), payload(seq))
                })
                .collect();
            target.publisher.publish(&msgs).await?;
            published += k;
        } else {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
    // Drain what is in flight (bounded).
    let expected = (published as f64 * per_message) as u64;
    let drain_deadline = Instant::now() + Duration::from_secs(5);
    while received < expected && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        received = total(&mut ws).await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = target.cpu() - cpu0;
    let mut figures = BTreeMap::new();
    figures.insert("delivered_per_s".into(), received as f64 / elapsed);
    figures.insert("published_per_s".into(), published as f64 / elapsed);
    figures.insert(
        "cpu_us_per_delivery".into(),
        cpu * 1e6 / received.max(1) as f64,
    );
    figures.insert("server_cpu_cores".into(), cpu / elapsed);
    figures.insert("lost".into(), expected.saturating_sub(received) as f64);
    for w in ws {
        w.quit().await;
    }
    target.stop().await;
    Ok(Row {
        scenario: scenario.into(),
        target: kind.into(),
        figures,
        note: format!("{subscribers} subscribers, {channels} channel(s), {nodes} node(s)"),
    })
}

/// Publish at a fixed rate and report publish→receive latency percentiles.
///
/// The rate is `latency_fraction` of the floor's fan-out maximum; a target whose own
/// maximum is below that rate (it would only measure an ever-growing queue) runs at
/// the same fraction of its own maximum instead, and says so in its note.
async fn latency(
    args: &RunArgs,
    redis: &RedisServer,
    kind: &str,
    max_rate: &BTreeMap<String, f64>,
) -> anyhow::Result<Row> {
    let floor = max_rate.get("floor").copied().unwrap_or(400.0);
    let own = max_rate.get(kind).copied().unwrap_or(floor);
    let rate = (args.latency_fraction * floor.min(own)).max(1.0);
    let mut target = Target::start(kind, 1, redis).await?;
    let mut ws = workers(&target.addrs, args.subscribers, 1, 2, kind).await?;
    for w in ws.iter_mut() {
        w.cmd("reset").await?;
    }
    let started = Instant::now();
    let phase = Duration::from_secs_f64(args.seconds);
    let mut published = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    while started.elapsed() < phase {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        if due > published {
            let msgs: Vec<(String, String)> = (published..due)
                .map(|s| ("bench-0".to_owned(), payload(s)))
                .collect();
            target.publisher.publish(&msgs).await?;
            published = due;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut figures = BTreeMap::new();
    let (mut p50, mut p99, mut p999, mut recv) = (0f64, 0f64, 0f64, 0u64);
    for w in ws.iter_mut() {
        let s = w.cmd("stats").await?;
        recv += s["received"].as_u64().unwrap_or(0);
        // With several workers, report the worst of each percentile.
        p50 = p50.max(s["p50_us"].as_f64().unwrap_or(0.0));
        p99 = p99.max(s["p99_us"].as_f64().unwrap_or(0.0));
        p999 = p999.max(s["p999_us"].as_f64().unwrap_or(0.0));
    }
    figures.insert("publish_rate".into(), rate);
    figures.insert("p50_us".into(), p50);
    figures.insert("p99_us".into(), p99);
    figures.insert("p999_us".into(), p999);
    figures.insert(
        "lost".into(),
        (published * args.subscribers as u64).saturating_sub(recv) as f64,
    );
    for w in ws {
        w.quit().await;
    }
    target.stop().await;
    Ok(Row {
        scenario: "latency".into(),
        target: kind.into(),
        figures,
        note: if own < floor {
            format!(
                "{} subscribers at {rate:.0} publications/s ({}% of its own maximum: it cannot sustain {:.0}/s)",
                args.subscribers,
                (args.latency_fraction * 100.0) as u32,
                args.latency_fraction * floor
            )
        } else {
            format!(
                "{} subscribers at {rate:.0} publications/s",
                args.subscribers
            )
        },
    })
}

/// Resident memory per idle subscribed connection, and after churn.
async fn idle(args: &RunArgs, redis: &RedisServer, kind: &str) -> anyhow::Result<Row> {
    let target = Target::start(kind, 1, redis).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = target.rss();
    let ws = workers(&target.addrs, args.idle, 100, 1, kind).await?;
    // Idle means quiet for a while (Herald's writers linger 2 s after their last write).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let loaded = target.rss();
    let mut ws = ws;
    for w in ws.iter_mut() {
        w.cmd("close").await?;
    }
    for w in ws {
        w.quit().await;
    }
    // Churn: a second full wave, then everyone leaves.
    let mut again = workers(&target.addrs, args.idle, 100, 1, kind).await?;
    for w in again.iter_mut() {
        w.cmd("close").await?;
    }
    for w in again {
        w.quit().await;
    }
    // Allocators give freed memory back on a timer (jemalloc: 10 s decay).
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = target.rss();
    let n = args.idle as f64;
    let mut figures = BTreeMap::new();
    figures.insert("base_rss_mib".into(), base as f64 / 1048576.0);
    figures.insert(
        "kib_per_connection".into(),
        (loaded.saturating_sub(base)) as f64 / n / 1024.0,
    );
    figures.insert(
        "after_churn_mib_over_base".into(),
        after.saturating_sub(base) as f64 / 1048576.0,
    );
    target.stop().await;
    Ok(Row {
        scenario: "idle".into(),
        target: kind.into(),
        figures,
        note: format!("{} idle subscribed connections, fresh process", args.idle),
    })
}

/// Completed handshakes per second and server CPU per handshake.
async fn connect_rate(args: &RunArgs, redis: &RedisServer, kind: &str) -> anyhow::Result<Row> {
    let target = Target::start(kind, 1, redis).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu0 = target.cpu();
    let started = Instant::now();
    let w = Worker::start(target.addrs[0], args.handshakes, 0, 0, kind).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = target.cpu() - cpu0;
    let mut figures = BTreeMap::new();
    figures.insert("handshakes_per_s".into(), args.handshakes as f64 / elapsed);
    figures.insert(
        "cpu_us_per_handshake".into(),
        cpu * 1e6 / args.handshakes as f64,
    );
    w.quit().await;
    target.stop().await;
    Ok(Row {
        scenario: "connect".into(),
        target: kind.into(),
        figures,
        note: format!("{} handshakes, 128 in flight", args.handshakes),
    })
}

/// Network drops, Herald only (see the `drops` module).
async fn drops(args: &RunArgs, kind: &str) -> anyhow::Result<Option<Row>> {
    if kind != "herald" {
        return Ok(None);
    }
    let figures = crate::drops::measure(sibling("herald")?, args.smoke).await?;
    Ok(Some(Row {
        scenario: "drops".into(),
        target: kind.into(),
        figures,
        note: "clients in their own network namespace; their link cut (interface down) for 2 s every 5 s; a history channel at a steady rate".into(),
    }))
}

/// What verifying connection tokens costs, Herald only: server CPU per handshake with
/// no token (anonymous), with an HS256 token and with an RS256 token (2048-bit key made
/// by `openssl`), the same number of handshakes each, the node otherwise identical.
/// Each handshake verifies its token in full (signature, claims); keys are parsed once
/// at start-up. Every connection carries the same user, so the per-user count is taken
/// too (its limit raised out of the way).
async fn auth_costs(
    args: &RunArgs,
    redis: &RedisServer,
    kind: &str,
) -> anyhow::Result<Option<Row>> {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    if kind != "herald" {
        return Ok(None);
    }
    const SECRET: &str = "bench-hmac-secret-bench-hmac-secret-0123";
    let dir = std::env::temp_dir().join(format!("herald-bench-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    herald_harness::key_pair(&dir, "rsa", herald_harness::KeyKind::Rsa);
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 3600;
    let claims = serde_json::json!({"sub": "bench-user", "exp": exp});
    let hs = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )?;
    let rs = encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(&std::fs::read(dir.join("rsa.pem"))?)?,
    )?;
    let rsa_pub = dir.join("rsa.pub.pem").to_string_lossy().into_owned();
    let keys = [
        ("HERALD_AUTH__JWT__HMAC_SECRET", SECRET.to_owned()),
        ("HERALD_AUTH__JWT__RSA_PUBLIC_KEY_FILE", rsa_pub),
        (
            "HERALD_LIMITS__MAX_CONNECTIONS_PER_USER",
            "10000000".to_owned(),
        ),
    ];
    let mut figures = BTreeMap::new();
    // Interleaved rounds, so a slow moment of the machine lands on one round, not one
    // mode; figures are medians over rounds, ratios the median of each round's ratio.
    let rounds = if args.smoke { 1 } else { 7 };
    let mut cpu: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut wall: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for _ in 0..rounds {
        for (mode, token) in [("anon", None), ("hs256", Some(&hs)), ("rs256", Some(&rs))] {
            let target = Target::start_with_env(kind, 1, redis, &keys).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let cpu0 = target.thread_cpu();
            let started = Instant::now();
            let extra: Vec<&str> = token
                .map(|t| vec!["--token", t.as_str()])
                .unwrap_or_default();
            let w =
                Worker::start_with(target.addrs[0], args.handshakes, 0, 0, kind, &extra).await?;
            wall.entry(mode)
                .or_default()
                .push(started.elapsed().as_secs_f64());
            cpu.entry(mode)
                .or_default()
                .push(target.thread_cpu() - cpu0);
            w.quit().await;
            target.stop().await;
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let n = args.handshakes as f64;
    for (mode, c) in &cpu {
        figures.insert(format!("cpu_us_per_handshake_{mode}"), median(c) * 1e6 / n);
        figures.insert(format!("handshakes_per_s_{mode}"), n / median(&wall[mode]));
    }
    for mode in ["hs256", "rs256"] {
        let ratios: Vec<f64> = cpu[mode]
            .iter()
            .zip(&cpu["anon"])
            .map(|(t, a)| t / a.max(1e-9))
            .collect();
        figures.insert(format!("{mode}_over_anon"), median(&ratios));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Some(Row {
        scenario: "auth".into(),
        target: kind.into(),
        figures,
        note: format!(
            "{} handshakes x {rounds} interleaved rounds per mode, 128 in flight, medians; the same node configuration (all keys loaded) in every mode",
            args.handshakes
        ),
    }))
}
