//! Channel names and publish-permission patterns.
//!
//! A channel name is 1 to 255 bytes drawn from `A-Z a-z 0-9 _ - . : @ /`. The limit of
//! 255 lets the binary frame layout carry the name's length in one byte, and the
//! character set keeps names safe to embed in Redis keys, URLs and log lines unescaped.

use std::fmt;
use std::sync::Arc;

/// The longest channel name, in bytes.
pub const MAX_LEN: usize = 255;

/// Why a string is not a channel name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidChannel {
    /// The name is empty.
    #[error("channel name is empty")]
    Empty,
    /// The name is longer than [`MAX_LEN`] bytes.
    #[error("channel name is {0} bytes; the limit is 255")]
    TooLong(usize),
    /// The name holds a byte outside the allowed set.
    #[error("channel name has a character outside A-Z a-z 0-9 _ - . : @ /")]
    BadCharacter,
}

/// Whether `b` may appear in a channel name.
#[inline]
pub fn is_channel_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@' | b'/')
}

/// Checks `name` against the channel-name rules.
pub fn validate(name: &[u8]) -> Result<(), InvalidChannel> {
    if name.is_empty() {
        return Err(InvalidChannel::Empty);
    }
    if name.len() > MAX_LEN {
        return Err(InvalidChannel::TooLong(name.len()));
    }
    if !name.iter().all(|&b| is_channel_byte(b)) {
        return Err(InvalidChannel::BadCharacter);
    }
    Ok(())
}

/// A validated channel name. Cheap to clone: the hub and every queue share one allocation.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(Arc<str>);

impl ChannelName {
    /// Validates `name` and wraps it.
    pub fn new(name: &str) -> Result<Self, InvalidChannel> {
        validate(name.as_bytes())?;
        Ok(ChannelName(Arc::from(name)))
    }

    /// Validates raw bytes (e.g. from a binary frame) and wraps them.
    pub fn from_bytes(name: &[u8]) -> Result<Self, InvalidChannel> {
        validate(name)?;
        // Validation admits ASCII only, so this cannot fail.
        let s = std::str::from_utf8(name).map_err(|_| InvalidChannel::BadCharacter)?;
        Ok(ChannelName(Arc::from(s)))
    }

    /// A node-internal channel (`$herald.control`, `$herald.reply.N`): the `$` no client,
    /// API caller or rule can use keeps these apart from every channel users name.
    /// `name` is what follows the `$`, from the channel-name alphabet.
    pub fn internal(name: &str) -> Result<Self, InvalidChannel> {
        validate(name.as_bytes())?;
        Ok(ChannelName(Arc::from(format!("${name}"))))
    }

    /// Like [`ChannelName::from_bytes`], but also admits an internal name (as it comes
    /// back from a broker).
    pub fn from_bytes_or_internal(name: &[u8]) -> Result<Self, InvalidChannel> {
        match name.strip_prefix(b"$") {
            Some(rest) => {
                Self::internal(std::str::from_utf8(rest).map_err(|_| InvalidChannel::BadCharacter)?)
            }
            None => Self::from_bytes(name),
        }
    }

    /// Whether this is a node-internal channel (see [`ChannelName::internal`]).
    pub fn is_internal(&self) -> bool {
        self.0.starts_with('$')
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for ChannelName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// One channel pattern: an exact channel name, or a prefix followed by a single trailing
/// `*` (`news:*`; a lone `*` matches every channel). In configuration it is a string.
///
/// A rule's pattern may also hold one `{sub}` placeholder (`user:{sub}:*`): it stands for
/// one or more channel characters when a channel is matched against the rule
/// ([`ChannelPattern::matches`]), and for exactly the connection's user id when a
/// permission is checked ([`ChannelPattern::matches_user`]). That is how one rule gives
/// every user a personal namespace.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct ChannelPattern {
    /// The pattern as written.
    written: String,
    /// Whether it ends in `*` (then `written` minus the `*` is a prefix).
    prefix: bool,
    /// Where `{sub}` starts in `written`, if it holds one.
    sub: Option<usize>,
}

/// The user-id placeholder of a rule pattern.
const SUB: &str = "{sub}";

impl ChannelPattern {
    /// Parses a pattern.
    pub fn new(p: &str) -> Result<Self, InvalidPattern> {
        let bad = || InvalidPattern {
            pattern: p.to_owned(),
            why: NOT_A_PATTERN,
        };
        let sub = p.find(SUB);
        // `{sub}` is a whole segment: what follows it ends the segment, so that user
        // `4` never reads `dm.42` and user `alice` never reads `alice:x`'s channels.
        if let Some(i) = sub {
            match p[i + SUB.len()..].chars().next() {
                None => {}
                Some(c) if SEGMENT_ENDS.contains(&c) => {}
                Some(_) => {
                    return Err(InvalidPattern {
                        pattern: p.to_owned(),
                        why: "{sub} must end the pattern or be followed by one of : . / - _ @ \
                              ({sub}* would let user 4 read user 42's channels; write {sub}:*)",
                    })
                }
            }
        }
        // The pattern without its placeholder must be an ordinary pattern.
        let plain = match sub {
            Some(i) => format!("{}x{}", &p[..i], &p[i + SUB.len()..]),
            None => p.to_owned(),
        };
        let prefix = match plain.strip_suffix('*') {
            Some(head) => {
                if !head.bytes().all(is_channel_byte) || head.len() >= MAX_LEN {
                    return Err(bad());
                }
                true
            }
            None => {
                validate(plain.as_bytes()).map_err(|_| bad())?;
                false
            }
        };
        Ok(ChannelPattern {
            written: p.to_owned(),
            prefix,
            sub,
        })
    }

    /// The parts around `{sub}` (the second without the trailing `*`).
    fn parts(&self) -> (&str, &str) {
        let body = if self.prefix {
            &self.written[..self.written.len() - 1]
        } else {
            &self.written[..]
        };
        match self.sub {
            Some(i) => (&body[..i], &body[i + SUB.len()..]),
            None => (body, ""),
        }
    }

    /// Whether `channel` matches, `{sub}` standing for one or more characters.
    pub fn matches(&self, channel: &str) -> bool {
        let (head, tail) = self.parts();
        let Some(rest) = channel.strip_prefix(head) else {
            return false;
        };
        match (self.sub.is_some(), self.prefix) {
            (false, true) => true,
            (false, false) => rest.is_empty(),
            // At least one character for `{sub}`, then the tail somewhere after it.
            (true, true) => {
                let first = rest.chars().next().map_or(0, char::len_utf8);
                rest.len() > tail.len() && rest[first..].contains(tail)
            }
            (true, false) => rest.len() > tail.len() && rest.ends_with(tail),
        }
    }

    /// Whether `channel` matches with `{sub}` replaced by `user` (without `{sub}`, the
    /// same as [`ChannelPattern::matches`]). A user id holding the character that ends
    /// the `{sub}` segment (or `*`) matches nothing: its channels would overlap
    /// another user's.
    pub fn matches_user(&self, channel: &str, user: &str) -> bool {
        if self.sub.is_none() {
            return self.matches(channel);
        }
        let (head, tail) = self.parts();
        let ends = tail.chars().next();
        if user.contains('*') || ends.is_some_and(|c| user.contains(c)) {
            return false;
        }
        let rest = channel
            .strip_prefix(head)
            .and_then(|r| r.strip_prefix(user))
            .filter(|_| !user.is_empty());
        match rest {
            Some(r) if self.prefix => r.starts_with(tail),
            Some(r) => r == tail,
            None => false,
        }
    }

    /// Whether the pattern holds `{sub}`.
    pub fn has_user(&self) -> bool {
        self.sub.is_some()
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.written
    }
}

impl TryFrom<String> for ChannelPattern {
    type Error = InvalidPattern;

    fn try_from(s: String) -> Result<Self, InvalidPattern> {
        ChannelPattern::new(&s)
    }
}

impl From<ChannelPattern> for String {
    fn from(p: ChannelPattern) -> String {
        p.written
    }
}

/// A set of channel patterns, e.g. the channels clients may publish to.
///
/// A pattern is either an exact channel name, or a prefix followed by a single trailing
/// `*` that matches any rest (`chat:*` matches `chat:lobby`; a lone `*` matches every
/// channel). An empty set matches nothing.
///
/// In configuration it is a list of strings, checked when it is read, so code that
/// holds a `ChannelPatterns` never parses it again.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct ChannelPatterns {
    exact: Vec<String>,
    prefixes: Vec<String>,
    /// The patterns as written, for printing the configuration back.
    written: Vec<String>,
}

impl TryFrom<Vec<String>> for ChannelPatterns {
    type Error = InvalidPattern;

    fn try_from(v: Vec<String>) -> Result<Self, InvalidPattern> {
        ChannelPatterns::new(v)
    }
}

impl From<ChannelPatterns> for Vec<String> {
    fn from(p: ChannelPatterns) -> Vec<String> {
        p.written
    }
}

/// A pattern that is neither a channel name nor a channel-name prefix followed by `*`,
/// or whose `{sub}` is not a whole segment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid channel pattern {pattern:?}: {why}")]
pub struct InvalidPattern {
    /// The offending pattern.
    pub pattern: String,
    /// What is wrong with it.
    pub why: &'static str,
}

const NOT_A_PATTERN: &str = "use a channel name, or a prefix followed by one trailing '*'";

/// What may follow `{sub}` in a pattern: the segment ends there.
const SEGMENT_ENDS: &[char] = &[':', '.', '/', '-', '_', '@'];

impl ChannelPatterns {
    /// Parses a list of patterns.
    pub fn new<I, S>(patterns: I) -> Result<Self, InvalidPattern>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut set = ChannelPatterns::default();
        for p in patterns {
            let p = p.as_ref();
            let bad = || InvalidPattern {
                why: NOT_A_PATTERN,
                pattern: p.to_owned(),
            };
            if let Some(prefix) = p.strip_suffix('*') {
                if !prefix.bytes().all(is_channel_byte) || prefix.len() >= MAX_LEN {
                    return Err(bad());
                }
                set.prefixes.push(prefix.to_owned());
            } else {
                validate(p.as_bytes()).map_err(|_| bad())?;
                set.exact.push(p.to_owned());
            }
            set.written.push(p.to_owned());
        }
        Ok(set)
    }

    /// Whether the set holds the lone `*`: every channel.
    pub fn covers_everything(&self) -> bool {
        self.prefixes.iter().any(|p| p.is_empty())
    }

    /// Whether `channel` matches any pattern.
    pub fn matches(&self, channel: &str) -> bool {
        self.exact.iter().any(|e| e == channel)
            || self
                .prefixes
                .iter()
                .any(|p| channel.starts_with(p.as_str()))
    }

    /// Whether the set holds no pattern at all.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(ChannelName::new("news").is_ok());
        assert!(ChannelName::new("a-b_c.d:e@f/G9").is_ok());
        assert_eq!(ChannelName::new(""), Err(InvalidChannel::Empty));
        assert_eq!(ChannelName::new("a b"), Err(InvalidChannel::BadCharacter));
        assert_eq!(ChannelName::new("é"), Err(InvalidChannel::BadCharacter));
        assert!(ChannelName::new(&"x".repeat(255)).is_ok());
        assert_eq!(
            ChannelName::new(&"x".repeat(256)),
            Err(InvalidChannel::TooLong(256))
        );
    }

    #[test]
    fn patterns() {
        let p = ChannelPatterns::new(["chat:*", "news"]).unwrap();
        assert!(p.matches("chat:lobby"));
        assert!(p.matches("news"));
        assert!(!p.matches("newsy"));
        assert!(!p.matches("private"));
        assert!(ChannelPatterns::new(["*"]).unwrap().matches("anything"));
        assert!(!ChannelPatterns::default().matches("news"));
        assert!(ChannelPatterns::new(["a*b"]).is_err());
        assert!(ChannelPatterns::new(["bad space"]).is_err());
        let one = ChannelPattern::new("news:*").unwrap();
        assert!(one.matches("news:a") && !one.matches("new"));
        assert!(ChannelPattern::new("*").unwrap().matches("x"));
        assert!(ChannelPattern::new("exact").unwrap().matches("exact"));
        assert!(!ChannelPattern::new("exact").unwrap().matches("exactly"));
        assert!(ChannelPattern::new("a*b").is_err());
    }

    #[test]
    fn user_placeholder() {
        let p = ChannelPattern::new("user:{sub}:*").unwrap();
        assert!(p.has_user());
        // As a rule: any user's channel.
        assert!(p.matches("user:42:inbox") && p.matches("user:43:x"));
        assert!(!p.matches("user::inbox") && !p.matches("user:42") && !p.matches("users:1:a"));
        // As a permission: only the connection's own.
        assert!(p.matches_user("user:42:inbox", "42"));
        assert!(!p.matches_user("user:43:inbox", "42"));
        assert!(!p.matches_user("user:420:inbox", "42"));
        assert!(!p.matches_user("user::inbox", ""));
        let exact = ChannelPattern::new("dm.{sub}").unwrap();
        assert!(exact.matches("dm.7") && !exact.matches("dm."));
        assert!(exact.matches_user("dm.7", "7") && !exact.matches_user("dm.77", "7"));
        let end = ChannelPattern::new("inbox:{sub}").unwrap();
        assert!(end.matches_user("inbox:a@b.c", "a@b.c"));
        assert!(!end.matches("inbox:"));
        for bad in [
            "user:{sub}:{sub}",
            "user:{su}",
            "{sub",
            "a*{sub}",
            "dm.{sub}*",
            "u{sub}x",
        ] {
            assert!(ChannelPattern::new(bad).is_err(), "{bad}");
        }
        let e = ChannelPattern::new("dm.{sub}*").unwrap_err().to_string();
        assert!(e.contains("{sub}:*"), "{e}");
        // A user id holding the segment's end never matches: `alice` reads her own
        // inbox, not the one of `alice:x`, and `alice:x` reads nothing.
        let inbox = ChannelPattern::new("inbox:{sub}:*").unwrap();
        assert!(inbox.matches_user("inbox:alice:x", "alice"));
        assert!(!inbox.matches_user("inbox:alice:x:secret", "alice:x"));
        assert!(!inbox.matches_user("inbox:a*:x", "a*"));
        let dotted = ChannelPattern::new("dm.{sub}.in").unwrap();
        assert!(dotted.matches_user("dm.4.in", "4") && !dotted.matches_user("dm.42.in", "4"));
        assert!(!dotted.matches_user("dm.a.b.in", "a.b"));
        // Without a placeholder both agree.
        let plain = ChannelPattern::new("news:*").unwrap();
        assert!(plain.matches_user("news:a", "x") && !plain.matches_user("new", "x"));
    }

    #[test]
    fn patterns_read_and_print_as_lists() {
        let p: ChannelPatterns = serde_json::from_str(r#"["news","chat:*"]"#).unwrap();
        assert!(p.matches("chat:x"));
        assert_eq!(serde_json::to_string(&p).unwrap(), r#"["news","chat:*"]"#);
        assert!(serde_json::from_str::<ChannelPatterns>(r#"["a b"]"#).is_err());
    }
}
