//! Node-wide session care: the heartbeat (and token expiry) sweeper and the drain.

use std::sync::Arc;
use std::time::Duration;

use herald_protocol::close;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::handle::{Item, Liveness};
use crate::node::Node;

/// Pings sessions that have been silent for `heartbeat.interval` and closes those that
/// then stay silent for `heartbeat.timeout`. One task for the node instead of a timer
/// per session: an idle session costs no timer, and a busy one does not re-arm a timer
/// per message.
pub(crate) async fn heartbeat(node: Arc<Node>, stop: CancellationToken) {
    let hb = node.config.heartbeat.clone();
    let interval_ms = hb.interval.as_millis() as u64;
    let timeout_ms = hb.timeout.as_millis() as u64;
    let grace = node.config.auth.expiry_grace;
    // Checks four times per shortest period, so deadlines are kept within a quarter
    // (token expiry to within a second: `exp` counts whole seconds).
    let period = (hb.interval.min(hb.timeout) / 4)
        .min((grace / 4).max(Duration::from_millis(250)))
        .max(Duration::from_millis(10));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = node.now_ms();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        for handle in node.session_handles() {
            if handle.is_expired(wall, grace) {
                tracing::debug!("token expired");
                handle.close(close::TOKEN_EXPIRED, "token expired", true);
                continue;
            }
            match handle.check_liveness(now, interval_ms, timeout_ms) {
                Liveness::Alive => {}
                Liveness::Ping => {
                    handle.push(Item::control(Message::Ping(bytes::Bytes::new()), 0));
                }
                Liveness::Dead => {
                    tracing::debug!("heartbeat timeout");
                    handle.close(close::POLICY_VIOLATION, "heartbeat timeout", true);
                }
            }
        }
    }
}

/// Closes every session, spread evenly over `window`.
pub(crate) async fn drain(node: &Node, window: Duration) {
    let sessions = node.session_handles();
    if sessions.is_empty() {
        return;
    }
    let code = node.drain_code();
    // Close in up to 100 steps rather than one timer per session.
    let steps = sessions.len().min(100);
    let per_step = sessions.len().div_ceil(steps);
    let pause = window / steps as u32;
    for (i, chunk) in sessions.chunks(per_step).enumerate() {
        if i > 0 {
            tokio::time::sleep(pause).await;
        }
        for handle in chunk {
            handle.close(code, "node shutting down", true);
        }
    }
}
