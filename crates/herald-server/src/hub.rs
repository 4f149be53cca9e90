//! The hub: which local sessions subscribe to which channel, and fan-out.
//!
//! The channel map is sharded by channel hash so subscribe/unsubscribe churn on one
//! channel does not contend with fan-out on another. Fan-out encodes a publication once
//! ([`herald_protocol::server::encode_delivery`]) and pushes a cheap clone of the same
//! bytes into each subscriber's [`SessionHandle`]; it never awaits, so one slow
//! subscriber can only ever hurt itself.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use herald_broker::{Broker, InboundReceiver, Ready};
use herald_metrics::Metrics;
use herald_protocol::server::{encode_delivery, Delivery};
use herald_protocol::{ChannelName, Publication};
use indexmap::IndexMap;
use parking_lot::RwLock;
use tokio_tungstenite::tungstenite::Message;

use crate::handle::{Item, SessionHandle};

/// A node-local session id.
pub(crate) type ConnId = u64;

const SHARDS: usize = 32;

struct Channel {
    subscribers: IndexMap<ConnId, Arc<SessionHandle>>,
    /// Whether the broker delivers this channel yet.
    ready: Ready,
}

pub(crate) struct Hub {
    shards: Box<[RwLock<HashMap<ChannelName, Channel>>]>,
    hasher: RandomState,
    broker: Arc<dyn Broker>,
    metrics: Metrics,
}

impl Hub {
    pub(crate) fn new(broker: Arc<dyn Broker>, metrics: Metrics) -> Self {
        Hub {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            hasher: RandomState::new(),
            broker,
            metrics,
        }
    }

    pub(crate) fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    fn shard(&self, channel: &str) -> &RwLock<HashMap<ChannelName, Channel>> {
        &self.shards[self.hasher.hash_one(channel) as usize % SHARDS]
    }

    /// Adds `conn` to `channel`'s subscribers; the returned [`Ready`] tells when the
    /// broker delivers the channel.
    pub(crate) fn subscribe(
        &self,
        channel: &ChannelName,
        conn: ConnId,
        handle: &Arc<SessionHandle>,
    ) -> Ready {
        let mut shard = self.shard(channel.as_str()).write();
        let entry = shard.entry(channel.clone()).or_insert_with(|| {
            // Under the shard lock, so interest changes for one channel reach the broker
            // in the order they happened.
            self.metrics.channels.inc();
            Channel {
                subscribers: IndexMap::new(),
                ready: self.broker.subscribe(channel),
            }
        });
        if entry.subscribers.insert(conn, handle.clone()).is_none() {
            self.metrics.subscriptions.inc();
        }
        entry.ready.clone()
    }

    /// Removes `conn` from `channel`'s subscribers. Returns whether it was one.
    pub(crate) fn unsubscribe(&self, channel: &ChannelName, conn: ConnId) -> bool {
        let mut shard = self.shard(channel.as_str()).write();
        let Some(entry) = shard.get_mut(channel.as_str()) else {
            return false;
        };
        let removed = entry.subscribers.swap_remove(&conn).is_some();
        if removed {
            self.metrics.subscriptions.dec();
        }
        if entry.subscribers.is_empty() {
            shard.remove(channel.as_str());
            self.broker.unsubscribe(channel);
            self.metrics.channels.dec();
        }
        removed
    }

    /// Local subscribers of `channel` (for tests and introspection).
    #[cfg(test)]
    pub(crate) fn n_subscribers(&self, channel: &str) -> usize {
        self.shard(channel)
            .read()
            .get(channel)
            .map_or(0, |c| c.subscribers.len())
    }

    /// Delivers `p` to every local subscriber of its channel.
    pub(crate) fn dispatch(&self, p: &Publication) {
        let shard = self.shard(p.channel.as_str()).read();
        let Some(entry) = shard.get(p.channel.as_str()) else {
            return;
        };
        let (msg, len) = match encode_delivery(p) {
            Delivery::Text(s) => {
                let len = s.len();
                (Message::Text(s.into()), len)
            }
            Delivery::Binary(b) => {
                let len = b.len();
                (Message::Binary(b), len)
            }
        };
        let item = Item {
            msg,
            len,
            published_at_us: p.published_at_us,
            delivery: true,
        };
        SessionHandle::push_to_all(entry.subscribers.values(), &item, &self.metrics);
    }

    /// Feeds publications from the broker into fan-out until every sender is gone.
    pub(crate) async fn run_dispatcher(self: Arc<Self>, mut inbound: InboundReceiver) {
        let mut batch = Vec::with_capacity(64);
        while inbound.recv_many(&mut batch, 64).await > 0 {
            for p in batch.drain(..) {
                self.dispatch(&p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use herald_broker::{inbound, MemoryBroker};
    use herald_protocol::Payload;

    fn hub() -> Hub {
        let metrics = Metrics::unregistered();
        let (tx, _rx) = inbound(8, metrics.clone());
        Hub::new(Arc::new(MemoryBroker::new(tx)), metrics)
    }

    #[test]
    fn fan_out_shares_one_encoding() {
        let hub = hub();
        let news = ChannelName::new("news").unwrap();
        let env = crate::handle::tests::env(1 << 20);
        let a = Arc::new(SessionHandle::new(0, env.clone()));
        let b = Arc::new(SessionHandle::new(0, env.clone()));
        assert!(hub.subscribe(&news, 1, &a).is_ready());
        hub.subscribe(&news, 1, &a);
        hub.subscribe(&news, 2, &b);
        assert_eq!(hub.n_subscribers("news"), 2);
        hub.dispatch(&Publication::now(
            news.clone(),
            Payload::Json(Bytes::from_static(b"1")),
        ));
        let (mut qa, mut qb) = (Vec::new(), Vec::new());
        a.drain(&mut qa);
        b.drain(&mut qb);
        let (Message::Text(ta), Message::Text(tb)) = (&qa[0].msg, &qb[0].msg) else {
            panic!("expected text");
        };
        assert_eq!(ta.as_str(), r#"{"op":"message","channel":"news","data":1}"#);
        // The same allocation, not two copies.
        assert_eq!(ta.as_str().as_ptr(), tb.as_str().as_ptr());
        assert!(hub.unsubscribe(&news, 1));
        assert!(hub.unsubscribe(&news, 2));
        assert_eq!(hub.n_subscribers("news"), 0);
        assert!(!hub.unsubscribe(&news, 2));
    }
}
