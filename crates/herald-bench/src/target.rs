//! The systems under test: starting a target (Herald, a peer, the floor) behind its
//! publisher, and the load-generator worker processes that connect to it.

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

use crate::args::{PAYLOAD_PAD, PER_WORKER, SOURCES};
use crate::procfs;

pub(crate) fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers")
}

/// Installs a peer's dependencies when they are missing.
pub(crate) async fn setup(target: &str) -> anyhow::Result<()> {
    match target {
        "herald" | "herald-history" | "herald-embedded" | "floor" | "floor-redis" => Ok(()),
        t if t.starts_with("herald") && t.contains('@') => {
            let (_, path) = t.split_once('@').unwrap_or_default();
            anyhow::ensure!(Path::new(path).is_file(), "{path}: no such binary");
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

pub(crate) async fn wait_port(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "{what} did not listen on {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A running target: its processes, where clients connect, how to publish.
pub(crate) struct Target {
    pub(crate) procs: Vec<Child>,
    pub(crate) addrs: Vec<SocketAddr>,
    pub(crate) publisher: Publisher,
}

pub(crate) enum Publisher {
    /// A backend publishing raw payloads into Redis (every target but the floor).
    Redis(herald_redis::BackendPublisher),
    /// A backend publishing through Herald's publish script (history channels).
    History(herald_redis::BackendPublisher),
    /// A backend posting to a single node's `POST /api/batch` over one kept-alive
    /// HTTP/1.1 connection (the `herald-embedded` target: no Redis at all).
    Http(hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>),
    Floor(Vec<TcpStream>),
}

impl Publisher {
    pub(crate) async fn publish(&mut self, msgs: &[(String, String)]) -> anyhow::Result<()> {
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
            Publisher::Http(sender) => {
                let mut body = String::from(r#"{"publications":["#);
                for (i, (c, d)) in msgs.iter().enumerate() {
                    if i > 0 {
                        body.push(',');
                    }
                    body.push_str(&format!(r#"{{"channel":"{c}","data":{d}}}"#));
                }
                body.push_str("]}");
                sender.ready().await?;
                let req = hyper::Request::post("/api/batch")
                    .header("host", "herald")
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
                let resp = sender.send_request(req).await?;
                let status = resp.status();
                let reply = http_body_util::BodyExt::collect(resp.into_body())
                    .await?
                    .to_bytes();
                anyhow::ensure!(
                    status.is_success(),
                    "POST /api/batch: {status}: {}",
                    String::from_utf8_lossy(&reply)
                );
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
pub(crate) const HISTORY_SIZE: usize = 1000;

/// The `herald-history` target's configuration: every bench channel keeps history.
pub(crate) fn history_config() -> anyhow::Result<PathBuf> {
    let path =
        std::env::temp_dir().join(format!("herald-bench-history-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        format!("[[channels.rules]]\npattern = \"bench-*\"\nhistory_size = {HISTORY_SIZE}\n"),
    )?;
    Ok(path)
}

impl Target {
    pub(crate) async fn start(
        kind: &str,
        nodes: usize,
        redis: &RedisServer,
    ) -> anyhow::Result<Target> {
        Target::start_with_env(kind, nodes, redis, &[]).await
    }

    /// `start`, with extra environment for Herald nodes.
    pub(crate) async fn start_with_env(
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
                k if k.starts_with("herald") && !k.starts_with("herald-bench") => {
                    // `herald@PATH`: another build of Herald (e.g. before a change),
                    // measured in the same run as this one. `herald-history`: this
                    // build with every bench channel keeping history (and
                    // `herald-history@PATH`, another build so). `herald-embedded`: a
                    // single node on its embedded broker, published to over HTTP
                    // (the floor's counterpart: neither has Redis in the path).
                    let path = k
                        .strip_prefix("herald@")
                        .or_else(|| k.strip_prefix("herald-history@"))
                        .or_else(|| k.strip_prefix("herald-embedded@"));
                    let bin = match path {
                        Some(path) => PathBuf::from(path),
                        None => sibling("herald")?,
                    };
                    let mut cmd = Command::new(bin);
                    if k.starts_with("herald-history") {
                        cmd.arg("--config").arg(history_config()?);
                    }
                    cmd.args(["--listen", &addr.to_string()]);
                    if k.starts_with("herald-embedded") {
                        anyhow::ensure!(nodes == 1, "{k} is a single node (no Redis)");
                    } else {
                        cmd.args(["--redis", &redis.url()]);
                    }
                    cmd.args(["--node-id", &format!("bench-{i}")])
                        .env("HERALD_LOG__LEVEL", "warn")
                        .env("HERALD_LIMITS__MAX_CONNECTIONS", "200000")
                        .env("HERALD_HEARTBEAT__INTERVAL", "300s")
                        .env("HERALD_LIMITS__INBOUND_QUEUE", "65536")
                        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                        .kill_on_drop(true)
                        .spawn()?
                }
                // `floor-redis`: the floor fed through Redis like Herald.
                "floor" | "floor-redis" => {
                    let control = SocketAddr::from(([127, 0, 0, 1], free_port()));
                    controls.push(control);
                    let mut cmd = Command::new(std::env::current_exe()?);
                    cmd.args([
                        "floor",
                        "--listen",
                        &addr.to_string(),
                        "--control",
                        &control.to_string(),
                    ]);
                    if kind == "floor-redis" {
                        cmd.args(["--redis", &redis.url()]);
                    }
                    cmd.kill_on_drop(true).spawn()?
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
        } else if kind.starts_with("herald-embedded") {
            let stream = TcpStream::connect(addrs[0]).await?;
            stream.set_nodelay(true)?;
            let (sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            Publisher::Http(sender)
        } else {
            let p = herald_redis::BackendPublisher::connect(&redis.url(), "herald:").await?;
            if kind.starts_with("herald-history") {
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

    pub(crate) fn pids(&self) -> Vec<u32> {
        self.procs.iter().filter_map(|c| c.id()).collect()
    }

    pub(crate) fn cpu(&self) -> f64 {
        self.pids().into_iter().map(procfs::cpu_seconds).sum()
    }

    /// `cpu`, from the live threads' nanosecond counters.
    pub(crate) fn thread_cpu(&self) -> f64 {
        self.pids()
            .into_iter()
            .map(procfs::thread_cpu_seconds)
            .sum()
    }

    pub(crate) fn rss(&self) -> u64 {
        self.pids().into_iter().map(procfs::rss_bytes).sum()
    }

    pub(crate) async fn stop(mut self) {
        for c in &mut self.procs {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
}

/// A binary built next to this one (target/release/herald for a release bench).
pub(crate) fn sibling(name: &str) -> anyhow::Result<PathBuf> {
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
pub(crate) struct Worker {
    pub(crate) child: Child,
    pub(crate) stdin: ChildStdin,
    pub(crate) stdout: Lines<BufReader<ChildStdout>>,
    pub(crate) ready: Value,
}

impl Worker {
    pub(crate) async fn start(
        addr: SocketAddr,
        connections: usize,
        channels: usize,
        offset: usize,
        kind: &str,
    ) -> anyhow::Result<Worker> {
        Worker::start_with(addr, connections, channels, offset, kind, &[]).await
    }

    pub(crate) async fn start_with(
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

    pub(crate) async fn line(&mut self) -> anyhow::Result<Value> {
        let line = tokio::time::timeout(Duration::from_secs(600), self.stdout.next_line())
            .await
            .context("worker silent")??
            .context("worker exited")?;
        Ok(serde_json::from_str(&line)?)
    }

    pub(crate) async fn cmd(&mut self, c: &str) -> anyhow::Result<Value> {
        self.stdin.write_all(format!("{c}\n").as_bytes()).await?;
        self.line().await
    }

    pub(crate) async fn quit(mut self) {
        let _ = self.stdin.write_all(b"quit\n").await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let _ = self.child.start_kill();
    }
}

/// Starts workers holding `n` subscribers spread over `addrs` and `channels`.
pub(crate) async fn workers(
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

pub(crate) async fn total(ws: &mut [Worker]) -> anyhow::Result<u64> {
    let mut sum = 0;
    for w in ws.iter_mut() {
        sum += w.cmd("count").await?["received"].as_u64().unwrap_or(0);
    }
    Ok(sum)
}

pub(crate) fn payload(seq: u64) -> String {
    format!(
        r#"{{"seq":{seq},"ts":{},"pad":"{}"}}"#,
        herald_protocol::publication::unix_micros(),
        "x".repeat(PAYLOAD_PAD)
    )
}
