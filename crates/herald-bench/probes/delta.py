#!/usr/bin/env python3
"""Bytes on the wire for an incremental feed: whole messages, Fossil deltas and
permessage-deflate, against one `herald` node (the binary given) on the embedded broker;
alternated rounds in one run.

The feed: a price board, a JSON document of about 2 KB (18 instruments: symbol, bid,
ask, last, change, volume) where each update moves 2 instruments and the time stamp.
Each round, S subscribers of one channel receive U updates published at a steady rate
through `POST /api/publish`; the rounds alternate subscribers that take whole messages,
that ask for deltas, and that negotiate permessage-deflate (the node has
`websocket.deflate = true`; the others do not offer it). Measured per round:

- bytes per delivery: what the subscribers' sockets received during the updates (the
  kernel's `tcpi_bytes_received`: WebSocket frames, headers included; TCP/IP headers
  not counted, the same for every mode);
- the node's CPU per delivery (from /proc).

Usage: delta.py HERALD_BIN [SUBSCRIBERS] [UPDATES] [ROUNDS]
Needs the `websockets` package (target/openapi-venv has it)."""
import asyncio, json, random, sys, time, urllib.request
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
[websocket]
deflate = true
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


def received(ws):
    """The bytes the socket has received (TCP_INFO tcpi_bytes_received, Linux)."""
    import socket, struct
    sock = ws.transport.get_extra_info("socket")
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("<Q", info, 128)[0]


def publish(channel, doc):
    body = json.dumps({"channel": channel, "data": json.loads(doc)}, separators=(",", ":")).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/publish", data=body,
                                 headers={"content-type": "application/json"})
    urllib.request.urlopen(req).read()


async def round_(n, mode):
    delta = mode == "delta"
    channel = f"board:{n}"
    rng = random.Random(n)
    docs = []
    rows = board(rng)
    for seq in range(1, U + 1):
        docs.append(update(rows, rng, seq))
    stats = {"bytes": 0, "frames": 0, "deltas": 0}
    start = asyncio.Event()

    async def subscriber(i):
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws", ping_interval=None, max_size=None,
                                      compression="deflate" if mode == "deflate" else None)
        await ws.recv()  # welcome
        sub = {"op": "subscribe", "channel": channel, "id": 1}
        if delta:
            sub["delta"] = "fossil"
        await ws.send(json.dumps(sub))
        reply = json.loads(await ws.recv())
        assert reply["op"] == "subscribed" and (reply.get("delta") == "fossil") == delta, reply
        ready.append(1)
        await start.wait()
        before = received(ws)
        got = 0
        while got < U:
            text = await ws.recv()
            if not text.startswith('{"op":"message"'):
                continue
            got += 1
            stats["frames"] += 1
            if '"delta":' in text:
                stats["deltas"] += 1
        stats["bytes"] += received(ws) - before
        await ws.close()

    ready = []
    tasks = [asyncio.create_task(subscriber(i)) for i in range(S)]
    while len(ready) < S:
        await asyncio.sleep(0.05)
    start.set()
    await asyncio.sleep(0.1)
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
    return {"mode": mode, "bytes_per_delivery": stats["bytes"] / deliveries,
            "cpu_us_per_delivery": cpu / deliveries * 1e6, "delta_share": stats["deltas"] / deliveries,
            "doc_bytes": sum(len(d) for d in docs) / len(docs)}


async def main():
    results = []
    for r in range(ROUNDS):
        row = {}
        for mode in ("whole", "delta", "deflate"):
            res = await round_(len(results), mode)
            results.append(res)
            row[mode] = res
            print(json.dumps(res), flush=True)
        w, d, z = row["whole"], row["delta"], row["deflate"]
        print(f"round: whole {w['bytes_per_delivery']:.0f} B, delta {d['bytes_per_delivery']:.0f} B "
              f"({w['bytes_per_delivery'] / d['bytes_per_delivery']:.1f}x fewer), deflate "
              f"{z['bytes_per_delivery']:.0f} B ({w['bytes_per_delivery'] / z['bytes_per_delivery']:.1f}x fewer); "
              f"node CPU per delivery {w['cpu_us_per_delivery']:.2f} / {d['cpu_us_per_delivery']:.2f} "
              f"({d['cpu_us_per_delivery'] / w['cpu_us_per_delivery']:.2f}x) / {z['cpu_us_per_delivery']:.2f} us "
              f"({z['cpu_us_per_delivery'] / w['cpu_us_per_delivery']:.2f}x)", flush=True)


try:
    asyncio.run(main())
finally:
    node.terminate()
    node.wait()
