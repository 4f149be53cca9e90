//! Metrics as operators see them: through a real Prometheus server scraping two nodes.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use herald_testkit::{free_port, http, system_tool, Node, RedisServer};

struct Prometheus {
    child: Child,
    dir: std::path::PathBuf,
    port: u16,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn prometheus(targets: &[std::net::SocketAddr]) -> Prometheus {
    let bin = system_tool("prometheus", "prometheus");
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("herald-prom-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
    let config = format!(
        "global:\n  scrape_interval: 500ms\nscrape_configs:\n  - job_name: herald\n    static_configs:\n      - targets: [{}]\n",
        targets.join(", ")
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let child = Command::new(bin)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    Prometheus { child, dir, port }
}

impl Prometheus {
    /// Runs an instant query until it returns `want` (as a number), or fails.
    async fn eventually_equals(&self, query: &str, want: f64) {
        let addr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let path = format!("/api/v1/query?query={}", query.replace(' ', "%20"));
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::from("no answer");
        loop {
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), async {
                let stream = tokio::net::TcpStream::connect(addr).await?;
                drop(stream);
                Ok::<_, std::io::Error>(http(addr, "GET", &path, &[], vec![]).await)
            })
            .await
            {
                if r.status == 200 {
                    let v = r.json();
                    last = v.to_string();
                    let got = v["data"]["result"][0]["value"][1]
                        .as_str()
                        .and_then(|s| s.parse::<f64>().ok());
                    if got == Some(want) {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "{query}: wanted {want}, last answer {last}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test]
async fn prometheus_sees_what_clients_see() {
    let redis = RedisServer::start();
    let a = Node::start_redis(&redis.url(), |c| c.node_id = "a".into()).await;
    let b = Node::start_split(|c| c.node_id = "b".into()).await;
    let prom = prometheus(&[a.api, b.api]);

    let mut clients = Vec::new();
    for (node, n) in [(&a, 3), (&b, 2)] {
        for _ in 0..n {
            let mut c = node.client().await;
            c.subscribe("news").await;
            clients.push(c);
        }
    }
    // A client that leaves is not counted.
    node_client_that_leaves(&a).await;
    let mut received = 0;
    for node in [&a, &b] {
        for i in 0..2 {
            assert_eq!(node.publish("news", &i.to_string()).await, 200);
        }
    }
    // Node a's clients get a's two messages (via Redis); b's get b's two (memory).
    for c in &mut clients {
        for _ in 0..2 {
            c.recv_json().await;
            received += 1;
        }
    }
    assert_eq!(received, 10);
    prom.eventually_equals("sum(herald_connections)", clients.len() as f64)
        .await;
    prom.eventually_equals("sum(herald_messages_delivered_total)", received as f64)
        .await;
    prom.eventually_equals("sum(herald_broker_up)", 2.0).await;
    prom.eventually_equals("count(herald_build_info)", 2.0)
        .await;
}

async fn node_client_that_leaves(node: &Node) {
    let c = node.client().await;
    c.close().await;
    herald_testkit::eventually("the leaver is gone", || {
        node.metric("herald_connections") == 3.0
    })
    .await;
}

/// Every `herald_*` series the dashboard and the alert rules query is one a node
/// actually exports, so neither silently shows nothing after a rename.
#[tokio::test]
async fn dashboard_and_alerts_query_real_metrics() {
    let node = Node::start().await;
    let text = String::from_utf8(
        http(node.api, "GET", "/metrics", &[], vec![])
            .await
            .body
            .to_vec(),
    )
    .unwrap();
    let exported: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dashboard =
        std::fs::read_to_string(root.join("deploy/grafana/herald-dashboard.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("dashboard is JSON");
    let alerts = std::fs::read_to_string(root.join("deploy/alerts.yml")).unwrap();
    let mut checked = 0;
    for source in [&dashboard, &alerts] {
        for word in source.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if let Some(name) = word.strip_prefix("herald_") {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name);
                let family = format!("herald_{family}");
                assert!(
                    exported.contains(family.as_str()),
                    "{family} is queried but not exported"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 20, "only {checked} references checked");
}
