//! Layered configuration: defaults < file (`--config`) < environment (`HERALD_*`,
//! `__` between levels) < command-line flags.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use herald_redis::RedisConfig;
use herald_server::config::{
    AuthConfig, ChannelsConfig, HeartbeatConfig, LimitsConfig, ShutdownConfig, WebSocketConfig,
};
use herald_server::GatewayConfig;
use serde::{Deserialize, Serialize};

/// Herald: a horizontally scalable WebSocket pub/sub gateway.
#[derive(Debug, Parser, Default)]
#[command(version, about)]
pub(crate) struct Cli {
    /// Configuration file (TOML); see herald.toml in the repository for every key.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Address for WebSocket clients (and, unless --internal-listen is set, the API).
    #[arg(long, value_name = "ADDR")]
    pub(crate) listen: Option<String>,
    /// Separate address for /api/* and /metrics.
    #[arg(long, value_name = "ADDR")]
    pub(crate) internal_listen: Option<String>,
    /// Redis URL (redis://HOST:PORT); switches from the embedded broker to Redis.
    #[arg(long, value_name = "URL")]
    pub(crate) redis: Option<String>,
    /// This node's id (default: host name and a random suffix).
    #[arg(long, value_name = "ID")]
    pub(crate) node_id: Option<String>,
    /// Log format: text or json.
    #[arg(long, value_name = "FORMAT")]
    pub(crate) log_format: Option<String>,
    /// Check the configuration, print the effective settings as JSON and exit.
    #[arg(long)]
    pub(crate) check_config: bool,
}

/// The whole configuration of a `herald` process.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Settings {
    /// Address for WebSocket clients.
    pub(crate) listen: SocketAddr,
    /// Optional separate address for the API and metrics.
    pub(crate) internal_listen: Option<SocketAddr>,
    /// Node id; empty picks one.
    pub(crate) node_id: String,
    pub(crate) log: LogConfig,
    /// The broker: Redis when `redis.url` is set, else the embedded one.
    pub(crate) redis: RedisConfig,
    pub(crate) auth: AuthConfig,
    pub(crate) channels: ChannelsConfig,
    pub(crate) limits: LimitsConfig,
    pub(crate) heartbeat: HeartbeatConfig,
    pub(crate) websocket: WebSocketConfig,
    pub(crate) shutdown: ShutdownConfig,
}

impl Default for Settings {
    fn default() -> Self {
        let g = GatewayConfig::default();
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            internal_listen: None,
            node_id: String::new(),
            log: LogConfig::default(),
            redis: RedisConfig::default(),
            auth: g.auth,
            channels: g.channels,
            limits: g.limits,
            heartbeat: g.heartbeat,
            websocket: g.websocket,
            shutdown: g.shutdown,
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct LogConfig {
    /// `text` (human-readable) or `json`.
    pub(crate) format: String,
    /// A tracing filter, e.g. `info` or `herald_server=debug,info`; `RUST_LOG` wins.
    pub(crate) level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

impl Settings {
    /// Builds the settings from `cli` and an environment given as a map (the process
    /// environment in `main`, a literal map in tests).
    pub(crate) fn load(cli: &Cli, env: HashMap<String, String>) -> Result<Self, String> {
        let defaults = config::Config::try_from(&Settings::default()).map_err(|e| e.to_string())?;
        let mut b = config::Config::builder().add_source(defaults);
        if let Some(path) = &cli.config {
            b = b.add_source(config::File::from(path.as_path()).required(true));
        }
        b = b.add_source(
            config::Environment::with_prefix("HERALD")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("channels.client_publish")
                .with_list_parse_key("auth.allowed_origins")
                .source(Some(env)),
        );
        let flags = [
            ("listen", cli.listen.clone()),
            ("internal_listen", cli.internal_listen.clone()),
            ("node_id", cli.node_id.clone()),
            ("redis.url", cli.redis.clone()),
            ("log.format", cli.log_format.clone()),
        ];
        for (key, value) in flags {
            if let Some(v) = value {
                b = b.set_override(key, v).map_err(|e| e.to_string())?;
            }
        }
        let settings: Settings = b
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| e.to_string())?;
        if !matches!(settings.log.format.as_str(), "text" | "json") {
            return Err(format!(
                "log.format: expected \"text\" or \"json\", got {:?}",
                settings.log.format
            ));
        }
        settings.gateway().validate().map_err(|e| e.to_string())?;
        settings.redis.validate().map_err(|e| e.to_string())?;
        Ok(settings)
    }

    pub(crate) fn gateway(&self) -> GatewayConfig {
        GatewayConfig {
            node_id: self.node_id.clone(),
            auth: self.auth.clone(),
            channels: self.channels.clone(),
            limits: self.limits.clone(),
            heartbeat: self.heartbeat.clone(),
            websocket: self.websocket.clone(),
            shutdown: self.shutdown.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults() {
        let s = Settings::load(&Cli::default(), HashMap::new()).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.limits.max_connections, 10_000);
        assert_eq!(s.heartbeat.interval, Duration::from_secs(25));
    }

    #[test]
    fn layers_in_order() {
        let dir = std::env::temp_dir().join(format!("herald-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("herald.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\nnode_id = \"from-file\"\n[limits]\nmax_connections = 5\nmax_subscriptions = 7\n[heartbeat]\ninterval = \"3s\"\n",
        )
        .unwrap();
        let cli = Cli {
            config: Some(file),
            node_id: Some("from-flag".into()),
            ..Cli::default()
        };
        let s = Settings::load(
            &cli,
            env(&[
                ("HERALD_LIMITS__MAX_CONNECTIONS", "6"),
                ("HERALD_NODE_ID", "from-env"),
                ("HERALD_CHANNELS__CLIENT_PUBLISH", "chat:*,news"),
            ]),
        )
        .unwrap();
        assert_eq!(s.listen.port(), 9000);
        assert_eq!(s.limits.max_connections, 6, "env beats file");
        assert_eq!(s.limits.max_subscriptions, 7, "file beats defaults");
        assert_eq!(s.node_id, "from-flag", "flags beat env");
        assert_eq!(s.heartbeat.interval, Duration::from_secs(3));
        assert_eq!(s.channels.client_publish, vec!["chat:*", "news"]);
    }

    #[test]
    fn rejects_bad_values() {
        for (k, v) in [
            ("HERALD_LIMITS__MAX_CONNECTIONS", "0"),
            ("HERALD_LIMITS__MAX_CONNECTIONS", "lots"),
            ("HERALD_LISTEN", "not an address"),
            ("HERALD_CHANNELS__CLIENT_PUBLISH", "a b"),
            ("HERALD_LOG__FORMAT", "xml"),
            ("HERALD_HEARTBEAT__INTERVAL", "soon"),
            ("HERALD_REDIS__URL", "http://not-redis"),
            ("HERALD_REDIS__PREFIX", "bad prefix"),
        ] {
            assert!(
                Settings::load(&Cli::default(), env(&[(k, v)])).is_err(),
                "{k}={v} accepted"
            );
        }
    }
}
