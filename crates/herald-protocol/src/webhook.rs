//! Webhooks (`[webhooks]`): the events a cluster tells the application's backend about.
//!
//! A broker queues each event as a *record*, a JSON object without an id; the node that
//! delivers it POSTs [`body`]: the record with the queue's id for the event first, so
//! that a backend receiving it twice (delivery is at least once) can tell.
//!
//! ```json
//! {"id":"1733312345678-0","event":"channel_vacated","channel":"news","time_ms":1733312345678}
//! {"id":"1733312345679-0","event":"join","channel":"room:1","member":{"user":"42","conn":"web-1-3fa2b1c0-2a"},"time_ms":1733312345679}
//! ```

use crate::presence::Member;
use crate::server::json_string;

/// An event a backend can ask for (`[webhooks] events`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    /// A channel got its first subscriber anywhere in the cluster.
    ChannelOccupied,
    /// A channel lost its last subscriber everywhere in the cluster.
    ChannelVacated,
    /// A user (or connection, per the rule) joined a presence channel.
    Join,
    /// ... and left it.
    Leave,
}

impl Event {
    /// Every event, in the order the documentation lists them.
    pub const ALL: [Event; 4] = [
        Event::ChannelOccupied,
        Event::ChannelVacated,
        Event::Join,
        Event::Leave,
    ];

    /// Its name in `[webhooks] events` and in bodies.
    pub fn name(self) -> &'static str {
        match self {
            Event::ChannelOccupied => "channel_occupied",
            Event::ChannelVacated => "channel_vacated",
            Event::Join => "join",
            Event::Leave => "leave",
        }
    }

    /// The event named `name`.
    pub fn parse(name: &str) -> Option<Event> {
        Event::ALL.into_iter().find(|e| e.name() == name)
    }
}

/// The record of `channel_occupied` / `channel_vacated` for `channel` at `time_ms`
/// (Unix ms). The Redis broker's occupancy script writes the same bytes.
pub fn occupancy(occupied: bool, channel: &str, time_ms: u64) -> String {
    let event = if occupied {
        Event::ChannelOccupied
    } else {
        Event::ChannelVacated
    };
    // Channel names need no JSON escaping (see `channel`).
    format!(
        r#"{{"event":"{}","channel":"{channel}","time_ms":{time_ms}}}"#,
        event.name()
    )
}

/// The record of `member` joining (or leaving) `channel` at `time_ms`.
pub fn presence(join: bool, channel: &str, member: &Member, time_ms: u64) -> String {
    let event = if join { Event::Join } else { Event::Leave };
    format!(
        r#"{{"event":"{}","channel":{},"member":{},"time_ms":{time_ms}}}"#,
        event.name(),
        json_string(channel),
        member.to_json()
    )
}

/// The body POSTed for the record `record` queued as `id`: the record's fields after
/// `"id"`. `None` when the record is not a JSON object (a corrupt queue entry).
pub fn body(id: &str, record: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(record).ok()?;
    let fields = v.as_object()?;
    let mut out = format!(r#"{{"id":{}"#, json_string(id));
    for (k, v) in fields {
        if k != "id" {
            out.push(',');
            out.push_str(&json_string(k));
            out.push(':');
            out.push_str(&v.to_string());
        }
    }
    out.push('}');
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_the_id_first_and_the_record() {
        let r = occupancy(false, "news:a", 17);
        assert_eq!(
            r,
            r#"{"event":"channel_vacated","channel":"news:a","time_ms":17}"#
        );
        let b = body("5-0", &r).unwrap();
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert!(b.starts_with(r#"{"id":"5-0","#), "{b}");
        assert_eq!(
            (
                v["event"].as_str(),
                v["channel"].as_str(),
                v["time_ms"].as_u64()
            ),
            (Some("channel_vacated"), Some("news:a"), Some(17))
        );
        let m = Member {
            user: "a\"b".into(),
            conn: "c1".into(),
            info: Some(serde_json::json!({"n": 1})),
        };
        let v: serde_json::Value =
            serde_json::from_str(&body("1", &presence(true, "room", &m, 3)).unwrap()).unwrap();
        assert_eq!(
            (
                v["event"].as_str(),
                v["member"]["user"].as_str(),
                v["member"]["info"]["n"].as_u64()
            ),
            (Some("join"), Some("a\"b"), Some(1))
        );
        assert!(body("1", "[1]").is_none());
        assert!(body("1", "nope").is_none());
        assert_eq!(Event::parse("leave"), Some(Event::Leave));
        assert_eq!(Event::parse("Leave"), None);
    }
}
