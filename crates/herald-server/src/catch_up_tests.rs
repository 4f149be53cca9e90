//! History channels' slow readers (`history`, "A live member whose session's queue has
//! no room"): what a hostile review found in the first version of the catch-up, each
//! one a test that failed then.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use herald_broker::{
    inbound, Broker, BrokerError, HistoryPage, HistoryPolicy, MemoryBroker, PublishRequest,
    Published, Ready, Received,
};
use herald_metrics::{DropReason, Metrics};
use herald_protocol::{ChannelName, Epoch, Payload, Publication};
use tokio_tungstenite::tungstenite::Message;

use crate::handle::{tests::env, Item, Pushed, SessionCommand, SessionHandle, ITEM_OVERHEAD};
use crate::history::{CaughtUp, DeltaLimits, Resume, Resumed, Stream, StreamEnv};

fn policy(size: usize) -> HistoryPolicy {
    HistoryPolicy {
        size,
        ttl: Duration::from_secs(60),
        meta_ttl: Duration::from_secs(24 * 3600),
    }
}

fn plain_resume() -> Resume {
    Resume {
        id: None,
        since: None,
        max_recovery: 100,
        timeout: Duration::from_secs(1),
    }
}

/// A MemoryBroker that records every history read: (limit, bytes of entries returned).
struct Counting {
    inner: Arc<MemoryBroker>,
    reads: AtomicUsize,
    bytes: AtomicUsize,
}

impl Broker for Counting {
    fn publish(
        &self,
        batch: Vec<PublishRequest>,
    ) -> BoxFuture<'_, Result<Vec<Published>, BrokerError>> {
        self.inner.publish(batch)
    }
    fn history(
        &self,
        channel: &ChannelName,
        policy: HistoryPolicy,
        since: u64,
        limit: usize,
        only_in: Option<Epoch>,
    ) -> BoxFuture<'_, Result<HistoryPage, BrokerError>> {
        let read = self.inner.history(channel, policy, since, limit, only_in);
        Box::pin(async move {
            let page = read.await?;
            self.reads.fetch_add(1, Ordering::Relaxed);
            let b: usize = page.publications.iter().map(|p| p.payload.len()).sum();
            self.bytes.fetch_add(b, Ordering::Relaxed);
            Ok(page)
        })
    }
    fn subscribe(&self, channel: &ChannelName) -> Ready {
        self.inner.subscribe(channel)
    }
    fn unsubscribe(&self, channel: &ChannelName) {
        self.inner.unsubscribe(channel)
    }
    fn is_up(&self) -> bool {
        true
    }
    fn kind(&self) -> &'static str {
        "counting"
    }
}

struct Fixture {
    metrics: Metrics,
    broker: Arc<Counting>,
    rx: herald_broker::InboundReceiver,
    news: Arc<Stream>,
    size: usize,
}

impl Fixture {
    fn new(queue: usize, size: usize) -> Self {
        let metrics = Metrics::unregistered();
        let (tx, rx) = inbound(100_000, metrics.clone());
        let broker = Arc::new(Counting {
            inner: Arc::new(MemoryBroker::new(tx)),
            reads: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
        });
        let env = Arc::new(StreamEnv::new(
            broker.clone(),
            metrics.clone(),
            100_000,
            queue / 2,
            DeltaLimits::default(),
        ));
        let news = Arc::new(Stream::new(
            ChannelName::new("news").unwrap(),
            policy(size),
            env,
        ));
        Fixture {
            metrics,
            broker,
            rx,
            news,
            size,
        }
    }

    /// A live member (connection 1) of `news` on a session of `env`, its `subscribed`
    /// already taken from its queue.
    async fn member(&self, env: Arc<crate::handle::SessionEnv>) -> Arc<SessionHandle> {
        let h = Arc::new(SessionHandle::new(0, env));
        self.news.join(1, &h, true, false);
        self.news.resume(1, plain_resume()).await;
        written(&h);
        h
    }

    async fn publish(&mut self, payload_len: usize, n: usize) {
        let reqs = (0..n)
            .map(|_| PublishRequest {
                history: Some(policy(self.size)),
                ..PublishRequest::plain(Publication::now(
                    ChannelName::new("news").unwrap(),
                    Payload::Json(Bytes::from(format!("\"{}\"", "x".repeat(payload_len)))),
                ))
            })
            .collect();
        self.broker.publish(reqs).await.unwrap();
        while let Some(Received::Publication(p)) = self.rx.try_recv() {
            self.news.arrive(p);
        }
    }
}

/// What the writer takes from the queue (and has written).
fn written(h: &SessionHandle) -> Vec<serde_json::Value> {
    let mut q = std::collections::VecDeque::new();
    h.drain(&mut q);
    h.finish_batch();
    q.into_iter()
        .flat_map(|i| i.out.into_messages())
        .map(|m| match m {
            Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
            other => panic!("{other:?}"),
        })
        .collect()
}

fn offsets(v: &[serde_json::Value]) -> Vec<u64> {
    v.iter()
        .filter(|m| m["op"] == "message")
        .map(|m| m["offset"].as_u64().unwrap())
        .collect()
}

fn catch_ups(h: &SessionHandle) -> usize {
    h.take_commands()
        .iter()
        .filter(|c| matches!(c, SessionCommand::CatchUp(_)))
        .count()
}

/// A publication the node accepts (anything up to the whole queue: `Node::too_large`)
/// whose frame is over seven eighths of the queue reaches a subscriber whose queue is
/// empty. (It used to be refused for ever: the member lagged, and every catch-up round
/// read the history, queued nothing and asked again at once.)
#[tokio::test]
async fn a_publication_over_seven_eighths_of_the_queue_reaches_an_idle_subscriber() {
    let queue = 8192;
    let mut f = Fixture::new(queue, 100);
    let h = Arc::new(SessionHandle::new(0, env(queue)));
    f.news.join(1, &h, true, false);
    assert_eq!(
        f.news.resume(1, plain_resume()).await,
        Resumed::Done { recovered: None }
    );
    written(&h); // `subscribed`
                 // What Node::too_large accepts: payload + channel + 128 + ITEM_OVERHEAD <= queue.
    let payload = 7400;
    assert!(payload + 2 + "news".len() + 128 + ITEM_OVERHEAD <= queue);
    f.publish(payload, 1).await;
    let got = written(&h);
    assert!(!h.is_closing());
    // It would fit the (empty) queue: before the change it was delivered.
    let probe = Arc::new(SessionHandle::new(0, env(queue)));
    let p = Publication {
        position: None,
        ..Publication::now(
            ChannelName::new("news").unwrap(),
            Payload::Json(Bytes::from(format!("\"{}\"", "x".repeat(payload)))),
        )
    };
    assert_eq!(probe.push(Item::delivery(&p, true)), Pushed::Queued);
    // Now: nothing, and the member loops.
    let reads_before = f.broker.reads.load(Ordering::Relaxed);
    let mut rounds = 0;
    while catch_ups(&h) > 0 && rounds < 100 {
        rounds += 1;
        let r = f.news.catch_up_member(1, Duration::from_secs(1)).await;
        assert_eq!(r, CaughtUp::Lagging);
    }
    let reads = f.broker.reads.load(Ordering::Relaxed) - reads_before;
    let later = written(&h);
    assert!(
        !offsets(&got).is_empty() || !offsets(&later).is_empty(),
        "offset 1 never delivered on an empty queue; {rounds} catch-up rounds, \
         {reads} history reads ({} bytes read), still asking",
        f.broker.bytes.load(Ordering::Relaxed)
    );
}

/// A round that could not queue the next entry waits until the queue has room for
/// it, not until it is half empty. (An entry over three eighths of the queue used to
/// make back-to-back rounds of history reads while the writer wrote.)
#[tokio::test]
async fn a_round_that_queued_nothing_waits_for_room_for_what_did_not_fit() {
    let queue = 8192;
    let mut f = Fixture::new(queue, 100);
    let h = f.member(env(queue)).await;
    // Entries of ~3700 bytes (0.45 of the queue): two fit 7/8, the third lags.
    f.publish(3600, 6).await;
    // The writer takes the batch (2 entries, ~7.4 KiB inflight) and writes it.
    let mut batch = std::collections::VecDeque::new();
    h.drain(&mut batch);
    h.finish_batch();
    assert_eq!(catch_ups(&h), 1);
    // Round 1 queues one entry (~3.7 KiB: under half), the next does not fit 7/8.
    let r = f.news.catch_up_member(1, Duration::from_secs(1)).await;
    assert_eq!(r, CaughtUp::Lagging);
    // With one entry queued (not yet written), every further round is useless, and
    // yet each is asked at once.
    let reads_before = f.broker.reads.load(Ordering::Relaxed);
    let mut rounds = 0;
    while catch_ups(&h) > 0 && rounds < 50 {
        rounds += 1;
        f.news.catch_up_member(1, Duration::from_secs(1)).await;
    }
    let reads = f.broker.reads.load(Ordering::Relaxed) - reads_before;
    assert!(
        rounds < 2,
        "{rounds} back-to-back catch-up rounds ({reads} history reads) while \
         nothing could be queued and nothing was written"
    );
}

/// A catch-up's read is sized by what the entries it reads cost, not by the
/// channel's last publication. (Large entries then one small one used to make each
/// round read up to 512 large entries to queue the few that fit.)
#[tokio::test]
async fn catch_up_reads_are_sized_by_the_entries_read() {
    let queue = 64 * 1024;
    let mut f = Fixture::new(queue, 1000);
    let h = f.member(env(queue)).await;
    f.publish(4000, 300).await; // ~1.2 MB the member cannot queue at once
    f.publish(10, 1).await; // one small one last: entry_cost is now tiny
    let mut delivered = offsets(&written(&h));
    let reads_before = f.broker.bytes.load(Ordering::Relaxed);
    let mut rounds = 0;
    loop {
        if catch_ups(&h) == 0 {
            break;
        }
        rounds += 1;
        let r = f.news.catch_up_member(1, Duration::from_secs(1)).await;
        delivered.extend(offsets(&written(&h)));
        if r == CaughtUp::Live {
            break;
        }
        assert!(rounds < 500);
    }
    assert_eq!(delivered, (1..=301).collect::<Vec<_>>());
    let read = f.broker.bytes.load(Ordering::Relaxed) - reads_before;
    let useful = 300 * 4000;
    assert!(
        read < 3 * useful,
        "{rounds} rounds read {read} bytes from the history to deliver {useful} \
         ({}x)",
        read / useful
    );
}

/// What a lagging member missed is counted as dropped when its session ends (nothing
/// is pushed to a lagging member, so nothing else would count it).
#[tokio::test]
async fn what_a_lagging_member_missed_is_counted_when_its_session_ends() {
    let queue = 8192;
    let mut f = Fixture::new(queue, 1000);
    let sm = Metrics::unregistered();
    let senv = Arc::new(crate::handle::SessionEnv {
        metrics: sm.clone(),
        ..(*env(queue)).clone()
    });
    let h = f.member(senv).await;
    f.publish(100, 200).await;
    // The session ends (the peer went away) without reading anything more.
    let queued = {
        let mut q = std::collections::VecDeque::new();
        h.drain(&mut q);
        q.len() as u64
    };
    h.discard();
    f.news.leave(1);
    let counted = [
        DropReason::SlowConsumer,
        DropReason::Disconnected,
        DropReason::HubOverflow,
    ]
    .iter()
    .map(|r| sm.dropped_total(*r) + f.metrics.dropped_total(*r))
    .sum::<u64>();
    // The drained batch was never written either.
    let never_written = 200;
    assert!(
        counted + queued >= never_written,
        "{never_written} publications never reached the client, {counted} counted \
         dropped ({queued} were in the batch the writer held)"
    );
}

/// An `epoch` frame goes with its binary delivery or not at all. (When the frame fit
/// and the delivery did not, the catch-up used to send the frame again.)
#[tokio::test]
async fn an_epoch_frame_goes_with_its_delivery_or_not_at_all() {
    let queue = 4096;
    let mut f = Fixture::new(queue, 100);
    let h = f.member(env(queue)).await;
    // Fill the queue with replies to just under 7/8, leaving room for an epoch frame.
    let max = queue - queue / 8;
    let filler = max - 300 - ITEM_OVERHEAD;
    let pad = serde_json::json!({ "pad": "p".repeat(filler - 10) });
    h.push(Item::reply(pad.to_string()));
    let req = PublishRequest {
        history: Some(policy(100)),
        ..PublishRequest::plain(Publication::now(
            ChannelName::new("news").unwrap(),
            Payload::Binary(Bytes::from(vec![7u8; 1000])),
        ))
    };
    f.broker.publish(vec![req]).await.unwrap();
    while let Some(Received::Publication(p)) = f.rx.try_recv() {
        f.news.arrive(p);
    }
    let mut frames: Vec<String> = Vec::new();
    let mut take = |h: &SessionHandle| {
        let mut q = std::collections::VecDeque::new();
        h.drain(&mut q);
        h.finish_batch();
        for m in q.into_iter().flat_map(|i| i.out.into_messages()) {
            match m {
                Message::Text(t) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                    frames.push(v["op"].as_str().unwrap_or("filler").to_string());
                }
                Message::Binary(_) => frames.push("binary".into()),
                _ => {}
            }
        }
    };
    take(&h);
    while catch_ups(&h) > 0 {
        f.news.catch_up_member(1, Duration::from_secs(1)).await;
        take(&h);
    }
    let epochs = frames.iter().filter(|f| *f == "epoch").count();
    assert_eq!(epochs, 1, "frames {frames:?}");
}

/// A channel has one catch-up waiting at a time, whatever asks for it again.
#[test]
fn a_channel_has_one_catch_up_waiting_at_a_time() {
    let h = Arc::new(SessionHandle::new(0, env(8192)));
    let news = ChannelName::new("news").unwrap();
    h.catch_up_when_room(news.clone(), 0);
    h.catch_up_when_room(news.clone(), 0);
    assert_eq!(catch_ups(&h), 1, "one lagging channel, two catch-ups asked");
}

/// A catch-up that reaches a delivery larger than the whole queue (the node refuses
/// such publications, a raw one in the stream need not be) closes the session as a
/// slow consumer, and every offset the client never gets is counted once: not again
/// when the member leaves.
#[tokio::test]
async fn what_a_caught_up_member_cannot_take_is_counted_once() {
    let queue = 8192;
    let mut f = Fixture::new(queue, 1000);
    let sm = Metrics::unregistered();
    let senv = Arc::new(crate::handle::SessionEnv {
        metrics: sm.clone(),
        ..(*env(queue)).clone()
    });
    let h = f.member(senv).await;
    f.publish(100, 40).await;
    let mut got = offsets(&written(&h));
    assert!(got.len() < 40, "no lag");
    f.publish(10_000, 1).await;
    let huge = 41;
    f.publish(100, 5).await;
    // Rounds until the session closes: the first queues up to the huge one, the next
    // finds it larger than the whole queue.
    let mut rounds = 0;
    while catch_ups(&h) > 0 {
        rounds += 1;
        assert!(rounds < 10);
        let round = f.news.catch_up_member(1, Duration::from_secs(1)).await;
        if round == CaughtUp::Closed {
            break;
        }
        got.extend(offsets(&written(&h)));
    }
    assert!(h.is_closing());
    assert_eq!(got, (1..huge).collect::<Vec<_>>());
    f.news.leave(1);
    let dropped = [DropReason::SlowConsumer, DropReason::Disconnected]
        .iter()
        .map(|r| sm.dropped_total(*r) + f.metrics.dropped_total(*r))
        .sum::<u64>();
    assert_eq!(dropped, 46 - (huge - 1), "offsets {huge}..=46, each once");
}
