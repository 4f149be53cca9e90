//! The two server-side scripts behind publishing and history, the keys they use, and
//! how a publish request becomes a command (`plan`) and a reply an outcome.
//!
//! A history channel `C` (with prefix `P`) has, all in the hash slot of `P + C` so the
//! same scripts work on Redis Cluster with sharded pub/sub:
//!
//! ```text
//! {PC}.meta          hash  e = epoch (decimal), s = last offset,     PEXPIRE meta_ttl
//!                          r = lineage (run_id:master_replid) that wrote e
//! {PC}.stream        stream, entry id "<offset>-0", field d = body   MAXLEN ~ size, PEXPIRE ttl
//! {PC}.idem.<key>    string "<offset>:<epoch>" of a publish           PX idempotency window
//! PC                 the pub/sub channel (hashes like {PC}: no braces in channel names)
//! ```
//!
//! **Publish script** (one `EVALSHA` per publication, pipelined for a batch): answers a
//! remembered idempotency key without publishing; on a history channel creates the
//! epoch when the meta hash is missing (and then deletes a stream that outlived it, so
//! offsets restart cleanly: the "meta evicted, stream survived" case), increments the
//! offset, appends the body to the stream, refreshes both TTLs; remembers the idempotency key, then publishes the
//! envelope (with offset and epoch). Atomic: a
//! publication is either stored and published or neither.
//!
//! Both start a new epoch when the server process is not the one that wrote the
//! current epoch (see `ensure_epoch!`): a server that restarted from older data must
//! not hand out offsets again.
//!
//! **History script**: writes nothing for a channel without a meta hash (it answers a
//! start: offset 0 with a start token naming the lineage and the time of the read);
//! otherwise refreshes the meta TTL (and starts a new epoch where another lineage wrote
//! the current one), and returns the epoch, the last offset and up to `limit` entries
//! after `since`.
//!
//! A backend that wants to publish into a history channel without the HTTP API calls the
//! publish script itself (`SCRIPT LOAD` it, or `EVAL` the source in
//! [`PUBLISH_SCRIPT`]) with the keys and arguments documented there; a raw `PUBLISH`
//! bypasses history.

use std::time::Duration;

use bytes::Bytes;
use herald_broker::{BrokerError, HistoryPage, PublishRequest, Published};
use herald_protocol::envelope;
use herald_protocol::{ChannelName, Epoch, Publication, StreamPosition};
use redis::{Script, Value};

use crate::shared::Conn;

/// Lua shared by both scripts: the channel's epoch (`KEYS[1]` is its meta hash,
/// `KEYS[2]` its stream), created from `new` when missing, and a new one when the
/// epoch was written in another lineage than this server's (`rid`: `run_id` and
/// `master_replid` of `INFO`, as `run_id:master_replid`; empty: the script reads them,
/// which costs a few microseconds).
///
/// Why the lineage: Redis persists the meta hash and the stream together, so a server
/// that restarts from older files (an RDB snapshot, an AOF that lost its last second, a
/// restored backup) or a lagging replica promoted by a failover comes back with an
/// older offset in the same epoch, and would hand out offsets that clients already
/// received with other content. Nothing in the data can tell that it is old; the
/// server can: every such case is a new process (`run_id`) or a promotion
/// (`master_replid`). The price is a new epoch (clients told `reset` /
/// `recovered:false`) after every restart or failover, also the ones that lost
/// nothing. Either way the old stream is deleted, so offsets restart cleanly
/// (also when the meta hash was evicted or expired and the stream survived it).
macro_rules! ensure_epoch {
    () => {
        r#"
local function lineage(rid)
  if rid == nil or rid == '' then
    -- The same lineage the nodes read on connecting: run_id:master_replid.
    local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
    local repl = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)')
    rid = (run or '') .. ':' .. (repl or '')
  end
  return rid
end
local function ensure_epoch(new, rid)
  rid = lineage(rid)
  local m = redis.call('HMGET', KEYS[1], 'e', 'r')
  local e = m[1]
  if e and m[2] == rid then
    return e
  end
  -- Epochs of runs of offsets are integers in [1, 2^40); from 2^40 up are start tokens.
  -- Anything else (a backend calling the script with 0, a float, nan) gets one derived
  -- from the key, the lineage and the time, never a fixed value that would repeat.
  local n = tonumber(new)
  if not n or n ~= n or n ~= math.floor(n) or n < 1 or n >= 1099511627776 then
    local t = redis.call('TIME')
    n = tonumber(string.sub(redis.sha1hex(KEYS[1] .. rid .. t[1] .. t[2]), 1, 10), 16) % 1099511627775 + 1
  end
  if e and tonumber(e) == n then
    -- A new epoch must differ from the one it replaces.
    n = n % 1099511627775 + 1
  end
  -- %.0f: exact below 2^53 (%d casts to a C long, 32 bits on some builds).
  new = string.format('%.0f', n)
  redis.call('HSET', KEYS[1], 'e', new, 's', 0, 'r', rid)
  redis.call('DEL', KEYS[2])
  return new
end
"#
    };
}

/// The publish script.
///
/// `KEYS`: meta, stream, idempotency key (any name when unused).
/// `ARGV`: 1 pub/sub channel, 2 envelope head (16 bytes; flag bit 0 set on history
/// channels), 3 payload, 4 history size (0: no history), 5 history TTL ms, 6 meta TTL
/// ms, 7 epoch to use if the channel has none (decimal, 1 to 2^40 - 1; other values are
/// mapped into that range, which start tokens stay out of), 8 `PUBLISH` or
/// `SPUBLISH`, 9 idempotency window ms (0: none), 10 the server's lineage
/// (`run_id:master_replid` from `INFO` on the connection the script is sent on; empty:
/// the script reads it, slower), which starts a new epoch where another lineage wrote
/// the current one.
/// Returns `{offset, epoch, duplicate}` (offset and epoch 0 without history).
pub const PUBLISH_SCRIPT: &str = concat!(
    ensure_epoch!(),
    r#"
-- 8 bytes big-endian; numbers here stay below 2^53, so the two halves are exact.
-- (struct.pack is C: a Lua loop building the bytes cost more than the rest.)
local function be64(n)
  local high = math.floor(n / 4294967296)
  return struct.pack('>I4I4', high, n - high * 4294967296)
end
local window = tonumber(ARGV[9])
if window > 0 then
  local prev = redis.call('GET', KEYS[3])
  if prev then
    local o, e = string.match(prev, '^(%d+):(%d+)$')
    return {tonumber(o), tonumber(e), 1}
  end
end
local offset, epoch = 0, 0
local body
if tonumber(ARGV[4]) > 0 then
  epoch = tonumber(ensure_epoch(ARGV[7], ARGV[10]))
  offset = redis.call('HINCRBY', KEYS[1], 's', 1)
  body = ARGV[2] .. be64(offset) .. be64(epoch) .. ARGV[3]
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], offset .. '-0', 'd', body)
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
else
  body = ARGV[2] .. ARGV[3]
end
-- Remembered before publishing: under maxmemory, a script fails at its first write
-- (Redis lets it finish once one succeeded), and publishing first would make an error
-- reply for a delivered publication.
if window > 0 then
  redis.call('SET', KEYS[3], offset .. ':' .. epoch, 'PX', window)
end
-- Scripts do not roll back: a PUBLISH refused here (an ACL without the channel) comes
-- after the writes above. Stored in the stream, the publication exists (subscribers get
-- it by repair or resume); otherwise nothing was, and the key must not say it was.
local sent = redis.pcall(ARGV[8], ARGV[1], body)
if type(sent) == 'table' and sent.err and offset == 0 then
  if window > 0 then
    redis.call('DEL', KEYS[3])
  end
  return sent
end
return {offset, epoch, 0}
"#
);

/// The history script. `KEYS`: meta, stream. `ARGV`: 1 epoch to use if the channel's
/// epoch belongs to another lineage, 2 meta TTL ms, 3 since (offset), 4 limit, 5 the
/// epoch the read must be in to read entries, and then at most `limit` behind the top
/// (-1: any epoch, any distance; a start token, with since 0: any epoch), 6 the server's
/// lineage (as for the publish script).
/// Returns `{epoch, top, entries, now}` (`now`: a start token for this read);
/// `{now, 0, {}, now}` (a start) for a channel without a meta hash, for which it writes
/// nothing.
pub const HISTORY_SCRIPT: &str = concat!(
    ensure_epoch!(),
    r#"
-- A start token for this read (herald_protocol::Epoch::start): 2^40 + 21 bits of a
-- SHA-1 of the lineage and of evicted_keys (an eviction may have removed an epoch a
-- start cannot see; any eviction voids the tokens read before it) and 19 bits of the
-- time in 8-minute ticks since the Unix epoch (Redis's clock).
local rid = lineage(ARGV[6])
local evicted = string.match(redis.call('INFO', 'stats'), 'evicted_keys:(%d+)') or ''
local t = redis.call('TIME')
local ticks = math.floor(tonumber(t[1]) / 480) % 524288
local h = tonumber(string.sub(redis.sha1hex(rid .. '/' .. evicted), 1, 6), 16) % 2097152
local now = 1099511627776 + h * 524288 + ticks
-- Reading creates nothing: made-up channel names must not fill (or, under maxmemory,
-- evict from) Redis. The first publication creates the epoch.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {now, 0, {}, now}
end
local e = ensure_epoch(ARGV[1], rid)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local top = tonumber(redis.call('HGET', KEYS[1], 's'))
local entries = {}
local since, limit, want = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local same = tonumber(e) == want or (want >= 1099511627776 and since == 0)
local usable = want == -1 or (same and top - since <= limit)
if limit > 0 and top > since and usable then
  entries = redis.call('XRANGE', KEYS[2], '(' .. ARGV[3] .. '-0', '+', 'COUNT', ARGV[4])
end
return {tonumber(e), top, entries, now}
"#
);

/// Presence (see the `presence` module for the keys).
///
/// Adds members: `ARGV` = now (ms), ttl (ms), then (conn, user, member JSON) triples.
/// Answers each new member's JSON and whether it was its user's first connection.
pub(crate) const PRESENCE_ADD_SCRIPT: &str = r#"
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV, 3 do
  local conn, user, m = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if redis.call('HSETNX', KEYS[1], conn, m) == 1 then
    local n = redis.call('HINCRBY', KEYS[3], user, 1)
    out[#out + 1] = m
    out[#out + 1] = (n == 1) and 1 or 0
  end
  redis.call('ZADD', KEYS[2], now + ttl, conn)
end
for k = 1, 3 do redis.call('PEXPIRE', KEYS[k], ttl * 2) end
return out
"#;

/// Removes members: `ARGV[1]` = "members" then (conn, count key, member JSON) triples,
/// or "expired", now (ms) and a limit. Answers each member's JSON and whether it was its
/// user's last connection.
pub(crate) const PRESENCE_REMOVE_SCRIPT: &str = r#"
local out = {}
-- Removes one member; `key` is its count key ('u:' .. user, or 'c:' .. conn for an
-- anonymous connection). A member the hash no longer holds (Redis lost it) is still
-- answered with `fallback`, the node's copy: its leave must be announced all the same.
local function drop(conn, key, fallback)
  local m = redis.call('HGET', KEYS[1], conn)
  redis.call('ZREM', KEYS[2], conn)
  if m then
    redis.call('HDEL', KEYS[1], conn)
    if not key then
      local user = cjson.decode(m).user
      if user == '' then key = 'c:' .. conn else key = 'u:' .. user end
    end
    local n = redis.call('HINCRBY', KEYS[3], key, -1)
    if n <= 0 then redis.call('HDEL', KEYS[3], key) end
    out[#out + 1] = m
    out[#out + 1] = (n <= 0) and 1 or 0
  elseif fallback then
    out[#out + 1] = fallback
    out[#out + 1] = (redis.call('HEXISTS', KEYS[3], key) == 0) and 1 or 0
  end
end
if ARGV[1] == 'expired' then
  local conns = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
  for _, conn in ipairs(conns) do drop(conn, nil, nil) end
else
  for i = 2, #ARGV, 3 do drop(ARGV[i], ARGV[i + 1], ARGV[i + 2]) end
end
return out
"#;

/// The counts: connections and distinct users.
pub(crate) const PRESENCE_STATS_SCRIPT: &str = r#"
return {redis.call('HLEN', KEYS[1]), redis.call('HLEN', KEYS[3])}
"#;

/// Occupancy (see the `webhooks` module for the keys). `ARGV` = now (ms), ttl (ms),
/// the queue's max, mode, node, then for `set` (channel, 1|0) pairs, for `refresh`
/// channels (set again, then up to 1000 of every node's expired entries removed). An
/// event is queued only while the stream holds fewer than max; each makes the same
/// record as `herald_protocol::webhook::occupancy`. Answers {occupied queued, occupied
/// dropped, vacated queued, vacated dropped, more expired (0|1), swept channels...}.
pub(crate) const OCCUPANCY_SCRIPT: &str = r#"
local now, ttl, max = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local node = ARGV[5]
local counts = {0, 0, 0, 0}
local swept = {}
local function event(name, channel, at)
  if redis.call('XLEN', KEYS[3]) >= max then
    counts[at + 1] = counts[at + 1] + 1
    return
  end
  redis.call('XADD', KEYS[3], '*', 'e',
    '{"event":"' .. name .. '","channel":"' .. channel .. '","time_ms":' .. ARGV[1] .. '}')
  counts[at] = counts[at] + 1
end
local function add(channel)
  if redis.call('ZADD', KEYS[2], now + ttl, node .. '\n' .. channel) == 1 then
    if redis.call('HINCRBY', KEYS[1], channel, 1) == 1 then
      event('channel_occupied', channel, 1)
    end
  end
end
local function drop(entry)
  if redis.call('ZREM', KEYS[2], entry) == 1 then
    local channel = string.sub(entry, string.find(entry, '\n', 1, true) + 1)
    if redis.call('HINCRBY', KEYS[1], channel, -1) <= 0 then
      redis.call('HDEL', KEYS[1], channel)
      event('channel_vacated', channel, 3)
      return channel
    end
  end
end
local more = 0
if ARGV[4] == 'set' then
  for i = 6, #ARGV, 2 do
    if ARGV[i + 1] == '1' then add(ARGV[i]) else drop(node .. '\n' .. ARGV[i]) end
  end
else
  for i = 6, #ARGV do add(ARGV[i]) end
  local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)
  for _, entry in ipairs(gone) do
    local channel = drop(entry)
    if channel then swept[#swept + 1] = channel end
  end
  if #gone == 1000 then more = 1 end
end
local out = {counts[1], counts[2], counts[3], counts[4], more}
for _, c in ipairs(swept) do out[#out + 1] = c end
return out
"#;

/// Queues records: `ARGV` = the queue's max, then records. Answers {queued, dropped}.
pub(crate) const WEBHOOK_QUEUE_SCRIPT: &str = r#"
local max, queued, dropped = tonumber(ARGV[1]), 0, 0
for i = 2, #ARGV do
  if redis.call('XLEN', KEYS[3]) >= max then
    dropped = dropped + 1
  else
    redis.call('XADD', KEYS[3], '*', 'e', ARGV[i])
    queued = queued + 1
  end
end
return {queued, dropped}
"#;

/// Takes events for a consumer: `ARGV` = consumer, max, lease (ms). One consumer at a
/// time delivers (so events arrive in order): the one holding the lease key, which this
/// call renews; a consumer that finds it free takes it, and with it every event the
/// previous holder had taken and not finished (it died or stalled past its lease).
/// `max` 0 only renews. Answers {holds the lease (0|1), queue created (0|1), then flat
/// id, record, retaken (0|1), ...}. "Created" after the queue existed means Redis lost
/// it (restarted without its data).
pub(crate) const WEBHOOK_TAKE_SCRIPT: &str = r#"
local created = redis.pcall('XGROUP', 'CREATE', KEYS[3], 'herald', '0', 'MKSTREAM')
local fresh = 0
if type(created) == 'table' and created.ok then fresh = 1 end
local holder = redis.call('GET', KEYS[4])
if holder and holder ~= ARGV[1] then return {0, fresh} end
redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[3])
local out, max = {1, fresh}, tonumber(ARGV[2])
if max == 0 then return out end
-- Taking the lease over: forget consumers with nothing pending (nodes gone, or live
-- ones that will be made again by their next read), so that deploys do not pile them
-- up in the group.
if not holder then
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[3], 'herald')) do
    local name, pending
    for i = 1, #c, 2 do
      if c[i] == 'name' then name = c[i + 1] elseif c[i] == 'pending' then pending = c[i + 1] end
    end
    if name and name ~= ARGV[1] and pending == 0 then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[3], 'herald', name)
    end
  end
end
local function take(entries, retaken)
  for _, e in ipairs(entries) do
    local fields = e[2]
    if fields then
      for i = 1, #fields, 2 do
        if fields[i] == 'e' then
          out[#out + 1] = e[1]
          out[#out + 1] = fields[i + 1]
          out[#out + 1] = retaken
        end
      end
    end
  end
end
-- Taken before and not finished: the previous holder's (all of them, at once), or
-- this consumer's own that it lost track of (older than a lease).
local idle = 0
if holder then idle = ARGV[3] end
local claimed = redis.call('XAUTOCLAIM', KEYS[3], 'herald', ARGV[1], idle, '0-0', 'COUNT', max)
take(claimed[2], 1)
local room = max - (#out - 2) / 3
if room > 0 then
  local r = redis.call('XREADGROUP', 'GROUP', 'herald', ARGV[1], 'COUNT', room, 'STREAMS', KEYS[3], '>')
  if r then take(r[1][2], 0) end
end
return out
"#;

/// Finishes events: `ARGV` = their ids (acknowledged and deleted: the stream holds only
/// what is outstanding).
pub(crate) const WEBHOOK_DONE_SCRIPT: &str = r#"
redis.call('XACK', KEYS[3], 'herald', unpack(ARGV))
redis.call('XDEL', KEYS[3], unpack(ARGV))
return 1
"#;

/// The scripts, hashed once.
pub(crate) struct Scripts {
    /// [`PUBLISH_SCRIPT`].
    pub(crate) publish: Script,
    /// [`HISTORY_SCRIPT`].
    pub(crate) history: Script,
    /// Presence (the `presence` module's scripts).
    pub(crate) presence_add: Script,
    /// Presence removals and expiry.
    pub(crate) presence_remove: Script,
    /// Presence counts.
    pub(crate) presence_stats: Script,
    /// [`OCCUPANCY_SCRIPT`].
    pub(crate) occupancy: Script,
    /// [`WEBHOOK_QUEUE_SCRIPT`].
    pub(crate) webhook_queue: Script,
    /// [`WEBHOOK_TAKE_SCRIPT`].
    pub(crate) webhook_take: Script,
    /// [`WEBHOOK_DONE_SCRIPT`].
    pub(crate) webhook_done: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Scripts {
            publish: Script::new(PUBLISH_SCRIPT),
            history: Script::new(HISTORY_SCRIPT),
            presence_add: Script::new(PRESENCE_ADD_SCRIPT),
            presence_remove: Script::new(PRESENCE_REMOVE_SCRIPT),
            presence_stats: Script::new(PRESENCE_STATS_SCRIPT),
            occupancy: Script::new(OCCUPANCY_SCRIPT),
            webhook_queue: Script::new(WEBHOOK_QUEUE_SCRIPT),
            webhook_take: Script::new(WEBHOOK_TAKE_SCRIPT),
            webhook_done: Script::new(WEBHOOK_DONE_SCRIPT),
        }
    }
}

/// Where a channel's history lives.
pub(crate) struct Keys {
    /// The pub/sub channel (prefix + name).
    pub(crate) channel: String,
    /// The meta hash: epoch and last offset.
    pub(crate) meta: String,
    /// The stream of publications.
    pub(crate) stream: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str, channel: &ChannelName) -> Keys {
        let channel = format!("{prefix}{channel}");
        Keys {
            meta: format!("{{{channel}}}.meta"),
            stream: format!("{{{channel}}}.stream"),
            channel,
        }
    }

    fn idempotency(&self, key: &str) -> String {
        format!("{{{}}}.idem.{key}", self.channel)
    }
}

/// How a request is sent.
pub(crate) enum Plan {
    /// A plain `PUBLISH`/`SPUBLISH`: no history, no idempotency key.
    Publish {
        command: &'static str,
        channel: String,
        body: Bytes,
    },
    /// The publish script.
    Script(redis::Cmd),
}

impl Plan {
    /// The command that carries it out.
    pub(crate) fn command(&self) -> redis::Cmd {
        match self {
            Plan::Publish {
                command,
                channel,
                body,
            } => {
                let mut c = redis::cmd(command);
                c.arg(channel).arg(body.as_ref());
                c
            }
            Plan::Script(cmd) => cmd.clone(),
        }
    }
}

/// How `req` is sent. With `script`, even a plain publication goes through the publish
/// script: a batch that needs the script for one entry sends every entry through it, so
/// that when Redis lost the script (restart, `SCRIPT FLUSH`, failover) every entry fails
/// alike and is sent again in order, instead of the plain ones going out first.
pub(crate) fn plan(
    scripts: &Scripts,
    prefix: &str,
    cluster: bool,
    run_id: &str,
    req: &PublishRequest,
    script: bool,
) -> Plan {
    let p = &req.publication;
    let keys = Keys::new(prefix, &p.channel);
    let command = if cluster { "SPUBLISH" } else { "PUBLISH" };
    if !script && req.history.is_none() && req.idempotency.is_none() {
        return Plan::Publish {
            command,
            channel: keys.channel,
            body: envelope::encode(p),
        };
    }
    let (head, payload) = match req.history {
        // The script puts offset and epoch between the head and the payload.
        Some(_) => (Bytes::copy_from_slice(&envelope::head(p)), payload(p)),
        // No position: the whole envelope as the "head", nothing after it.
        None => (envelope::encode(p), Bytes::new()),
    };
    let h = req.history;
    let idem = req.idempotency.as_ref();
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(scripts.publish.get_hash())
        .arg(3)
        .arg(&keys.meta)
        .arg(&keys.stream)
        .arg(idem.map_or_else(|| keys.idempotency(""), |i| keys.idempotency(&i.key)))
        .arg(&keys.channel)
        .arg(head.as_ref())
        .arg(payload.as_ref())
        .arg(h.map_or(0, |h| h.size.max(1)))
        .arg(h.map_or(0, |h| millis(h.ttl)))
        .arg(h.map_or(0, |h| millis(h.meta_ttl)))
        .arg(herald_broker::new_epoch().get())
        .arg(command)
        .arg(idem.map_or(0, |i| millis(i.window)))
        .arg(run_id);
    Plan::Script(cmd)
}

pub(crate) fn payload(p: &Publication) -> Bytes {
    match &p.payload {
        herald_protocol::Payload::Json(b) | herald_protocol::Payload::Binary(b) => b.clone(),
    }
}

/// Now, in Unix milliseconds (what the scripts' expiry scores count in).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn millis(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

/// What the publish script answered.
pub(crate) fn outcome(v: &Value) -> Result<Published, BrokerError> {
    // The script ran: whatever it answered, it may have published.
    let bad =
        || BrokerError::UnknownOutcome(format!("unexpected reply from the publish script: {v:?}"));
    let Value::Array(items) = v else {
        return Err(bad());
    };
    let int = |i: usize| match items.get(i) {
        Some(Value::Int(n)) => Ok(*n as u64),
        _ => Err(bad()),
    };
    let (offset, epoch, duplicate) = (int(0)?, int(1)?, int(2)? == 1);
    let position = match (offset, Epoch::new(epoch)) {
        (0, _) => None,
        (offset, Some(epoch)) => Some(StreamPosition { offset, epoch }),
        (_, None) => return Err(bad()),
    };
    Ok(Published {
        position,
        duplicate,
    })
}

pub(crate) fn is_noscript(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// Runs a prepared script invocation on `conn` within `limit`: its answer, or
/// `Unavailable` (Redis answered an error, or the connection failed) or `Timeout`. For
/// reads and idempotent changes, where the two failures mean the same to the caller.
pub(crate) async fn invoke(
    conn: Conn,
    inv: &redis::ScriptInvocation<'_>,
    limit: Duration,
) -> Result<Value, BrokerError> {
    let work = async {
        match conn {
            Conn::Single(mut c, _) => inv.invoke_async::<Value>(&mut c).await,
            Conn::Cluster(mut c) => inv.invoke_async::<Value>(&mut c).await,
        }
    };
    match tokio::time::timeout(limit, work).await {
        Ok(r) => r.map_err(unavailable),
        Err(_) => Err(BrokerError::Timeout),
    }
}

pub(crate) fn unavailable(e: redis::RedisError) -> BrokerError {
    BrokerError::Unavailable(format!("Redis: {e}"))
}

/// A publish's failure: an error reply means Redis did not run the command; anything
/// else (the connection failed, no reply came) may have come after Redis ran it.
pub(crate) fn in_flight(e: redis::RedisError) -> BrokerError {
    if ran_not(&e) {
        unavailable(e)
    } else {
        BrokerError::UnknownOutcome(format!("Redis: {e}"))
    }
}

/// Whether `e` is Redis's error reply to a command (which therefore did not run).
pub(crate) fn ran_not(e: &redis::RedisError) -> bool {
    matches!(
        e.kind(),
        redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
    )
}

pub(crate) fn page(channel: &ChannelName, v: &Value) -> Result<HistoryPage, BrokerError> {
    let bad = || BrokerError::Unavailable("unexpected reply from the history script".into());
    let Value::Array(items) = v else {
        return Err(bad());
    };
    let (Some(Value::Int(epoch)), Some(Value::Int(top)), Some(Value::Int(now))) =
        (items.first(), items.get(1), items.get(3))
    else {
        return Err(bad());
    };
    let epoch = Epoch::new(*epoch as u64).ok_or_else(bad)?;
    let now = Epoch::new(*now as u64)
        .filter(|e| e.is_start())
        .ok_or_else(bad)?;
    let mut publications = Vec::new();
    if let Some(Value::Array(entries)) = items.get(2) {
        for entry in entries {
            // [id, [field, value, ...]]
            let Value::Array(parts) = entry else { continue };
            let Some(Value::Array(fields)) = parts.get(1) else {
                continue;
            };
            let Some(Value::BulkString(body)) = fields.get(1) else {
                continue;
            };
            let (p, _) = envelope::decode(channel.clone(), Bytes::copy_from_slice(body));
            if p.position.is_some_and(|pos| pos.epoch == epoch) {
                publications.push(p);
            }
        }
    }
    Ok(HistoryPage {
        top: StreamPosition {
            offset: *top as u64,
            epoch,
        },
        publications,
        now,
    })
}
