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
    /// Its place in the channel's stream, on channels with history (set by the broker
    /// that stored it); `None` on channels without history.
    pub position: Option<StreamPosition>,
}

impl Publication {
    /// A publication stamped with the current time, not yet in any stream.
    pub fn now(channel: ChannelName, payload: Payload) -> Self {
        Publication {
            channel,
            payload,
            published_at_us: unix_micros(),
            position: None,
        }
    }

    /// Its offset in the channel's stream, if it has one.
    pub fn offset(&self) -> Option<u64> {
        self.position.map(|p| p.offset)
    }
}

/// Identifies one run of a channel's offsets. It changes whenever the channel's history
/// is lost or reset (Redis restarted without persistence, keys evicted or expired, a
/// memory-broker node restarted), so that a client holding an offset of an earlier run
/// can tell that it cannot resume from it.
///
/// On the wire it is a string of 8 characters from `0-9a-z` (base 36); inside a
/// broker it is the number (below 36^8, which a Lua script handles exactly).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Epoch(u64);

impl Epoch {
    /// Epoch values are below this (36^8).
    pub const LIMIT: u64 = 2_821_109_907_456;

    /// Epochs of runs of offsets are below this (2^40); the values from here to
    /// [`Epoch::LIMIT`] are *start tokens* (see [`Epoch::start`]).
    pub const FIRST_START: u64 = 1 << 40;

    /// A start token counts time in ticks of this many minutes...
    const TICK_MINUTES: u64 = 8;
    /// ...modulo this (2^19 ticks: about 8 years).
    const TICKS: u64 = 1 << 19;
    /// Bits of the lineage's hash a start token keeps.
    const LINEAGE_BITS: u32 = 21;

    /// The epoch with this number, if it is in range.
    pub fn new(n: u64) -> Option<Epoch> {
        (n < Epoch::LIMIT).then_some(Epoch(n))
    }

    /// An epoch from 64 random bits: a run of offsets (never 0, never a start token).
    pub fn from_random(bits: u64) -> Epoch {
        Epoch(bits % (Epoch::FIRST_START - 1) + 1)
    }

    /// The start token of a read that found no stream: the channel has had no
    /// publication (or its history expired), and reading it creates nothing, so there is
    /// no epoch to name. The token names instead where the stream was read (`lineage`:
    /// the data's lineage, a hash of the Redis server run and replication id, or the
    /// memory broker's) and when (`minutes` since the Unix epoch), so that a resume from
    /// it can tell whether any epoch could have begun and been lost meanwhile (see
    /// [`Epoch::start_continues`]). 21 bits of the lineage and 19 of the time, in ticks of
    /// 8 minutes (the Redis script computes the same: scripts.rs).
    pub fn start(lineage: u64, minutes: u64) -> Epoch {
        let lineage = lineage % (1 << Epoch::LINEAGE_BITS);
        let ticks = minutes / Epoch::TICK_MINUTES % Epoch::TICKS;
        Epoch(Epoch::FIRST_START + lineage * Epoch::TICKS + ticks)
    }

    /// Whether this is a start token rather than the epoch of a run of offsets.
    pub fn is_start(self) -> bool {
        self.0 >= Epoch::FIRST_START
    }

    /// Whether every epoch that began after start token `self` was read is still there
    /// to be seen now (`now`: a start token of a read made now on the same stream):
    /// nothing can have begun and vanished in between when the data's lineage is the same
    /// (no restart, no failover) and less than `ttl` (the history's `meta_ttl`, after
    /// which an idle epoch expires) has passed. False for anything but two start tokens.
    pub fn start_continues(self, now: Epoch, ttl: std::time::Duration) -> bool {
        if !self.is_start() || !now.is_start() {
            return false;
        }
        let (a, b) = (self.0 - Epoch::FIRST_START, now.0 - Epoch::FIRST_START);
        if a / Epoch::TICKS != b / Epoch::TICKS {
            return false;
        }
        let elapsed = (b % Epoch::TICKS + Epoch::TICKS - a % Epoch::TICKS) % Epoch::TICKS;
        // A tick of slack for the boundaries (the read may have come just before one);
        // a clock that went back reads as almost 8 years.
        (elapsed + 1) * Epoch::TICK_MINUTES < ttl.as_secs() / 60
    }

    /// Its number.
    pub fn get(self) -> u64 {
        self.0
    }

    /// Parses the wire form (exactly 8 characters of `0-9a-z`).
    pub fn parse(s: &str) -> Option<Epoch> {
        if s.len() != 8 {
            return None;
        }
        let mut n = 0u64;
        for c in s.bytes() {
            let d = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'z' => c - b'a' + 10,
                _ => return None,
            };
            n = n * 36 + u64::from(d);
        }
        Epoch::new(n)
    }
}

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut buf = [b'0'; 8];
        let mut n = self.0;
        for slot in buf.iter_mut().rev() {
            let d = (n % 36) as u8;
            *slot = if d < 10 { b'0' + d } else { b'a' + d - 10 };
            n /= 36;
        }
        f.write_str(std::str::from_utf8(&buf).unwrap_or("00000000"))
    }
}

/// A place in a channel's stream: the offset of a publication (the first is 1; 0 is
/// "before the first") within an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamPosition {
    /// Publications so far in this epoch, i.e. the last one's offset.
    pub offset: u64,
    /// Which run of offsets.
    pub epoch: Epoch,
}

impl StreamPosition {
    /// Whether this is a *start*: offset 0 with a start token, before the first
    /// publication of a channel that had none when it was read. It belongs to every epoch.
    pub fn is_start(self) -> bool {
        self.offset == 0 && self.epoch.is_start()
    }

    /// This position seen from `epoch`: a start is offset 0 of any epoch; every other
    /// position is itself.
    pub fn in_epoch(self, epoch: Epoch) -> StreamPosition {
        if self.is_start() {
            StreamPosition { offset: 0, epoch }
        } else {
            self
        }
    }

    /// Whether the two are in one run of offsets (either may be the start).
    pub fn same_epoch(self, other: StreamPosition) -> bool {
        self.epoch == other.epoch || self.is_start() || other.is_start()
    }
}

/// Microseconds since the Unix epoch, by the system clock.
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_print_and_parse_back() {
        for n in [0, 1, 35, 36, Epoch::LIMIT - 1] {
            let e = Epoch::new(n).unwrap();
            let s = e.to_string();
            assert_eq!(s.len(), 8, "{s}");
            assert_eq!(Epoch::parse(&s), Some(e));
        }
        assert_eq!(Epoch::new(Epoch::LIMIT), None);
        assert_eq!(
            Epoch::parse("zzzzzzzz").map(Epoch::get),
            Some(Epoch::LIMIT - 1)
        );
        for bad in ["", "0000000", "000000000", "0000000A", "0000-000"] {
            assert_eq!(Epoch::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn start_tokens_are_apart_from_epochs_and_tell_what_may_have_been_lost() {
        for bits in [0, 1, u64::MAX, Epoch::FIRST_START - 1, Epoch::FIRST_START] {
            let e = Epoch::from_random(bits);
            assert!(e.get() >= 1 && !e.is_start(), "{e:?}");
        }
        let day = std::time::Duration::from_secs(86_400);
        let t = Epoch::start(0xabcdef, 29_500_000);
        assert!(t.is_start() && t.get() < Epoch::LIMIT);
        assert!(StreamPosition {
            offset: 0,
            epoch: t
        }
        .is_start());
        assert!(!StreamPosition {
            offset: 1,
            epoch: t
        }
        .is_start());
        // Same lineage, within the TTL: nothing can have come and gone.
        assert!(t.start_continues(Epoch::start(0xabcdef, 29_500_000), day));
        assert!(t.start_continues(Epoch::start(0xabcdef, 29_500_000 + 1000), day));
        // The data restarted or failed over, or an idle epoch could have expired.
        assert!(!t.start_continues(Epoch::start(0xabcdee, 29_500_000), day));
        assert!(!t.start_continues(Epoch::start(0xabcdef, 29_500_000 + 1439), day));
        assert!(!t.start_continues(Epoch::start(0xabcdef, 29_500_000 - 16), day));
        // Across the ticks' wrap.
        let w = Epoch::start(7, ((1 << 19) - 1) * 8);
        assert!(w.start_continues(Epoch::start(7, 8), day));
        // A TTL of one tick or less vouches for nothing.
        let short = std::time::Duration::from_secs(480);
        assert!(!t.start_continues(t, short));
        // Only tokens.
        assert!(!Epoch::new(5).unwrap().start_continues(t, day));
        assert!(!t.start_continues(Epoch::new(5).unwrap(), day));
        // A token round-trips through its wire form.
        assert_eq!(Epoch::parse(&t.to_string()), Some(t));
    }
}
