//! Connection tokens: the application's backend issues a JWT, Herald verifies it.
//!
//! # Layout
//! - `keys`: backend API keys ([`ApiKeys`]), hashed once and compared in constant time.
//!
//! [`Verifier`] is built once from [`JwtConfig`] (keys are parsed at start-up, never per
//! handshake) and turns a token into an [`Identity`] or an [`AuthError`]. Only the
//! algorithms the configured keys allow are accepted: HS256/384/512 with
//! `hmac_secret`, RS256 with `rsa_public_key_file`, ES256 with `ecdsa_public_key_file`,
//! and whatever each key of `jwks_file` declares, selected by the token's `kid`. `alg:
//! none` cannot be expressed (the jsonwebtoken crate has no such algorithm) and a token
//! whose algorithm no key allows is refused. `exp` is required; `nbf`, `aud` and `iss`
//! are checked when present (`aud`/`iss` are required when configured).
//!
//! [`ApiKeys`] checks the backends' API keys (`auth.api_key`, `[[auth.api_keys]]`).
#![deny(missing_docs)]

mod keys;

pub use keys::{ApiKeyConfig, ApiKeys, KeyCheck};

use std::path::PathBuf;

use herald_protocol::ChannelPatterns;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

/// `[auth.jwt]`: which tokens a node accepts. With nothing set, no token is accepted.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// Shared secret for HS256/HS384/HS512.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hmac_secret: Option<String>,
    /// PEM file with an RSA public key (RS256).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rsa_public_key_file: Option<PathBuf>,
    /// PEM file with an ECDSA P-256 public key (ES256).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ecdsa_public_key_file: Option<PathBuf>,
    /// JSON Web Key Set file: several keys, chosen by the token's `kid` (rotation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// When set, a token's `aud` must contain it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// When set, a token's `iss` must equal it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
}

impl JwtConfig {
    /// Whether any key is configured.
    pub fn is_enabled(&self) -> bool {
        self.hmac_secret.is_some()
            || self.rsa_public_key_file.is_some()
            || self.ecdsa_public_key_file.is_some()
            || self.jwks_file.is_some()
    }
}

/// A key file or secret that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("auth.jwt.{key}: {problem}")]
pub struct KeyError {
    /// Which setting.
    pub key: &'static str,
    /// What is wrong.
    pub problem: String,
}

/// Why a token was refused. The text names the reason, never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Not a JWT, or its header or claims do not parse.
    #[error("the token is malformed")]
    Malformed,
    /// No configured key allows the token's algorithm (or its `kid` is unknown).
    #[error("the token's algorithm or key is not accepted here")]
    KeyNotAccepted,
    /// The signature does not verify.
    #[error("the token's signature is invalid")]
    BadSignature,
    /// `exp` has passed.
    #[error("the token has expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `aud` or `iss` does not match.
    #[error("the token is for another audience or issuer")]
    WrongAudience,
    /// A required claim is missing or of the wrong type.
    #[error("the token lacks a required claim ({0})")]
    Claims(String),
    /// A subscription token (with a `channel` claim) where a connection token belongs,
    /// or the other way round.
    #[error("{0}")]
    WrongKind(&'static str),
}

/// The latest expiry a token is taken at: 9999-12-31T23:59:59Z. A later `exp` (up to
/// `u64::MAX`, which a signed token can carry) is capped here, so that no expiry
/// arithmetic downstream can overflow.
pub const MAX_EXP: u64 = 253_402_300_799;

/// Who a verified token says the client is, and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user id (`sub`).
    pub user: String,
    /// When the token expires (`exp`, seconds since the Unix epoch).
    pub expires_at: u64,
    /// Channel patterns the token lets the client subscribe to (`channels`).
    pub channels: ChannelPatterns,
    /// Channel patterns the token lets the client publish to (`publish`).
    pub publish: ChannelPatterns,
    /// What presence shows about the user (`info`, any JSON), as JSON text.
    pub info: Option<String>,
    /// Channels the server subscribes the connection to when it opens (`subscribe`),
    /// whatever the channel permissions say: the issuer decided.
    pub subscribe: Vec<String>,
}

/// What a verified subscription token grants: one channel, to one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The user it was issued to (`sub`); must be the connection's user.
    pub user: String,
    /// The channel it opens (`channel`).
    pub channel: String,
    /// When it expires (`exp`, seconds since the Unix epoch).
    pub expires_at: u64,
    /// What presence shows about the user in this channel (`info`), as JSON text.
    pub info: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
    /// Only in subscription tokens.
    channel: Option<String>,
    #[serde(default)]
    info: Option<serde_json::Value>,
    #[serde(default)]
    subscribe: Vec<String>,
}

/// One key and the algorithms it may verify.
struct Key {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
    /// The checks for this key's tokens, built once (not per handshake).
    validation: Validation,
}

/// Verifies tokens with the configured keys.
pub struct Verifier {
    keys: Vec<Key>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys.len())
            .finish()
    }
}

fn read(key: &'static str, path: &PathBuf) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|e| KeyError {
        key,
        problem: format!("cannot read {}: {e}", path.display()),
    })
}

/// What every token verified with a key of `algorithms` must satisfy.
fn validation(algorithms: &[Algorithm], config: &JwtConfig) -> Validation {
    let mut v = Validation::new(algorithms[0]);
    v.algorithms = algorithms.to_vec();
    v.leeway = 0;
    v.validate_nbf = true;
    v.set_required_spec_claims(&["exp", "sub"]);
    match &config.audience {
        Some(aud) => {
            v.set_audience(&[aud]);
            v.required_spec_claims.insert("aud".into());
        }
        None => v.validate_aud = false,
    }
    if let Some(iss) = &config.issuer {
        v.set_issuer(&[iss]);
        v.required_spec_claims.insert("iss".into());
    }
    v
}

impl Verifier {
    /// Parses every configured key; `None` when no key is configured.
    pub fn new(config: &JwtConfig) -> Result<Option<Verifier>, KeyError> {
        let mut keys = Vec::new();
        if let Some(secret) = &config.hmac_secret {
            if secret.len() < 32 {
                return Err(KeyError {
                    key: "hmac_secret",
                    problem: "must be at least 32 bytes".into(),
                });
            }
            keys.push(Key {
                kid: None,
                algorithms: vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
                key: DecodingKey::from_secret(secret.as_bytes()),
                validation: Validation::default(),
            });
        }
        type FromPem = fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>;
        let pems: [(&'static str, &Option<PathBuf>, FromPem, Algorithm); 2] = [
            (
                "rsa_public_key_file",
                &config.rsa_public_key_file,
                DecodingKey::from_rsa_pem,
                Algorithm::RS256,
            ),
            (
                "ecdsa_public_key_file",
                &config.ecdsa_public_key_file,
                DecodingKey::from_ec_pem,
                Algorithm::ES256,
            ),
        ];
        for (name, path, parse, alg) in pems {
            let Some(path) = path else { continue };
            let key = parse(&read(name, path)?).map_err(|e| KeyError {
                key: name,
                problem: e.to_string(),
            })?;
            keys.push(Key {
                kid: None,
                algorithms: vec![alg],
                key,
                validation: Validation::default(),
            });
        }
        if let Some(path) = &config.jwks_file {
            let text = read("jwks_file", path)?;
            let set: JwkSet = serde_json::from_slice(&text).map_err(|e| KeyError {
                key: "jwks_file",
                problem: e.to_string(),
            })?;
            // An empty set would turn token checking off without a word (no key, no
            // verifier): a rotation that emptied the file must fail loudly instead.
            if set.keys.is_empty() {
                return Err(KeyError {
                    key: "jwks_file",
                    problem: "the key set has no keys".into(),
                });
            }
            for jwk in &set.keys {
                let Some(kid) = jwk.common.key_id.clone() else {
                    return Err(KeyError {
                        key: "jwks_file",
                        problem: "every key needs a kid".into(),
                    });
                };
                let alg = jwk
                    .common
                    .key_algorithm
                    .and_then(|a| a.to_string().parse::<Algorithm>().ok())
                    .ok_or_else(|| KeyError {
                        key: "jwks_file",
                        problem: format!("key {kid:?} needs a supported alg"),
                    })?;
                let key = DecodingKey::from_jwk(jwk).map_err(|e| KeyError {
                    key: "jwks_file",
                    problem: format!("key {kid:?}: {e}"),
                })?;
                keys.push(Key {
                    kid: Some(kid),
                    algorithms: vec![alg],
                    key,
                    validation: Validation::default(),
                });
            }
        }
        if keys.is_empty() {
            return Ok(None);
        }
        for k in &mut keys {
            k.validation = validation(&k.algorithms, config);
        }
        Ok(Some(Verifier { keys }))
    }

    /// Verifies a connection token now.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let c = self.claims(token)?;
        if c.channel.is_some() {
            // Both kinds come from the same issuer and keys: without this a token
            // meant for one channel would open a whole connection.
            return Err(AuthError::WrongKind(
                "a subscription token (with a channel claim) cannot open a connection",
            ));
        }
        let patterns = |list: &[String], name: &str| {
            ChannelPatterns::new(list).map_err(|_| AuthError::Claims(name.to_owned()))
        };
        Ok(Identity {
            channels: patterns(&c.channels, "channels")?,
            publish: patterns(&c.publish, "publish")?,
            user: c.sub,
            expires_at: c.exp.min(MAX_EXP),
            info: c.info.map(|v| v.to_string()),
            subscribe: c.subscribe,
        })
    }

    /// Verifies a subscription token (one with a `channel` claim) now.
    pub fn verify_subscription(&self, token: &str) -> Result<Grant, AuthError> {
        let c = self.claims(token)?;
        let Some(channel) = c.channel else {
            return Err(AuthError::WrongKind(
                "a subscription token needs a channel claim",
            ));
        };
        Ok(Grant {
            user: c.sub,
            channel,
            expires_at: c.exp.min(MAX_EXP),
            info: c.info.map(|v| v.to_string()),
        })
    }

    fn claims(&self, token: &str) -> Result<Claims, AuthError> {
        let header = decode_header(token).map_err(|_| AuthError::Malformed)?;
        // A token naming a key (`kid`) is verified by that key; otherwise (or if no
        // key has that name) by the configured key of its algorithm.
        let allows = |k: &&Key| k.algorithms.contains(&header.alg);
        let by_kid = header.kid.as_ref().and_then(|kid| {
            self.keys
                .iter()
                .filter(allows)
                .find(|k| k.kid.as_ref() == Some(kid))
        });
        let key = by_kid
            .or_else(|| self.keys.iter().filter(allows).find(|k| k.kid.is_none()))
            .ok_or(AuthError::KeyNotAccepted)?;
        let data = decode::<Claims>(token, &key.key, &key.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature => AuthError::BadSignature,
                K::ExpiredSignature => AuthError::Expired,
                K::ImmatureSignature => AuthError::NotYetValid,
                K::InvalidAudience | K::InvalidIssuer => AuthError::WrongAudience,
                K::InvalidAlgorithm => AuthError::KeyNotAccepted,
                K::MissingRequiredClaim(c) => AuthError::Claims(c.clone()),
                _ => AuthError::Malformed,
            }
        })?;
        Ok(data.claims)
    }
}
