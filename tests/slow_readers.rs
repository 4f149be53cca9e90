//! Slow readers on history channels, with seeded random pauses and a checker: readers
//! with small socket buffers stop reading for random stretches while bursts of random
//! size are published, and each must end with every offset of every channel exactly
//! once and in order: caught up in place, or (if the node cut it) resumed.
//!
//! A failing seed is printed; `HERALD_SLOW_READERS_SEED=<seed>` replays its schedule
//! (the timing of the node's writes is not replayed, only the readers' and the
//! publisher's choices).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use herald_testkit::{history_rule, http, json, Client, Node, RedisServer};
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const CHANNELS: [&str; 2] = ["feed:a", "feed:b"];
/// Publications per channel.
const N: u64 = 1200;
const READERS: u64 = 6;

fn seed() -> u64 {
    std::env::var("HERALD_SLOW_READERS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..))
}

/// What one reader saw of one channel.
#[derive(Default, Debug)]
struct Seen {
    /// The last offset delivered, and its epoch.
    last: u64,
    epoch: Option<String>,
    /// The last publication number (`data.i`) delivered.
    last_i: u64,
    /// A `reset` or `recovered:false` came after the last delivery: the next may skip
    /// publications (never repeat one).
    announced: bool,
    /// How many such announcements.
    announcements: u32,
}

/// Each channel's last position (offset, epoch) once the publisher is done.
type Tops = Option<BTreeMap<&'static str, (u64, String)>>;

/// What a reader ended with: per channel its last publication number, how often the
/// node closed it (each time resumed), and how many gaps it was told of.
struct Outcome {
    last: BTreeMap<&'static str, u64>,
    cut: u32,
    announcements: u32,
}

/// Reads both channels until each delivered publication `N`, pausing on `seed`'s
/// schedule; after a close it reconnects and resumes where it was. Any gap, repeat or
/// reordering is an error naming it; so is a `reset` or failed recovery unless
/// `crashes` (Redis restarted: every restart is a new epoch, PROTOCOL.md), and then a
/// publication may be skipped only right after one.
async fn pausing_reader(
    addr: SocketAddr,
    seed: u64,
    deadline: Instant,
    crashes: bool,
    tops: watch::Receiver<Tops>,
) -> Result<Outcome, String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut seen: BTreeMap<&'static str, Seen> =
        CHANNELS.iter().map(|c| (*c, Seen::default())).collect();
    let mut cut = 0;
    let mut recent: std::collections::VecDeque<String> = Default::default();
    loop {
        let mut c = Client::connect_with_small_buffer(addr).await;
        let subscribe = |id: usize, s: &Seen| {
            let mut req =
                json!({"op": "subscribe", "channel": CHANNELS[id], "id": id, "recover": true});
            if let Some(epoch) = &s.epoch {
                req["since"] = json!({"offset": s.last, "epoch": epoch});
            }
            req
        };
        for (id, ch) in CHANNELS.iter().enumerate() {
            c.send_json(&subscribe(id, &seen[ch])).await;
        }
        loop {
            // Done when every publication came, or (after a gap it was told of) when
            // it stands at the channel's last position once the publisher is done.
            let at_top = |ch: &str, s: &Seen| {
                tops.borrow().as_ref().is_some_and(|t| {
                    t.get(ch)
                        .is_some_and(|(o, e)| *o == s.last && Some(e) == s.epoch.as_ref())
                })
            };
            if seen.iter().all(|(ch, s)| s.last_i == N || at_top(ch, s)) {
                let last = seen.iter().map(|(c, s)| (*c, s.last_i)).collect();
                let announcements = seen.values().map(|s| s.announcements).sum();
                return Ok(Outcome {
                    last,
                    cut,
                    announcements,
                });
            }
            if rng.u32(..100) < 3 {
                tokio::time::sleep(Duration::from_millis(rng.u64(50..700))).await;
            }
            let wait = deadline.min(Instant::now() + Duration::from_millis(500));
            let frame = match tokio::time::timeout_at(wait, c.ws().next()).await {
                Err(_) if wait < deadline => continue,
                Err(_) => {
                    let state: Vec<_> = seen.iter().map(|(c, s)| (*c, s.last_i)).collect();
                    return Err(format!("stalled at {state:?}; last frames: {recent:?}"));
                }
                Ok(f) => f,
            };
            let text = match frame {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(f))) => {
                    let code = f.as_ref().map(|f| u16::from(f.code));
                    if code != Some(1013) {
                        return Err(format!("closed {f:?}"));
                    }
                    cut += 1;
                    break;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => return Err(format!("unexpected {other:?}")),
            };
            recent.push_back(text.chars().take(160).collect());
            if recent.len() > 8 {
                recent.pop_front();
            }
            let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            // While Redis is down a resume cannot read the history: it is answered
            // `unavailable`, to be tried again.
            if crashes && v["op"] == "error" && v["code"] == "unavailable" {
                let id = v["id"].as_u64().ok_or_else(|| format!("{v}"))? as usize;
                tokio::time::sleep(Duration::from_millis(100)).await;
                c.send_json(&subscribe(id, &seen[CHANNELS[id]])).await;
                continue;
            }
            let ch = v["channel"].as_str().unwrap_or_default();
            let Some(s) = CHANNELS
                .iter()
                .find(|c| **c == ch)
                .and_then(|c| seen.get_mut(c))
            else {
                return Err(format!("a frame of no channel: {v}"));
            };
            let announce = |s: &mut Seen, v: &Value| {
                if !crashes {
                    return Err(format!("a gap announced: {v}"));
                }
                s.announced = true;
                s.announcements += 1;
                s.last = v["offset"].as_u64().unwrap_or(0);
                s.epoch = v["epoch"].as_str().map(str::to_owned);
                Ok(())
            };
            match v["op"].as_str() {
                Some("subscribed") => {
                    // Known position: this was a resume.
                    if s.epoch.is_some() {
                        if v["recovered"] != true {
                            announce(s, &v)?;
                        }
                    } else {
                        s.last = v["offset"].as_u64().unwrap_or(0);
                        s.epoch = v["epoch"].as_str().map(str::to_owned);
                    }
                }
                Some("reset") => announce(s, &v)?,
                Some("message") => {
                    let offset = v["offset"].as_u64().ok_or_else(|| format!("{v}"))?;
                    if offset != s.last + 1 {
                        return Err(format!("{ch}: offset {offset} after {}", s.last));
                    }
                    let i = v["data"]["i"].as_u64().unwrap_or(0);
                    let skipped = i != s.last_i + 1;
                    if i <= s.last_i || (skipped && !s.announced) {
                        return Err(format!("{ch}: publication {i} after {}", s.last_i));
                    }
                    if let Some(e) = v["epoch"].as_str() {
                        s.epoch = Some(e.to_owned());
                    }
                    s.last = offset;
                    s.last_i = i;
                    s.announced = false;
                }
                _ => return Err(format!("unexpected frame {v}")),
            }
        }
        let _ = c.ws().close(None).await;
    }
}

/// Publishes `{"i": i, "pad": ..}` for every `i` of `numbers` to `channel` in one
/// `POST /api/batch` (with the API key when the node wants one); panics unless it is
/// accepted.
async fn publish_padded(
    node: &Node,
    key: Option<&str>,
    channel: &str,
    numbers: std::ops::RangeInclusive<u64>,
    pad: usize,
) {
    let (status, body) = try_publish_padded(node, key, channel, numbers, pad).await;
    assert_eq!(status, 200, "{body}");
}

/// `publish_padded`'s request: its status and reply.
async fn try_publish_padded(
    node: &Node,
    key: Option<&str>,
    channel: &str,
    numbers: std::ops::RangeInclusive<u64>,
    pad: usize,
) -> (u16, String) {
    let pad = "p".repeat(pad);
    let items: Vec<Value> = numbers
        .map(|i| json!({"channel": channel, "data": {"i": i, "pad": pad}}))
        .collect();
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(auth) = &auth {
        headers.push(("authorization", auth));
    }
    let r = http(
        node.api,
        "POST",
        "/api/batch",
        &headers,
        json!({ "publications": items }).to_string().into_bytes(),
    )
    .await;
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

/// Publishes `1..=N` to each channel in bursts of random size with random pauses
/// (one `POST /api/batch` per burst), channels interleaved. With `redis`, it also
/// crashes Redis (`kill -9`) between two bursts, after a third and after two thirds of
/// the publications, and starts it again (from its append-only file, after up to 1.5 s):
/// while it is down readers lag and catch-up reads fail, and after it every history
/// channel is in a new epoch (PROTOCOL.md: a restart cannot be told from a rollback).
/// A burst answered 503 (nothing published) is sent again once Redis is back. Answers
/// each channel's last position.
async fn bursty_publisher(
    node: &Node,
    seed: u64,
    mut redis: Option<&mut RedisServer>,
) -> BTreeMap<&'static str, (u64, String)> {
    const RESTARTS: u32 = 2;
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut next: BTreeMap<&str, u64> = CHANNELS.iter().map(|c| (*c, 1)).collect();
    let mut restarts = 0;
    let mut tops = BTreeMap::new();
    while next.values().any(|n| *n <= N) {
        let ch = CHANNELS[rng.usize(..CHANNELS.len())];
        let from = next[ch];
        if from > N {
            continue;
        }
        let to = (from + rng.u64(0..150)).min(N);
        // The crashes come after a third and after two thirds of the publications, so
        // that readers lag (and are caught up) before each.
        let published: u64 = next.values().map(|n| n - 1).sum();
        if let Some(r) = redis.as_deref_mut() {
            if restarts < RESTARTS && published >= (restarts as u64 + 1) * 2 * N / 3 {
                restarts += 1;
                let caught_up = node.metric(r#"herald_recoveries_total{outcome="caught_up"}"#);
                println!(
                    "slow readers: Redis crashes before {ch} {from}..={to} ({caught_up} catch-ups so far)"
                );
                tokio::task::block_in_place(|| {
                    r.kill();
                    std::thread::sleep(Duration::from_millis(rng.u64(0..1500)));
                    r.restart();
                });
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = try_publish_padded(node, None, ch, from..=to, 200).await;
            if status == 200 {
                let reply: Value = serde_json::from_str(&body).expect("a JSON reply");
                let last = &reply["results"][(to - from) as usize];
                let epoch = last["epoch"].as_str().expect("an epoch").to_owned();
                tops.insert(ch, (last["offset"].as_u64().expect("an offset"), epoch));
                break;
            }
            assert!(
                redis.is_some() && status == 503 && Instant::now() < deadline,
                "{status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        next.insert(ch, to + 1);
        tokio::time::sleep(Duration::from_millis(rng.u64(0..60))).await;
    }
    tops
}

/// Readers pausing on a seed's schedule while the publisher bursts (and, with `redis`,
/// crashes Redis): each must end with every offset exactly once. Without crashes the
/// node closes nobody; with them a close is allowed only if the resume recovers.
async fn story(node: &Node, redis: Option<&mut RedisServer>) {
    let seed = seed();
    println!("slow readers: seed {seed}");
    let crashes = redis.is_some();
    let deadline = Instant::now() + Duration::from_secs(90);
    let (tops, tops_rx) = watch::channel(None);
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let reader = pausing_reader(
                node.addr,
                seed ^ (r + 1),
                deadline,
                crashes,
                tops_rx.clone(),
            );
            tokio::spawn(reader)
        })
        .collect();
    // Every reader subscribed (a start) before anything is published.
    herald_testkit::eventually("every reader subscribed", || {
        node.metric("herald_subscriptions") == (READERS as usize * CHANNELS.len()) as f64
    })
    .await;
    let _ = tops.send(Some(bursty_publisher(node, seed, redis).await));
    let (mut cuts, mut announced) = (0, 0);
    for (i, r) in readers.into_iter().enumerate() {
        match r.await.expect("reader task") {
            Ok(o) => {
                assert!(crashes || o.last.values().all(|l| *l == N), "seed {seed}");
                cuts += o.cut;
                announced += o.announcements;
            }
            Err(e) => panic!("seed {seed}: reader {i}: {e}"),
        }
    }
    let caught_up = node.metric(r#"herald_recoveries_total{outcome="caught_up"}"#);
    println!(
        "slow readers: seed {seed}: {caught_up} catch-ups, {cuts} closes (resumed), \
         {announced} gaps announced"
    );
    // A reader that lags while Redis is down cannot be caught up from the history: it
    // is closed (1013) and resumes, which is lag exercised too. (One run of the whole
    // suite, on a loaded machine, saw no catch-up at all with crashes.)
    let lagged = caught_up + if crashes { cuts as f64 } else { 0.0 };
    assert!(
        lagged >= 1.0,
        "seed {seed}: no reader ever lagged: the test exercised nothing"
    );
    if !crashes {
        // What the history holds is never cut: the node closes nobody here.
        assert_eq!(cuts, 0, "seed {seed}");
        assert_eq!(node.metric("herald_slow_consumer_disconnects_total"), 0.0);
    }
}

fn config(c: &mut herald_server::GatewayConfig) {
    c.limits.outbound_queue_bytes = 32 * 1024;
    c.limits.socket_send_buffer_bytes = 8 * 1024;
    c.channels.rules = vec![history_rule("feed:*", 2 * N as usize)];
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_with_seeded_pauses_miss_nothing() {
    let node = Node::start_with(config).await;
    story(&node, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_with_seeded_pauses_miss_nothing_on_redis() {
    let redis = RedisServer::start();
    let node = Node::start_redis(&redis.url(), config).await;
    story(&node, None).await;
}

/// The same on a Redis that crashes twice (`kill -9`) and comes back from its
/// append-only file (every write synced): nothing acknowledged is lost, so no reader
/// may miss an offset, see one twice or be told its resume did not recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_miss_nothing_while_redis_crashes_and_comes_back() {
    let mut redis = RedisServer::start_with(
        herald_testkit::free_port(),
        &["--appendonly", "yes", "--appendfsync", "always"],
    );
    let node = Node::start_redis(&redis.url(), config).await;
    story(&node, Some(&mut redis)).await;
}

/// A reader that reads steadily but slowly through a backlog larger than it can take
/// in a write timeout or a heartbeat timeout is neither dropped by the write timeout
/// (it measured a whole batch, not progress) nor closed 1008 (the node's ping waited
/// behind the backlog, so its pong could not come in time): it gets everything. On a
/// history channel with a small queue (it lags and is caught up) and on a plain
/// channel whose queue holds the whole backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_steady_reader_is_neither_timed_out_nor_taken_for_dead() {
    steady_reader("feed:slow", 64 * 1024).await;
    steady_reader("wide", 1024 * 1024).await;
}

async fn steady_reader(channel: &str, queue: usize) {
    const COUNT: u64 = 300;
    let node = Node::start_with(|c| {
        c.limits.outbound_queue_bytes = queue;
        c.limits.socket_send_buffer_bytes = 8 * 1024;
        c.websocket.write_timeout = Duration::from_millis(800);
        c.heartbeat.interval = Duration::from_millis(300);
        c.heartbeat.timeout = Duration::from_millis(500);
        c.channels.rules = vec![history_rule("feed:*", 1000)];
    })
    .await;
    let mut c = Client::connect_with_small_buffer(node.addr).await;
    c.subscribe(channel).await;
    publish_padded(&node, None, channel, 1..=COUNT, 1000).await;
    // About 300 KB at under 100 KB/s: several write and heartbeat timeouts long.
    let started = Instant::now();
    let mut i = 0;
    while i < COUNT {
        let m = c.recv_json().await;
        if m["op"] == "message" {
            i += 1;
            assert_eq!(m["data"]["i"], i, "{channel}: {m}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        started.elapsed() > Duration::from_secs(3),
        "{channel}: read too fast to test anything"
    );
    assert_eq!(node.metric("herald_write_timeouts_total"), 0.0, "{channel}");
    assert_eq!(
        node.metric("herald_slow_consumer_disconnects_total"),
        0.0,
        "{channel}"
    );
    c_still_answers(&mut c).await;
}

async fn c_still_answers(c: &mut Client) {
    c.send_json(&json!({"op": "ping", "id": 77})).await;
    loop {
        let m = c.recv_json().await;
        if m["id"] == 77 {
            return;
        }
    }
}

/// A subscriber lagging on a history channel asks for a page of history and resumes
/// another channel: both answers wait for room in its queue instead of closing it
/// 1013, and its lagging channel still arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_reader_may_read_history_and_resume_another_channel() {
    let node = Node::start_with(|c| {
        c.limits.outbound_queue_bytes = 32 * 1024;
        c.limits.socket_send_buffer_bytes = 8 * 1024;
        c.channels.rules = vec![history_rule("feed:*", 1000)];
    })
    .await;
    // Ten publications on feed:b to resume from offset 5.
    node.publish_numbers("feed:b", 1, 10).await;
    let mut c = Client::connect_with_small_buffer(node.addr).await;
    let reply = c.subscribe_since("feed:a", None).await;
    assert_eq!(reply["offset"], 0);
    let epoch_b = {
        let mut probe = node.client().await;
        let r = probe.subscribe_since("feed:b", None).await;
        r["epoch"].as_str().unwrap().to_owned()
    };
    for round in 0..3u64 {
        let first = round * 100 + 1;
        publish_padded(&node, None, "feed:a", first..=first + 99, 500).await;
    }
    herald_testkit::eventually("the reader lags", || {
        node.metric("herald_outbound_queue_bytes") > 16.0 * 1024.0
    })
    .await;
    c.send_json(&json!({"op": "history", "channel": "feed:a", "id": 90, "limit": 100}))
        .await;
    c.send_json(
        &json!({"op": "subscribe", "channel": "feed:b", "id": 91, "recover": true,
        "since": {"offset": 5, "epoch": epoch_b}}),
    )
    .await;
    let (mut next_a, mut b, mut answered) = (1u64, Vec::new(), 0);
    while next_a <= 300 || answered < 2 || b.len() < 5 {
        let m = match tokio::time::timeout(Duration::from_secs(20), c.ws().next()).await {
            Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<Value>(&t).unwrap(),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            other => panic!("after {next_a} of feed:a, {b:?} of feed:b: {other:?}"),
        };
        match (m["op"].as_str(), m["channel"].as_str()) {
            (Some("message"), Some("feed:a")) => {
                assert_eq!(m["offset"], next_a, "{m}");
                next_a += 1;
            }
            (Some("message"), Some("feed:b")) => b.push(m["offset"].as_u64().unwrap()),
            (Some("history"), _) | (Some("subscribed"), Some("feed:b")) => {
                if m["op"] == "subscribed" {
                    assert_eq!(m["recovered"], true, "{m}");
                }
                answered += 1;
            }
            _ => panic!("unexpected {m}"),
        }
    }
    assert_eq!(b, vec![6, 7, 8, 9, 10]);
    assert_eq!(node.metric("herald_slow_consumer_disconnects_total"), 0.0);
}

const KEY: &str = "slow-readers-key";

async fn api(node: &Node, path: &str, body: Value) -> u16 {
    let auth = format!("Bearer {KEY}");
    http(
        node.api,
        "POST",
        path,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.to_string().into_bytes(),
    )
    .await
    .status
}

/// A backend's disconnect (a ban) of a reader working slowly through a large backlog
/// closes it within the write timeout: progress extends writes, not a closing
/// session's last flush (it did: 100 s and more at a trickle). What is left is dropped
/// and the close frame still reaches the reader, with the ban's code (it got none: a
/// client would take that for a network failure and reconnect). The reader trickles at
/// about 4 KB/s through a full 64 KiB send buffer, which the kernel would report
/// writable again only after some 10 s, far past `limits.close_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_ends_a_slow_reader_within_the_write_timeout() {
    let node = Node::start_with(|c| {
        c.auth.api_key = Some(KEY.into());
        c.limits.outbound_queue_bytes = 1024 * 1024;
        c.limits.socket_send_buffer_bytes = 64 * 1024;
        c.limits.close_timeout = Duration::from_secs(1);
        c.websocket.write_timeout = Duration::from_secs(1);
    })
    .await;
    let mut c = Client::connect_with_small_buffer(node.addr).await;
    c.subscribe("wide").await;
    let conn = c.welcome["conn"].as_str().unwrap().to_owned();
    publish_padded(&node, Some(KEY), "wide", 1..=400, 1000).await;
    // Trickles until the node is done with the connection, then reads what the kernel
    // still holds at once, up to the close frame.
    let gone = Arc::new(AtomicBool::new(false));
    let reading = gone.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(Ok(m))) = tokio::time::timeout(WAIT_FRAME, c.ws().next()).await {
            if let Message::Close(f) = m {
                return f.map(|f| u16::from(f.code));
            }
            if !reading.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        None
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let asked = Instant::now();
    assert_eq!(
        api(
            &node,
            "/api/disconnect",
            json!({"conn": conn, "code": 4400})
        )
        .await,
        200
    );
    while node.metric("herald_connections") > 0.0 {
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "the banned reader is still connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gone.store(true, Ordering::Relaxed);
    let code = tokio::time::timeout(Duration::from_secs(20), reader).await;
    assert_eq!(code.expect("the reader ends").unwrap(), Some(4400));
    assert_eq!(node.metric("herald_write_timeouts_total"), 0.0);
}

const WAIT_FRAME: Duration = Duration::from_secs(30);

/// The control API's commands are carried out while a lagging reader's own requests
/// wait for room in its queue (they held them off for a minute), and do not end those
/// waits (they did, and the reply then closed the reader as a slow consumer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_api_is_not_held_off_by_a_lagging_readers_requests() {
    let node = Node::start_with(|c| {
        c.auth.api_key = Some(KEY.into());
        c.limits.outbound_queue_bytes = 32 * 1024;
        c.limits.socket_send_buffer_bytes = 8 * 1024;
        c.websocket.write_timeout = Duration::from_secs(20);
        c.channels.rules = vec![history_rule("feed:*", 1000)];
    })
    .await;
    let mut c = Client::connect_with_small_buffer(node.addr).await;
    c.subscribe_since("feed:a", None).await;
    c.subscribe("other").await;
    let conn = c.welcome["conn"].as_str().unwrap().to_owned();
    publish_padded(&node, Some(KEY), "feed:a", 1..=800, 1000).await;
    herald_testkit::eventually("the reader lags", || {
        node.metric("herald_outbound_queue_bytes") > 16.0 * 1024.0
    })
    .await;
    // History pages, each waiting for room, while the reader trickles.
    for id in 0..20 {
        c.send_json(&json!({"op": "history", "channel": "feed:a", "id": 100 + id, "limit": 100}))
            .await;
    }
    let reader = tokio::spawn(async move {
        while let Ok(Some(Ok(m))) = tokio::time::timeout(WAIT_FRAME, c.ws().next()).await {
            if m.is_close() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = node.metric("herald_subscriptions");
    let asked = Instant::now();
    assert_eq!(
        api(
            &node,
            "/api/unsubscribe",
            json!({"conn": conn, "channel": "other"})
        )
        .await,
        200
    );
    while node.metric("herald_subscriptions") >= before {
        assert!(
            asked.elapsed() < Duration::from_secs(3),
            "the unsubscribe waits behind the reader's requests"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And the reader's own requests go on waiting for room: a command ended their
    // wait, and the page then overflowed the queue (1013).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(node.metric("herald_slow_consumer_disconnects_total"), 0.0);
    assert_eq!(node.metric("herald_connections"), 1.0);
    reader.abort();
}

/// A flood of resumes from the control API at a reader that lags: each may wait for
/// room, and each used to be carried out inside the wait of the one before, nested
/// without end until the node's stack overflowed (a crash of the whole node). They are
/// now carried out in turn, and the limit on subscriptions holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_backend_resumes_at_a_lagging_reader_is_carried_out_in_turn() {
    let node = Node::start_with(|c| {
        c.auth.api_key = Some(KEY.into());
        c.limits.outbound_queue_bytes = 64 * 1024;
        c.limits.socket_send_buffer_bytes = 8 * 1024;
        c.limits.max_subscriptions = 8;
        c.websocket.write_timeout = Duration::from_secs(5);
        c.channels.rules = vec![history_rule("feed:*", 1000)];
    })
    .await;
    let mut c = Client::connect_with_small_buffer(node.addr).await;
    c.subscribe_since("feed:lag", None).await;
    let conn = c.welcome["conn"].as_str().unwrap().to_owned();
    publish_padded(&node, Some(KEY), "feed:lag", 1..=300, 1000).await;
    herald_testkit::eventually("the reader lags", || {
        node.metric("herald_outbound_queue_bytes") > 32.0 * 1024.0
    })
    .await;
    // The reader trickles during the flood; once it is over, it pings and reads its
    // backlog at once, up to the pong.
    let over = Arc::new(AtomicBool::new(false));
    let flood_done = over.clone();
    let reader = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut pinged = false;
        while Instant::now() < deadline {
            if !pinged && flood_done.load(Ordering::Relaxed) {
                c.send_json(&json!({"op": "ping", "id": 7})).await;
                pinged = true;
            }
            let Ok(m) = tokio::time::timeout(Duration::from_millis(100), c.ws().next()).await
            else {
                continue;
            };
            match m {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["op"] == "pong" && v["id"] == 7 {
                        return Ok(());
                    }
                }
                Some(Ok(Message::Close(f))) => return Err(format!("closed: {f:?}")),
                Some(Ok(_)) => {}
                other => return Err(format!("the session ended: {other:?}")),
            }
            // Trickling (about 3 KB/s) during the flood: the session lags throughout,
            // so that each resume waits for room.
            if !pinged {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        Err("no pong".to_owned())
    });
    let since = json!({"offset": 0, "epoch": "0k3f9a2b"});
    for i in 0..1000 {
        let body = json!({"conn": conn, "channel": format!("feed:x{}", i % 20), "since": since});
        assert_eq!(api(&node, "/api/subscribe", body).await, 200);
    }
    let flood_over = Instant::now();
    over.store(true, Ordering::Relaxed);
    // Every command was carried out (or refused past the limit) in bounded time: the
    // session answers a ping behind its backlog, or, its queue overflowing with the
    // flood's replies (a thousand, to a reader at 3 KB/s), it was closed as a slow
    // consumer, the defined end. And the node is up.
    match reader.await.unwrap() {
        Ok(()) => println!("pong {:?} after the flood", flood_over.elapsed()),
        Err(e) => {
            assert!(e.contains("slow consumer"), "{e}");
            assert_eq!(node.metric("herald_slow_consumer_disconnects_total"), 1.0);
        }
    }
    let info = http(
        node.api,
        "GET",
        "/api/info",
        &[("authorization", &format!("Bearer {KEY}"))],
        vec![],
    )
    .await;
    assert_eq!(info.status, 200);
    assert!(node.metric("herald_subscriptions") <= 8.0);
}
