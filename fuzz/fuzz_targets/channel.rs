//! Channel names and patterns: never a panic; a name is accepted exactly when every
//! byte is allowed and the length is 1..=255; a pattern matches a name the same way
//! alone and in a set; with `{sub}`, a user's channel always matches the rule.
#![no_main]

use herald_protocol::channel::{is_channel_byte, MAX_LEN};
use herald_protocol::{ChannelName, ChannelPattern, ChannelPatterns};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let (a, b) = data.split_at(split);
    let b = b.get(1..).unwrap_or(&[]);
    let valid = !a.is_empty() && a.len() <= MAX_LEN && a.iter().all(|c| is_channel_byte(*c));
    assert_eq!(ChannelName::from_bytes(a).is_ok(), valid);
    let (Ok(pattern), Ok(name)) = (std::str::from_utf8(a), std::str::from_utf8(b)) else {
        return;
    };
    let Ok(p) = ChannelPattern::new(pattern) else {
        return;
    };
    if p.has_user() {
        // `{sub}` only in rules: a set refuses it; a channel a user may use matches
        // the rule.
        assert!(ChannelPatterns::new([pattern]).is_err());
        let (name, user) = name.split_once('\n').unwrap_or((name, "u"));
        if p.matches_user(name, user) {
            assert!(p.matches(name));
        }
    } else {
        let set = ChannelPatterns::new([pattern]).expect("a valid pattern is a valid set");
        assert_eq!(p.matches(name), set.matches(name));
        assert_eq!(p.matches(name), p.matches_user(name, "u"));
    }
});
