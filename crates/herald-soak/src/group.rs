//! `herald-soak clients`: a group of Rust clients (herald-client), in its own process
//! so that the run can put it in a network namespace. Every event of every
//! subscription goes to stdout as a [`Record`] line. Clients reach the gateway
//! through an in-process relay, so that the run can drop a share of their connections
//! at any moment (`drop <permille>` on stdin: a client leaving mid-replay); `stop`
//! ends every subscription (an `end` record each) and the process.
//!
//! Tokens are HS256, signed here with the nodes' secret, each living a random few
//! seconds: nodes close expired connections with 4001 and the clients come back with a
//! fresh token from their token source, resuming.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use herald_client::{Client, Config, Event, TokenSource};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::record::{doc, now_ms, Kind, Payload, Record};

/// `herald-soak clients`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct GroupArgs {
    /// The gateway (HAProxy): `host:port`.
    #[arg(long)]
    upstream: SocketAddr,
    /// Client ids are this prefix and a number.
    #[arg(long)]
    prefix: String,
    #[arg(long)]
    clients: usize,
    /// The channels to choose from (comma-separated).
    #[arg(long, value_delimiter = ',')]
    channels: Vec<String>,
    /// Channels per client.
    #[arg(long, default_value_t = 2)]
    per_client: usize,
    #[arg(long)]
    seed: u64,
    /// The nodes' HS256 secret.
    #[arg(long)]
    secret: String,
    /// Token lifetimes are drawn from this range (seconds).
    #[arg(long, default_value_t = 6)]
    token_min_s: u64,
    #[arg(long, default_value_t = 20)]
    token_max_s: u64,
    /// How long a client's ping may go unanswered before it gives the connection up.
    #[arg(long, default_value_t = 2)]
    ping_timeout_s: u64,
}

/// Mints a token for `sub` living `life_s` seconds.
pub(crate) fn token(secret: &str, sub: &str, life_s: u64) -> String {
    let now = now_ms() / 1000;
    let claims = serde_json::json!({"sub": sub, "iat": now, "exp": now + life_s});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("an HS256 token")
}

/// How many bytes the relay's socket to the gateway buffers: small, so that a client
/// whose reading is slowed ([`Relay::slow_some`]) soon holds the gateway's socket full
/// instead of hiding behind megabytes of kernel buffers (HAProxy's are small too).
const UPSTREAM_RCVBUF: u32 = 8 * 1024;

/// A relayed connection: its task, and how its gateway-to-client direction is slowed.
struct Relayed {
    task: tokio::task::AbortHandle,
    slow: Arc<Mutex<Slow>>,
}

/// How a relayed connection reads from the gateway: at full speed, or at `rate`
/// bytes per second (0: not at all) until `until`.
#[derive(Clone, Copy, Default)]
struct Slow {
    until: Option<tokio::time::Instant>,
    rate: u32,
}

/// Relays TCP connections to `upstream`, drops a share of them on demand, and makes a
/// share of them slow readers for a while.
struct Relay {
    conns: Mutex<HashMap<u64, Relayed>>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> anyhow::Result<(Arc<Relay>, SocketAddr)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let relay = Arc::new(Relay {
            conns: Mutex::new(HashMap::new()),
        });
        let r = relay.clone();
        tokio::spawn(async move {
            let mut next = 0u64;
            while let Ok((down, _)) = listener.accept().await {
                next += 1;
                let id = next;
                let r2 = r.clone();
                let slow = Arc::new(Mutex::new(Slow::default()));
                let slow2 = slow.clone();
                let task = tokio::spawn(async move {
                    let up = tokio::time::timeout(Duration::from_secs(3), connect(upstream)).await;
                    if let Ok(Ok(up)) = up {
                        let (mut down_rd, down_wr) = down.into_split();
                        let (up_rd, mut up_wr) = up.into_split();
                        tokio::select! {
                            _ = tokio::io::copy(&mut down_rd, &mut up_wr) => {}
                            _ = copy_slowed(up_rd, down_wr, slow2) => {}
                        }
                    }
                    r2.conns.lock().expect("relay lock").remove(&id);
                });
                r.conns.lock().expect("relay lock").insert(
                    id,
                    Relayed {
                        task: task.abort_handle(),
                        slow,
                    },
                );
            }
        });
        Ok((relay, addr))
    }

    /// Drops each relayed connection with probability `permille / 1000`.
    fn drop_some(&self, permille: u32, rng: &mut fastrand::Rng) -> usize {
        let mut conns = self.conns.lock().expect("relay lock");
        let doomed: Vec<u64> = conns
            .keys()
            .copied()
            .filter(|_| rng.u32(0..1000) < permille)
            .collect();
        for id in &doomed {
            if let Some(c) = conns.remove(id) {
                c.task.abort();
            }
        }
        doomed.len()
    }

    /// Makes each relayed connection, with probability `permille / 1000`, read what the
    /// gateway sends at `rate` bytes per second (0: nothing) for `ms`.
    fn slow_some(&self, permille: u32, rate: u32, ms: u64, rng: &mut fastrand::Rng) -> usize {
        let until = tokio::time::Instant::now() + Duration::from_millis(ms);
        let conns = self.conns.lock().expect("relay lock");
        let mut n = 0;
        for c in conns.values().filter(|_| rng.u32(0..1000) < permille) {
            *c.slow.lock().expect("slow lock") = Slow {
                until: Some(until),
                rate,
            };
            n += 1;
        }
        n
    }
}

async fn connect(upstream: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match upstream {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // Before the connect: the window it advertises is fixed by then.
    socket.set_recv_buffer_size(UPSTREAM_RCVBUF)?;
    socket.connect(upstream).await
}

/// Copies the gateway's bytes to the client, slowed while `slow` says so.
async fn copy_slowed(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    slow: Arc<Mutex<Slow>>,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let now = tokio::time::Instant::now();
        let s = *slow.lock().expect("slow lock");
        let max = match s.until {
            Some(until) if until > now && s.rate == 0 => {
                tokio::time::sleep_until(until).await;
                continue;
            }
            // A tenth of a second's worth at a time.
            Some(until) if until > now => (s.rate as usize / 10).clamp(1, buf.len()),
            _ => buf.len(),
        };
        let n = match from.read(&mut buf[..max]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        if max < buf.len() {
            let pause = Duration::from_secs_f64(n as f64 / f64::from(s.rate.max(1)));
            tokio::time::sleep(pause.min(Duration::from_secs(1))).await;
        }
    }
}

pub(crate) fn run(args: GroupArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(group(args))
}

async fn group(args: GroupArgs) -> anyhow::Result<()> {
    let (relay, addr) = Relay::start(args.upstream).await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Record>();
    // One writer: lines never interleave.
    let writer = tokio::spawn(async move {
        let mut out = tokio::io::BufWriter::new(tokio::io::stdout());
        while let Some(r) = rx.recv().await {
            let mut line = serde_json::to_vec(&r).expect("a record");
            line.push(b'\n');
            if out.write_all(&line).await.is_err() {
                break;
            }
            if rx.is_empty() && out.flush().await.is_err() {
                break;
            }
        }
        let _ = out.flush().await;
    });
    let mut rng = fastrand::Rng::with_seed(args.seed);
    let mut clients = Vec::new();
    let mut subs = Vec::new();
    for i in 0..args.clients {
        let id = format!("{}{i}", args.prefix);
        let mut config = Config::new(format!("ws://{addr}/ws"));
        config.min_backoff = Duration::from_millis(100);
        config.max_backoff = Duration::from_secs(2);
        config.ping_timeout = Duration::from_secs(args.ping_timeout_s);
        config.connect_timeout = Duration::from_secs(5);
        // Half the clients take Fossil deltas on history channels.
        config.delta = i % 2 == 0;
        let (secret, sub) = (args.secret.clone(), id.clone());
        let (lo, hi) = (args.token_min_s, args.token_max_s.max(args.token_min_s + 1));
        let seed = rng.u64(..);
        let lives = Arc::new(Mutex::new(fastrand::Rng::with_seed(seed)));
        config.token_source = Some(TokenSource::new(move || {
            let life = lives.lock().expect("token rng").u64(lo..hi);
            let t = token(&secret, &sub, life);
            async move { Some(t) }
        }));
        let client = Client::start(config);
        let mut chosen = args.channels.clone();
        rng.shuffle(&mut chosen);
        chosen.truncate(args.per_client.max(1));
        for ch in chosen {
            let mut s = client
                .subscribe(&ch)
                .with_context(|| format!("subscribe {ch}"))?;
            let _ = tx.send(rec(&id, &ch, Kind::Start));
            let (tx, id2) = (tx.clone(), id.clone());
            subs.push((id.clone(), ch.clone()));
            tokio::spawn(async move {
                while let Some(ev) = s.next().await {
                    let r = match ev {
                        Event::Message { data, offset } => {
                            let p = match serde_json::from_slice::<Payload>(&data) {
                                Ok(p) if p.doc == doc(&ch, p.m) => p,
                                other => {
                                    let why = match other {
                                        Ok(p) => {
                                            format!("message {} carries another document", p.m)
                                        }
                                        Err(e) => format!(
                                            "not a soak payload ({e}): {}",
                                            String::from_utf8_lossy(&data)
                                        ),
                                    };
                                    let r = Record {
                                        why: Some(why),
                                        o: offset,
                                        ..rec(&id2, &ch, Kind::Corrupt)
                                    };
                                    if tx.send(r).is_err() {
                                        break;
                                    }
                                    continue;
                                }
                            };
                            Record {
                                m: Some(p.m),
                                a: Some(p.a),
                                o: offset,
                                ..rec(&id2, &ch, Kind::Msg)
                            }
                        }
                        Event::Subscribed => rec(&id2, &ch, Kind::Sub),
                        Event::Recovered(true) => rec(&id2, &ch, Kind::Rec),
                        Event::Recovered(false) => rec(&id2, &ch, Kind::Lost),
                        Event::Reset => rec(&id2, &ch, Kind::Reset),
                        Event::Refused(why) => Record {
                            why: Some(why),
                            ..rec(&id2, &ch, Kind::Refused)
                        },
                        Event::Unavailable(_) | Event::Join(_) | Event::Leave(_) => continue,
                        // The soak never calls the control API: either would end a
                        // subscription the checker expects to go on.
                        Event::Unsubscribed => Record {
                            why: Some("unsubscribed by the server".into()),
                            ..rec(&id2, &ch, Kind::Refused)
                        },
                        Event::Disconnected { code, reason } => Record {
                            why: Some(format!("disconnected: {code} {reason}")),
                            ..rec(&id2, &ch, Kind::Refused)
                        },
                    };
                    if tx.send(r).is_err() {
                        break;
                    }
                }
            });
        }
        clients.push(client);
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let mut words = line.split_whitespace();
        match (words.next(), words.next().and_then(|w| w.parse().ok())) {
            (Some("drop"), Some(permille)) => {
                let n = relay.drop_some(permille, &mut rng);
                eprintln!("{}: dropped {n} connections", args.prefix);
            }
            (Some("slow"), Some(permille)) => {
                let mut rest = words.filter_map(|w| w.parse::<u64>().ok());
                let (rate, ms) = (rest.next().unwrap_or(0), rest.next().unwrap_or(1000));
                let n = relay.slow_some(permille, rate as u32, ms, &mut rng);
                eprintln!(
                    "{}: {n} connections read at {rate} B/s for {ms} ms",
                    args.prefix
                );
            }
            (Some("stop"), _) => break,
            _ => eprintln!("{}: unknown command {line:?}", args.prefix),
        }
    }
    for (c, ch) in &subs {
        let _ = tx.send(rec(c, ch, Kind::End));
    }
    drop(tx);
    for c in &clients {
        c.close();
    }
    drop(clients);
    // The subscription tasks hold senders until their clients wind down.
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    Ok(())
}

fn rec(c: &str, ch: &str, k: Kind) -> Record {
    Record {
        c: c.to_owned(),
        ch: ch.to_owned(),
        t: now_ms(),
        k,
        m: None,
        a: None,
        o: None,
        why: None,
    }
}
