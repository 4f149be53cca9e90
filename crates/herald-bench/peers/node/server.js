// The classic hand-rolled gateway: Node `ws` + `ioredis`, interest-based like Herald.
// Speaks the subset of Herald's protocol the bench uses: welcome, subscribe/subscribed,
// message delivery. Each publication is encoded once and sent to every subscriber.
'use strict';
const WebSocket = require('ws');
const Redis = require('ioredis');

const port = Number(process.env.PORT || 8090);
const host = process.env.HOST || '127.0.0.1';
const prefix = process.env.PREFIX || 'herald:';
const sub = new Redis(process.env.REDIS_URL || 'redis://127.0.0.1:6379');
// A peer that cannot work must fail the run loudly, not report messages as lost.
sub.on('error', (e) => {
  console.error(`node peer: Redis: ${e.message}`);
  process.exit(1);
});
const channels = new Map(); // channel -> Set<WebSocket>
let nextConn = 0;

sub.on('messageBuffer', (chan, msg) => {
  const name = chan.toString().slice(prefix.length);
  const set = channels.get(name);
  if (!set) return;
  const frame = '{"op":"message","channel":"' + name + '","data":' + msg.toString() + '}';
  for (const ws of set) ws.send(frame);
});

// Serve only once the connection is ready: a SUBSCRIBE sent before ioredis's ready
// check (INFO) puts the connection in subscriber mode and the check fails, which lost
// whole runs ("Connection in subscriber mode, only subscriber commands may be used").
sub.once('ready', serve);

function serve() {
const wss = new WebSocket.Server({ host, port, perMessageDeflate: false, clientTracking: false });
wss.on('connection', (ws) => {
  ws.subs = new Set();
  ws.send(JSON.stringify({ op: 'welcome', version: 1, node: 'node-peer', conn: String(++nextConn) }));
  ws.on('message', async (data) => {
    let m;
    try { m = JSON.parse(data); } catch { return; }
    if (m.op !== 'subscribe' || typeof m.channel !== 'string') return;
    let set = channels.get(m.channel);
    if (!set) {
      set = new Set();
      channels.set(m.channel, set);
      await sub.subscribe(prefix + m.channel);
    }
    set.add(ws);
    ws.subs.add(m.channel);
    ws.send(JSON.stringify({ op: 'subscribed', channel: m.channel, id: m.id }));
  });
  ws.on('close', () => {
    for (const c of ws.subs) {
      const set = channels.get(c);
      if (!set) continue;
      set.delete(ws);
      if (set.size === 0) { channels.delete(c); sub.unsubscribe(prefix + c); }
    }
  });
  ws.on('error', () => {});
});
wss.on('listening', () => console.log(`node peer listening on ${host}:${port}`));
}
