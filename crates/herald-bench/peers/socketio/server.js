// Socket.IO with its Redis adapter, scaled the way its documentation describes:
// clients join a room per channel; a broadcast to a room goes through the adapter,
// which hands it to every node over Redis pub/sub.
//
// The bench publishes raw JSON to Redis channels `herald:<channel>`; the PRIMARY node
// bridges them into Socket.IO with `io.to(channel).emit(...)`, so delivery to clients on
// other nodes goes through the adapter exactly as an application's emit would.
'use strict';
const http = require('http');
const { Server } = require('socket.io');
const { createAdapter } = require('@socket.io/redis-adapter');
const Redis = require('ioredis');

const port = Number(process.env.PORT || 8092);
const host = process.env.HOST || '127.0.0.1';
const url = process.env.REDIS_URL || 'redis://127.0.0.1:6379';
const prefix = process.env.PREFIX || 'herald:';

const pub = new Redis(url);
const sub = pub.duplicate();
const httpServer = http.createServer();
const io = new Server(httpServer, {
  transports: ['websocket'],
  perMessageDeflate: false,
  serveClient: false,
});
io.adapter(createAdapter(pub, sub));

io.on('connection', (socket) => {
  socket.on('subscribe', (channel) => {
    socket.join(String(channel));
    socket.emit('subscribed', String(channel));
  });
});

if (process.env.PRIMARY === '1') {
  const feed = new Redis(url);
  feed.psubscribe(prefix + '*');
  feed.on('pmessageBuffer', (_pattern, chan, msg) => {
    let data;
    try { data = JSON.parse(msg.toString()); } catch { return; }
    io.to(chan.toString().slice(prefix.length)).emit('message', data);
  });
}

httpServer.listen(port, host, () => console.log(`socket.io peer listening on ${host}:${port}`));
