//! The deployment: HAProxy in front of nodes, and the shipped configuration files.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use herald_testkit::{history_rule, system_tool, try_http, Client, Haproxy, Node, RedisServer};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
        .to_string_lossy()
        .into_owned()
}

/// HAProxy balancing nodes with health checks on /readyz, like deploy/haproxy.cfg;
/// returns it and its port.
fn haproxy(nodes: &[SocketAddr]) -> (Haproxy, u16) {
    let servers: String = nodes
        .iter()
        .enumerate()
        .map(|(i, addr)| format!("    server n{i} {addr} check\n"))
        .collect();
    Haproxy::start("haproxy", |port| {
        format!(
            "global\n    maxconn 1000\n\
             defaults\n    mode http\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n    timeout tunnel 1h\n\
             frontend public\n    bind 127.0.0.1:{port}\n    default_backend herald\n\
             backend herald\n    balance roundrobin\n    option httpchk GET /readyz\n    http-check expect status 200\n\
             \x20   default-server inter 100ms fall 1 rise 1\n{servers}"
        )
    })
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
    let (_lb, port) = haproxy(&[a.addr, b.addr]);
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

/// What one resuming client saw.
#[derive(Default)]
struct Seen {
    offsets: Vec<u64>,
    reconnects: usize,
    refused_resumes: usize,
    resets: usize,
    failed_connects: usize,
    finished: bool,
    /// What happened, for the failure message: subscribes and the offsets around them.
    log: Vec<String>,
}

/// A client that holds a subscription through HAProxy and, whenever its connection
/// ends (a node draining with 1012, a refused upgrade), reconnects and resumes with the
/// last position it saw. It stops once it has offset `until` (when that is known).
async fn resuming_client(
    url: String,
    channel: &'static str,
    subscribed: Arc<AtomicUsize>,
    until: Arc<AtomicU64>,
) -> Seen {
    let mut seen = Seen::default();
    let mut position: Option<(u64, String)> = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if Instant::now() > deadline {
            return seen;
        }
        let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(&url),
        )
        .await
        else {
            seen.failed_connects += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let mut req = json!({"op": "subscribe", "channel": channel, "id": 1, "recover": true});
        if let Some((offset, epoch)) = &position {
            req["since"] = json!({"offset": offset, "epoch": epoch});
        }
        if ws
            .send(Message::Text(req.to_string().into()))
            .await
            .is_err()
        {
            continue;
        }
        let mut quiet_since = Instant::now();
        loop {
            let msg = match tokio::time::timeout(Duration::from_millis(100), ws.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(_) => break,
                Err(_) => {
                    // Quiet: done once everything published has arrived.
                    let target = until.load(Ordering::Acquire);
                    if target != 0 && seen.offsets.last() >= Some(&target) {
                        seen.finished = true;
                        return seen;
                    }
                    if quiet_since.elapsed() > Duration::from_secs(10) {
                        break;
                    }
                    continue;
                }
            };
            quiet_since = Instant::now();
            let Message::Text(t) = msg else { continue };
            // Deliveries are the bulk: read the offset without a full JSON parse.
            if t.starts_with(r#"{"op":"message""#) {
                let at = t
                    .rfind(r#""offset":"#)
                    .expect("history deliveries carry offsets");
                let digits = t[at + 9..]
                    .find(|c: char| !c.is_ascii_digit())
                    .map_or(&t[at + 9..], |end| &t[at + 9..at + 9 + end]);
                let offset: u64 = digits.parse().expect("an offset");
                seen.offsets.push(offset);
                // Offset 1 names its epoch (the channel had none when subscribed).
                let named = t.rfind(r#""epoch":""#).map(|e| t[e + 9..e + 17].to_owned());
                if let Some((o, e)) = &mut position {
                    *o = offset;
                    if let Some(named) = named {
                        *e = named;
                    }
                }
                let target = until.load(Ordering::Acquire);
                if target != 0 && offset >= target {
                    seen.finished = true;
                    return seen;
                }
                continue;
            }
            let v: Value = serde_json::from_str(&t).expect("JSON");
            seen.log
                .push(format!("after {:?}: {v}", seen.offsets.last()));
            match v["op"].as_str() {
                Some("subscribed") => {
                    if v["recovered"] == false {
                        seen.refused_resumes += 1;
                    }
                    if position.is_none() {
                        subscribed.fetch_add(1, Ordering::AcqRel);
                    } else {
                        seen.reconnects += 1;
                    }
                    let epoch = v["epoch"].as_str().expect("epoch").to_owned();
                    let offset = position
                        .as_ref()
                        .map_or(v["offset"].as_u64().unwrap(), |p| p.0);
                    position = Some((offset, epoch));
                }
                Some("reset") => seen.resets += 1,
                Some("welcome") => {}
                _ => panic!("unexpected frame {v}"),
            }
        }
    }
}

/// A rolling restart: 500 publications/s on a history channel while each of three nodes
/// behind HAProxy is drained (1012) and started again, one after the other. 200 clients
/// resume with `since` through HAProxy: none loses, repeats or reorders a publication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_nothing_for_resuming_clients() {
    const CLIENTS: usize = 200;
    const CHANNEL: &str = "feed:rolling";
    let redis = RedisServer::start();
    let config = |c: &mut herald_server::GatewayConfig| {
        c.channels.rules = vec![history_rule("feed:*", 10_000)];
        c.shutdown.restart = true;
        c.shutdown.drain_window = Duration::from_millis(300);
        c.shutdown.grace_period = Duration::from_secs(3);
    };
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(Some(Node::start_redis(&redis.url(), config).await));
    }
    let addrs: Vec<SocketAddr> = nodes.iter().flatten().map(|n| n.addr).collect();
    let (_lb, port) = haproxy(&addrs);
    let url = format!("ws://127.0.0.1:{port}/ws");
    connect_retrying(&url).await.close().await;

    let subscribed = Arc::new(AtomicUsize::new(0));
    let until = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            tokio::spawn(resuming_client(
                url.clone(),
                CHANNEL,
                subscribed.clone(),
                until.clone(),
            ))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while subscribed.load(Ordering::Acquire) < CLIENTS {
        assert!(Instant::now() < deadline, "clients did not all subscribe");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 500 publications per second (on a 10 ms tick) for the whole restart, each with an
    // idempotency key and retried on another node until accepted.
    let running = Arc::new(AtomicUsize::new(1));
    let publisher = {
        let (addrs, running) = (addrs.clone(), running.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let started = Instant::now();
            let mut n = 0u64;
            let mut next = 0usize;
            while running.load(Ordering::Acquire) == 1 {
                tick.tick().await;
                // Keep the average at 500/s even when a tick comes late (a busy machine,
                // a retry): publish what the clock says is due.
                let due = (started.elapsed().as_millis() as u64 / 2).max(n + 1);
                let items: Vec<String> = (n + 1..=due)
                    .map(|k| {
                        format!(r#"{{"channel":"{CHANNEL}","data":{k},"idempotency_key":"p{k}"}}"#)
                    })
                    .collect();
                let body = format!(r#"{{"publications":[{}]}}"#, items.join(","));
                loop {
                    let addr = addrs[next % addrs.len()];
                    next += 1;
                    let sent = tokio::time::timeout(
                        Duration::from_secs(2),
                        try_publish(addr, body.clone()),
                    )
                    .await;
                    if matches!(sent, Ok(true)) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                n = due;
            }
            n
        })
    };

    for (i, addr) in addrs.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let old = nodes[i].take().expect("running");
        old.shutdown().await.expect("a clean drain");
        nodes[i] = Some(Node::start_redis_at(*addr, &redis.url(), config).await);
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    running.store(0, Ordering::Release);
    let published = publisher.await.unwrap();
    until.store(published, Ordering::Release);

    let mut all = Vec::new();
    for c in clients {
        all.push(c.await.unwrap());
    }
    let unfinished: Vec<String> = all
        .iter()
        .filter(|s| !s.finished)
        .map(|s| {
            format!(
                "last={:?} n={} reconnects={} failed_connects={} refused={} resets={}",
                s.offsets.last(),
                s.offsets.len(),
                s.reconnects,
                s.failed_connects,
                s.refused_resumes,
                s.resets
            )
        })
        .collect();
    assert!(
        unfinished.is_empty(),
        "published {published}; {} clients unfinished: {unfinished:#?}",
        unfinished.len()
    );
    let mut reconnects = 0;
    for seen in all {
        assert_eq!(seen.refused_resumes, 0, "a resume was refused");
        assert_eq!(seen.resets, 0, "a reset was sent");
        if seen.offsets != (1..=published).collect::<Vec<_>>() {
            let gaps: Vec<(u64, u64)> = seen
                .offsets
                .windows(2)
                .filter(|w| w[1] != w[0] + 1)
                .map(|w| (w[0], w[1]))
                .collect();
            panic!(
                "lost, repeated or reordered publications: {} received of {published}, jumps {gaps:?}; log: {:#?}",
                seen.offsets.len(),
                seen.log
            );
        }
        reconnects += seen.reconnects;
    }
    // Every client was on a node that restarted.
    assert!(reconnects >= CLIENTS, "only {reconnects} reconnects");
    assert!(published >= 1500, "published only {published}");
}

async fn try_publish(addr: SocketAddr, body: String) -> bool {
    let r = try_http(
        addr,
        "POST",
        "/api/batch",
        &[("content-type", "application/json")],
        body.into_bytes(),
    )
    .await;
    r.is_ok_and(|r| r.status == 200)
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

/// The shipped HAProxy logs requests without their query string: a browser's token in
/// `/ws?access_token=...` must never reach a log (issue 18). The shipped `log-format`
/// line runs in a real HAProxy, and its log is read.
#[test]
fn shipped_haproxy_config_logs_no_tokens() {
    let shipped = std::fs::read_to_string(repo("deploy/haproxy.cfg")).unwrap();
    assert!(
        !shipped.contains("option httplog"),
        "httplog logs the query string"
    );
    let format = shipped
        .lines()
        .find(|l| l.trim_start().starts_with("log-format"))
        .expect("deploy/haproxy.cfg sets a log-format");
    let (proxy, port) = Haproxy::start("logs", |port| {
        format!(
            "global\n    log stdout format raw local0\ndefaults\n    mode http\n    log global\n{format}\n    timeout connect 5s\n    timeout client 5s\n    timeout server 5s\nfrontend f\n    bind 127.0.0.1:{port}\n    http-request return status 200\n"
        )
    });
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    use std::io::{Read, Write};
    s.write_all(
        b"GET /ws?access_token=SECRET-TOKEN-123 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let log = proxy.stdout_within(std::time::Duration::from_secs(5), "/ws");
    assert!(log.contains("\"/ws\""), "{log}");
    assert!(!log.contains("SECRET-TOKEN-123"), "{log}");
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

/// docker-compose.yml mounts only files the repository ships, and every service the
/// Grafana and Prometheus provisioning reach by name is one compose starts (Docker is
/// not on CI machines: this is what can be checked without it).
#[test]
fn compose_mounts_shipped_files_and_names_its_services() {
    let compose = std::fs::read_to_string(repo("docker-compose.yml")).unwrap();
    let mut mounts = 0;
    for line in compose.lines().map(str::trim) {
        if let Some(source) = line.strip_prefix("- ./") {
            let path = source.split(':').next().unwrap();
            assert!(
                Path::new(&repo(path)).exists(),
                "docker-compose.yml mounts {path}, which does not exist"
            );
            mounts += 1;
        }
    }
    assert!(mounts >= 5, "only {mounts} mounts found");
    let service = |name: &str| compose.contains(&format!("\n  {name}:\n"));
    let datasource = std::fs::read_to_string(repo(
        "deploy/grafana/provisioning/datasources/prometheus.yml",
    ))
    .unwrap();
    assert!(datasource.contains("url: http://prometheus:9090") && service("prometheus"));
    assert!(service("grafana"));
    let provider =
        std::fs::read_to_string(repo("deploy/grafana/provisioning/dashboards/herald.yml")).unwrap();
    assert!(
        provider.contains("path: /var/lib/grafana/dashboards")
            && compose.contains(":/var/lib/grafana/dashboards/herald-dashboard.json:ro"),
        "the dashboard provider reads where compose mounts the dashboard"
    );
}
