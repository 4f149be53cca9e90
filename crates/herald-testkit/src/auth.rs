//! Tokens for tests: [`TEST_SECRET`] and [`token`].

use serde_json::json;
use serde_json::Value;

/// The HMAC secret token tests configure (`auth.jwt.hmac_secret`).
pub const TEST_SECRET: &str = "a-shared-secret-of-at-least-32-bytes!";

/// An HS256 connection token signed with [`TEST_SECRET`] for `sub`, expiring in `secs`
/// seconds, with the fields of `extra` (a JSON object) added to its claims.
pub fn token(sub: &str, secs: u64, extra: Value) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs()
        + secs;
    let mut claims = json!({"sub": sub, "exp": exp});
    if let (Some(c), Value::Object(more)) = (claims.as_object_mut(), extra) {
        c.extend(more);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(TEST_SECRET.as_bytes()),
    )
    .expect("a token")
}
