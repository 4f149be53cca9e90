//! Channel occupancy and the webhook queue in Redis, under one hash tag (one slot in
//! Redis Cluster, so one script decides atomically):
//!
//! - `{P webhooks}.n`, a hash: channel → how many nodes have local subscribers;
//! - `{P webhooks}.x`, a sorted set: `node \n channel` → when the entry expires (Unix
//!   ms); nodes set their entries again every refresh, so a dead node's expire;
//! - `{P webhooks}.q`, a stream: the events waiting, each `e` = its record
//!   ([`herald_protocol::webhook`]), read through the consumer group `herald` (one
//!   consumer per node), acknowledged and deleted when done;
//! - `{P webhooks}.l`, the lease: which node delivers now (one at a time, so events
//!   arrive in order). It renews it while it works; when it dies, the next node to
//!   find the lease free takes it and every event the dead one had not finished.
//!
//! The stream holds only outstanding events, so its length is the queue's: past
//! `max`, a new event is dropped (and counted) instead of queued. Occupancy is one
//! key pair for the whole cluster: its changes are rare (a channel's first subscriber
//! on a node, its last), so one slot carries them; a cluster with very many channels
//! opening and closing per second should leave the occupancy events off.

use std::time::Duration;

use herald_broker::{BrokerError, Occupancy, Queued, WebhookEvent, WebhookQueue};
use herald_protocol::ChannelName;
use redis::Value;

use crate::publish::Redis;
use crate::scripts::{invoke, millis, now_ms};

/// The four keys.
fn keys(prefix: &str) -> [String; 4] {
    let tag = format!("{{{prefix}webhooks}}");
    ["n", "x", "q", "l"].map(|k| format!("{tag}.{k}"))
}

async fn run(
    to: &Redis<'_>,
    script: &redis::Script,
    args: Vec<Vec<u8>>,
) -> Result<Value, BrokerError> {
    let mut inv = script.prepare_invoke();
    for k in keys(to.prefix) {
        inv.key(k);
    }
    for a in args {
        inv.arg(a);
    }
    invoke(to.conn.clone(), &inv, to.timeout).await
}

fn queued(v: &Value) -> Result<Queued, BrokerError> {
    match v {
        Value::Array(a) => match a.as_slice() {
            [Value::Int(q), Value::Int(d)] => Ok(Queued {
                queued: (*q).max(0) as u64,
                dropped: (*d).max(0) as u64,
            }),
            _ => Err(BrokerError::Unavailable(
                "Redis: unexpected occupancy answer".into(),
            )),
        },
        _ => Err(BrokerError::Unavailable(
            "Redis: unexpected occupancy answer".into(),
        )),
    }
}

/// Reads the occupancy script's answer.
fn occupancy_answer(v: &Value) -> Result<Occupancy, BrokerError> {
    let bad = || BrokerError::Unavailable("Redis: unexpected occupancy answer".into());
    let Value::Array(a) = v else {
        return Err(bad());
    };
    let n = |i: usize| match a.get(i) {
        Some(Value::Int(n)) => Ok((*n).max(0) as u64),
        _ => Err(bad()),
    };
    let swept = a
        .get(5..)
        .unwrap_or_default()
        .iter()
        .map(|c| match c {
            Value::BulkString(b) => {
                ChannelName::new(&String::from_utf8_lossy(b)).map_err(|_| bad())
            }
            _ => Err(bad()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Occupancy {
        occupied: Queued {
            queued: n(0)?,
            dropped: n(1)?,
        },
        vacated: Queued {
            queued: n(2)?,
            dropped: n(3)?,
        },
        more: n(4)? == 1,
        swept,
    })
}

fn head(node: &str, ttl: Duration, queue: WebhookQueue, mode: &str) -> Vec<Vec<u8>> {
    vec![
        now_ms().to_string().into_bytes(),
        millis(ttl).to_string().into_bytes(),
        queue.max.to_string().into_bytes(),
        mode.as_bytes().to_vec(),
        node.as_bytes().to_vec(),
    ]
}

pub(crate) async fn occupancy(
    to: Redis<'_>,
    node: &str,
    changes: Vec<(ChannelName, bool)>,
    ttl: Duration,
    queue: WebhookQueue,
) -> Result<Occupancy, BrokerError> {
    let mut args = head(node, ttl, queue, "set");
    for (channel, on) in changes {
        args.push(channel.as_str().as_bytes().to_vec());
        args.push(if on { b"1".to_vec() } else { b"0".to_vec() });
    }
    occupancy_answer(&run(&to, &to.scripts.occupancy, args).await?)
}

pub(crate) async fn refresh(
    to: Redis<'_>,
    node: &str,
    channels: Vec<ChannelName>,
    ttl: Duration,
    queue: WebhookQueue,
) -> Result<Occupancy, BrokerError> {
    let mut args = head(node, ttl, queue, "refresh");
    args.extend(channels.iter().map(|c| c.as_str().as_bytes().to_vec()));
    occupancy_answer(&run(&to, &to.scripts.occupancy, args).await?)
}

pub(crate) async fn enqueue(
    to: Redis<'_>,
    events: Vec<String>,
    queue: WebhookQueue,
) -> Result<Queued, BrokerError> {
    let mut args = vec![queue.max.to_string().into_bytes()];
    args.extend(events.into_iter().map(String::into_bytes));
    queued(&run(&to, &to.scripts.webhook_queue, args).await?)
}

/// The events taken (none while another consumer holds the lease), and whether the
/// queue had to be created: after this node had seen it, Redis lost it with every
/// event in it (a restart without its data).
pub(crate) async fn take(
    to: Redis<'_>,
    consumer: &str,
    max: usize,
    queue: WebhookQueue,
) -> Result<(Option<Vec<WebhookEvent>>, bool), BrokerError> {
    let args = vec![
        consumer.as_bytes().to_vec(),
        max.to_string().into_bytes(),
        millis(queue.lease).to_string().into_bytes(),
    ];
    let v = run(&to, &to.scripts.webhook_take, args).await?;
    let bad = || BrokerError::Unavailable("Redis: unexpected webhook answer".into());
    let Value::Array(all) = v else {
        return Err(bad());
    };
    let [Value::Int(holds), Value::Int(created), flat @ ..] = all.as_slice() else {
        return Err(bad());
    };
    let created = *created == 1;
    if *holds == 0 {
        return Ok((None, created));
    }
    flat.chunks(3)
        .map(|e| match e {
            [Value::BulkString(id), Value::BulkString(json), Value::Int(retaken)] => {
                Ok(WebhookEvent {
                    id: String::from_utf8_lossy(id).into_owned(),
                    json: String::from_utf8_lossy(json).into_owned(),
                    retakes: (*retaken).max(0) as u64,
                })
            }
            _ => Err(bad()),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(|events| (Some(events), created))
}

pub(crate) async fn done(to: Redis<'_>, ids: Vec<String>) -> Result<(), BrokerError> {
    if ids.is_empty() {
        return Ok(());
    }
    run(
        &to,
        &to.scripts.webhook_done,
        ids.into_iter().map(String::into_bytes).collect(),
    )
    .await
    .map(drop)
}
