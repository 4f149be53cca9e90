//! Property: the hub and the session queues deliver every publication exactly once, in
//! order, to every subscriber that is not closed as slow, under any interleaving of
//! subscribe, unsubscribe, publish and reading; and what a subscriber closed as slow
//! does not get is a suffix of what it should have got, every message of it counted.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use herald_broker::{inbound, MemoryBroker};
use herald_metrics::{DropReason, Metrics};
use herald_protocol::{ChannelName, Payload, Publication};
use proptest::prelude::*;
use tokio_tungstenite::tungstenite::Message;

use crate::handle::{tests::env, SessionEnv, SessionHandle, ITEM_OVERHEAD};
use crate::hub::{Hub, SubscribeOpts};

const SUBSCRIBERS: usize = 4;
const CHANNELS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    Subscribe(usize, usize),
    Unsubscribe(usize, usize),
    Publish(usize),
    /// The subscriber reads everything queued for it.
    Read(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (0..SUBSCRIBERS, 0..CHANNELS).prop_map(|(s, c)| Op::Subscribe(s, c)),
        1 => (0..SUBSCRIBERS, 0..CHANNELS).prop_map(|(s, c)| Op::Unsubscribe(s, c)),
        4 => (0..CHANNELS).prop_map(Op::Publish),
        2 => (0..SUBSCRIBERS).prop_map(Op::Read),
    ]
}

/// (channel index, publication number) of each delivery in `h`'s queue, read now.
fn read(h: &SessionHandle) -> Vec<(usize, u64)> {
    let mut items = Vec::new();
    h.drain(&mut items);
    h.finish_batch();
    items
        .into_iter()
        .filter(|i| i.delivery)
        .map(|i| {
            let Message::Text(t) = i.msg else {
                panic!("text deliveries only")
            };
            let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
            let c = v["channel"].as_str().unwrap()[1..].parse().unwrap();
            (c, v["data"].as_u64().unwrap())
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_publication_once_in_order(ops in proptest::collection::vec(op(), 1..200), slow in 0..SUBSCRIBERS) {
        let metrics = Metrics::unregistered();
        let (tx, _rx) = inbound(8, metrics.clone());
        let hub = Arc::new(Hub::new(Arc::new(MemoryBroker::new(tx)), metrics.clone(), 100));
        // One subscriber with a budget of a few messages (it never reads: a slow
        // consumer); the others with plenty.
        let env = |budget| Arc::new(SessionEnv { metrics: metrics.clone(), ..(*env(budget)).clone() });
        let small = env(6 * (40 + ITEM_OVERHEAD));
        let big = env(1 << 20);
        let handles: Vec<Arc<SessionHandle>> = (0..SUBSCRIBERS)
            .map(|s| Arc::new(SessionHandle::new(0, if s == slow { small.clone() } else { big.clone() })))
            .collect();
        let channels: Vec<ChannelName> =
            (0..CHANNELS).map(|c| ChannelName::new(&format!("c{c}")).unwrap()).collect();
        let mut subscribed = [[false; CHANNELS]; SUBSCRIBERS];
        let mut expected: Vec<Vec<(usize, u64)>> = vec![Vec::new(); SUBSCRIBERS];
        let mut got: Vec<Vec<(usize, u64)>> = vec![Vec::new(); SUBSCRIBERS];
        let mut next: HashMap<usize, u64> = HashMap::new();
        for op in ops {
            match op {
                Op::Subscribe(s, c) => {
                    hub.subscribe(&channels[c], s as u64, &handles[s], SubscribeOpts::default());
                    subscribed[s][c] = true;
                }
                Op::Unsubscribe(s, c) => {
                    hub.unsubscribe(&channels[c], s as u64);
                    subscribed[s][c] = false;
                }
                Op::Publish(c) => {
                    let n = next.entry(c).or_default();
                    *n += 1;
                    let p = Publication::now(channels[c].clone(), Payload::Json(Bytes::from(n.to_string())));
                    hub.dispatch(p);
                    for s in 0..SUBSCRIBERS {
                        if subscribed[s][c] {
                            expected[s].push((c, *n));
                        }
                    }
                }
                Op::Read(s) if s != slow => got[s].extend(read(&handles[s])),
                Op::Read(_) => {}
            }
        }
        for s in 0..SUBSCRIBERS {
            if s != slow {
                got[s].extend(read(&handles[s]));
            }
        }
        let slow_got = if handles[slow].is_closing() { Vec::new() } else { read(&handles[slow]) };
        for s in 0..SUBSCRIBERS {
            if s == slow {
                // A prefix of what it should have got (nothing, once closed as slow).
                prop_assert!(expected[s].starts_with(&slow_got));
                let lost = (expected[s].len() - slow_got.len()) as u64;
                let counted = metrics.dropped_total(DropReason::SlowConsumer)
                    + metrics.dropped_total(DropReason::Disconnected);
                prop_assert_eq!(lost, counted, "every undelivered message is counted (slow {} disc {} closing {})", metrics.dropped_total(DropReason::SlowConsumer), metrics.dropped_total(DropReason::Disconnected), handles[slow].is_closing());
            } else {
                prop_assert_eq!(&got[s], &expected[s]);
            }
        }
    }
}
