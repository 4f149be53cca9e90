//! What the soak's processes tell the checker: one JSON line per client event, in the
//! same shape from the Rust client groups and the JS client group; and what a
//! publisher learned of each attempt.

use serde::{Deserialize, Serialize};

/// One client event on one channel, as a client group prints it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Record {
    /// The client (unique across groups: `r12`, `n3`, `j40`).
    pub(crate) c: String,
    /// The channel.
    pub(crate) ch: String,
    /// When it happened: Unix milliseconds (every process reads the same clock).
    pub(crate) t: u64,
    /// What happened.
    pub(crate) k: Kind,
    /// For a message: the publication's number on its channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) m: Option<u64>,
    /// For a message: which attempt of the publisher carried it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) a: Option<u32>,
    /// For a message on a history channel: its offset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) o: Option<u64>,
    /// For a refusal: the server's code and message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) why: Option<String>,
}

/// The kinds of client events.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kind {
    /// The subscription was made (before the server confirmed it).
    Start,
    /// The server confirmed it (again, after a reconnect).
    Sub,
    /// A resume recovered everything missed.
    Rec,
    /// A resume could not recover everything (`recovered:false`): an announced gap.
    Lost,
    /// The stream restarted or a gap could not be filled: an announced gap.
    Reset,
    /// A publication.
    Msg,
    /// The subscribe was refused for good.
    Refused,
    /// The group stopped this client at the end of the run.
    End,
    /// A message whose data was not what its publisher sent (`why` says how): a delta
    /// rebuilt wrongly, or bytes changed on the way.
    Corrupt,
}

/// The payload every publication carries: which message and which attempt, and a
/// document ([`doc`]) that changes a little from one message to the next, so that
/// history channels (`delta = "fossil"`) send deltas to the clients that ask.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Payload {
    /// The message's number on its channel (1, 2, ...).
    pub(crate) m: u64,
    /// The attempt (1 for the first try; a retry is a new attempt of the same message,
    /// sent with the same idempotency key).
    pub(crate) a: u32,
    /// [`doc`] of the channel and `m`; clients check it (the JS group computes the same).
    pub(crate) doc: String,
}

/// Text the same for every message but for the channel and number in front.
const FILLER: &str = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. The five boxing wizards jump quickly; jackdaws love my big sphinx of quartz.";

/// The document message `m` on `ch` carries.
pub(crate) fn doc(ch: &str, m: u64) -> String {
    format!("{ch} #{m} {FILLER}")
}

/// What one publish attempt was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) enum Outcome {
    /// 200: published at `offset` (history channels), or a duplicate of an earlier
    /// attempt (`duplicate`: this attempt's payload was not stored).
    Acked {
        /// The offset the reply named (0 without history).
        offset: u64,
        /// The idempotency key was already known: nothing new was published.
        duplicate: bool,
    },
    /// An answer that says nothing was published (503 `unavailable`, 4xx).
    NotPublished(u16),
    /// No answer, or one that says the outcome is unknown (504): either may be true.
    Unknown,
    /// The connection could not be opened: the request never left.
    NotSent,
}

/// One publish attempt.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Attempt {
    /// Its number (see [`Payload::a`]).
    pub(crate) a: u32,
    /// When it was sent (Unix ms).
    pub(crate) start: u64,
    /// What came back.
    pub(crate) outcome: Outcome,
}

/// Every attempt of one message.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Sent {
    /// The channel.
    pub(crate) ch: String,
    /// The message's number.
    pub(crate) m: u64,
    /// In order.
    pub(crate) attempts: Vec<Attempt>,
}

impl Sent {
    /// The earliest moment the message can have been published: the first attempt that
    /// may have published it (acknowledged as new, or unknown; not one answered
    /// "nothing was published"). A client subscribed before this must get it.
    pub(crate) fn published_from(&self) -> u64 {
        self.attempts
            .iter()
            .find(|a| {
                matches!(
                    a.outcome,
                    Outcome::Unknown
                        | Outcome::Acked {
                            duplicate: false,
                            ..
                        }
                )
            })
            .or(self.attempts.last())
            .map_or(0, |a| a.start)
    }

    /// Whether some attempt was acknowledged.
    pub(crate) fn acked(&self) -> bool {
        self.attempts
            .iter()
            .any(|a| matches!(a.outcome, Outcome::Acked { .. }))
    }
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_what_the_js_group_prints() {
        let line = r#"{"c":"j1","ch":"h:0","t":5,"k":"msg","m":3,"a":1,"o":7}"#;
        let r: Record = serde_json::from_str(line).unwrap();
        assert_eq!((r.k, r.m, r.a, r.o), (Kind::Msg, Some(3), Some(1), Some(7)));
        let back = serde_json::to_string(&r).unwrap();
        assert_eq!(back, line);
        let r: Record = serde_json::from_str(r#"{"c":"j1","ch":"p:0","t":5,"k":"lost"}"#).unwrap();
        assert_eq!(r.k, Kind::Lost);
    }
}
