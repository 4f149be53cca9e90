//! The raw-write floor: the physical limit of this machine for a scenario.
//!
//! It accepts the same WebSocket connections as Herald (real HTTP upgrade, welcome,
//! subscribe acknowledged) and then writes the same delivery frames, pre-encoded once,
//! straight to the sockets with batched `write_all`s: no broker, no per-connection
//! protocol work, no per-connection tasks: two writer shards own the sockets and
//! write each batch to each socket with one non-blocking `write`. Publications arrive
//! on a control socket as lines `channel<TAB>json-data`; everything read at once
//! becomes one batch.
//!
//! With `--redis`, publications come through Redis instead, read by Herald's own Redis
//! broker (the same intake Herald has): the floor of a gateway fed by Redis, whose
//! server shares the two cores with it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use herald_broker::{Broker, Ready, Received};
use herald_protocol::{client, server, ChannelName, Payload, Publication};
use herald_redis::{RedisBroker, RedisConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Where the floor listens.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct FloorArgs {
    /// WebSocket listener.
    #[arg(long)]
    pub(crate) listen: SocketAddr,
    /// Control listener (publications, one per line).
    #[arg(long)]
    pub(crate) control: SocketAddr,
    /// Take publications from this Redis (through Herald's Redis broker, prefix
    /// `herald:`) as well as from the control socket.
    #[arg(long)]
    pub(crate) redis: Option<String>,
}

/// A batch of publications: per channel, the concatenated frames.
type Batch = Arc<Vec<(String, Bytes)>>;

/// A subscribed client socket owned by a writer shard.
struct Conn {
    stream: TcpStream,
    /// Bytes the kernel would not take yet.
    pending: BytesMut,
}

/// Writers own disjoint sets of sockets; each batch is written to every socket of its
/// channel with one non-blocking write per socket.
const SHARDS: usize = 2;
/// A socket further behind than this is dropped (it is not a floor's job to buffer).
const MAX_PENDING: usize = 16 << 20;

pub(crate) fn run(args: FloorArgs) -> anyhow::Result<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(main(args))
}

async fn main(args: FloorArgs) -> anyhow::Result<()> {
    let ws = TcpListener::bind(args.listen).await?;
    let control = TcpListener::bind(args.control).await?;
    eprintln!(
        "floor listening on {} (control {})",
        args.listen, args.control
    );
    let (batches, _) = broadcast::channel::<Batch>(65536);
    let mut shards = Vec::new();
    for _ in 0..SHARDS {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(String, TcpStream)>();
        tokio::spawn(shard(rx, batches.subscribe()));
        shards.push(tx);
    }
    let b = batches.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = control.accept().await {
            tokio::spawn(control_loop(stream, b.clone()));
        }
    });
    let redis = match &args.redis {
        Some(url) => Some(Arc::new(from_redis(url, batches.clone())?)),
        None => None,
    };
    let mut next = 0usize;
    loop {
        let stream = match ws.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                eprintln!("floor: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let shard = shards[next % SHARDS].clone();
        next += 1;
        let redis = redis.clone();
        tokio::spawn(async move {
            let interest = |channel: &ChannelName| redis.as_ref().map(|r| r.subscribe(channel));
            if let Ok((channel, stream)) = handshake(stream, interest).await {
                let _ = shard.send((channel, stream));
            }
        });
    }
}

async fn shard(
    mut new: tokio::sync::mpsc::UnboundedReceiver<(String, TcpStream)>,
    mut batches: broadcast::Receiver<Batch>,
) {
    let mut by_channel: HashMap<String, Vec<Conn>> = HashMap::new();
    let mut retry = tokio::time::interval(std::time::Duration::from_millis(1));
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            c = new.recv() => match c {
                Some((channel, stream)) => by_channel.entry(channel).or_default().push(Conn {
                    stream,
                    pending: BytesMut::new(),
                }),
                None => return,
            },
            b = batches.recv() => match b {
                Ok(batch) => {
                    for (channel, frames) in batch.iter() {
                        if let Some(conns) = by_channel.get_mut(channel) {
                            conns.retain_mut(|c| write(c, frames));
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = retry.tick() => {
                for conns in by_channel.values_mut() {
                    conns.retain_mut(|c| c.pending.is_empty() || write(c, &Bytes::new()));
                }
                // Notice clients that left (idle sockets are never written to).
                ticks += 1;
                if ticks.is_multiple_of(500) {
                    let mut sink = [0u8; 512];
                    for conns in by_channel.values_mut() {
                        conns.retain_mut(|c| match c.stream.try_read(&mut sink) {
                            Ok(0) => false,
                            Ok(_) => true,
                            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                        });
                    }
                }
            }
        }
    }
}

/// One non-blocking write of what is pending plus `frames`; false when the socket is
/// gone or hopelessly behind.
fn write(c: &mut Conn, frames: &Bytes) -> bool {
    if c.pending.is_empty() {
        match c.stream.try_write(frames) {
            Ok(n) if n == frames.len() => return true,
            Ok(n) => c.pending.extend_from_slice(&frames[n..]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                c.pending.extend_from_slice(frames)
            }
            Err(_) => return false,
        }
        return true;
    }
    c.pending.extend_from_slice(frames);
    match c.stream.try_write(&c.pending) {
        Ok(n) => {
            let _ = c.pending.split_to(n);
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(_) => return false,
    }
    c.pending.len() < MAX_PENDING
}

/// Herald's Redis broker, its received publications batched like the control socket's
/// lines: whatever is queued at once (up to 256) becomes one batch.
fn from_redis(url: &str, batches: broadcast::Sender<Batch>) -> anyhow::Result<RedisBroker> {
    let metrics = herald_metrics::Metrics::unregistered();
    let (inbound, mut received) = herald_broker::inbound(65536, metrics.clone());
    let broker = RedisBroker::start(
        RedisConfig {
            url: url.to_owned(),
            ..RedisConfig::default()
        },
        inbound,
        metrics,
    )?;
    tokio::spawn(async move {
        let mut buf = Vec::with_capacity(256);
        let mut grouped: HashMap<String, BytesMut> = HashMap::new();
        while received.recv_many(&mut buf, 256).await > 0 {
            for r in buf.drain(..) {
                if let Received::Publication(p) = r {
                    let frames = grouped.entry(p.channel.as_str().to_owned()).or_default();
                    push_publication(frames, &p);
                }
            }
            let batch: Vec<(String, Bytes)> =
                grouped.drain().map(|(c, b)| (c, b.freeze())).collect();
            let _ = batches.send(Arc::new(batch));
        }
    });
    Ok(broker)
}

/// Reads publications and broadcasts each read's worth, per channel, as one buffer of
/// concatenated frames: the batching that makes this a floor.
async fn control_loop(stream: TcpStream, batches: broadcast::Sender<Batch>) {
    let mut reader = BufReader::with_capacity(1 << 20, stream);
    let mut line = String::new();
    let mut grouped: HashMap<String, BytesMut> = HashMap::new();
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        push(&mut grouped, &line);
        // Take whatever else is already buffered into the same batch.
        while reader.buffer().contains(&b'\n') {
            line.clear();
            if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                break;
            }
            push(&mut grouped, &line);
        }
        let batch: Vec<(String, Bytes)> = grouped.drain().map(|(c, b)| (c, b.freeze())).collect();
        let _ = batches.send(Arc::new(batch));
    }
}

fn push(batches: &mut HashMap<String, BytesMut>, line: &str) {
    let Some((channel, data)) = line.trim_end().split_once('\t') else {
        return;
    };
    let Ok(name) = ChannelName::new(channel) else {
        return;
    };
    let p = Publication::now(name, Payload::Json(Bytes::copy_from_slice(data.as_bytes())));
    push_publication(batches.entry(channel.to_owned()).or_default(), &p);
}

fn push_publication(buf: &mut BytesMut, p: &Publication) {
    match server::encode_delivery(p) {
        server::Delivery::Text(text) => frame(buf, 0x1, text.as_bytes()),
        server::Delivery::Binary(b) => frame(buf, 0x2, &b),
    }
}

/// Appends an unmasked server frame.
fn frame(buf: &mut BytesMut, opcode: u8, payload: &[u8]) {
    buf.put_u8(0x80 | opcode);
    match payload.len() {
        n if n < 126 => buf.put_u8(n as u8),
        n if n <= u16::MAX as usize => {
            buf.put_u8(126);
            buf.put_u16(n as u16);
        }
        n => {
            buf.put_u8(127);
            buf.put_u64(n as u64);
        }
    }
    buf.put_slice(payload);
}

/// The HTTP upgrade, the welcome, and the subscribe; returns the channel. `interest`
/// tells the broker (if any) about the channel; the subscribe is acknowledged once the
/// broker has it.
async fn handshake(
    mut stream: TcpStream,
    interest: impl FnOnce(&ChannelName) -> Option<Ready>,
) -> anyhow::Result<(String, TcpStream)> {
    stream.set_nodelay(true)?;
    // HTTP upgrade.
    let mut req = Vec::with_capacity(512);
    let mut byte = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut byte).await?;
        anyhow::ensure!(n > 0, "closed during handshake");
        req.extend_from_slice(&byte[..n]);
    }
    let text = String::from_utf8_lossy(&req);
    let key = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| v.trim().to_owned())
        })
        .ok_or_else(|| anyhow::anyhow!("no key"))?;
    let mut out = BytesMut::new();
    out.put_slice(
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            derive_accept_key(key.as_bytes())
        )
        .as_bytes(),
    );
    frame(
        &mut out,
        0x1,
        server::welcome("floor", "0", None, 25_000, None).as_bytes(),
    );
    stream.write_all(&out).await?;
    // One client frame: the subscribe (masked, small).
    let payload = read_client_frame(&mut stream).await?;
    let (channel, id) = match client::parse_text(&Bytes::from(payload)) {
        Ok(client::Request::Subscribe { channel, id, .. }) => (channel, id),
        other => anyhow::bail!("expected a subscribe, got {other:?}"),
    };
    if let Some(ready) = interest(&channel) {
        anyhow::ensure!(
            ready.wait(std::time::Duration::from_secs(10)).await,
            "the broker did not subscribe {channel} in time"
        );
    }
    let mut ack = BytesMut::new();
    frame(
        &mut ack,
        0x1,
        server::ack(server::Ack::Subscribed, channel.as_str(), id).as_bytes(),
    );
    let channel = channel.as_str().to_owned();
    stream.write_all(&ack).await?;
    Ok((channel, stream))
}

async fn read_client_frame(stream: &mut TcpStream) -> anyhow::Result<Vec<u8>> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await?;
    let mut len = (head[1] & 0x7f) as usize;
    if len == 126 {
        let mut b = [0u8; 2];
        stream.read_exact(&mut b).await?;
        len = u16::from_be_bytes(b) as usize;
    } else if len == 127 {
        anyhow::bail!("subscribe frame too large");
    }
    let mut mask = [0u8; 4];
    if head[1] & 0x80 != 0 {
        stream.read_exact(&mut mask).await?;
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await?;
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    Ok(payload)
}
