//! `herald-soak run`: the whole soak. Starts the system, the client groups and the
//! publishers; injects faults drawn from the seed until the time is up; then undoes
//! everything, waits for every subscription to receive a message published after the
//! faults (the fence), stops, and lets the checker judge every delivery.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::time::{sleep, Instant};

use crate::check::{is_history, Checker, Report};
use crate::faults::{Fault, Schedule};
use crate::publisher::{Ledger, Publisher};
use crate::record::Record;
use crate::rollout::Rollout;
use crate::system::{haproxy, Namespace, Node, Redis};

/// `herald-soak run`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct RunArgs {
    /// The seed of every random choice (faults, their timing, channels per client).
    /// Printed at the start: pass it again to replay a run's schedule.
    #[arg(long)]
    seed: Option<u64>,
    /// How long faults are injected.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Rust clients on loopback.
    #[arg(long, default_value_t = 100)]
    rust_clients: usize,
    /// Rust clients in the network namespace whose link is cut.
    #[arg(long, default_value_t = 60)]
    netns_clients: usize,
    /// JS clients (the repository's client, under Node).
    #[arg(long, default_value_t = 60)]
    js_clients: usize,
    /// Rust clients on loopback subscribed to every channel: the connections that
    /// carry the most, which slow-reader faults ([`Fault::SlowReaders`]) make lag.
    #[arg(long, default_value_t = 12)]
    greedy_clients: usize,
    #[arg(long, default_value_t = 8)]
    history_channels: usize,
    #[arg(long, default_value_t = 4)]
    plain_channels: usize,
    /// Each channel's publisher publishes one message this often (ms).
    #[arg(long, default_value_t = 100)]
    publish_every_ms: u64,
    /// The herald binary (default: the one next to this one).
    #[arg(long)]
    herald: Option<PathBuf>,
    /// Without the network namespace (no root): no network cuts.
    #[arg(long)]
    no_netns: bool,
    /// Inject only these faults (their names as the report lists them, comma-separated,
    /// e.g. `--only "slow readers"`), to aim a run at one path.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where to write the report (JSON).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Instead of faults, rolling updates (every node replaced, one at a time, until
    /// `--seconds` are up; at least once) with the timings in this file, written by
    /// `deploy/kubernetes/check.py` from the rendered manifests. Nothing may be lost,
    /// not even with an announcement.
    #[arg(long, value_name = "TIMINGS_JSON")]
    rolling_update: Option<PathBuf>,
}

const SECRET: &str = "herald-soak-secret-of-at-least-32-bytes";
const NODES: usize = 3;

/// A running client group: its commands in, its records read by a task.
struct Group {
    name: &'static str,
    child: Child,
    stdin: ChildStdin,
    reader: tokio::task::JoinHandle<()>,
}

impl Group {
    fn spawn(
        name: &'static str,
        mut cmd: Command,
        log: std::fs::File,
        checker: Arc<Mutex<Checker>>,
    ) -> anyhow::Result<Group> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start the {name} client group"))?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Record>(&line) {
                    Ok(r) => checker.lock().expect("checker").record(&r),
                    Err(e) => eprintln!("herald-soak: {name}: not a record ({e}): {line}"),
                }
            }
        });
        Ok(Group {
            name,
            child,
            stdin,
            reader,
        })
    }

    async fn say(&mut self, line: &str) {
        let _ = self.stdin.write_all(format!("{line}\n").as_bytes()).await;
        let _ = self.stdin.flush().await;
    }

    /// `stop`, then waits for its last records.
    async fn stop(mut self) -> anyhow::Result<()> {
        self.say("stop").await;
        let done = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        if done.is_err() {
            let _ = self.child.kill().await;
            bail!("the {} client group did not stop", self.name);
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.reader).await;
        Ok(())
    }
}

fn node_config(
    dir: &std::path::Path,
    redis: &str,
    (drain_window, grace_period): (&str, &str),
    rollout: bool,
) -> anyhow::Result<PathBuf> {
    let path = dir.join("herald.toml");
    // Small queues and socket buffers, so that slow-reader faults make the greedy
    // clients' sessions lag (history channels catch them up in place) or overflow (a
    // plain channel's push closes them with 1013, and they resume): a few seconds of
    // their traffic. Not smaller: a resume's replay may take half the queue, and 64 KiB
    // did not cover a long link cut's (5 resumes in a minute answered recovered:false,
    // which excuses what they missed). The rollout, which injects no slow readers,
    // keeps the defaults.
    let limits = if rollout {
        ""
    } else {
        "outbound_queue_bytes = 131072\nsocket_send_buffer_bytes = 4096\n"
    };
    std::fs::write(
        &path,
        format!(
            r#"[log]
level = "warn"

[redis]
url = "{redis}"

[auth]
anonymous = false
expiry_grace = "1s"

[auth.jwt]
hmac_secret = "{SECRET}"

[limits]
# A subscribe waits this long for Redis before it is answered `unavailable` (which
# clients must retry): shorter than the soak's longest Redis outage.
subscribe_timeout = "2s"
{limits}
# A pong may wait behind a slow reader's backlog; a reader that takes nothing for
# `interval + timeout` is dead, one that takes bytes is not.
[heartbeat]
interval = "2s"
timeout = "6s"

[shutdown]
drain_window = "{drain_window}"
grace_period = "{grace_period}"

[[channels.rules]]
pattern = "h:*"
history_size = 1000
delta = "fossil"
"#
        ),
    )?;
    Ok(path)
}

/// How often the nodes took the paths the faults aim at, summed over the run: each
/// node's counters are read before it is killed or stopped, and at the end. (A node
/// that dies between two reads, in a rollout, is not counted.)
#[derive(Default, serde::Serialize)]
struct Exercised {
    /// Publications sent as Fossil deltas.
    delta_publications: u64,
    /// Lagging history subscribers caught up in place.
    slow_readers_caught_up: u64,
    /// Sessions closed with 1013.
    slow_consumers_closed: u64,
    /// Resumes answered `recovered:false` because their replay would take more than
    /// half the subscriber's queue (small here: 128 KiB).
    replays_refused: u64,
}

impl Exercised {
    async fn scrape(&mut self, node: &Node) {
        let Some(metrics) = node.get("/metrics").await else {
            return;
        };
        let value = |sample| herald_harness::metric_value(&metrics, sample).unwrap_or(0.0) as u64;
        self.delta_publications += value(r#"herald_delta_publications_total{outcome="delta"}"#);
        self.slow_readers_caught_up += value(r#"herald_recoveries_total{outcome="caught_up"}"#);
        self.slow_consumers_closed += value("herald_slow_consumer_disconnects_total");
        self.replays_refused += value("herald_replays_refused_total");
    }
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let path = me.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} not found: build it first (cargo build --release -p herald), or pass --herald",
            path.display()
        );
    }
    Ok(path)
}

async fn all_ready(nodes: &[Node], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let mut ready = true;
        for n in nodes.iter().filter(|n| n.running()) {
            ready &= n.ready().await;
        }
        if ready {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        sleep(Duration::from_millis(100)).await;
    }
}

/// Rolling updates until `seconds` are up (at least one): every pod replaced in turn,
/// each replacement taking the slot the previous old pod left.
async fn roll(
    rollout: &Rollout,
    nodes: &mut [Node],
    admin: &std::path::Path,
    rng: &mut fastrand::Rng,
    injected: &mut BTreeMap<&'static str, u64>,
    started: Instant,
    seconds: u64,
) -> anyhow::Result<Vec<String>> {
    let mut killed = Vec::new();
    let mut rounds = 0;
    while rounds == 0 || started.elapsed() < Duration::from_secs(seconds) {
        rounds += 1;
        let pods: Vec<usize> = (0..nodes.len()).filter(|&i| nodes[i].running()).collect();
        for old in pods {
            let Some(new) = (0..nodes.len()).find(|&i| !nodes[i].running()) else {
                bail!("no free slot for a replacement");
            };
            let lag = Duration::from_secs_f64(rollout.pre_stop_seconds * rng.f64() * 0.8);
            let t = started.elapsed().as_secs_f64();
            println!(
                "herald-soak: {t:7.1}s rollout {rounds}: slot {old} -> {new} (endpoint removed after {:.1}s)",
                lag.as_secs_f64()
            );
            let done = rollout.replace(nodes, old, new, admin, lag).await?;
            *injected.entry("rolling update: pod replaced").or_default() += 1;
            if done.exited {
                println!(
                    "herald-soak:          the old pod exited {:.1}s after its deletion",
                    done.took.as_secs_f64()
                );
            } else {
                *injected
                    .entry("rolling update: SIGKILL at the end of the grace period")
                    .or_default() += 1;
                let what = format!(
                    "rollout {rounds}: the pod in slot {old} was still running {:.1}s after its deletion: SIGKILL",
                    done.took.as_secs_f64()
                );
                println!("herald-soak:          {what}");
                killed.push(what);
            }
        }
    }
    Ok(killed)
}

pub(crate) fn run(args: RunArgs) -> anyhow::Result<()> {
    let report = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(soak(args))?;
    if report.violations_by_kind.is_empty() {
        Ok(())
    } else {
        bail!("violations: {:?}", report.violations_by_kind)
    }
}

async fn soak(args: RunArgs) -> anyhow::Result<Report> {
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let replay = match &args.rolling_update {
        Some(t) => format!(" --rolling-update {}", t.display()),
        None => String::new(),
    };
    println!(
        "herald-soak: seed {seed} (replay the schedule: herald-soak run --seed {seed} --seconds {}{replay})",
        args.seconds
    );
    // Before anything starts: a run that cannot inject what it was asked to.
    if args.rolling_update.is_some() && !args.only.is_empty() {
        bail!("--only picks faults; a rolling update injects none");
    }
    crate::faults::check_only(&args.only, !args.no_netns)?;
    let mut rng = fastrand::Rng::with_seed(seed);
    let herald = match &args.herald {
        Some(p) => p.clone(),
        None => sibling("herald")?,
    };
    let dir = std::env::temp_dir().join(format!("herald-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!("herald-soak: files and logs in {}", dir.display());

    let rollout = match &args.rolling_update {
        Some(path) => Some(Rollout::load(path)?),
        None => None,
    };
    let mut redis = tokio::task::block_in_place(|| Redis::start(&dir.join("redis")))?;
    let shutdown = match &rollout {
        Some(r) => (r.drain_window.as_str(), r.grace_period.as_str()),
        None => ("1s", "3s"),
    };
    let config = node_config(&dir, &redis.url(), shutdown, rollout.is_some())?;
    // A rollout's replacements start in spare slots (HAProxy knows every slot).
    let slots = NODES + rollout.as_ref().map_or(0, Rollout::spare_slots);
    let mut nodes: Vec<Node> = (0..slots)
        .map(|i| Node::new(&herald, &config, dir.join(format!("node{i}.log"))))
        .collect();
    for n in &mut nodes[..NODES] {
        n.start()?;
    }
    if !all_ready(&nodes, Duration::from_secs(30)).await {
        bail!("the nodes did not become ready (logs in {})", dir.display());
    }
    let ns = if args.no_netns {
        None
    } else {
        Some(Namespace::create()?)
    };
    let addrs: Vec<_> = nodes.iter().map(|n| n.addr).collect();
    let admin = dir.join("haproxy.sock");
    let (_lb, port) = haproxy(&addrs, ns.as_ref().map(|n| n.host_ip.as_str()), &admin);

    let channels: Vec<String> = (0..args.history_channels)
        .map(|i| format!("h:{i}"))
        .chain((0..args.plain_channels).map(|i| format!("p:{i}")))
        .collect();
    let checker = Arc::new(Mutex::new(match rollout {
        Some(_) => Checker::forbidding_gaps(),
        None => Checker::default(),
    }));
    let me = std::env::current_exe()?;
    let log = |name: &str| std::fs::File::create(dir.join(format!("{name}.log")));
    let rust_group_on = |prefix: &str, n: usize, upstream: String, seed: u64, on: &[String]| {
        vec![
            "clients".to_owned(),
            "--upstream".into(),
            upstream,
            "--prefix".into(),
            prefix.into(),
            "--clients".into(),
            n.to_string(),
            "--channels".into(),
            on.join(","),
            "--seed".into(),
            seed.to_string(),
            "--secret".into(),
            SECRET.into(),
        ]
    };
    let rust_group = |prefix: &str, n: usize, upstream: String, seed: u64| {
        rust_group_on(prefix, n, upstream, seed, &channels)
    };
    let mut groups = Vec::new();
    let mut subscriptions = 0;
    if args.rust_clients > 0 {
        let mut cmd = Command::new(&me);
        cmd.args(rust_group(
            "r",
            args.rust_clients,
            format!("127.0.0.1:{port}"),
            rng.u64(..),
        ));
        // Long-lived tokens here: a reconnect resubscribes everything, so clients
        // whose tokens expire every few seconds would hide a subscription that is
        // never asked for again (the other groups' tokens expire every 6-20 s).
        cmd.args(["--token-min-s", "1800", "--token-max-s", "3600"]);
        groups.push(Group::spawn("rust", cmd, log("rust")?, checker.clone())?);
        subscriptions += args.rust_clients * 2;
    }
    // Greedy clients: half on every channel (a slow one is closed with 1013 when a
    // plain channel's publication overflows its queue, and resumes), half on every
    // history channel (a slow one lags and is caught up in place).
    let history: Vec<String> = channels.iter().filter(|c| is_history(c)).cloned().collect();
    let halves = [
        ("greedy", "g", args.greedy_clients.div_ceil(2), &channels),
        ("greedy-history", "gh", args.greedy_clients / 2, &history),
    ];
    for (name, prefix, n, on) in halves.into_iter().filter(|h| h.2 > 0) {
        let mut cmd = Command::new(&me);
        let upstream = format!("127.0.0.1:{port}");
        cmd.args(rust_group_on(prefix, n, upstream, rng.u64(..), on));
        // A stalled greedy client waits for its node to lag or to find it dead
        // (heartbeat: 2 s + 6 s) rather than giving the connection up itself first.
        cmd.args([
            "--per-client",
            &on.len().to_string(),
            "--ping-timeout-s",
            "8",
        ]);
        groups.push(Group::spawn(name, cmd, log(name)?, checker.clone())?);
        subscriptions += n * on.len();
    }
    if let (Some(ns), true) = (&ns, args.netns_clients > 0) {
        let mut cmd = Command::new(herald_harness::system_tool("ip", "iproute2"));
        cmd.args(["netns", "exec", &ns.name])
            .arg(&me)
            .args(rust_group(
                "n",
                args.netns_clients,
                format!("{}:{port}", ns.host_ip),
                rng.u64(..),
            ));
        groups.push(Group::spawn("netns", cmd, log("netns")?, checker.clone())?);
        subscriptions += args.netns_clients * 2;
    }
    if args.js_clients > 0 {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/js/clients.mjs");
        let mut cmd = Command::new(herald_harness::system_tool("node", "nodejs"));
        cmd.args(["--experimental-websocket", "--no-warnings", script])
            .env("SOAK_UPSTREAM", format!("127.0.0.1:{port}"))
            .env("SOAK_PREFIX", "j")
            .env("SOAK_CLIENTS", args.js_clients.to_string())
            .env("SOAK_CHANNELS", channels.join(","))
            .env("SOAK_PER_CLIENT", "2")
            .env("SOAK_SEED", rng.u64(..).to_string())
            .env("SOAK_SECRET", SECRET);
        groups.push(Group::spawn("js", cmd, log("js")?, checker.clone())?);
        subscriptions += args.js_clients * 2;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let confirmed = checker.lock().expect("checker").confirmed();
        if confirmed >= subscriptions {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {confirmed} of {subscriptions} subscriptions were confirmed in 60 s");
        }
        sleep(Duration::from_millis(100)).await;
    }
    println!("herald-soak: {subscriptions} subscriptions confirmed; publishing, injecting faults");

    let ledger = Arc::new(Ledger::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut next: HashMap<String, Arc<AtomicU64>> = HashMap::new();
    let mut publishers = Vec::new();
    for ch in &channels {
        let n = Arc::new(AtomicU64::new(1));
        next.insert(ch.clone(), n.clone());
        let p = Publisher {
            ch: ch.clone(),
            next: n,
        };
        publishers.push(tokio::spawn(p.run(
            addrs.clone(),
            Duration::from_millis(args.publish_every_ms),
            rng.u64(..),
            ledger.clone(),
            stop.clone(),
        )));
    }

    let started = Instant::now();
    let mut schedule = Schedule::new(rng.u64(..), NODES, ns.is_some()).only(&args.only)?;
    let mut injected: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut exercised = Exercised::default();
    sleep(Duration::from_secs(2)).await;
    let killed = match &rollout {
        Some(r) => {
            let (seconds, injected) = (args.seconds, &mut injected);
            roll(r, &mut nodes, &admin, &mut rng, injected, started, seconds).await?
        }
        None => Vec::new(),
    };
    while rollout.is_none() && started.elapsed() < Duration::from_secs(args.seconds) {
        let (fault, pause) = schedule.next();
        let t = started.elapsed().as_secs_f64();
        println!("herald-soak: {t:7.1}s {fault:?}");
        *injected.entry(fault.name()).or_default() += 1;
        match fault {
            Fault::NodeKill(i, down) => {
                exercised.scrape(&nodes[i]).await;
                nodes[i].kill();
                sleep(down).await;
                nodes[i].start()?;
            }
            Fault::NodeTerm(i, down) => {
                exercised.scrape(&nodes[i]).await;
                nodes[i].terminate().await;
                sleep(down).await;
                nodes[i].start()?;
            }
            Fault::RedisCrash(down) => {
                redis.kill();
                sleep(down).await;
                tokio::task::block_in_place(|| redis.start_again())?;
            }
            Fault::RedisCrashDrop(down, permille) => {
                redis.kill();
                for g in &mut groups {
                    g.say(&format!("drop {permille}")).await;
                }
                sleep(down).await;
                tokio::task::block_in_place(|| redis.start_again())?;
            }
            Fault::RedisAofTail(bytes) => {
                redis.kill();
                let cut = tokio::task::block_in_place(|| redis.start_with_aof_tail_cut(bytes))?;
                println!("herald-soak:          cut {cut} bytes off the AOF");
            }
            Fault::RedisSnapshot => {
                redis.kill();
                tokio::task::block_in_place(|| redis.start_from_snapshot())?;
            }
            Fault::ClientKillAll => {
                let killed = tokio::task::block_in_place(|| {
                    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"])
                });
                println!("herald-soak:          killed {} connections", killed.trim());
            }
            Fault::ClientKillOne(n) => {
                // The nodes' connections are the pub/sub ones (commands share them).
                let list = tokio::task::block_in_place(|| {
                    redis.cli(&["CLIENT", "LIST", "TYPE", "pubsub"])
                });
                let ids: Vec<&str> = list
                    .lines()
                    .filter_map(|l| l.split_whitespace().next()?.strip_prefix("id="))
                    .collect();
                if !ids.is_empty() {
                    let id = ids[n as usize % ids.len()];
                    let killed =
                        tokio::task::block_in_place(|| redis.cli(&["CLIENT", "KILL", "ID", id]));
                    println!(
                        "herald-soak:          killed connection {id}: {}",
                        killed.trim()
                    );
                }
            }
            Fault::NetCut(down) => {
                if let Some(ns) = &ns {
                    ns.cut(true)?;
                    sleep(down).await;
                    ns.cut(false)?;
                }
            }
            Fault::ClientDrop(permille) => {
                for g in &mut groups {
                    g.say(&format!("drop {permille}")).await;
                }
            }
            Fault::SlowReaders {
                permille,
                rate,
                lasts,
            } => {
                for g in &mut groups {
                    g.say(&format!("slow {permille} {rate} {}", lasts.as_millis()))
                        .await;
                }
            }
        }
        sleep(pause).await;
    }
    let faulty = started.elapsed();

    // The fence: every node ready, then every subscription must receive a message
    // published from now on (publishing goes on until they all have, or a minute).
    // (A rollout's spare slots stay empty.)
    if rollout.is_none() {
        for n in nodes.iter_mut().filter(|n| !n.running()) {
            n.start()?;
        }
    }
    if !all_ready(&nodes, Duration::from_secs(30)).await {
        println!("herald-soak: not every node is ready 30 s after the last fault");
    }
    let upto: HashMap<String, u64> = next
        .iter()
        .map(|(ch, n)| (ch.clone(), n.load(Ordering::Acquire)))
        .collect();
    let fence = Instant::now();
    let stalled = loop {
        let behind = checker.lock().expect("checker").behind(&upto);
        if behind.is_empty() || fence.elapsed() > Duration::from_secs(60) {
            break behind;
        }
        sleep(Duration::from_millis(200)).await;
    };
    println!(
        "herald-soak: fence passed in {:.1}s ({} subscriptions behind)",
        fence.elapsed().as_secs_f64(),
        stalled.len()
    );
    stop.store(true, Ordering::Release);
    for p in publishers {
        let _ = p.await;
    }
    // History subscriptions must then receive everything acknowledged, up to the last.
    let last: HashMap<String, u64> = {
        let sent = ledger.sent.lock().expect("ledger");
        let mut last = HashMap::new();
        for s in sent.iter().filter(|s| is_history(&s.ch) && s.acked()) {
            let m = last.entry(s.ch.clone()).or_insert(0);
            *m = s.m.max(*m);
        }
        last
    };
    let tail = Instant::now();
    while tail.elapsed() < Duration::from_secs(20)
        && !checker.lock().expect("checker").behind(&last).is_empty()
    {
        sleep(Duration::from_millis(200)).await;
    }
    for g in groups {
        g.stop().await?;
    }

    let mut checker = Arc::into_inner(checker)
        .context("the checker is still shared")?
        .into_inner()
        .expect("checker");
    checker.stalled(&stalled);
    for k in killed {
        checker.grace_exceeded(k);
    }
    for u in ledger.unexpected.lock().expect("ledger").drain(..) {
        checker.unexpected(u);
    }
    let sent = std::mem::take(&mut *ledger.sent.lock().expect("ledger"));
    let report = checker.finish(&sent);
    for n in nodes.iter().filter(|n| n.running()) {
        exercised.scrape(n).await;
    }
    let summary = serde_json::json!({
        "seed": seed,
        "fault_seconds": faulty.as_secs_f64().round(),
        "clients": args.rust_clients + args.netns_clients + args.js_clients + args.greedy_clients,
        "channels": {"history": args.history_channels, "plain": args.plain_channels},
        "faults": injected,
        "exercised": exercised,
        "report": report,
    });
    let text = serde_json::to_string_pretty(&summary)?;
    println!("{text}");
    if let Some(out) = &args.out {
        std::fs::write(out, &text)?;
    }
    drop(nodes);
    drop(redis);
    if report.violations_by_kind.is_empty() {
        let _ = std::fs::remove_dir_all(&dir);
        println!(
            "herald-soak: seed {seed}: {} faults, {} deliveries checked, violations: 0",
            injected.values().sum::<u64>(),
            report.deliveries
        );
    } else {
        println!(
            "herald-soak: seed {seed}: VIOLATIONS {:?}; node logs kept in {}",
            report.violations_by_kind,
            dir.display()
        );
    }
    Ok(report)
}
