//! Real processes for Herald's tests and benchmark tool: free loopback ports, system
//! programs (a missing one fails with the command that installs it, never a skip),
//! `redis-server` / Redis Cluster on free ports, and HAProxy; and reading a sample from
//! a node's `/metrics` text.
//!
//! It panics where it cannot go on (a missing program, a server that does not come
//! up): both of its users, the test kit and the bench tool, treat that as fatal, and
//! the message says what to install. It has no dependencies, so the bench tool takes
//! nothing test-only into its release build.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The path of a system program the tests start for real (`redis-server`, `haproxy`,
/// `prometheus`, ...). A missing one fails the test with the command that installs it;
/// it never skips.
pub fn system_tool(bin: &str, package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain(["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{bin}` not found: install it with `apt-get install {package}` \
                 (the README's test command, `bash .ci/run`, does this when it is missing)"
            )
        })
}

/// Runs `args[0]` with the rest as its arguments (an `ip` command, say); `Err` carries
/// the command and what it printed on stderr when it could not run or failed.
pub fn run_checked(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("running {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Which key pair [`key_pair`] makes.
#[derive(Debug, Clone, Copy)]
pub enum KeyKind {
    /// RSA, 2048 bits (RS256).
    Rsa,
    /// ECDSA on P-256 (ES256).
    EcP256,
}

/// Runs `openssl ARGS` in `dir`; a failure panics with what openssl said.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new(system_tool("openssl", "openssl"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes a key pair with `openssl` in `dir`: `{name}.pem` (private) and
/// `{name}.pub.pem` (public, PEM).
pub fn key_pair(dir: &Path, name: &str, kind: KeyKind) {
    let (algorithm, option) = match kind {
        KeyKind::Rsa => ("RSA", "rsa_keygen_bits:2048"),
        KeyKind::EcP256 => ("EC", "ec_paramgen_curve:P-256"),
    };
    let private = format!("{name}.pem");
    let public = format!("{name}.pub.pem");
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            algorithm,
            "-pkeyopt",
            option,
            "-out",
            &private,
        ],
    );
    openssl(dir, &["pkey", "-in", &private, "-pubout", "-out", &public]);
}

/// What a test certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertUse {
    /// A server at 127.0.0.1 (`subjectAltName=IP:127.0.0.1`).
    Server,
    /// A client presenting itself (`extendedKeyUsage=clientAuth`).
    Client,
}

/// A self-signed test certificate authority in `dir`: `{name}.pem` and `{name}.key`,
/// valid two days.
pub fn test_ca(dir: &Path, name: &str) {
    let (key, pem, subject) = (
        format!("{name}.key"),
        format!("{name}.pem"),
        format!("/CN={name}"),
    );
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", &subject,
            "-keyout", &key, "-out", &pem,
        ],
    );
}

/// A certificate signed by the test CA `ca` (see [`test_ca`]) in `dir`: `{name}.pem` and
/// `{name}.key`, common name `cn`, valid two days. X.509 v3 (it carries an extension),
/// which rustls requires.
pub fn signed_certificate(dir: &Path, ca: &str, name: &str, cn: &str, usage: CertUse) {
    let (key, csr, pem, ext) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.ext"),
    );
    let extension = match usage {
        CertUse::Server => "subjectAltName=IP:127.0.0.1\n",
        CertUse::Client => "extendedKeyUsage=clientAuth\n",
    };
    std::fs::write(dir.join(&ext), extension).expect("write the extension file");
    let subject = format!("/CN={cn}");
    openssl(
        dir,
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", &subject, "-keyout", &key, "-out",
            &csr,
        ],
    );
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ],
    );
}

/// Finds `sample` (name plus label set, exactly as printed) in Prometheus text output.
pub fn metric_value(text: &str, sample: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == sample).then(|| value.parse().ok())?
    })
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A `redis-server` child process, killed on drop.
pub struct RedisServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a server on a free port (another one if the port was taken before the
    /// server bound it: a parallel test's connection can take any free port).
    pub fn start() -> RedisServer {
        RedisServer::start_on_free_port(&[], false)
    }

    /// Starts a server on a free port with extra arguments, trying other ports while
    /// one is taken before the server binds it; `bus`: the port 10,000 above must be
    /// free too (Redis Cluster's bus).
    fn start_on_free_port(extra: &[&str], bus: bool) -> RedisServer {
        for _ in 0..10 {
            let port = free_port();
            if bus
                && (port > 55_535
                    || std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_err())
            {
                continue;
            }
            let extra: Vec<String> = extra
                .iter()
                .map(|e| e.replace("{port}", &port.to_string()))
                .collect();
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            if let Some(s) = RedisServer::try_start_with(port, &extra) {
                return s;
            }
        }
        panic!("redis-server did not come up on ten free ports in a row");
    }

    /// Starts a server on `port` with extra `redis-server` arguments.
    pub fn start_with(port: u16, extra: &[&str]) -> RedisServer {
        RedisServer::try_start_with(port, extra)
            .unwrap_or_else(|| panic!("redis-server on {port} did not come up"))
    }

    /// As [`RedisServer::start_with`]; `None` when the server exited at once (its port
    /// was taken).
    fn try_start_with(port: u16, extra: &[&str]) -> Option<RedisServer> {
        let dir = std::env::temp_dir().join(format!("herald-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut s = RedisServer {
            port,
            child: None,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        s.try_spawn().then_some(s)
    }

    fn spawn(&mut self) {
        assert!(
            self.try_spawn(),
            "redis-server on {} did not come up",
            self.port
        );
    }

    /// Starts the process; false when it exited before answering (its port is taken).
    fn try_spawn(&mut self) -> bool {
        let child = Command::new(system_tool("redis-server", "redis-server"))
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", &self.dir.to_string_lossy()])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cli(&["PING"]).trim() != "PONG" {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || Instant::now() >= deadline {
                self.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (like a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs `redis-cli -p PORT ARGS...` and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's working directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new(system_tool("redis-cli", "redis-tools"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-cli: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A Redis Cluster of masters without replicas, created with `redis-cli --cluster create`.
pub struct RedisCluster {
    /// The masters.
    pub servers: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `n` (at least 3) masters and joins them into a cluster.
    pub fn start(n: usize) -> RedisCluster {
        RedisCluster::start_with_replicas(n, 0)
    }

    /// Starts `masters` (at least 3) masters with `replicas` replicas each and joins
    /// them into a cluster; returns once every replica has synced (`redis-cli` picks
    /// the roles: ask a server with `INFO replication`).
    pub fn start_with_replicas(masters: usize, replicas: usize) -> RedisCluster {
        let n = masters * (1 + replicas);
        let servers: Vec<RedisServer> = (0..n)
            .map(|_| {
                RedisServer::start_on_free_port(
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes-{port}.conf",
                        "--cluster-node-timeout",
                        "2000",
                    ],
                    true,
                )
            })
            .collect();
        let addrs: Vec<String> = servers
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        let replicas = replicas.to_string();
        args.extend(["--cluster-replicas", &replicas, "--cluster-yes"]);
        let out = cli(servers[0].port, &args);
        let deadline = Instant::now() + Duration::from_secs(30);
        let formed = |s: &RedisServer| {
            s.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") && {
                let info = s.cli(&["INFO", "replication"]);
                info.contains("role:master") || info.contains("master_link_status:up")
            }
        };
        while !servers.iter().all(formed) {
            assert!(Instant::now() < deadline, "cluster did not form: {out}");
            std::thread::sleep(Duration::from_millis(50));
        }
        RedisCluster { servers }
    }

    /// Seed URLs, comma-separated, as `redis.url` takes them with `cluster = true`.
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A running `haproxy`, killed on drop.
pub struct Haproxy {
    child: std::process::Child,
    /// Where its standard output goes (its log, with `log stdout`).
    out: PathBuf,
}

impl Haproxy {
    /// Starts `haproxy` listening on a free port: `config(port)` is its configuration
    /// (written to a temporary file named after `name`). Returns once it listens. A
    /// port taken between picking and binding (other processes open ephemeral ports
    /// too) makes haproxy exit: it is started again on another port, and after three
    /// tries the panic carries what haproxy said.
    pub fn start(name: &str, config: impl Fn(u16) -> String) -> (Haproxy, u16) {
        let mut said = String::new();
        for _ in 0..3 {
            let port = free_port();
            // Named after the port too: tests in one process start several at once.
            let base =
                std::env::temp_dir().join(format!("herald-{name}-{port}-{}", std::process::id()));
            let (path, log) = (base.with_extension("cfg"), base.with_extension("log"));
            let out = base.with_extension("out");
            std::fs::write(&path, config(port)).expect("write the haproxy configuration");
            // A file, not a pipe: nobody reads haproxy's output while it runs, and a
            // full pipe would stall it.
            let stderr = std::fs::File::create(&log).expect("create the haproxy log");
            let mut child = std::process::Command::new(system_tool("haproxy", "haproxy"))
                .args(["-db", "-f"])
                .arg(&path)
                .stdout(std::fs::File::create(&out).expect("create the haproxy output"))
                .stderr(stderr)
                .spawn()
                .expect("start haproxy");
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                    return (Haproxy { child, out }, port);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            said = std::fs::read_to_string(&log).unwrap_or_default();
        }
        panic!("haproxy did not start: {said}");
    }

    /// What haproxy wrote to its standard output (its log, with `log stdout`), once it
    /// holds `needle` or `within` passed.
    pub fn stdout_within(&self, within: Duration, needle: &str) -> String {
        let deadline = Instant::now() + within;
        loop {
            let out = std::fs::read_to_string(&self.out).unwrap_or_default();
            if out.contains(needle) || Instant::now() > deadline {
                return out;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
