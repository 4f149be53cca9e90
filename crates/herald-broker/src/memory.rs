//! The embedded broker: one node, no external service.

use herald_protocol::{ChannelName, Publication};

use crate::{BoxFuture, Broker, BrokerError, Inbound, Ready};

/// Delivers every publication straight to this node's hub.
///
/// It ignores interest: the hub already drops channels nobody subscribes to, and with
/// one node there is nobody else to route to. Publishing waits while the hub's inbound
/// queue is full, so a fast HTTP publisher is slowed down instead of losing messages.
pub struct MemoryBroker {
    inbound: Inbound,
}

impl MemoryBroker {
    /// A broker that feeds `inbound`.
    pub fn new(inbound: Inbound) -> Self {
        MemoryBroker { inbound }
    }
}

impl Broker for MemoryBroker {
    fn publish(&self, batch: Vec<Publication>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            for p in batch {
                self.inbound
                    .send(p)
                    .await
                    .map_err(|_| BrokerError::Closed)?;
            }
            Ok(())
        })
    }

    fn subscribe(&self, _channel: &ChannelName) -> Ready {
        Ready::now()
    }

    fn unsubscribe(&self, _channel: &ChannelName) {}

    fn is_up(&self) -> bool {
        true
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound;
    use bytes::Bytes;
    use herald_metrics::Metrics;
    use herald_protocol::Payload;

    fn publication(n: u8) -> Publication {
        Publication::now(
            ChannelName::new("c").unwrap(),
            Payload::Binary(Bytes::from(vec![n])),
        )
    }

    #[tokio::test]
    async fn delivers_in_order() {
        let (tx, mut rx) = inbound(16, Metrics::unregistered());
        let broker = MemoryBroker::new(tx);
        broker
            .publish((0..10).map(publication).collect())
            .await
            .unwrap();
        for n in 0..10 {
            assert_eq!(rx.recv().await.unwrap().payload, publication(n).payload);
        }
    }

    #[tokio::test]
    async fn try_send_drops_and_counts_when_full() {
        let metrics = Metrics::unregistered();
        let (tx, _rx) = inbound(1, metrics.clone());
        assert_eq!(tx.try_send(publication(0)), Ok(true));
        assert_eq!(tx.try_send(publication(1)), Ok(false));
    }

    #[tokio::test]
    async fn publish_fails_once_the_hub_is_gone() {
        let (tx, rx) = inbound(1, Metrics::unregistered());
        drop(rx);
        let broker = MemoryBroker::new(tx);
        assert_eq!(
            broker.publish(vec![publication(0)]).await,
            Err(BrokerError::Closed)
        );
    }
}
