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

/// Relays TCP connections to `upstream` and drops a share of them on demand.
struct Relay {
    conns: Mutex<HashMap<u64, tokio::task::AbortHandle>>,
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
            while let Ok((mut down, _)) = listener.accept().await {
                next += 1;
                let id = next;
                let r2 = r.clone();
                let task = tokio::spawn(async move {
                    let up =
                        tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(upstream))
                            .await;
                    if let Ok(Ok(mut up)) = up {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                    r2.conns.lock().expect("relay lock").remove(&id);
                });
                r.conns
                    .lock()
                    .expect("relay lock")
                    .insert(id, task.abort_handle());
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
            if let Some(h) = conns.remove(id) {
                h.abort();
            }
        }
        doomed.len()
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
        config.ping_timeout = Duration::from_secs(2);
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
