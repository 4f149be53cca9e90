// How fast the client is back after the node behind it dies: two herald nodes on one
// redis-server behind HAProxy (health checks every 100 ms, redispatch on connect
// failure), one client subscribed to a history channel through it. Each round kills
// the client's node (SIGKILL), measures the time until the client is subscribed again
// (on the other node), checks that nothing published meanwhile was lost, and restarts
// the killed node. Prints the distribution.
//
//   node --experimental-websocket bench/failover.mjs [rounds]   (TEST_HERALD_BIN picks the binary)
import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Client } from '../dist/herald.mjs';

const BIN = process.env.TEST_HERALD_BIN ?? new URL('../../../target/debug/herald', import.meta.url).pathname;
const ROUNDS = Number(process.argv[2] ?? 30);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const cleanEnv = () => Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('HERALD_')));
const freePort = () =>
  new Promise((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });

const dir = mkdtempSync(join(tmpdir(), 'herald-failover-'));
writeFileSync(join(dir, 'herald.toml'), '[[channels.rules]]\npattern = "feed:*"\nhistory_size = 10000\n');

function herald(port, id, redis) {
  const proc = spawn(BIN, ['--listen', `127.0.0.1:${port}`, '--node-id', id, '--redis', redis, '--config', join(dir, 'herald.toml')], {
    env: { ...cleanEnv(), RUST_LOG: 'info' },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  return new Promise((resolve, reject) => {
    let buf = '';
    proc.stderr.on('data', (d) => {
      buf += d;
      if (buf.includes('listening')) resolve(proc);
    });
    proc.on('exit', (c) => reject(new Error(`herald ${id} exited ${c}: ${buf}`)));
  });
}

async function publish(port, data) {
  const r = await fetch(`http://127.0.0.1:${port}/api/publish`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ channel: 'feed:x', data }),
  });
  if (!r.ok) throw new Error(await r.text());
}

const redisPort = await freePort();
const redis = spawn('redis-server', ['--port', String(redisPort), '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
await sleep(300);
const url = `redis://127.0.0.1:${redisPort}`;
const ports = { a: await freePort(), b: await freePort() };
const nodes = { a: await herald(ports.a, 'a', url), b: await herald(ports.b, 'b', url) };
const front = await freePort();
writeFileSync(
  join(dir, 'haproxy.cfg'),
  `global
    maxconn 1000
defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
    retries 2
    option redispatch
frontend public
    bind 127.0.0.1:${front}
    default_backend herald
backend herald
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 100ms fall 1 rise 1
    server a 127.0.0.1:${ports.a} check
    server b 127.0.0.1:${ports.b} check
`,
);
const lb = spawn('haproxy', ['-db', '-f', join(dir, 'haproxy.cfg')], { stdio: 'ignore' });
await sleep(500);

const client = new Client(`ws://127.0.0.1:${front}/ws`);
let node = '';
client.on('welcome', (w) => (node = w.node));
const sub = client.subscribe('feed:x');
const got = [];
sub.on('message', (d) => got.push(d));
let subscribedAt = 0;
sub.on('subscribed', () => (subscribedAt = Date.now()));
while (!sub.active) await sleep(10);

const times = [];
let seq = 0;
try {
  for (let round = 0; round < ROUNDS; round++) {
    const victim = node;
    const other = victim === 'a' ? 'b' : 'a';
    subscribedAt = 0;
    const killed = Date.now();
    nodes[victim].kill('SIGKILL');
    for (let i = 0; i < 5; i++) await publish(ports[other], ++seq);
    while (!(subscribedAt && node === other)) await sleep(2);
    times.push(subscribedAt - killed);
    const deadline = Date.now() + 5000;
    while (got.length < seq && Date.now() < deadline) await sleep(5);
    if (got.length !== seq || got.some((v, i) => v !== i + 1)) throw new Error(`round ${round}: lost or reordered`);
    nodes[victim] = await herald(ports[victim], victim, url);
    await sleep(300); // HAProxy sees it up again
  }
} finally {
  client.close();
  lb.kill('SIGKILL');
  for (const n of Object.values(nodes)) n.kill('SIGKILL');
  redis.kill('SIGKILL');
}
times.sort((x, y) => x - y);
const q = (p) => times[Math.min(times.length - 1, Math.floor(times.length * p))];
console.log(
  JSON.stringify({ rounds: times.length, published: seq, lost: 0, p50_ms: q(0.5), p90_ms: q(0.9), p99_ms: q(0.99), max_ms: times[times.length - 1] }),
);
