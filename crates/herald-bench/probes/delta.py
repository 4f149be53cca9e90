#!/usr/bin/env python3
"""Bytes on the wire for an incremental feed, with and without Fossil deltas, against one
`herald` node (the binary given) on the embedded broker; alternated rounds in one run.

The feed: a price board, a JSON document of about 2 KB (18 instruments: symbol, bid,
ask, last, change, volume) where each update moves 2 instruments and the time stamp.
Each round, S subscribers of one channel (half of the rounds asking for deltas, the
other half not) receive U updates published at a steady rate through `POST
/api/publish`. Measured per round:

- bytes per delivery: the WebSocket frames the subscribers read (payload plus the
  frame's 2-4 byte header; TCP/IP headers not counted, and they are the same for both);
- the node's CPU per delivery (from /proc);
- what permessage-deflate without context takeover (RFC 7692, each message compressed on
  its own, zlib's default level) would make of the same whole frames, computed here with
  zlib, with its cost per message: Herald does not serve deflate yet, so this is an
  estimate for the comparison, not a measurement of a server.

Usage: delta.py HERALD_BIN [SUBSCRIBERS] [UPDATES] [ROUNDS]
Needs the `websockets` package (target/openapi-venv has it)."""
import asyncio, json, random, sys, time, urllib.request, zlib
import websockets

from common import cpu_s, start_node

BIN = sys.argv[1]
S = int(sys.argv[2]) if len(sys.argv) > 2 else 100
U = int(sys.argv[3]) if len(sys.argv) > 3 else 300
ROUNDS = int(sys.argv[4]) if len(sys.argv) > 4 else 3
RATE = 100  # updates per second

node, port = start_node(BIN, """
[limits]
max_connections_per_ip = 0
[[channels.rules]]
pattern = "board:*"
history_size = 1000
delta = "fossil"
""")


def board(rng):
    return [{"symbol": f"SYM{i:02d}", "name": f"Instrument number {i}",
             "bid": round(100 + i * 3.7, 2), "ask": round(100.05 + i * 3.7, 2),
             "last": round(100.02 + i * 3.7, 2), "change": 0.0,
             "volume": 1000 * (i + 1)} for i in range(18)]


def update(rows, rng, seq):
    for r in rng.sample(rows, 2):
        move = round(rng.uniform(-0.5, 0.5), 2)
        r["bid"] = round(r["bid"] + move, 2)
        r["ask"] = round(r["ask"] + move, 2)
        r["last"] = round(r["last"] + move, 2)
        r["change"] = round(r["change"] + move, 2)
        r["volume"] += rng.randrange(1, 500)
    return json.dumps({"board": "main", "seq": seq, "ts": 1764800000000 + seq * 10,
                       "rows": rows}, separators=(",", ":"))


def frame_bytes(payload_len):
    return payload_len + (2 if payload_len < 126 else 4 if payload_len < 65536 else 10)


def publish(channel, doc):
    body = json.dumps({"channel": channel, "data": json.loads(doc)}, separators=(",", ":")).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/publish", data=body,
                                 headers={"content-type": "application/json"})
    urllib.request.urlopen(req).read()


async def round_(n, delta):
    channel = f"board:{n}"
    rng = random.Random(n)
    docs = []
    rows = board(rng)
    for seq in range(1, U + 1):
        docs.append(update(rows, rng, seq))
    stats = {"bytes": 0, "frames": 0, "deltas": 0}
    whole_frames = []
    done = asyncio.Event()

    async def subscriber(i):
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws", ping_interval=None, max_size=None)
        await ws.recv()  # welcome
        sub = {"op": "subscribe", "channel": channel, "id": 1}
        if delta:
            sub["delta"] = "fossil"
        await ws.send(json.dumps(sub))
        reply = json.loads(await ws.recv())
        assert reply["op"] == "subscribed" and (reply.get("delta") == "fossil") == delta, reply
        ready.append(1)
        got = 0
        while got < U:
            text = await ws.recv()
            if not text.startswith('{"op":"message"'):
                continue
            got += 1
            stats["bytes"] += frame_bytes(len(text.encode()))
            stats["frames"] += 1
            if '"delta":' in text:
                stats["deltas"] += 1
            elif i == 0:
                whole_frames.append(text.encode())
        await ws.close()

    ready = []
    tasks = [asyncio.create_task(subscriber(i)) for i in range(S)]
    while len(ready) < S:
        await asyncio.sleep(0.05)
    cpu0 = cpu_s(node.pid)
    t0 = time.perf_counter()
    loop = asyncio.get_running_loop()
    for k, doc in enumerate(docs):
        await loop.run_in_executor(None, publish, channel, doc)
        wait = t0 + (k + 1) / RATE - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
    await asyncio.gather(*tasks)
    cpu = cpu_s(node.pid) - cpu0
    deliveries = S * U
    out = {"delta": delta, "bytes_per_delivery": stats["bytes"] / deliveries,
           "cpu_us_per_delivery": cpu / deliveries * 1e6, "delta_share": stats["deltas"] / deliveries,
           "doc_bytes": sum(len(d) for d in docs) / len(docs)}
    if not delta:
        # permessage-deflate, no context takeover: each whole frame on its own.
        t = time.perf_counter()
        sizes = []
        for f in whole_frames:
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            z = c.compress(f) + c.flush(zlib.Z_SYNC_FLUSH)
            sizes.append(frame_bytes(len(z) - 4))  # RFC 7692 drops the 00 00 ff ff tail
        out["deflate_bytes_per_delivery"] = sum(sizes) / len(sizes)
        out["deflate_us_per_message"] = (time.perf_counter() - t) / len(whole_frames) * 1e6
    return out


async def main():
    results = []
    for r in range(ROUNDS):
        for delta in (False, True):
            res = await round_(len(results), delta)
            results.append(res)
            print(json.dumps(res), flush=True)
    plain = [r for r in results if not r["delta"]]
    deltas = [r for r in results if r["delta"]]
    for a, b in zip(plain, deltas):
        print(f"round: {a['bytes_per_delivery']:.0f} B whole, {b['bytes_per_delivery']:.0f} B with deltas "
              f"({a['bytes_per_delivery'] / b['bytes_per_delivery']:.1f}x fewer), deflate would be "
              f"{a['deflate_bytes_per_delivery']:.0f} B ({a['bytes_per_delivery'] / a['deflate_bytes_per_delivery']:.1f}x); "
              f"node CPU per delivery {a['cpu_us_per_delivery']:.2f} vs {b['cpu_us_per_delivery']:.2f} us "
              f"({b['cpu_us_per_delivery'] / a['cpu_us_per_delivery']:.2f}x); deflate {a['deflate_us_per_message']:.1f} us "
              f"per message compressed")


try:
    asyncio.run(main())
finally:
    node.terminate()
    node.wait()
