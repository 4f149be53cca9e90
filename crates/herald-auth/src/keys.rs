//! Backend API keys: several (for rotation), each optionally scoped to channel patterns.
//!
//! Keys are kept as SHA-256 digests and a presented key is hashed before it is
//! compared, in constant time, with every configured digest: neither the position of
//! the first differing byte nor a key's length shows in the time a check takes.

use herald_protocol::ChannelPatterns;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// One `[[auth.api_keys]]` entry.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The key, sent as `Authorization: Bearer <key>`.
    pub key: String,
    /// Channels this key may publish to and read the history of (default: every
    /// channel). Outside them the API answers 403.
    #[serde(default = "every_channel")]
    pub channels: ChannelPatterns,
}

fn every_channel() -> ChannelPatterns {
    ChannelPatterns::new(["*"]).unwrap_or_default()
}

impl std::fmt::Debug for ApiKeyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyConfig")
            .field("key", &"<redacted>")
            .field("channels", &self.channels)
            .finish()
    }
}

/// The configured API keys, ready to check.
#[derive(Default)]
pub struct ApiKeys {
    keys: Vec<([u8; 32], ChannelPatterns)>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys")
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// Which key a request presented, if any matched.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyCheck<'a> {
    /// No key is configured: the API is open (the binary refuses to start like this
    /// on a non-loopback address).
    Open,
    /// A configured key, with the channels it may use.
    Key(&'a ChannelPatterns),
    /// No key, or one that matches none.
    Refused,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl ApiKeys {
    /// `single` (`auth.api_key`, every channel) and the scoped `[[auth.api_keys]]`.
    pub fn new(single: Option<&str>, scoped: &[ApiKeyConfig]) -> ApiKeys {
        let mut keys: Vec<_> = single
            .map(|k| (digest(k), every_channel()))
            .into_iter()
            .collect();
        keys.extend(scoped.iter().map(|k| (digest(&k.key), k.channels.clone())));
        ApiKeys { keys }
    }

    /// Whether no key is configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks a presented key (`None`: the request carried none).
    pub fn check(&self, presented: Option<&str>) -> KeyCheck<'_> {
        if self.keys.is_empty() {
            return KeyCheck::Open;
        }
        let Some(presented) = presented else {
            return KeyCheck::Refused;
        };
        let given = digest(presented);
        // Visit every key whatever matches, so the time does not say which one did.
        let mut found = None;
        for (d, channels) in &self.keys {
            if bool::from(d.ct_eq(&given)) && found.is_none() {
                found = Some(channels);
            }
        }
        found.map_or(KeyCheck::Refused, KeyCheck::Key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_scopes() {
        let scoped = ApiKeyConfig {
            key: "news-key".into(),
            channels: ChannelPatterns::new(["news:*"]).unwrap(),
        };
        let keys = ApiKeys::new(Some("all-key"), &[scoped]);
        match keys.check(Some("all-key")) {
            KeyCheck::Key(c) => assert!(c.matches("anything")),
            other => panic!("{other:?}"),
        }
        match keys.check(Some("news-key")) {
            KeyCheck::Key(c) => assert!(c.matches("news:a") && !c.matches("chat")),
            other => panic!("{other:?}"),
        }
        assert_eq!(keys.check(Some("news-ke")), KeyCheck::Refused);
        assert_eq!(keys.check(Some("")), KeyCheck::Refused);
        assert_eq!(keys.check(None), KeyCheck::Refused);
        assert_eq!(ApiKeys::default().check(None), KeyCheck::Open);
        let printed = format!(
            "{:?}",
            ApiKeyConfig {
                key: "s3cret".into(),
                channels: every_channel()
            }
        );
        assert!(!printed.contains("s3cret"), "{printed}");
    }
}
