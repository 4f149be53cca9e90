#!/usr/bin/env python3
"""Checks docs/openapi.yaml: it is a valid OpenAPI 3.1 document, and a real node's
replies agree with it. The node (target/debug/herald, or HERALD_BIN) runs on loopback;
each request below is sent, and its reply's status must be documented for the
operation and its JSON body must validate against the documented schema. Every
documented operation must have been answered with a 2xx at least once, and a node
without its broker must answer 503 as documented. Run by docs/check_openapi.sh."""
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import yaml
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPEC = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())
KEY, SCOPED = "openapi-check-key", "openapi-scoped-key"


def fail(msg):
    sys.exit(f"docs/openapi.yaml: {msg}")


def resolve(node):
    """The schema with every local $ref inlined (the document has no cycles)."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = SPEC
            for part in node["$ref"].lstrip("#/").split("/"):
                target = target[part]
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return {**resolve(target), **resolve(rest)}
        return {k: resolve(v) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(v) for v in node]
    return node


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start(binary, config, extra=()):
    port = free_port()
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    cfg.write(config)
    cfg.close()
    p = subprocess.Popen(
        [binary, "--config", cfg.name, "--listen", f"127.0.0.1:{port}", *extra],
        env={**os.environ, "HERALD_LOG__LEVEL": "error"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return p, port
        except OSError:
            time.sleep(0.1)
    p.kill()
    fail("the node did not start")


def request(port, method, path, body=None, ctype="application/json", key=KEY):
    headers = {"content-type": ctype} if body is not None else {}
    if key:
        headers["authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def operation(method, path):
    for template, ops in SPEC["paths"].items():
        parts, want = template.strip("/").split("/"), path.split("?")[0].strip("/").split("/")
        if len(parts) == len(want) and all(p.startswith("{") or p == w for p, w in zip(parts, want)):
            if method.lower() in ops:
                return template, ops[method.lower()]
            return template, None
    return None, None


answered = set()


def check(port, method, path, want, body=None, ctype="application/json", key=KEY):
    status, headers, raw = request(port, method, path, body, ctype, key)
    if status != want:
        fail(f"{method} {path}: expected {want}, got {status} {raw[:200]!r}")
    template, op = operation(method, path)
    if template is None:
        fail(f"{method} {path}: no such path in the document")
    if op is None:
        # A method the path does not take: the 405 is documented on its operations.
        ops = SPEC["paths"][template]
        op = next(iter(v for k, v in ops.items() if k in ("get", "post")))
    doc = op["responses"].get(str(status))
    if doc is None:
        fail(f"{method} {path}: status {status} is not documented for {template}")
    doc = resolve(doc)
    media = doc.get("content", {}).get("application/json")
    if media is not None:
        if not headers.get("content-type", "").startswith("application/json"):
            fail(f"{method} {path}: {status} is documented as JSON, got {headers.get('content-type')}")
        OAS31Validator(media["schema"]).validate(json.loads(raw))
    if 200 <= status < 300:
        answered.add((template, method.lower()))
    return json.loads(raw) if raw and media is not None else raw


def main():
    validate(SPEC)
    if (ROOT / "docs" / "openapi.json").read_text() != json_text():
        fail("docs/openapi.json is not the YAML as JSON: run target/openapi-venv/bin/python docs/check_openapi.py --write-json")
    binary = os.environ.get("HERALD_BIN", str(ROOT / "target" / "debug" / "herald"))
    config = f"""
[auth]
api_key = "{KEY}"
[[auth.api_keys]]
key = "{SCOPED}"
channels = ["news:*"]
[limits]
max_batch = 3
max_body_bytes = 2048
[[channels.rules]]
pattern = "h:*"
history_size = 10
[[channels.rules]]
pattern = "news:*"
presence = true
join_leave = true
"""
    node, port = start(binary, config)
    try:
        check(port, "POST", "/api/publish", 200, {"channel": "news", "data": {"a": 1}})
        first = check(port, "POST", "/api/publish", 200, {"channel": "h:1", "data": 1, "idempotency_key": "k1"})
        again = check(port, "POST", "/api/publish", 200, {"channel": "h:1", "data": 1, "idempotency_key": "k1"})
        if again.get("duplicate") is not True or again["offset"] != first["offset"]:
            fail(f"a repeated idempotency key answered {again}")
        check(port, "POST", "/api/publish", 400, b"{not json")
        check(port, "POST", "/api/publish", 400, {"channel": "bad channel", "data": 1})
        check(port, "POST", "/api/publish", 401, {"channel": "news", "data": 1}, key=None)
        check(port, "POST", "/api/publish", 401, {"channel": "news", "data": 1}, key="wrong")
        check(port, "POST", "/api/publish", 403, {"channel": "chat", "data": 1}, key=SCOPED)
        check(port, "GET", "/api/publish", 405)
        check(port, "POST", "/api/publish", 413, {"channel": "news", "data": "x" * 4096})
        check(port, "POST", "/api/publish", 415, b"hello", ctype="text/plain")
        check(port, "POST", "/api/publish/h:2", 200, {"title": "hi"})
        check(port, "POST", "/api/publish/h:2", 200, b"\x00\x01", ctype="application/octet-stream")
        check(port, "POST", "/api/publish/news", 415, b"a=b", ctype="application/x-www-form-urlencoded")
        check(port, "POST", "/api/batch", 200, {"publications": [{"channel": "a", "data": 1}, {"channel": "h:3", "data": 2}]})
        check(port, "POST", "/api/batch", 413, {"publications": [{"channel": "a", "data": n} for n in range(4)]})
        check(port, "POST", "/api/batch", 400, {"publications": [{"channel": "a"}]})
        page = check(port, "GET", "/api/history/h:2", 200)
        if [p.get("data", p.get("binary")) for p in page["publications"]] != [{"title": "hi"}, "AAE="]:
            fail(f"history of h:2: {page}")
        check(port, "GET", f"/api/history/h:2?since=1&epoch={page['epoch']}&limit=1", 200)
        empty = check(port, "GET", "/api/history/h:never", 200)
        if empty["offset"] != 0 or empty["publications"]:
            fail(f"a never-published channel: {empty}")
        check(port, "GET", "/api/history/h:2?since=x", 400)
        check(port, "GET", "/api/history/news", 404)
        check(port, "POST", "/api/history/h:2", 405, {})
        # The node serves this very document, behind the API key.
        served = check(port, "GET", "/api/openapi.yaml", 200)
        if served.decode() != (ROOT / "docs" / "openapi.yaml").read_text():
            fail("GET /api/openapi.yaml is not docs/openapi.yaml")
        check(port, "GET", "/api/openapi.yaml", 401, key=None)
        served = check(port, "GET", "/api/openapi.json", 200)
        if served != json.loads(json_text()):
            fail("GET /api/openapi.json is not docs/openapi.json")
        check(port, "GET", "/api/openapi.json", 401, key=None)
        check(port, "POST", "/api/openapi.json", 405, {})
        check(port, "POST", "/api/openapi.yaml", 405, {})
        # The control API, with a real connection to act on.
        from websockets.sync.client import connect as ws_connect

        with ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
            conn = json.loads(ws.recv())["conn"]
            ws.send(json.dumps({"op": "subscribe", "channel": "news:x", "id": 1}))
            json.loads(ws.recv())
            members = check(port, "GET", "/api/presence/news:x", 200)
            if [m["conn"] for m in members["members"]] != [conn]:
                fail(f"/api/presence/news:x: {members}")
            if check(port, "GET", "/api/presence_stats/news:x", 200) != {"connections": 1, "users": 1}:
                fail("/api/presence_stats/news:x")
            check(port, "GET", "/api/presence/h:1", 404)
            check(port, "GET", "/api/presence/news:x?limit=0", 400)
            check(port, "GET", "/api/presence_stats/chat", 403, key=SCOPED)
            check(port, "POST", "/api/presence/news:x", 405, {})
            info = check(port, "GET", "/api/info", 200)
            if info["nodes"][0]["connections"] != 1 or info["missing"]:
                fail(f"/api/info: {info}")
            listed = check(port, "GET", "/api/channels?pattern=news:*", 200)
            if listed["channels"] != [{"channel": "news:x", "subscribers": 1}]:
                fail(f"/api/channels: {listed}")
            check(port, "GET", "/api/channels?limit=0", 400)
            check(port, "GET", "/api/info", 403, key=SCOPED)
            check(port, "POST", "/api/info", 405, {})
            check(port, "POST", "/api/subscribe", 200, {"conn": conn, "channel": "news:y"}, key=SCOPED)
            check(port, "POST", "/api/subscribe", 403, {"conn": conn, "channel": "chat"}, key=SCOPED)
            check(port, "POST", "/api/subscribe", 400, {"conn": conn, "channel": "bad channel"})
            check(port, "POST", "/api/unsubscribe", 200, {"conn": conn, "channel": "news:y"})
            check(port, "POST", "/api/disconnect", 400, {"conn": conn, "code": 1000})
            check(port, "POST", "/api/disconnect", 403, {"conn": conn}, key=SCOPED)
            check(port, "POST", "/api/disconnect", 415, b"x", ctype="text/plain")
            gone = check(port, "POST", "/api/disconnect", 200, {"conn": conn, "code": 4401, "reason": "checked"})
            if gone["connections"] != 1:
                fail(f"/api/disconnect: {gone}")
            try:
                while True:
                    ws.recv(timeout=5)
            except Exception as e:  # the close we asked for
                code = getattr(getattr(e, "rcvd", None), "code", None)
                if code != 4401:
                    fail(f"the disconnected client saw {e!r}, not a 4401 close")
        check(port, "GET", "/healthz", 200, key=None)
        check(port, "GET", "/readyz", 200, key=None)
    finally:
        node.kill()
    # A node whose Redis is not there: not ready, and publishing says nothing was.
    dead = free_port()
    node, port = start(binary, config, ["--redis", f"redis://127.0.0.1:{dead}"])
    try:
        time.sleep(0.5)
        check(port, "POST", "/api/publish", 503, {"channel": "news", "data": 1})
        check(port, "GET", "/readyz", 503, key=None)
    finally:
        node.kill()
    documented = {(t, m) for t, ops in SPEC["paths"].items() for m in ops if m in ("get", "post")}
    missing = documented - answered
    if missing:
        fail(f"operations never answered with a 2xx by the check: {sorted(missing)}")
    print(f"docs/openapi.yaml: valid OpenAPI 3.1; {len(documented)} operations, every reply of the node checked against it")


def json_text():
    """docs/openapi.json: the YAML document as JSON, for tools that want JSON."""
    return json.dumps(SPEC, indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-json"]:
        (ROOT / "docs" / "openapi.json").write_text(json_text())
    else:
        main()
