//! Herald's Prometheus metrics.
//!
//! [`Metrics::new`] registers every metric into a [`Registry`] that the caller (the
//! `herald` binary, or a test) creates and owns; there is no global registry, so several
//! nodes can run in one test process without sharing counters.
//!
//! Names carry the `herald_` prefix and labels come from small closed sets (a reason, a
//! source, a close code) — never a channel or a client — so a scrape stays cheap at any
//! number of connections. Label values are resolved once here, so the hot paths touch
//! one atomic per update and never hash a label.
//!
//! Every metric is documented in `ARCHITECTURE.md` ("Metrics").
#![deny(missing_docs)]

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

pub use prometheus;

/// Why a connection attempt was refused before it became a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The node holds its configured maximum of connections.
    Limit,
    /// The HTTP upgrade did not complete within the handshake timeout.
    HandshakeTimeout,
    /// The upgrade request was malformed (not a WebSocket upgrade).
    BadRequest,
    /// The `Origin` header is not on the allowed list.
    Origin,
    /// The node is draining.
    Draining,
    /// The node holds `limits.max_http_connections` HTTP connections already.
    HttpLimit,
    /// No token where one is required, or a token that does not verify.
    Unauthorized,
    /// The client's address holds `limits.max_connections_per_ip` sessions already.
    PerIp,
    /// The token's user holds `limits.max_connections_per_user` sessions already.
    PerUser,
    /// A connection to a listener that expects a PROXY protocol header came without a
    /// valid one.
    ProxyProtocol,
    /// An SSE connection named a channel its client may not subscribe to.
    Forbidden,
    /// The TLS handshake on a `[tls]` listener failed (not TLS, no common version or
    /// cipher, the client refused the certificate).
    Tls,
    /// The connect hook (the application's backend) refused the client.
    HookRefused,
    /// The connect hook gave no answer (down, too slow, not a hook answer): failed
    /// closed.
    HookFailed,
}

/// Why a message was not delivered to a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The subscriber's outbound queue was full; the subscriber is disconnected.
    SlowConsumer,
    /// The node's inbound queue from the broker was full.
    HubOverflow,
    /// The subscriber's connection ended (closed, failed, or timed out writing) with
    /// messages still queued for it.
    Disconnected,
    /// It came over a broker connection the node had already given up and replaced:
    /// passing it on could deliver it twice (the replacement delivers it too).
    StaleConnection,
}

/// Where a publication entered the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Herald's HTTP API.
    Http,
    /// A WebSocket client's publish op or binary frame.
    Client,
    /// Received from the broker without a Herald envelope (a backend published straight
    /// into it).
    External,
}

/// Handles to every Herald metric.
#[derive(Clone)]
pub struct Metrics {
    /// Sessions (WebSocket and SSE) currently open.
    pub connections: IntGauge,
    /// Sessions currently open over WebSocket (`herald_connections_by_transport`).
    pub websocket_sessions: IntGauge,
    /// Sessions currently open over Server-Sent Events.
    pub sse_sessions: IntGauge,
    /// The configured connection limit (for "near the limit" alerts).
    pub max_connections: IntGauge,
    /// Channel subscriptions currently held by sessions on this node.
    pub subscriptions: IntGauge,
    /// Channels with at least one local subscriber.
    pub channels: IntGauge,
    /// Sessions opened.
    pub connections_opened: IntCounter,
    /// Sessions closed, for any reason.
    pub connections_closed: IntCounter,
    rejected_limit: IntCounter,
    rejected_handshake: IntCounter,
    rejected_bad_request: IntCounter,
    rejected_origin: IntCounter,
    rejected_draining: IntCounter,
    rejected_http_limit: IntCounter,
    rejected_per_ip: IntCounter,
    rejected_per_user: IntCounter,
    rejected_proxy: IntCounter,
    rejected_tls: IntCounter,
    rejected_hook_refused: IntCounter,
    rejected_hook_failed: IntCounter,
    rejected_forbidden: IntCounter,
    rejected_unauthorized: IntCounter,
    close_codes: IntCounterVec,
    published_http: IntCounter,
    published_client: IntCounter,
    published_external: IntCounter,
    /// Frames written to subscribers' sockets (one per subscriber per message).
    pub delivered: IntCounter,
    dropped_slow: IntCounter,
    dropped_overflow: IntCounter,
    dropped_disconnected: IntCounter,
    dropped_stale: IntCounter,
    /// Socket writes that made no progress for `websocket.write_timeout` (or close
    /// frames not written in time): the socket was dropped.
    pub write_timeouts: IntCounter,
    /// Sessions closed with 1013 because they could not keep up.
    pub slow_consumer_disconnects: IntCounter,
    /// Bytes waiting in all sessions' outbound queues.
    pub outbound_queue_bytes: IntGauge,
    /// Error frames sent to clients, by code.
    pub client_errors: IntCounterVec,
    /// 1 while the broker is connected and usable, else 0.
    pub broker_up: IntGauge,
    /// Broker (re)connections after a failure.
    pub broker_reconnects: IntCounter,
    /// Redis Cluster: a shard's subscriptions re-established after one master's
    /// connection was lost, without reconnecting the others.
    pub broker_repairs: IntCounter,
    /// Time for the broker to accept a publish.
    pub broker_publish_seconds: Histogram,
    /// Time from the publishing node accepting a message to this node writing it to a
    /// subscriber's socket (sampled once per socket write batch).
    pub delivery_lag_seconds: Histogram,
    /// Subscribes with `since` that resumed with every missed publication.
    pub recovered: IntCounter,
    /// Subscribes with `since` that could not resume (told `recovered:false`).
    pub not_recovered: IntCounter,
    /// History subscribers whose queue filled, caught up in place from the history once
    /// their queue was written.
    pub history_catch_ups: IntCounter,
    /// Publications delivered from history to resuming subscribers.
    pub replayed: IntCounter,
    /// Resumes refused because their replay would not fit the subscriber's queue (told
    /// `recovered:false`; also counted in `not_recovered`).
    pub replays_refused: IntCounter,
    /// Publications sent as Fossil deltas (once per publication and node, whatever the
    /// number of subscribers that took the delta).
    pub delta_sent: IntCounter,
    /// Publications whose delta was not smaller than the data (or not UTF-8): sent
    /// whole to the subscribers that wanted a delta.
    pub delta_whole: IntCounter,
    /// Publications sent whole without trying a delta: larger than
    /// `limits.max_delta_bytes`, holding a carriage return, or on a channel whose deltas
    /// are paused after a slow one (counted too).
    pub delta_skipped: IntCounter,
    /// Gaps in a history channel's offsets that the node repaired from the stream.
    pub history_repairs: IntCounter,
    /// Publications the node fetched from streams to repair gaps.
    pub history_repaired: IntCounter,
    /// Gaps or epoch changes the node could not repair; its subscribers got a `reset`.
    pub history_unrepairable: IntCounter,
    /// Publications of a history channel that arrived again (already delivered) and
    /// were skipped.
    pub history_duplicates: IntCounter,
    /// Publications of an epoch the stream had already left when they arrived (an old
    /// epoch's, still in flight): skipped.
    pub history_stale: IntCounter,
    /// Time for the broker's history script (a publish batch on history channels).
    pub history_script_seconds: Histogram,
    /// Control messages between nodes dropped because the node's control queue was full.
    pub control_dropped: IntCounter,
    /// Control commands this node carried out (from any node's survey), by command.
    pub control_commands: IntCounterVec,
    /// Surveys this node ran for the control API, by outcome (complete: every known
    /// node answered; incomplete: some did not in time; failed: the broker refused).
    pub control_surveys: IntCounterVec,
    /// Nodes this node knows in the cluster (itself included): heard from within the
    /// control plane's window.
    pub cluster_nodes: IntGauge,
    /// Presence members on this node (connections present in a presence channel).
    pub presence_members: IntGauge,
    /// Presence events: `join`/`leave` announced, `unsent` (the broker refused the
    /// announcement), `deferred` (the broker refused the change; the refresh or the TTL
    /// settles it).
    pub presence_events: IntCounterVec,
    /// Hook calls to the application's backend, by hook and outcome (result, error,
    /// disconnect; timeout, failed, bad_answer: refused, failing closed).
    pub hook_calls: IntCounterVec,
    /// How long hook calls took, by hook.
    pub hook_seconds: HistogramVec,
    /// Webhook events, by event and outcome: `queued` (by this node), `dropped` (the
    /// queue was full: never delivered), `delivered`, `retried` (an attempt failed and
    /// is repeated), `failed` (every attempt failed: given up), `retaken` (taken over
    /// from a node that did not finish it).
    pub webhook_events: IntCounterVec,
}

impl Metrics {
    /// Creates every metric and registers it, with the process collector and build
    /// info, into `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let counter_vec =
            |name: &str, help: &str, label: &str| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let histogram =
            |name: &str, help: &str, buckets: Vec<f64>| -> Result<Histogram, prometheus::Error> {
                let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let latency_buckets = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0,
        ];

        let by_transport = IntGaugeVec::new(
            Opts::new(
                "herald_connections_by_transport",
                "Sessions currently open, by transport (websocket, sse); they add up to herald_connections.",
            ),
            &["transport"],
        )?;
        registry.register(Box::new(by_transport.clone()))?;
        let rejected = counter_vec(
            "herald_connections_rejected_total",
            "Connection attempts refused before a session began, by reason.",
            "reason",
        )?;
        let published = counter_vec(
            "herald_messages_published_total",
            "Publications accepted by this node, by where they entered (http, client) or, for publications received from the broker without a Herald envelope, external.",
            "source",
        )?;
        let dropped = counter_vec(
            "herald_messages_dropped_total",
            "Messages not delivered, by reason (slow_consumer and disconnected: per subscriber; hub_overflow and stale_connection: per message).",
            "reason",
        )?;

        let recoveries = counter_vec(
            "herald_recoveries_total",
            "Subscribes that asked to resume (since), by outcome (recovered, not_recovered); and caught_up: history subscribers whose queue filled, caught up in place from the history once it was written (one that could not be is closed as a slow consumer instead).",
            "outcome",
        )?;

        let deltas = counter_vec(
            "herald_delta_publications_total",
            "Publications on delta channels with subscribers holding the one before, by outcome: delta (sent as a Fossil delta), whole (the delta was not smaller, or not UTF-8: sent whole), skipped (sent whole without a delta: larger than limits.max_delta_bytes, holding a carriage return, or the channel's deltas paused for 10 s after one took over 2 ms).",
            "outcome",
        )?;

        let build = IntGaugeVec::new(
            Opts::new("herald_build_info", "Always 1; labels carry the build."),
            &["version"],
        )?;
        registry.register(Box::new(build.clone()))?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);

        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        let close_codes = counter_vec(
            "herald_close_codes_total",
            "Close frames sent by the server, by WebSocket close code.",
            "code",
        )?;
        let client_errors = counter_vec(
            "herald_client_errors_total",
            "Error frames sent to WebSocket clients, by error code.",
            "code",
        )?;
        // Create the known series up front, so they read 0 (not absent) until used and
        // rate() works from the first increment.
        for code in [
            "1000", "1001", "1008", "1009", "1011", "1012", "1013", "4001", "4400",
        ] {
            close_codes.with_label_values(&[code]);
        }
        for code in [
            "bad_request",
            "invalid_channel",
            "forbidden",
            "too_many_subscriptions",
            "rate_limited",
            "unavailable",
        ] {
            client_errors.with_label_values(&[code]);
        }

        let control_commands = counter_vec(
            "herald_control_commands_total",
            "Control commands this node carried out for a survey (its own or another node's), by command.",
            "command",
        )?;
        for c in ["disconnect", "subscribe", "unsubscribe", "channels", "info"] {
            control_commands.with_label_values(&[c]);
        }
        let control_surveys = counter_vec(
            "herald_control_surveys_total",
            "Control API surveys this node ran, by outcome (complete, incomplete: a node did not answer in time, failed: not sent).",
            "outcome",
        )?;
        for o in ["complete", "incomplete", "failed"] {
            control_surveys.with_label_values(&[o]);
        }

        let presence_events = counter_vec(
            "herald_presence_events_total",
            "Presence events: join and leave announced; unsent: the broker refused an announcement; deferred: the broker refused a change (the refresh or the TTL settles it).",
            "event",
        )?;
        for e in ["join", "leave", "unsent", "deferred"] {
            presence_events.with_label_values(&[e]);
        }

        let hook_calls = IntCounterVec::new(
            Opts::new(
                "herald_hook_calls_total",
                "Calls to the application's backend (hooks), by hook and outcome: result, error, disconnect; timeout, failed, bad_answer (the request was refused: hooks fail closed).",
            ),
            &["hook", "outcome"],
        )?;
        registry.register(Box::new(hook_calls.clone()))?;
        let hook_seconds = HistogramVec::new(
            HistogramOpts::new(
                "herald_hook_seconds",
                "How long calls to the application's backend took, by hook.",
            )
            .buckets(latency_buckets.clone()),
            &["hook"],
        )?;
        registry.register(Box::new(hook_seconds.clone()))?;
        let webhook_events = IntCounterVec::new(
            Opts::new(
                "herald_webhook_events_total",
                "Webhook events, by event and outcome: queued, dropped (queue full: never delivered), delivered, retried, failed (given up after every attempt), retaken (from a node that did not finish).",
            ),
            &["event", "outcome"],
        )?;
        registry.register(Box::new(webhook_events.clone()))?;
        for event in ["channel_occupied", "channel_vacated", "join", "leave"] {
            for outcome in ["delivered", "failed", "dropped"] {
                webhook_events.with_label_values(&[event, outcome]);
            }
        }

        Ok(Metrics {
            connections: gauge(
                "herald_connections",
                "Sessions currently open (WebSocket and SSE).",
            )?,
            websocket_sessions: by_transport.with_label_values(&["websocket"]),
            sse_sessions: by_transport.with_label_values(&["sse"]),
            max_connections: gauge(
                "herald_max_connections",
                "The node's configured limit on sessions (WebSocket and SSE).",
            )?,
            subscriptions: gauge(
                "herald_subscriptions",
                "Channel subscriptions currently held by sessions on this node.",
            )?,
            channels: gauge(
                "herald_channels",
                "Channels with at least one subscriber on this node.",
            )?,
            connections_opened: counter(
                "herald_connections_opened_total",
                "Sessions (WebSocket and SSE) opened.",
            )?,
            connections_closed: counter(
                "herald_connections_closed_total",
                "Sessions (WebSocket and SSE) closed, for any reason.",
            )?,
            rejected_limit: rejected.with_label_values(&["limit"]),
            rejected_handshake: rejected.with_label_values(&["handshake_timeout"]),
            rejected_bad_request: rejected.with_label_values(&["bad_request"]),
            rejected_origin: rejected.with_label_values(&["origin"]),
            rejected_draining: rejected.with_label_values(&["draining"]),
            rejected_http_limit: rejected.with_label_values(&["http_limit"]),
            rejected_per_ip: rejected.with_label_values(&["per_ip"]),
            rejected_per_user: rejected.with_label_values(&["per_user"]),
            rejected_proxy: rejected.with_label_values(&["proxy_protocol"]),
            rejected_tls: rejected.with_label_values(&["tls"]),
            rejected_hook_refused: rejected.with_label_values(&["hook_refused"]),
            rejected_hook_failed: rejected.with_label_values(&["hook_failed"]),
            rejected_forbidden: rejected.with_label_values(&["forbidden"]),
            rejected_unauthorized: rejected.with_label_values(&["unauthorized"]),
            close_codes,
            published_http: published.with_label_values(&["http"]),
            published_client: published.with_label_values(&["client"]),
            published_external: published.with_label_values(&["external"]),
            delivered: counter(
                "herald_messages_delivered_total",
                "Message frames written to subscribers' sockets.",
            )?,
            dropped_slow: dropped.with_label_values(&["slow_consumer"]),
            dropped_overflow: dropped.with_label_values(&["hub_overflow"]),
            dropped_disconnected: dropped.with_label_values(&["disconnected"]),
            dropped_stale: dropped.with_label_values(&["stale_connection"]),
            write_timeouts: counter(
                "herald_write_timeouts_total",
                "Socket writes that made no progress for websocket.write_timeout; the connection was dropped.",
            )?,
            slow_consumer_disconnects: counter(
                "herald_slow_consumer_disconnects_total",
                "Sessions closed with 1013 because their outbound queue overflowed.",
            )?,
            outbound_queue_bytes: gauge(
                "herald_outbound_queue_bytes",
                "Bytes waiting in all sessions' outbound queues.",
            )?,
            client_errors,
            broker_up: gauge(
                "herald_broker_up",
                "1 while the broker is connected and usable, else 0.",
            )?,
            broker_reconnects: counter(
                "herald_broker_reconnects_total",
                "Broker reconnections after a failure.",
            )?,
            broker_repairs: counter(
                "herald_broker_repairs_total",
                "Redis Cluster: subscriptions re-established after one master's connection was lost (the other masters' connections kept).",
            )?,
            broker_publish_seconds: histogram(
                "herald_broker_publish_seconds",
                "Time for the broker to accept a publish (or a batch of them).",
                latency_buckets.clone(),
            )?,
            delivery_lag_seconds: histogram(
                "herald_delivery_lag_seconds",
                "Time from the publishing node accepting a message to this node writing it to a subscriber's socket; sampled once per socket write batch.",
                latency_buckets.clone(),
            )?,
            recovered: recoveries.with_label_values(&["recovered"]),
            not_recovered: recoveries.with_label_values(&["not_recovered"]),
            history_catch_ups: recoveries.with_label_values(&["caught_up"]),
            replayed: counter(
                "herald_publications_replayed_total",
                "Publications delivered from history to subscribers that resumed, or that were caught up in place after their queue filled.",
            )?,
            replays_refused: counter(
                "herald_replays_refused_total",
                "Resumes answered recovered:false because their replay would take more than half the subscriber's queue (limits.outbound_queue_bytes).",
            )?,
            delta_sent: deltas.with_label_values(&["delta"]),
            delta_whole: deltas.with_label_values(&["whole"]),
            delta_skipped: deltas.with_label_values(&["skipped"]),
            history_repairs: counter(
                "herald_history_repairs_total",
                "Gaps in history channels' offsets that the node repaired from the stream.",
            )?,
            history_repaired: counter(
                "herald_history_repaired_publications_total",
                "Publications fetched from streams to repair gaps.",
            )?,
            history_unrepairable: counter(
                "herald_history_unrepairable_total",
                "Gaps or epoch changes the node could not repair (subscribers got a reset frame).",
            )?,
            history_duplicates: counter(
                "herald_history_duplicates_total",
                "Publications of history channels that arrived again and were skipped.",
            )?,
            history_stale: counter(
                "herald_history_stale_total",
                "Publications of an epoch the stream had already left when they reached the node (an old epoch's, still in flight); skipped.",
            )?,
            history_script_seconds: histogram(
                "herald_history_script_seconds",
                "Time for the broker to run a publish batch on history channels.",
                latency_buckets,
            )?,
            control_dropped: counter(
                "herald_control_messages_dropped_total",
                "Control messages between nodes dropped because this node's control queue was full.",
            )?,
            control_commands,
            control_surveys,
            cluster_nodes: gauge(
                "herald_cluster_nodes",
                "Nodes this node knows in the cluster, itself included (heard from within the control heartbeat window).",
            )?,
            presence_members: gauge(
                "herald_presence_members",
                "Connections on this node present in presence channels (one per connection and channel).",
            )?,
            presence_events,
            hook_calls,
            hook_seconds,
            webhook_events,
        })
    }

    /// A connection attempt was refused.
    pub fn rejected(&self, reason: RejectReason) {
        match reason {
            RejectReason::Limit => &self.rejected_limit,
            RejectReason::HandshakeTimeout => &self.rejected_handshake,
            RejectReason::BadRequest => &self.rejected_bad_request,
            RejectReason::Origin => &self.rejected_origin,
            RejectReason::Draining => &self.rejected_draining,
            RejectReason::HttpLimit => &self.rejected_http_limit,
            RejectReason::PerIp => &self.rejected_per_ip,
            RejectReason::PerUser => &self.rejected_per_user,
            RejectReason::ProxyProtocol => &self.rejected_proxy,
            RejectReason::Tls => &self.rejected_tls,
            RejectReason::HookRefused => &self.rejected_hook_refused,
            RejectReason::HookFailed => &self.rejected_hook_failed,
            RejectReason::Forbidden => &self.rejected_forbidden,
            RejectReason::Unauthorized => &self.rejected_unauthorized,
        }
        .inc();
    }

    /// The server sent a close frame with `code`.
    pub fn close_code(&self, code: u16) {
        // The control API lets backends pick any code in 4000-4999: those outside the
        // ones Herald itself uses share one series, so the label set stays closed.
        let label = match code {
            4001 | 4400 => code.to_string(),
            4000..=4999 => "4xxx".to_owned(),
            _ => code.to_string(),
        };
        self.close_codes.with_label_values(&[label.as_str()]).inc();
    }

    /// `n` publications entered through `source`.
    pub fn published(&self, source: Source, n: u64) {
        match source {
            Source::Http => &self.published_http,
            Source::Client => &self.published_client,
            Source::External => &self.published_external,
        }
        .inc_by(n);
    }

    /// A message was dropped.
    pub fn dropped(&self, reason: DropReason, n: u64) {
        match reason {
            DropReason::SlowConsumer => &self.dropped_slow,
            DropReason::HubOverflow => &self.dropped_overflow,
            DropReason::Disconnected => &self.dropped_disconnected,
            DropReason::StaleConnection => &self.dropped_stale,
        }
        .inc_by(n);
    }

    /// Messages dropped so far for `reason`.
    pub fn dropped_total(&self, reason: DropReason) -> u64 {
        match reason {
            DropReason::SlowConsumer => &self.dropped_slow,
            DropReason::HubOverflow => &self.dropped_overflow,
            DropReason::Disconnected => &self.dropped_disconnected,
            DropReason::StaleConnection => &self.dropped_stale,
        }
        .get()
    }

    /// A fresh set of metrics in a throwaway registry, for unit tests of other crates.
    pub fn unregistered() -> Self {
        Metrics::new(&Registry::new()).expect("a fresh registry has no name clashes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Encoder;

    #[test]
    fn registers_and_encodes() {
        let registry = Registry::new();
        let m = Metrics::new(&registry).unwrap();
        m.connections.inc();
        m.rejected(RejectReason::Limit);
        m.close_code(1013);
        m.published(Source::Http, 2);
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("herald_connections 1"), "{text}");
        assert!(text.contains(r#"herald_connections_rejected_total{reason="limit"} 1"#));
        assert!(text.contains(r#"herald_close_codes_total{code="1013"} 1"#));
        assert!(text.contains(r#"herald_messages_published_total{source="http"} 2"#));
        assert!(text.contains("herald_build_info"));
        // Two nodes in one process each own their registry.
        assert!(Metrics::new(&Registry::new()).is_ok());
    }
}
