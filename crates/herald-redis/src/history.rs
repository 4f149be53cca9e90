//! Reading a history channel's stream: its position and the publications after an
//! offset, through the history script.

use herald_broker::{BrokerError, HistoryPage, HistoryPolicy};
use herald_protocol::ChannelName;

use crate::publish::Redis;
use crate::scripts::{invoke, millis, page, Keys};

/// Reads up to `count` publications of `channel` after `since`, within the deadline.
pub(crate) async fn history(
    to: Redis<'_>,
    channel: &ChannelName,
    policy: HistoryPolicy,
    since: u64,
    count: usize,
    only_in: Option<herald_protocol::Epoch>,
) -> Result<HistoryPage, BrokerError> {
    let Redis {
        conn,
        scripts,
        prefix,
        timeout: limit,
    } = to;
    let keys = Keys::new(prefix, channel);
    let mut inv = scripts.history.prepare_invoke();
    inv.key(&keys.meta)
        .key(&keys.stream)
        .arg(herald_broker::new_epoch().get())
        .arg(millis(policy.meta_ttl))
        .arg(since)
        .arg(count)
        .arg(only_in.map_or(-1, |e| e.get() as i64))
        .arg(conn.run_id());
    let v = invoke(conn, &inv, limit).await?;
    page(channel, &v)
}
