// The client against real `herald` processes (and a real redis-server where nodes are
// killed): no mock server. Run with `npm test` (builds first); TEST_HERALD_BIN picks the
// binary (default: the workspace's target/debug/herald).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { Client } from '../dist/herald.mjs';
import {
  freePort,
  herald as start,
  publish,
  redis as startRedis,
  relay,
  sleep,
  stop,
  tempFile,
} from './harness.mjs';

const SECRET = 'js-client-test-secret-js-client-test-0123';

const RULES = `
[auth]
expiry_grace = "500ms"
[auth.jwt]
hmac_secret = "${SECRET}"
[[channels.rules]]
pattern = "chat:*"
history_size = 100
publish = "anyone"
[[channels.rules]]
pattern = "feed:*"
history_size = 1000
[[channels.rules]]
pattern = "doc:*"
history_size = 1000
delta = "fossil"
[[channels.rules]]
pattern = "room:*"
presence = true
join_leave = true
[[channels.rules]]
pattern = "private:*"
subscribe = "claims"
history_size = 10
`;

const CONFIG = tempFile('herald.toml', RULES);

/** A node with the rules above on `port` (0: any). */
const herald = (port, args = [], env = {}) => start(port, ['--config', CONFIG, ...args], env);

/** The real time, in ms, whatever a test did to `Date.now`. */
const realNow = Date.now.bind(Date);

function token(sub, expiresIn, { iat = false, extra = {} } = {}) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const now = Math.floor(realNow() / 1000);
  const claims = { sub, exp: now + expiresIn, ...(iat ? { iat: now } : {}), ...extra };
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${body}.${createHmac('sha256', SECRET).update(body).digest('base64url')}`;
}

/** Resolves when `pred()` holds, polling; fails after `ms`. */
async function until(what, pred, ms = 10000) {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

function collect(sub) {
  const got = [];
  sub.on('message', (data, ctx) => got.push({ data, ...ctx }));
  return got;
}

test('subscribes, publishes, and reports refusals as errors', async () => {
  const h = await herald(0);
  const c = new Client(`ws://${h.addr}/ws`);
  try {
    const states = [];
    c.on('state', (s) => states.push(s));
    const sub = c.subscribe('chat:lobby');
    const got = collect(sub);
    await until('subscribed', () => sub.active);
    const reply = await c.publish('chat:lobby', { text: 'hi' });
    assert.equal(reply.op, 'published');
    await until('the message', () => got.length === 1);
    assert.deepEqual(got[0].data, { text: 'hi' });
    assert.equal(got[0].channel, 'chat:lobby');
    assert.equal(got[0].offset, 1);
    // A channel this anonymous client may not publish to: rejected, connection kept.
    await assert.rejects(c.publish('news', 1), (e) => e.code === 'forbidden');
    await publish(h.addr, 'chat:lobby', 2);
    await until('the next message', () => got.length === 2);
    assert.deepEqual(states, ['connected']);
  } finally {
    c.close();
    await stop(h);
  }
});

test('resumes a history channel without loss when its node dies and comes back', async () => {
  const redis = await startRedis();
  let a, b, c;
  try {
    const url = redis.url;
    const port = await freePort();
    a = await herald(port, ['--redis', url]);
    b = await herald(0, ['--redis', url]);
    c = new Client(`ws://${a.addr}/ws`, { minReconnectDelay: 100, maxReconnectDelay: 400 });
    const sub = c.subscribe('feed:x');
    const got = collect(sub);
    const recovered = [];
    sub.on('recovered', (ok) => recovered.push(ok));
    // Where the subscription stands when a resume is answered: still at what it last
    // received (the replay follows), never at the top (a drop during the replay would
    // then lose the rest of it).
    const atResume = [];
    sub.on('subscribed', (f) => {
      if (f.recovered === true) atResume.push([sub.offset, f.offset]);
    });
    await until('subscribed', () => sub.active);
    for (let i = 1; i <= 3; i++) await publish(b.addr, 'feed:x', i);
    await until('1..3', () => got.length === 3);
    await stop(a, 'SIGKILL');
    await until('disconnected', () => c.state !== 'connected');
    for (let i = 4; i <= 50; i++) await publish(b.addr, 'feed:x', i);
    const restarted = Date.now();
    a = await herald(port, ['--redis', url]);
    await until('every missed message', () => got.length === 50);
    const took = Date.now() - restarted;
    console.log(`resumed 47 missed messages ${took} ms after the node came back`);
    assert.deepEqual(
      got.map((m) => m.data),
      Array.from({ length: 50 }, (_, i) => i + 1),
    );
    assert.deepEqual(
      got.map((m) => m.offset),
      Array.from({ length: 50 }, (_, i) => i + 1),
    );
    assert.ok(recovered.includes(true), `recovered: ${recovered}`);
    assert.ok(!recovered.includes(false));
    assert.deepEqual(atResume, [[3, 50]], 'the position at the resumed reply: [ours, top]');
  } finally {
    c?.close();
    if (a) await stop(a);
    if (b) await stop(b);
    redis.proc.kill('SIGKILL');
  }
});

test('reconnects at once after a drain (1012) and resumes', async () => {
  const port = await freePort();
  let h = await herald(port, [], { HERALD_SHUTDOWN__RESTART: 'true', HERALD_SHUTDOWN__DRAIN_WINDOW: '10ms' });
  const c = new Client(`ws://${h.addr}/ws`, { minReconnectDelay: 100 });
  try {
    const sub = c.subscribe('chat:d');
    const got = collect(sub);
    await until('subscribed', () => sub.active);
    await publish(h.addr, 'chat:d', 1);
    await until('1', () => got.length === 1);
    await stop(h);
    // The embedded broker's history does not outlive the process: a new node, a new
    // epoch, and the client is told it could not recover.
    const recovered = [];
    sub.on('recovered', (ok) => recovered.push(ok));
    h = await herald(port, [], {});
    await until('resubscribed', () => recovered.length === 1);
    assert.deepEqual(recovered, [false]);
    await publish(h.addr, 'chat:d', 2);
    await until('2', () => got.length === 2);
  } finally {
    c.close();
    await stop(h);
  }
});

test('refreshes its token before it expires and stays connected', async () => {
  const h = await herald(0);
  let issued = 0;
  const c = new Client(`ws://${h.addr}/ws`, {
    getToken: async () => {
      issued++;
      return token('u1', issued === 1 ? 2 : 600);
    },
  });
  try {
    const welcomed = [];
    c.on('welcome', (w) => welcomed.push(w));
    const sub = c.subscribe('chat:t');
    const got = collect(sub);
    await until('connected', () => c.state === 'connected' && sub.active);
    assert.equal(welcomed[0].user, 'u1');
    await until('a refresh', () => issued >= 2);
    // Past the first token's expiry and the server's grace: still the same connection.
    await sleep(3200);
    assert.equal(welcomed.length, 1, 'no reconnect');
    await publish(h.addr, 'chat:t', 'still here');
    await until('a message', () => got.length === 1);
  } finally {
    c.close();
    await stop(h);
  }
});

test('an expired token closes with 4001 and the client comes back with a new one', async () => {
  const h = await herald(0);
  let issued = 0;
  const c = new Client(`ws://${h.addr}/ws`, {
    minReconnectDelay: 50,
    // Hands out short tokens and cannot refresh in time: expiry must be handled.
    getToken: async () => {
      issued++;
      return token(`u${issued}`, 1);
    },
  });
  try {
    const users = [];
    c.on('welcome', (w) => users.push(w.user));
    c.subscribe('chat:e');
    await until('two sessions', () => users.length >= 2, 10000);
    assert.equal(users[0], 'u1');
  } finally {
    c.close();
    await stop(h);
  }
});

test('falls back to Server-Sent Events where WebSocket is refused, and publishes over HTTP', async () => {
  const h = await herald(0);
  // The WebSocket URL answers 404 (as a proxy that refuses upgrades would).
  const c = new Client(`ws://${h.addr}/blocked-ws`, {
    sseUrl: `http://${h.addr}/sse`,
    minReconnectDelay: 20,
    sseAfterFailures: 2,
  });
  try {
    const transports = [];
    c.on('transport', (t) => transports.push(t));
    const sub = c.subscribe('chat:s');
    const got = collect(sub);
    await until('subscribed over SSE', () => sub.active);
    assert.equal(c.transport, 'sse');
    assert.deepEqual(transports, ['sse']);
    const r = await c.publish('chat:s', { via: 'http' });
    assert.equal(r.offset, 1);
    await until('the message', () => got.length === 1);
    assert.deepEqual(got[0].data, { via: 'http' });
    await publish(h.addr, 'chat:s', 2);
    await until('another', () => got.length === 2);
    assert.equal(got[1].offset, 2);
  } finally {
    c.close();
    await stop(h);
  }
});

/** A live-score document of about 2 KB where a few fields change per update. */
function scoreDoc(seq) {
  const players = Array.from({ length: 22 }, (_, i) => ({
    name: `Player ${String.fromCharCode(65 + (i % 26))}${i}`,
    team: i < 11 ? 'home' : 'away',
    rating: 6 + ((i * 7 + Math.floor(seq / 5)) % 30) / 10,
    cards: i === seq % 22 ? 1 : 0,
  }));
  return { seq, match: 'Sunderland – Newcastle', minute: 10 + seq, score: [Math.floor(seq / 7), Math.floor(seq / 11)], possession: [50 + (seq % 9), 50 - (seq % 9)], players };
}

/** A WebSocket that counts the delta frames it receives. */
function countingWebSocket(counts) {
  return class extends globalThis.WebSocket {
    constructor(url) {
      super(url);
      this.addEventListener('message', (ev) => {
        if (typeof ev.data !== 'string' || !ev.data.startsWith('{"op":"message"')) return;
        counts[ev.data.includes('"delta":') ? 'delta' : 'whole']++;
      });
    }
  };
}

test('fossil deltas rebuild every publication, over WebSocket and SSE, through a node change and a Redis reset', async () => {
  // The test counts deltas: a debug build on a loaded machine can take over the
  // production 2 ms for one (limits.max_delta_time), which pauses the channel's deltas.
  let redis = await startRedis();
  const redisPort = Number(new URL(redis.url).port);
  const port = await freePort();
  let a = await herald(port, ['--redis', redis.url], { HERALD_REDIS__MAX_RECONNECT_DELAY: '100ms', HERALD_LIMITS__MAX_DELTA_TIME: '1s' });
  const b = await herald(0, ['--redis', redis.url], { HERALD_REDIS__MAX_RECONNECT_DELAY: '100ms', HERALD_LIMITS__MAX_DELTA_TIME: '1s' });
  const counts = { delta: 0, whole: 0 };
  const opts = { minReconnectDelay: 50, maxReconnectDelay: 200 };
  // Stays on WebSocket while the node is down (its frames are the ones counted).
  const ws = new Client(`ws://127.0.0.1:${port}/ws`, { ...opts, sseAfterFailures: 0, WebSocket: countingWebSocket(counts) });
  // WebSocket refused (404): SSE to the same node.
  const sse = new Client(`ws://127.0.0.1:${port}/no-ws`, { ...opts, sseUrl: `http://127.0.0.1:${port}/sse`, sseAfterFailures: 1 });
  const plain = new Client(`ws://127.0.0.1:${port}/ws`, opts);
  const clients = [ws, sse, plain];
  const errors = [];
  for (const c of clients) c.on('error', (e) => e.code === 'delta' && errors.push(e));
  const subs = [ws.subscribe('doc:live', { delta: 'fossil' }), sse.subscribe('doc:live', { delta: 'fossil' }), plain.subscribe('doc:live')];
  const got = subs.map(collect);
  const resets = subs.map((s) => {
    const n = { n: 0 };
    s.on('reset', () => n.n++);
    return n;
  });
  // Every delivery is the document published with its seq, field for field (a delta
  // applied to the wrong base fails its checksum, or rebuilds another document).
  const check = () => {
    for (const g of got) for (const m of g) assert.deepEqual(m.data, scoreDoc(m.data.seq));
  };
  const seqs = (g) => g.map((m) => m.data.seq);
  try {
    await until('subscribed', () => subs.every((s) => s.active));
    assert.equal(sse.transport, 'sse');
    assert.deepEqual(subs.map((s) => s.delta), [true, true, false]);
    for (let i = 1; i <= 20; i++) await publish(b.addr, 'doc:live', scoreDoc(i));
    await until('20 each', () => got.every((g) => g.length === 20));
    check();
    for (const g of got) assert.deepEqual(seqs(g), Array.from({ length: 20 }, (_, i) => i + 1));
    // The first whole, then deltas (each far smaller than the 2 KB document).
    assert.equal(counts.whole, 1);
    assert.equal(counts.delta, 19);

    // The node dies; the clients resume elsewhere... here, on the same port once it is
    // back: whole first (every resume is), then deltas again.
    await stop(a, 'SIGKILL');
    for (let i = 21; i <= 30; i++) await publish(b.addr, 'doc:live', scoreDoc(i));
    a = await herald(port, ['--redis', redis.url], { HERALD_REDIS__MAX_RECONNECT_DELAY: '100ms', HERALD_LIMITS__MAX_DELTA_TIME: '1s' });
    await until('30 each', () => got.every((g) => g.length === 30), 20000);
    check();
    for (const g of got) assert.deepEqual(seqs(g), Array.from({ length: 30 }, (_, i) => i + 1));
    for (let i = 31; i <= 35; i++) await publish(b.addr, 'doc:live', scoreDoc(i));
    await until('35 each', () => got.every((g) => g.length === 35));
    assert.ok(counts.whole >= 2 && counts.delta >= 19 + 4, JSON.stringify(counts));

    // Redis restarts empty: a new epoch. The clients are told (reset), and what follows
    // rebuilds correctly (whole after the reset, deltas after that).
    redis.proc.kill('SIGKILL');
    redis = await startRedis(redisPort);
    const before = { ...counts };
    let seq = 36;
    // Publishing goes on meanwhile (some attempts fail while Redis is away).
    for (const end = Date.now() + 20000; !resets.every((r) => r.n > 0); seq++) {
      if (Date.now() > end) throw new Error(`timed out waiting for a reset everywhere: ${JSON.stringify(resets)}`);
      await publish(b.addr, 'doc:live', scoreDoc(seq)).catch(() => {});
      await sleep(50);
    }
    const last = seq + 5;
    for (; seq <= last; seq++) await publish(b.addr, 'doc:live', scoreDoc(seq));
    await until('the last document everywhere', () => got.every((g) => g.at(-1)?.data.seq === last), 20000);
    check();
    for (const g of got) {
      const s = seqs(g);
      assert.ok(s.every((x, i) => i === 0 || x > s[i - 1]), `in order: ${s}`);
    }
    console.log(`WebSocket message frames: ${JSON.stringify(counts)}`);
    assert.ok(counts.delta - before.delta >= 4, `deltas after the reset: ${JSON.stringify(counts)}`);
    assert.deepEqual(errors, []);
  } finally {
    for (const c of clients) c.close();
    await stop(a);
    await stop(b);
    redis.proc.kill('SIGKILL');
  }
});

test('subscribing again at once on a busy delta channel (mount, unmount, mount) keeps the connection', async () => {
  const h = await herald(0);
  const c = new Client(`ws://${h.addr}/ws`, { minReconnectDelay: 50 });
  const errors = [];
  const states = [];
  c.on('error', (e) => errors.push(e.message));
  c.on('state', (s) => states.push(s));
  let publishing = true;
  const publisher = (async () => {
    for (let i = 1; publishing; i++) {
      await publish(h.addr, 'doc:toggle', scoreDoc(i));
      await sleep(2);
    }
  })();
  try {
    let sub = c.subscribe('doc:toggle', { delta: 'fossil' });
    await until('subscribed', () => sub.active);
    await sleep(200);
    for (let k = 0; k < 20; k++) {
      // Deltas of the first subscription are still on their way to the second.
      sub.unsubscribe();
      sub = c.subscribe('doc:toggle', { delta: 'fossil' });
      await sleep(50);
    }
    const got = collect(sub);
    await until('messages on the last subscription', () => got.length >= 10);
    for (const m of got) assert.deepEqual(m.data, scoreDoc(m.data.seq));
    assert.deepEqual(errors, []);
    assert.deepEqual(states.filter((s) => s !== 'connected'), []);
  } finally {
    publishing = false;
    await publisher;
    c.close();
    await stop(h);
  }
});

test('the classic build defines globalThis.Herald', () => {
  const src = execFileSync(process.execPath, [
    '-e',
    `require('vm').runInNewContext(require('fs').readFileSync(${JSON.stringify(
      new URL('../dist/herald.js', import.meta.url).pathname,
    )}, 'utf8'), globalThis); console.log(typeof globalThis.Herald.Client)`,
  ]).toString();
  assert.equal(src.trim(), 'function');
});

test('retries a subscribe answered unavailable, and receives once Redis is back', async () => {
  // The first start picks its port (and tries another if it was taken before
  // redis-server bound it); the restart reuses it.
  let redis = await startRedis();
  const port = Number(new URL(redis.url).port);
  const h = await herald(0, ['--redis', redis.url], {
    HERALD_LIMITS__SUBSCRIBE_TIMEOUT: '300ms',
    HERALD_REDIS__MAX_RECONNECT_DELAY: '100ms',
  });
  const c = new Client(`ws://${h.addr}/ws`, { minReconnectDelay: 100, maxReconnectDelay: 400 });
  try {
    await until('connected', () => c.state === 'connected');
    redis.proc.kill('SIGKILL');
    await sleep(200);
    const sub = c.subscribe('feed:x');
    const errors = [];
    sub.on('error', (e) => errors.push(e.code));
    const got = collect(sub);
    await until('a subscribe refused as unavailable', () => errors.includes('unavailable'));
    redis = await startRedis(port);
    // Still connected all along: the client retried the subscribe by itself.
    await until('subscribed once Redis is back', () => sub.active, 20000);
    assert.equal(c.state, 'connected');
    await publish(h.addr, 'feed:x', 1);
    await until('the message', () => got.length === 1);
  } finally {
    c.close();
    await stop(h);
    redis.proc.kill('SIGKILL');
  }
});

test('requests lost with a connection: publishes fail as unknown_outcome at once, subscribes are sent again, nothing surfaces as an error', async () => {
  const h = await herald(0);
  const r = await relay(h.addr);
  const c = new Client(`ws://${r.addr}/ws`, { minReconnectDelay: 50, maxReconnectDelay: 100, publishTimeout: 60000 });
  try {
    await until('connected', () => c.state === 'connected');
    // The server hears these and answers, but its answers die with the connection.
    r.hold();
    const errors = [];
    const subs = Array.from({ length: 5 }, (_, i) => c.subscribe(`chat:lost${i}`));
    for (const s of subs) s.on('error', (e) => errors.push(`${s.channel}: ${e.code}`));
    c.on('error', (e) => errors.push(`client: ${e.code}`));
    const sent = Date.now();
    const outcome = c.publish('chat:lost0', { n: 1 }).then(
      () => 'resolved',
      (e) => e.code,
    );
    await sleep(200);
    assert.ok(subs.every((s) => !s.active), 'no subscribe answered while held');
    r.cut();
    assert.equal(await outcome, 'unknown_outcome');
    assert.ok(Date.now() - sent < 5000, 'rejected at the drop, not at publishTimeout');
    // After the reconnect every subscription is confirmed and receives.
    await until('all resubscribed', () => subs.every((s) => s.active));
    const got = subs.map(collect);
    for (const s of subs) await publish(h.addr, s.channel, 7);
    await until('one message each', () => got.every((g) => g.length === 1));
    // Held again, then closed by the application: a subscribe in flight is abandoned
    // quietly, not reported as refused.
    r.hold();
    c.subscribe('chat:late').on('error', (e) => errors.push(`chat:late: ${e.code}`));
    await sleep(100);
    c.close();
    await sleep(100);
    assert.deepEqual(errors, []);
  } finally {
    c.close();
    r.close();
    await stop(h);
  }
});

test('the control API: server-side subscribe and unsubscribe reach the app; 4000 reconnects, 4400 stops', async () => {
  const key = 'js-control-key';
  const h = await herald(0, [], { HERALD_AUTH__API_KEY: key });
  const api = async (path, body) => {
    const r = await fetch(`http://${h.addr}${path}`, {
      method: body === undefined ? 'GET' : 'POST',
      headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    assert.equal(r.status, 200, `${path}: ${r.status}`);
    return r.json();
  };
  const publishKeyed = (channel, data) => api('/api/publish', { channel, data });
  const c = new Client(`ws://${h.addr}/ws`, {
    minReconnectDelay: 50,
    maxReconnectDelay: 100,
    getToken: async () => token('dana', 600),
  });
  const errors = [];
  c.on('error', (e) => errors.push(e));
  // Every state the client passed through: a reconnect can complete before the API's reply arrives.
  const states = [];
  c.on('state', (s) => states.push(s));
  try {
    await until('connected', () => c.state === 'connected');
    const made = [];
    c.on('subscription', (sub) => made.push(sub));
    assert.equal((await api('/api/subscribe', { user: 'dana', channel: 'chat:pushed' })).connections, 1);
    await until('the server-side subscription', () => made.length === 1 && made[0].active);
    const sub = made[0];
    assert.equal(sub.channel, 'chat:pushed');
    assert.equal(c.subscriptions.get('chat:pushed'), sub);
    const got = collect(sub);
    await publishKeyed('chat:pushed', 1);
    await until('its first message', () => got.length === 1);

    // 4000-4399: reconnect, and the server-made subscription is resumed like our own.
    const before = states.length;
    assert.equal((await api('/api/disconnect', { user: 'dana', code: 4000, reason: 'sign in again' })).connections, 1);
    await until('disconnected', () => states.slice(before).some((s) => s !== 'connected'));
    await until('back', () => c.state === 'connected' && sub.active);
    await publishKeyed('chat:pushed', 2);
    await until('a message after the reconnect', () => got.length === 2);

    // The backend takes the channel away: the app hears it; it is not asked for again.
    const ended = [];
    sub.on('unsubscribed', () => ended.push(true));
    assert.equal((await api('/api/unsubscribe', { user: 'dana', channel: 'chat:pushed' })).connections, 1);
    await until('unsubscribed', () => ended.length === 1);
    assert.equal(c.subscriptions.has('chat:pushed'), false);

    // 4400-4499: stop for good, with the code.
    assert.deepEqual(errors, []);
    assert.equal((await api('/api/disconnect', { user: 'dana', reason: 'banned' })).connections, 1);
    await until('closed for good', () => c.state === 'closed');
    assert.equal(errors.length, 1);
    assert.equal(errors[0].code, 'disconnected');
    assert.equal(errors[0].closeCode, 4400);
    await sleep(500);
    const info = await api('/api/info');
    assert.equal(info.nodes[0].connections, 0, 'no reconnect after 4400');
  } finally {
    c.close();
    await stop(h);
  }
});

test('presence: who is here, counts, and join/leave events', async () => {
  const h = await herald(0);
  const mk = (sub) => new Client(`ws://${h.addr}/ws`, { getToken: async () => token(sub, 600) });
  const ann = mk('ann');
  const ben = mk('ben');
  try {
    const room = ann.subscribe('room:1');
    const events = [];
    room.on('join', (m) => events.push(['join', m.user]));
    room.on('leave', (m) => events.push(['leave', m.user]));
    await until('ann in', () => room.active && events.length === 1);
    const benRoom = ben.subscribe('room:1');
    await until('ben joined', () => benRoom.active && events.length === 2);
    const page = await room.presence();
    assert.deepEqual(page.members.map((m) => m.user).sort(), ['ann', 'ben']);
    assert.deepEqual(await benRoom.presenceStats().then(({ connections, users }) => [connections, users]), [2, 2]);
    // Only subscribers may ask: a channel this client does not hold is refused.
    const other = await ann.subscribe('chat:x');
    await until('chat', () => other.active);
    await assert.rejects(other.presence(), (e) => e.code === 'bad_request');
    ben.close();
    await until('ben left', () => events.length === 3);
    assert.deepEqual(events, [
      ['join', 'ann'],
      ['join', 'ben'],
      ['leave', 'ben'],
    ]);
  } finally {
    ann.close();
    ben.close();
    await stop(h);
  }
});

test('connect() after autoConnect: false, subscription tokens, and history to back-fill a page', async () => {
  const h = await herald(0);
  const asked = [];
  const c = new Client(`ws://${h.addr}/ws`, {
    autoConnect: false,
    getToken: async () => token('gil', 600),
    getSubscriptionToken: async (channel) => {
      asked.push(channel);
      return channel.startsWith('private:') ? token('gil', 600, { extra: { channel } }) : null;
    },
  });
  try {
    await sleep(300);
    assert.equal(c.state, 'disconnected', 'nothing happens before connect()');
    const priv = c.subscribe('private:gil');
    c.connect();
    c.connect(); // once is enough; twice is harmless
    await until('subscribed with a subscription token', () => priv.active);
    assert.deepEqual(asked, ['private:gil']);
    for (let i = 1; i <= 12; i++) await publish(h.addr, 'private:gil', { n: i });
    const back = await priv.history({ limit: 3 });
    assert.deepEqual(
      back.publications.map((p) => [p.offset, p.data.n]),
      [
        [10, 10],
        [11, 11],
        [12, 12],
      ],
    );
    assert.equal(back.offset, 12);
    // Without a token the server refuses, and the subscription hears why.
    const errors = [];
    const other = new Client(`ws://${h.addr}/ws`, { getToken: async () => token('hal', 600) });
    other.subscribe('private:gil').on('error', (e) => errors.push(e.code));
    await until('refused', () => errors.length === 1);
    assert.deepEqual(errors, ['forbidden']);
    other.close();
  } finally {
    c.close();
    await stop(h);
  }
});

test('rpc: the backend answers, refuses with its code, or is not there', async () => {
  const { createServer } = await import('node:http');
  const backend = createServer((req, res) => {
    let body = '';
    req.on('data', (d) => (body += d));
    req.on('end', () => {
      const call = JSON.parse(body);
      res.setHeader('content-type', 'application/json');
      if (call.method === 'add') res.end(JSON.stringify({ result: { sum: call.data.a + call.data.b, user: call.user } }));
      else res.end(JSON.stringify({ error: { code: 7, message: 'unknown method' } }));
    });
  });
  await new Promise((r) => backend.listen(0, '127.0.0.1', r));
  const h = await herald(0, [], { HERALD_HOOKS__RPC__URL: `http://127.0.0.1:${backend.address().port}/rpc` });
  const c = new Client(`ws://${h.addr}/ws`, { getToken: async () => token('mia', 600) });
  try {
    await until('connected', () => c.state === 'connected');
    assert.deepEqual(await c.rpc('add', { a: 2, b: 3 }), { sum: 5, user: 'mia' });
    await assert.rejects(c.rpc('nope'), (e) => e.code === 'refused' && e.hookCode === 7 && e.message === 'unknown method');
    backend.close();
    backend.closeAllConnections();
    await assert.rejects(c.rpc('add', { a: 1, b: 1 }), (e) => e.code === 'unavailable');
  } finally {
    c.close();
    backend.close();
    await stop(h);
  }
});

test('refreshes a short token once, not in a storm, even with a clock far ahead', async () => {
  const h = await herald(0);
  const realDateNow = Date.now;
  try {
    for (const [what, lifetime, skew] of [
      ['60 s tokens', 60, 0],
      ['15-minute tokens, the local clock 850 s fast', 900, 850_000],
    ]) {
      Date.now = () => realNow() + skew;
      let asked = 0;
      const c = new Client(`ws://${h.addr}/ws`, {
        getToken: () => {
          asked++;
          return token('7', lifetime, { iat: true });
        },
      });
      try {
        await until('connected', () => c.state === 'connected');
        await sleep(2000);
        assert.equal(asked, 1, `${what}: getToken called ${asked} times in 2 s`);
      } finally {
        c.close();
      }
    }
  } finally {
    Date.now = realDateNow;
    await stop(h);
  }
});

test('backs off across transports against a dead server', async () => {
  const dead = await freePort();
  let asked = 0;
  const c = new Client(`ws://127.0.0.1:${dead}/ws`, {
    minReconnectDelay: 100,
    maxReconnectDelay: 2000,
    sseAfterFailures: 2,
    getToken: () => {
      asked++;
      return null;
    },
  });
  c.on('error', () => {});
  // With a subscription, the SSE fallback has something to stream, so it tries too.
  c.subscribe('chat:x');
  try {
    await sleep(4000);
    // Growing bounds 100, 200, 400, ... 2000 ms with full jitter: a handful of attempts
    // in 4 s. Starting over at every switch of transport made it about 50.
    assert.ok(asked >= 2 && asked <= 15, `${asked} attempts in 4 s`);
  } finally {
    c.close();
  }
});

test('refused credentials surface as an error with the reason, then the client stops', async () => {
  const h = await herald(0, [], { HERALD_AUTH__ANONYMOUS: 'false' });
  const c = new Client(`ws://${h.addr}/ws`, {
    minReconnectDelay: 50,
    maxReconnectDelay: 200,
    sseAfterFailures: 1,
    maxAuthFailures: 2,
  });
  const errors = [];
  c.on('error', (e) => errors.push(e));
  try {
    c.subscribe('chat:x');
    await until('closed after refusals', () => c.state === 'closed', 15000);
    const refused = errors.filter((e) => e.code === 'unauthorized');
    assert.ok(refused.length >= 1, errors.map((e) => `${e.code}: ${e.message}`).join('; '));
    assert.match(refused[0].message, /token/);
  } finally {
    c.close();
    await stop(h);
  }
});
