//! Connections: opening them (standalone RESP3 multiplexed, or the cluster client for
//! subscriptions and for commands), probing them, and the `redis.timeout` deadline
//! every operation runs within.

use crate::push::push_handler;
use crate::shared::{Conn, Inner, RunId};
use redis::{ProtocolVersion, Value};

/// `work` within `redis.timeout`; running out of time is an I/O error naming `what`.
pub(crate) async fn within<T>(
    inner: &Inner,
    what: &'static str,
    work: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    tokio::time::timeout(inner.config.timeout, work)
        .await
        .unwrap_or_else(|_| Err(timed_out(what)))
}

pub(crate) fn unexpected(what: String) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Parse,
        "unexpected CLIENT INFO reply",
        what,
    ))
}

/// A standalone server answers `PING`; a cluster answers when any master does (the
/// cluster is reachable, whatever one master's state).
pub(crate) async fn ping(inner: &Inner, conn: &Conn) -> redis::RedisResult<()> {
    use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
    let cmd = redis::cmd("PING");
    let sentinel = inner.sentinel.is_some();
    let ping = async {
        match conn.clone() {
            // Under Sentinel, a server that stopped being master (a failover demoted it
            // and it came back as a replica) is as good as gone: reconnect, asking the
            // Sentinels again.
            Conn::Single(mut c, _) if sentinel => {
                let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut c).await?;
                match role.first() {
                    Some(Value::BulkString(r)) if r.as_slice() == b"master" => Ok(()),
                    Some(Value::SimpleString(r)) if r == "master" => Ok(()),
                    _ => Err(unexpected("not the master any more".into())),
                }
            }
            Conn::Single(mut c, _) => cmd.query_async::<Value>(&mut c).await.map(drop),
            Conn::Cluster(mut c) => c
                .route_command(
                    cmd.clone(),
                    RoutingInfo::MultiNode((
                        MultipleNodeRoutingInfo::AllMasters,
                        Some(ResponsePolicy::OneSucceeded),
                    )),
                )
                .await
                .map(drop),
        }
    };
    within(inner, "probe", ping).await
}

pub(crate) fn timed_out(what: &'static str) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "timed out", what.to_owned()))
}

pub(crate) async fn connect(inner: &Inner, generation: u64) -> redis::RedisResult<Conn> {
    let handler = push_handler(inner, generation);
    if inner.config.cluster {
        let client = cluster_client(inner).push_sender(handler).build()?;
        Ok(Conn::Cluster(client.get_async_connection().await?))
    } else {
        let client = match (&inner.sentinel, &inner.certs) {
            // The master the Sentinels name now (after a failover, the promoted one).
            (Some(sentinel), _) => sentinel.lock().await.async_get_client().await?,
            (None, Some(certs)) => {
                redis::Client::build_with_tls(inner.infos[0].clone(), certs.clone())?
            }
            (None, None) => redis::Client::open(inner.infos[0].clone())?,
        };
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(inner.config.timeout))
            .set_response_timeout(Some(inner.config.timeout))
            .set_push_sender(handler);
        let mut c = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let id = RunId::of(&mut c).await?;
        Ok(Conn::Single(c, id))
    }
}

/// Cluster mode: the connection publishes and history reads go through, apart from
/// the one holding the subscriptions. Commands for a lost master's slots are what
/// make the redis crate refresh its slot map (the step in which it can deadlock, see
/// the crate docs); on a connection of their own, such a deadlock costs a new command
/// connection, not every master's subscriptions.
pub(crate) async fn connect_commands(inner: &Inner) -> redis::RedisResult<Conn> {
    let connect = async {
        let client = cluster_client(inner).build()?;
        Ok(Conn::Cluster(client.get_async_connection().await?))
    };
    within(inner, "connect", connect).await
}

/// A cluster client on the seed nodes, RESP3, with the configured timeouts.
pub(crate) fn cluster_client(inner: &Inner) -> redis::cluster::ClusterClientBuilder {
    let builder = redis::cluster::ClusterClientBuilder::new(inner.infos.clone())
        .use_protocol(ProtocolVersion::RESP3)
        .connection_timeout(inner.config.timeout)
        .response_timeout(inner.config.timeout);
    match &inner.certs {
        Some(certs) => builder.certs(certs.clone()),
        None => builder,
    }
}
