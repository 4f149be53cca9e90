"""Python `websockets` + `redis.asyncio` gateway, interest-based like Herald.

Speaks the subset of Herald's protocol the bench uses: welcome, subscribe/subscribed,
message delivery. Each publication is encoded once and broadcast to its subscribers.
"""
import asyncio
import json
import os

import redis.asyncio as aioredis
import websockets

PORT = int(os.environ.get("PORT", "8091"))
HOST = os.environ.get("HOST", "127.0.0.1")
PREFIX = os.environ.get("PREFIX", "herald:")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")

channels: dict[str, set] = {}
next_conn = 0


async def main() -> None:
    r = aioredis.from_url(REDIS_URL)
    pubsub = r.pubsub()
    # A pubsub connection needs a subscription before it can be read.
    await pubsub.subscribe(PREFIX + "__keepalive__")

    async def reader() -> None:
        async for msg in pubsub.listen():
            if msg["type"] != "message":
                continue
            name = msg["channel"].decode()[len(PREFIX):]
            subs = channels.get(name)
            if not subs:
                continue
            frame = '{"op":"message","channel":"' + name + '","data":' + msg["data"].decode() + "}"
            websockets.broadcast(subs, frame)

    async def handler(ws) -> None:
        global next_conn
        next_conn += 1
        mine: set[str] = set()
        await ws.send(json.dumps({"op": "welcome", "version": 1, "node": "python-peer", "conn": str(next_conn)}))
        try:
            async for raw in ws:
                try:
                    m = json.loads(raw)
                except ValueError:
                    continue
                if m.get("op") != "subscribe" or not isinstance(m.get("channel"), str):
                    continue
                c = m["channel"]
                if c not in channels:
                    channels[c] = set()
                    await pubsub.subscribe(PREFIX + c)
                channels[c].add(ws)
                mine.add(c)
                await ws.send(json.dumps({"op": "subscribed", "channel": c, "id": m.get("id")}))
        except websockets.ConnectionClosed:
            pass
        finally:
            for c in mine:
                s = channels.get(c)
                if s is not None:
                    s.discard(ws)
                    if not s:
                        del channels[c]
                        await pubsub.unsubscribe(PREFIX + c)

    asyncio.create_task(reader())
    async with websockets.serve(handler, HOST, PORT, compression=None, max_queue=16):
        print(f"python peer listening on {HOST}:{PORT}", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main())
