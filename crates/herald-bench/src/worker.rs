//! A load-generator process: holds many WebSocket clients and counts what they receive.
//!
//! The orchestrator drives it over stdin/stdout, one line each way:
//! `count` → `{"received":N}`; `stats` → counts and latency percentiles; `reset` →
//! zero the counters; `close` → drop every connection; `quit`. Progress and the ready
//! report are JSON lines too. Everything runs on one thread (a `LocalSet`), so counters
//! are plain cells and the process uses one core at most.

use std::cell::{Cell, RefCell};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpSocket;
use tokio::task::LocalSet;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// What a worker does.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct WorkerArgs {
    /// Server address (host:port); the path is /ws.
    #[arg(long)]
    pub(crate) addr: SocketAddr,
    /// Connections to hold.
    #[arg(long)]
    pub(crate) connections: usize,
    /// Channels to spread subscriptions over (`bench-0` ... `bench-{M-1}`); 0: do not
    /// subscribe (connect-rate scenario).
    #[arg(long, default_value_t = 1)]
    pub(crate) channels: usize,
    /// Index of this worker's first connection (channel assignment continues across
    /// workers).
    #[arg(long, default_value_t = 0)]
    pub(crate) offset: usize,
    /// Source addresses to bind client sockets to, comma-separated (spreads ephemeral
    /// ports over several loopback addresses).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    pub(crate) sources: Vec<IpAddr>,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 128)]
    pub(crate) concurrency: usize,
    /// The server's protocol: `herald` (also spoken by the floor and the Node and Python
    /// peers) or `socketio` (Engine.IO 4 over WebSocket, rooms as channels).
    #[arg(long, default_value = "herald")]
    pub(crate) protocol: String,
    /// Give up on connecting after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub(crate) connect_timeout_s: u64,
    /// Channel names are `PREFIX-N`.
    #[arg(long, default_value = "bench")]
    pub(crate) channel_prefix: String,
    /// Churn: every connection moves to another of the `channels` channels (an
    /// unsubscribe and a subscribe) this often, in milliseconds; 0: never.
    #[arg(long, default_value_t = 0)]
    pub(crate) churn_every_ms: u64,
    /// A connection token sent with every handshake (`Authorization: Bearer`).
    #[arg(long)]
    pub(crate) token: Option<String>,
}

struct Counters {
    received: Cell<u64>,
    latency: RefCell<Histogram<u64>>,
}

pub(crate) fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    LocalSet::new().block_on(&rt, main(args))
}

async fn main(args: WorkerArgs) -> anyhow::Result<()> {
    let counters = Rc::new(Counters {
        received: Cell::new(0),
        latency: RefCell::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
    });
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.connect_timeout_s);
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let mut pending = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let permit = sem.clone().acquire_owned().await?;
        let source = args.sources[i % args.sources.len()];
        let prefix = args.channel_prefix.clone();
        let channel =
            (args.channels > 0).then(|| format!("{prefix}-{}", (args.offset + i) % args.channels));
        let churn = (args.churn_every_ms > 0 && args.channels > 1).then(|| Churn {
            every: Duration::from_millis(args.churn_every_ms),
            prefix: prefix.clone(),
            channels: args.channels,
            at: (args.offset + i) % args.channels,
            // Spread the first move over the period, so moves are steady, not waves.
            first: Duration::from_millis((i as u64 * 7919) % args.churn_every_ms),
        });
        let addr = args.addr;
        let counters = counters.clone();
        let socketio = args.protocol == "socketio";
        let token = args.token.clone();
        pending.push(tokio::task::spawn_local(async move {
            let r = tokio::time::timeout_at(
                deadline.into(),
                connect(addr, source, channel, socketio, token),
            )
            .await;
            drop(permit);
            match r {
                Ok(Ok(ws)) => {
                    let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
                    tokio::task::spawn_local(read(ws, counters, close_rx, churn));
                    Ok(close_tx)
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("connect timed out".to_owned()),
            }
        }));
        if i % 1000 == 999 {
            eprintln!(
                "worker: {} connecting ({} s)",
                i + 1,
                started.elapsed().as_secs()
            );
        }
    }
    let mut conns = Vec::with_capacity(args.connections);
    let mut errors: Vec<String> = Vec::new();
    for p in pending {
        match p.await? {
            Ok(c) => conns.push(c),
            Err(e) => errors.push(e),
        }
    }
    let elapsed = started.elapsed();
    errors.sort();
    errors.dedup();
    println!(
        "{}",
        json!({
            "ready": conns.len(),
            "failed": args.connections - conns.len(),
            "elapsed_s": elapsed.as_secs_f64(),
            "errors": errors.iter().take(3).collect::<Vec<_>>(),
        })
    );

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        match line.trim() {
            "count" => println!("{}", json!({"received": counters.received.get()})),
            "stats" => {
                let h = counters.latency.borrow();
                println!(
                    "{}",
                    json!({
                        "received": counters.received.get(),
                        "lat_count": h.len(),
                        "p50_us": h.value_at_quantile(0.5),
                        "p99_us": h.value_at_quantile(0.99),
                        "p999_us": h.value_at_quantile(0.999),
                        "max_us": h.max(),
                    })
                );
            }
            "reset" => {
                counters.received.set(0);
                counters.latency.borrow_mut().reset();
                println!("{}", json!({"reset": true}));
            }
            "close" => {
                let n = conns.len();
                for c in conns.drain(..) {
                    let _ = c.send(());
                }
                // Let the close frames go out.
                tokio::time::sleep(Duration::from_millis(200)).await;
                println!("{}", json!({"closed": n}));
            }
            "quit" | "" => break,
            other => eprintln!("worker: unknown command {other:?}"),
        }
    }
    Ok(())
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn connect(
    addr: SocketAddr,
    source: IpAddr,
    channel: Option<String>,
    socketio: bool,
    token: Option<String>,
) -> anyhow::Result<Ws> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.set_recv_buffer_size(64 * 1024)?;
    let stream = socket.connect(addr).await.context("tcp connect")?;
    stream.set_nodelay(true)?;
    // Small buffers: the load generator must hold tens of thousands of clients.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let path = if socketio {
        "/socket.io/?EIO=4&transport=websocket"
    } else {
        "/ws"
    };
    let mut req = format!("ws://{addr}{path}").into_client_request()?;
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse()?);
    }
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(config))
        .await
        .context("websocket handshake")?;
    if socketio {
        return socketio_join(ws, channel).await;
    }
    // The welcome frame.
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.contains("welcome") => {}
        other => anyhow::bail!("expected a welcome, got {other:?}"),
    }
    if let Some(channel) = channel {
        let channel = herald_protocol::ChannelName::new(&channel)?;
        ws.send(Message::Text(
            herald_protocol::client::encode_subscribe(&channel, Some(1), None).into(),
        ))
        .await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.contains("\"subscribed\"") => break,
                Some(Ok(
                    Message::Text(_) | Message::Binary(_) | Message::Ping(_) | Message::Pong(_),
                )) => {}
                other => anyhow::bail!("expected subscribed, got {other:?}"),
            }
        }
    }
    Ok(ws)
}

/// Engine.IO open, Socket.IO namespace connect, then `subscribe` (joins the room).
async fn socketio_join(mut ws: Ws, channel: Option<String>) -> anyhow::Result<Ws> {
    let next = async |ws: &mut Ws| -> anyhow::Result<String> {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.as_str() == "2" => {
                    ws.send(Message::Text("3".into())).await?;
                }
                Some(Ok(Message::Text(t))) => return Ok(t.to_string()),
                Some(Ok(_)) => {}
                other => anyhow::bail!("socket.io handshake: {other:?}"),
            }
        }
    };
    anyhow::ensure!(
        next(&mut ws).await?.starts_with('0'),
        "no engine.io open packet"
    );
    ws.send(Message::Text("40".into())).await?;
    anyhow::ensure!(
        next(&mut ws).await?.starts_with("40"),
        "namespace not joined"
    );
    if let Some(channel) = channel {
        ws.send(Message::Text(
            format!(r#"42["subscribe","{channel}"]"#).into(),
        ))
        .await?;
        loop {
            if next(&mut ws).await?.starts_with(r#"42["subscribed""#) {
                break;
            }
        }
    }
    Ok(ws)
}

/// How a churning connection moves between channels.
struct Churn {
    every: Duration,
    prefix: String,
    channels: usize,
    /// The channel it holds now.
    at: usize,
    first: Duration,
}

async fn read(
    mut ws: Ws,
    counters: Rc<Counters>,
    mut close: tokio::sync::oneshot::Receiver<()>,
    mut churn: Option<Churn>,
) {
    let mut tick = churn.as_ref().map(|c| {
        tokio::time::interval_at(tokio::time::Instant::now() + c.first + c.every, c.every)
    });
    loop {
        let moved = async {
            match &mut tick {
                Some(t) => {
                    t.tick().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = &mut close => {
                let _ = ws.close(None).await;
                return;
            }
            _ = moved => {
                if let Some(c) = &mut churn {
                    let from = format!("{}-{}", c.prefix, c.at);
                    c.at = (c.at + 1 + c.at * 31 % (c.channels - 1)) % c.channels;
                    let to = format!("{}-{}", c.prefix, c.at);
                    let (Ok(from), Ok(to)) = (herald_protocol::ChannelName::new(&from), herald_protocol::ChannelName::new(&to)) else {
                        continue;
                    };
                    let ops = herald_protocol::client::encode_unsubscribe(&from, None);
                    let _ = ws.send(Message::Text(ops.into())).await;
                    let sub = herald_protocol::client::encode_subscribe(&to, None, None);
                    let _ = ws.send(Message::Text(sub.into())).await;
                }
            }
            msg = ws.next() => match msg {
                // Engine.IO ping: answer, it is not a message.
                Some(Ok(Message::Text(t))) if t.as_str() == "2" => {
                    let _ = ws.send(Message::Text("3".into())).await;
                }
                Some(Ok(Message::Text(t))) => {
                    counters.received.set(counters.received.get() + 1);
                    if let Some(ts) = timestamp(t.as_bytes()) {
                        let now = herald_protocol::publication::unix_micros();
                        let _ = counters.latency.borrow_mut().record(now.saturating_sub(ts).max(1));
                    }
                }
                Some(Ok(Message::Binary(_))) => counters.received.set(counters.received.get() + 1),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
    }
}

/// The publisher's timestamp, `"ts":<µs>`, found by a scan rather than a JSON parse
/// so the load generator spends its CPU on receiving.
pub(crate) fn timestamp(frame: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"ts\":";
    let at = frame.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits = frame[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&frame[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_timestamp() {
        assert_eq!(
            super::timestamp(
                br#"{"op":"message","channel":"c","data":{"seq":1,"ts":1234,"p":"x"}}"#
            ),
            Some(1234)
        );
        assert_eq!(super::timestamp(b"{}"), None);
    }
}
