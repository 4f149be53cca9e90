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
use herald_protocol::presence::Member;
use herald_protocol::ChannelName;
use redis::Value;

use crate::publish::Redis;
use crate::scripts::{millis, unavailable};
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

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
    let conn = to.conn.clone();
    let work = async {
        match conn {
            Conn::Single(mut c, _) => inv.invoke_async::<Value>(&mut c).await,
            Conn::Cluster(mut c) => inv.invoke_async::<Value>(&mut c).await,
        }
    };
    match tokio::time::timeout(to.timeout, work).await {
        Ok(r) => r.map_err(unavailable),
        Err(_) => Err(BrokerError::Timeout),
    }
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
        // Anonymous connections count as a user each (their `user` is empty).
        let counted = if m.user.is_empty() { &m.conn } else { &m.user };
        args.push(counted.clone().into_bytes());
        args.push(m.to_json().into_bytes());
    }
    let v = run(&to, &to.scripts.presence_add, channel, args).await?;
    changes(&v)
}

pub(crate) async fn remove(
    to: Redis<'_>,
    channel: &ChannelName,
    conns: Vec<String>,
) -> Result<Vec<PresenceChange>, BrokerError> {
    let args = std::iter::once(b"conns".to_vec())
        .chain(conns.into_iter().map(String::into_bytes))
        .collect();
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

/// One `HSCAN` of the members hash: about `limit` members (`COUNT` is a hint Redis may
/// exceed a little on small hashes), and the cursor to go on with.
pub(crate) async fn page(
    to: Redis<'_>,
    channel: &ChannelName,
    cursor: Option<String>,
    limit: usize,
) -> Result<PresencePage, BrokerError> {
    let [members_key, _, _] = keys(to.prefix, channel);
    let start: u64 = cursor.as_deref().and_then(|c| c.parse().ok()).unwrap_or(0);
    let mut cmd = redis::cmd("HSCAN");
    cmd.arg(&members_key)
        .arg(start)
        .arg("COUNT")
        .arg(limit.max(1));
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
    let members = flat
        .chunks(2)
        .filter_map(|kv| kv.get(1).and_then(|m| Member::parse(m)))
        .collect();
    Ok(PresencePage {
        members,
        cursor: (next != "0").then_some(next),
    })
}
