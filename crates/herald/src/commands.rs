//! The tools `herald token` and `herald config` run instead of the gateway.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_server::GatewayConfig;
use serde::Serialize;

/// The complete commented configuration: herald.toml at the repository's root, every
/// key with its default (a test checks that it lists every key the gateway reads).
pub const DEFAULT_CONFIG: &str = include_str!("../../../herald.toml");

/// The claims of a development token (PROTOCOL.md, "Tokens").
#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    channels: &'a [String],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    publish: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
}

/// A token for `sub`, valid for `ttl` (humantime: "15m", "1h"), HS256-signed with the
/// configuration's `auth.jwt.hmac_secret`, carrying its `audience` and `issuer` when
/// set, so that a node with that configuration accepts it.
pub fn mint_token(
    gateway: &GatewayConfig,
    sub: &str,
    ttl: &str,
    channels: &[String],
    publish: &[String],
) -> Result<String, String> {
    let jwt = &gateway.auth.jwt;
    let secret = jwt.hmac_secret.as_deref().ok_or(
        "auth.jwt.hmac_secret is not set (herald token signs with it: set it in the \
         configuration file or HERALD_AUTH__JWT__HMAC_SECRET)",
    )?;
    if sub.is_empty() {
        return Err("--sub: a token needs a user".into());
    }
    let ttl: Duration = humantime_serde::re::humantime::parse_duration(ttl)
        .map_err(|e| format!("--ttl {ttl:?}: {e} (e.g. \"15m\", \"1h\", \"7d\")"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let claims = Claims {
        sub,
        iat: now,
        exp: now.saturating_add(ttl.as_secs().max(1)),
        channels,
        publish,
        aud: jwt.audience.as_deref(),
        iss: jwt.issuer.as_deref(),
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| e.to_string())
}
