//! Presence in Redis: per channel, three keys in the channel's slot (one hash tag, so
//! Redis Cluster keeps them together and one script touches them atomically):
//!
//! - `{P+channel}.pm`, a hash: connection id → the member's JSON;
//! - `{P+channel}.pe`, a sorted set: connection id → when it expires (Unix ms);
//! - `{P+channel}.pu`, a hash: user → how many of its connections are present.
//!
//! Counts are kept, not scanned, so stats are two `HLEN`s at any size. Every node
//! adds its members again every refresh (which pushes their expiry on), so the members
//! of a node that died expire within the TTL; whichever node next sweeps the channel
//! removes them and announces the leaves. The keys themselves expire two TTLs after the
//! last add, so an abandoned channel leaves nothing behind. A script that runs twice
//! (a retry) does no harm: adding a member that is there, or removing one that is not,
//! changes nothing.

use std::time::Duration;

use herald_broker::{BrokerError, PresenceChange, PresencePage, PresenceStats};
use herald_protocol::presence::{self as wire, Member};
use herald_protocol::ChannelName;
use redis::Value;

use crate::publish::Redis;
use crate::scripts::{invoke, millis, now_ms, unavailable};
use crate::shared::Conn;

/// The three keys of `channel`'s presence.
fn keys(prefix: &str, channel: &ChannelName) -> [String; 3] {
    let tag = format!("{{{prefix}{channel}}}");
    [
        format!("{tag}.pm"),
        format!("{tag}.pe"),
        format!("{tag}.pu"),
    ]
}

async fn run(
    to: &Redis<'_>,
    script: &redis::Script,
    channel: &ChannelName,
    args: Vec<Vec<u8>>,
) -> Result<Value, BrokerError> {
    let mut inv = script.prepare_invoke();
    for k in keys(to.prefix, channel) {
        inv.key(k);
    }
    for a in args {
        inv.arg(a);
    }
    invoke(to.conn.clone(), &inv, to.timeout).await
}

/// Reads a script's flat `[member JSON, 0|1, ...]` answer.
fn changes(v: &Value) -> Result<Vec<PresenceChange>, BrokerError> {
    let bad = || BrokerError::Unavailable("Redis: unexpected presence answer".into());
    let Value::Array(items) = v else {
        return Err(bad());
    };
    items
        .chunks(2)
        .map(|pair| match pair {
            [Value::BulkString(m), Value::Int(edge)] => Ok(PresenceChange {
                member: Member::parse(m).ok_or_else(bad)?,
                user_edge: *edge == 1,
            }),
            _ => Err(bad()),
        })
        .collect()
}

pub(crate) async fn add(
    to: Redis<'_>,
    channel: &ChannelName,
    members: Vec<Member>,
    ttl: Duration,
) -> Result<Vec<PresenceChange>, BrokerError> {
    let mut args = vec![
        now_ms().to_string().into_bytes(),
        millis(ttl).max(1).to_string().into_bytes(),
    ];
    for m in &members {
        args.push(m.conn.clone().into_bytes());
        args.push(m.count_key().into_bytes());
        args.push(m.to_json().into_bytes());
    }
    let v = run(&to, &to.scripts.presence_add, channel, args).await?;
    changes(&v)
}

pub(crate) async fn remove(
    to: Redis<'_>,
    channel: &ChannelName,
    members: Vec<Member>,
) -> Result<Vec<PresenceChange>, BrokerError> {
    let mut args = vec![b"members".to_vec()];
    for m in &members {
        args.push(m.conn.clone().into_bytes());
        args.push(m.count_key().into_bytes());
        args.push(m.to_json().into_bytes());
    }
    let v = run(&to, &to.scripts.presence_remove, channel, args).await?;
    changes(&v)
}

pub(crate) async fn expire(
    to: Redis<'_>,
    channel: &ChannelName,
    limit: usize,
) -> Result<Vec<PresenceChange>, BrokerError> {
    let args = vec![
        b"expired".to_vec(),
        now_ms().to_string().into_bytes(),
        limit.max(1).to_string().into_bytes(),
    ];
    let v = run(&to, &to.scripts.presence_remove, channel, args).await?;
    changes(&v)
}

pub(crate) async fn stats(
    to: Redis<'_>,
    channel: &ChannelName,
) -> Result<PresenceStats, BrokerError> {
    let v = run(&to, &to.scripts.presence_stats, channel, Vec::new()).await?;
    match v {
        Value::Array(a) => match a.as_slice() {
            [Value::Int(c), Value::Int(u)] => Ok(PresenceStats {
                connections: (*c).max(0) as u64,
                users: (*u).max(0) as u64,
            }),
            _ => Err(BrokerError::Unavailable("Redis: unexpected stats".into())),
        },
        _ => Err(BrokerError::Unavailable("Redis: unexpected stats".into())),
    }
}

/// A page of the members hash, exactly `limit` long (or the rest). The cursor is
/// `SCAN:SKIP`: where `HSCAN` goes on, and how many of that batch were already given
/// (`HSCAN`'s `COUNT` is a hint: a small hash comes back whole, a page must not).
pub(crate) async fn page(
    to: Redis<'_>,
    channel: &ChannelName,
    cursor: Option<String>,
    limit: usize,
) -> Result<PresencePage, BrokerError> {
    let [members_key, _, _] = keys(to.prefix, channel);
    let limit = limit.max(1);
    let (mut scan, skip) = cursor
        .as_deref()
        .and_then(wire::parse_cursor)
        .unwrap_or((0, 0));
    let mut skip = skip as usize;
    let mut members = Vec::new();
    // Bounded: each round takes at least one entry or ends the scan.
    for _ in 0..1000 {
        let mut cmd = redis::cmd("HSCAN");
        cmd.arg(&members_key).arg(scan).arg("COUNT").arg(limit);
        let conn = to.conn.clone();
        let work = async {
            match conn {
                Conn::Single(mut c, _) => cmd.query_async::<(String, Vec<Vec<u8>>)>(&mut c).await,
                Conn::Cluster(mut c) => cmd.query_async::<(String, Vec<Vec<u8>>)>(&mut c).await,
            }
        };
        let (next, flat) = match tokio::time::timeout(to.timeout, work).await {
            Ok(r) => r.map_err(unavailable)?,
            Err(_) => return Err(BrokerError::Timeout),
        };
        let batch: Vec<Member> = flat
            .chunks(2)
            .filter_map(|kv| kv.get(1).and_then(|m| Member::parse(m)))
            .collect();
        let want = limit - members.len();
        let rest = batch.len().saturating_sub(skip);
        if rest > want {
            members.extend(batch.into_iter().skip(skip).take(want));
            return Ok(PresencePage {
                members,
                cursor: Some(wire::cursor(scan, (skip + want) as u64)),
            });
        }
        members.extend(batch.into_iter().skip(skip));
        skip = 0;
        scan = next.parse().unwrap_or(0);
        if scan == 0 {
            return Ok(PresencePage {
                members,
                cursor: None,
            });
        }
        if members.len() == limit {
            return Ok(PresencePage {
                members,
                cursor: Some(wire::cursor(scan, 0)),
            });
        }
    }
    Ok(PresencePage {
        members,
        cursor: Some(wire::cursor(scan, skip as u64)),
    })
}
