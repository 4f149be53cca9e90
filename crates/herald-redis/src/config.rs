//! [`RedisConfig`]: the `[redis]` settings, and [`RedisBrokerError`].

use std::path::PathBuf;
use std::time::Duration;

use redis::{IntoConnectionInfo, ProtocolVersion};
use serde::{Deserialize, Serialize};

/// Redis settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:pass@]host:port[/db]`, or `rediss://` for TLS; with `cluster`, a
    /// comma-separated list of seed nodes. Empty: no Redis (the node runs on the
    /// embedded broker). `user:pass` is an ACL user (Redis 6+).
    pub url: String,
    /// `rediss://`: a PEM file of the CA(s) that sign the server's certificate (unset:
    /// the system's trust store).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// `rediss://` with client certificates (`tls-auth-clients yes`): this node's
    /// certificate (PEM), with `tls_key_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of `tls_cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// Use Redis Cluster with sharded pub/sub (Redis 7+).
    pub cluster: bool,
    /// Redis Sentinel: the name of the monitored master (`sentinel monitor <name> ...`).
    /// `url` then lists the Sentinels (`redis://sentinel-1:26379,redis://sentinel-2:26379`);
    /// the node asks them for the master at every (re)connect and leaves a server that
    /// is no longer master, so a failover is followed without a restart. Empty: no
    /// Sentinel.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub sentinel_master: String,
    /// Prepended to every Redis channel Herald uses, so deployments can share a Redis.
    pub prefix: String,
    /// How often the connection is probed with `PING`.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// A probe, connect or (un)subscribe slower than this marks the connection dead.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Longest pause between reconnection attempts.
    #[serde(with = "humantime_serde")]
    pub max_reconnect_delay: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: String::new(),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            cluster: false,
            sentinel_master: String::new(),
            prefix: "herald:".into(),
            probe_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            max_reconnect_delay: Duration::from_millis(500),
        }
    }
}

/// Why the Redis broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum RedisBrokerError {
    /// The URL does not parse.
    #[error("invalid Redis URL {url:?}: {source}")]
    Url {
        /// The offending URL.
        url: String,
        /// What the redis crate said.
        source: redis::RedisError,
    },
    /// The prefix holds characters outside the channel-name set.
    #[error("redis.prefix {0:?} may only hold A-Z a-z 0-9 _ - . : @ /")]
    Prefix(String),
    /// A duration that must be positive is zero.
    #[error("{0} must be greater than 0")]
    Zero(&'static str),
    /// The TLS settings do not fit together or a file cannot be read.
    #[error("redis TLS: {0}")]
    Tls(String),
    /// The Sentinel settings do not fit the others.
    #[error("redis Sentinel: {0}")]
    Sentinel(String),
}

/// `url` with any password replaced by `***`, for messages.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}")
            } else {
                format!("{scheme}://{user}@{host}")
            }
        }
        None => url.to_owned(),
    }
}

impl RedisConfig {
    /// Checks the settings without connecting (an empty URL is valid: Redis unused).
    pub fn validate(&self) -> Result<(), RedisBrokerError> {
        if !self.url.is_empty() {
            self.connection_infos()?;
        }
        self.certificates()?;
        if !self.sentinel_master.is_empty() && self.cluster {
            return Err(RedisBrokerError::Sentinel(
                "sentinel_master and cluster exclude each other".into(),
            ));
        }
        let tls = self
            .url
            .split(',')
            .any(|u| u.trim().starts_with("rediss://"));
        if !self.sentinel_master.is_empty() && (tls || self.certificates()?.is_some()) {
            // The master would be reached without TLS (and its password sent in the
            // clear): refused until the master's connection carries the TLS settings.
            return Err(RedisBrokerError::Sentinel(
                "rediss:// and the TLS files are not supported with Sentinel yet".into(),
            ));
        }
        if !self
            .prefix
            .bytes()
            .all(herald_protocol::channel::is_channel_byte)
        {
            return Err(RedisBrokerError::Prefix(self.prefix.clone()));
        }
        for (key, d) in [
            ("redis.probe_interval", self.probe_interval),
            ("redis.timeout", self.timeout),
            ("redis.max_reconnect_delay", self.max_reconnect_delay),
        ] {
            if d.is_zero() {
                return Err(RedisBrokerError::Zero(key));
            }
        }
        Ok(())
    }

    /// The TLS material the settings name, read now (at start: a file that does not
    /// load stops the node with the file's name rather than failing every connection).
    pub(crate) fn certificates(&self) -> Result<Option<redis::TlsCertificates>, RedisBrokerError> {
        let read = |key: &str, path: &PathBuf| {
            std::fs::read(path)
                .map_err(|e| RedisBrokerError::Tls(format!("redis.{key} {}: {e}", path.display())))
        };
        let tls_url = self
            .url
            .split(',')
            .any(|u| u.trim().starts_with("rediss://"));
        let any = self.tls_ca_file.is_some()
            || self.tls_cert_file.is_some()
            || self.tls_key_file.is_some();
        if any && !tls_url {
            return Err(RedisBrokerError::Tls(
                "tls_ca_file, tls_cert_file and tls_key_file need rediss:// URLs".into(),
            ));
        }
        let client_tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                client_cert: read("tls_cert_file", cert)?,
                client_key: read("tls_key_file", key)?,
            }),
            (None, None) => None,
            _ => {
                return Err(RedisBrokerError::Tls(
                    "tls_cert_file and tls_key_file go together".into(),
                ))
            }
        };
        let root_cert = match &self.tls_ca_file {
            Some(ca) => Some(read("tls_ca_file", ca)?),
            None => None,
        };
        Ok(
            (client_tls.is_some() || root_cert.is_some()).then_some(redis::TlsCertificates {
                client_tls,
                root_cert,
            }),
        )
    }

    pub(crate) fn connection_infos(&self) -> Result<Vec<redis::ConnectionInfo>, RedisBrokerError> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                let info = u
                    .into_connection_info()
                    .map_err(|source| RedisBrokerError::Url {
                        url: redacted(u),
                        source,
                    })?;
                let settings = info
                    .redis_settings()
                    .clone()
                    .set_protocol(ProtocolVersion::RESP3);
                Ok(info.set_redis_settings(settings))
            })
            .collect::<Result<Vec<_>, _>>()
            .and_then(|v| {
                if v.is_empty() {
                    Err(RedisBrokerError::Url {
                        url: redacted(&self.url),
                        source: redis::RedisError::from((
                            redis::ErrorKind::InvalidClientConfig,
                            "no URL given",
                        )),
                    })
                } else {
                    Ok(v)
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redacted("redis://:s3cret@host:6379/0"),
            "redis://:***@host:6379/0"
        );
        assert_eq!(redacted("redis://u:s3cret@host"), "redis://u:***@host");
        assert_eq!(redacted("redis://host:6379"), "redis://host:6379");
        let bad = RedisConfig {
            url: "redis://:s3cret@host:notaport".into(),
            ..RedisConfig::default()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn zero_durations_are_refused() {
        let c = RedisConfig {
            probe_interval: Duration::ZERO,
            ..RedisConfig::default()
        };
        assert!(matches!(
            c.validate(),
            Err(RedisBrokerError::Zero("redis.probe_interval"))
        ));
    }
}
