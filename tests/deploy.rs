//! The deployment: HAProxy in front of nodes, and the shipped configuration files.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use herald_testkit::{free_port, system_tool, Client, Node, RedisServer};

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
        .to_string_lossy()
        .into_owned()
}

struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// HAProxy balancing two nodes with health checks on /readyz, like deploy/haproxy.cfg.
fn haproxy(port: u16, nodes: &[&Node]) -> Haproxy {
    let servers: String = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| format!("    server n{i} {} check\n", n.addr))
        .collect();
    let cfg = format!(
        "global\n    maxconn 1000\n\
         defaults\n    mode http\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n    timeout tunnel 1h\n\
         frontend public\n    bind 127.0.0.1:{port}\n    default_backend herald\n\
         backend herald\n    balance roundrobin\n    option httpchk GET /readyz\n    http-check expect status 200\n\
         \x20   default-server inter 100ms fall 1 rise 1\n{servers}"
    );
    let path =
        std::env::temp_dir().join(format!("herald-haproxy-{}-{port}.cfg", std::process::id()));
    std::fs::write(&path, cfg).unwrap();
    let child = Command::new(system_tool("haproxy", "haproxy"))
        .args(["-db", "-f"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start haproxy");
    Haproxy(child)
}

async fn connect_retrying(url: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Client::connect(url).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no connection through HAProxy: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test]
async fn haproxy_fails_over_when_a_node_drains() {
    let redis = RedisServer::start();
    let mut a = Node::start_redis(&redis.url(), |c| c.node_id = "node-a".into()).await;
    let b = Node::start_redis(&redis.url(), |c| c.node_id = "node-b".into()).await;
    let port = free_port();
    let _lb = haproxy(port, &[&a, &b]);
    let url = format!("ws://127.0.0.1:{port}/ws");

    // Through the balancer, until we land on node A.
    let mut on_a = None;
    for _ in 0..20 {
        let c = connect_retrying(&url).await;
        if c.welcome["node"] == "node-a" {
            on_a = Some(c);
            break;
        }
    }
    let mut client = on_a.expect("round robin reached node A");
    client.subscribe("news").await;
    assert_eq!(b.publish("news", "1").await, 200);
    assert_eq!(
        client.recv_json().await["data"],
        1,
        "WebSocket traffic through HAProxy"
    );

    // SIGTERM for node A (the same drain the signal triggers in the binary).
    a.begin_shutdown();
    let (closed, _) = client.closed().await;
    assert_eq!(closed.code, Some(1001));
    // Reconnecting through HAProxy lands on node B, which serves new publications.
    let mut again = connect_retrying(&url).await;
    assert_eq!(again.welcome["node"], "node-b");
    again.subscribe("news").await;
    assert_eq!(b.publish("news", "2").await, 200);
    assert_eq!(again.recv_json().await["data"], 2);
    a.shutdown().await.unwrap();
}

#[test]
fn shipped_haproxy_config_is_valid() {
    let out = Command::new(system_tool("haproxy", "haproxy"))
        .args(["-c", "-f", &repo("deploy/haproxy.cfg")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn shipped_alert_rules_are_valid() {
    let out = Command::new(system_tool("promtool", "prometheus"))
        .args(["check", "rules", &repo("deploy/alerts.yml")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
