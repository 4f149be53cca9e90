// How fast the client is back after the node behind it dies: two herald nodes on one
// redis-server behind HAProxy (health checks every 100 ms, redispatch on connect
// failure), one client subscribed to a history channel through it. Each round kills
// the client's node (SIGKILL), measures the time until the client is subscribed again
// (on the other node), checks that nothing published meanwhile was lost, and restarts
// the killed node. Prints the distribution.
//
//   node --experimental-websocket bench/failover.mjs [rounds]   (TEST_HERALD_BIN picks the binary)
import { Client } from '../dist/herald.mjs';
import { freePort, haproxy, herald as start, publish as post, redis as startRedis, sleep, tempFile } from '../test/harness.mjs';

const ROUNDS = Number(process.argv[2] ?? 30);
const config = tempFile('herald.toml', '[[channels.rules]]\npattern = "feed:*"\nhistory_size = 10000\n');
const herald = async (port, id, redis) => (await start(port, ['--node-id', id, '--redis', redis, '--config', config])).proc;
const publish = (port, data) => post(port, 'feed:x', data);

const redis = await startRedis();
const ports = { a: await freePort(), b: await freePort() };
const nodes = { a: await herald(ports.a, 'a', redis.url), b: await herald(ports.b, 'b', redis.url) };
const lb = await haproxy(ports, ['']);
const [front] = lb.ports;
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
    nodes[victim] = await herald(ports[victim], victim, redis.url);
    await sleep(300); // HAProxy sees it up again
  }
} finally {
  client.close();
  lb.proc.kill('SIGKILL');
  for (const n of Object.values(nodes)) n.kill('SIGKILL');
  redis.proc.kill('SIGKILL');
}
times.sort((x, y) => x - y);
const q = (p) => times[Math.min(times.length - 1, Math.floor(times.length * p))];
console.log(
  JSON.stringify({ rounds: times.length, published: seq, lost: 0, p50_ms: q(0.5), p90_ms: q(0.9), p99_ms: q(0.99), max_ms: times[times.length - 1] }),
);
