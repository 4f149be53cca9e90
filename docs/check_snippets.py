#!/usr/bin/env python3
"""Runs the token snippets of docs/production.md marked *checked* (the Python and Node
blocks) and connects to a real node with the tokens they mint: the node must welcome
the user and let it subscribe to a channel its claim names. Run by check_openapi.sh."""
import asyncio
import json
import os
import pathlib
import re
import subprocess
import sys

import websockets

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from check_openapi import fail, start  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
SECRET = "snippet-check-secret-of-at-least-32-bytes"


def blocks(lang):
    text = (ROOT / "docs" / "production.md").read_text()
    found = re.findall(r"\(\*checked\*\):\n\n```" + lang + r"\n(.*?)```", text, re.S)
    if len(found) != 1:
        fail(f"docs/production.md: expected one checked {lang} block, found {len(found)}")
    return found[0]


def python_token():
    scope = {}
    exec(blocks("python"), scope)
    return scope["herald_token"](SECRET, "alice", 600, ["room:*"])


def node_token():
    code = blocks("js") + "\nconsole.log(heraldToken(process.argv[1], 'bob', 600, ['room:*']));\n"
    out = subprocess.run(["node", "-e", code, SECRET], capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"the Node snippet failed: {out.stderr}")
    return out.stdout.strip()


async def welcome(port, token, user):
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws?access_token={token}") as ws:
        w = json.loads(await ws.recv())
        if w.get("user") != user:
            fail(f"a token from the snippet: welcome {w}")
        await ws.send(json.dumps({"op": "subscribe", "channel": "room:1", "id": 1}))
        r = json.loads(await ws.recv())
        if r.get("op") != "subscribed":
            fail(f"a token from the snippet could not subscribe: {r}")


def main():
    binary = os.environ.get("HERALD_BIN", str(ROOT / "target" / "debug" / "herald"))
    config = f"""
[auth]
anonymous = false
[auth.jwt]
hmac_secret = "{SECRET}"
[[channels.rules]]
pattern = "room:*"
subscribe = "claims"
"""
    node, port = start(binary, config)
    try:
        asyncio.run(welcome(port, python_token(), "alice"))
        asyncio.run(welcome(port, node_token(), "bob"))
    finally:
        node.kill()
    print("docs/production.md: the Python and Node token snippets mint tokens a node accepts")
    tls(binary)


def tls(binary):
    """Step 3's `[tls]` with the clients people use: Python `websockets` with an `ssl`
    context trusting a test CA, and Node's WebSocket with NODE_EXTRA_CA_CERTS."""
    import ssl
    import tempfile

    d = pathlib.Path(tempfile.mkdtemp(prefix="herald-tls-"))
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for args in [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ca", "-keyout", "ca.key", "-out", "ca.pem"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "tls.key", "-out", "tls.csr"],
        ["x509", "-req", "-in", "tls.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "tls.crt"],
    ]:
        r = subprocess.run(["openssl", *args], cwd=d, capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"openssl {args}: {r.stderr}")
    config = f'''
[tls]
cert_file = "{d / 'tls.crt'}"
key_file = "{d / 'tls.key'}"
'''
    node, port = start(binary, config)
    try:
        context = ssl.create_default_context(cafile=str(d / "ca.pem"))

        async def python_client():
            async with websockets.connect(f"wss://127.0.0.1:{port}/ws", ssl=context) as ws:
                w = json.loads(await ws.recv())
                if w.get("op") != "welcome":
                    fail(f"Python over wss://: {w}")

        asyncio.run(python_client())
        code = (
            "const ws = new WebSocket(process.argv[1]);"
            "ws.onmessage = (m) => { console.log(m.data); process.exit(0); };"
            "ws.onerror = (e) => { console.error(e.message || e); process.exit(1); };"
            "setTimeout(() => process.exit(2), 10000);"
        )
        r = subprocess.run(
            ["node", "--experimental-websocket", "-e", code, f"wss://127.0.0.1:{port}/ws"],
            capture_output=True,
            text=True,
            env={**os.environ, "NODE_EXTRA_CA_CERTS": str(d / "ca.pem")},
        )
        if r.returncode != 0 or '"op":"welcome"' not in r.stdout:
            fail(f"Node over wss:// (exit {r.returncode}): {r.stdout} {r.stderr}")
        # And a client that does not trust the CA is refused by its own TLS stack.
        r = subprocess.run(
            ["node", "--experimental-websocket", "-e", code, f"wss://127.0.0.1:{port}/ws"],
            capture_output=True,
            text=True,
        )
        if r.returncode == 0:
            fail("Node connected over wss:// without trusting the certificate")
    finally:
        node.kill()
    print("docs/production.md: [tls] serves Python websockets (ssl context) and Node's WebSocket (NODE_EXTRA_CA_CERTS)")


if __name__ == "__main__":
    main()
