//! The `herald` process itself: configuration errors, signals, exit codes.
//! (The behaviour of the gateway is tested in the workspace's `tests/` suite; these
//! tests need the built binary, which Cargo only provides to this package's tests.)

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use herald_testkit::{http, Client};

fn herald() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_herald"));
    c.env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Writes `text` to a file of this test process named after `name` (in the temp dir)
/// and returns its path.
fn temp_file(name: &str, text: &str) -> String {
    let path = std::env::temp_dir().join(format!("herald-{}-{name}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Starts `herald` on a free port and returns the child and its address.
fn start(extra: &[&str], env: &[(&str, &str)]) -> (Child, std::net::SocketAddr) {
    let (child, addr, _) = start_logged(extra, env);
    (child, addr)
}

/// [`start`], also returning what herald logged up to the line saying where it listens.
fn start_logged(
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Child, std::net::SocketAddr, Vec<String>) {
    let mut cmd = herald();
    cmd.args(["--listen", "127.0.0.1:0"]);
    if !extra.contains(&"--node-id") {
        cmd.args(["--node-id", "proc"]);
    }
    let mut child = cmd
        .args(extra)
        .envs(env.iter().copied())
        .spawn()
        .expect("spawn herald");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        let mut before = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent {
                let rest = line.split("ws://").nth(1).or(line.split("wss://").nth(1));
                if let Some(rest) = rest {
                    if let Some(addr) = rest.split("/ws").next() {
                        let _ = tx.send((addr.to_owned(), std::mem::take(&mut before)));
                        sent = true;
                    }
                } else {
                    before.push(line);
                }
            }
        }
    });
    let (addr, before) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("herald printed where it listens");
    (child, addr.parse().expect("an address"), before)
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("herald did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (off the runtime's threads) for `child` to exit, and asserts it exited 0.
async fn assert_exits_cleanly(mut child: Child) {
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(20)))
            .await
            .unwrap();
    assert_eq!(status.code(), Some(0));
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok);
}

#[test]
fn invalid_configuration_exits_64_before_binding() {
    // An empty JWKS would start with token checking off.
    let empty_jwks = temp_file("empty.json", r#"{"keys":[]}"#);
    // A rule whose {sub} is not a whole segment would let user 4 read user 42's channels.
    let overlapping = temp_file(
        "sub.toml",
        "[[channels.rules]]\npattern = \"dm.{sub}*\"\nsubscribe = \"authenticated\"\n",
    );
    // A delta is against the publication before: only history channels number them.
    let delta = temp_file(
        "delta.toml",
        "[[channels.rules]]\npattern = \"d:*\"\ndelta = \"fossil\"\n",
    );
    let bad_format = temp_file(
        "zstd.toml",
        "[[channels.rules]]\npattern = \"z:*\"\nhistory_size = 5\ndelta = \"zstd\"\n",
    );
    for (args, env, needle) in [
        (
            vec!["--config", delta.as_str()],
            vec![],
            "delta needs history_size",
        ),
        (
            vec!["--config", bad_format.as_str()],
            vec![],
            "\"zstd\" is not one of \"fossil\"",
        ),
        (vec!["--config", overlapping.as_str()], vec![], "{sub}:*"),
        (
            vec![],
            vec![("HERALD_AUTH__JWT__JWKS_FILE", empty_jwks.as_str())],
            "no keys",
        ),
        (vec!["--listen", "nonsense"], vec![], "listen"),
        (
            vec![],
            vec![("HERALD_LIMITS__MAX_CONNECTIONS", "0")],
            "max_connections",
        ),
        (
            vec!["--config", "/nonexistent/herald.toml"],
            vec![],
            "herald.toml",
        ),
        (
            vec![],
            vec![("HERALD_LIMITS__NO_SUCH_KEY", "1")],
            "no_such_key",
        ),
    ] {
        let out = herald()
            .args(&args)
            .envs(env.iter().copied())
            .output()
            .expect("run herald");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("listening"),
            "bound before failing: {stderr}"
        );
    }
}

/// The variables Kubernetes injects for a Service named `herald` once made the process
/// exit 64 (a crash loop): it starts, and says it ignored them.
#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_service_links_do_not_stop_the_process() {
    let links = [
        ("HERALD_SERVICE_HOST", "10.96.0.12"),
        ("HERALD_SERVICE_PORT", "8080"),
        ("HERALD_PORT", "tcp://10.96.0.12:8080"),
        ("HERALD_PORT_8080_TCP", "tcp://10.96.0.12:8080"),
        ("HERALD_PORT_8080_TCP_PROTO", "tcp"),
        ("HERALD_PORT_8080_TCP_PORT", "8080"),
        ("HERALD_PORT_8080_TCP_ADDR", "10.96.0.12"),
    ];
    let (mut child, addr, logged) = start_logged(&["--log-format", "text"], &links);
    let r = http(addr, "GET", "/readyz", &[], Vec::new()).await;
    assert_eq!(r.status, 200);
    let _ = child.kill();
    let _ = child.wait();
    let logged = logged.join("\n");
    assert!(logged.contains("HERALD_PORT_8080_TCP_ADDR"), "{logged}");
    assert!(logged.contains("Kubernetes service link"), "{logged}");
}

/// A SIGHUP while the node still waits for Redis (before it listens) used to end the
/// process (the signal's default action); now it is a key reload like any other.
#[tokio::test(flavor = "multi_thread")]
async fn an_early_sighup_does_not_end_the_process() {
    let dead = format!("redis://127.0.0.1:{}", herald_testkit::free_port());
    let mut child = herald()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--node-id",
            "proc",
            "--redis",
            &dead,
        ])
        .env("HERALD_REDIS__TIMEOUT", "2s")
        .spawn()
        .expect("spawn herald");
    std::thread::sleep(Duration::from_millis(300));
    signal(&child, "-HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP ended the process"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn example_config_file_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../herald.toml");
    let out = herald()
        .args(["--config", example, "--check-config"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// herald.toml says it lists every key: each key `--check-config` prints (the effective
/// settings, every key with its default) appears in it, set or commented out, in its
/// section.
#[test]
fn example_config_file_lists_every_key() {
    let out = herald()
        .args(["--check-config"])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success());
    let effective: toml::Table = String::from_utf8(out.stdout).unwrap().parse().unwrap();
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../herald.toml")).unwrap();
    // Section → the keys it mentions (`key = ...` or `# key = ...`).
    let mut mentioned: std::collections::HashMap<String, Vec<String>> = Default::default();
    let mut section = String::new();
    for line in example.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim_matches(|c| c == '[' || c == ']').to_owned();
            continue;
        }
        let line = line.trim_start_matches('#').trim();
        // An array of tables (`[[auth.api_keys]]`), shown commented out, is its key.
        if let Some(name) = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) {
            if let Some((at, key)) = name.rsplit_once('.') {
                mentioned
                    .entry(at.to_owned())
                    .or_default()
                    .push(key.to_owned());
            }
            continue;
        }
        if let Some((key, _)) = line.split_once('=') {
            let key = key.trim();
            if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                mentioned
                    .entry(section.clone())
                    .or_default()
                    .push(key.to_owned());
            }
        }
    }
    fn keys(t: &toml::Table, at: &str, out: &mut Vec<(String, String)>) {
        for (k, v) in t {
            match v {
                toml::Value::Table(sub) => keys(sub, &join(at, k), out),
                _ => out.push((at.to_owned(), k.clone())),
            }
        }
    }
    fn join(a: &str, b: &str) -> String {
        if a.is_empty() {
            b.to_owned()
        } else {
            format!("{a}.{b}")
        }
    }
    let mut all = Vec::new();
    keys(&effective, "", &mut all);
    assert!(all.len() > 40, "{all:?}");
    let missing: Vec<String> = all
        .iter()
        .filter(|(s, k)| !mentioned.get(s).is_some_and(|ks| ks.contains(k)))
        .map(|(s, k)| join(s, k))
        .collect();
    assert!(missing.is_empty(), "herald.toml lacks {missing:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_clients_and_exits_0() {
    let (child, addr) = start(&["--log-format", "text"], &[]);
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(&format!("ws://{addr}/ws")).await.unwrap();
        assert_eq!(c.welcome["node"], "proc");
        c.subscribe("news").await;
        clients.push(c);
    }
    let r = http(
        addr,
        "POST",
        "/api/publish",
        &[("content-type", "application/json")],
        br#"{"channel":"news","data":1}"#.to_vec(),
    )
    .await;
    assert_eq!(r.status, 200);
    for c in &mut clients {
        assert_eq!(c.recv_json().await["data"], 1);
    }
    signal(&child, "-TERM");
    for mut c in clients {
        let (closed, _) = c.closed().await;
        assert_eq!(closed.code, Some(1001));
    }
    assert_exits_cleanly(child).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_with_restart_closes_with_1012() {
    // Configuration from the environment reaches the running node.
    let (child, addr) = start(
        &["--log-format", "json"],
        &[("HERALD_SHUTDOWN__RESTART", "true")],
    );
    let mut c = Client::connect(&format!("ws://{addr}/ws")).await.unwrap();
    signal(&child, "-INT");
    let (closed, _) = c.closed().await;
    assert_eq!(closed.code, Some(1012));
    assert_exits_cleanly(child).await;
}

/// Tokens travel in URLs (`access_token`), requests and refreshes; none may reach a log
/// line at any level, whether it verifies or not.
#[tokio::test(flavor = "multi_thread")]
async fn tokens_never_reach_the_logs_even_at_trace() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    const SECRET: &str = "log-test-secret-log-test-secret-0123";
    let mut child = herald()
        .args(["--listen", "127.0.0.1:0", "--node-id", "logs"])
        .env("RUST_LOG", "trace")
        .env("HERALD_AUTH__JWT__HMAC_SECRET", SECRET)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn herald");
    // Every line of both streams, kept; the address is taken from the first that has it.
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let mut readers = Vec::new();
    let out: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().unwrap());
    let err: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().unwrap());
    for stream in [out, err] {
        let (lines, tx) = (lines.clone(), tx.clone());
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if let Some(addr) = line
                    .split("ws://")
                    .nth(1)
                    .and_then(|r| r.split("/ws").next())
                {
                    let _ = tx.send(addr.to_owned());
                }
                lines.lock().unwrap().push(line);
            }
        }));
    }
    let addr = rx.recv_timeout(Duration::from_secs(20)).expect("listening");
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let sign = |claims: serde_json::Value| encode(&Header::default(), &claims, &key).unwrap();
    let good = sign(serde_json::json!({"sub": "u1", "exp": exp + 600}));
    let expired = sign(serde_json::json!({"sub": "u1", "exp": exp - 600}));
    let fresh = sign(serde_json::json!({"sub": "u1", "exp": exp + 900}));
    let grant = sign(serde_json::json!({"sub": "u1", "exp": exp + 600, "channel": "private:x"}));
    let bogus = "bogus-token-that-must-not-be-logged-0xC0FFEE".to_owned();

    let mut c = Client::connect(&format!("ws://{addr}/ws?access_token={good}"))
        .await
        .expect("a valid token in the query");
    assert_eq!(c.welcome["user"], "u1");
    for t in [&expired, &bogus] {
        let refused = Client::connect(&format!("ws://{addr}/ws?x=1&access_token={t}")).await;
        assert!(refused.is_err(), "refused");
    }
    c.send_text(&format!(r#"{{"op":"refresh","token":"{fresh}","id":1}}"#))
        .await;
    assert_eq!(c.recv_json().await["op"], "refreshed");
    c.send_text(&format!(r#"{{"op":"refresh","token":"{bogus}","id":2}}"#))
        .await;
    assert_eq!(c.recv_json().await["code"], "forbidden");
    c.send_text(&format!(
        r#"{{"op":"subscribe","channel":"private:x","token":"{grant}","id":3}}"#
    ))
    .await;
    assert_eq!(c.recv_json().await["op"], "subscribed");
    c.close().await;
    signal(&child, "-TERM");
    assert_exits_cleanly(child).await;
    for r in readers {
        r.join().unwrap();
    }
    let lines = lines.lock().unwrap();
    // The logs did cover what happened (debug lines of the upgrades and refusals).
    let all = lines.join("\n");
    assert!(all.contains("upgrade accepted"), "{all}");
    assert!(all.contains("upgrade refused"), "{all}");
    for t in [&good, &expired, &fresh, &grant, &bogus] {
        // The signature alone is the secret part of a JWT; look for it too.
        let signature = t.rsplit('.').next().unwrap();
        for line in lines.iter() {
            assert!(!line.contains(signature), "a token in the log: {line}");
        }
    }
}

/// A JWKS file rotated in place takes effect on SIGHUP, without a restart; a broken
/// file leaves the keys in force.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_jwks_file() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let dir = std::env::temp_dir().join(format!("herald-jwks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jwks = dir.join("jwks.json");
    let key =
        |kid: &str, k: &str| format!(r#"{{"kty":"oct","kid":"{kid}","alg":"HS256","k":"{k}"}}"#);
    let k1 = key("k1", "Zmlyc3Qta2V5LWZpcnN0LWtleS1maXJzdC1rZXktMTI");
    let k2 = key("k2", "c2Vjb25kLWtleS1zZWNvbmQta2V5LXNlY29uZC1rMzQ");
    std::fs::write(&jwks, format!(r#"{{"keys":[{k1}]}}"#)).unwrap();
    let (child, addr) = start(
        &[],
        &[("HERALD_AUTH__JWT__JWKS_FILE", jwks.to_str().unwrap())],
    );
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let sign = |kid: &str, secret: &str| {
        let h = Header {
            kid: Some(kid.into()),
            ..Header::default()
        };
        let claims = serde_json::json!({"sub": kid, "exp": exp});
        encode(&h, &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    };
    let t1 = sign("k1", "first-key-first-key-first-key-12");
    let t2 = sign("k2", "second-key-second-key-second-k34");
    let accepted = |t: &str| {
        let url = format!("ws://{addr}/ws?access_token={t}");
        async move { Client::connect(&url).await.is_ok() }
    };
    assert!(accepted(&t1).await);
    assert!(!accepted(&t2).await, "k2 is not known yet");
    // Rotate: k2 in, k1 out.
    std::fs::write(&jwks, format!(r#"{{"keys":[{k2}]}}"#)).unwrap();
    signal(&child, "-HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !accepted(&t2).await {
        assert!(Instant::now() < deadline, "k2 not accepted after SIGHUP");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!accepted(&t1).await, "k1 was rotated out");
    // A broken file keeps the keys in force, and so does an emptied one (which used to
    // turn token checking off: no key, no verifier, every token ignored).
    for broken in ["not json", r#"{"keys":[]}"#] {
        std::fs::write(&jwks, broken).unwrap();
        signal(&child, "-HUP");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(accepted(&t2).await, "{broken}");
        assert!(!accepted(&t1).await, "{broken}");
    }
    signal(&child, "-TERM");
    assert_exits_cleanly(child).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `herald --version` names the release the welcome frame announces as `server`.
#[test]
fn version_is_the_release() {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("--version")
        .output()
        .expect("run herald --version");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("herald {}", herald_protocol::RELEASE)
    );
}

/// `herald token` mints what a node with the same configuration accepts, and
/// `herald config --default` prints a configuration the node reads as it is.
#[tokio::test]
async fn herald_token_and_herald_config_work_with_the_gateway() {
    const SECRET: &str = "a-secret-for-herald-token-of-32-bytes-or-more";
    let env = [
        ("HERALD_AUTH__JWT__HMAC_SECRET", SECRET),
        ("HERALD_AUTH__ANONYMOUS", "false"),
    ];
    let out = herald()
        .args([
            "token",
            "--sub",
            "alice",
            "--ttl",
            "10m",
            "--channels",
            "room:*",
        ])
        .envs(env)
        .stdout(Stdio::piped())
        .output()
        .expect("herald token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let (child, addr) = start(&[], &env);
    let mut c = Client::connect(&format!("ws://{addr}/ws?access_token={token}"))
        .await
        .expect("the minted token is accepted");
    assert_eq!(c.welcome["user"], "alice");
    c.send_text(r#"{"op":"subscribe","channel":"room:1","id":1}"#)
        .await;
    assert_eq!(c.recv_json().await["op"], "subscribed");
    assert!(
        Client::connect(&format!("ws://{addr}/ws")).await.is_err(),
        "no token, no connection (anonymous = false)"
    );
    c.close().await;
    signal(&child, "-TERM");
    assert_exits_cleanly(child).await;
    // Without a secret there is nothing to sign with: a clear refusal.
    let out = herald()
        .args(["token", "--sub", "alice"])
        .output()
        .expect("herald token");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.jwt.hmac_secret"));

    let out = herald()
        .args(["config", "--default"])
        .stdout(Stdio::piped())
        .output()
        .expect("herald config --default");
    assert!(out.status.success());
    let file = std::env::temp_dir().join(format!("herald-default-{}.toml", std::process::id()));
    std::fs::write(&file, &out.stdout).unwrap();
    let checked = herald()
        .args(["--config", file.to_str().unwrap(), "--check-config"])
        .output()
        .expect("check the default configuration");
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    std::fs::remove_file(file).ok();
}

/// Makes a CA (once) and, signed by it, a certificate for 127.0.0.1 named `cn`, in
/// `dir`: `ca.pem`, `{name}.pem`, `{name}.key`.
fn tls_certificate(dir: &std::path::Path, name: &str, cn: &str) {
    if !dir.join("ca.pem").exists() {
        herald_testkit::test_ca(dir, "ca");
    }
    herald_testkit::signed_certificate(dir, "ca", name, cn, herald_testkit::CertUse::Server);
}

/// A TLS client trusting `dir/ca.pem`, connected to `addr`; returns the stream and the
/// leaf certificate the server presented.
async fn tls_connect(
    dir: &std::path::Path,
    addr: std::net::SocketAddr,
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Vec<u8>,
) {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::from(addr.ip());
    let stream = connector.connect(name, tcp).await.expect("TLS handshake");
    let leaf = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (stream, leaf)
}

/// `[tls]` on the public listener: WebSocket over TLS (`wss://`) and HTTPS answer with
/// the configured certificate, a plain-text client is refused (counted), and SIGHUP puts
/// a renewed certificate in force for new connections while open ones keep running.
#[tokio::test]
async fn tls_on_the_public_listener_and_its_renewal() {
    use futures_util::{SinkExt, StreamExt};
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = std::env::temp_dir().join(format!("herald-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    tls_certificate(&dir, "first", "herald-first");
    tls_certificate(&dir, "second", "herald-second");
    std::fs::copy(dir.join("first.pem"), dir.join("live.pem")).unwrap();
    std::fs::copy(dir.join("first.key"), dir.join("live.key")).unwrap();
    let der = |name: &str| {
        rustls::pki_types::CertificateDer::pem_file_iter(dir.join(name))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .to_vec()
    };
    let (cert, key) = (dir.join("live.pem"), dir.join("live.key"));
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let (child, addr) = start(
        &[],
        &[
            ("HERALD_TLS__CERT_FILE", cert),
            ("HERALD_TLS__KEY_FILE", key),
        ],
    );

    // wss:// end to end: welcome, subscribe, a publication made through the API.
    let (stream, leaf) = tls_connect(&dir, addr).await;
    assert_eq!(leaf, der("first.pem"));
    let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://{addr}/ws"), stream)
        .await
        .expect("WebSocket over TLS");
    let welcome = ws.next().await.unwrap().unwrap().into_text().unwrap();
    assert!(welcome.contains(r#""op":"welcome""#), "{welcome}");
    ws.send(r#"{"op":"subscribe","channel":"news","id":1}"#.into())
        .await
        .unwrap();
    let reply = ws.next().await.unwrap().unwrap().into_text().unwrap();
    assert!(reply.contains(r#""op":"subscribed""#), "{reply}");

    // HTTPS: readiness, and a publish the WebSocket receives.
    let (mut https, _) = tls_connect(&dir, addr).await;
    let body = r#"{"channel":"news","data":{"over":"tls"}}"#;
    let request = format!(
        "POST /api/publish HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    https.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    https.read_to_string(&mut answer).await.ok();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let m = ws.next().await.unwrap().unwrap().into_text().unwrap();
    assert!(m.contains(r#""data":{"over":"tls"}"#), "{m}");

    // Plain text on the TLS port: no HTTP answer, the connection is dropped.
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut got)).await;
    assert!(
        !String::from_utf8_lossy(&got).contains("200 OK"),
        "plain HTTP answered"
    );

    // Renewal: new files, SIGHUP; new connections see the new certificate, the open
    // WebSocket keeps working.
    std::fs::copy(dir.join("second.pem"), dir.join("live.pem")).unwrap();
    std::fs::copy(dir.join("second.key"), dir.join("live.key")).unwrap();
    signal(&child, "-HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, leaf) = tls_connect(&dir, addr).await;
        if leaf == der("second.pem") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ws.send(r#"{"op":"ping","id":2}"#.into()).await.unwrap();
    let pong = ws.next().await.unwrap().unwrap().into_text().unwrap();
    assert!(pong.contains(r#""op":"pong""#), "{pong}");
    drop(ws);
    signal(&child, "-TERM");
    assert_exits_cleanly(child).await;
    std::fs::remove_dir_all(&dir).ok();
}

/// The control plane with real processes: a node that stops answering (SIGSTOP: frozen
/// with its sockets open, as a node stuck in a GC pause or on a dead host looks) is
/// reported missing by surveys, which wait for it until it has been silent for three
/// heartbeats and then name it without waiting; thawed (SIGCONT), it answers again.
#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_node_is_reported_missing() {
    let redis = herald_testkit::RedisServer::start();
    let url = redis.url();
    let env = [
        ("HERALD_AUTH__API_KEY", "control-key"),
        ("HERALD_CONTROL__HEARTBEAT_INTERVAL", "300ms"),
        // Generous: a's own answer must come well within it on a loaded machine.
        ("HERALD_CONTROL__SURVEY_TIMEOUT", "1500ms"),
        ("HERALD_REDIS__URL", url.as_str()),
    ];
    let (mut a, addr) = start(&["--node-id", "a"], &env);
    let (mut b, _) = start(&["--node-id", "b"], &env);
    let info = || async move {
        let r = http(
            addr,
            "GET",
            "/api/info",
            &[("authorization", "Bearer control-key")],
            vec![],
        )
        .await;
        assert_eq!(r.status, 200);
        let v = r.json();
        let nodes: Vec<String> = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node"].as_str().unwrap().to_owned())
            .collect();
        let missing: Vec<String> = serde_json::from_value(v["missing"].clone()).unwrap();
        (nodes, missing)
    };
    let until = |want: (Vec<&'static str>, Vec<&'static str>)| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = info().await;
            if got.0 == want.0 && got.1 == want.1 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "expected {want:?}, still {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    until((vec!["a", "b"], vec![])).await;
    signal(&b, "-STOP");
    let started = Instant::now();
    let (nodes, missing) = info().await;
    assert_eq!(
        (nodes, missing),
        (vec!["a".to_owned()], vec!["b".to_owned()])
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "the survey waited for b until control.survey_timeout"
    );
    // Silent for three heartbeats: no longer waited for, still named missing (it may
    // hold connections a command was meant for).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let started = Instant::now();
    let (nodes, missing) = info().await;
    assert_eq!(
        (nodes, missing),
        (vec!["a".to_owned()], vec!["b".to_owned()])
    );
    assert!(
        started.elapsed() < Duration::from_millis(1200),
        "not waited for: {:?}",
        started.elapsed()
    );
    signal(&b, "-CONT");
    until((vec!["a", "b"], vec![])).await;
    let _ = a.kill();
    let _ = b.kill();
    let _ = a.wait();
    let _ = b.wait();
}

/// Presence with real processes: a node SIGKILLed takes its members with it within the
/// TTL, and the cluster announces their `leave` (the dead node cannot).
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_nodes_members_leave_within_the_ttl() {
    let redis = herald_testkit::RedisServer::start();
    let dir = std::env::temp_dir().join(format!("herald-presence-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("herald.toml");
    std::fs::write(
        &config,
        format!(
            "[redis]\nurl = \"{}\"\n[presence]\nrefresh_interval = \"200ms\"\nttl = \"1s\"\n\
             [[channels.rules]]\npattern = \"room:*\"\npresence = true\njoin_leave = true\n",
            redis.url()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let (mut a, a_addr) = start(&["--config", config, "--node-id", "a"], &[]);
    let (mut b, b_addr) = start(&["--config", config, "--node-id", "b"], &[]);
    let mut watcher = Client::connect(&format!("ws://{a_addr}/ws")).await.unwrap();
    watcher.subscribe("room:1").await;
    let me = watcher.recv_json().await;
    assert_eq!(
        (me["op"].as_str(), &me["conn"]),
        (Some("join"), &watcher.welcome["conn"])
    );
    let mut member = Client::connect(&format!("ws://{b_addr}/ws")).await.unwrap();
    member.subscribe("room:1").await;
    let joined = watcher.recv_json().await;
    assert_eq!(
        (joined["op"].as_str(), &joined["conn"]),
        (Some("join"), &member.welcome["conn"])
    );

    let _ = b.kill();
    let _ = b.wait();
    let killed = Instant::now();
    let left = tokio::time::timeout(Duration::from_secs(10), watcher.recv_json())
        .await
        .expect("a leave within the TTL and a sweep");
    assert_eq!(
        (left["op"].as_str(), &left["conn"]),
        (Some("leave"), &member.welcome["conn"])
    );
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "left {took:?} after the kill (ttl 1 s)"
    );
    eprintln!(
        "the killed node's member left {} ms after the kill",
        took.as_millis()
    );
    let _ = a.kill();
    let _ = a.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Webhooks with real processes: a node SIGKILLed while it alone held a channel has the
/// channel vacated by the cluster within the occupancy TTL, exactly once (the dead node
/// cannot say so; the survivor's sweep does, and whichever node holds the queue's lease
/// delivers it).
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_nodes_channels_are_vacated_once() {
    let redis = herald_testkit::RedisServer::start();
    let backend = herald_testkit::Backend::start(|_| (200, String::new())).await;
    let dir = std::env::temp_dir().join(format!("herald-webhooks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("herald.toml");
    std::fs::write(
        &config,
        format!(
            "[redis]\nurl = \"{}\"\n[webhooks]\nurl = \"http://{}/events\"\n\
             timeout = \"300ms\"\noccupancy_ttl = \"1s\"\ntakeover_after = \"1s\"\n\
             [presence]\nrefresh_interval = \"200ms\"\nttl = \"1s\"\n\
             [[channels.rules]]\npattern = \"room:*\"\npresence = true\n",
            redis.url(),
            backend.addr
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let (mut a, a_addr) = start(&["--config", config, "--node-id", "a"], &[]);
    let (mut b, b_addr) = start(&["--config", config, "--node-id", "b"], &[]);
    let taken = |event: &'static str, channel: &'static str| {
        move |calls: &[herald_testkit::Call]| {
            calls
                .iter()
                .filter(|c| c.body["event"] == event && c.body["channel"] == channel)
                .count()
                == 1
        }
    };
    let mut on_a = Client::connect(&format!("ws://{a_addr}/ws")).await.unwrap();
    on_a.subscribe("kept").await;
    let mut on_b = Client::connect(&format!("ws://{b_addr}/ws")).await.unwrap();
    on_b.subscribe("doomed").await;
    // A presence member on the doomed node alone: nobody else holds its channel, so
    // nobody else would sweep it; its `leave` must still be told.
    on_b.subscribe("room:1").await;
    backend
        .wait_for("both occupied, and the member joined", |c| {
            taken("channel_occupied", "kept")(c)
                && taken("channel_occupied", "doomed")(c)
                && taken("join", "room:1")(c)
        })
        .await;

    let _ = b.kill();
    let _ = b.wait();
    let killed = Instant::now();
    backend
        .wait_for("doomed vacated", taken("channel_vacated", "doomed"))
        .await;
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "vacated {took:?} after the kill (ttl 1 s)"
    );
    backend
        .wait_for("the dead node's member left", taken("leave", "room:1"))
        .await;
    eprintln!(
        "the killed node's channel was vacated {} ms after the kill",
        took.as_millis()
    );
    // Once, and the live node's channel stays occupied.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls = backend.calls();
    assert!(taken("channel_vacated", "doomed")(&calls));
    assert!(
        !calls
            .iter()
            .any(|c| c.body["event"] == "channel_vacated" && c.body["channel"] == "kept"),
        "{:?}",
        calls.iter().map(|c| &c.body).collect::<Vec<_>>()
    );
    drop(on_a);
    let _ = a.kill();
    let _ = a.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// On the embedded broker the webhook queue ends with the process: a drain's last
/// vacancies are sent before it exits, not lost with it.
#[tokio::test(flavor = "multi_thread")]
async fn a_drain_sends_its_last_vacancies_on_the_embedded_broker() {
    let backend = herald_testkit::Backend::start(|_| (200, String::new())).await;
    let url = format!("http://{}/events", backend.addr);
    let (child, addr) = start(
        &[],
        &[
            ("HERALD_WEBHOOKS__URL", url.as_str()),
            ("HERALD_SHUTDOWN__DRAIN_WINDOW", "10ms"),
        ],
    );
    let mut c = Client::connect(&format!("ws://{addr}/ws")).await.unwrap();
    c.subscribe("news").await;
    backend
        .wait_for("occupied", |calls| {
            calls.iter().any(|c| c.body["event"] == "channel_occupied")
        })
        .await;
    signal(&child, "-TERM");
    assert_exits_cleanly(child).await;
    let vacated = backend
        .calls()
        .iter()
        .filter(|c| c.body["event"] == "channel_vacated" && c.body["channel"] == "news")
        .count();
    assert_eq!(vacated, 1);
}
