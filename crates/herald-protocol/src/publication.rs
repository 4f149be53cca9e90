//! The unit a broker carries between nodes: one message for one channel.

use bytes::Bytes;

use crate::ChannelName;

/// What was published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A JSON value, as the publisher's exact bytes (already checked to be valid JSON).
    Json(Bytes),
    /// Opaque bytes, delivered in the binary frame layout.
    Binary(Bytes),
}

impl Payload {
    /// `text` as a JSON payload if it is one JSON value in UTF-8, with the whitespace
    /// around it trimmed (it is not part of the value, and the delivery frame stays
    /// compact); `None` otherwise. The value itself is kept byte for byte.
    pub fn json(text: Bytes) -> Option<Payload> {
        if std::str::from_utf8(&text).is_err()
            || serde_json::from_slice::<serde::de::IgnoredAny>(&text).is_err()
        {
            return None;
        }
        let start = text
            .iter()
            .position(|c| !c.is_ascii_whitespace())
            .unwrap_or(0);
        let end = text
            .iter()
            .rposition(|c| !c.is_ascii_whitespace())
            .map_or(start, |e| e + 1);
        Some(Payload::Json(text.slice(start..end)))
    }

    /// The payload's length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Payload::Json(b) | Payload::Binary(b) => b.len(),
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One message on one channel, as it travels from the publishing node to every node
/// that serves the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// Where it goes.
    pub channel: ChannelName,
    /// What it carries.
    pub payload: Payload,
    /// When the publishing node accepted it, in microseconds since the Unix epoch; `0`
    /// when unknown (e.g. published straight into a broker by a backend). Carried so
    /// that every node can measure end-to-end delivery lag.
    pub published_at_us: u64,
}

impl Publication {
    /// A publication stamped with the current time.
    pub fn now(channel: ChannelName, payload: Payload) -> Self {
        Publication {
            channel,
            payload,
            published_at_us: unix_micros(),
        }
    }
}

/// Microseconds since the Unix epoch, by the system clock.
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
