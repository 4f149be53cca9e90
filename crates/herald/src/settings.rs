//! Layered configuration: defaults < file (`--config`) < environment (`HERALD_*`,
//! `__` between levels) < command-line flags.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use herald_redis::RedisConfig;
use herald_server::GatewayConfig;
use serde::{Deserialize, Serialize};

/// Herald: a horizontally scalable WebSocket pub/sub gateway.
#[derive(Debug, Parser, Default)]
#[command(version, about)]
pub struct Cli {
    /// Configuration file (TOML); see herald.toml in the repository for every key.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address for WebSocket clients (and, unless --internal-listen is set, the API).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Separate address for /api/* and /metrics.
    #[arg(long, value_name = "ADDR")]
    pub internal_listen: Option<String>,
    /// Redis URL (redis://HOST:PORT); switches from the embedded broker to Redis.
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// This node's id (default: host name and a random suffix).
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
    /// Log format: text or json.
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Check the configuration, print the effective settings as TOML and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Serve the demo page at /demo (sets `demo = true`).
    #[arg(long)]
    pub demo: bool,
    /// A tool instead of the gateway.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// `herald <command>`: tools that use the same configuration as the gateway.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Mint a development token (HS256, signed with auth.jwt.hmac_secret from the same
    /// configuration the gateway reads), and print it.
    Token {
        /// The user (`sub`).
        #[arg(long)]
        sub: String,
        /// How long it is valid ("15m", "1h", "7d").
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Channel patterns it may subscribe to (`channels` claim), comma-separated.
        #[arg(long, value_delimiter = ',')]
        channels: Vec<String>,
        /// Channel patterns it may publish to (`publish` claim), comma-separated.
        #[arg(long, value_delimiter = ',')]
        publish: Vec<String>,
    },
    /// Print a configuration: with --default, the complete commented herald.toml with
    /// every key and its default; without, the effective settings (as --check-config).
    Config {
        /// The complete commented default configuration.
        #[arg(long)]
        default: bool,
    },
}

/// The whole configuration of a `herald` process: where it listens, how it logs, its
/// broker, and the gateway's own settings, whose keys sit at the top level of the file
/// (`node_id`, `[limits]`, `[auth]`, ...).
///
/// Printed with the gateway's keys flattened in; read in two parts (see
/// [`Settings::load`]), because serde's `flatten` buffers values and would lose the
/// `config` crate's parsing of environment strings into numbers and booleans.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Address for WebSocket clients.
    pub listen: SocketAddr,
    /// Optional separate address for the API and metrics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub internal_listen: Option<SocketAddr>,
    /// Logging.
    pub log: LogConfig,
    /// The broker: Redis when `redis.url` is set, else the embedded one.
    pub redis: RedisConfig,
    /// Everything the gateway itself reads.
    #[serde(flatten)]
    pub gateway: GatewayConfig,
    /// Environment variables that look like Herald's (`HERALD_...`) but are the
    /// service links Kubernetes injects for a Service named `herald...`
    /// (`HERALD_SERVICE_HOST`, `HERALD_PORT_8080_TCP_ADDR`, ...): ignored, and the
    /// binary warns about each.
    #[serde(skip)]
    pub ignored_env: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            internal_listen: None,
            log: LogConfig::default(),
            redis: RedisConfig::default(),
            gateway: GatewayConfig::default(),
            ignored_env: Vec::new(),
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (human-readable) or `json`.
    pub format: String,
    /// A tracing filter, e.g. `info` or `herald_server=debug,info`; `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// `HOST:PORT` for a listener, refused in words a user acts on.
fn address<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    parse_address(&text).map_err(serde::de::Error::custom)
}

fn optional_address<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let text: Option<String> = Option::deserialize(d)?;
    text.filter(|t| !t.is_empty())
        .map(|t| parse_address(&t).map_err(serde::de::Error::custom))
        .transpose()
}

fn parse_address(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!(
            "{text:?} is not an address: write IP:PORT, e.g. \"0.0.0.0:8080\" (every IPv4 \
             interface), \"127.0.0.1:8080\" (this host only) or \"[::]:8080\" (IPv6)"
        )
    })
}

/// A configuration error in the words of herald.toml: `key: what is wrong (in FILE)`.
/// The configuration library's messages name the key after the problem, run list
/// indices into names (`rules[0]subscribe`) and say "expected a duration" without
/// saying what one looks like.
fn explain(e: config::ConfigError) -> String {
    let text = e.to_string();
    let Some((what, rest)) = text.split_once(" for key `") else {
        return text;
    };
    let Some((key, origin)) = rest.split_once('`') else {
        return text;
    };
    let mut fixed = String::with_capacity(key.len() + 4);
    let mut after_index = false;
    for c in key.chars() {
        if after_index && c != '[' && c != '.' {
            fixed.push('.');
        }
        after_index = c == ']';
        fixed.push(c);
    }
    let mut what = what.to_owned();
    if what.contains("expected a duration") {
        what.push_str(" (a number with a unit: \"500ms\", \"5s\", \"2m\", \"1h\")");
    }
    let origin = origin.trim();
    if origin.is_empty() {
        format!("{fixed}: {what}")
    } else {
        format!("{fixed}: {what} ({origin})")
    }
}

/// The keys of [`Settings`] that are the process's, not the gateway's.
#[derive(Deserialize)]
#[serde(default)]
struct ProcessSettings {
    #[serde(deserialize_with = "address")]
    listen: SocketAddr,
    #[serde(deserialize_with = "optional_address")]
    internal_listen: Option<SocketAddr>,
    log: LogConfig,
    redis: RedisConfig,
}

impl Default for ProcessSettings {
    fn default() -> Self {
        let s = Settings::default();
        ProcessSettings {
            listen: s.listen,
            internal_listen: s.internal_listen,
            log: s.log,
            redis: s.redis,
        }
    }
}

/// Environment variables that hold comma-separated lists, and their keys.
const LIST_VARS: &[(&str, &str)] = &[
    ("HERALD_CHANNELS__CLIENT_PUBLISH", "channels.client_publish"),
    ("HERALD_AUTH__ALLOWED_ORIGINS", "auth.allowed_origins"),
    ("HERALD_PROXY__TRUSTED", "proxy.trusted"),
];

/// Every key the top level of the settings may hold.
fn top_level_keys() -> std::collections::HashSet<String> {
    let with_all = Settings {
        internal_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        ..Settings::default()
    };
    match serde_json::to_value(with_all) {
        Ok(serde_json::Value::Object(m)) => m.into_iter().map(|(k, _)| k).collect(),
        _ => Default::default(),
    }
}

/// Whether `var` is one of the service links Kubernetes injects into every pod for each
/// Service in its namespace, for a Service whose name starts with `herald`: `{SVC}_
/// SERVICE_HOST`, `{SVC}_SERVICE_PORT[_{NAME}]`, `{SVC}_PORT` and
/// `{SVC}_PORT_{N}_{TCP|UDP|SCTP}[_PROTO|_PORT|_ADDR]`, `SVC` being the Service's name
/// upper-cased with `-` as `_`, each with the value Kubernetes gives it (an address, a
/// port number, a protocol, a `tcp://` URL). None of Herald's keys has this shape (a
/// nested key has `__`; the top-level ones are `listen`, `internal_listen`, `node_id`,
/// `demo`), so real typos (`HERALD_LISTEN_PORT=8080`) are still refused.
pub(crate) fn is_service_link(var: &str, value: &str) -> bool {
    let Some(rest) = var.strip_prefix("HERALD_") else {
        return false;
    };
    if rest.contains("__") {
        return false;
    }
    let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let address = |s: &str| s.parse::<std::net::IpAddr>().is_ok();
    let url = |s: &str| {
        ["tcp://", "udp://", "sctp://"].iter().any(|p| {
            s.strip_prefix(p)
                .is_some_and(|a| a.parse::<SocketAddr>().is_ok())
        })
    };
    let tokens: Vec<&str> = rest.split('_').collect();
    (0..tokens.len()).any(|i| match &tokens[i..] {
        ["SERVICE", "HOST"] => address(value),
        ["SERVICE", "PORT", ..] => number(value),
        ["PORT"] => url(value),
        ["PORT", n, proto, tail @ ..] if number(n) && matches!(*proto, "TCP" | "UDP" | "SCTP") => {
            match tail {
                [] => url(value),
                ["PROTO"] => matches!(value, "tcp" | "udp" | "sctp"),
                ["PORT"] => number(value),
                ["ADDR"] => address(value),
                _ => false,
            }
        }
        _ => false,
    })
}

impl Settings {
    /// Builds the settings from `cli` and an environment given as a map (the process
    /// environment in `main`, a literal map in tests). Unknown keys are errors, so a
    /// typo never silently leaves a default in place.
    pub fn load(cli: &Cli, env: HashMap<String, String>) -> Result<Self, String> {
        let defaults = config::Config::try_from(&Settings::default()).map_err(|e| e.to_string())?;
        let mut b = config::Config::builder().add_source(defaults);
        if let Some(path) = &cli.config {
            b = b.add_source(config::File::from(path.as_path()).required(true));
        }
        // Lists are comma-separated in the environment. The config crate splits lists
        // only when it also guesses every value's type (turning an API key "000123"
        // into the number 123), so lists are split here and every other value stays a
        // string that its field's type parses.
        let mut env = env;
        let mut ignored_env: Vec<String> = env
            .iter()
            .filter(|(k, v)| is_service_link(k, v))
            .map(|(k, _)| k.clone())
            .collect();
        ignored_env.sort();
        for k in &ignored_env {
            env.remove(k);
        }
        let mut lists = Vec::new();
        for (var, key) in LIST_VARS {
            if let Some(v) = env.remove(*var) {
                let items: Vec<String> = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                lists.push((*key, items));
            }
        }
        b = b.add_source(
            config::Environment::with_prefix("HERALD")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(false)
                .source(Some(env)),
        );
        for (key, items) in lists {
            b = b.set_override(key, items).map_err(|e| e.to_string())?;
        }
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
        if cli.demo {
            b = b.set_override("demo", true).map_err(|e| e.to_string())?;
        }
        let merged = b.build().map_err(|e| e.to_string())?;
        // The gateway's keys are flattened into the top level, where serde cannot deny
        // unknown fields (every section below does): check the top level here.
        let top: HashMap<String, config::Value> = merged
            .clone()
            .try_deserialize()
            .map_err(|e| e.to_string())?;
        let known = top_level_keys();
        if let Some(key) = top.keys().find(|k| !known.contains(k.as_str())) {
            return Err(format!("{key}: unknown key (herald.toml lists every key)"));
        }
        // The process's own keys, then the gateway's (which ignores the process's).
        let process: ProcessSettings = merged.clone().try_deserialize().map_err(explain)?;
        let gateway: GatewayConfig = merged.try_deserialize().map_err(explain)?;
        let settings = Settings {
            listen: process.listen,
            internal_listen: process.internal_listen,
            log: process.log,
            redis: process.redis,
            gateway,
            ignored_env,
        };
        // A filter that parses but names no level (a typo such as "loud" reads as a
        // target name) would silence every log line: each part must be a level or
        // `target=level`.
        // (A bare target, which the filter reads as "every level there", is accepted
        // when it looks like one: a module path, `herald_server`, `tokio::net`.)
        let levels = ["trace", "debug", "info", "warn", "error", "off"];
        let parts = settings
            .log
            .level
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty());
        for part in parts {
            let target = part.contains('_') || part.contains("::");
            if !part.contains('=')
                && !target
                && !levels.contains(&part.to_ascii_lowercase().as_str())
            {
                return Err(format!(
                    "log.level: {part:?} is not a level: use one of {} or target=level \
                     (e.g. \"info,herald_redis=debug\")",
                    levels.join(", ")
                ));
            }
        }
        if !matches!(settings.log.format.as_str(), "text" | "json") {
            return Err(format!(
                "log.format: expected \"text\" or \"json\", got {:?}",
                settings.log.format
            ));
        }
        settings.gateway.validate().map_err(|e| e.to_string())?;
        // The publish API and /metrics are served on internal_listen, or on listen when
        // there is no internal listener. Reachable from other hosts with no key, anyone
        // there can publish to every client: refuse, unless the operator says so.
        let api = settings.internal_listen.unwrap_or(settings.listen);
        let auth = &settings.gateway.auth;
        let keyless = auth.api_key.is_none() && auth.api_keys.is_empty();
        if !api.ip().is_loopback() && keyless && !auth.public_api_without_key {
            return Err(format!(
                "the publish API and /metrics would be served on {api} with no key: set \
                 auth.api_key (HERALD_AUTH__API_KEY), or serve them on a loopback \
                 internal_listen (e.g. --internal-listen 127.0.0.1:9090), or set \
                 auth.public_api_without_key = true to accept that anyone reaching {api} \
                 can publish"
            ));
        }
        if settings.gateway.websocket.echo && !settings.listen.ip().is_loopback() {
            return Err(format!(
                "websocket.echo: echo mode is for conformance tests on a loopback listener, not {}",
                settings.listen
            ));
        }
        settings.redis.validate().map_err(|e| e.to_string())?;
        Ok(settings)
    }

    /// The settings as TOML, as `--check-config` prints them.
    /// Secrets are never printed: the API key appears as a fingerprint (enough to tell
    /// which key a node has), the Redis URL without its password.
    pub fn to_toml(&self) -> Result<String, String> {
        let mut shown = self.clone();
        for k in &mut shown.gateway.auth.api_keys {
            k.key = fingerprint(&k.key);
        }
        if let Some(key) = &shown.gateway.auth.api_key {
            shown.gateway.auth.api_key = Some(fingerprint(key));
        }
        if let Some(key) = &shown.gateway.auth.metrics_key {
            shown.gateway.auth.metrics_key = Some(fingerprint(key));
        }
        if let Some(secret) = &shown.gateway.auth.jwt.hmac_secret {
            shown.gateway.auth.jwt.hmac_secret = Some(fingerprint(secret));
        }
        shown.redis.url = shown
            .redis
            .url
            .split(',')
            .map(herald_redis::redacted)
            .collect::<Vec<_>>()
            .join(",");
        toml::to_string(&shown).map_err(|e| e.to_string())
    }
}

/// `sha1:` and the first 12 hex digits of the SHA-1 of `secret`: identifies a key
/// without revealing it.
pub fn fingerprint(secret: &str) -> String {
    let digest = sha1_smol::Sha1::from(secret).digest().to_string();
    format!("sha1:{}", &digest[..12])
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
        assert_eq!(s.gateway.limits.max_connections, 10_000);
        assert_eq!(s.gateway.heartbeat.interval, Duration::from_secs(25));
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
        assert_eq!(s.gateway.limits.max_connections, 6, "env beats file");
        assert_eq!(s.gateway.limits.max_subscriptions, 7, "file beats defaults");
        assert_eq!(s.gateway.node_id, "from-flag", "flags beat env");
        assert_eq!(s.gateway.heartbeat.interval, Duration::from_secs(3));
        assert!(s.gateway.channels.client_publish.matches("chat:x"));
        assert!(s.gateway.channels.client_publish.matches("news"));
    }

    /// A Service named `herald` (or `herald-internal`) makes Kubernetes inject these
    /// into every pod of its namespace; Herald once refused them and crash-looped.
    #[test]
    fn kubernetes_service_links_are_ignored_and_typos_still_refused() {
        let links = [
            ("HERALD_SERVICE_HOST", "10.96.0.12"),
            ("HERALD_SERVICE_PORT", "8080"),
            ("HERALD_SERVICE_PORT_WS", "8080"),
            ("HERALD_PORT", "tcp://10.96.0.12:8080"),
            ("HERALD_PORT_8080_TCP", "tcp://10.96.0.12:8080"),
            ("HERALD_PORT_8080_TCP_PROTO", "tcp"),
            ("HERALD_PORT_8080_TCP_PORT", "8080"),
            ("HERALD_PORT_8080_TCP_ADDR", "10.96.0.12"),
            ("HERALD_INTERNAL_SERVICE_HOST", "10.96.0.13"),
            ("HERALD_INTERNAL_SERVICE_PORT_METRICS", "9090"),
            ("HERALD_INTERNAL_PORT_9090_TCP_ADDR", "10.96.0.13"),
        ];
        let mut all = links.to_vec();
        all.push(("HERALD_NODE_ID", "pod-1"));
        let s = Settings::load(&Cli::default(), env(&all)).unwrap();
        assert_eq!(s.gateway.node_id, "pod-1");
        assert_eq!(s.ignored_env.len(), links.len(), "{:?}", s.ignored_env);
        for (typo, v) in [
            ("HERALD_PORT_8080", "x"),
            ("HERALD_SERVICEHOST", "10.0.0.1"),
            ("HERALD_LISTEN_PORT", "8080"),
            ("HERALD_SERVICE_HOST", "not-an-address"),
            ("HERALD_REDIS__PORT", "1"),
        ] {
            let e = Settings::load(&Cli::default(), env(&[(typo, v)])).unwrap_err();
            assert!(e.contains("unknown") || e.contains("port"), "{typo}: {e}");
        }
    }

    #[test]
    fn unknown_keys_are_refused_at_every_level() {
        for (k, v) in [
            ("HERALD_LIMTIS__MAX_CONNECTIONS", "5"),
            ("HERALD_NODEID", "x"),
        ] {
            let e = Settings::load(&Cli::default(), env(&[(k, v)])).unwrap_err();
            assert!(e.contains("unknown"), "{k}: {e}");
        }
        let e = Settings::load(
            &Cli::default(),
            env(&[("HERALD_LIMITS__MAX_CONECTIONS", "5")]),
        )
        .unwrap_err();
        assert!(e.contains("max_conections"), "{e}");
    }

    fn load_file(name: &str, text: &str) -> Result<Settings, String> {
        let dir = std::env::temp_dir().join(format!("herald-rules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(name);
        std::fs::write(&file, text).unwrap();
        let cli = Cli {
            config: Some(file),
            ..Cli::default()
        };
        Settings::load(&cli, HashMap::new())
    }

    #[test]
    fn configuration_errors_are_in_the_words_of_herald_toml() {
        let cases = [
            (
                "[[channels.rules]]\npattern = \"x*\"\nsubscribe = \"everyone\"\n",
                r#"channels.rules[0].subscribe: "everyone" is not one of "anyone", "authenticated", "claims""#,
            ),
            (
                "[[channels.rules]]\npattern = \"x*\"\npublish = \"all\"\n",
                r#"channels.rules[0].publish: "all" is not one of "nobody", "anyone", "authenticated", "claims""#,
            ),
            (
                "listen = \":8080\"\n",
                r#"listen: ":8080" is not an address: write IP:PORT, e.g. "0.0.0.0:8080""#,
            ),
            (
                "internal_listen = \"9090\"\n",
                r#"internal_listen: "9090" is not an address"#,
            ),
            (
                "[log]\nlevel = \"loud\"\n",
                r#"log.level: "loud" is not a level"#,
            ),
            (
                "[shutdown]\ndrain_window = \"5\"\n",
                r#"shutdown.drain_window: invalid value: string "5", expected a duration (a number with a unit: "500ms""#,
            ),
        ];
        for (text, want) in cases {
            let err = load_file("words.toml", text).err().unwrap_or_default();
            assert!(err.starts_with(want), "{text:?}\n got: {err}\nwant: {want}");
        }
        // Still accepted: levels with targets, a trailing comma, a bare module path.
        for ok in [
            "info,herald_redis=debug",
            "info,",
            "herald_server",
            "warn,tokio::net=off",
            "INFO",
        ] {
            let text = format!("[log]\nlevel = {ok:?}\n");
            assert!(load_file("words-ok.toml", &text).is_ok(), "{ok}");
        }
    }

    #[test]
    fn channel_rules_are_read_checked_and_printed() {
        let s = load_file(
            "rules.toml",
            "[[channels.rules]]\npattern = \"news:*\"\nhistory_size = 50\nhistory_ttl = \"1m\"\n\n[[channels.rules]]\npattern = \"*\"\n",
        )
        .unwrap();
        let c = &s.gateway.channels;
        assert_eq!(c.history("news:a").map(|h| h.size), Some(50));
        assert_eq!(
            c.history("chat"),
            None,
            "the catch-all rule keeps no history"
        );
        let printed = s.to_toml().unwrap();
        assert!(printed.contains("[[channels.rules]]"), "{printed}");
        assert!(printed.contains("subscribe = \"anyone\""), "{printed}");
        let s = load_file(
            "access.toml",
            "[[channels.rules]]\npattern = \"user:{sub}:*\"\nsubscribe = \"authenticated\"\npublish = \"claims\"\n",
        )
        .unwrap();
        let rule = s.gateway.channels.rule("user:1:a").unwrap();
        assert_eq!(
            rule.subscribe,
            herald_server::config::SubscribeAccess::Authenticated
        );
        assert_eq!(rule.publish, herald_server::config::PublishAccess::Claims);
        assert!(printed.contains("pattern = \"news:*\""), "{printed}");
        for (bad, says) in [
            ("pattern = \"a b\"", "invalid channel pattern"),
            (
                "pattern = \"x\"\nhistory_size = 5\nhistory_ttl = \"48h\"",
                "history_meta_ttl",
            ),
            ("pattern = \"x\"\nhistory_size = 2000000", "history_size"),
            ("pattern = \"x\"\nhistroy_size = 5", "histroy_size"),
            ("pattern = \"x\"\nsubscribe = \"everyone\"", "everyone"),
            ("pattern = \"x\"\npublish = \"all\"", "all"),
        ] {
            let e = load_file("bad.toml", &format!("[[channels.rules]]\n{bad}\n")).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn check_config_output_is_toml_that_loads_back() {
        let s = Settings::load(
            &Cli::default(),
            env(&[
                ("HERALD_CHANNELS__CLIENT_PUBLISH", "chat:*"),
                ("HERALD_NODE_ID", "n1"),
            ]),
        )
        .unwrap();
        let text = s.to_toml().unwrap();
        assert!(text.contains("[limits]"), "{text}");
        let dir = std::env::temp_dir().join(format!("herald-toml-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("printed.toml");
        std::fs::write(&file, &text).unwrap();
        let cli = Cli {
            config: Some(file),
            ..Cli::default()
        };
        let back = Settings::load(&cli, HashMap::new()).unwrap();
        assert_eq!(back.to_toml().unwrap(), text);
        assert_eq!(back.gateway.node_id, "n1");
    }

    #[test]
    fn strings_from_the_environment_stay_strings() {
        let s = Settings::load(
            &Cli::default(),
            env(&[
                ("HERALD_AUTH__API_KEY", "000123"),
                ("HERALD_NODE_ID", "007"),
                ("HERALD_LIMITS__MAX_CONNECTIONS", "42"),
                ("HERALD_LIMITS__MESSAGES_PER_SECOND", "2.5"),
                ("HERALD_SHUTDOWN__RESTART", "true"),
                (
                    "HERALD_AUTH__ALLOWED_ORIGINS",
                    "https://a.example,https://b.example",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(s.gateway.auth.api_key.as_deref(), Some("000123"));
        assert_eq!(s.gateway.node_id, "007");
        assert_eq!(s.gateway.limits.max_connections, 42);
        assert_eq!(s.gateway.limits.messages_per_second, 2.5);
        assert!(s.gateway.shutdown.restart);
        assert_eq!(s.gateway.auth.allowed_origins.len(), 2);
    }

    #[test]
    fn a_public_api_needs_a_key_or_an_explicit_opt_out() {
        let public = ("HERALD_LISTEN", "0.0.0.0:8080");
        let e = Settings::load(&Cli::default(), env(&[public])).unwrap_err();
        assert!(e.contains("auth.api_key"), "{e}");
        for extra in [
            ("HERALD_AUTH__API_KEY", "k"),
            ("HERALD_INTERNAL_LISTEN", "127.0.0.1:9090"),
            ("HERALD_AUTH__PUBLIC_API_WITHOUT_KEY", "true"),
        ] {
            assert!(
                Settings::load(&Cli::default(), env(&[public, extra])).is_ok(),
                "{extra:?}"
            );
        }
        // A public internal listener is public too.
        let e = Settings::load(
            &Cli::default(),
            env(&[("HERALD_INTERNAL_LISTEN", "0.0.0.0:9090")]),
        )
        .unwrap_err();
        assert!(e.contains("0.0.0.0:9090"), "{e}");
    }

    #[test]
    fn echo_mode_is_refused_off_loopback() {
        let echo = ("HERALD_WEBSOCKET__ECHO", "true");
        assert!(Settings::load(&Cli::default(), env(&[echo])).is_ok());
        let e = Settings::load(
            &Cli::default(),
            env(&[
                echo,
                ("HERALD_LISTEN", "0.0.0.0:8080"),
                ("HERALD_AUTH__API_KEY", "k"),
            ]),
        )
        .unwrap_err();
        assert!(e.contains("websocket.echo"), "{e}");
    }

    #[test]
    fn check_config_never_prints_secrets() {
        let s = Settings::load(
            &Cli::default(),
            env(&[
                ("HERALD_AUTH__API_KEY", "k-very-secret-123"),
                (
                    "HERALD_AUTH__JWT__HMAC_SECRET",
                    "jwt-secret-jwt-secret-jwt-secret-0001",
                ),
                ("HERALD_REDIS__URL", "redis://app:hunter2@redis:6379/0"),
            ]),
        )
        .unwrap();
        let text = s.to_toml().unwrap();
        assert!(!text.contains("k-very-secret-123"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("jwt-secret-jwt-secret"), "{text}");
        assert!(text.contains(&fingerprint("k-very-secret-123")), "{text}");
        assert!(text.contains("redis://app:***@redis:6379/0"), "{text}");
        // The settings themselves keep the key.
        assert_eq!(s.gateway.auth.api_key.as_deref(), Some("k-very-secret-123"));
        // Scoped keys from a file: fingerprints only.
        let s = load_file(
            "keys.toml",
            "[[auth.api_keys]]\nkey = \"scoped-secret-777\"\nchannels = [\"news:*\"]\n",
        )
        .unwrap();
        let text = s.to_toml().unwrap();
        assert!(!text.contains("scoped-secret-777"), "{text}");
        assert!(text.contains(&fingerprint("scoped-secret-777")), "{text}");
        assert!(text.contains("news:*"), "{text}");
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
