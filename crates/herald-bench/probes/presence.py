#!/usr/bin/env python3
"""Presence costs, against a real redis-server and two `herald` nodes (the binary given):

1. churn: with 10,000 members present on one channel, connections that connect,
   subscribe, get `subscribed` and close, on a channel with presence and on one
   without (the same size): the nodes' CPU and Redis's CPU per cycle;
2. presence_stats: the latency of GET /api/presence_stats (and of the client op) on
   a channel of 10,000 real members, then of 100,000 (90,000 entries added to the
   channel's Redis keys directly, in the layout the nodes use: the count does not care
   who added them);
3. join/leave fan-out: 1,000 members subscribed with join_leave, connections that
   join and leave: the nodes' CPU per join or leave frame delivered, and that every
   member received every frame.

Usage: presence.py HERALD_BIN [CHURN_CYCLES]
Needs redis-server and the `websockets` package (target/openapi-venv has it)."""
import asyncio, json, os, subprocess, sys, tempfile, time, urllib.request
import websockets

from common import cpu_s, free_port

BIN = sys.argv[1]
CYCLES = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
KEY = "presence-probe-key"


redis_port = free_port()
rdir = tempfile.mkdtemp()
redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no", "--dir", rdir],
                         stdout=subprocess.DEVNULL)
time.sleep(0.5)


def cli(*args):
    return subprocess.run(["redis-cli", "-p", str(redis_port), *args], capture_output=True, text=True).stdout.strip()


def redis_cpu():
    info = cli("INFO", "cpu")
    vals = dict(l.split(":", 1) for l in info.splitlines() if ":" in l)
    return float(vals["used_cpu_user"]) + float(vals["used_cpu_sys"])


cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
cfg.write(f"""
[auth]
api_key = "{KEY}"
[limits]
max_connections = 19000
max_connections_per_ip = 0
messages_per_second = 1000000
message_burst = 1000000
[[channels.rules]]
pattern = "room:*"
presence = true
[[channels.rules]]
pattern = "fan:*"
presence = true
join_leave = true
join_leave_per = "connection"
""")
cfg.close()
ports = [free_port(), free_port()]
nodes = [subprocess.Popen([BIN, "--config", cfg.name, "--listen", f"127.0.0.1:{p}", "--node-id", f"n{i}",
                           "--redis", f"redis://127.0.0.1:{redis_port}"],
                          env=dict(os.environ, HERALD_LOG__LEVEL="error"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i, p in enumerate(ports)]
time.sleep(1.5)


def nodes_cpu():
    return sum(cpu_s(n.pid) for n in nodes)


async def member(port, channel, counter=None):
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws", max_queue=None, ping_interval=None)
    await ws.recv()
    await ws.send(json.dumps({"op": "subscribe", "channel": channel, "id": 1}))
    while json.loads(await ws.recv())["op"] != "subscribed":
        pass
    if counter is not None:
        async def count():
            try:
                async for m in ws:
                    op = json.loads(m)["op"]
                    if op in counter:
                        counter[op] += 1
            except websockets.ConnectionClosed:
                pass
        asyncio.ensure_future(count())
    return ws


async def fill(channel, n, counter=None):
    out = []
    for start in range(0, n, 200):
        out += await asyncio.gather(*[member(ports[i % 2], channel, counter) for i in range(start, min(n, start + 200))])
    return out


async def churn(channel, cycles):
    async def one(i):
        ws = await member(ports[i % 2], channel)
        await ws.close()
    before_n, before_r, t = nodes_cpu(), redis_cpu(), time.time()
    for start in range(0, cycles, 50):
        await asyncio.gather(*[one(i) for i in range(start, min(cycles, start + 50))])
    await asyncio.sleep(0.5)  # leaves are sent after the close
    return (nodes_cpu() - before_n) / cycles * 1e6, (redis_cpu() - before_r) / cycles * 1e6, time.time() - t


def stats_latency(channel, n=200):
    url = f"http://127.0.0.1:{ports[0]}/api/presence_stats/{channel}"
    req = urllib.request.Request(url, headers={"authorization": f"Bearer {KEY}"})
    took, last = [], None
    for _ in range(n):
        t = time.perf_counter()
        last = json.loads(urllib.request.urlopen(req).read())
        took.append((time.perf_counter() - t) * 1e3)
    took.sort()
    return took[len(took) // 2], took[int(len(took) * 0.99)], last


async def main():
    print(f"machine: {os.cpu_count()} cores; herald {BIN}; redis-server {cli('INFO', 'server').split('redis_version:')[1].split()[0]}")
    # 1. churn with 10,000 members present, presence on vs off.
    # (One channel at a time: this process holds at most 20,000 sockets.)
    for label, ch in [("presence off", "plain:big"), ("presence on ", "room:big")]:
        members = await fill(ch, 10000)
        node_us, redis_us, secs = await churn(ch, CYCLES)
        print(f"churn {label}: {CYCLES} connect+subscribe+close cycles in {secs:.1f}s; "
              f"nodes {node_us:.0f} us CPU per cycle, Redis {redis_us:.0f} us CPU per cycle")
        if ch == "plain:big":
            for ws in members:
                await ws.close()
        else:
            big = members
    # 2. presence_stats at 10,000 real members, then 100,000.
    p50, p99, s = stats_latency("room:big")
    print(f"presence_stats at {s['connections']} members (real, over 2 nodes): p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    tag = "{herald:room:big}"
    script = """
local exp = tonumber(ARGV[1])
for i = 1, tonumber(ARGV[2]) do
  local conn = 'synthetic-' .. i
  redis.call('HSET', KEYS[1], conn, '{"user":"' .. conn .. '","conn":"' .. conn .. '"}')
  redis.call('ZADD', KEYS[2], exp, conn)
  redis.call('HINCRBY', KEYS[3], conn, 1)
end
return redis.call('HLEN', KEYS[1])"""
    cli("EVAL", script, "3", f"{tag}.pm", f"{tag}.pe", f"{tag}.pu", str(int(time.time() * 1000) + 3600_000), "90000")
    p50, p99, s = stats_latency("room:big")
    print(f"presence_stats at {s['connections']} members (10,000 real + 90,000 added to Redis): p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    ws = big[0]
    t = time.perf_counter()
    for i in range(200):
        await ws.send(json.dumps({"op": "presence_stats", "channel": "room:big", "id": 100 + i}))
        while json.loads(await ws.recv()).get("op") != "presence_stats":
            pass
    print(f"presence_stats client op at 100,000 members: {(time.perf_counter() - t) / 200 * 1e3:.2f} ms per round trip")
    for w in big:
        await w.close()
    # 3. join/leave fan-out to 1,000 members.
    counter = {"join": 0, "leave": 0}
    await fill("fan:x", 1000, counter)
    await asyncio.sleep(1)
    settled = dict(counter)
    cycles = 200
    before = nodes_cpu()
    for start in range(0, cycles, 20):
        async def one(i):
            w = await member(ports[i % 2], "fan:x")
            await w.close()
        await asyncio.gather(*[one(i) for i in range(start, start + 20)])
    deadline = time.time() + 20
    want = cycles * 1000
    while time.time() < deadline and (counter["join"] - settled["join"] < want or counter["leave"] - settled["leave"] < want):
        await asyncio.sleep(0.2)
    spent = nodes_cpu() - before
    got = (counter["join"] - settled["join"], counter["leave"] - settled["leave"])
    print(f"join/leave fan-out to 1,000 members: {cycles} joins and leaves, frames received {got[0]} joins + {got[1]} leaves "
          f"of {want} + {want}; nodes {spent / (got[0] + got[1]) * 1e6:.2f} us CPU per frame delivered")


try:
    asyncio.run(main())
finally:
    for n in nodes:
        n.kill()
    redis.kill()
