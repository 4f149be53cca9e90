#!/usr/bin/env python3
"""Checks deploy/kubernetes without a cluster (run by check.sh, which CI runs).

1. components/monitoring/prometheusrule.yaml is what generate.py makes of
   deploy/alerts.yml, and promtool accepts its rules.
2. Every overlay renders (`kubectl kustomize`) and every object validates strictly (no
   unknown field) against the Kubernetes schemas of two versions (kubernetes-validate,
   offline); the only kinds without a schema are the Prometheus Operator's, checked here
   by hand. A Deployment with a misspelt field must fail the same validation, so the
   check is known to bite.
3. The manifests agree with Herald: probe, Service, NetworkPolicy and ServiceMonitor
   ports name container ports; terminationGracePeriodSeconds covers the preStop pause,
   shutdown.drain_window and shutdown.grace_period of the rendered herald.toml.
4. The real binary runs with exactly the rendered Deployment's arguments and
   environment (Secrets filled with test values, the ConfigMap at its mountPath, and the
   service-link variables Kubernetes injects for every Service when
   enableServiceLinks is left on), in a network namespace of its own, as in a pod,
   beside a real redis-server that the overlay's Redis address names (through the
   namespace's /etc/hosts): the probes' paths and ports answer, a client with a token
   from the allowed origin receives a publication made with the API key on the
   internal port, /metrics wants the metrics key, and after the preStop pause SIGTERM
   makes the pod unready, closes the client with 1012 and exits 0 within what is left
   of the grace period.
"""
import asyncio
import base64
import hashlib
import hmac
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import yaml

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
VERSIONS = ["1.30.0", "1.34.0"]
CRDS = {("monitoring.coreos.com/v1", "PrometheusRule"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
OVERLAYS = sorted(p.name for p in (HERE / "overlays").iterdir() if p.is_dir())
SECRETS = {
    "api-key": "k8s-test-api-key",
    "metrics-key": "k8s-test-metrics-key",
    "jwt-hmac-secret": "k8s-test-hmac-secret-of-at-least-32-bytes",
}


def fail(msg):
    sys.exit(f"deploy/kubernetes: {msg}")


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        fail(f"{' '.join(map(str, cmd))} failed:\n{r.stdout}{r.stderr}")
    return r.stdout


def render(overlay):
    return [d for d in yaml.safe_load_all(run(["kubectl", "kustomize", str(HERE / "overlays" / overlay)])) if d]


def validate(docs, label, must_pass=True):
    core = [d for d in docs if (d["apiVersion"], d["kind"]) not in CRDS]
    unknown = {(d["apiVersion"], d["kind"]) for d in docs} - CRDS - {(d["apiVersion"], d["kind"]) for d in core}
    assert not unknown
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump_all(core, f)
        f.flush()
        for v in VERSIONS:
            r = subprocess.run(
                ["kubernetes-validate", "--strict", "--quiet", "-k", v, f.name], capture_output=True, text=True
            )
            ok = r.returncode == 0 and "ERROR" not in r.stdout + r.stderr
            if must_pass and not ok:
                fail(f"{label} does not validate against Kubernetes {v}:\n{r.stdout}{r.stderr}")
            if not must_pass and ok:
                fail(f"{label}: a misspelt field passed validation against {v}: the check does not bite")
    return len(core)


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def duration_s(text):
    m = re.fullmatch(r"(\d+)(ms|s|m)", text)
    if not m:
        fail(f"unexpected duration {text!r}")
    n, unit = int(m[1]), m[2]
    return n / 1000 if unit == "ms" else n * (60 if unit == "m" else 1)


def toml_value(toml, section, key):
    sec = None
    for line in toml.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("["):
            sec = line.strip("[]")
        elif "=" in line and sec == section and line.split("=", 1)[0].strip() == key:
            return line.split("=", 1)[1].strip().strip('"')
    return None


def check_consistency(docs, overlay):
    (dep,) = by_kind(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == "herald"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        if c[probe]["httpGet"]["port"] not in ports:
            fail(f"{overlay}: {probe} names port {c[probe]['httpGet']['port']!r}, not a container port")
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    labels = dep["spec"]["template"]["metadata"]["labels"]
    for s in services.values():
        if all(labels.get(k) == v for k, v in s["spec"]["selector"].items()):
            for p in s["spec"]["ports"]:
                if p["targetPort"] not in ports:
                    fail(f"{overlay}: Service {s['metadata']['name']} targets {p['targetPort']!r}")
    for np in by_kind(docs, "NetworkPolicy"):
        sel = np["spec"]["podSelector"]["matchLabels"]
        if all(labels.get(k) == v for k, v in sel.items()):
            for rule in np["spec"]["ingress"]:
                for p in rule["ports"]:
                    if p["port"] not in ports:
                        fail(f"{overlay}: NetworkPolicy {np['metadata']['name']} names port {p['port']!r}")
    for sm in by_kind(docs, "ServiceMonitor"):
        want = sm["spec"]["selector"]["matchLabels"]
        named = {
            p["name"]
            for s in services.values()
            if all(s["metadata"].get("labels", {}).get(k) == v for k, v in want.items())
            for p in s["spec"]["ports"]
        }
        for e in sm["spec"]["endpoints"]:
            if e["port"] not in named:
                fail(f"{overlay}: ServiceMonitor endpoint port {e['port']!r} is on no selected Service")
            if e["authorization"]["credentials"]["key"] not in SECRETS:
                fail(f"{overlay}: ServiceMonitor reads an unknown secret key")
    (cm,) = [m for m in by_kind(docs, "ConfigMap") if m["metadata"]["name"].startswith("herald-config")]
    toml = cm["data"]["herald.toml"]
    drain = duration_s(toml_value(toml, "shutdown", "drain_window") or "5s")
    grace = duration_s(toml_value(toml, "shutdown", "grace_period") or "15s")
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    pause = float(pre[-1]) if pre[0].endswith("sleep") else 0
    total = pod["terminationGracePeriodSeconds"]
    if total < pause + drain + grace:
        fail(f"{overlay}: terminationGracePeriodSeconds {total} < preStop {pause} + drain {drain} + grace {grace}")
    for rule in by_kind(docs, "PrometheusRule"):
        with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
            yaml.safe_dump({"groups": rule["spec"]["groups"]}, f)
            f.flush()
            run(["promtool", "check", "rules", f.name])
    return dep, c, pod, cm, services, pause, total


def write_rollout(dep, cm, pause, total):
    """The timings a rolling update gives each pod, for the soak's rollout
    (`herald-soak run --rolling-update target/k8s-rollout.json`)."""
    toml = cm["data"]["herald.toml"]
    strategy = dep["spec"]["strategy"]["rollingUpdate"]
    for k in ("maxSurge", "maxUnavailable"):
        if not isinstance(strategy[k], int):
            fail(f"the rollout simulation takes a number of pods for {k}, not {strategy[k]!r}")
    timings = {
        "pre_stop_seconds": pause,
        "termination_grace_period_seconds": total,
        "drain_window": toml_value(toml, "shutdown", "drain_window") or "5s",
        "grace_period": toml_value(toml, "shutdown", "grace_period") or "15s",
        "max_surge": strategy["maxSurge"],
        "max_unavailable": strategy["maxUnavailable"],
    }
    out = ROOT / "target" / "k8s-rollout.json"
    out.write_text(json.dumps(timings, indent=2) + "\n")
    print(f"deploy/kubernetes: rollout timings for the soak in {out.relative_to(ROOT)}: {timings}")


def service_links(services):
    """The variables Kubernetes injects for every Service in the namespace (docker links
    style), unless the pod sets enableServiceLinks: false."""
    env = {}
    for i, (name, s) in enumerate(sorted(services.items())):
        ip = f"10.96.0.{10 + i}"
        svc = name.upper().replace("-", "_")
        ports = s["spec"]["ports"]
        env[f"{svc}_SERVICE_HOST"] = ip
        env[f"{svc}_SERVICE_PORT"] = str(ports[0]["port"])
        env[f"{svc}_PORT"] = f"tcp://{ip}:{ports[0]['port']}"
        for p in ports:
            proto = p.get("protocol", "TCP")
            if p.get("name"):
                env[f"{svc}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
            base = f"{svc}_PORT_{p['port']}_{proto}"
            env[base] = f"{proto.lower()}://{ip}:{p['port']}"
            env[f"{base}_PROTO"] = proto.lower()
            env[f"{base}_PORT"] = str(p["port"])
            env[f"{base}_ADDR"] = ip
    return env


def pod_environment(c, pod_name):
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e["valueFrom"]:
            env[e["name"]] = SECRETS[e["valueFrom"]["secretKeyRef"]["key"]]
        elif e["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[e["name"]] = pod_name
        else:
            fail(f"unsupported env source in the Deployment: {e}")
    return env


def jwt(secret, sub, ttl=600):
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": sub, "exp": int(time.time()) + ttl, "channels": ["news"]}).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def http(url, method="GET", body=None, headers=None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return None, b""


def inside(overlay, binary):
    """Runs in the pod's network namespace (see outside())."""
    import websockets

    docs = render(overlay)
    dep, c, pod, cm, services, pause, total = check_consistency(docs, overlay)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    work = pathlib.Path(tempfile.mkdtemp(prefix="herald-k8s-"))
    # Volumes at their mountPath: the ConfigMap's files.
    mounts = {}
    for m in c.get("volumeMounts", []):
        (vol,) = [v for v in pod["volumes"] if v["name"] == m["name"]]
        d = work / m["name"]
        d.mkdir()
        if "configMap" in vol:
            (src,) = [x for x in by_kind(docs, "ConfigMap") if x["metadata"]["name"] == vol["configMap"]["name"]]
            for k, v in src["data"].items():
                (d / k).write_text(v)
        mounts[m["mountPath"]] = str(d)

    def mapped(arg):
        for at, d in mounts.items():
            if arg == at or arg.startswith(at + "/"):
                return d + arg[len(at):]
        return arg

    args = [binary] + [mapped(a) for a in c.get("command", [])[1:] + c.get("args", [])]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOSTNAME": "herald-7d9f8c6b5-x2x4q"}
    env.update(service_links(services))
    env.update(pod_environment(c, env["HOSTNAME"]))
    redis = subprocess.Popen(
        ["redis-server", "--port", "6379", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = open(work / "herald.log", "w")
    node = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    internal = f"http://127.0.0.1:{ports[c['readinessProbe']['httpGet']['port']]}"

    def explain(msg):
        node.kill()
        redis.kill()
        fail(f"{overlay}: {msg}\n--- herald's log:\n{(work / 'herald.log').read_text()[-4000:]}")

    try:
        ready_path = c["readinessProbe"]["httpGet"]["path"]
        live = c["livenessProbe"]["httpGet"]
        deadline = time.time() + 30
        while http(internal + ready_path)[0] != 200:
            if node.poll() is not None:
                explain(f"herald exited with {node.returncode} under the Deployment's arguments and environment")
            if time.time() > deadline:
                explain("not ready within 30 s")
            time.sleep(0.1)
        status, _ = http(f"http://127.0.0.1:{ports[live['port']]}{live['path']}")
        if status != 200:
            explain(f"liveness {live['path']} answered {status}")
        if http(internal + "/metrics")[0] != 401:
            explain("/metrics answered without the metrics key")
        status, body = http(internal + "/metrics", headers={"authorization": f"Bearer {SECRETS['metrics-key']}"})
        if status != 200 or b"herald_connections" not in body:
            explain(f"/metrics with the metrics key answered {status}")

        origin = toml_value(cm["data"]["herald.toml"], "auth", "allowed_origins")
        origin = re.findall(r'"([^"]+)"', origin or "")[0] if origin and '"' in origin else None
        token = jwt(SECRETS["jwt-hmac-secret"], "user-1")
        public = ports[[p for p in c["ports"] if p["name"] == "ws"][0]["name"]]

        async def client():
            url = f"ws://127.0.0.1:{public}/ws?access_token={token}"
            async with websockets.connect(url, origin=origin) as ws:
                welcome = json.loads(await ws.recv())
                if welcome.get("user") != "user-1" or welcome.get("node") != env["HOSTNAME"]:
                    explain(f"unexpected welcome {welcome}")
                await ws.send(json.dumps({"op": "subscribe", "channel": "news", "id": 1}))
                reply = json.loads(await ws.recv())
                if reply.get("op") != "subscribed":
                    explain(f"subscribe answered {reply}")
                status, body = await asyncio.to_thread(
                    http,
                    internal + "/api/publish",
                    "POST",
                    b'{"channel":"news","data":{"hello":"k8s"}}',
                    {"authorization": f"Bearer {SECRETS['api-key']}", "content-type": "application/json"},
                )
                if status != 200:
                    explain(f"publish with the API key answered {status} {body!r}")
                msg = json.loads(await ws.recv())
                if msg.get("data") != {"hello": "k8s"}:
                    explain(f"expected the publication, got {msg}")
                # A rollout: the preStop pause, then SIGTERM.
                await asyncio.sleep(min(pause, 1.0))
                node.send_signal(signal.SIGTERM)
                sent = time.time()
                unready = None
                try:
                    while True:
                        await asyncio.wait_for(ws.recv(), timeout=total)
                except websockets.ConnectionClosed as e:
                    code = e.rcvd.code if e.rcvd else None
                if code != 1012:
                    explain(f"a draining pod closed its client with {code}, not 1012")
                for _ in range(50):
                    status, _ = await asyncio.to_thread(http, internal + ready_path)
                    if status != 200:
                        # 503 while draining, or refused once the process is gone.
                        unready = status or "refused"
                        break
                    await asyncio.sleep(0.05)
                if unready is None:
                    explain("still ready after closing its clients for a shutdown")
                return sent, unready

        sent, unready = asyncio.run(client())
        try:
            rc = node.wait(timeout=total - pause)
        except subprocess.TimeoutExpired:
            explain(f"still running {total - pause} s after SIGTERM (terminationGracePeriodSeconds {total} - preStop {pause})")
        took = time.time() - sent
        if rc != 0:
            explain(f"exited with {rc} after SIGTERM")
        print(
            f"deploy/kubernetes {overlay}: ready with the Deployment's arguments and environment "
            f"({len(env)} variables, service links included); probes answer; drained on SIGTERM in {took:.1f} s "
            f"(grace {total - pause:.0f} s after preStop); readiness then {unready}"
        )
    finally:
        node.kill()
        redis.kill()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def outside(binary):
    generated = run([sys.executable, str(HERE / "generate.py"), "--check"])
    del generated
    objects = 0
    for overlay in OVERLAYS:
        docs = render(overlay)
        objects += validate(docs, overlay)
        dep, _, pod, cm, _, pause, total = check_consistency(docs, overlay)
        if overlay == "single-redis":
            write_rollout(dep, cm, pause, total)
        # The validation bites: the same render with one misspelt field must fail.
        bad = yaml.safe_load(yaml.safe_dump(docs))
        by_kind(bad, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
        validate(bad, f"{overlay} (misspelt field)", must_pass=False)
    print(f"deploy/kubernetes: {len(OVERLAYS)} overlays, {objects} objects valid (strict) against Kubernetes {', '.join(VERSIONS)}")

    # The pod's network namespace: its own loopback; `herald-redis` resolves to it.
    ns = f"herald-k8s-{os.getpid()}"
    etc = pathlib.Path("/etc/netns") / ns
    run(["ip", "netns", "add", ns])
    try:
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text("127.0.0.1 localhost herald-redis\n")
        run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])
        for overlay in OVERLAYS:
            if overlay != "single-redis":
                continue  # needs a Redis Cluster: rendered and validated above
            r = subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, __file__, "--inside", overlay, binary]
            )
            if r.returncode != 0:
                sys.exit(r.returncode)
    finally:
        subprocess.run(["ip", "netns", "del", ns])
        shutil.rmtree(etc, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--inside":
        inside(sys.argv[2], sys.argv[3])
    else:
        binary = os.path.abspath(os.environ.get("HERALD_BIN", ROOT / "target" / "debug" / "herald"))
        if not os.access(binary, os.X_OK):
            fail(f"{binary} not built (cargo build -p herald)")
        outside(binary)
