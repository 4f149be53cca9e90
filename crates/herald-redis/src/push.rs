//! Messages Redis pushes to the node: decoded and handed to the hub without waiting.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use herald_metrics::{DropReason, Source};
use herald_protocol::envelope::{self, Origin};
use herald_protocol::{ChannelName, Publication};
use redis::{PushInfo, PushKind, Value};

use crate::shared::Inner;

/// Called by the connection's reader for every push: hands messages to the hub without
/// waiting (dropping and counting when the hub is full) and reports disconnects.
pub(crate) fn push_handler(
    inner: &Inner,
    generation: u64,
) -> impl Fn(PushInfo) -> Result<(), std::convert::Infallible> + Send + Sync + 'static {
    // The handler outlives any borrow of `inner`; it takes what it needs.
    let inbound = inner.inbound.clone();
    let metrics = inner.metrics.clone();
    let prefix = inner.config.prefix.clone();
    let current = inner.generation.clone();
    let lost = inner.lost.clone();
    let lost_generation = inner.lost_generation.clone();
    move |info: PushInfo| {
        match info.kind {
            // A connection the supervisor has given up (a probe timed out, a resubscribe
            // failed) may still be alive for a moment, subscribed: its messages also
            // reach the connection that replaced it, and passing both on would deliver
            // a plain channel's message twice. Dropped and counted; history channels
            // repair from the stream either way.
            PushKind::Message | PushKind::SMessage
                if current.load(Ordering::Acquire) != generation =>
            {
                metrics.dropped(DropReason::StaleConnection, 1);
            }
            PushKind::Message | PushKind::SMessage => {
                if let Some(p) = decode_push(&prefix, info.data) {
                    let (p, origin) = p;
                    if origin == Origin::Raw {
                        metrics.published(Source::External, 1);
                    }
                    let _ = inbound.try_send(p);
                }
            }
            PushKind::Disconnection if current.load(Ordering::Acquire) == generation => {
                lost_generation.store(generation, Ordering::Release);
                lost.notify_one();
            }
            _ => {}
        }
        Ok(())
    }
}

fn decode_push(prefix: &str, data: Vec<Value>) -> Option<(Publication, Origin)> {
    let mut it = data.into_iter();
    let channel = bulk(it.next()?)?;
    let body = bulk(it.next()?)?;
    let name = channel.strip_prefix(prefix.as_bytes())?;
    let channel = ChannelName::from_bytes_or_internal(name).ok()?;
    Some(envelope::decode(channel, body))
}

fn bulk(v: Value) -> Option<Bytes> {
    match v {
        Value::BulkString(b) => Some(Bytes::from(b)),
        Value::SimpleString(s) => Some(Bytes::from(s)),
        _ => None,
    }
}
