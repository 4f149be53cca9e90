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

/// Starts `herald` on a free port and returns the child and its address.
fn start(extra: &[&str], env: &[(&str, &str)]) -> (Child, std::net::SocketAddr) {
    let mut child = herald()
        .args(["--listen", "127.0.0.1:0", "--node-id", "proc"])
        .args(extra)
        .envs(env.iter().copied())
        .spawn()
        .expect("spawn herald");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent {
                if let Some(rest) = line.split("ws://").nth(1) {
                    if let Some(addr) = rest.split("/ws").next() {
                        let _ = tx.send(addr.to_owned());
                        sent = true;
                    }
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("herald printed where it listens");
    (child, addr.parse().expect("an address"))
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
    for (args, env, needle) in [
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

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_clients_and_exits_0() {
    let (mut child, addr) = start(&["--log-format", "text"], &[]);
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
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(20)))
            .await
            .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_with_restart_closes_with_1012() {
    // Configuration from the environment reaches the running node.
    let (mut child, addr) = start(
        &["--log-format", "json"],
        &[("HERALD_SHUTDOWN__RESTART", "true")],
    );
    let mut c = Client::connect(&format!("ws://{addr}/ws")).await.unwrap();
    signal(&child, "-INT");
    let (closed, _) = c.closed().await;
    assert_eq!(closed.code, Some(1012));
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(20)))
            .await
            .unwrap();
    assert_eq!(status.code(), Some(0));
}
