//! Publishing a batch into Redis: one pipelined round trip (standalone) or one command
//! after another (cluster), scripts loaded again where Redis lost them; and
//! [`BackendPublisher`], the same path for a backend (or the benchmark) that publishes
//! into Herald's channels through Redis instead of the HTTP API.

use std::time::Duration;

use herald_broker::{BrokerError, PublishRequest, Published};
use redis::Value;

use crate::scripts::{in_flight, is_noscript, outcome, plan, unavailable, Plan, Scripts};
use crate::shared::{Conn, RunId};

/// Where a request goes: the connection, the scripts, the key prefix, the deadline.
pub(crate) struct Redis<'a> {
    /// The command connection.
    pub(crate) conn: Conn,
    /// The scripts, hashed once.
    pub(crate) scripts: &'a Scripts,
    /// `redis.prefix`.
    pub(crate) prefix: &'a str,
    /// The deadline for the whole request.
    pub(crate) timeout: Duration,
}

/// Publishes `batch` in order within the deadline.
pub(crate) async fn publish(
    to: Redis<'_>,
    batch: &[PublishRequest],
) -> Result<Vec<Published>, BrokerError> {
    let Redis {
        conn,
        scripts,
        prefix,
        timeout: limit,
    } = to;
    let cluster = matches!(conn, Conn::Cluster(_));
    let run_id = conn.run_id();
    let script = batch
        .iter()
        .any(|r| r.history.is_some() || r.idempotency.is_some());
    let plans: Vec<Plan> = batch
        .iter()
        .map(|r| plan(scripts, prefix, cluster, run_id, r, script))
        .collect();
    let work = async {
        match conn {
            Conn::Single(mut c, _) => publish_pipelined(&mut c, scripts, &plans).await,
            // Sequential: keeps per-channel order without relying on how the cluster
            // client interleaves requests to different masters.
            Conn::Cluster(mut c) => {
                let mut out = Vec::with_capacity(plans.len());
                for plan in &plans {
                    let r = send_one(&mut c, scripts, plan).await;
                    let failed = r.is_err();
                    out.push(r);
                    if failed {
                        break;
                    }
                }
                // Not sent after a failure (order within a channel is kept).
                while out.len() < plans.len() {
                    out.push(Err(BrokerError::Unavailable(
                        "not sent: an earlier entry of the batch failed".into(),
                    )));
                }
                BrokerError::batch(out)
            }
        }
    };
    match tokio::time::timeout(limit, work).await {
        Ok(r) => r,
        Err(_) => Err(BrokerError::Timeout),
    }
}

/// One round trip for the whole batch; script calls that found the script missing
/// (Redis restarted or flushed its scripts) are loaded and sent again, in order.
async fn publish_pipelined(
    c: &mut redis::aio::MultiplexedConnection,
    scripts: &Scripts,
    plans: &[Plan],
) -> Result<Vec<Published>, BrokerError> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for plan in plans {
        pipe.add_command(plan.command());
    }
    let replies: Vec<redis::RedisResult<Value>> = pipe.query_async(c).await.map_err(in_flight)?;
    let mut out = Vec::with_capacity(plans.len());
    for (plan, reply) in plans.iter().zip(replies) {
        out.push(match (plan, reply) {
            (Plan::Publish { .. }, Ok(_)) => Ok(Published::default()),
            (Plan::Script(_), Ok(v)) => outcome(&v),
            (Plan::Script(_), Err(e)) if is_noscript(&e) => send_one(c, scripts, plan).await,
            // An error reply: Redis did not run it (a script's first write is where it
            // can fail, OOM included, and nothing before it writes or publishes).
            (_, Err(e)) => Err(in_flight(e)),
        });
    }
    BrokerError::batch(out)
}

async fn send_one<C: redis::aio::ConnectionLike>(
    c: &mut C,
    scripts: &Scripts,
    plan: &Plan,
) -> Result<Published, BrokerError> {
    match plan {
        Plan::Publish { .. } => {
            plan.command()
                .query_async::<Value>(c)
                .await
                .map_err(in_flight)?;
            Ok(Published::default())
        }
        Plan::Script(cmd) => match cmd.query_async::<Value>(c).await {
            Ok(v) => outcome(&v),
            Err(e) if is_noscript(&e) => {
                // Loading publishes nothing: a failure here is a plain refusal.
                scripts.publish.load_async(c).await.map_err(unavailable)?;
                let v = cmd.query_async::<Value>(c).await.map_err(in_flight)?;
                outcome(&v)
            }
            Err(e) => Err(in_flight(e)),
        },
    }
}

/// Publishes into Herald's channels through Redis, the way a backend can without the
/// HTTP API: [`BackendPublisher::publish`] runs Herald's own publish script (history
/// channels get their offsets, idempotency keys are honoured), and
/// [`BackendPublisher::publish_raw`] sends a plain `PUBLISH` of a payload, which every
/// node delivers as it is (no history). Standalone Redis only.
///
/// This is the one place outside the broker that knows how those commands are built; the
/// benchmark publishes through it.
pub struct BackendPublisher {
    /// One multiplexed connection; requests are pipelined on it.
    conn: redis::aio::MultiplexedConnection,
    /// The server's `run_id`, which the publish script checks the epoch's lineage by.
    run_id: RunId,
    /// The publish script, loaded again where Redis lost it.
    scripts: Scripts,
    /// The nodes' `redis.prefix`.
    prefix: String,
    /// The deadline for one batch.
    timeout: Duration,
}

impl BackendPublisher {
    /// Connects to the Redis at `url`; `prefix` is the nodes' `redis.prefix`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, BrokerError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(unavailable)?;
        let run_id = RunId::of(&mut conn).await.map_err(unavailable)?;
        Ok(BackendPublisher {
            conn,
            run_id,
            scripts: Scripts::new(),
            prefix: prefix.to_owned(),
            timeout: Duration::from_secs(10),
        })
    }

    /// Publishes `batch` in order, in one round trip, as a node does.
    pub async fn publish(&self, batch: &[PublishRequest]) -> Result<Vec<Published>, BrokerError> {
        let to = Redis {
            conn: Conn::Single(self.conn.clone(), self.run_id.clone()),
            scripts: &self.scripts,
            prefix: &self.prefix,
            timeout: self.timeout,
        };
        publish(to, batch).await
    }

    /// `PUBLISH prefix+channel payload` for each, in one round trip: what a backend's
    /// `redis-cli PUBLISH herald:news '{"title":"hi"}'` does.
    pub async fn publish_raw(&self, batch: &[(&str, &[u8])]) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        for (channel, payload) in batch {
            pipe.cmd("PUBLISH")
                .arg(format!("{}{channel}", self.prefix))
                .arg(*payload)
                .ignore();
        }
        let mut c = self.conn.clone();
        match tokio::time::timeout(self.timeout, pipe.query_async::<()>(&mut c)).await {
            Ok(r) => r.map_err(unavailable),
            Err(_) => Err(BrokerError::Timeout),
        }
    }
}
