//! The system under test, as real processes: one `redis-server` with AOF (`everysec`)
//! and RDB snapshots, three `herald` nodes, HAProxy in front of them, and a network
//! namespace for the clients whose link can be cut. Each fault the run injects is a
//! method here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use herald_harness::{free_port, system_tool, Haproxy};

/// `redis-server` with its files in a directory of its own.
pub(crate) struct Redis {
    pub(crate) port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    pub(crate) fn start(dir: &Path) -> anyhow::Result<Redis> {
        std::fs::create_dir_all(dir)?;
        let mut r = Redis {
            port: free_port(),
            dir: dir.to_owned(),
            child: None,
        };
        r.spawn(true)?;
        Ok(r)
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self, aof: bool) -> anyhow::Result<()> {
        let child = Command::new(system_tool("redis-server", "redis-server"))
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--appendonly", if aof { "yes" } else { "no" }])
            .args(["--appendfsync", "everysec", "--save", "2 1"])
            .args(["--aof-load-truncated", "yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start redis-server")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.cli(&["PING"]).trim() != "PONG" {
            if Instant::now() > deadline {
                bail!("redis-server on {} did not come up", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub(crate) fn cli(&self, args: &[&str]) -> String {
        Command::new(system_tool("redis-cli", "redis-tools"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// `kill -9`.
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again from its files (AOF, which replays everything fsynced).
    pub(crate) fn start_again(&mut self) -> anyhow::Result<()> {
        self.spawn(true)
    }

    /// Cuts `bytes` off the end of the newest AOF file, as a host that crashed before
    /// its last second reached the disk would have it (Redis loads the file up to its
    /// last whole command), then starts again. Returns the bytes cut.
    pub(crate) fn start_with_aof_tail_cut(&mut self, bytes: u64) -> anyhow::Result<u64> {
        let dir = self.dir.join("appendonlydir");
        let newest = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(".incr.aof"))
            .max_by_key(|p| {
                // appendonly.aof.<n>.incr.aof: the highest n is the one being written.
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.split('.').nth(2))
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0)
            });
        let mut cut = 0;
        if let Some(path) = newest {
            let len = std::fs::metadata(&path)?.len();
            cut = bytes.min(len);
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)?
                .set_len(len - cut)?;
        }
        self.spawn(true)?;
        Ok(cut)
    }

    /// Starts from the last RDB snapshot alone (the AOF lost, a restored backup), then
    /// turns the AOF on again (Redis writes a new one from the data it loaded).
    pub(crate) fn start_from_snapshot(&mut self) -> anyhow::Result<()> {
        let _ = std::fs::remove_dir_all(self.dir.join("appendonlydir"));
        self.spawn(false)?;
        let ok = self.cli(&["CONFIG", "SET", "appendonly", "yes"]);
        if ok.trim() != "OK" {
            bail!("CONFIG SET appendonly yes: {ok}");
        }
        Ok(())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One `herald` node process, on fixed ports across restarts.
pub(crate) struct Node {
    pub(crate) addr: SocketAddr,
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    pub(crate) fn new(bin: &Path, config: &Path, log: PathBuf) -> Node {
        Node {
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            bin: bin.to_owned(),
            config: config.to_owned(),
            log,
            child: None,
        }
    }

    pub(crate) fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .env("HERALD_LISTEN", self.addr.to_string())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub(crate) fn running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL.
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM: the node drains its sessions and exits; waits for it (bounded).
    pub(crate) async fn terminate(&mut self) {
        self.terminate_within(Duration::from_secs(20)).await;
    }

    /// SIGTERM, then up to `within` for the node to drain and exit, SIGKILL after that
    /// (what the kubelet does at the end of the termination grace period). Whether it
    /// exited by itself.
    pub(crate) async fn terminate_within(&mut self, within: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// Whether `/readyz` answers 200.
    pub(crate) async fn ready(&self) -> bool {
        self.get("/readyz")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    }

    /// The whole HTTP/1.1 response to `GET path` (within 2 s), if any.
    pub(crate) async fn get(&self, path: &str) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let probe = async {
            let mut s = tokio::net::TcpStream::connect(self.addr).await.ok()?;
            let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.ok()?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.ok()?;
            String::from_utf8(buf).ok()
        };
        tokio::time::timeout(Duration::from_secs(2), probe)
            .await
            .ok()
            .flatten()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// HAProxy in front of the nodes: WebSocket (and everything else) balanced over the
/// healthy ones, on loopback and on the namespace link's host address. Its admin socket
/// (`admin`) lets a rollout take a server out of rotation the way Kubernetes removes a
/// terminating pod from its Service's endpoints. Its buffers are kept small (8 KiB
/// kernel buffers and HAProxy buffers): a slow client's backlog then reaches its node
/// within seconds, as through a proxy tuned for many connections, instead of waiting
/// in HAProxy.
pub(crate) fn haproxy(nodes: &[SocketAddr], link: Option<&str>, admin: &Path) -> (Haproxy, u16) {
    Haproxy::start("soak", |port| {
        let mut cfg = format!(
            "global\n    maxconn 8000\n    stats socket {} level admin\n\
             \x20   tune.sndbuf.client 8192\n    tune.rcvbuf.server 8192\n    tune.bufsize 8192\n\
             defaults\n    mode http\n    timeout connect 2s\n    timeout client 30s\n\
             \x20   timeout server 30s\n    timeout tunnel 1h\n\
             frontend fe\n",
            admin.display()
        );
        cfg.push_str(&format!("    bind 127.0.0.1:{port}\n"));
        if let Some(host_ip) = link {
            cfg.push_str(&format!("    bind {host_ip}:{port}\n"));
        }
        cfg.push_str("    default_backend nodes\nbackend nodes\n    balance roundrobin\n");
        cfg.push_str("    option httpchk GET /readyz\n");
        for (i, n) in nodes.iter().enumerate() {
            cfg.push_str(&format!(
                "    server n{i} {n} check inter 250ms fall 2 rise 2\n"
            ));
        }
        cfg
    })
}

/// Sets server `n{i}`'s administrative state through HAProxy's admin socket: `drain`
/// (no new connections, the open ones stay: an endpoint removed) or `ready`.
pub(crate) async fn haproxy_server_state(
    admin: &Path,
    i: usize,
    state: &str,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(admin)
        .await
        .with_context(|| format!("HAProxy's admin socket {}", admin.display()))?;
    s.write_all(format!("set server nodes/n{i} state {state}\n").as_bytes())
        .await?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).await?;
    // Success is an empty answer; anything else is HAProxy saying why not.
    if !answer.trim().is_empty() {
        bail!(
            "HAProxy: set server nodes/n{i} state {state}: {}",
            answer.trim()
        );
    }
    Ok(())
}

/// Runs a command, failing with its output.
fn sh(args: &[&str]) -> anyhow::Result<()> {
    herald_harness::run_checked(args).map_err(anyhow::Error::msg)
}

/// The clients' namespace, linked to the host by a veth pair; removed on drop. Named
/// and addressed after the process, so that two soaks on one machine do not meet.
pub(crate) struct Namespace {
    /// The namespace.
    pub(crate) name: String,
    /// The host's end of the veth pair, and the namespace's.
    host_dev: String,
    ns_dev: String,
    /// The host's address on the link (HAProxy listens there too).
    pub(crate) host_ip: String,
}

impl Namespace {
    /// Needs root and `ip` (iproute2).
    pub(crate) fn create() -> anyhow::Result<Namespace> {
        let ip = system_tool("ip", "iproute2");
        let ip = ip.to_str().context("path")?.to_owned();
        let pid = std::process::id();
        // 10.204-10.207.x.0/24 by pid: interface names stay within 15 bytes.
        let (hi, lo) = (204 + (pid / 256) % 4, pid % 256);
        let ns = Namespace {
            name: format!("hsoak-{pid}"),
            host_dev: format!("hs{pid}h"),
            ns_dev: format!("hs{pid}n"),
            host_ip: format!("10.{hi}.{lo}.1"),
        };
        // Leftovers of an interrupted run with this pid would make `add` fail.
        let _ = sh(&[&ip, "netns", "del", &ns.name]);
        let _ = sh(&[&ip, "link", "del", &ns.host_dev]);
        sh(&[&ip, "netns", "add", &ns.name]).context("creating a network namespace needs root")?;
        sh(&[
            &ip,
            "link",
            "add",
            &ns.host_dev,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_dev,
            "netns",
            &ns.name,
        ])?;
        let host = format!("{}/24", ns.host_ip);
        sh(&[&ip, "addr", "add", &host, "dev", &ns.host_dev])?;
        sh(&[&ip, "link", "set", &ns.host_dev, "up"])?;
        let inside = format!("10.{hi}.{lo}.2/24");
        sh(&[
            &ip, "-n", &ns.name, "addr", "add", &inside, "dev", &ns.ns_dev,
        ])?;
        sh(&[&ip, "-n", &ns.name, "link", "set", &ns.ns_dev, "up"])?;
        sh(&[&ip, "-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Cuts the clients' link (or restores it): their end goes down, as a laptop's
    /// Wi-Fi does; the host's end hears nothing.
    pub(crate) fn cut(&self, on: bool) -> anyhow::Result<()> {
        let state = if on { "down" } else { "up" };
        sh(&["ip", "-n", &self.name, "link", "set", &self.ns_dev, state])
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
        let _ = sh(&["ip", "link", "del", &self.host_dev]);
    }
}
