//! Presence: who is in a channel. A member is one connection (its user, its id and the
//! `info` its token carried); the frames and bodies that carry members, and the
//! member's JSON as brokers store it (the same object clients receive).
//!
//! ```text
//! client:  {"op":"presence","channel":C,"id":N[,"cursor":K]}
//! server:  {"op":"presence","channel":C,"id":N,"members":[{"user":U,"conn":X,"info":I}, ...][,"cursor":K]}
//! client:  {"op":"presence_stats","channel":C,"id":N}
//! server:  {"op":"presence_stats","channel":C,"id":N,"connections":N,"users":N}
//! pushed:  {"op":"join"|"leave","channel":C,"user":U,"conn":X[,"info":I]}
//! HTTP:    GET /api/presence/{channel}?cursor=K&limit=N → {"members":[..][,"cursor":K]}
//!          GET /api/presence_stats/{channel}            → {"connections":N,"users":N}
//! ```

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::api::BodyError;
use crate::server::json_string;
use crate::ErrorCode;

/// One connection present in a channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// The token's `sub` (empty for an anonymous connection).
    pub user: String,
    /// The connection's id, as its welcome frame announced it.
    pub conn: String,
    /// The token's `info` claim (or the subscription token's), never the client's word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
}

impl Member {
    /// The member as JSON: `{"user":U,"conn":X[,"info":I]}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("members serialize")
    }

    /// The key the member counts under in a channel's per-user counts: its user, or
    /// for an anonymous connection itself (each counts as a user); the prefixes keep a
    /// user named like a connection apart from it. Brokers keep the counts; Redis's
    /// presence script derives the same key from a stored member.
    pub fn count_key(&self) -> String {
        if self.user.is_empty() {
            format!("c:{}", self.conn)
        } else {
            format!("u:{}", self.user)
        }
    }

    /// Reads a member's JSON (as a broker stored it).
    pub fn parse(json: &[u8]) -> Option<Member> {
        serde_json::from_slice(json).ok()
    }
}

/// A presence page's cursor: `SCAN:SKIP` (where the broker's scan goes on, and how
/// many of that batch were already given). Brokers make and read it; the gateway
/// refuses anything else before a broker sees it.
pub fn cursor(scan: u64, skip: u64) -> String {
    format!("{scan}:{skip}")
}

/// Reads a cursor made by [`cursor`]; `None` for anything else.
pub fn parse_cursor(cursor: &str) -> Option<(u64, u64)> {
    let (scan, skip) = cursor.split_once(':')?;
    Some((scan.parse().ok()?, skip.parse().ok()?))
}

fn members_json(members: &[Member]) -> String {
    serde_json::to_string(members).expect("members serialize")
}

/// The reply to `presence`: one page of members, and the cursor of the next page when
/// there is one.
pub fn page_frame(
    channel: &str,
    id: Option<u64>,
    members: &[Member],
    cursor: Option<&str>,
) -> String {
    let mut s = format!(r#"{{"op":"presence","channel":{}"#, json_string(channel));
    if let Some(id) = id {
        let _ = write!(s, r#","id":{id}"#);
    }
    let _ = write!(s, r#","members":{}"#, members_json(members));
    if let Some(c) = cursor {
        let _ = write!(s, r#","cursor":{}"#, json_string(c));
    }
    s.push('}');
    s
}

/// The reply to `presence_stats`.
pub fn stats_frame(channel: &str, id: Option<u64>, connections: u64, users: u64) -> String {
    let mut s = format!(
        r#"{{"op":"presence_stats","channel":{}"#,
        json_string(channel)
    );
    if let Some(id) = id {
        let _ = write!(s, r#","id":{id}"#);
    }
    let _ = write!(s, r#","connections":{connections},"users":{users}}}"#);
    s
}

/// A pushed `join` (or `leave`) frame.
pub fn event_frame(join: bool, channel: &str, member: &Member) -> String {
    let op = if join { "join" } else { "leave" };
    let mut s = format!(
        r#"{{"op":"{op}","channel":{},"user":{},"conn":{}"#,
        json_string(channel),
        json_string(&member.user),
        json_string(&member.conn)
    );
    if let Some(info) = &member.info {
        let _ = write!(s, r#","info":{info}"#);
    }
    s.push('}');
    s
}

/// Reads a pushed `join`/`leave` frame: whether it is a join, the channel, the member.
pub fn parse_event(text: &str) -> Option<(bool, String, Member)> {
    #[derive(Deserialize)]
    struct Event {
        op: String,
        channel: String,
        #[serde(flatten)]
        member: Member,
    }
    let e: Event = serde_json::from_str(text).ok()?;
    let join = match e.op.as_str() {
        "join" => true,
        "leave" => false,
        _ => return None,
    };
    Some((join, e.channel, e.member))
}

/// `GET /api/presence/{channel}`'s reply.
pub fn page_body(members: &[Member], cursor: Option<&str>) -> String {
    let mut s = format!(r#"{{"members":{}"#, members_json(members));
    if let Some(c) = cursor {
        let _ = write!(s, r#","cursor":{}"#, json_string(c));
    }
    s.push('}');
    s
}

/// `GET /api/presence_stats/{channel}`'s reply.
pub fn stats_body(connections: u64, users: u64) -> String {
    format!(r#"{{"connections":{connections},"users":{users}}}"#)
}

/// `GET /api/presence/{channel}?cursor=K&limit=N`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PageQuery {
    /// The previous page's `cursor`.
    pub cursor: Option<String>,
    /// At most this many (the server caps it at `presence.page_size`).
    pub limit: Option<usize>,
}

/// Parses `GET /api/presence/{channel}`'s query string.
pub fn parse_page_query(query: &str) -> Result<PageQuery, BodyError> {
    let mut q = PageQuery::default();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "cursor" => q.cursor = Some(v.into_owned()),
            "limit" => {
                q.limit = Some(v.parse().ok().filter(|n| *n > 0).ok_or_else(|| BodyError {
                    code: ErrorCode::BadRequest,
                    message: "limit: expected a count above 0".into(),
                })?)
            }
            other => {
                return Err(BodyError {
                    code: ErrorCode::BadRequest,
                    message: format!("unknown parameter {other:?} (cursor, limit)"),
                })
            }
        }
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_json_with_what_they_say() {
        let m = Member {
            user: "ann".into(),
            conn: "n1-2".into(),
            info: Some(serde_json::json!({"name": "Ann \"A\""})),
        };
        assert_eq!(Member::parse(m.to_json().as_bytes()), Some(m.clone()));
        let v: serde_json::Value = serde_json::from_str(&page_frame(
            "room",
            Some(3),
            std::slice::from_ref(&m),
            Some("17"),
        ))
        .unwrap();
        assert_eq!(v["members"][0]["info"]["name"], "Ann \"A\"");
        assert_eq!(
            (v["id"].as_u64(), v["cursor"].as_str()),
            (Some(3), Some("17"))
        );
        assert_eq!(
            parse_event(&event_frame(true, "room", &m)),
            Some((true, "room".into(), m.clone()))
        );
        let v: serde_json::Value = serde_json::from_str(&event_frame(false, "room", &m)).unwrap();
        assert_eq!(
            (v["op"].as_str(), v["conn"].as_str()),
            (Some("leave"), Some("n1-2"))
        );
        let v: serde_json::Value = serde_json::from_str(&stats_frame("room", None, 3, 2)).unwrap();
        assert_eq!(
            (v["connections"].as_u64(), v["users"].as_u64()),
            (Some(3), Some(2))
        );
        assert!(v.get("id").is_none());
    }
}
