//! The scenarios: each measures one target and answers a [`Row`] (or nothing, where
//! the scenario does not apply to that target).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use herald_harness::RedisServer;

use crate::args::{RunArgs, PER_WORKER};
use crate::procfs;
use crate::report::Row;
use crate::target::{payload, sibling, total, workers, Target, Worker};

/// What history costs, Herald only: publish rate and Redis CPU per publication with
/// history off (`PUBLISH` of the envelope) and on (the publish script: offset, stream,
/// TTLs, publish), each to a node with subscribers; and the time a resuming client
/// takes to receive 1,000 missed publications from one node (subscribe sent → 1,000th
/// message read).
pub(crate) async fn history_costs(
    args: &RunArgs,
    redis: &RedisServer,
    kind: &str,
) -> anyhow::Result<Option<Row>> {
    // This build, or another (`herald@PATH`, for before/after comparisons).
    let (off, on) = match kind.strip_prefix("herald@") {
        _ if kind == "herald" => (kind.to_owned(), "herald-history".to_owned()),
        Some(path) => (kind.to_owned(), format!("herald-history@{path}")),
        None => return Ok(None),
    };
    let n: u64 = if args.smoke { 2_000 } else { 100_000 };
    let subscribers = if args.smoke { 5 } else { 100 };
    let redis_pid = redis.pid().context("redis-server is running")?;
    let mut figures = BTreeMap::new();
    for (mode, target_kind) in [("off", off.as_str()), ("on", on.as_str())] {
        let mut target = Target::start(target_kind, 1, redis).await?;
        let ws = workers(&target.addrs, subscribers, 1, 1, target_kind).await?;
        let cpu0 = procfs::cpu_seconds(redis_pid);
        let started = Instant::now();
        let mut seq = 0u64;
        while seq < n {
            let msgs: Vec<(String, String)> = (seq..(seq + 100).min(n))
                .map(|i| ("bench-0".to_owned(), payload(i)))
                .collect();
            seq += msgs.len() as u64;
            target.publisher.publish(&msgs).await?;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = procfs::cpu_seconds(redis_pid) - cpu0;
        figures.insert(format!("publish_per_s_history_{mode}"), n as f64 / elapsed);
        figures.insert(
            format!("redis_cpu_us_per_pub_history_{mode}"),
            cpu * 1e6 / n as f64,
        );
        if mode == "on" {
            let (median, max) = replay(&mut target, if args.smoke { 3 } else { 20 }).await?;
            figures.insert("replay_1000_ms_median".into(), median);
            figures.insert("replay_1000_ms_max".into(), max);
        }
        for w in ws {
            w.quit().await;
        }
        target.stop().await;
    }
    let on = figures["redis_cpu_us_per_pub_history_on"];
    let off = figures["redis_cpu_us_per_pub_history_off"];
    figures.insert("redis_cpu_on_over_off".into(), on / off.max(1e-9));
    Ok(Some(Row {
        scenario: "history".into(),
        target: kind.into(),
        figures,
        note: format!(
            "{n} publications in pipelined batches of 100 to a channel with {subscribers} subscribers on one node; replay: 1,000 missed publications"
        ),
    }))
}

/// Publishes 1,000 publications to a fresh history channel, then `reps` times connects
/// a client that resumes from before them; returns the median and the longest time
/// until its 1,000th message, in ms.
pub(crate) async fn replay(target: &mut Target, reps: usize) -> anyhow::Result<(f64, f64)> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let channel = "bench-replay";
    let name = herald_protocol::ChannelName::new(channel)?;
    let url = format!("ws://{}/ws", target.addrs[0]);
    // Learn the channel's epoch and position.
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await?;
    ws.next().await;
    let subscribe = herald_protocol::client::encode_subscribe(&name, Some(1), None);
    ws.send(Message::Text(subscribe.into())).await?;
    let sub: Value = match ws.next().await {
        Some(Ok(Message::Text(t))) => serde_json::from_str(&t)?,
        other => bail!("expected subscribed, got {other:?}"),
    };
    let epoch = sub["epoch"]
        .as_str()
        .and_then(herald_protocol::Epoch::parse)
        .context("an epoch")?;
    let from = sub["offset"].as_u64().context("an offset")?;
    let since = herald_protocol::StreamPosition {
        offset: from,
        epoch,
    };
    drop(ws);
    let msgs: Vec<(String, String)> = (0..1000)
        .map(|i| (channel.to_owned(), payload(i)))
        .collect();
    for chunk in msgs.chunks(100) {
        target.publisher.publish(chunk).await?;
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await?;
        ws.next().await; // welcome
        let started = Instant::now();
        let resume = herald_protocol::client::encode_subscribe(&name, Some(1), Some(since));
        ws.send(Message::Text(resume.into())).await?;
        let mut got = 0;
        while got < 1000 {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Text(t))))
                    if herald_protocol::server::parse_text_delivery(&t).is_some() =>
                {
                    got += 1
                }
                Ok(Some(Ok(Message::Text(t)))) if t.contains(r#""recovered":false"#) => {
                    bail!("the resume was refused: {t}")
                }
                Ok(Some(Ok(_))) => {}
                other => bail!("replay stopped after {got}: {other:?}"),
            }
        }
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[times.len() - 1]))
}

/// Subscription churn, Herald only: a bystander's delivery lag on a steady channel
/// while `churn` connections spread over 100 other channels each move to another
/// channel (unsubscribe + subscribe) every second, against the same without churn.
/// Fan-out must not depend on the size or churn of the subscription map.
pub(crate) async fn churn(
    args: &RunArgs,
    redis: &RedisServer,
    kind: &str,
) -> anyhow::Result<Option<Row>> {
    if kind != "herald" && !kind.starts_with("herald@") {
        return Ok(None);
    }
    let mut target = Target::start(kind, 1, redis).await?;
    let addr = target.addrs[0];
    let mut bystander = Worker::start(addr, 1, 1, 0, kind).await?;
    let phase = Duration::from_secs_f64(args.seconds);
    let rate = 200.0;
    let mut figures = BTreeMap::new();
    let mut churners = Vec::new();
    for mode in ["quiet", "churn"] {
        if mode == "churn" {
            let per_worker = PER_WORKER.min(args.churn);
            let mut left = args.churn;
            let mut offset = 0;
            while left > 0 {
                let n = per_worker.min(left);
                churners.push(
                    Worker::start_with(
                        addr,
                        n,
                        100,
                        offset,
                        kind,
                        &["--channel-prefix", "churn", "--churn-every-ms", "1000"],
                    )
                    .await?,
                );
                left -= n;
                offset += n;
            }
        }
        bystander.cmd("reset").await?;
        let started = Instant::now();
        let mut seq = 0u64;
        while started.elapsed() < phase {
            let due = (started.elapsed().as_secs_f64() * rate) as u64;
            if seq < due {
                let msgs: Vec<(String, String)> = (seq..due)
                    .map(|i| ("bench-0".to_owned(), payload(i)))
                    .collect();
                target.publisher.publish(&msgs).await?;
                seq = due;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s = bystander.cmd("stats").await?;
        figures.insert(
            format!("bystander_p50_us_{mode}"),
            s["p50_us"].as_f64().unwrap_or(f64::NAN),
        );
        figures.insert(
            format!("bystander_p99_us_{mode}"),
            s["p99_us"].as_f64().unwrap_or(f64::NAN),
        );
        figures.insert(
            format!("bystander_lost_{mode}"),
            seq.saturating_sub(s["received"].as_u64().unwrap_or(0)) as f64,
        );
    }
    figures.insert("churn_moves_per_s".into(), args.churn as f64);
    for w in churners {
        w.quit().await;
    }
    bystander.quit().await;
    target.stop().await;
    Ok(Some(Row {
        scenario: "churn".into(),
        target: kind.into(),
        figures,
        note: format!(
            "bystander on one channel at {rate}/s; {} connections over 100 channels, each moving every second",
            args.churn
        ),
    }))
}

/// Fan-out, many channels and cross-node: publish as fast as delivery keeps up (at most
/// `window` publications outstanding) and measure deliveries and server CPU.
pub(crate) async fn closed_loop(
    args: &RunArgs,
    redis: &RedisServer,
    kind: &str,
    scenario: &str,
    nodes: usize,
    subscribers: usize,
    channels: usize,
) -> anyhow::Result<Row> {
    let mut target = Target::start(kind, nodes, redis).await?;
    let mut ws = workers(&target.addrs, subscribers, channels, 2 / nodes, kind).await?;
    let per_message = subscribers as f64 / channels as f64;
    for w in ws.iter_mut() {
        w.cmd("reset").await?;
    }
    let cpu0 = target.cpu();
    let started = Instant::now();
    let phase = Duration::from_secs_f64(args.seconds);
    let mut published = 0u64;
    let mut received = 0u64;
    while started.elapsed() < phase {
        received = total(&mut ws).await?;
        let outstanding = published as f64 - received as f64 / per_message;
        if outstanding < args.window as f64 {
            let k = args.window - outstanding.max(0.0) as u64;
            let msgs: Vec<(String, String)> = (0..k)
                .map(|i| {
                    let seq = published + i;
                    (format!("bench-{}", seq % channels as u64), payload(seq))
                })
                .collect();
            target.publisher.publish(&msgs).await?;
            published += k;
        } else {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
    // Drain what is in flight (bounded).
    let expected = (published as f64 * per_message) as u64;
    let drain_deadline = Instant::now() + Duration::from_secs(5);
    while received < expected && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        received = total(&mut ws).await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = target.cpu() - cpu0;
    let mut figures = BTreeMap::new();
    figures.insert("delivered_per_s".into(), received as f64 / elapsed);
    figures.insert("published_per_s".into(), published as f64 / elapsed);
    figures.insert(
        "cpu_us_per_delivery".into(),
        cpu * 1e6 / received.max(1) as f64,
    );
    figures.insert("server_cpu_cores".into(), cpu / elapsed);
    figures.insert("lost".into(), expected.saturating_sub(received) as f64);
    for w in ws {
        w.quit().await;
    }
    target.stop().await;
    Ok(Row {
        scenario: scenario.into(),
        target: kind.into(),
        figures,
        note: format!("{subscribers} subscribers, {channels} channel(s), {nodes} node(s)"),
    })
}

/// Bursts: `size` publications at once (one pipelined batch into Redis) to every
/// subscriber of one channel, three times with a pause between: how fast a burst is
/// delivered (deliveries per second from the publish to the last delivery), the server's
/// CPU per delivery, and each message's publish→receive latency (p50, p99 over the three
/// bursts).
pub(crate) async fn burst(
    args: &RunArgs,
    redis: &RedisServer,
    kind: &str,
    size: usize,
) -> anyhow::Result<Row> {
    const BURSTS: u64 = 3;
    let mut target = Target::start(kind, 1, redis).await?;
    let mut ws = workers(&target.addrs, args.subscribers, 1, 2, kind).await?;
    for w in ws.iter_mut() {
        w.cmd("reset").await?;
    }
    let per_burst = (size * args.subscribers) as u64;
    let (mut busy, mut cpu, mut received) = (0f64, 0f64, 0u64);
    // Resident memory before the first burst, and the most seen during any (sampled
    // while waiting for the deliveries): what a burst's queues cost.
    let rss0 = target.rss();
    let mut rss_peak = rss0;
    for b in 0..BURSTS {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let msgs: Vec<(String, String)> = (0..size as u64)
            .map(|i| ("bench-0".to_owned(), payload(b * size as u64 + i)))
            .collect();
        let cpu0 = target.cpu();
        let started = Instant::now();
        target.publisher.publish(&msgs).await?;
        let deadline = started + Duration::from_secs(30);
        let want = per_burst * (b + 1);
        loop {
            rss_peak = rss_peak.max(target.rss());
            received = total(&mut ws).await?;
            if received >= want || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        busy += started.elapsed().as_secs_f64();
        cpu += target.cpu() - cpu0;
    }
    let mut figures = BTreeMap::new();
    let Latency { p50, p99, .. } = latency_stats(&mut ws).await?;
    figures.insert("delivered_per_s".into(), received as f64 / busy);
    figures.insert(
        "cpu_us_per_delivery".into(),
        cpu * 1e6 / received.max(1) as f64,
    );
    figures.insert("p50_us".into(), p50);
    figures.insert("p99_us".into(), p99);
    figures.insert(
        "rss_growth_mib".into(),
        rss_peak.saturating_sub(rss0) as f64 / (1 << 20) as f64,
    );
    figures.insert(
        "lost".into(),
        (per_burst * BURSTS).saturating_sub(received) as f64,
    );
    for w in ws {
        w.quit().await;
    }
    target.stop().await;
    Ok(Row {
        scenario: format!("burst{size}"),
        target: kind.into(),
        figures,
        note: format!(
            "{} subscribers, bursts of {size} publications, {BURSTS} bursts",
            args.subscribers
        ),
    })
}

/// What the workers measured: deliveries, and publish→receive latency percentiles (µs).
struct Latency {
    p50: f64,
    p99: f64,
    p999: f64,
    received: u64,
}

/// Every worker's count, and the worst of each percentile among them.
async fn latency_stats(ws: &mut [Worker]) -> anyhow::Result<Latency> {
    let mut l = Latency {
        p50: 0.0,
        p99: 0.0,
        p999: 0.0,
        received: 0,
    };
    for w in ws.iter_mut() {
        let s = w.cmd("stats").await?;
        l.received += s["received"].as_u64().unwrap_or(0);
        l.p50 = l.p50.max(s["p50_us"].as_f64().unwrap_or(0.0));
        l.p99 = l.p99.max(s["p99_us"].as_f64().unwrap_or(0.0));
        l.p999 = l.p999.max(s["p999_us"].as_f64().unwrap_or(0.0));
    }
    Ok(l)
}

/// Publish at a fixed rate and report publish→receive latency percentiles.
///
/// The rate is `latency_fraction` of the floor's fan-out maximum; a target whose own
/// maximum is below that rate (it would only measure an ever-growing queue) runs at
/// the same fraction of its own maximum instead, and says so in its note.
pub(crate) async fn latency(
    args: &RunArgs,
    redis: &RedisServer,
    kind: &str,
    max_rate: &BTreeMap<String, f64>,
) -> anyhow::Result<Row> {
    let floor = max_rate.get("floor").copied().unwrap_or(400.0);
    let own = max_rate.get(kind).copied().unwrap_or(floor);
    let rate = args
        .latency_rate
        .unwrap_or((args.latency_fraction * floor.min(own)).max(1.0));
    let mut target = Target::start(kind, 1, redis).await?;
    let mut ws = workers(&target.addrs, args.subscribers, 1, 2, kind).await?;
    for w in ws.iter_mut() {
        w.cmd("reset").await?;
    }
    let started = Instant::now();
    let phase = Duration::from_secs_f64(args.seconds);
    let mut published = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    while started.elapsed() < phase {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        if due > published {
            let msgs: Vec<(String, String)> = (published..due)
                .map(|s| ("bench-0".to_owned(), payload(s)))
                .collect();
            target.publisher.publish(&msgs).await?;
            published = due;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut figures = BTreeMap::new();
    let Latency {
        p50,
        p99,
        p999,
        received: recv,
    } = latency_stats(&mut ws).await?;
    figures.insert("publish_rate".into(), rate);
    figures.insert("p50_us".into(), p50);
    figures.insert("p99_us".into(), p99);
    figures.insert("p999_us".into(), p999);
    figures.insert(
        "lost".into(),
        (published * args.subscribers as u64).saturating_sub(recv) as f64,
    );
    for w in ws {
        w.quit().await;
    }
    target.stop().await;
    Ok(Row {
        scenario: "latency".into(),
        target: kind.into(),
        figures,
        note: if args.latency_rate.is_some() {
            format!(
                "{} subscribers at {rate:.0} publications/s",
                args.subscribers
            )
        } else if own < floor {
            format!(
                "{} subscribers at {rate:.0} publications/s ({}% of its own maximum: it cannot sustain {:.0}/s)",
                args.subscribers,
                (args.latency_fraction * 100.0) as u32,
                args.latency_fraction * floor
            )
        } else {
            format!(
                "{} subscribers at {rate:.0} publications/s",
                args.subscribers
            )
        },
    })
}

/// Resident memory per idle subscribed connection, and after churn.
pub(crate) async fn idle(args: &RunArgs, redis: &RedisServer, kind: &str) -> anyhow::Result<Row> {
    let target = Target::start(kind, 1, redis).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = target.rss();
    let ws = workers(&target.addrs, args.idle, 100, 1, kind).await?;
    // Idle means quiet for a while (Herald's writers linger 2 s after their last write).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let loaded = target.rss();
    let mut ws = ws;
    for w in ws.iter_mut() {
        w.cmd("close").await?;
    }
    for w in ws {
        w.quit().await;
    }
    // Churn: a second full wave, then everyone leaves.
    let mut again = workers(&target.addrs, args.idle, 100, 1, kind).await?;
    for w in again.iter_mut() {
        w.cmd("close").await?;
    }
    for w in again {
        w.quit().await;
    }
    // Allocators give freed memory back on a timer (jemalloc: 10 s decay).
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = target.rss();
    let n = args.idle as f64;
    let mut figures = BTreeMap::new();
    figures.insert("base_rss_mib".into(), base as f64 / 1048576.0);
    figures.insert(
        "kib_per_connection".into(),
        (loaded.saturating_sub(base)) as f64 / n / 1024.0,
    );
    figures.insert(
        "after_churn_mib_over_base".into(),
        after.saturating_sub(base) as f64 / 1048576.0,
    );
    target.stop().await;
    Ok(Row {
        scenario: "idle".into(),
        target: kind.into(),
        figures,
        note: format!("{} idle subscribed connections, fresh process", args.idle),
    })
}

/// Completed handshakes per second and server CPU per handshake.
pub(crate) async fn connect_rate(
    args: &RunArgs,
    redis: &RedisServer,
    kind: &str,
) -> anyhow::Result<Row> {
    let target = Target::start(kind, 1, redis).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu0 = target.cpu();
    let started = Instant::now();
    let w = Worker::start(target.addrs[0], args.handshakes, 0, 0, kind).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = target.cpu() - cpu0;
    let mut figures = BTreeMap::new();
    figures.insert("handshakes_per_s".into(), args.handshakes as f64 / elapsed);
    figures.insert(
        "cpu_us_per_handshake".into(),
        cpu * 1e6 / args.handshakes as f64,
    );
    w.quit().await;
    target.stop().await;
    Ok(Row {
        scenario: "connect".into(),
        target: kind.into(),
        figures,
        note: format!("{} handshakes, 128 in flight", args.handshakes),
    })
}

/// Network drops, Herald only (see the `drops` module).
pub(crate) async fn drops(args: &RunArgs, kind: &str) -> anyhow::Result<Option<Row>> {
    if kind != "herald" {
        return Ok(None);
    }
    let figures = crate::drops::measure(sibling("herald")?, args.smoke).await?;
    Ok(Some(Row {
        scenario: "drops".into(),
        target: kind.into(),
        figures,
        note: "clients in their own network namespace; their link cut (interface down) for 2 s every 5 s; a history channel at a steady rate".into(),
    }))
}

/// What verifying connection tokens costs, Herald only: server CPU per handshake with
/// no token (anonymous), with an HS256 token and with an RS256 token (2048-bit key made
/// by `openssl`), the same number of handshakes each, the node otherwise identical.
/// Each handshake verifies its token in full (signature, claims); keys are parsed once
/// at start-up. Every connection carries the same user, so the per-user count is taken
/// too (its limit raised out of the way).
pub(crate) async fn auth_costs(
    args: &RunArgs,
    redis: &RedisServer,
    kind: &str,
) -> anyhow::Result<Option<Row>> {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    if kind != "herald" {
        return Ok(None);
    }
    const SECRET: &str = "bench-hmac-secret-bench-hmac-secret-0123";
    let dir = std::env::temp_dir().join(format!("herald-bench-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    herald_harness::key_pair(&dir, "rsa", herald_harness::KeyKind::Rsa);
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 3600;
    let claims = serde_json::json!({"sub": "bench-user", "exp": exp});
    let hs = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )?;
    let rs = encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(&std::fs::read(dir.join("rsa.pem"))?)?,
    )?;
    let rsa_pub = dir.join("rsa.pub.pem").to_string_lossy().into_owned();
    let keys = [
        ("HERALD_AUTH__JWT__HMAC_SECRET", SECRET.to_owned()),
        ("HERALD_AUTH__JWT__RSA_PUBLIC_KEY_FILE", rsa_pub),
        (
            "HERALD_LIMITS__MAX_CONNECTIONS_PER_USER",
            "10000000".to_owned(),
        ),
    ];
    let mut figures = BTreeMap::new();
    // Interleaved rounds, so a slow moment of the machine lands on one round, not one
    // mode; figures are medians over rounds, ratios the median of each round's ratio.
    let rounds = if args.smoke { 1 } else { 7 };
    let mut cpu: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut wall: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for _ in 0..rounds {
        for (mode, token) in [("anon", None), ("hs256", Some(&hs)), ("rs256", Some(&rs))] {
            let target = Target::start_with_env(kind, 1, redis, &keys).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let cpu0 = target.thread_cpu();
            let started = Instant::now();
            let extra: Vec<&str> = token
                .map(|t| vec!["--token", t.as_str()])
                .unwrap_or_default();
            let w =
                Worker::start_with(target.addrs[0], args.handshakes, 0, 0, kind, &extra).await?;
            wall.entry(mode)
                .or_default()
                .push(started.elapsed().as_secs_f64());
            cpu.entry(mode)
                .or_default()
                .push(target.thread_cpu() - cpu0);
            w.quit().await;
            target.stop().await;
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let n = args.handshakes as f64;
    for (mode, c) in &cpu {
        figures.insert(format!("cpu_us_per_handshake_{mode}"), median(c) * 1e6 / n);
        figures.insert(format!("handshakes_per_s_{mode}"), n / median(&wall[mode]));
    }
    for mode in ["hs256", "rs256"] {
        let ratios: Vec<f64> = cpu[mode]
            .iter()
            .zip(&cpu["anon"])
            .map(|(t, a)| t / a.max(1e-9))
            .collect();
        figures.insert(format!("{mode}_over_anon"), median(&ratios));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Some(Row {
        scenario: "auth".into(),
        target: kind.into(),
        figures,
        note: format!(
            "{} handshakes x {rounds} interleaved rounds per mode, 128 in flight, medians; the same node configuration (all keys loaded) in every mode",
            args.handshakes
        ),
    }))
}
