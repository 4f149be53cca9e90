//! Who may subscribe and publish to a channel over WebSocket: the first matching
//! `[[channels.rules]]` entry, the client's token claims and subscription tokens.
//!
//! Decisions are pure functions of the configuration and the client's identity, so
//! that the whole table is unit-tested here and the session only asks.

use herald_auth::{Grant, Identity};

use crate::config::{ChannelsConfig, PublishAccess, SubscribeAccess};

/// Whether a client may subscribe to `channel`.
///
/// - A token's `channels` claim, or a subscription token (`grant`, already verified)
///   naming the channel and issued to this client's user, always lets it.
/// - Otherwise the first rule decides: `anyone`, `authenticated` (a token), `claims`
///   (nothing more than the above). A `{sub}` pattern admits only the user it names.
/// - A channel no rule matches is open to anyone (the laptop default).
pub(crate) fn may_subscribe(
    config: &ChannelsConfig,
    channel: &str,
    identity: Option<&Identity>,
    grant: Option<&Grant>,
) -> bool {
    if identity.is_some_and(|i| i.channels.matches(channel)) {
        return true;
    }
    if let (Some(g), Some(i)) = (grant, identity) {
        if g.channel == channel && g.user == i.user {
            return true;
        }
    }
    let Some(rule) = config.rule(channel) else {
        return true;
    };
    if !own_namespace(rule, channel, identity) {
        return false;
    }
    match rule.subscribe {
        SubscribeAccess::Anyone => true,
        SubscribeAccess::Authenticated => identity.is_some(),
        SubscribeAccess::Claims => false,
        // Decided by the backend, before this is asked (`subscribe_hook`).
        SubscribeAccess::Hook => false,
    }
}

/// For a channel whose rule says `subscribe = "hook"`: `Some(true)` when the backend
/// must be asked, `Some(false)` when the `{sub}` namespace already refuses; `None` when
/// the rule does not say hook, or the token's `channels` claim (or a subscription
/// token, `granted`) admits without asking.
pub(crate) fn subscribe_hook(
    config: &ChannelsConfig,
    channel: &str,
    identity: Option<&Identity>,
    granted: bool,
) -> Option<bool> {
    let rule = config.rule(channel)?;
    if rule.subscribe != SubscribeAccess::Hook
        || granted
        || identity.is_some_and(|i| i.channels.matches(channel))
    {
        return None;
    }
    Some(own_namespace(rule, channel, identity))
}

/// For a channel whose rule says `publish = "hook"`: as [`subscribe_hook`].
pub(crate) fn publish_hook(
    config: &ChannelsConfig,
    channel: &str,
    identity: Option<&Identity>,
) -> Option<bool> {
    let rule = config.rule(channel)?;
    if rule.publish != PublishAccess::Hook || config.client_publish.matches(channel) {
        return None;
    }
    Some(own_namespace(rule, channel, identity))
}

/// Whether a client may publish to `channel` over WebSocket.
///
/// - `channels.client_publish` (kept from before rules had `publish`) lets anyone.
/// - Otherwise the first rule decides: `nobody`, `anyone`, `authenticated`, `claims`
///   (the token's `publish` claim matches). A `{sub}` pattern admits only the user it
///   names.
/// - On a channel no rule matches, the token's `publish` claim decides.
pub(crate) fn may_publish(
    config: &ChannelsConfig,
    channel: &str,
    identity: Option<&Identity>,
) -> bool {
    if config.client_publish.matches(channel) {
        return true;
    }
    let claimed = identity.is_some_and(|i| i.publish.matches(channel));
    let Some(rule) = config.rule(channel) else {
        return claimed;
    };
    if !own_namespace(rule, channel, identity) {
        return false;
    }
    match rule.publish {
        PublishAccess::Nobody => false,
        PublishAccess::Anyone => true,
        PublishAccess::Authenticated => identity.is_some(),
        PublishAccess::Claims => claimed,
        // Decided by the backend, before this is asked (`publish_hook`).
        PublishAccess::Hook => false,
    }
}

/// A `{sub}` rule admits only the user whose id fills the placeholder.
fn own_namespace(
    rule: &crate::config::ChannelRule,
    channel: &str,
    identity: Option<&Identity>,
) -> bool {
    !rule.pattern.has_user()
        || identity.is_some_and(|i| rule.pattern.matches_user(channel, &i.user))
}

#[cfg(test)]
mod tests {
    use herald_protocol::{ChannelPattern, ChannelPatterns};

    use super::*;
    use crate::config::ChannelRule;

    fn rule(pattern: &str, subscribe: SubscribeAccess, publish: PublishAccess) -> ChannelRule {
        ChannelRule {
            pattern: ChannelPattern::new(pattern).unwrap(),
            history_size: 0,
            history_ttl: std::time::Duration::from_secs(1),
            history_meta_ttl: std::time::Duration::from_secs(1),
            max_recovery: 0,
            subscribe,
            publish,
            presence: false,
            join_leave: false,
            join_leave_per: Default::default(),
            presence_access: Default::default(),
            history_access: Default::default(),
            delta: None,
        }
    }

    fn user(sub: &str, channels: &[&str], publish: &[&str]) -> Identity {
        Identity {
            user: sub.into(),
            expires_at: u64::MAX,
            channels: ChannelPatterns::new(channels).unwrap(),
            publish: ChannelPatterns::new(publish).unwrap(),
            info: None,
            subscribe: Vec::new(),
        }
    }

    #[test]
    fn subscribe_table() {
        use SubscribeAccess::*;
        let config = ChannelsConfig {
            rules: vec![
                rule("public:*", Anyone, PublishAccess::Nobody),
                rule("user:{sub}:*", Authenticated, PublishAccess::Nobody),
                rule("members:*", Authenticated, PublishAccess::Nobody),
                rule("private:*", Claims, PublishAccess::Nobody),
            ],
            ..ChannelsConfig::default()
        };
        let u42 = user("42", &[], &[]);
        let vip = user("7", &["private:vip"], &[]);
        let may = |c, i: Option<&Identity>| may_subscribe(&config, c, i, None);
        assert!(may("public:news", None));
        assert!(may("unruled", None), "no rule: anyone");
        assert!(may("user:42:inbox", Some(&u42)));
        assert!(!may("user:43:inbox", Some(&u42)));
        assert!(!may("user:42:inbox", None));
        assert!(!may("members:x", None) && may("members:x", Some(&u42)));
        assert!(!may("private:vip", Some(&u42)));
        assert!(may("private:vip", Some(&vip)), "the channels claim");
        assert!(!may("private:other", Some(&vip)));
        // The channels claim reaches beyond the rules, even into another namespace.
        let support = user("s", &["user:*"], &[]);
        assert!(may("user:43:inbox", Some(&support)));
        // Subscription tokens: right channel and user; not another channel or user.
        let grant = |user: &str, channel: &str| Grant {
            user: user.into(),
            channel: channel.into(),
            expires_at: u64::MAX,
            info: None,
        };
        let g = grant("42", "private:x");
        assert!(may_subscribe(&config, "private:x", Some(&u42), Some(&g)));
        assert!(!may_subscribe(&config, "private:y", Some(&u42), Some(&g)));
        let other = grant("43", "private:x");
        assert!(!may_subscribe(
            &config,
            "private:x",
            Some(&u42),
            Some(&other)
        ));
        assert!(!may_subscribe(&config, "private:x", None, Some(&g)));
    }

    #[test]
    fn publish_table() {
        use PublishAccess::*;
        let config = ChannelsConfig {
            rules: vec![
                rule("chat:*", SubscribeAccess::Anyone, Anyone),
                rule("room:*", SubscribeAccess::Anyone, Authenticated),
                rule("user:{sub}:outbox", SubscribeAccess::Anyone, Authenticated),
                rule("feed:*", SubscribeAccess::Anyone, Claims),
                rule("news:*", SubscribeAccess::Anyone, Nobody),
            ],
            client_publish: ChannelPatterns::new(["legacy"]).unwrap(),
            ..ChannelsConfig::default()
        };
        let u = user("42", &[], &["feed:a", "news:*", "other"]);
        let may = |c, i: Option<&Identity>| may_publish(&config, c, i);
        assert!(may("chat:x", None));
        assert!(!may("room:x", None) && may("room:x", Some(&u)));
        assert!(may("user:42:outbox", Some(&u)) && !may("user:43:outbox", Some(&u)));
        assert!(may("feed:a", Some(&u)) && !may("feed:b", Some(&u)));
        assert!(
            !may("news:x", Some(&u)),
            "nobody means nobody, claims or not"
        );
        assert!(
            may("other", Some(&u)) && !may("other", None),
            "no rule: the claim"
        );
        assert!(!may("unclaimed", Some(&u)));
        assert!(may("legacy", None), "client_publish");
    }
}
