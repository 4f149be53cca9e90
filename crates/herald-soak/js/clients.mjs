// herald-soak's JS client group: the repository's JS client (clients/js/dist) under
// Node, printing every subscription event as one JSON line (the shape of the Rust
// groups' records: {c, ch, t, k, m?, a?, o?}). Like the Rust group, clients reach the
// gateway through a relay in this process, so that `drop <permille>` on stdin drops a
// share of their connections; `stop` ends every subscription (an `end` record each).
//
// Configuration (environment): SOAK_UPSTREAM host:port, SOAK_PREFIX, SOAK_CLIENTS,
// SOAK_CHANNELS (comma-separated), SOAK_PER_CLIENT, SOAK_SEED, SOAK_SECRET (HS256),
// SOAK_TOKEN_MIN_S, SOAK_TOKEN_MAX_S. Run with node --experimental-websocket.

import net from 'node:net';
import crypto from 'node:crypto';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const here = path.dirname(fileURLToPath(import.meta.url));
const { Client } = await import(path.join(here, '../../../clients/js/dist/herald.mjs'));

const env = (k, d) => process.env[k] ?? d;
const [upHost, upPort] = env('SOAK_UPSTREAM').split(':');
const prefix = env('SOAK_PREFIX', 'j');
const count = Number(env('SOAK_CLIENTS', '10'));
const channels = env('SOAK_CHANNELS').split(',');
const perClient = Number(env('SOAK_PER_CLIENT', '2'));
const secret = env('SOAK_SECRET');
const tmin = Number(env('SOAK_TOKEN_MIN_S', '6'));
const tmax = Number(env('SOAK_TOKEN_MAX_S', '20'));

// A small seeded generator (mulberry32): the same seed picks the same channels.
let seed = Number(BigInt(env('SOAK_SEED', '1')) % 4294967296n) >>> 0;
function rand() {
  seed = (seed + 0x6d2b79f5) >>> 0;
  let t = seed;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}

// The document message m on ch carries (record.rs's `doc`).
const FILLER =
  'The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. The five boxing wizards jump quickly; jackdaws love my big sphinx of quartz.';
const doc = (ch, m) => `${ch} #${m} ${FILLER}`;

const b64 = (b) => Buffer.from(b).toString('base64url');
function token(sub) {
  const now = Math.floor(Date.now() / 1000);
  const life = tmin + Math.floor(rand() * Math.max(1, tmax - tmin));
  const head = b64(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64(JSON.stringify({ sub, iat: now, exp: now + life }));
  const sig = crypto.createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

const out = [];
let flushing = false;
function emit(r) {
  out.push(JSON.stringify(r));
  if (!flushing) {
    flushing = true;
    setImmediate(() => {
      flushing = false;
      const chunk = out.splice(0).join('\n') + '\n';
      process.stdout.write(chunk);
    });
  }
}
const rec = (c, ch, k, extra = {}) => ({ c, ch, t: Date.now(), k, ...extra });

// The relay.
const relayed = new Set();
const relay = net.createServer((down) => {
  const up = net.connect(Number(upPort), upHost);
  const pair = { down, up };
  relayed.add(pair);
  const end = () => {
    relayed.delete(pair);
    down.destroy();
    up.destroy();
  };
  down.on('error', end).on('close', end);
  up.on('error', end).on('close', end);
  down.pipe(up);
  up.pipe(down);
});
await new Promise((ok) => relay.listen(0, '127.0.0.1', ok));
const url = `ws://127.0.0.1:${relay.address().port}/ws`;

const clients = [];
const subs = [];
for (let i = 0; i < count; i++) {
  const id = `${prefix}${i}`;
  const client = new Client(url, {
    getToken: async () => token(id),
    minReconnectDelay: 100,
    maxReconnectDelay: 2000,
    sseAfterFailures: 0,
    maxAuthFailures: 0,
  });
  const chosen = [...channels].sort(() => rand() - 0.5).slice(0, Math.max(1, perClient));
  for (const ch of chosen) {
    // Half the clients take Fossil deltas on history channels.
    const sub = client.subscribe(ch, i % 2 === 0 ? { delta: 'fossil' } : {});
    emit(rec(id, ch, 'start'));
    subs.push([id, ch]);
    sub.on('subscribed', () => emit(rec(id, ch, 'sub')));
    sub.on('recovered', (ok) => emit(rec(id, ch, ok ? 'rec' : 'lost')));
    sub.on('reset', () => emit(rec(id, ch, 'reset')));
    sub.on('message', (data, ctx) => {
      const o = ctx.offset === undefined ? {} : { o: ctx.offset };
      if (!data || typeof data.m !== 'number' || data.doc !== doc(ch, data.m)) {
        emit(rec(id, ch, 'corrupt', { ...o, why: `not the publisher's data: ${JSON.stringify(data).slice(0, 200)}` }));
        return;
      }
      const r = rec(id, ch, 'msg', { m: data.m, a: data.a });
      if (ctx.offset !== undefined) r.o = ctx.offset;
      emit(r);
    });
    sub.on('error', (e) => {
      if (e.code !== 'unavailable') emit(rec(id, ch, 'refused', { why: `${e.code}: ${e.message}` }));
    });
  }
  clients.push(client);
}

const lines = readline.createInterface({ input: process.stdin });
for await (const line of lines) {
  const [cmd, arg] = line.trim().split(/\s+/);
  if (cmd === 'drop') {
    let n = 0;
    for (const pair of [...relayed]) {
      if (rand() * 1000 < Number(arg)) {
        pair.down.destroy();
        pair.up.destroy();
        n++;
      }
    }
    process.stderr.write(`${prefix}: dropped ${n} connections\n`);
  } else if (cmd === 'slow') {
    // `slow <permille> <rate> <ms>`: these clients stop reading for `ms` (a rate is not
    // kept here: Node reads 64 KiB at a time; the Rust groups throttle to it).
    const ms = Number(line.trim().split(/\s+/)[3] ?? 1000);
    let n = 0;
    for (const pair of [...relayed]) {
      if (rand() * 1000 < Number(arg)) {
        // One stall at a time: a second one while stalled only extends it (two pipes
        // would write every chunk twice).
        pair.until = Math.max(pair.until ?? 0, Date.now() + ms);
        if (!pair.stalled) {
          pair.stalled = true;
          pair.up.unpipe(pair.down);
          pair.up.pause();
          const resume = () => {
            if (Date.now() < pair.until) {
              setTimeout(resume, pair.until - Date.now());
            } else {
              pair.stalled = false;
              if (!pair.up.destroyed) pair.up.pipe(pair.down);
            }
          };
          setTimeout(resume, ms);
        }
        n++;
      }
    }
    process.stderr.write(`${prefix}: ${n} connections stop reading for ${ms} ms\n`);
  } else if (cmd === 'stop') {
    break;
  }
}
for (const [c, ch] of subs) emit(rec(c, ch, 'end'));
for (const c of clients) c.close();
relay.close();
setImmediate(() => process.stdout.write('', () => process.exit(0)));
