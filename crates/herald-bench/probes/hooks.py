#!/usr/bin/env python3
"""Hook costs, against one `herald` node (the binary given) and a local backend (Node's
http server, keep-alive), alternated rounds in one run:

1. handshake: connections opened with an HS256 token vs with a session cookie the
   connect hook turns into the user: the node's CPU per handshake and the handshake
   latency (TCP connect to `welcome`), p50/p99;
2. publish: one client publishing with 64 in flight to a channel whose rule says
   `publish = "hook"` vs one that needs no hook: publishes per second acknowledged and
   the node's CPU per publish;
3. burst: ten times `hooks.max_concurrency` handshakes at once against a backend that
   takes 200 ms per connect hook: the most calls the backend ever saw at once (must not
   pass the limit), how many clients got in, and the node's RSS before, at its peak,
   and after (memory held by waiting handshakes stays bounded and is given back).

Usage: hooks.py HERALD_BIN [HANDSHAKES] [PUBLISHES]
Needs node and the `websockets` package (target/openapi-venv has it)."""
import asyncio, base64, hashlib, hmac, json, subprocess, sys, tempfile, time, urllib.request
import websockets

from common import cpu_s, free_port, start_node

BIN = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
M = int(sys.argv[3]) if len(sys.argv) > 3 else 20000
SECRET = "hooks-probe-secret-hooks-probe-secret-0123"
LIMIT = 64


def rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def token(sub):
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": sub, "exp": int(time.time()) + 3600}).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


backend_port = free_port()
backend_js = tempfile.NamedTemporaryFile("w", suffix=".mjs", delete=False)
backend_js.write("""
import { createServer } from 'node:http';
let inFlight = 0, most = 0, calls = 0;
const server = createServer((req, res) => {
  if (req.url === '/stats') {
    res.end(JSON.stringify({ most, calls }));
    most = 0; calls = 0;
    return;
  }
  let body = '';
  req.on('data', (d) => (body += d));
  req.on('end', () => {
    calls++;
    inFlight++;
    most = Math.max(most, inFlight);
    const done = (answer) => { inFlight--; res.setHeader('content-type', 'application/json'); res.end(JSON.stringify(answer)); };
    const call = JSON.parse(body);
    if (req.url === '/connect' || req.url === '/slow') {
      const sid = (call.headers.cookie ?? '').replace('sid=', '');
      const answer = sid ? { result: { user: 'u' + sid } } : { error: { code: 401, message: 'sign in' } };
      if (req.url === '/slow') setTimeout(() => done(answer), 200); else done(answer);
    } else {
      done({ result: {} });
    }
  });
});
server.keepAliveTimeout = 60000;
server.listen(PORT, '127.0.0.1');
""".replace("PORT", str(backend_port)))
backend_js.close()
backend = subprocess.Popen(["node", backend_js.name])


def start(hook_path):
    return start_node(BIN, f"""
[auth]
allowed_origins = ["http://bench.test"]
[auth.jwt]
hmac_secret = "{SECRET}"
[limits]
max_connections_per_ip = 0
messages_per_second = 1000000
message_burst = 1000000
[hooks]
max_concurrency = {LIMIT}
[hooks.connect]
url = "http://127.0.0.1:{backend_port}{hook_path}"
timeout = "5s"
forward_headers = ["cookie"]
[hooks.publish]
url = "http://127.0.0.1:{backend_port}/publish"
[[channels.rules]]
pattern = "hooked:*"
publish = "hook"
[[channels.rules]]
pattern = "free:*"
publish = "anyone"
""")


async def handshake(port, cookie=None, tok=None):
    url = f"ws://127.0.0.1:{port}/ws" + (f"?access_token={tok}" if tok else "")
    headers = {"Origin": "http://bench.test"}
    if cookie:
        headers["Cookie"] = cookie
    t0 = time.perf_counter()
    ws = await websockets.connect(url, additional_headers=headers, ping_interval=None, open_timeout=30)
    welcome = json.loads(await ws.recv())
    took = time.perf_counter() - t0
    assert welcome["op"] == "welcome", welcome
    return ws, took


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] * 1000


async def handshakes(proc, port, how, n, conc=16):
    lat = []
    sem = asyncio.Semaphore(conc)

    async def one(i):
        async with sem:
            if how == "token":
                ws, t = await handshake(port, tok=token(f"u{i}"))
            else:
                ws, t = await handshake(port, cookie=f"sid={i}")
            lat.append(t)
            await ws.close()

    c0 = cpu_s(proc.pid)
    await asyncio.gather(*(one(i) for i in range(n)))
    used = cpu_s(proc.pid) - c0
    return used / n * 1e6, pct(lat, 0.5), pct(lat, 0.99)


async def publishes(proc, port, channel, m, conns, window=64):
    sockets = [(await handshake(port, tok=token(f"pub{i}")))[0] for i in range(conns)]

    async def run(ws, m):
        sent = acked = 0
        while acked < m:
            while sent < m and sent - acked < window:
                sent += 1
                await ws.send(json.dumps({"op": "publish", "channel": channel, "data": {"n": sent}, "id": sent}))
            f = json.loads(await ws.recv())
            if f.get("op") == "published":
                acked += 1
            elif f.get("op") == "error":
                raise SystemExit(f"publish refused: {f}")

    c0 = cpu_s(proc.pid)
    t0 = time.perf_counter()
    await asyncio.gather(*(run(ws, m // conns) for ws in sockets))
    took = time.perf_counter() - t0
    used = cpu_s(proc.pid) - c0
    for ws in sockets:
        await ws.close()
    done = m // conns * conns
    return done / took, used / done * 1e6


async def burst(port, proc):
    before = rss_mb(proc.pid)
    peak = before
    stop = False

    async def watch():
        nonlocal peak
        while not stop:
            peak = max(peak, rss_mb(proc.pid))
            await asyncio.sleep(0.02)

    async def one(i):
        try:
            ws, _ = await handshake(port, cookie=f"sid={i}")
            await ws.close()
            return True
        except Exception:
            return False

    w = asyncio.ensure_future(watch())
    t0 = time.perf_counter()
    ok = await asyncio.gather(*(one(i) for i in range(LIMIT * 10)))
    took = time.perf_counter() - t0
    stop = True
    await w
    await asyncio.sleep(1.0)
    after = rss_mb(proc.pid)
    stats = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{backend_port}/stats").read())
    return sum(ok), took, stats["most"], before, peak, after


async def main():
    time.sleep(0.5)
    proc, port = start("/connect")
    try:
        # Warm up both paths (pooled backend connections, allocator).
        await handshakes(proc, port, "token", 200)
        await handshakes(proc, port, "cookie", 200)
        print(f"handshakes ({N} per round, 16 at a time): node CPU per handshake, latency p50 / p99")
        for r in range(3):
            for how in ("token", "cookie"):
                cpu, p50, p99 = await handshakes(proc, port, how, N)
                label = "HS256 token   " if how == "token" else "connect hook  "
                print(f"  round {r + 1} {label}: {cpu:6.1f} µs CPU, {p50:5.2f} / {p99:5.2f} ms")
        print(f"publishes ({M} per round, 64 in flight per connection): rate, node CPU per publish")
        for r in range(3):
            for conns in (1, 8):
                for channel in ("free:x", "hooked:x"):
                    rate, cpu = await publishes(proc, port, channel, M, conns)
                    label = "no hook     " if channel.startswith("free") else "publish hook"
                    print(f"  round {r + 1} {conns} conn {label}: {rate:8.0f}/s, {cpu:5.1f} µs CPU")
    finally:
        proc.kill()
        proc.wait()
    urllib.request.urlopen(f"http://127.0.0.1:{backend_port}/stats").read()
    proc, port = start("/slow")
    try:
        await handshakes(proc, port, "token", 50)
        print(f"burst: {LIMIT * 10} handshakes at once, hooks.max_concurrency {LIMIT}, backend 200 ms per call:")
        for r in range(3):
            got, took, most, before, peak, after = await burst(port, proc)
            print(f"  burst {r + 1}: most calls at once at the backend {most} (limit {LIMIT}); {got} of {LIMIT * 10} got in, in {took:.2f} s;"
                  f" node RSS {before:.1f} MB before, {peak:.1f} MB at peak, {after:.1f} MB after")
            if most > LIMIT:
                raise SystemExit("the concurrency limit did not hold")
    finally:
        proc.kill()
        proc.wait()
        backend.kill()


asyncio.run(main())
