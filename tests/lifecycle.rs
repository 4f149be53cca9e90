//! Draining: readiness, refused upgrades, close codes, and the end of `run`.

use std::time::Duration;

use herald_testkit::{http, Client, Node};
use tokio_tungstenite::tungstenite;

async fn drain_closes_with(restart: bool, code: u16) {
    let mut node = Node::start_with(|c| {
        c.shutdown.restart = restart;
        c.shutdown.drain_window = Duration::from_millis(300);
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut c = node.client().await;
        c.subscribe("news").await;
        clients.push(c);
    }
    assert_eq!(
        http(node.addr, "GET", "/readyz", &[], vec![]).await.status,
        200
    );
    node.begin_shutdown();
    // Readiness turns at once (before the drain window is over).
    let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
    loop {
        let r = http(node.addr, "GET", "/readyz", &[], vec![]).await;
        if r.status == 503 {
            assert_eq!(r.json()["status"], "draining");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "readyz still 200");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Liveness stays up while draining.
    assert_eq!(
        http(node.addr, "GET", "/healthz", &[], vec![]).await.status,
        200
    );
    match Client::connect(&node.ws_url()).await {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!("upgrade during drain: {:?}", other.map(|_| ())),
    }
    for mut c in clients {
        let (closed, _) = c.closed().await;
        assert_eq!(closed.code, Some(code));
        assert_eq!(closed.reason, "node shutting down");
    }
    let started = tokio::time::Instant::now();
    node.shutdown().await.expect("run returns Ok");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn shutdown_drains_with_1001() {
    drain_closes_with(false, 1001).await;
}

#[tokio::test]
async fn restart_drains_with_1012() {
    drain_closes_with(true, 1012).await;
}

/// Sessions are closed spread over the window, not all at once.
#[tokio::test]
async fn drain_is_spread_over_the_window() {
    let mut node = Node::start_with(|c| {
        c.shutdown.drain_window = Duration::from_millis(800);
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(node.client().await);
    }
    let started = tokio::time::Instant::now();
    node.begin_shutdown();
    // Watch every client at once: the drain closes them in its own order.
    let watchers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                c.closed().await;
                started.elapsed()
            })
        })
        .collect();
    let mut times = Vec::new();
    for w in watchers {
        times.push(w.await.unwrap());
    }
    times.sort();
    let (first, last) = (times[0], *times.last().unwrap());
    assert!(
        last - first >= Duration::from_millis(400),
        "closes spread over the window: first {first:?}, last {last:?}"
    );
    node.shutdown().await.unwrap();
}

/// A client that never answers the close handshake cannot hold the node past its
/// grace period.
#[tokio::test]
async fn grace_period_bounds_the_drain() {
    let mut node = Node::start_with(|c| {
        c.shutdown.drain_window = Duration::from_millis(10);
        c.shutdown.grace_period = Duration::from_millis(1500);
        c.limits.close_timeout = Duration::from_secs(30);
    })
    .await;
    // Never reads: its close handshake never completes.
    let _stuck = Client::connect_with_small_buffer(node.addr).await;
    let started = tokio::time::Instant::now();
    node.begin_shutdown();
    node.shutdown().await.unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(5),
        "{took:?}"
    );
}
