#!/usr/bin/env python3
"""One anonymous client subscribes to and leaves N distinct made-up history channel names
(subscribe, resume from a made-up position, unsubscribe), then the node's RSS and, with
Redis, its key count. Reads of channels that were never published should create nothing.
Usage: made_up_channels.py HERALD_BIN PORT N [REDIS_PORT]"""
import asyncio, json, os, subprocess, sys, tempfile, time, urllib.request
import websockets

bin, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
redis_port = int(sys.argv[4]) if len(sys.argv) > 4 else None
cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
cfg.write("""
[limits]
messages_per_second = 1000000
message_burst = 1000000
[[channels.rules]]
pattern = "news:*"
history_size = 100
""")
cfg.close()
args = [bin, "--config", cfg.name, "--listen", f"127.0.0.1:{port}"]
if redis_port:
    args += ["--redis", f"redis://127.0.0.1:{redis_port}"]
env = dict(os.environ, HERALD_LOG__LEVEL="error")
p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(1.5)

def rss():
    for l in open(f"/proc/{p.pid}/status"):
        if l.startswith("VmRSS"):
            return int(l.split()[1]) // 1024

def metric(name):
    t = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    for l in t.splitlines():
        if l.startswith(name + " "):
            return float(l.split()[1])

def dbsize():
    if not redis_port:
        return "-"
    return subprocess.run(["redis-cli", "-p", str(redis_port), "DBSIZE"], capture_output=True, text=True).stdout.strip()

async def main():
    print("before: rss MB", rss(), "redis keys", dbsize())
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws", max_size=None) as ws:
        await ws.recv()  # welcome
        batch = 500
        for start in range(0, n, batch):
            for i in range(start, min(n, start + batch)):
                ch = f"news:made-up-{i}"
                since = {"offset": 7, "epoch": "0k3f9a2b"} if i % 2 else None
                f = {"op": "subscribe", "channel": ch, "id": 2 * i, "recover": True}
                if since:
                    f["since"] = since
                await ws.send(json.dumps(f))
                await ws.send(json.dumps({"op": "unsubscribe", "channel": ch, "id": 2 * i + 1}))
            for _ in range(2 * (min(n, start + batch) - start)):
                r = json.loads(await ws.recv())
                assert r["op"] in ("subscribed", "unsubscribed"), r
    time.sleep(1)
    print(f"after {n} made-up channels: rss MB", rss(), "herald_channels", metric("herald_channels"), "redis keys", dbsize())

asyncio.run(main())
p.kill()
