//! The publishers: one per channel, publishing message 1, 2, ... through the HTTP API
//! of a node picked at random (nodes die under it), each message retried with the same
//! idempotency key until a node acknowledges it, and every attempt recorded with what
//! it was answered.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tokio::net::TcpStream;

use crate::record::{doc, now_ms, Attempt, Outcome, Payload, Sent};

/// What every publisher shares with the run.
#[derive(Default)]
pub(crate) struct Ledger {
    /// Every message sent, in the order each was finished.
    pub(crate) sent: Mutex<Vec<Sent>>,
    /// Replies the soak never provokes (a 400, a 500...): the checker's `unexpected`.
    pub(crate) unexpected: Mutex<Vec<String>>,
}

/// One channel's publisher.
pub(crate) struct Publisher {
    /// The channel.
    pub(crate) ch: String,
    /// The number the next message will get.
    pub(crate) next: Arc<AtomicU64>,
}

/// How long one message is retried before the publisher gives up on it.
const GIVE_UP: Duration = Duration::from_secs(30);
/// How long one attempt may take.
const ATTEMPT: Duration = Duration::from_secs(3);

impl Publisher {
    /// Publishes until `stop`, one message every `every`.
    pub(crate) async fn run(
        self,
        nodes: Vec<SocketAddr>,
        every: Duration,
        seed: u64,
        ledger: Arc<Ledger>,
        stop: Arc<AtomicBool>,
    ) {
        let mut rng = fastrand::Rng::with_seed(seed);
        while !stop.load(Ordering::Relaxed) {
            let m = self.next.fetch_add(1, Ordering::AcqRel);
            let key = format!("soak-{}-{m}", self.ch);
            let mut sent = Sent {
                ch: self.ch.clone(),
                m,
                attempts: Vec::new(),
            };
            let deadline = tokio::time::Instant::now() + GIVE_UP;
            let mut wait = Duration::from_millis(20);
            for a in 1.. {
                let node = nodes[rng.usize(..nodes.len())];
                let body = json!({
                    "channel": self.ch,
                    "data": Payload { m, a, doc: doc(&self.ch, m) },
                    "idempotency_key": key,
                });
                let start = now_ms();
                let outcome = attempt(node, body.to_string()).await;
                let outcome = match outcome {
                    Ok((200, reply)) => Outcome::Acked {
                        offset: reply["offset"].as_u64().unwrap_or(0),
                        duplicate: reply["duplicate"] == true,
                    },
                    Ok((503, _)) => Outcome::NotPublished(503),
                    Ok((504, _)) => Outcome::Unknown,
                    Ok((status, reply)) => {
                        ledger
                            .unexpected
                            .lock()
                            .expect("ledger")
                            .push(format!("{} m {m}: {status} {reply}", self.ch));
                        Outcome::NotPublished(status)
                    }
                    Err(sent_it) if sent_it => Outcome::Unknown,
                    Err(_) => Outcome::NotSent,
                };
                sent.attempts.push(Attempt { a, start, outcome });
                if matches!(outcome, Outcome::Acked { .. }) {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    // Given up. An attempt still in flight somewhere must land (or fail)
                    // before the next message goes out, or it could arrive after it.
                    tokio::time::sleep(ATTEMPT * 2).await;
                    break;
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(500));
            }
            ledger.sent.lock().expect("ledger").push(sent);
            tokio::time::sleep(every).await;
        }
    }
}

/// One `POST /api/publish` on a new connection: the status and JSON reply, or
/// `Err(sent)`: no reply, and whether the request may have left.
async fn attempt(node: SocketAddr, body: String) -> Result<(u16, Value), bool> {
    let connect = tokio::time::timeout(ATTEMPT, TcpStream::connect(node)).await;
    let Ok(Ok(stream)) = connect else {
        return Err(false);
    };
    let exchange = async {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method("POST")
            .uri("/api/publish")
            .header("host", node.to_string())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .ok()?;
        let resp = sender.send_request(req).await.ok()?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.ok()?.to_bytes();
        Some((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    };
    match tokio::time::timeout(ATTEMPT, exchange).await {
        Ok(Some(r)) => Ok(r),
        _ => Err(true),
    }
}
